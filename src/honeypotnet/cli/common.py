"""What every verb shares: dataset options, model loading, the device, JSON results."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a verb runs, never to build the parser
    import torch

log = logging.getLogger("honeypotnet")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each message."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property decides
        pass


def setup_logging(quiet: bool) -> None:
    """Status lines go to stderr through the 'honeypotnet' logger: INFO and up, WARNING and up with --quiet."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


DATASETS = "Datasets: shapes (embedded, no files), cifar10, cifar100, imagefolder, tinyimagenet."


def dataset_args(p: argparse.ArgumentParser, prefix: str, default_name: str | None, default_split: str, what: str,
                 short: bool = False) -> None:
    """--PREFIX NAME[:SPLIT[:LIMIT]] and --PREFIX-root DIR (short=True); with short=False also --PREFIX-split
    and --PREFIX-limit. default_name None: the dataset must be named."""
    req = default_name is None
    p.add_argument(f"--{prefix}", default=default_name, required=req, metavar="NAME[:SPLIT[:LIMIT]]",
                   help=f"{what} dataset, split and an optional limit (a fixed random subset)"
                        + ("" if req else f" (default {default_name}:{default_split})"))
    p.add_argument(f"--{prefix}-root", default=None, metavar="DIR", help="its root directory (not for 'shapes')")
    if not short:
        p.add_argument(f"--{prefix}-split", default=None, metavar="SPLIT", help=f"split (default {default_split})")
        p.add_argument(f"--{prefix}-limit", type=int, default=None, metavar="N", help="use at most N images")
    p.set_defaults(**{f"{prefix}_default_split": default_split})


def dataset_spec(args, prefix: str) -> tuple[str, str, int | None]:
    """(name, split, limit) of --PREFIX NAME[:SPLIT[:LIMIT]] (and --PREFIX-split / --PREFIX-limit)."""
    parts = str(getattr(args, prefix)).split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"--{prefix} expects NAME[:SPLIT[:LIMIT]], got {getattr(args, prefix)!r}")
    name = parts[0]
    split = getattr(args, f"{prefix}_split", None) or (parts[1] if len(parts) > 1 and parts[1] else None) \
        or getattr(args, f"{prefix}_default_split")
    limit = getattr(args, f"{prefix}_limit", None)
    if limit is None and len(parts) == 3:
        try:
            limit = int(parts[2])
        except ValueError:
            raise ValueError(f"--{prefix}: LIMIT must be an integer, got {parts[2]!r}") from None
    if limit is not None and limit <= 0:
        raise ValueError(f"--{prefix}: the limit must be positive")
    return name, split, limit


STREAM_ENV = "HONEYPOTNET_STREAM_BYTES"
STREAM_DEFAULT = 4 << 30  # 4 GiB


def stream_threshold() -> int:
    """$HONEYPOTNET_STREAM_BYTES: a file dataset whose decoded images would take more than this many bytes is
    read batch by batch (streamed) by `protect` instead of decoded into memory; 0 streams every file
    dataset. A number of bytes, or with a K, M or G suffix (powers of 1024). Default 4G."""
    text = os.environ.get(STREAM_ENV, "").strip().upper()
    if not text:
        return STREAM_DEFAULT
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMG]?)I?B?", text)
    if m is None:
        raise ValueError(f"${STREAM_ENV} must be a number of bytes (e.g. 2G; 0 to always stream), got {text!r}")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])


def load_data(args, prefix: str, size: int | None = None, split: str | None = None, stream: bool = False):
    """The dataset of --PREFIX (an ImageDataset), resized to `size` when given; `split` overrides the
    split, and then the limit does not apply (e.g. a whole test split beside a limited train split).
    stream: a file dataset (imagefolder, folder, tinyimagenet) larger than stream_threshold() comes as a
    FileSource read batch by batch instead (the same images, with the same attributes: images, labels,
    classes, name)."""
    import torch

    from ..data import ImageSource, load_dataset

    name, default_split, limit = dataset_spec(args, prefix)
    limit = None if split else limit

    def load(lazy: bool):
        ds = load_dataset(name, getattr(args, f"{prefix}_root"), split or default_split, size=size, lazy=lazy)
        if limit is not None and limit < len(ds):
            ds = ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(1234))[:limit])
        return ds

    ds = load(stream)  # lazily, only the file list is read
    if isinstance(ds, ImageSource):
        threshold = stream_threshold()
        if ds.nbytes <= threshold:
            return load(False)
        log.info(f"streaming --{prefix} {ds.name}: {len(ds)} images of {ds.image_size} px would take "
                 f"{ds.nbytes / 2**30:.2f} GiB in memory (> ${STREAM_ENV} = {threshold / 2**30:.2f} GiB); "
                 "decoded batch by batch")
    return ds


