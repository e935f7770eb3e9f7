"""The thief's whole arsenal against the real-data protocol of bench.reproduce (CIFAR-10 victim,
Tiny ImageNet pool): active extraction, what the API returns, a thief who suspects a backdoor, and
ART's own attacks. Every row: substitute CTA, ASR and the verification verdict (the bundle's tau0),
protected vs unprotected (the same thief against the unprotected victim).

    python -m bench.arsenal                    # reads runs/reproduce (victim, bundle, pool answers)
    python -m bench.arsenal --quick            # runs/reproduce-quick (made first if missing), small sizes
    python -m bench.arsenal --resume           # after a kill: finished units are skipped

Parts (each unit resumable: OUT/<unit>/unit.json, keyed by its parameters):
  strategies  random (KnockoffNets), entropy, kcenter, dfal (ActiveThief rounds from a random seed,
              honeypotnet.active.extract) x budgets x {protected, clean}; a budget equal to the pool
              buys the whole pool, so there every strategy *is* random (the row says so, no rerun).
  outputs     at one budget (random): probabilities, top-1, top-3, rounded to 1 / 2 decimals, label
              only. top-1 renormalised is the one-hot label: identical answers reuse one unit.
  counter     on the random substitute at the largest budget (protected and clean): fine-tuning
              (lr x epochs sweep) and fine-pruning (prune ratios, with and without fine-tuning) on a
              small clean labelled CIFAR-10 train set, Neural Cleanse (anomaly index per class),
              JPEG re-compression and Gaussian blur at inference.
  families    thieves of network families the protection never uses (its negative shadows and reference
              models are `cnn` / `resnet20`, so a defence could be tuned to those): vgg_small,
              mobilenetv2_small and convmixer trained with the project's `fit`, and the protocol's own
              arch trained by a plain Adam loop (lr 1e-3, cosine, crop + flip, KL to the answers),
              next to the protocol's thief itself; each at the counter-measures' budget (random
              images), soft labels (probabilities) and label only, protected and clean.
  art         ART's KnockoffNets on the model wrapped as ART's PyTorchClassifier, and CopycatCNN on
              the oracle wrapped as ART's BlackBoxClassifier (--no-art skips; without ART installed the
              part is recorded as skipped in results.json, "skipped").

The oracle is benchlib's PoolOracle over the model's pre-computed pool answers (one image = one
query, output mode applied by the Oracle base class). The substitute is the protocol's thief ("cnn",
FitConfig(epochs=12)); active strategies add warm-started round substitutes.

Output: OUT/results.json, OUT/results.md (tables), OUT/budget_curve.png (substitute CTA and ASR vs
query budget per strategy, protected solid / clean dashed).
"""
from __future__ import annotations

import argparse
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from honeypotnet.active import STRATEGIES, extract
from honeypotnet.attacks import query_oracle
from honeypotnet.bundle import load_bundle, load_model, save_model
from honeypotnet.countermeasures import fine_prune, finetune, neural_cleanse
from honeypotnet.data import load_dataset
from honeypotnet.models import create_model, list_models
from honeypotnet.ops import to_float
from honeypotnet.oracles import ModelOracle, OutputMode
from honeypotnet.purify import PurifiedModel
from honeypotnet.training import FitConfig, accuracy
from honeypotnet.verify import verify

from . import reproduce
from .benchlib.args import add_common_args, add_data_args, default_out, finish_common_args
from .benchlib.common import (command_line, log, machine_info, save_report, set_threads, stage_timings, timings_json,
                              timings_table)
from .benchlib.data import Data, load_data, resolve_roots
from .benchlib.oracle import PoolOracle
from .benchlib.protocol import FULL as PROTOCOL_FULL
from .benchlib.protocol import QUICK as PROTOCOL_QUICK
from .benchlib.units import Units, code_summary

NAME = "arsenal"
MODES = {"probs": OutputMode("probs"), "top1": OutputMode("topk", k=1), "top3": OutputMode("topk", k=3),
         "rounded1": OutputMode("rounded", decimals=1), "rounded2": OutputMode("rounded", decimals=2),
         "label": OutputMode("label")}
MODE_LABELS = {"probs": "probabilities", "top1": "top-1 prob.", "top3": "top-3 probs", "rounded1": "rounded, 1 decimal",
               "rounded2": "rounded, 2 decimals", "label": "label only"}
FAMILY_LABELS = {"probs": "soft", "label": "label-only"}  # the families part's two kinds of answers
TRAINERS = {"fit": "fit (SGD, one-cycle)", "adam": "Adam, cosine"}
PARTS = ("strategies", "outputs", "counter", "families", "art")


@dataclass
class Plan:
    """What is run. FULL = the reproduce protocol's sizes; QUICK = a smoke run of every part."""

    budgets: tuple[int, ...] = (5000, 10000, 20000)
    strategies: tuple[str, ...] = STRATEGIES
    arch: str = "cnn"
    epochs: int = 12
    rounds: int = 5
    round_epochs: int = 3
    mode_budget: int = 10000
    modes: tuple[str, ...] = ("probs", "top3", "rounded2", "rounded1", "label", "top1")
    cm_budget: int = 20000  # the substitute the counter-measures work on (random, probabilities)
    cm_clean: int = 1000  # clean labelled CIFAR-10 train images the thief owns
    finetune_grid: tuple[tuple[float, int], ...] = ((0.001, 5), (0.01, 5), (0.01, 20), (0.05, 5))
    prune_ratios: tuple[float, ...] = (0.3, 0.6, 0.9)
    prune_finetune_epochs: int = 5
    prune_lr: float = 0.01
    nc_steps: int = 300
    nc_images: int = 500
    nc_batch: int = 64
    jpeg_qualities: tuple[int, ...] = (50, 75)
    blur_sigmas: tuple[float, ...] = (0.5, 1.0)
    families: tuple[str, ...] = ("vgg_small", "mobilenetv2_small", "convmixer")  # thieves' archs the protection never uses
    family_modes: tuple[str, ...] = ("probs", "label")
    family_epochs: int | None = None  # the other families' thieves (None: `epochs`, as the protocol's thief)
    adam_lr: float = 1e-3  # the plain Adam thief (the protocol's arch, its own training loop)
    adam_batch: int = 128
    art_budget: int = 5000
    art_epochs: int = 12
    alpha: float = 1e-3
    seed: int = 0


