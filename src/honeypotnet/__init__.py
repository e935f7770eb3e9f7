"""HoneypotNet: protect an image classifier against model extraction with a honeypot layer.

    from honeypotnet import ProtectConfig, protect, calibrate_null, verify, save_bundle, load_bundle

The modules: config (ProtectConfig, presets), protect (the loop), steps (its three steps), trigger, head,
negatives, state (checkpoints), ops (shared helpers), verify (the ownership test and its null), bundle,
export, attacks / active / art_interop (thieves), countermeasures and purify (what thieves do about a
backdoor), defences (peer defences), oracles, serve, data, models, training, cli, and names (choices that the CLI's
parser shares with the library, free of torch).
"""
from __future__ import annotations

import sys
import types

__version__ = "0.1.0"

# The names below are imported on first use (PEP 562), so `import honeypotnet` and `honeypotnet --help` do not
# pay for torch, torchvision and scipy; `from honeypotnet import protect` imports what it names, as before.
_EXPORTS = {
    "load_bundle": "bundle", "load_model": "bundle", "save_bundle": "bundle", "save_model": "bundle",
    "ProtectConfig": "config", "HoneypotLayer": "head", "ProtectEvent": "protect", "ProtectResult": "protect",
    "protect": "protect", "Trigger": "trigger", "VerificationResult": "verify", "calibrate_null": "verify",
    "calibrate_tau0": "verify", "verify": "verify",
}

__all__ = ["__version__", "ProtectConfig", "protect", "ProtectResult", "ProtectEvent", "calibrate_null",
           "calibrate_tau0", "verify", "VerificationResult", "save_bundle", "load_bundle", "save_model", "load_model",
           "Trigger", "HoneypotLayer"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'honeypotnet' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing the submodules `honeypotnet.protect` and `honeypotnet.verify` sets the package's attributes of
    those names to the modules; the package's `protect` and `verify` are the functions (as when they were
    imported eagerly), so those assignments are dropped and the names stay with __getattr__."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
