"""`honeypotnet protect`: build the protected bundle of a victim (protect loop + verification null)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .common import (log, DATASETS, dataset_args, device_arg, load_data, load_victim, normalize_arg,
                     resolve_device)

NULL_KEYS = ("epochs", "finetune", "purify", "purify_max_drop")
NEGATIVES_CACHE_ENV = "HONEYPOTNET_NEGATIVES_CACHE"  # where negatives.once's models are cached; empty: nowhere


def add(sub) -> None:
    from ..config import list_presets

    s = sub.add_parser(
        "protect", help="build the honeypot bundle of a victim", epilog=DATASETS + " Config fields: docs/cli.md, "
        "src/honeypotnet/configs/*.toml.",
        description="Replace the victim's last layer by a honeypot layer (the bi-level loop) and calibrate the "
                    "verification null on clean reference models. Every setting of the loop is a config field: "
                    "--preset or --config FILE, then --set FIELD=VALUE (e.g. --set trigger.eps=16/255 --set "
                    "loop.outer_iters=4). The null's settings are --set null.epochs=N, null.finetune=N (widen it "
                    "with references fine-tuned on N owner images), null.purify=all|NAMES, null.purify_max_drop=PT. "
                    "The innocent models that negatives.once extracts are cached (the 64 most recently used) in "
                    "$HONEYPOTNET_CACHE/negatives, ~/.cache/honeypotnet/negatives by default, so a later protection of "
                    f"the same victim on the same images skips their training: ${NEGATIVES_CACHE_ENV}=DIR caches "
                    f"them elsewhere, ${NEGATIVES_CACHE_ENV}= (empty) nowhere.")
    s.add_argument("victim", help="model file from `train`, or a foreign checkpoint with --arch")
    s.add_argument("--arch", default=None, help="architecture of a state-dict victim: a registry name (resnet20 "
                                                "for a CIFAR .th), torchvision:NAME or timm:NAME")
    s.add_argument("--head", default=None, metavar="PATH",
                   help="path of the victim's last Linear when it is not found (e.g. classifier.3)")
    normalize_arg(s)
    dataset_args(s, "shadow", None, "train", "shadow-set (natural unlabeled images)", short=True)
    dataset_args(s, "owner", None, "train", "owner's own (labelled, for the null)", short=True)
    s.add_argument("--image-size", type=int, default=None,
                   help="resize every image to this side (file datasets larger than $HONEYPOTNET_STREAM_BYTES, "
                        "default 4G, are streamed: decoded batch by batch)")
    s.add_argument("--target", type=int, default=None, help="target class y_t (default the config's, 0)")
    s.add_argument("--preset", choices=list_presets(), default="robust",
                   help="'robust' (default: keeps the backdoor through a thief's fine-tuning, pruning and "
                        "purification) or 'spec' (the paper's settings, 2-3x faster to protect)")
    s.add_argument("--config", default=None, metavar="FILE", help="a config file (TOML/JSON) instead of --preset")
    s.add_argument("--set", dest="assign", action="append", default=[], metavar="FIELD=VALUE",
                   help="change one config field, e.g. trigger.eps=16/255 (repeatable)")
    s.add_argument("--references", default="cnn,cnn_small",
                   help="architectures of the clean reference models that calibrate tau0 ('' to skip)")
    s.add_argument("--seed", type=int, default=None, help="seed of the run (default the config's, 0)")
    device_arg(s)
    s.add_argument("--output", required=True, help="bundle directory to write")
    s.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    s.add_argument("--force", action="store_true",
                   help="write the bundle even if it fails the gate (fidelity >= 90%%, the protected model's own "
                        "ASR >= 50%%, tau0 below its cap)")
    s.add_argument("--work-dir", default=None, help="checkpoint dir for resuming (default OUTPUT.work)")
    s.set_defaults(func=run)


def protect_config(args):
    """(ProtectConfig, null settings dict) of --preset/--config, --set, --target and --seed."""
    import sys

    from ..config import ProtectConfig
    from ..verify import PURIFY_MAX_DROP

    null = {"epochs": 10, "finetune": 0, "purify": "", "purify_max_drop": PURIFY_MAX_DROP * 100}
    if args.config:
        path = Path(args.config)
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"cannot read config file {path}: {e.strerror or e}") from None
        if path.suffix == ".json":
            d = json.loads(text)
        else:
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            try:
                d = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path} is not a valid TOML config: {e}") from None
        for key, value in dict(d.pop("null", {})).items():
            _set_null(null, key, value)
        cfg = ProtectConfig.from_dict(d)
    else:
        cfg = ProtectConfig.preset(args.preset)
    rest = []
    for a in args.assign:
        key, sep, value = a.partition("=")
        if sep and key.strip().startswith("null."):
            _set_null(null, key.strip()[5:], value.strip())
        else:
            rest.append(a)
    cfg = cfg.override(rest)
    given = {k: v for k, v in (("target", args.target), ("seed", args.seed)) if v is not None}
    return cfg.override(given), null


def _set_null(null: dict, key: str, value) -> None:
    if key not in NULL_KEYS:
        raise ValueError(f"unknown null setting {key!r}; known: {', '.join('null.' + k for k in NULL_KEYS)}")
    if key == "purify":
        null[key] = ",".join(value) if isinstance(value, list) else str(value)
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"null.{key} must be a number, got {value!r}") from None
    if key in ("epochs", "finetune"):
        if v < 0 or not v.is_integer():
            raise ValueError(f"null.{key} must be a non-negative integer, got {value!r}")
        v = int(v)
    elif not 0 <= v <= 100:
        raise ValueError(f"null.purify_max_drop must be in [0, 100] points, got {value!r}")
    null[key] = v


def purify_settings(value: str):
    """null.purify: '' (off), 'all', or comma-separated names of verify.PURIFY_SETTINGS."""
    from ..verify import PURIFY_SETTINGS

    if not value:
        return []
    table = dict(PURIFY_SETTINGS)
    names = list(table) if value == "all" else [n.strip() for n in value.split(",")]
    bad = [n for n in names if n not in table]
    if bad:
        raise ValueError(f"null.purify: unknown purification {', '.join(bad)}; choose 'all' or from {', '.join(table)}")
    return [(n, table[n]) for n in dict.fromkeys(names)]


def example_index(data, target: int) -> int:
    """Which image trigger.png shows clean and stamped: the first one outside the target class."""
    if data.labels is not None:
        others = (data.labels != target).nonzero().flatten()
        if len(others):
            return int(others[0])
    return 0


def run(args) -> int:
    from ..bundle import save_bundle
    from ..data.files import default_cache_dir
    from ..protect import protect
    from ..training import FitConfig
    from ..verify import FINETUNE_SETTINGS, TAU0_CAP, calibrate_null

    # the configuration first: a bad option is reported before any file is read
    cfg, null = protect_config(args)
    purifications = purify_settings(null["purify"])
    device = resolve_device(args.device)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} already exists (pass --overwrite to replace it)")
    victim, info = load_victim(args.victim, args.arch, args.normalize)
    # a file dataset larger than $HONEYPOTNET_STREAM_BYTES (default 4G; 0: always) is decoded batch by batch
    shadow = load_data(args, "shadow", size=args.image_size, stream=True)
    owner = load_data(args, "owner", size=args.image_size, stream=True)
    k = info["num_classes"]
    classes = info.get("classes") or owner.classes or [str(i) for i in range(k)]
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")
    t0 = time.time()
    # negatives.once's innocent models are cached (by default beside the decoded images), so a later protection
    # of this victim on these images (another trigger, target or loop setting) does not train them again
    cache = os.environ.get(NEGATIVES_CACHE_ENV)
    cache = default_cache_dir() / "negatives" if cache is None else cache or None
    res = protect(victim, shadow.images, owner.images, cfg, checkpoint_dir=work, progress=not args.quiet, device=device,
                  head=args.head, cache_dir=cache)
    t_protect = time.time() - t0
    verification = None
    if args.references:
        if owner.labels is None:
            raise ValueError("calibrating tau0 needs labelled owner images")
        cal = calibrate_null(victim.to(device), res.trigger.to(device), shadow.images, owner.images, owner.labels,
                             cfg.target, archs=args.references.split(","), num_classes=k,
                             fit_config=FitConfig(epochs=null["epochs"]), finetune_images=null["finetune"],
                             purify=purifications, purify_max_drop=null["purify_max_drop"] / 100, seed=cfg.seed,
                             progress=not args.quiet)
        res.trigger.cpu()
        victim.cpu()
        verification = {"tau0": cal.tau0, "rule": cal.rule, "reference": cal.reference,
                        "reference_queries": f"{len(shadow)} images of {shadow.name}, soft labels of the unprotected victim"}
        if null["finetune"]:
            n = min(null["finetune"], len(owner))
            verification["reference_finetune"] = {"images": n, "settings": [list(x) for x in FINETUNE_SETTINGS],
                                                  "data": f"the first {n} labelled owner images ({owner.name})"}
        if purifications:
            verification["reference_purify"] = {"settings": [[name, spec] for name, spec in purifications],
                                                "max_drop": null["purify_max_drop"] / 100}
        log.info(f"tau0 = {100 * cal.tau0:.2f}% from " + ", ".join(f"{r['arch']} {100 * r['asr']:.2f}%" for r in cal.reference))
    failures = res.gate()
    if verification is not None and verification["tau0"] >= TAU0_CAP:
        failures.append(f"tau0 is at its cap {TAU0_CAP:.0%}: innocent models answer this trigger too often for a "
                        "useful ownership test (another loop.seed, or the robust preset)")
    if failures:
        msg = "the protection fails its gate: " + "; ".join(failures)
        if not args.force:
            raise ValueError(msg + f". No bundle written (the work dir {work} keeps the run: raise loop.outer_iters "
                             "to continue it, or pass --force to write it anyway)")
        log.warning("WARNING: " + msg + " (written anyway: --force)")
    save_bundle(out, res.model, res.trigger, arch=info["arch"], target=cfg.target, classes=classes,
                config=cfg.to_dict() | {"preset": None if args.config else args.preset},
                verification=verification, history=res.history,
                extra={"protect_seconds": round(t_protect, 1), "shadow_set": shadow.name, "owner_set": owner.name},
                overwrite=args.overwrite, example=owner.images[example_index(owner, cfg.target)])
    from ..bundle import read_bundle_hash

    log.info(f"saved bundle {out} (protect loop {t_protect:.0f} s)")
    print(f"bundle hash {read_bundle_hash(out)}: keep it (or publish it) to show later that the bundle is unchanged")
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"trigger commitment {manifest['commitment']['hash']} ({manifest['commitment']['created']}): publish or "
          "timestamp it now; `verify --commitment` checks the trigger against it")
    return 0
