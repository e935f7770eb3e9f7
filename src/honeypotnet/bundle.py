"""On-disk formats: a model file (victim, substitute) and the protected bundle.

Model file: one `.safetensors` whose metadata holds the architecture, number of classes, class
names and anything else as JSON, so it can be rebuilt from the registry without pickle.

Bundle (what `protect` writes, `serve`/`verify` read): a directory with
    model.safetensors    the protected model F_H (victim architecture, last layer = HoneypotLayer)
    trigger.safetensors  pattern (3,H,W) and mask (1,H,W)
    trigger.png          the trigger for people to look at: amplified to the full range (mid-grey = 0),
                         after an example image clean and stamped when save_bundle was given one
    manifest.json        format, architecture, head, target, class names, normalisation, trigger,
                         verification null (tau0 and how it was obtained), config, the SHA-256 of
                         every other file ("files"), and `bundle_hash`
    bundle.sha256        the bundle hash again, one line, for the owner to keep apart from the bundle

The bundle hash is the SHA-256 of the manifest's canonical JSON (sorted keys, no whitespace,
without the `bundle_hash` field itself). The manifest holds every file's hash, so the bundle hash
covers every byte the bundle is loaded from: target, tau0, weights and trigger. Loading recomputes
all of it and refuses any mismatch; `load_bundle(path, expected_hash=...)` also checks it against
the value the owner kept, which catches a bundle rewritten whole with fresh hashes. Writing goes to
a temporary directory that is renamed into place, so a killed write never leaves a half bundle.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
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
from .ops import save_weights, weights_fault, weights_state
from .head import HoneypotLayer, build_protected, head_attribute
from .models import create_model, resolve_module
from .trigger import Trigger

FORMAT = "honeypotnet-bundle/2"
OLD_FORMATS = ("honeypotnet-bundle/1",)  # manifest not covered by a hash: refused, re-protect
HASH_FILE = "bundle.sha256"
MANIFEST = "manifest.json"
REQUIRED_FILES = ("model.safetensors", "trigger.safetensors")


class BundleError(ValueError):
    """A bundle or model file is missing, corrupt, tampered with, or not ours."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(manifest: dict) -> bytes:
    """The bytes the bundle hash is taken over: sorted keys, no whitespace, ASCII, without `bundle_hash`."""
    body = {k: v for k, v in manifest.items() if k != "bundle_hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def manifest_hash(manifest: dict) -> str:
    """SHA-256 (hex) of `canonical_json(manifest)`: the bundle hash."""
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def read_bundle_hash(path: str | os.PathLike) -> str:
    """The bundle hash as written in `<bundle>/bundle.sha256` (not checked: `load_bundle` checks it)."""
    f = Path(path) / HASH_FILE
    if not f.is_file():
        raise BundleError(f"bundle file missing: {f}")
    return f.read_text().strip()


def trigger_commitment(trigger: Trigger, target: int, salt: str) -> str:
    """SHA-256 (hex) committing to the secret: the salt (hex), the target class, and the trigger's pattern
    and mask (float32 bytes). Published at protect time, it binds the owner to this trigger before any
    suspect existed: a trigger crafted later against an innocent model cannot match it."""
    h = hashlib.sha256()
    h.update(bytes.fromhex(salt))
    h.update(f"honeypotnet-trigger/1:target={int(target)}:family={trigger.family}:eps={trigger.eps!r}:".encode())
    for t in (trigger.pattern, trigger.mask):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- model files


def save_model(model: nn.Module, path: str | os.PathLike, arch: str, num_classes: int,
               classes: list[str] | None = None, **info) -> Path:
    """Save a model as safetensors with its architecture in the metadata (atomic). `arch`: a registry name,
    or "torchvision:NAME" / "timm:NAME" (its input normalisation, found in the model, is recorded too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    norm = next((m for m in model.modules() if hasattr(m, "mean") and hasattr(m, "std")), None) if ":" in arch else None
    meta = {"format": "honeypotnet-model/1", "arch": arch, "num_classes": str(num_classes),
            "classes": json.dumps(classes or []), "info": json.dumps(info),
            "normalization": json.dumps([norm.mean.flatten().tolist(), norm.std.flatten().tolist()] if norm is not None
                                        else None)}
    return save_weights(model, path, metadata=meta)


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
    info = json.loads(meta.get("info", "{}"))
    norm = json.loads(meta.get("normalization", "null")) if ":" in arch else None
    try:
        hp = info.get("honeypot")  # a protected model exported from a bundle (export --format model)
        if hp:
            model = build_protected(arch, k, hp["kind"], int(hp["hidden"]), hp.get("path"), norm)
        else:
            model = create_model(arch, k, **({"normalize": norm} if ":" in arch else {}))
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{path}: cannot rebuild its architecture {arch!r}: {e}") from None
    _load_state(model, state, path)
    info = {"arch": arch, "num_classes": k, "classes": json.loads(meta.get("classes", "[]")), **info}
    return model.eval(), info


def _load_state(model: nn.Module, state: dict, path) -> None:
    fault = weights_fault(model, state)
    if fault:
        raise BundleError(f"weights in {path} cannot be loaded: {fault}")
    model.load_state_dict(state, strict=True)


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

    @property
    def commitment(self) -> str:
        """The trigger commitment (hex) made when the bundle was written: what the owner publishes."""
        return str(self.manifest["commitment"]["hash"])

    @property
    def bundle_hash(self) -> str:
        """SHA-256 over the manifest (which holds every file's hash): what the owner keeps."""
        return str(self.manifest["bundle_hash"])


def save_bundle(path: str | os.PathLike, model: nn.Module, trigger: Trigger, *, arch: str, target: int,
                classes: list[str], config: dict | None = None, verification: dict | None = None,
                history: list | None = None, extra: dict | None = None, overwrite: bool = False,
                example: torch.Tensor | None = None) -> Path:
    """Write a bundle directory atomically. `model` is the protected model (last layer a HoneypotLayer).
    example: an image (3,H,W) shown clean and stamped beside the amplified trigger in trigger.png.

    Returns the bundle's path; its bundle hash (keep it apart from the bundle, to pass as
    `load_bundle(path, expected_hash=...)`) is in `<path>/bundle.sha256` and `read_bundle_hash(path)`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise BundleError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    for reserved in ("files", "bundle_hash", "commitment"):
        if reserved in (extra or {}):
            raise BundleError(f"save_bundle: extra may not set the manifest field {reserved!r}")
    head_path = head_attribute(model)
    layer = resolve_module(model, head_path)[1]
    if not isinstance(layer, HoneypotLayer):
        raise BundleError("model's last layer is not a HoneypotLayer: protect it first")
    norm = next((m for m in model.modules() if hasattr(m, "mean") and hasattr(m, "std")), None)
    normalization = {"mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist()} if norm is not None else None
    _check_rebuildable(model, arch, len(classes), layer, head_path, normalization)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=path.parent))
    try:
        save_file(weights_state(model), str(tmp / "model.safetensors"))
        save_file({"pattern": trigger.pattern.cpu().contiguous(), "mask": trigger.mask.cpu().contiguous()}, str(tmp / "trigger.safetensors"))
        _save_png(trigger.picture(example), tmp / "trigger.png")
        manifest = {
            "format": FORMAT, "honeypotnet_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "arch": arch, "num_classes": len(classes), "classes": list(classes), "target": int(target),
            "head": {"kind": layer.kind, "hidden": layer.hidden, "path": head_path},
            "image_size": trigger.image_size, "input": "float RGB in [0,1], shape (N,3,H,W); the model normalises internally",
            "normalization": normalization,
            "trigger": trigger.describe(), "verification": verification, "config": config or {},
            "history": history or [], **(extra or {}),
        }
        salt = secrets.token_hex(32)
        manifest["commitment"] = {"hash": trigger_commitment(trigger, target, salt), "salt": salt,
                                  "created": manifest["created"],
                                  "scheme": "sha256(salt, target, trigger family and eps, pattern, mask)"}
        # every file written so far (all but the manifest and the hash file) is listed with its hash
        manifest["files"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        # the hash is taken over the manifest as it will be read back (tuples become lists, keys strings)
        manifest = json.loads(json.dumps(manifest))
        digest = manifest_hash(manifest)
        manifest["bundle_hash"] = digest
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        (tmp / HASH_FILE).write_text(digest + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_bundle(path: str | os.PathLike, expected_hash: str | None = None,
                commitment: str | None = None) -> Bundle:
    """Load and check a bundle; raises BundleError on anything missing, corrupt or tampered with.

    expected_hash: the bundle hash the owner kept when the bundle was written (bundle.sha256); when
    given, a bundle whose hash differs is refused even if it is consistent in itself.
    commitment: the trigger commitment the owner published at protect time; when given, a bundle whose
    trigger (or target) is not the committed one is refused."""
    path = Path(path)
    manifest = _checked_manifest(path, expected_hash)
    try:
        head = manifest["head"]
        model = _rebuild(manifest["arch"], int(manifest["num_classes"]), head["kind"], int(head["hidden"]),
                         head.get("path"), manifest.get("normalization"))
        _load_state(model, load_file(str(path / "model.safetensors")), path / "model.safetensors")
        t = load_file(str(path / "trigger.safetensors"))
        tinfo = manifest["trigger"]
        trigger = Trigger(t["pattern"], t["mask"], tinfo["family"], float(tinfo["eps"]))
        target = int(manifest["target"])
    except (KeyError, TypeError, SafetensorsError) as e:
        raise BundleError(f"{path}: malformed bundle ({type(e).__name__}: {e})") from e
    if not 0 <= target < int(manifest["num_classes"]):
        raise BundleError(f"{path}: target class {target} out of range")
    c = manifest.get("commitment") or {}
    try:
        actual = trigger_commitment(trigger, target, str(c["salt"]))
    except (KeyError, ValueError) as e:
        raise BundleError(f"{path}: the manifest holds no valid trigger commitment ({type(e).__name__})") from None
    if actual != c.get("hash"):
        raise BundleError(f"{path}: the trigger does not match the bundle's own commitment; refusing to load")
    if commitment is not None and commitment.strip().lower() != actual:
        raise BundleError(f"{path}: its trigger commitment {actual} is not the published {commitment.strip()} "
                          f"(published {c.get('created')}?): this trigger was not the one committed to; refusing")
    return Bundle(model.eval(), trigger, manifest, path)


def _rebuild(arch: str, num_classes: int, kind: str, hidden: int, head_path: str | None, normalization) -> nn.Module:
    norm = (normalization["mean"], normalization["std"]) if normalization else None
    return build_protected(arch, num_classes, kind, hidden, head_path, norm)


def _check_rebuildable(model: nn.Module, arch: str, num_classes: int, layer, head_path: str, normalization) -> None:
    """Refuse (at save time) a bundle that load_bundle could not rebuild: `arch` must name the model's
    architecture (a registry name, torchvision:NAME or timm:NAME) with the same state dict layout."""
    try:
        empty = _rebuild(arch, num_classes, layer.kind, layer.hidden, head_path, normalization)
    except (ValueError, TypeError) as e:
        raise BundleError(f"arch {arch!r} cannot be rebuilt when the bundle is loaded ({e}); use a registry name, "
                          "torchvision:NAME or timm:NAME, or export the model (honeypotnet export)") from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in empty.state_dict().items()}
    if want != got:
        diff = sorted(set(want) ^ set(got))[:4] or [k for k in want if want[k] != got.get(k)][:4]
        raise BundleError(f"the model is not a {arch!r} with {num_classes} classes (state dicts differ at {diff}); "
                          "pass the architecture it was built from (registry name, torchvision:NAME, timm:NAME)")


def _checked_manifest(path: Path, expected_hash: str | None) -> dict:
    """The manifest of the bundle at `path`, after every hash in and over it has been recomputed."""
    mf = path / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{path} is not a bundle: no {MANIFEST}")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf} is not valid JSON: {e}") from e
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt in OLD_FORMATS:
        raise BundleError(f"{path} was written by an older version of honeypotnet (format {fmt!r}, whose manifest "
                          f"is not covered by a hash); protect the model again to write a {FORMAT!r} bundle")
    if fmt != FORMAT:
        raise BundleError(f"{mf}: unknown bundle format {fmt!r}, expected {FORMAT!r}")
    recorded = manifest.get("bundle_hash")
    if not isinstance(recorded, str) or not recorded:
        raise BundleError(f"{mf} has no bundle_hash: the manifest was edited or the bundle is incomplete; refusing to load")
    actual = manifest_hash(manifest)
    if actual != recorded:
        raise BundleError(f"{mf} was modified after the bundle was written: its hash {actual} does not match its "
                          f"bundle_hash {recorded} (a field such as target or tau0 was edited); refusing to load")
    kept = read_bundle_hash(path)
    if kept != recorded:
        raise BundleError(f"{path / HASH_FILE} says {kept[:80]!r} but the manifest's bundle_hash is {recorded}: "
                          f"one of them was modified; refusing to load")
    if expected_hash is not None and expected_hash.strip().lower() != actual:
        raise BundleError(f"{path}: bundle hash {actual} is not the expected {expected_hash.strip()} "
                          f"(the bundle was rewritten or replaced); refusing to load")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{mf}: 'files' must map file names to SHA-256 hashes")
    for required in REQUIRED_FILES:
        if required not in files:
            raise BundleError(f"{mf} lists no hash for {required}")
    for name, digest in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in (MANIFEST, HASH_FILE, "", ".", ".."):
            raise BundleError(f"{mf}: {name!r} is not a file name a bundle may hold")
        f = path / name
        if not f.is_file():
            raise BundleError(f"bundle file missing: {f}")
        if sha256_file(f) != digest:
            raise BundleError(f"hash mismatch for {f}: the file was modified after the bundle was written; refusing to load")
    return manifest


def _save_png(img_u8: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(img_u8.permute(1, 2, 0).contiguous().numpy(), "RGB").save(path)
