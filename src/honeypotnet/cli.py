"""`honeypotnet <verb>`: a thin layer over the library calls.

Every verb writes a JSON result beside what it saves. Errors in input print one clear line and
exit with status 2; nothing already saved is touched by a failed run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import __version__

EPILOG = "Datasets: shapes (embedded, no files), cifar10, cifar100, imagefolder, tinyimagenet."


def _dataset_args(p: argparse.ArgumentParser, prefix: str, default_name: str, default_split: str, help_: str) -> None:
    p.add_argument(f"--{prefix}", default=default_name, metavar="NAME", help=f"{help_} dataset name (default {default_name})")
    p.add_argument(f"--{prefix}-root", default=None, metavar="DIR", help="dataset root (not needed for 'shapes')")
    p.add_argument(f"--{prefix}-split", default=default_split, metavar="SPLIT", help=f"split (default {default_split})")
    p.add_argument(f"--{prefix}-limit", type=int, default=None, metavar="N", help="use at most N images (a fixed random subset)")


def _load(args, prefix: str, size: int | None = None):
    from .data import load_dataset

    ds = load_dataset(getattr(args, prefix), getattr(args, f"{prefix}_root"), getattr(args, f"{prefix}_split"), size=size)
    limit = getattr(args, f"{prefix}_limit")
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"--{prefix}-limit must be positive")
        if limit < len(ds):
            ds = ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(1234))[:limit])
    return ds


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _load_any_model(path: str):
    """A honeypotnet model file, a bundle directory, or (with --arch) a foreign checkpoint."""
    from .bundle import load_bundle, load_model

    p = Path(path)
    if p.is_dir():
        b = load_bundle(p)
        return b.model, {"arch": b.manifest["arch"], "num_classes": b.manifest["num_classes"], "classes": b.classes, "bundle": b}
    return load_model(p)


# ----------------------------------------------------------------------------- verbs


def cmd_train(args) -> int:
    from .bundle import save_model
    from .models import create_model
    from .training import FitConfig, accuracy, fit

    train = _load(args, "data")
    if train.labels is None:
        raise ValueError("training needs a labelled split")
    test = None
    if args.test_split:
        args.data_split, args.data_limit = args.test_split, None
        test = _load(args, "data")
    torch.manual_seed(args.seed)
    model = create_model(args.arch, train.num_classes, **({"pretrained": args.pretrained} if args.pretrained else {}))
    out = Path(args.output)
    t0 = time.time()
    cfg = FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    ckpt = out.with_name(out.name + ".ckpt")
    history = fit(model, train.images, train.labels, cfg, checkpoint=ckpt, progress=True, desc=f"train {args.arch}") if args.epochs > 0 else []
    result = {"arch": args.arch, "dataset": train.name, "epochs": args.epochs, "seconds": round(time.time() - t0, 1), "loss": history}
    if test is not None:
        result["test_accuracy"] = accuracy(model, test.images, test.labels)
        print(f"test accuracy: {100 * result['test_accuracy']:.2f}%")
    save_model(model, out, args.arch, train.num_classes, train.classes, dataset=train.name)
    ckpt.unlink(missing_ok=True)
    _write_json(out.with_suffix(".json"), result)
    print(f"saved {out}")
    return 0


def _purify_settings(value: str | None, known) -> list:
    """--reference-purify: None (off), 'all', or comma-separated names of verify.PURIFY_SETTINGS."""
    if not value:
        return []
    table = dict(known)
    names = list(table) if value == "all" else [n.strip() for n in value.split(",")]
    bad = [n for n in names if n not in table]
    if bad:
        raise ValueError(f"--reference-purify: unknown purification {', '.join(bad) or repr(value)}; "
                         f"choose 'all' or from {', '.join(table)}")
    return [(n, table[n]) for n in dict.fromkeys(names)]


def protect_config(args):
    """The ProtectConfig of `protect`'s options: --preset's values for the preset fields whose option was
    not given (their argparse defaults are None), each given option on top."""
    from .honeypot import ProtectConfig

    given = {"eps": None if args.eps is None else args.eps / 255, "trigger_blur": args.trigger_blur,
             "negative_weight": args.negative_weight, "shadow_finetune_epochs": args.shadow_finetune_epochs,
             "negative_archs": None if args.negative_archs is None else ",".join(args.negative_archs),
             "negative_finetune_epochs": args.negative_finetune_epochs, "negative_noise": args.negative_noise}
    preset = ProtectConfig.preset(args.preset)
    given = {k: getattr(preset, k) if v is None else v for k, v in given.items()}
    return ProtectConfig(target=args.target, trigger=args.trigger, eps=given["eps"], patch_size=args.patch_size,
                         head=args.head, hidden=args.hidden, lam=args.lam, outer_iters=args.iters,
                         shadow_arch=args.shadow_arch, shadow_epochs=args.shadow_epochs,
                         shadow_warm_start=not args.shadow_reinit, trigger_passes=args.trigger_passes,
                         honeypot_steps=args.honeypot_steps, shadow_norm_weight=args.shadow_norm_weight,
                         shadow_finetune_epochs=given["shadow_finetune_epochs"], shadow_finetune_lr=args.shadow_finetune_lr,
                         shadow_finetune_images=args.shadow_finetune_images,
                         trigger_resolution=args.trigger_resolution, trigger_blur=given["trigger_blur"],
                         negative_weight=given["negative_weight"],
                         negative_models=args.negative_models, negative_archs=given["negative_archs"],
                         negative_finetune_epochs=given["negative_finetune_epochs"],
                         negative_finetune_lr=args.negative_finetune_lr, negative_noise=given["negative_noise"],
                         shadow_prune=args.shadow_prune, audit_rounds=args.audit_rounds,
                         audit_iters=args.audit_iters, audit_threshold=args.audit_threshold / 100,
                         audit_epochs=args.audit_epochs, audit_archs=",".join(args.audit_archs),
                         audit_restarts=args.audit_restarts, seed=args.seed)


def cmd_protect(args) -> int:
    from .bundle import load_model, save_bundle
    from .honeypot import format_audit, protect
    from .models import create_model
    from .verify import (FINETUNE_SETTINGS, PURIFY_MAX_DROP, PURIFY_SETTINGS, calibrate_tau0, finetuned_references,
                         purified_references, train_reference_models)
    from .training import FitConfig

    # the configuration first: a bad option is reported before any file is read
    cfg = protect_config(args)
    purifications = _purify_settings(args.reference_purify, PURIFY_SETTINGS)
    max_drop = PURIFY_MAX_DROP if args.reference_purify_max_drop is None else args.reference_purify_max_drop / 100
    if not 0 <= max_drop <= 1:  # (NaN fails too)
        raise ValueError(f"--reference-purify-max-drop must be in [0, 100] points, got {args.reference_purify_max_drop}")
    if args.victim.endswith(".th") or args.arch:
        if not args.arch:
            raise ValueError("--arch is needed with a foreign checkpoint")
        victim, info = create_model(args.arch, args.num_classes, pretrained=args.victim), {"arch": args.arch, "classes": []}
    else:
        victim, info = load_model(args.victim)
    shadow = _load(args, "shadow", size=args.image_size)
    owner = _load(args, "owner", size=args.image_size)
    k = info.get("num_classes") or args.num_classes
    classes = info.get("classes") or owner.classes or [str(i) for i in range(k)]
    out = Path(args.output)
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")
    t0 = time.time()
    res = protect(victim, shadow.images, owner.images, cfg, checkpoint_dir=work, progress=True)
    t_protect = time.time() - t0
    if res.audits and not res.audits[-1]["passed"]:  # measured: the run whose audit failed flagged innocent models
        a = res.audits[-1]
        print(f"WARNING: audit failed: fresh innocent models still answer the trigger "
              f"({format_audit(a)} > {100 * cfg.audit_threshold:g}%) "
              f"after {len(res.audits) - 1} hardening round(s)"
              + (f" and {len(res.attempts) - 1} restart(s), kept seed {next(a['seed'] for a in res.attempts if a['kept'])}"
                 if res.attempts else "")
              + "; innocent models may be flagged. Protect again with another --seed "
              "(or more --audit-restarts).", file=sys.stderr)
    elif len(res.attempts) > 1:
        print(f"audit passed on restart {len(res.attempts) - 1} (seed {res.attempts[-1]['seed']})")
    verification = None
    if args.references:
        held = owner if owner.labels is not None else None
        if held is None:
            raise ValueError("calibrating tau0 needs labelled owner images")
        refs = train_reference_models(victim, shadow.images, args.references.split(","), k,
                                      FitConfig(epochs=args.reference_epochs), progress=True)
        if args.reference_finetune:  # widen the null: innocent copies fine-tuned on clean labels too
            n = min(args.reference_finetune, len(held))
            refs = refs + finetuned_references(refs, held.images[:n], held.labels[:n].long(), seed=args.seed)
        if purifications:  # ... and every one of them behind each input purification a suspect may apply
            refs = refs + purified_references(refs, purifications, images=held.images, labels=held.labels.long(),
                                              max_drop=max_drop)
        cal = calibrate_tau0(refs, res.trigger, held.images, held.labels, cfg.target)
        verification = {"tau0": cal.tau0, "rule": cal.rule, "reference": cal.reference,
                        "reference_queries": f"{len(shadow)} images of {shadow.name}, soft labels of the unprotected victim"}
        if args.reference_finetune:
            verification["reference_finetune"] = {"images": n, "settings": [list(x) for x in FINETUNE_SETTINGS],
                                                  "data": f"the first {n} labelled owner images ({owner.name})"}
        if purifications:
            verification["reference_purify"] = {"settings": [[name, spec] for name, spec in purifications],
                                                "max_drop": max_drop}
        print(f"tau0 = {100 * cal.tau0:.2f}% from " + ", ".join(f"{r['arch']} {100 * r['asr']:.2f}%" for r in cal.reference))
    save_bundle(out, res.model, res.trigger, arch=info["arch"], target=cfg.target, classes=classes,
                config=vars(cfg) | {"eps_255": round(cfg.eps * 255, 6), "preset": args.preset},
                verification=verification, history=res.history,
                extra={"protect_seconds": round(t_protect, 1), "shadow_set": shadow.name, "owner_set": owner.name,
                       "audits": res.audits, "attempts": res.attempts},
                overwrite=args.overwrite)
    print(f"saved bundle {out} (protect loop {t_protect:.0f} s)")
    return 0


def cmd_extract(args) -> int:
    from .active import extract
    from .bundle import save_model
    from .oracles import ModelOracle, OutputMode
    from .training import FitConfig, accuracy

    from .oracles_http import HttpOracle, is_url

    output = OutputMode(args.output_mode, args.top_k, args.decimals)
    if is_url(args.oracle):  # a `honeypotnet serve` endpoint: classes and image size from its metadata
        oracle = HttpOracle(args.oracle, api_key=args.api_key, output=output)
        info = {"num_classes": oracle.num_classes, "classes": oracle.classes}
        args.image_size = args.image_size or oracle.image_size
    else:
        model, info = _load_any_model(args.oracle)
        oracle = ModelOracle(model, output)
    pool = _load(args, "pool", size=args.image_size)
    out = Path(args.output)
    t0 = time.time()
    res = extract(oracle, pool.images, args.budget, args.arch, info["num_classes"], args.strategy, rounds=args.rounds,
                  initial=args.initial, round_epochs=args.round_epochs,
                  fit_config=FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
                  seed=args.seed, progress=True, work_dir=out.with_name(out.name + ".work"))
    result = {"strategy": args.strategy, "budget": args.budget, "queries": res.queries, "arch": args.arch,
              "output_mode": args.output_mode, "top_k": args.top_k, "decimals": args.decimals, "pool": pool.name,
              "seconds": round(time.time() - t0, 1)}
    if args.strategy != "random":
        result["rounds"] = res.rounds
    if args.eval:
        args.pool, args.pool_root, args.pool_split, args.pool_limit = args.eval, args.eval_root, args.eval_split, None
        test = _load(args, "pool", size=args.image_size)
        result["substitute_accuracy"] = accuracy(res.substitute, test.images, test.labels)
        print(f"substitute accuracy: {100 * result['substitute_accuracy']:.2f}%")
    save_model(res.substitute, out, args.arch, info["num_classes"], info.get("classes"), extraction=result)
    _write_json(out.with_suffix(".json"), result)
    print(f"saved substitute {out} after {res.queries} queries")
    return 0


def cmd_verify(args) -> int:
    from .bundle import load_bundle
    from .verify import verify

    bundle = load_bundle(args.bundle)
    from .oracles_http import HttpOracle, is_url

    if is_url(args.suspect):  # a suspect model behind an HTTP endpoint (v2 protocol)
        suspect = HttpOracle(args.suspect, api_key=args.api_key)
    else:
        suspect, _ = _load_any_model(args.suspect)
    data = _load(args, "data", size=bundle.trigger.image_size)
    tau0 = args.tau0 if args.tau0 is not None else bundle.tau0
    if tau0 is None:
        raise ValueError("the bundle has no calibrated tau0 (protect without --references); pass --tau0")
    res = verify(suspect, bundle.trigger, data.images, data.labels, bundle.target, tau0, args.alpha)
    print(res)
    if args.json:
        _write_json(Path(args.json), res.to_dict() | {"bundle": str(args.bundle), "suspect": str(args.suspect)})
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.output), quick=args.quick, seed=args.seed, preset=args.preset)
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .active import STRATEGIES
    from .oracles import OUTPUT_MODES

    p = argparse.ArgumentParser(prog="honeypotnet", description="HoneypotNet: a backdoor for model thieves, as a defence.", epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"honeypotnet {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("demo", help="the whole chain on the embedded data, one table", epilog=EPILOG)
    s.add_argument("--output", default="runs/demo", help="directory for models, bundle and results.json")
    s.add_argument("--quick", action="store_true", help="smaller sizes (about a minute), for smoke tests")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", choices=["spec", "robust"], default="spec",
                   help="the protection: 'spec' (default here, eps 24: the chain in a few minutes) or 'robust' (the "
                        "library's and `protect`'s default, several times the protect time)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("train", help="train a victim classifier", epilog=EPILOG)
    _dataset_args(s, "data", "shapes", "train", "training")
    s.add_argument("--test-split", default="test", help="labelled split to report accuracy on ('' to skip)")
    s.add_argument("--arch", default="cnn_small", help="model registry name")
    s.add_argument("--pretrained", default=None, help="start from a checkpoint (e.g. a CIFAR ResNet .th)")
    s.add_argument("--epochs", type=int, default=8)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--lr", type=float, default=0.05)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--output", required=True, help="model file to write (.safetensors); resumes from OUTPUT.ckpt")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("protect", help="build the honeypot bundle of a victim (PAPER.md §2)", epilog=EPILOG)
    s.add_argument("victim", help="model file from `train`, or a foreign checkpoint with --arch")
    s.add_argument("--arch", default=None, help="architecture of a foreign checkpoint (e.g. resnet20)")
    s.add_argument("--num-classes", type=int, default=10)
    _dataset_args(s, "shadow", "shapes", "shadow", "shadow-set (defender's natural unlabeled images)")
    _dataset_args(s, "owner", "shapes", "train", "owner's in-distribution")
    s.add_argument("--image-size", type=int, default=None, help="resize every image to this side")
    s.add_argument("--target", type=int, default=0, help="target class y_t")
    s.add_argument("--trigger", choices=["uap", "patch"], default="uap")
    s.add_argument("--preset", choices=["robust", "spec"], default="robust",
                   help="a named configuration the other options change: 'robust' (default: eps 24, trigger blur 0.75, "
                        "fine-tuned shadow, negative shadows cnn+resnet20 at weight 1 with their fine-tuned copies and "
                        "noise 0.2; keeps the backdoor through a thief's fine-tuning, fine-pruning and purification) or "
                        "'spec' (PAPER.md §2 with the measured changes, eps 16, those options off: ~10-14x faster to "
                        "protect, but a thief who fine-tunes its copy on 1,000 clean labels washes the backdoor out)")
    s.add_argument("--eps", type=float, default=None, help="UAP L-inf bound in 1/255 units (robust 24, spec 16)")
    s.add_argument("--patch-size", type=int, default=6)
    s.add_argument("--trigger-resolution", type=int, default=0, metavar="R",
                   help="UAP optimised on an RxR grid and upsampled: a low-frequency trigger (default 0 = full resolution)")
    s.add_argument("--trigger-blur", type=float, default=None, metavar="SIGMA",
                   help="optimise the trigger through a random Gaussian blur of sigma up to SIGMA pixels, so it "
                        "survives a thief's blur purification (robust 0.75; spec 0 = off)")
    s.add_argument("--negative-weight", type=float, default=None, metavar="W",
                   help="weight of a negative shadow (a clean copy extracted from the unprotected victim) in the "
                        "trigger step: keeps the trigger off innocent models (robust 1; spec 0 = off)")
    s.add_argument("--negative-models", choices=["shadow", "victim", "shadow+victim"], default="shadow",
                   help="the innocent models of --negative-weight: the negative shadow, the unprotected victim, or both")
    s.add_argument("--negative-archs", nargs="+", default=None, metavar="ARCH",
                   help="one negative shadow of each of these architectures (robust: cnn resnet20; spec: "
                        "one of --shadow-arch)")
    s.add_argument("--negative-finetune-epochs", type=int, default=None, metavar="N",
                   help="each iteration also fine-tune a copy of every negative shadow N epochs on owner images and "
                        "keep the trigger off those copies too (innocent models fine-tuned by their owners; robust 2; "
                        "spec 0 = off)")
    s.add_argument("--negative-finetune-lr", type=float, default=0.05, metavar="LR",
                   help="learning rate of --negative-finetune-epochs (default 0.05)")
    s.add_argument("--negative-noise", type=float, default=None, metavar="S",
                   help="run every negative model with its weights times (1 + S*N(0,1)), fresh per trigger batch, so "
                        "the trigger avoids a family of innocent models around each one (robust 0.2; spec 0 = off)")
    s.add_argument("--shadow-prune", type=float, default=0.0, metavar="P",
                   help="each iteration also fine-prune a copy of the shadow (mask the share P of its last-layer channels "
                        "least active on owner images, then --shadow-finetune-epochs) and aim the trigger at it too, so "
                        "the backdoor survives a thief's Fine-Pruning (default 0 = off)")
    s.add_argument("--audit-rounds", type=int, default=0, metavar="N",
                   help="after --iters, check the trigger on fresh innocent models (never seen by the loop); if one "
                        "answers the target above --audit-threshold, add them to the negative term and run "
                        "--audit-iters more iterations, at most N times (default 0 = off)")
    s.add_argument("--audit-iters", type=int, default=2, metavar="T", help="iterations per audit round (default 2)")
    s.add_argument("--audit-threshold", type=float, default=2.0, metavar="PCT",
                   help="ASR in percent above which an innocent model fails the audit (default 2)")
    s.add_argument("--audit-epochs", type=int, default=12, help="training epochs of each audit model (default 12)")
    s.add_argument("--audit-archs", nargs="+", default=[], metavar="ARCH",
                   help="architectures of the audit models (default: those of the negative shadows, else --shadow-arch)")
    s.add_argument("--audit-restarts", type=int, default=0, metavar="K",
                   help="when the last audit check fails, protect again from scratch with seed + 1000·r, at most K "
                        "times; keep the first run that passes, else the one innocent models answer least "
                        "(with --audit-rounds 0: one check per run, no hardening; default 0 = off)")
    s.add_argument("--head", choices=["residual", "linear"], default="residual")
    s.add_argument("--hidden", type=int, default=256)
    s.add_argument("--lam", type=float, default=3.0)
    s.add_argument("--iters", type=int, default=8, help="outer iterations T")
    s.add_argument("--shadow-arch", default="cnn")
    s.add_argument("--shadow-epochs", type=int, default=3)
    s.add_argument("--shadow-reinit", action="store_true", help="re-initialise the shadow every iteration")
    s.add_argument("--trigger-passes", type=int, default=2)
    s.add_argument("--honeypot-steps", type=int, default=400)
    s.add_argument("--shadow-norm-weight", type=float, default=0.2,
                   help="weight of L_norm on shadow-set images (owner images 1; the spec's plain mean is 1)")
    s.add_argument("--shadow-finetune-epochs", type=int, default=None,
                   help="simulate a thief who fine-tunes its copy: aim the trigger at the shadow fine-tuned this many "
                        "epochs on owner images labelled by the victim too (robust 2; spec 0 = off)")
    s.add_argument("--shadow-finetune-lr", type=float, default=0.02)
    s.add_argument("--shadow-finetune-images", type=int, default=1000)
    s.add_argument("--references", default="cnn,cnn_small", help="architectures of clean reference models for tau0 ('' to skip)")
    s.add_argument("--reference-epochs", type=int, default=10)
    s.add_argument("--reference-finetune", type=int, default=0, metavar="N",
                   help="widen the null: also calibrate tau0 on each reference fine-tuned on the first N labelled owner "
                        "images (4 epoch x lr settings; default 0 = off). Innocent copies fine-tuned on clean labels can "
                        "answer the trigger more often than the references (README: Can the thief wash the backdoor out?)")
    s.add_argument("--reference-purify", nargs="?", const="all", default=None, metavar="NAMES",
                   help="widen the null: also calibrate tau0 on each reference (and fine-tuned reference) behind an "
                        "input purification a suspect may apply: 'all' (the flag alone) or some of jpeg-q75,jpeg-q50,"
                        "blur-0.5,blur-1.0. An innocent copy that blurs its inputs can answer a blur-robust trigger "
                        "more often than the references (README: The trigger optimised through a blur)")
    s.add_argument("--reference-purify-max-drop", type=float, default=None, metavar="PT",
                   help="leave out a purified reference whose accuracy on the labelled owner images is more than PT "
                        "points below its reference's (a deployment no owner would serve; default 20, "
                        "verify.PURIFY_MAX_DROP)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--work-dir", default=None, help="checkpoint dir for resuming (default OUTPUT.work)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--output", required=True, help="bundle directory to write")
    s.set_defaults(func=cmd_protect)

    s = sub.add_parser("extract", help="simulate a thief: query an oracle, train a substitute", epilog=EPILOG)
    s.add_argument("oracle", help="bundle directory or model file the thief queries, or an http(s) URL "
                                  "http://HOST:PORT/v2/models/NAME of a served model")
    s.add_argument("--api-key", default=os.environ.get("HONEYPOTNET_API_KEY"), help="bearer token for an http(s) oracle (default $HONEYPOTNET_API_KEY)")
    _dataset_args(s, "pool", "shapes", "pool", "thief's query pool")
    s.add_argument("--image-size", type=int, default=None)
    s.add_argument("--budget", type=int, default=8000, help="number of queries (one image = one query)")
    s.add_argument("--strategy", choices=list(STRATEGIES), default="random",
                   help="which pool images to buy: random (KnockoffNets), or ActiveThief rounds from a random seed: "
                        "entropy (uncertainty), kcenter (core-set on substitute features), dfal (DeepFool margin)")
    s.add_argument("--rounds", type=int, default=5, help="active strategies: selection rounds after the initial seed")
    s.add_argument("--initial", type=int, default=None, help="active strategies: initial random seed size (default budget/10)")
    s.add_argument("--round-epochs", type=int, default=None,
                   help="active strategies: warm-start epochs of the round substitute per round (default epochs/4)")
    s.add_argument("--output-mode", choices=list(OUTPUT_MODES), default="probs",
                   help="what the API answers: probs, topk (--k), rounded (--decimals), label (top-1 only)")
    s.add_argument("--k", "--top-k", dest="top_k", type=int, default=1, help="k of --output-mode topk")
    s.add_argument("--decimals", type=int, default=2, help="decimals of --output-mode rounded")
    s.add_argument("--arch", default="cnn_small", help="substitute architecture")
    s.add_argument("--epochs", type=int, default=12)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--lr", type=float, default=0.05)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eval", default="shapes", help="labelled dataset to report substitute accuracy on ('' to skip)")
    s.add_argument("--eval-root", default=None)
    s.add_argument("--eval-split", default="test")
    s.add_argument("--output", required=True, help="substitute model file to write")
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("verify", help="ownership test of a suspect model (PAPER.md §3)", epilog=EPILOG)
    s.add_argument("bundle", help="the owner's bundle (trigger, target, tau0)")
    s.add_argument("suspect", help="suspect model file or bundle, or an http(s) URL http://HOST:PORT/v2/models/NAME")
    s.add_argument("--api-key", default=os.environ.get("HONEYPOTNET_API_KEY"), help="bearer token for an http(s) suspect (default $HONEYPOTNET_API_KEY)")
    _dataset_args(s, "data", "shapes", "test", "owner's held-out")
    s.add_argument("--tau0", type=float, default=None, help="override the bundle's calibrated null bound")
    s.add_argument("--alpha", type=float, default=1e-3)
    s.add_argument("--json", default=None, help="write the result as JSON here")
    s.set_defaults(func=cmd_verify)

    from .cli_serve import add_verbs  # serve, keys, log, export

    add_verbs(sub, EPILOG)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as e:
        print(f"honeypotnet {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
