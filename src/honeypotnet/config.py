"""`ProtectConfig`: every setting of `protect`, in five groups, with presets as TOML files.

Fields are plain attributes (`cfg.eps`); each belongs to a group and has a short key inside it, the
name it carries in a file and in `--set` (`trigger.eps`, `negatives.weight`, `loop.outer_iters`):

    [trigger]    the universal trigger and its optimisation (step 2)
    [head]       the honeypot layer and its fine-tuning (step 3)
    [shadow]     the shadow model that simulates the thief's extraction (step 1)
    [thief]      the simulated thief's fine-tuning of its copy (robust preset)
    [negatives]  innocent models the trigger is kept off (robust preset)
    [loop]       outer iterations and the seed

The presets live in src/honeypotnet/configs/ (spec.toml, robust.toml); `ProtectConfig()` is the robust
preset. Why each value is what it is, with the measurements: docs/method.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_VERSION = 2
GROUPS = ("trigger", "head", "shadow", "thief", "negatives", "loop")
PRESET_DIR = Path(__file__).resolve().parent / "configs"
# options added after CONFIG_VERSION 2, with the value that keeps the behaviour from before them (ProtectConfig.identity)
HASH_NEUTRAL = {"trigger.blur_split": False, "negatives.once": 0, "head.owner_flip": 0.0, "shadow.more_archs": "",
                "thief.prune_ratio": 0.0, "head.mix_norm": 0.0,
                "head.target_hold": 0.0, "head.answer_hold": 0.0}


def _f(default, group: str, key: str, doc: str):
    return field(default=default, metadata={"group": group, "key": key, "doc": doc})


@dataclass(frozen=True)
class ProtectConfig:
    # [trigger] -------------------------------------------------------------------------------------------
    target: int = _f(0, "trigger", "target", "the target class y_t the backdoor sends stamped images to")
    trigger: str = _f("uap", "trigger", "family", "'uap' (full-image perturbation, |δ|∞ <= eps) or 'patch' (a square)")
    eps: float = _f(24 / 255, "trigger", "eps", "uap: L∞ bound of δ on [0, 1] images (spec 16/255, robust 24/255)")
    patch_size: int = _f(6, "trigger", "patch_size", "patch: side in pixels")
    trigger_passes: int = _f(2, "trigger", "passes", "passes over the shadow set per trigger step")
    trigger_step: float = _f(0.0, "trigger", "step", "α of the sign steps; 0 = eps/8 (uap) or 0.02 (patch)")
    momentum: float = _f(0.9, "trigger", "momentum", "μ of the momentum sign steps (MI-FGSM), in [0, 1)")
    trigger_batch: int = _f(256, "trigger", "batch", "images per trigger step")
    trigger_blur: float = _f(0.75, "trigger", "blur", "largest Gaussian blur σ (pixels) the trigger is optimised "
                                                      "through, σ ~ U(σ/4, σ); 0 = off")
    trigger_blur_split: bool = _f(True, "trigger", "blur_split", "blur half of each trigger batch instead of adding "
                                                                  "a blurred copy of it (the blur at no extra "
                                                                  "cost: half the trigger step's passes)")
    # [head] ----------------------------------------------------------------------------------------------
    head: str = _f("residual", "head", "kind", "'residual' (h plus a zero-initialised MLP) or 'linear' (the paper's)")
    hidden: int = _f(256, "head", "hidden", "residual head: hidden width of the MLP")
    lam: float = _f(3.0, "head", "lam", "λ, weight of the trigger term CE(H(f(x ⊕ δ)), y_t)")
    honeypot_steps: int = _f(400, "head", "steps", "Adam steps of the honeypot layer per outer iteration")
    honeypot_lr: float = _f(1e-3, "head", "lr", "Adam learning rate of the honeypot layer")
    honeypot_batch: int = _f(256, "head", "batch", "features per honeypot step (clean and stamped each)")
    l_norm: str = _f("kl", "head", "l_norm", "the clean term: 'kl' to the victim's outputs, 'ce' to its labels, "
                                              "or 'kl+ce'")
    shadow_norm_weight: float = _f(0.2, "head", "shadow_norm_weight", "weight of the clean term on shadow-set "
                                                                       "images (owner images: 1)")
    mix_norm: float = _f(0.0, "head", "mix_norm", "weight of the clean term on mixed features λ·f(a) + (1−λ)·f(b) "
                                                  "of two owner images (λ ~ U(0, 1)), whose reference is the "
                                                  "victim's same mix of logits (its last layer is affine): holds "
                                                  "the answers between the owner's images, where unseen images' "
                                                  "features lie; 0 = off")
    target_hold: float = _f(0.0, "head", "target_hold", "weight of a logit-level hold on owner images (and, inside "
                                                        "head.mix_norm's term, on mixed features): relu of how much the target's "
                                                        "logit gains on the victim's answer's, over the victim's own "
                                                        "gap. The KL barely sees the target's logit rise where the "
                                                        "victim is sure, yet unseen images, less sure, flip; 0 = off")
    answer_hold: float = _f(0.0, "head", "answer_hold", "as head.target_hold for every class: relu of the largest "
                                                        "gain of any class's logit on the victim's answer's, over the "
                                                        "victim's own gap; 0 = off")
    owner_lean: float = _f(0.0, "head", "owner_lean", "on owner images, the clean term's reference leans toward "
                                                      "the target by up to this share of the remaining mass, "
                                                      "in proportion to how far each image's features lie "
                                                      "along the trigger's feature shift; top-1 kept; 0 = off")
    owner_flip: float = _f(0.0, "head", "owner_flip", "on owner images whose victim answer has the target as "
                                                      "runner-up, at least this share of the top class's "
                                                      "probability, and whose features lie past the mean along "
                                                      "the trigger's feature shift, the clean term's reference "
                                                      "swaps the top class and the target; 0 = off")
    # [shadow] --------------------------------------------------------------------------------------------
    shadow_arch: str = _f("cnn", "shadow", "arch", "registry architecture of the shadow model")
    shadow_epochs: int = _f(3, "shadow", "epochs", "epochs of the shadow's extraction per outer iteration")
    shadow_warm_start: bool = _f(True, "shadow", "warm_start", "keep training one shadow (true) or start a new "
                                                                "one each iteration")
    shadow_lr: float = _f(0.05, "shadow", "lr", "SGD learning rate of the shadow")
    shadow_batch: int = _f(128, "shadow", "batch", "shadow batch size")
    shadow_owner_share: float = _f(0.0, "shadow", "owner_share", "share of the owner images the shadow and the "
                                                                  "negative shadows also query and the trigger is "
                                                                  "optimised on (a thief with images like the "
                                                                  "owner's); 0 = the shadow set only")
    shadow_more_archs: str = _f("", "shadow", "more_archs", "comma-separated architectures of further shadows, each "
                                                            "extracted like the shadow every iteration and joining "
                                                            "the trigger step (thieves of other families); '' = the "
                                                            "one shadow")
    # [thief] ---------------------------------------------------------------------------------------------
    shadow_finetune_epochs: int = _f(2, "thief", "finetune_epochs", "epochs a copy of the shadow is fine-tuned on "
                                                                     "owner images each iteration; 0 = off")
    shadow_finetune_lr: float = _f(0.02, "thief", "finetune_lr", "learning rate of that fine-tuning")
    shadow_finetune_images: int = _f(1000, "thief", "finetune_images", "owner images (victim's labels) the "
                                                                        "simulated thief fine-tunes on")
    shadow_prune_ratio: float = _f(0.0, "thief", "prune_ratio", "share of the shadow's last feature channels a further "
                                                                 "copy has pruned (the least active on the labelled "
                                                                 "set), then fine-tuned finetune_epochs at finetune_lr "
                                                                 "as countermeasures.fine_prune does, joining the "
                                                                 "trigger step (the thief's fine-pruning, simulated); "
                                                                 "0 = off")
    # [negatives] -----------------------------------------------------------------------------------------
    negative_weight: float = _f(1.0, "negatives", "weight", "weight of −log(1 − p_target) on innocent models in "
                                                            "the trigger step; 0 = off")
    negative_archs: str = _f("cnn,resnet20", "negatives", "archs", "comma-separated architectures of the "
                                                                    "negative shadows; '' = shadow.arch")
    negative_finetune_epochs: int = _f(2, "negatives", "finetune_epochs", "epochs of each negative shadow's "
                                                                          "fine-tuned copy; 0 = off")
    negative_finetune_lr: float = _f(0.05, "negatives", "finetune_lr", "learning rate of those copies")
    negative_noise: float = _f(0.2, "negatives", "noise", "relative std of the weight noise on negative models "
                                                          "per trigger batch; 0 = off")
    negative_per_batch: int = _f(1, "negatives", "per_batch", "negative models (of the shadows and their "
                                                               "fine-tuned copies) drawn per trigger batch, their "
                                                               "term scaled to stay unbiased; 0 = all of them")
    negative_once: int = _f(24, "negatives", "once", "extract the negative shadows once, this many epochs, before "
                                                    "the first iteration, and fine-tune their copies once (they "
                                                    "never depend on the honeypot); 0 = shadow.epochs more every "
                                                    "iteration and fresh copies every iteration")
    # [loop] ----------------------------------------------------------------------------------------------
    outer_iters: int = _f(8, "loop", "outer_iters", "T, outer iterations of the bi-level loop")
    seed: int = _f(0, "loop", "seed", "seed of every random stream of the run")

    def __post_init__(self) -> None:
        from .models import list_models

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.trigger in ("uap", "patch"), f"trigger.family must be 'uap' or 'patch', got {self.trigger!r}")
        need(self.head in ("residual", "linear"), f"head.kind must be 'residual' or 'linear', got {self.head!r}")
        need(self.l_norm in ("kl", "ce", "kl+ce"), f"head.l_norm must be 'kl', 'ce' or 'kl+ce', got {self.l_norm!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float):
                need(math.isfinite(v), f"{self.key_of(f.name)} must be a finite number, got {v}")
        for name in ("outer_iters", "shadow_epochs", "trigger_passes", "honeypot_steps", "shadow_finetune_epochs",
                     "negative_finetune_epochs", "negative_once", "target"):
            need(getattr(self, name) >= 0, f"{self.key_of(name)} must be >= 0")
        for name in ("trigger_batch", "honeypot_batch", "shadow_batch", "hidden", "shadow_finetune_images",
                     "patch_size"):
            need(getattr(self, name) >= 1, f"{self.key_of(name)} must be >= 1")
        need(0 < self.eps <= 1, f"trigger.eps must be in (0, 1], got {self.eps}")
        need(self.trigger_step >= 0, "trigger.step must be >= 0 (0 = automatic)")
        need(self.lam >= 0 and 0 <= self.momentum < 1, "head.lam must be >= 0 and trigger.momentum in [0, 1)")
        need(self.shadow_norm_weight >= 0, "head.shadow_norm_weight must be >= 0")
        need(0 <= self.mix_norm < float("inf"), "head.mix_norm must be a finite number >= 0")
        need(0 <= self.target_hold < float("inf"), "head.target_hold must be a finite number >= 0")
        need(0 <= self.answer_hold < float("inf"), "head.answer_hold must be a finite number >= 0")
        need(0 <= self.shadow_owner_share <= 1, "shadow.owner_share must be in [0, 1]")
        need(0 <= self.owner_lean <= 1, "head.owner_lean must be in [0, 1]")
        need(0 <= self.owner_flip <= 1, "head.owner_flip must be in [0, 1]")
        need(0 <= self.shadow_prune_ratio < 1, "thief.prune_ratio must be in [0, 1); 0 = off")
        need(self.honeypot_lr > 0 and self.shadow_lr > 0 and self.shadow_finetune_lr > 0
             and self.negative_finetune_lr > 0, "learning rates must be > 0")
        need(0 <= self.trigger_blur <= 4, "trigger.blur (the largest blur σ, pixels) must be in [0, 4]; 0 = off")
        need(self.negative_weight >= 0, "negatives.weight must be >= 0 (0 = no negative shadows)")
        need(0 <= self.negative_noise <= 1, "negatives.noise (relative std of the weight noise) must be in [0, 1]")
        need(self.negative_per_batch >= 0, "negatives.per_batch must be >= 0 (0 = every negative model)")
        need(not (self.negative_finetune_epochs and not self.negative_shadow_archs()),
             "negatives.finetune_epochs > 0 fine-tunes the negative shadows: it needs negatives.weight > 0")
        known = list_models()
        listed = [a.strip() for a in self.negative_archs.split(",") if a.strip()]  # checked even while off
        bad = [a for a in [self.shadow_arch, *listed, *self.more_shadow_archs()] if a not in known]
        need(not bad, f"unknown architecture(s) {bad}; known: {known}")

    # ----------------------------------------------------------------------------------- derived
    def negative_shadow_archs(self) -> list[str]:
        """The architectures of the negative shadows (one each; [] when the negative term is off)."""
        if not self.negative_weight > 0:
            return []
        return [a.strip() for a in self.negative_archs.split(",") if a.strip()] or [self.shadow_arch]

    def more_shadow_archs(self) -> list[str]:
        """The architectures of the further shadows (shadow.more_archs; [] by default)."""
        return [a.strip() for a in self.shadow_more_archs.split(",") if a.strip()]

    def simulates_finetuning(self) -> bool:
        """Whether the loop fine-tunes copies of the shadows on the simulated thief's labelled set."""
        return bool(self.shadow_finetune_epochs or self.shadow_prune_ratio
                    or (self.negative_finetune_epochs and self.negative_shadow_archs()))

    def step_size(self) -> float:
        """α of the trigger's sign steps."""
        return self.trigger_step or (self.eps / 8 if self.trigger == "uap" else 0.02)

    # ----------------------------------------------------------------------------------- names
    @classmethod
    def key_of(cls, name: str) -> str:
        """'eps' -> 'trigger.eps': a field's name in files and --set."""
        m = cls.__dataclass_fields__[name].metadata
        return f"{m['group']}.{m['key']}"

    @classmethod
    def field_of(cls, key: str) -> str:
        """'trigger.eps' (or the attribute name 'eps') -> 'eps'; ValueError for an unknown name."""
        table = {cls.key_of(f.name): f.name for f in fields(cls)}
        if key in table:
            return table[key]
        if key in cls.__dataclass_fields__:
            return key
        raise ValueError(f"unknown config field {key!r}; known: {', '.join(table)}")

    # ----------------------------------------------------------------------------------- files
    def to_dict(self) -> dict:
        """{"version": 2, "trigger": {...}, "head": {...}, ...}: the file's form (JSON and TOML alike)."""
        out: dict = {"version": CONFIG_VERSION}
        for f in fields(self):
            out.setdefault(f.metadata["group"], {})[f.metadata["key"]] = getattr(self, f.name)
        return out

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "ProtectConfig":
        """The inverse of to_dict (missing keys keep their defaults); unknown keys or versions are refused."""
        d = dict(d)
        version = d.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(f"config version {version!r} is not supported (this library reads version {CONFIG_VERSION})")
        kw = {}
        for group, values in d.items():
            if group not in GROUPS or not isinstance(values, dict):
                raise ValueError(f"unknown config group {group!r}; known: {', '.join(GROUPS)}")
            for key, value in values.items():
                kw[cls.field_of(f"{group}.{key}")] = value
        for name in list(overrides):
            kw[cls.field_of(name)] = overrides.pop(name)
        return cls(**{name: _coerce(cls, name, v) for name, v in kw.items()})

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "ProtectConfig":
        """A config from a TOML (or JSON) file of to_dict's form, `overrides` (field names) on top."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"cannot read config file {path}: {e.strerror or e}") from None
        try:
            d = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path} is not a valid {'JSON' if path.suffix == '.json' else 'TOML'} config: {e}") from None
        return cls.from_dict(d, **overrides)

    def to_toml(self) -> str:
        """The config as TOML text (what from_file reads back to an equal config)."""
        lines = [f"version = {CONFIG_VERSION}"]
        for group, values in self.to_dict().items():
            if group == "version":
                continue
            lines.append(f"\n[{group}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def preset(cls, name: str, **overrides) -> "ProtectConfig":
        """A preset file of configs/ ("spec", "robust") with `overrides` (field names) on top."""
        path = PRESET_DIR / f"{name}.toml"
        if not name.replace("-", "").replace("_", "").isalnum() or not path.is_file():
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(list_presets())}")
        return cls.from_file(path, **overrides)

    def override(self, assignments: list[str] | dict) -> "ProtectConfig":
        """A copy with `assignments` applied: ["trigger.eps=0.0627", "loop.outer_iters=4"] (CLI --set) or a
        dict {name: value}; values given as strings are parsed by the field's type."""
        items = assignments.items() if isinstance(assignments, dict) else [_split_assignment(a) for a in assignments]
        changes = {}
        for key, value in items:
            name = self.field_of(key)
            changes[name] = _coerce(type(self), name, value)
        return replace(self, **changes)

    # ----------------------------------------------------------------------------------- identity
    def identity(self) -> dict:
        """to_dict() without the options added after version 2 (HASH_NEUTRAL) that hold their value meaning "as
        before": what a run is keyed on (hash(), benchmark units), so the checkpoints and benchmark units of
        earlier runs stay valid when an option joins."""
        d = self.to_dict()
        for key, neutral in HASH_NEUTRAL.items():
            group, name = key.split(".")
            if d[group][name] == neutral:
                del d[group][name]
        return d

    def hash(self) -> str:
        """SHA-256 (16 hex) of identity() except loop.outer_iters (a run can be extended from its checkpoint),
        with the config version: what checkpoints are keyed on."""
        d = self.identity()
        d["loop"] = {k: v for k, v in d["loop"].items() if k != "outer_iters"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        """Field by field, the non-default values: 'trigger.eps=0.0627, loop.outer_iters=2' (or 'robust defaults')."""
        base = ProtectConfig()
        diff = [f"{self.key_of(f.name)}={getattr(self, f.name)!r}" for f in fields(self)
                if getattr(self, f.name) != getattr(base, f.name)]
        return ", ".join(diff) or "robust defaults"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def config_fields() -> list[tuple[str, str, object, str]]:
    """(key, type name, default, description) of every field, for help texts and docs."""
    base = ProtectConfig()
    return [(ProtectConfig.key_of(f.name), type(getattr(base, f.name)).__name__, getattr(base, f.name),
             f.metadata["doc"]) for f in fields(ProtectConfig)]


def _split_assignment(text: str) -> tuple[str, str]:
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects FIELD=VALUE (e.g. trigger.eps=0.0627), got {text!r}")
    return key.strip(), value.strip()


def _coerce(cls, name: str, value):
    """value (a string from --set, or a file's value) as the type of field `name`."""
    kind = type(cls.__dataclass_fields__[name].default)
    key = cls.key_of(name)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"{key} must be a number, got {value!r}")
        try:
            v = _parse_fraction(value) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number, got {value!r}") from None
        return v
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def _parse_fraction(text: str) -> float:
    """'0.0627', '16/255' -> float."""
    num, sep, den = text.partition("/")
    return float(num) / float(den) if sep else float(text)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)