FULL = Plan()
QUICK = Plan(budgets=(500, 1000, 2000), arch="cnn_small", epochs=3, rounds=2, round_epochs=1, mode_budget=500,
             cm_budget=2000, cm_clean=200, finetune_grid=((0.01, 2),), prune_ratios=(0.5,), prune_finetune_epochs=2,
             nc_steps=15, nc_images=64, nc_batch=32, jpeg_qualities=(50,), blur_sigmas=(1.0,), family_epochs=1,
             art_budget=500, art_epochs=3)


# ============================================================================ the benchmark


class Arsenal:
    def __init__(self, args, plan: Plan, data: Data, device: torch.device) -> None:
        self.args, self.plan, self.data, self.device = args, plan, data, device
        self.out = Path(args.out)
        self.units = Units(self.out, args.resume)
        self.progress = args.progress
        src = Path(args.from_reproduce)
        self.source = src
        seed_dir = src / f"seed{args.reproduce_seed}" / f"protect-{args.protection}"
        self.bundle = load_bundle(seed_dir / "bundle")
        if self.bundle.tau0 is None:
            raise SystemExit(f"{seed_dir / 'bundle'} has no calibrated tau0: bench.reproduce has not finished it")
        self.victim, _ = load_model(src / "victim" / "victim.safetensors")
        self.models = {"protected": self.bundle.model.to(device).eval(), "clean": self.victim.to(device).eval()}
        self.model_keys = {"protected": _file_key(seed_dir / "bundle" / "model.safetensors"),
                           "clean": _file_key(src / "victim" / "victim.safetensors")}
        self.answers = {"protected": self._pool_answers("protected", seed_dir / "pool-answers" / "answers.pt"),
                        "clean": self._pool_answers("clean", src / "victim" / "pool-answers" / "answers.pt")}
        self.verifier = self.bundle.bundle_hash  # its trigger, target and tau0 among the rest: what a verdict depends on
        self.eval_images = data.test_images[data.eval_idx]
        self.eval_labels = data.test_labels[data.eval_idx]
        self.verif_images = data.test_images[data.verif]
        self.verif_labels = data.test_labels[data.verif]
        self.rows: dict[str, list[dict]] = {part: [] for part in PARTS}
        self.skipped: list[dict] = []  # parts that could not run (e.g. ART not installed)
        self._clean_set = None

    # ------------------------------------------------------------------ inputs
    def _pool_answers(self, oracle: str, path: Path) -> torch.Tensor:
        """The model's probabilities for every pool image: bench.reproduce's, checked on a sample, or computed here."""
        model, pool = self.models[oracle], self.data.pool
        if path.is_file():
            ans = torch.load(path, map_location="cpu", weights_only=True)
            if len(ans) == len(pool):
                idx = torch.arange(0, len(pool), max(1, len(pool) // 16))
                fresh = ModelOracle(model)(pool[idx].to(self.device))
                if torch.allclose(fresh, ans[idx], atol=1e-4):
                    return ans
            log(f"{path} does not match the pool / model: answering the pool again")
        own = self.out / f"pool-answers-{oracle}.pt"
        if own.is_file():
            ans = torch.load(own, map_location="cpu", weights_only=True)
            if len(ans) == len(pool):
                return ans
        ans = query_oracle(ModelOracle(model), pool, batch_size=500, progress=self.progress)
        torch.save(ans, own)
        return ans

    def clean_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The thief's small clean labelled set: a fixed random share of cifar10-jpeg/train."""
        if self._clean_set is None:
            cifar_root, _ = resolve_roots(self.args)
            train = load_dataset("imagefolder", cifar_root, "train")
            g = torch.Generator().manual_seed(4321)
            idx = torch.randperm(len(train), generator=g)[: self.plan.cm_clean]
            self._clean_set = (train.images[idx].contiguous(), train.labels[idx].contiguous())
        return self._clean_set

    def fit_config(self, epochs: int | None = None) -> FitConfig:
        return FitConfig(epochs=epochs or self.plan.epochs, seed=self.plan.seed)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: torch.nn.Module) -> dict:
        """CTA on the evaluation images (both halves of the test split, as bench.reproduce), then verify()
        on the verification half with the bundle's trigger, target and tau0."""
        b = self.bundle
        v = verify(model, b.trigger, self.verif_images, self.verif_labels, b.target, b.tau0, self.plan.alpha)
        return {"cta": accuracy(model, self.eval_images, self.eval_labels), "asr": v.asr, "hits": v.hits, "n": v.n,
                "unstamped_rate": v.unstamped_rate, "tau0": v.tau0, "p_value": v.p_value,
                "paired_p_value": v.paired_p_value, "stolen": v.stolen,
                "verdict": v.verdict, "clean_accuracy": v.clean_accuracy, "stamped_accuracy": v.stamped_accuracy}

    def verified(self, rec: dict, stage: str) -> dict:
        """rec (a finished thief unit with its substitute.safetensors) with its evaluation taken from a unit keyed on
        the thief's unit and this bundle's hash (which covers its trigger, target and tau0). The thief's own unit is
        keyed on the model it queried; for a clean twin that is the victim, which does not name the protection, so
        the verdict stored in it may be another bundle's (a twin's unit reused against another protection)."""
        rel = rec["rel"]

        def run(d: Path) -> dict:
            sub, _ = load_model(self.out / rel / "substitute.safetensors")
            return self.evaluate(sub.to(self.device))

        v = self.units.run(f"{rel}/verify", {"thief": rec["key"], "verifier": self.verifier}, run, stage)
        return {**rec, **_eval_fields(v)}

    # ------------------------------------------------------------------ thieves
    def thief(self, oracle: str, strategy: str, budget: int, mode: str, arch: str | None = None,
              epochs: int | None = None) -> dict:
        """One extraction (honeypotnet.active.extract) by the protocol's thief, or by a thief of `arch`
        (trained `epochs`; default the plan's)."""
        p, pool = self.plan, self.data.pool
        arch = arch or p.arch
        if strategy != "random" and budget >= len(pool):
            rec = dict(self.thief(oracle, "random", budget, mode, arch, epochs))
            rec.update(strategy=strategy, note="budget = pool: every strategy buys the whole pool (= random)")
            return rec
        rel = f"thief-{oracle}-{strategy}-{budget}-{mode}" + ("" if arch == p.arch else f"-{arch}")
        om = MODES[mode]
        fitc = self.fit_config(epochs)
        params = {"model": self.model_keys[oracle], "strategy": strategy, "budget": budget, "mode": asdict(om),
                  "arch": arch, "fit": asdict(fitc), "rounds": p.rounds, "round_epochs": p.round_epochs,
                  "seed": p.seed, "pool": len(pool), "eval": len(self.eval_labels), "tau0": self.bundle.tau0}

        def run(d: Path) -> dict:
            orc = PoolOracle(self.answers[oracle], pool, om)
            res = extract(orc, pool, budget, arch, 10, strategy, rounds=p.rounds, round_epochs=p.round_epochs,
                          fit_config=fitc, seed=p.seed, progress=self.progress, work_dir=d / "work", device=self.device)
            if len(res.indices) != budget or len(torch.unique(res.indices)) != budget or res.queries != orc.queries:
                raise RuntimeError(f"query accounting: {len(res.indices)} images bought, {orc.queries} queries paid now")
            save_model(res.substitute, d / "substitute.safetensors", arch, 10, self.data.classes, oracle=oracle,
                       strategy=strategy, budget=budget, output=mode)
            shutil.rmtree(d / "work", ignore_errors=True)
            rounds = [{k: v for k, v in r.items() if k in ("round", "bought", "picked_percentile", "picked_mean",
                                                          "candidates_mean", "radius_before", "radius_after",
                                                          "select_seconds")} for r in res.rounds]
            return {"queries": len(res.indices), "rounds": rounds}  # its evaluation: verified()

        stage = f"thief ({oracle})" if mode == "probs" else f"thief ({oracle}, {mode})"
        if arch != p.arch:
            stage = f"thief ({oracle}, {arch}{'' if mode == 'probs' else ', ' + mode})"
        rec = self.units.run(rel, params, run, stage)
        rec.update(rel=rel, oracle=oracle, strategy=strategy, budget=budget, output=mode, arch=arch)
        return self.verified(rec, "verification")

    def adam_thief(self, oracle: str, budget: int, mode: str) -> dict:
        """A thief whose training loop is not the project's `fit`: the random thief's images and answers
        (same seed, so the same images), the protocol's arch, trained by `adam_fit`."""
        p, pool = self.plan, self.data.pool
        rel = f"thief-{oracle}-adam-{budget}-{mode}"
        om = MODES[mode]
        trainer = {"optimizer": "adam", "lr": p.adam_lr, "epochs": p.epochs, "batch_size": p.adam_batch,
                   "schedule": "cosine", "augment": "crop 4 (zero padding) + flip", "loss": "kl"}
        params = {"model": self.model_keys[oracle], "strategy": "random", "budget": budget, "mode": asdict(om),
                  "arch": p.arch, "trainer": trainer, "seed": p.seed, "pool": len(pool), "eval": len(self.eval_labels),
                  "tau0": self.bundle.tau0}

        def run(d: Path) -> dict:
            orc = PoolOracle(self.answers[oracle], pool, om)
            idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(p.seed))[:budget]  # as random_extraction
            images = pool[idx]
            answers = query_oracle(orc, images, progress=self.progress)
            if orc.queries != budget or len(answers) != budget:
                raise RuntimeError(f"query accounting: {budget} images bought, {orc.queries} queries paid")
            torch.manual_seed(p.seed)
            model = create_model(p.arch, 10).to(self.device)
            losses = adam_fit(model, images, answers, epochs=p.epochs, lr=p.adam_lr, batch_size=p.adam_batch,
                              seed=p.seed, device=self.device, progress=self.progress)
            save_model(model, d / "substitute.safetensors", p.arch, 10, self.data.classes, oracle=oracle,
                       strategy="random", budget=budget, output=mode, trainer="adam")
            return {"queries": orc.queries, "losses": [round(v, 4) for v in losses]}  # its evaluation: verified()

        stage = f"thief ({oracle}, Adam{'' if mode == 'probs' else ', ' + mode})"
        rec = self.units.run(rel, params, run, stage)
        rec.update(rel=rel, oracle=oracle, strategy="random", budget=budget, output=mode, arch=p.arch)
        return self.verified(rec, "verification")

    def _row(self, rec: dict, **extra) -> dict:
        keep = ("oracle", "strategy", "budget", "output", "arch", "queries", "cta", "asr", "hits", "n", "unstamped_rate", "tau0",
                "p_value", "paired_p_value", "stolen", "verdict", "clean_accuracy", "stamped_accuracy", "seconds", "resumed", "note", "rel")
        return {k: rec[k] for k in keep if k in rec} | extra

    def run_strategies(self) -> None:
        for budget in self.plan.budgets:
            for strategy in self.plan.strategies:
                for oracle in ("protected", "clean"):
                    rec = self.thief(oracle, strategy, budget, "probs")
                    row = self._row(rec, rounds=rec.get("rounds", []))
                    self.rows["strategies"].append(row)
                    log(f"{strategy:>8} {budget:>6} {oracle:>9}: CTA {100 * row['cta']:.2f}%  ASR {100 * row['asr']:.2f}%  "
                        f"{row['verdict']}  [{rec['seconds']:.0f} s{', resumed' if rec.get('resumed') else ''}]")

    def run_outputs(self) -> None:
        budget = self.plan.mode_budget
        seen: dict[str, str] = {}  # digest of the answers -> mode that produced them
        for mode in self.plan.modes:
            digest = (_tensor_digest(MODES[mode].apply(self.answers["protected"]))
                      + _tensor_digest(MODES[mode].apply(self.answers["clean"])))
            same = seen.get(digest)
            seen.setdefault(digest, mode)
            for oracle in ("protected", "clean"):
                rec = self.thief(oracle, "random", budget, same or mode)
                row = self._row(rec, output=mode)
                if same:
                    row["note"] = f"the API answers exactly as with '{same}' (same substitute)"
                self.rows["outputs"].append(row)
                log(f"output {mode:>9} {oracle:>9}: CTA {100 * row['cta']:.2f}%  ASR {100 * row['asr']:.2f}%  {row['verdict']}"
                    + (f"  (= {same})" if same else ""))

    def run_families(self) -> None:
        """Thieves the protection was not built around, at the counter-measures' budget: other network
        families (the project's `fit`) and the protocol's arch under another training loop (Adam), with
        the protocol's own thief as the reference row; soft labels and label only; protected and clean."""
        p = self.plan
        budget = p.cm_budget
        thieves = [(p.arch, "fit")] + [(f, "fit") for f in p.families] + [(p.arch, "adam")]
        for family, trainer in thieves:
            size = sum(t.numel() for t in create_model(family, 10).parameters())
            for mode in p.family_modes:
                for oracle in ("protected", "clean"):
                    if trainer == "adam":
                        rec = self.adam_thief(oracle, budget, mode)
                    else:
                        rec = self.thief(oracle, "random", budget, mode, family,
                                         None if family == p.arch else p.family_epochs)
                    row = self._row(rec, family=family, trainer=trainer, labels=FAMILY_LABELS.get(mode, mode),
                                    parameters=size, reference=(family, trainer) == (p.arch, "fit"))
                    self.rows["families"].append(row)
                    log(f"family {family:>17} {trainer:>4} {row['labels']:>10} {oracle:>9}: CTA {100 * row['cta']:.2f}%  "
                        f"ASR {100 * row['asr']:.2f}%  {row['verdict']}  [{rec['seconds']:.0f} s"
                        f"{', resumed' if rec.get('resumed') else ''}]")

    # ------------------------------------------------------------------ counter-measures
    def run_counter(self) -> None:
        p = self.plan
        for oracle in ("protected", "clean"):
            base = self.thief(oracle, "random", p.cm_budget, "probs")
            sub_path = self.out / base["rel"] / "substitute.safetensors"
            before = self._row(base)
            self.rows["counter"].append({"oracle": oracle, "measure": "none (stolen substitute)", **_eval_fields(before),
                                         "cta_before": before["cta"], "asr_before": before["asr"]})
            measures: list[tuple[str, str, dict]] = []
            for lr, ep in p.finetune_grid:
                measures.append((f"finetune-lr{lr:g}-e{ep}", f"fine-tune lr {lr:g}, {ep} epochs", {"kind": "finetune", "lr": lr, "epochs": ep}))
            for r in p.prune_ratios:
                measures.append((f"prune-r{r:g}-e0", f"prune {int(100 * r)}% (no fine-tuning)", {"kind": "prune", "ratio": r, "epochs": 0}))
                measures.append((f"fineprune-r{r:g}-e{p.prune_finetune_epochs}",
                                 f"fine-prune {int(100 * r)}% + {p.prune_finetune_epochs} epochs",
                                 {"kind": "prune", "ratio": r, "epochs": p.prune_finetune_epochs}))
            for q in p.jpeg_qualities:
                measures.append((f"jpeg-q{q}", f"JPEG q{q} at inference", {"kind": "purify", "method": "jpeg", "quality": q}))
            for s in p.blur_sigmas:
                measures.append((f"blur-s{s:g}", f"Gaussian blur sigma {s:g} at inference", {"kind": "purify", "method": "blur", "sigma": s}))
            measures.append(("neural-cleanse", "Neural Cleanse (detector)", {"kind": "nc", "steps": p.nc_steps,
                                                                             "images": p.nc_images, "batch": p.nc_batch}))
            for name, label, cfg in measures:
                rel = f"{base['rel']}/cm-{name}"

                def run(d: Path, cfg=cfg) -> dict:
                    sub, _ = load_model(sub_path)
                    sub.to(self.device)
                    images, labels = self.clean_set()
                    kind = cfg["kind"]
                    if kind == "finetune":
                        return self.evaluate(finetune(sub, images, labels, cfg["epochs"], cfg["lr"], seed=p.seed,
                                                      progress=self.progress))
                    if kind == "prune":
                        res = fine_prune(sub, images, labels, cfg["ratio"], cfg["epochs"], p.prune_lr, seed=p.seed,
                                         progress=self.progress)
                        return {**self.evaluate(res.model), "pruned_channels": len(res.pruned), "channels": res.channels}
                    if kind == "purify":
                        kw = {k: v for k, v in cfg.items() if k not in ("kind", "method")}
                        return self.evaluate(PurifiedModel(sub, cfg["method"], **kw))
                    nc = neural_cleanse(sub, images[: cfg["images"]], steps=cfg["steps"], batch_size=cfg["batch"],
                                        seed=p.seed, progress=self.progress)
                    t = self.bundle.target
                    return {"nc": nc.to_dict(), "target_anomaly": nc.anomaly_index[t], "target_flagged": t in nc.flagged,
                            "any_flagged": bool(nc.flagged), "target_norm_rank": sorted(nc.norms).index(nc.norms[t])}

                # the verifier joins the key: the measured model is not kept, and a clean twin's key names no bundle
                rec = self.units.run(rel, {"substitute": base["key"], "measure": cfg, "clean": p.cm_clean,
                                           "clean_seed": 4321, "seed": p.seed, "verifier": self.verifier}, run,
                                     f"counter-measure ({cfg['kind']})")
                row = {"oracle": oracle, "measure": label, "cta_before": before["cta"], "asr_before": before["asr"],
                       "seconds": rec["seconds"], "resumed": rec.get("resumed", False), "rel": rel}
                if cfg["kind"] == "nc":
                    row.update({k: rec[k] for k in ("nc", "target_anomaly", "target_flagged", "any_flagged", "target_norm_rank")})
                    log(f"counter {oracle:>9} {label}: target-class anomaly index {rec['target_anomaly']:.2f} "
                        f"(flagged {rec['nc']['flagged']}, smallest-mask class {rec['nc']['smallest_class']})")
                else:
                    row.update(_eval_fields(rec))
                    if "pruned_channels" in rec:
                        row.update(pruned_channels=rec["pruned_channels"], channels=rec["channels"])
                    log(f"counter {oracle:>9} {label}: CTA {100 * before['cta']:.2f} -> {100 * rec['cta']:.2f}%  "
                        f"ASR {100 * before['asr']:.2f} -> {100 * rec['asr']:.2f}%  {rec['verdict']}")
                self.rows["counter"].append(row)

    # ------------------------------------------------------------------ ART
    def run_art(self) -> None:
        from honeypotnet.art_interop import art_steal, require_art

        try:
            require_art()
        except ImportError as e:
            log(f"{e}: skipping ART's attacks")
            self.skipped.append({"part": "art", "reason": str(e)})
            return
        p = self.plan
        budget = min(p.art_budget, len(self.data.pool))
        for attack, wrap in (("knockoffnets", "pytorch"), ("copycatcnn", "blackbox")):
            for oracle in ("protected", "clean"):
                rel = f"art-{attack}-{wrap}-{oracle}-{budget}"

                def run(d: Path, attack=attack, wrap=wrap, oracle=oracle) -> dict:
                    victim = self.models[oracle] if wrap == "pytorch" else PoolOracle(self.answers[oracle], self.data.pool)
                    dev_type = "gpu" if self.device.type == "cuda" else "cpu"
                    theft = art_steal(victim, self.data.pool, budget, attack=attack, wrap=wrap, arch=p.arch, num_classes=10,
                                      epochs=p.art_epochs, seed=p.seed, device_type=dev_type)
                    save_model(theft.substitute.cpu(), d / "substitute.safetensors", p.arch, 10, self.data.classes,
                               art_attack=attack, wrap=wrap, oracle=oracle, budget=budget)
                    return {"queries": theft.queries}  # its evaluation: verified()

                rec = self.units.run(rel, {"model": self.model_keys[oracle], "attack": attack, "wrap": wrap, "budget": budget,
                                           "arch": p.arch, "epochs": p.art_epochs, "seed": p.seed, "eval": len(self.eval_labels),
                                           "tau0": self.bundle.tau0}, run, f"ART ({oracle})")
                rec = self.verified({**rec, "rel": rel}, "verification")
                row = {"attack": attack, "wrap": wrap, "oracle": oracle, "budget": budget, "queries": rec["queries"],
                       **_eval_fields(rec), "seconds": rec["seconds"], "resumed": rec.get("resumed", False)}
                self.rows["art"].append(row)
                log(f"ART {attack} ({wrap}) {oracle:>9}: CTA {100 * row['cta']:.2f}%  ASR {100 * row['asr']:.2f}%  {row['verdict']}")


