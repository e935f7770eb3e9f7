"""Negative models: innocent copies of the victim that the trigger step is kept off.

A negative shadow is extracted from the *unprotected* victim on the shadow set (one per architecture of
cfg.negative_archs); with cfg.negative_finetune_epochs > 0 each also gets a copy fine-tuned on the
simulated thief's labelled set every iteration (an innocent owner who fine-tuned). With cfg.negative_once
N > 0 they are extracted once (N epochs) and their copies fine-tuned once, before the first iteration,
since nothing of them depends on the honeypot. generate_trigger
minimises negative_weight · −log(1 − p_target) on all of them, so δ aims at what the honeypot taught
rather than at the target class's natural features, which every clean copy shares.

With negatives.once, the extraction is the costliest step of the robust preset and depends only on the
victim, the images and a few settings, so it can be cached on disk (NegativeCache: protect(cache_dir=)):
a later run with the same victim, images, seed and extraction settings (any trigger, head or loop
settings) loads the weights instead of training them, with the same result as training them.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .config import CONFIG_VERSION, ProtectConfig
from .models import create_model
from .ops import save_weights, weights_fault
from .steps import finetuned_copy, simulate_extraction, stream

CACHE_VERSION = 1  # bump when what a cached negative shadow is (its training) changes


class NegativeCache:
    """Extracted negative shadows on disk (safetensors, one file per model), keyed by content: the victim's weights
    and the images the shadows query (`data`: state.fingerprint; not the owner images they do not query), how many
    of them the shadows query, the number of classes, and the settings the extraction reads (seed, shadow.batch,
    shadow.lr, negatives.once, the model's architecture and position), with torch's version and the device type. An
    unreadable or mismatching file is ignored with a warning and rewritten; a file is written atomically. The
    directory keeps the `keep` most recently used entries (a load marks its file used): older ones are deleted when
    a new one is written, so the cache of a machine that protects many victims stays bounded."""

    KEEP = 64  # entries (a CIFAR-size CNN or ResNet-20 is 1-3 MB)

    def __init__(self, directory: str | os.PathLike, data: str, n_query: int, num_classes: int,
                 device: torch.device, keep: int = KEEP) -> None:
        if keep < 1:
            raise ValueError(f"NegativeCache keep must be at least 1, got {keep}")
        self.directory = Path(directory).expanduser()
        self.data, self.n_query, self.num_classes = data, int(n_query), int(num_classes)
        self.device_type = torch.device(device).type
        self.keep = int(keep)

    def key(self, cfg: ProtectConfig, arch: str, index: int) -> str:
        what = {"cache": CACHE_VERSION, "config": CONFIG_VERSION, "torch": torch.__version__.split("+")[0],
                "device": self.device_type, "data": self.data, "n_query": self.n_query, "classes": self.num_classes,
                "arch": arch, "index": index, "seed": cfg.seed, "once": cfg.negative_once,
                "batch": cfg.shadow_batch, "lr": cfg.shadow_lr}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]

    def path(self, key: str, arch: str) -> Path:
        return self.directory / f"negative-{arch}-{key}.safetensors"

    def load(self, model: nn.Module, key: str, arch: str) -> bool:
        """Fill `model` from the cache; False (model untouched) when there is no usable entry."""
        path = self.path(key, arch)
        if not path.exists():
            return False
        try:
            state = load_file(str(path))
            fault = weights_fault(model, state, same_dtypes=True)
            if fault:
                raise ValueError(fault)
        except Exception as e:  # noqa: BLE001 - a damaged entry is rebuilt, never half-loaded
            warnings.warn(f"ignoring the cached negative shadow {str(path)!r} ({type(e).__name__}: {e}); "
                          "training it again", RuntimeWarning, stacklevel=3)
            return False
        model.load_state_dict(state)
        try:  # mark it used, for prune's order
            os.utime(path)
        except OSError:
            pass
        return True

    def save(self, model: nn.Module, key: str, arch: str) -> None:
        path = self.path(key, arch)
        try:  # save_weights makes the directory
            save_weights(model, path, metadata={"key": key, "arch": arch})
            self.prune(spare=path)
        except OSError as e:  # a read-only or full disk costs the next run time, not this run
            warnings.warn(f"could not cache the negative shadow in {str(self.directory)!r}: {e}", RuntimeWarning,
                          stacklevel=3)

    def entries(self) -> list[Path]:
        """The cached negative shadows, most recently used first."""
        found = []
        for p in self.directory.glob("negative-*.safetensors"):
            try:
                found.append((p.stat().st_mtime_ns, p))
            except OSError:  # removed meanwhile
                continue
        return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]

    def prune(self, spare: Path | None = None) -> list[Path]:
        """Delete the entries past the `keep` most recently used, never `spare` (the entry just written, which
        counts as the newest); returns the deleted paths."""
        old = [p for p in self.entries() if p != spare]
        gone = old[self.keep - (spare is not None):]
        for p in gone:
            p.unlink(missing_ok=True)
        return gone


class NegativeShadows:
    """The negative shadows of one protect run (empty when cfg.negative_weight is 0)."""

    def __init__(self, cfg: ProtectConfig, num_classes: int, device: torch.device,
                 cache: NegativeCache | None = None) -> None:
        self.cfg = cfg
        self.archs = cfg.negative_shadow_archs()
        self.models: list[nn.Module] = [create_model(a, num_classes).to(device) for a in self.archs]
        self._copies: list[nn.Module] | None = None  # the fine-tuned copies, with cfg.negative_once
        self.cache = cache if cfg.negative_once else None  # only a once-extracted shadow is worth a file
        self.cached: list[bool] = []  # per model, after iteration 0's extract: loaded from the cache

    def names(self) -> list[str]:
        """History / checkpoint names: 'negative0_cnn', 'negative1_resnet20', ..."""
        return [f"negative{i}_{a}" for i, a in enumerate(self.archs)]

    def extract(self, victim_head: nn.Module, shadow_images: torch.Tensor, shadow_feats: torch.Tensor, iteration: int,
                progress: bool = False) -> None:
        """One more round of extraction from the unprotected victim (warm start), as the shadow gets; with
        cfg.negative_once, the whole extraction (cfg.negative_once epochs) at iteration 0 and nothing after."""
        once = self.cfg.negative_once
        if once and iteration > 0:
            return
        self.cached = []
        for i, (m, arch) in enumerate(zip(self.models, self.archs)):
            key = self.cache.key(self.cfg, arch, i) if self.cache is not None else None
            if key is not None and self.cache.load(m, key, arch):
                self.cached.append(True)
                continue
            # the global random state is left alone, so a run that loads this model from the cache is the same run
            with torch.random.fork_rng(devices=None if torch.cuda.is_available() else []):
                simulate_extraction(m, victim_head, shadow_images, shadow_feats, self.cfg, iteration,
                                    stream_name="negative", index=i, progress=progress, epochs=once or None)
            self.cached.append(False)
            if key is not None:
                self.cache.save(m, key, arch)

    def finetuned(self, images: torch.Tensor | None, labels: torch.Tensor | None, iteration: int,
                  progress: bool = False) -> list[nn.Module]:
        """Each negative shadow's copy fine-tuned on the thief's labelled set ([] when that is off). With
        cfg.negative_once the copies are made once (from iteration 0's stream, so a resumed run makes the same
        ones) and returned again at every later call."""
        if not self.cfg.negative_finetune_epochs:
            return []
        if self.cfg.negative_once:
            if self._copies is None:
                self._copies = self._finetune(images, labels, 0, progress)
            return self._copies
        return self._finetune(images, labels, iteration, progress)

    def _finetune(self, images, labels, iteration: int, progress: bool) -> list[nn.Module]:
        return [finetuned_copy(m, images, labels, epochs=self.cfg.negative_finetune_epochs,
                               lr=self.cfg.negative_finetune_lr, seed=stream(self.cfg, "negative-ft", iteration, i),
                               progress=progress, desc=f"negative fine-tune {iteration + 1}")
                for i, m in enumerate(self.models)]

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in zip(self.names(), self.models)}

    def load_state_dict(self, state: dict) -> None:
        for name, m in zip(self.names(), self.models):
            m.load_state_dict(state[name])
        self._copies = None
