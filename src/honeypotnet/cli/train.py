"""`honeypotnet train`: train a victim classifier."""
from __future__ import annotations

import time
from pathlib import Path

from .common import log, DATASETS, dataset_args, device_arg, load_data, resolve_device, write_json


def add(sub) -> None:
    s = sub.add_parser("train", help="train a victim classifier", epilog=DATASETS)
    dataset_args(s, "data", None, "train", "training")
    s.add_argument("--test-split", default="test", help="labelled split to report accuracy on ('' to skip)")
    s.add_argument("--arch", default="cnn_small", help="model registry name")
    s.add_argument("--pretrained", default=None, help="start from a checkpoint (e.g. a CIFAR ResNet .th)")
    s.add_argument("--image-size", type=int, default=None, help="resize every image to this side")
    s.add_argument("--epochs", type=int, default=8)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--lr", type=float, default=0.05)
    s.add_argument("--seed", type=int, default=0)
    device_arg(s)
    s.add_argument("--output", required=True, help="model file to write (.safetensors); resumes from OUTPUT.ckpt")
    s.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..bundle import save_model
    from ..models import create_model
    from ..training import FitConfig, accuracy, fit

    device = resolve_device(args.device)
    train = load_data(args, "data", size=args.image_size)
    if train.labels is None:
        raise ValueError("training needs a labelled split")
    test = load_data(args, "data", size=args.image_size, split=args.test_split) if args.test_split else None
    torch.manual_seed(args.seed)
    model = create_model(args.arch, train.num_classes, **({"pretrained": args.pretrained} if args.pretrained else {}))
    model.to(device)
    out = Path(args.output)
    t0 = time.time()
    cfg = FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    ckpt = out.with_name(out.name + ".ckpt")
    history = fit(model, train.images, train.labels, cfg, checkpoint=ckpt, progress=not args.quiet,
                  desc=f"train {args.arch}") if args.epochs > 0 else []
    result = {"arch": args.arch, "dataset": train.name, "epochs": args.epochs, "seconds": round(time.time() - t0, 1),
              "loss": history}
    if test is not None:
        result["test_accuracy"] = accuracy(model, test.images, test.labels)
        log.info(f"test accuracy: {100 * result['test_accuracy']:.2f}%")
    save_model(model.cpu(), out, args.arch, train.num_classes, train.classes, dataset=train.name)
    ckpt.unlink(missing_ok=True)
    write_json(out.with_suffix(".json"), result)
    log.info(f"saved {out}")
    return 0
