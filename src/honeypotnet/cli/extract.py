"""`honeypotnet extract`: simulate a thief (query an oracle, train a substitute)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from .common import log, DATASETS, dataset_args, device_arg, load_any_model, load_data, resolve_device, write_json


def add(sub) -> None:
    from ..names import OUTPUT_MODES, STRATEGIES

    s = sub.add_parser("extract", help="simulate a thief: query an oracle, train a substitute", epilog=DATASETS)
    s.add_argument("oracle", help="bundle directory or model file the thief queries, or an http(s) URL "
                                  "http://HOST:PORT/v2/models/NAME of a served model")
    s.add_argument("--api-key", default=os.environ.get("HONEYPOTNET_API_KEY"),
                   help="bearer token for an http(s) oracle (default $HONEYPOTNET_API_KEY)")
    dataset_args(s, "pool", None, "train", "thief's query pool")
    s.add_argument("--image-size", type=int, default=None,
                   help="resize every pool image to this side (default: the files' own size; an http(s) oracle's "
                        "when it says)")
    s.add_argument("--budget", type=int, default=8000, help="number of queries (one image = one query)")
    s.add_argument("--strategy", choices=list(STRATEGIES), default="random",
                   help="which pool images to buy: random (KnockoffNets), or ActiveThief rounds from a random seed: "
                        "entropy (uncertainty), kcenter (core-set on substitute features), dfal (DeepFool margin)")
    s.add_argument("--rounds", type=int, default=5, help="active strategies: selection rounds after the initial seed")
    s.add_argument("--initial", type=int, default=None, help="active strategies: initial random seed size (default budget/10)")
    s.add_argument("--round-epochs", type=int, default=None,
                   help="active strategies: warm-start epochs of the round substitute per round (default epochs/4)")
    s.add_argument("--output-mode", choices=list(OUTPUT_MODES), default="probs",
                   help="what the API answers: probs, topk (--k), rounded (--decimals), label (top-1 only)")
    s.add_argument("--k", "--top-k", dest="top_k", type=int, default=1, help="k of --output-mode topk")
    s.add_argument("--decimals", type=int, default=2, help="decimals of --output-mode rounded")
    s.add_argument("--arch", default="cnn_small", help="substitute architecture")
    s.add_argument("--epochs", type=int, default=12)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--lr", type=float, default=0.05)
    s.add_argument("--seed", type=int, default=0)
    device_arg(s)
    s.add_argument("--eval", default=None, metavar="NAME", help="labelled dataset to report substitute accuracy on")
    s.add_argument("--eval-root", default=None)
    s.add_argument("--eval-split", default="test")
    s.add_argument("--output", required=True, help="substitute model file to write")
    s.set_defaults(func=run)


def run(args) -> int:
    from ..active import extract
    from ..bundle import save_model
    from ..data import load_dataset
    from ..oracles import ModelOracle, OutputMode
    from ..oracles_http import HttpOracle, is_url
    from ..training import FitConfig, accuracy

    device = resolve_device(args.device)
    output = OutputMode(args.output_mode, args.top_k, args.decimals)
    if is_url(args.oracle):  # a `honeypotnet serve` endpoint: classes and image size from its metadata
        oracle = HttpOracle(args.oracle, api_key=args.api_key, output=output)
        info = {"num_classes": oracle.num_classes, "classes": oracle.classes}
        args.image_size = args.image_size or oracle.image_size
    else:
        model, info = load_any_model(args.oracle)
        oracle = ModelOracle(model.to(device), output)
    pool = load_data(args, "pool", size=args.image_size)
    out = Path(args.output)
    t0 = time.time()
    res = extract(oracle, pool.images, args.budget, args.arch, info["num_classes"], args.strategy, rounds=args.rounds,
                  initial=args.initial, round_epochs=args.round_epochs,
                  fit_config=FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
                  seed=args.seed, progress=not args.quiet, work_dir=out.with_name(out.name + ".work"), device=device)
    result = {"strategy": args.strategy, "budget": args.budget, "queries": res.queries, "arch": args.arch,
              "output_mode": args.output_mode, "top_k": args.top_k, "decimals": args.decimals, "pool": pool.name,
              "seconds": round(time.time() - t0, 1)}
    if args.strategy != "random":
        result["rounds"] = res.rounds
    if args.eval:
        test = load_dataset(args.eval, args.eval_root, args.eval_split, size=args.image_size)
        result["substitute_accuracy"] = accuracy(res.substitute, test.images, test.labels)
        log.info(f"substitute accuracy: {100 * result['substitute_accuracy']:.2f}%")
    save_model(res.substitute.cpu(), out, args.arch, info["num_classes"], info.get("classes"), extraction=result)
    write_json(out.with_suffix(".json"), result)
    log.info(f"saved substitute {out} after {res.queries} queries")
    return 0
