"""On-disk formats: a model file (victim, substitute) and the protected bundle.

Model file: one `.safetensors` whose metadata holds the architecture, number of classes, class
names and anything else as JSON, so it can be rebuilt from the registry without pickle.

Bundle (what `protect` writes, `serve`/`verify` read): a directory with
    model.safetensors    the protected model F_H (victim architecture, last layer = HoneypotLayer)
    trigger.safetensors  pattern (3,H,W) and mask (1,H,W)
    trigger.png          the trigger for people to look at (mid-grey = 0)
    manifest.json        format, architecture, head, target, class names, normalisation, trigger,
                         verification null (tau0 and how it was obtained), config, file hashes
Loading checks every hash and refuses a mismatch. Writing goes to a temporary directory that is
renamed into place, so a killed write never leaves a half bundle.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError as SafetensorsError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .honeypot import HoneypotLayer, Trigger, build_protected, head_attribute
from .models import create_model

FORMAT = "honeypotnet-bundle/1"


class BundleError(ValueError):
    """A bundle or model file is missing, corrupt, tampered with, or not ours."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- model files


def save_model(model: nn.Module, path: str | os.PathLike, arch: str, num_classes: int,
               classes: list[str] | None = None, **info) -> Path:
    """Save a registry model as safetensors with its architecture in the metadata (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "honeypotnet-model/1", "arch": arch, "num_classes": str(num_classes),
            "classes": json.dumps(classes or []), "info": json.dumps(info)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load a model file written by `save_model`; returns (model in eval mode, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"model file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorsError, OSError, ValueError) as e:
        raise BundleError(f"{path} is not a readable safetensors model file: {e}") from e
    if meta.get("format") != "honeypotnet-model/1":
        raise BundleError(f"{path} is not a honeypotnet model file (no architecture metadata)")
    arch, k = meta["arch"], int(meta["num_classes"])
    model = create_model(arch, k)
    _load_state(model, state, path)
    info = {"arch": arch, "num_classes": k, "classes": json.loads(meta.get("classes", "[]")),
            **json.loads(meta.get("info", "{}"))}
    return model.eval(), info


def _load_state(model: nn.Module, state: dict, path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"weights in {path} do not fit the architecture: {str(e)[:300]}") from e
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise BundleError(f"weights in {path} contain NaN/inf ({k})")


# ----------------------------------------------------------------------------- bundles


@dataclass
class Bundle:
    model: nn.Module  # protected model, eval mode, input float [0,1] (N,3,H,W)
    trigger: Trigger
    manifest: dict
    path: Path | None = None

    @property
    def target(self) -> int:
        return int(self.manifest["target"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def tau0(self) -> float | None:
        null = self.manifest.get("verification") or {}
        return null.get("tau0")


def save_bundle(path: str | os.PathLike, model: nn.Module, trigger: Trigger, *, arch: str, target: int,
                classes: list[str], config: dict | None = None, verification: dict | None = None,
                history: list | None = None, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write a bundle directory atomically. `model` is the protected model (last layer a HoneypotLayer)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise BundleError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    layer = getattr(model, head_attribute(model))
    if not isinstance(layer, HoneypotLayer):
        raise BundleError("model's last layer is not a HoneypotLayer: protect it first")
    norm = next((m for m in model.modules() if hasattr(m, "mean") and hasattr(m, "std")), None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=path.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({"pattern": trigger.pattern.cpu().contiguous(), "mask": trigger.mask.cpu().contiguous()}, str(tmp / "trigger.safetensors"))
        _save_png(trigger.to_image(), tmp / "trigger.png")
        manifest = {
            "format": FORMAT, "honeypotnet_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "arch": arch, "num_classes": len(classes), "classes": list(classes), "target": int(target),
            "head": {"kind": layer.kind, "hidden": layer.hidden},
            "image_size": trigger.image_size, "input": "float RGB in [0,1], shape (N,3,H,W); the model normalises internally",
            "normalization": {"mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist()} if norm is not None else None,
            "trigger": trigger.describe(), "verification": verification, "config": config or {},
            "history": history or [], **(extra or {}),
            "files": {n: sha256_file(tmp / n) for n in ("model.safetensors", "trigger.safetensors", "trigger.png")},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Load and check a bundle; raises BundleError on anything missing, corrupt or tampered with."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise BundleError(f"{path} is not a bundle: no manifest.json")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mf}: unknown bundle format {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r}")
    for name, digest in (manifest.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"bundle file missing: {f}")
        if sha256_file(f) != digest:
            raise BundleError(f"hash mismatch for {f}: the bundle was modified after it was written; refusing to load")
    for required in ("model.safetensors", "trigger.safetensors"):
        if required not in (manifest.get("files") or {}):
            raise BundleError(f"manifest lists no hash for {required}")
    try:
        head = manifest["head"]
        model = build_protected(manifest["arch"], int(manifest["num_classes"]), head["kind"], int(head["hidden"]))
        _load_state(model, load_file(str(path / "model.safetensors")), path / "model.safetensors")
        t = load_file(str(path / "trigger.safetensors"))
        tinfo = manifest["trigger"]
        trigger = Trigger(t["pattern"], t["mask"], tinfo["family"], float(tinfo["eps"]))
        target = int(manifest["target"])
    except (KeyError, TypeError, SafetensorsError) as e:
        raise BundleError(f"{path}: malformed bundle ({type(e).__name__}: {e})") from e
    if not 0 <= target < int(manifest["num_classes"]):
        raise BundleError(f"{path}: target class {target} out of range")
    return Bundle(model.eval(), trigger, manifest, path)


def _save_png(img_u8: torch.Tensor, path: Path, scale: int = 4) -> None:
    from PIL import Image

    arr = img_u8.permute(1, 2, 0).numpy()
    im = Image.fromarray(arr, "RGB")
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(path)
