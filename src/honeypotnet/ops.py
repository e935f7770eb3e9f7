"""Small helpers every part of the library shares: random streams, image conversions, atomic writes,
batched forward passes and the attack success rate.

One helper per job, so that a fix (a device, a dtype, a partial write) is made once.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

# ----------------------------------------------------------------------------- random streams


def seed_of(seed: int, *tags: object) -> int:
    """A 63-bit seed derived from `seed` and the `tags` naming one random stream.

    Streams with different tags are independent (a hash, not arithmetic: "trigger" at iteration 6 and
    "honeypot" at iteration 0 never share a seed), and the same (seed, tags) gives the same seed on
    every machine and Python version."""
    key = json.dumps([int(seed), *[str(t) for t in tags]]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def rng(seed: int, *tags: object) -> torch.Generator:
    """A CPU torch.Generator for the stream (seed, *tags) (see seed_of)."""
    return torch.Generator().manual_seed(seed_of(seed, *tags))


# ----------------------------------------------------------------------------- image conversions


def to_float(x: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (N,3,H,W) or float images -> float32 in [0,1] on `device`."""
    x = x.to(device) if device is not None else x
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def take(images, index):
    """images[index] of a tensor (as ever); of an image source (honeypotnet.data.ImageSource, read batch by
    batch) a view of those items that decodes nothing yet. index: a slice or an index tensor."""
    return images[index] if isinstance(images, torch.Tensor) else images.take(index)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float images in [0,1] (clamped) or uint8 -> uint8 on CPU (rounded to the nearest level)."""
    if x.dtype == torch.uint8:
        return x.cpu()
    return (x.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o666):
    """Yield a fresh temporary path beside `path` to write to; on success it is fsynced and renamed over
    `path` (so a reader or a kill never sees a half-written file), on failure removed. `mode` is the new
    file's permissions (before the umask; 0o600 for secrets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def exclusive(path: str | os.PathLike):
    """Hold an advisory lock on the file `path` (created if missing) for the block, so processes that build one
    cached artefact take turns and the later ones find it built (POSIX flock; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the callers' atomic renames still keep the artefact whole
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o666) -> Path:
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o666) -> Path:
    return atomic_write_bytes(path, text.encode(), mode)


def atomic_write_json(path: str | os.PathLike, obj, mode: int = 0o666) -> Path:
    """JSON (indent 2; non-JSON values through str()) written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n", mode)


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """torch.save written atomically (see atomic_path)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


# ----------------------------------------------------------------------------- weights files


def weights_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's state dict as safetensors stores it: detached, on the CPU, contiguous."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """A model's weights as one safetensors file at `path`, written atomically (see atomic_path)."""
    from safetensors.torch import save_file

    state = weights_state(model)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)


def weights_fault(model: nn.Module, state: dict[str, torch.Tensor], *, same_dtypes: bool = False) -> str | None:
    """Why `state` may not be loaded into `model`, or None when it fits: a missing or unexpected tensor, a
    shape (and with same_dtypes a dtype) other than the model's, or NaN / infinite values."""
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        return f"its tensors are not the model's (missing {missing[:3]}, unexpected {extra[:3]})"
    for k, v in own.items():
        if state[k].shape != v.shape:
            return f"{k} has shape {tuple(state[k].shape)}, the model's {tuple(v.shape)}"
        if same_dtypes and state[k].dtype != v.dtype:
            return f"{k} is {state[k].dtype}, the model's {v.dtype}"
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    return f"{bad} holds NaN or infinite values" if bad is not None else None


# ----------------------------------------------------------------------------- batched forward passes


def device_of(model: nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def batched_forward(model: nn.Module, images: torch.Tensor, *, transform=None, batch_size: int = 500,
                    device: torch.device | str | None = None, channels_last: bool = True,
                    observe=None) -> torch.Tensor:
    """model(transform(x)) for uint8/float images (N,3,H,W), batch by batch, in eval mode -> (N, ...) float on CPU.

    images: a tensor, or an image source (honeypotnet.data.ImageSource) read batch by batch (the same batches).
    transform: applied to each float [0,1] batch first (a trigger's stamp, a purification).
    observe: called with each batch as read (before conversion), e.g. to hash the pixels on the way.
    channels_last: feed the batches in NHWC (1.4-2x faster convolutions on CPU when the model's weights are
    channels_last too, as `fit` leaves them; the outputs agree to ~1e-5). The model is not modified; its
    train/eval mode is restored afterwards."""
    device = torch.device(device) if device is not None else device_of(model)
    was_training = model.training
    model.eval()
    out = []
    batches = images.batches(batch_size) if hasattr(images, "batches") else \
        (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    for raw in batches:
        if observe is not None:
            observe(raw)
        x = to_float(raw, device)
        if transform is not None:
            x = transform(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def attack_success_rate(model: nn.Module, trigger, images: torch.Tensor, target: int, n: int | None = None,
                        batch_size: int = 500) -> float:
    """Share of the first `n` images (all when None) that `model` assigns to `target` once stamped by
    `trigger` (anything with a `stamp(x)` method). The caller chooses the images (e.g. those whose
    label is not the target)."""
    images = images if n is None else take(images, slice(0, n))
    if len(images) == 0:
        return 0.0
    logits = batched_forward(model, images, transform=trigger.stamp, batch_size=batch_size,
                             device=trigger.pattern.device, channels_last=False)
    return int((logits.argmax(1) == target).sum()) / len(images)