def write_json(path: str | Path, obj) -> None:
    from ..ops import atomic_write_json

    atomic_write_json(path, obj)


def load_any_model(path: str):
    """A honeypotnet model file, or a bundle directory -> (model, info)."""
    from ..bundle import load_bundle, load_model

    p = Path(path)
    if p.is_dir():
        b = load_bundle(p)
        return b.model, {"arch": b.manifest["arch"], "num_classes": b.manifest["num_classes"], "classes": b.classes,
                         "bundle": b}
    return load_model(p)


def device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where to compute (default auto: a GPU when there is one)")


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available here")
    return dev


def normalize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--normalize", default="imagenet", metavar="imagenet|none|M,M,M:S,S,S",
                   help="input normalisation of a torchvision:/timm: model (default imagenet; 'none' for a model that "
                        "normalises itself); the library's own models normalise internally")


def parse_normalize(text: str):
    """--normalize: 'imagenet', 'none' -> None, or 'M,M,M:S,S,S' -> (mean, std)."""
    if text in ("imagenet", "none"):
        return None if text == "none" else "imagenet"
    try:
        mean, std = ([float(v) for v in part.split(",")] for part in text.split(":"))
    except ValueError:
        raise ValueError(f"--normalize expects imagenet, none or M,M,M:S,S,S, got {text!r}") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"--normalize needs 3 means and 3 positive stds, got {text!r}")
    return mean, std


def load_victim(path: str, arch: str | None, normalize: str = "imagenet"):
    """The victim of `protect` -> (model, info): a honeypotnet model file (arch from its metadata), or, with
    --arch, the user's weights: a CIFAR ResNet checkpoint (.th), or a state dict (.pt / .pth / .safetensors)
    of a registry model, torchvision:NAME or timm:NAME."""
    from ..bundle import load_model
    from ..models import create_model, load_weights

    if not arch:
        if path.endswith((".th", ".pt", ".pth", ".bin")):
            raise ValueError(f"{path} is a state dict: say its architecture with --arch (a registry name, "
                             "torchvision:NAME or timm:NAME) and --num-classes")
        return load_model(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"victim weights not found: {path}")
    num_classes = infer_num_classes(arch, path)
    if ":" in arch:
        model = create_model(arch, num_classes, weights=path, normalize=parse_normalize(normalize))
    elif path.endswith(".th"):
        model = create_model(arch, num_classes, pretrained=path)
    else:
        model = load_weights(create_model(arch, num_classes), path)
    return model.eval(), {"arch": arch, "num_classes": num_classes, "classes": []}


def infer_num_classes(arch: str, path: str) -> int:
    """The number of classes of a state-dict victim: the rows of its last Linear's weight."""
    import torch

    from ..models import create_model, find_head

    if path.endswith(".th"):  # a CIFAR ResNet checkpoint: its loader checks and reports the classes
        from ..models import load_pretrained_cifar_resnet

        return load_pretrained_cifar_resnet(path).num_classes
    bare = create_model(arch, 2, **({"normalize": None} if ":" in arch else {}))
    head_path = find_head(bare)[0]
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                keys = {k: f.get_slice(k).get_shape() for k in f.keys()}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model", "model_state_dict"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
            keys = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable state dict ({type(e).__name__}: {str(e)[:200]})") from None
    for prefix in ("", "module."):
        shape = keys.get(f"{prefix}{head_path}.weight")
        if shape is not None and len(shape) == 2:
            return int(shape[0])
    raise ValueError(f"{path}: no {head_path}.weight in the state dict: is it a {arch}?")
