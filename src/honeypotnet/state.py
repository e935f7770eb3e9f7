"""Checkpoint and resume of a protect run: one file, written atomically after every outer iteration.

The file records the run's key (the config's hash without loop.outer_iters, the config version, and a
fingerprint of the victim's weights and the images), so it is only ever resumed by the very run that
wrote it, and can be extended to more outer iterations. A truncated or corrupted file is refused with a
clear message, never half-loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .config import CONFIG_VERSION, ProtectConfig
from .ops import atomic_torch_save

STATE_FILE = "protect_state.pt"


def fingerprint(victim: nn.Module, *tensors: torch.Tensor | None) -> str:
    """SHA-256 (16 hex) of the victim's weights and the tensors (images, or the hash of images read batch by
    batch), dtypes and shapes included: what a protect run's data is, for its checkpoint and its cached negatives."""
    h = hashlib.sha256()
    for t in [*victim.state_dict().values(), *(t for t in tensors if t is not None)]:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def run_key(cfg: ProtectConfig, victim: nn.Module, *tensors: torch.Tensor | None) -> str:
    """What a checkpoint must match to be resumed: config hash and version, victim weights, images."""
    return key_of(cfg, fingerprint(victim, *tensors))


def key_of(cfg: ProtectConfig, data: str) -> str:
    """run_key from the data's fingerprint (state.fingerprint)."""
    return f"v{CONFIG_VERSION}:{cfg.hash()}:{data}"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (another run's, or damaged)."""


def load_state(checkpoint_dir: str | os.PathLike | None, key: str, device) -> dict | None:
    """The saved state of run `key` in checkpoint_dir (None when there is none)."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or "iteration" not in state:
            raise ValueError("not a protect checkpoint")
        state["history"] = json.loads(state["history"])
    except Exception as e:  # truncated, corrupted, or not ours: say so, never half-load
        raise CheckpointError(f"{path} is damaged or not a protect checkpoint ({type(e).__name__}: {e}); "
                              "delete it (or use another work dir) to start over") from None
    if state.get("run_key") != key:
        raise CheckpointError(f"{path} was written for a different configuration, victim or data; "
                              "use another work dir or delete it")
    return state


def save_state(checkpoint_dir: str | os.PathLike | None, key: str, iteration: int, history: list[dict],
               modules: dict[str, dict]) -> None:
    """Write the state after `iteration` finished iterations (atomically; nothing when checkpoint_dir is None).
    modules: name -> state_dict (honeypot, optimiser, trigger, shadow, negative shadows)."""
    if checkpoint_dir is None:
        return
    atomic_torch_save({"run_key": key, "iteration": int(iteration), "history": json.dumps(history), **modules},
                      Path(checkpoint_dir) / STATE_FILE)