def adam_fit(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, epochs: int, lr: float = 1e-3,
             batch_size: int = 128, seed: int = 0, device: torch.device | str = "cpu", progress: bool = False) -> list[float]:
    """A thief's own training loop, deliberately not honeypotnet.training.fit: Adam (no weight decay), a
    per-step cosine schedule to zero, random 32-px crops of the 4-pixel zero-padded image and horizontal
    flips (torchvision's RandomCrop(padding=4) + RandomHorizontalFlip recipe), and the KL divergence from
    the answers (probabilities or one-hot labels) to the model's softmax. Returns the mean loss per epoch;
    the model ends in eval mode."""
    if len(images) != len(targets) or len(images) < 2:
        raise ValueError(f"need matching images and targets (at least 2), got {len(images)} and {len(targets)}")
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total_steps = max(1, epochs * math.ceil(len(images) / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    gen = torch.Generator().manual_seed(seed)
    targets = targets.float()
    history: list[float] = []
    for _ in tqdm(range(epochs), desc="substitute (Adam)", disable=None if progress else True, leave=False):
        model.train()
        perm = torch.randperm(len(images), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(images), batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:
                continue  # BatchNorm cannot train on a single image
            x = _crop_flip(to_float(images[idx]), gen).to(device)
            loss = F.kl_div(F.log_softmax(model(x), dim=1), targets[idx].to(device), reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        history.append(total / max(count, 1))
    model.eval()
    return history


def _crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per image: a random HxW crop of the zero-padded image, then a horizontal flip with probability 1/2."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.stack([xp[j, :, oy[j] : oy[j] + h, ox[j] : ox[j] + w] for j in range(n)])
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def _eval_fields(rec: dict) -> dict:
    return {k: rec[k] for k in ("cta", "asr", "hits", "n", "unstamped_rate", "tau0", "p_value", "paired_p_value", "stolen", "verdict",
                                "clean_accuracy", "stamped_accuracy") if k in rec}


def _tensor_digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.blake2b(t.contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def _file_key(path: Path) -> str:
    """Identity of a model file (size + modification time + name): a rebuilt victim/bundle invalidates the units."""
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `python -m bench.reproduce` first (or pass --from-reproduce DIR)")
    st = path.stat()
    return f"{path.name}:{st.st_size}:{int(st.st_mtime)}"


# ============================================================================ tables and plot


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _verdict(r: dict) -> str:
    return "stolen" if r.get("stolen") else "not flagged"


def _p(r: dict) -> str:
    p = r.get("p_value")
    return "—" if p is None else ("<1e-300" if p == 0 else f"{p:.2g}")


def format_tables(rows: dict[str, list[dict]], plan: Plan, tau0: float, timings: dict[str, list[float]],
                  skipped: list[dict] | None = None) -> str:
    out = [f"Verification: the bundle's tau0 = {100 * tau0:.2f}%, alpha = {plan.alpha:g}. "
           "CTA / ASR in %; (clean) = the same thief against the unprotected victim.", ""]
    pairs = _pairs(rows["strategies"], ("strategy", "budget"))
    if pairs:
        out += ["### Query strategies (ActiveThief vs KnockoffNets random)", "",
                "| strategy | budget | CTA protected (clean) | ASR protected (clean) | verdict protected / clean | p (protected) | note |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for (s, b), (pr, cl) in pairs.items():
            out.append(f"| {s} | {b} | {_pct(pr['cta'])} ({_pct(cl.get('cta'))}) | {_pct(pr['asr'])} ({_pct(cl.get('asr'))}) | "
                       f"{_verdict(pr)} / {_verdict(cl)} | {_p(pr)} | {pr.get('note', '')} |")
        out.append("")
    pairs = _pairs(rows["outputs"], ("output",))
    if pairs:
        out += [f"### What the API returns (random thief, {plan.mode_budget} queries)", "",
                "| API output | CTA protected (clean) | ASR protected (clean) | verdict protected / clean | p (protected) | note |",
                "| --- | --- | --- | --- | --- | --- |"]
        for (m,), (pr, cl) in pairs.items():
            out.append(f"| {MODE_LABELS.get(m, m)} | {_pct(pr['cta'])} ({_pct(cl.get('cta'))}) | {_pct(pr['asr'])} ({_pct(cl.get('asr'))}) | "
                       f"{_verdict(pr)} / {_verdict(cl)} | {_p(pr)} | {pr.get('note', '')} |")
        out.append("")
    cm = [r for r in rows["counter"] if "nc" not in r]
    if cm:
        out += [f"### A thief who suspects a backdoor (random thief, {plan.cm_budget} queries; {plan.cm_clean} clean labelled CIFAR-10 train images)", "",
                "| counter-measure | CTA protected: before → after | ASR protected: before → after | verdict protected | CTA (clean substitute) after | ASR (clean substitute) after | verdict clean |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        by = {(r["oracle"], r["measure"]): r for r in cm}
        for measure in dict.fromkeys(r["measure"] for r in cm):
            pr, cl = by.get(("protected", measure), {}), by.get(("clean", measure), {})
            out.append(f"| {measure} | {_pct(pr.get('cta_before'))} → {_pct(pr.get('cta'))} | {_pct(pr.get('asr_before'))} → "
                       f"{_pct(pr.get('asr'))} | {_verdict(pr) if pr else '—'} | {_pct(cl.get('cta'))} | {_pct(cl.get('asr'))} | "
                       f"{_verdict(cl) if cl else '—'} |")
        out.append("")
    nc = [r for r in rows["counter"] if "nc" in r]
    if nc:
        out += ["### Neural Cleanse on the stolen substitute (anomaly index = |norm − median| / (1.4826·MAD); flagged: index > 2, below the median)", "",
                "| substitute | target-class mask L1 (rank of K) | target-class anomaly index | max anomaly index | flagged classes |",
                "| --- | --- | --- | --- | --- |"]
        for r in nc:
            t = r["nc"]
            tgt = int(r["target_norm_rank"])
            norms = t["norms"]
            target_norm = sorted(norms)[tgt]
            out.append(f"| {r['oracle']} | {target_norm:.1f} ({tgt + 1} of {len(norms)}) | {r['target_anomaly']:.2f} | "
                       f"{t['max_anomaly']:.2f} (class {t['smallest_class']}) | {t['flagged'] or 'none'} |")
        out.append("")
    pairs = _pairs(rows.get("families", []), ("family", "trainer", "labels"))
    if pairs:
        fam = plan.family_epochs
        trained = f"; the other families trained {fam} epoch{'s' * (fam != 1)}" if fam and fam != plan.epochs else ""
        out += [f"### Thieves of other network families (random thief, {plan.cm_budget} queries{trained})", "",
                "| family | training loop | labels | CTA protected (clean) | ASR protected (clean) | verdict protected / clean "
                "| p (protected) | p (clean) |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for (f, t, lab), (pr, cl) in pairs.items():
            name = f"{f} (the protocol's thief)" if pr.get("reference") else f
            out.append(f"| {name} | {TRAINERS.get(t, t)} | {lab} | {_pct(pr['cta'])} ({_pct(cl.get('cta'))}) | "
                       f"{_pct(pr['asr'])} ({_pct(cl.get('asr'))}) | {_verdict(pr)} / {_verdict(cl) if cl else '—'} | "
                       f"{_p(pr)} | {_p(cl)} |")
        out.append("")
    if rows["art"]:
        out += ["### ART's attacks (adversarial-robustness-toolbox)", "",
                "| ART attack | victim wrapped as | budget | CTA protected (clean) | ASR protected (clean) | verdict protected / clean |",
                "| --- | --- | --- | --- | --- | --- |"]
        for (a, w), (pr, cl) in _pairs(rows["art"], ("attack", "wrap")).items():
            out.append(f"| {a} | {'PyTorchClassifier' if w == 'pytorch' else 'BlackBoxClassifier (PoolOracle)'} | {pr['budget']} | "
                       f"{_pct(pr['cta'])} ({_pct(cl.get('cta'))}) | {_pct(pr['asr'])} ({_pct(cl.get('asr'))}) | "
                       f"{_verdict(pr)} / {_verdict(cl)} |")
        out.append("")
    for sk in skipped or []:
        out += [f"Not run: {sk['part']} ({sk['reason']}).", ""]
    out.append(timings_table(timings))
    return "\n".join(out)


def _pairs(rows: list[dict], keys: tuple[str, ...]) -> dict:
    out: dict = {}
    for r in rows:
        k = tuple(r[x] for x in keys)
        pr, cl = out.get(k, ({}, {}))
        out[k] = (r, cl) if r["oracle"] == "protected" else (pr, r)
    return {k: v for k, v in out.items() if v[0]}


def plot_budget_curve(rows: list[dict], path: Path, tau0: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"random": "black", "entropy": "tab:blue", "kcenter": "tab:green", "dfal": "tab:red"}
    handles = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        c = colours.get(strategy)
        handles.append(Line2D([], [], color=c, marker="o", label=strategy))
        for oracle, style in (("protected", "-"), ("clean", "--")):
            pts = sorted((r["budget"], r["cta"], r["asr"]) for r in rows if r["strategy"] == strategy and r["oracle"] == oracle)
            if not pts:
                continue
            b = [x[0] for x in pts]
            axes[0].plot(b, [100 * x[1] for x in pts], style, marker="o", color=c, alpha=0.9 if oracle == "protected" else 0.6)
            axes[1].plot(b, [100 * x[2] for x in pts], style, marker="o", color=c, alpha=0.9 if oracle == "protected" else 0.6)
    axes[1].axhline(100 * tau0, color="grey", lw=1, ls=":")
    handles += [Line2D([], [], color="grey", ls="-", label="protected victim"),
                Line2D([], [], color="grey", ls="--", label="unprotected victim"),
                Line2D([], [], color="grey", ls=":", label=f"tau0 = {100 * tau0:.1f}%")]
    for ax, name in zip(axes, ("substitute CTA (%)", "ASR (%)")):
        ax.set_xlabel("query budget (images)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.arsenal", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, quick="a smoke run of every part on the quick reproduction's artefacts (made first with "
                              "`python -m bench.reproduce --quick` if missing)", resume=False)
    add_data_args(ap, victim=False)
    ap.add_argument("--from-reproduce", default=None, metavar="DIR",
                    help="bench.reproduce's output (default runs/reproduce; runs/reproduce-quick with --quick)")
    ap.add_argument("--reproduce-seed", type=int, default=0, help="which seed's protected bundle (default 0)")
    ap.add_argument("--protection", default="base", metavar="NAME",
                    help="which of the reproduction's protections: its seed<N>/protect-NAME/bundle (default base, the "
                         "reproduction's preset; e.g. robust for an --ablation in-distribution run)")
    ap.add_argument("--budgets", type=int, nargs="+", help="query budgets (default 5000 10000 20000; quick 500 1000 2000)")
    ap.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), help="default: all")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), help="API output modes (default: all)")
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--families", nargs="+", metavar="ARCH",
                    help="the families part's thieves (registry names; default vgg_small mobilenetv2_small convmixer)")
    ap.add_argument("--no-art", action="store_true", help="skip ART's attacks")
    ap.add_argument("--family-modes", nargs="+", choices=list(FAMILY_LABELS),
                    help="the families part's answers: probs (soft) and/or label (default both)")
    ap.add_argument("--thief-seed", type=int, default=0, metavar="N",
                    help="the thieves' seed: which pool images a random thief buys, its initialisation and batch order "
                         "(default 0; another seed measures a thief's variance; units are kept per seed)")
    args = ap.parse_args(argv)
    if args.from_reproduce is None:
        args.from_reproduce = str(default_out("reproduce", args.quick))
    return finish_common_args(args, NAME)


def ensure_reproduce(args) -> None:
    """The reproduction artefacts this benchmark reads; with --quick, make them if missing (in this process)."""
    src = Path(args.from_reproduce)
    need = [src / "victim" / "victim.safetensors",
            src / f"seed{args.reproduce_seed}" / f"protect-{args.protection}" / "bundle" / "manifest.json"]
    if all(p.exists() for p in need):
        return
    if not args.quick:
        raise SystemExit(f"{need[0] if not need[0].exists() else need[1]} not found: run `python -m bench.reproduce` "
                         f"first (or pass --from-reproduce DIR)")
    log(f"{src}: no quick reproduction yet, running `python -m bench.reproduce --quick` first (a few minutes)")
    argv = ["--quick", "--out", str(src), "--shared", args.shared, "--device", args.device, "--resume", "--no-progress"]
    if args.cifar_root:
        argv += ["--cifar-root", args.cifar_root]
    if args.tin_root:
        argv += ["--tin-root", args.tin_root]
    reproduce.main(argv)


def plan_from_args(args, proto) -> Plan:
    """The run's Plan: QUICK or FULL with the command line's choices."""
    plan = replace(QUICK if args.quick else FULL, seed=args.thief_seed)
    if args.budgets:
        plan = replace(plan, budgets=tuple(sorted({b // proto.budget_scale for b in args.budgets})))
    if args.strategies:
        plan = replace(plan, strategies=tuple(args.strategies))
    if args.modes:
        plan = replace(plan, modes=tuple(args.modes))
    if args.families:
        unknown = [f for f in args.families if f.lower() not in list_models()]
        if unknown:
            raise SystemExit(f"--families: unknown model(s) {', '.join(unknown)}; registry names: {', '.join(list_models())}")
        plan = replace(plan, families=tuple(f.lower() for f in args.families))
    if args.family_modes:
        plan = replace(plan, family_modes=tuple(args.family_modes))
    return plan


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads()
    proto = PROTOCOL_QUICK if args.quick else PROTOCOL_FULL
    plan = plan_from_args(args, proto)
    ensure_reproduce(args)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = load_data(args, proto)
    if max(plan.budgets) > len(data.pool) or min(plan.budgets) <= 0:
        raise SystemExit(f"budgets {plan.budgets} must lie in 1..{len(data.pool)} (the pool)")
    plan = replace(plan, mode_budget=min(plan.mode_budget, len(data.pool)), cm_budget=min(plan.cm_budget, len(data.pool)))
    t_data = time.time() - t0
    log(f"data: pool {len(data.pool)}, evaluation {len(data.eval_idx)}, verification {len(data.verif)}  [{t_data:.0f} s]")
    bench = Arsenal(args, plan, data, device)
    log(f"protected bundle {bench.source}/seed{args.reproduce_seed}/protect-{args.protection}/bundle: "
        f"tau0 {100 * bench.bundle.tau0:.2f}%")
    parts = [p for p in args.parts if not (p == "art" and args.no_art)]
    for part in parts:
        getattr(bench, f"run_{part}")()

    timings = stage_timings(bench.units.timings, {"data load": t_data})
    wall = time.time() - t0
    timings["total wall time"] = [wall, wall]
    title = (f"{'quick' if args.quick else 'full'} arsenal: {plan.arch} thief, {len(data.pool)}-image Tiny ImageNet pool, "
             f"CIFAR-10 ResNet-20 victim (HoneypotNet) vs unprotected")
    if bench.rows["strategies"]:
        plot_budget_curve(bench.rows["strategies"], out / "budget_curve.png", bench.bundle.tau0, title)
    results = {
        "benchmark": "bench.arsenal", "mode": "quick" if args.quick else "full",
        "command": command_line("bench.arsenal", argv),
        "from_reproduce": str(bench.source), "reproduce_seed": args.reproduce_seed, "plan": asdict(plan), "protocol": asdict(proto),
        "bundle": {"protection": args.protection, "tau0": bench.bundle.tau0, "target": bench.bundle.target, "config": bench.bundle.manifest.get("config")},
        "machine": machine_info(device),
        **bench.rows,
        "parts": parts, "skipped": bench.skipped,
        "timings": timings_json(timings),
        "units": bench.units.timings,
    }
    table = (f"Protected model: bench.reproduce's seed{args.reproduce_seed}/protect-{args.protection} bundle, "
             f"tau0 {100 * bench.bundle.tau0:.2f}%; thief seed {plan.seed}.\n\n" + format_tables(bench.rows, plan, bench.bundle.tau0, timings, bench.skipped)
             + "\n\n" + code_summary(bench.units.timings))
    written = save_report(out, "results", results, table, record=args.record, folder=NAME)
    log("")
    log(table)
    log(f"\nwrote {', '.join(map(str, written))}" + (f", {out / 'budget_curve.png'}" if bench.rows["strategies"] else ""))
    return results


if __name__ == "__main__":
    main()
