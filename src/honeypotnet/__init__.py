"""HoneypotNet: protect an image classifier against model extraction with a honeypot layer.

    from honeypotnet import ProtectConfig, protect, calibrate_null, verify, save_bundle, load_bundle

The modules: config (ProtectConfig, presets), protect (the loop), steps (its three steps), trigger, head,
negatives, state (checkpoints), ops (shared helpers), verify (the ownership test and its null), bundle,
export, attacks / active / art_interop (thieves), countermeasures and purify (what thieves do about a
backdoor), defences (peer defences), oracles, serve, data, models, training, cli.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .bundle import load_bundle, load_model, save_bundle, save_model  # noqa: E402
from .config import ProtectConfig  # noqa: E402
from .head import HoneypotLayer  # noqa: E402
from .protect import ProtectEvent, ProtectResult, protect  # noqa: E402
from .trigger import Trigger  # noqa: E402
from .verify import VerificationResult, calibrate_null, calibrate_tau0, verify  # noqa: E402

__all__ = ["__version__", "ProtectConfig", "protect", "ProtectResult", "ProtectEvent", "calibrate_null",
           "calibrate_tau0", "verify", "VerificationResult", "save_bundle", "load_bundle", "save_model", "load_model",
           "Trigger", "HoneypotLayer"]
