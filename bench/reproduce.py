"""Reproduce the paper's measurement (PAPER.md §5) on real data: CIFAR-10 victim, Tiny ImageNet queries.

    python bench/reproduce.py                       # full protocol: 3 seeds x 3 budgets x 2 substitutes
    python bench/reproduce.py --quick               # the same pipeline on 1/10 of the data (a few minutes)
    python bench/reproduce.py --ablation eps --resume   # one ablation, reusing the main run's units
    python bench/reproduce.py --resume              # after a kill: finished units are skipped

Protocol (same numbers as PAPER.md §5, so the figures compare):
  victim     pretrained ResNet-20 (../shared/weights/resnet-cifar10/resnet20-*.th), CTA 81.03% on
             cifar10-jpeg/test; `--finetune-victim N` fine-tunes it N epochs on cifar10-jpeg/train first.
  defender   shadow set = Tiny ImageNet val (10k, resized to 32 px); owner images for L_norm = a fixed
             random 10k of cifar10-jpeg/train; ProtectConfig.preset("spec") = §5's best (UAP eps 16/255,
             residual head hidden 256, lambda 3, T 8, CNN shadow warm-started 3 epochs/iteration, 2 trigger
             passes, 400 honeypot steps, lr 1e-3, batch 256, target 0) except shadow_norm_weight 0.2 (§5: 1;
             `--ablation shadow-norm-weight` has §5's row as "paper-snw1").
  null       clean substitutes of the unprotected victim ("cnn", "resnet20", 12 epochs) trained on the
             shadow set -> calibrate_tau0 on the calibration half of cifar10-jpeg/test; the suspects are
             verified on the other half (the halves never share an image; split per class, so both hold
             all ten classes: the first 500 test images of each class calibrate, the last 500 verify).
  thieves    Tiny ImageNet train (20k, resized to 32; disjoint from the shadow set) is the pool;
             random_extraction(ModelOracle(model), pool, budget, arch, FitConfig(epochs=12, seed)) for each
             budget and substitute arch, against the protected model and against the unprotected victim
             (the "clean" substitute: same budget, same seed). A label-only thief at the largest budget
             (first arch), against both.
  measured   substitute CTA, ASR (verify() on the verification half, target class excluded), unstamped
             target rate, verdict + p-value with the bundle's tau0, accuracy clean vs stamped; victim CTA
             before/after and fidelity; wall time of every stage (and of protect's four steps).

Every finished unit (victim, protection, reference models, calibration, each thief, each
verification) writes OUT/<unit>/unit.json (+ its models); `--resume` skips the units whose key (the
parameters they depend on) matches and continues partial ones (protect per outer iteration,
thieves per epoch). Without `--resume` each unit is recomputed from scratch.

Speed: the pool is answered once per model (victim, each protected model) and a thief's oracle looks
its images up in those answers (PoolOracle below); every thief still counts its own queries (one
image = one query, through the Oracle base class, output mode applied as usual).

Output: a markdown table on stdout, OUT/results.json (OUT/ablation-<name>.json for --ablation), the
trigger as OUT/trigger.png, the protected bundles (with the calibrated null) under OUT/seed<s>/.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import honeypotnet
from honeypotnet import honeypot as hp_module
from honeypotnet.attacks import query_oracle, random_extraction
from honeypotnet.bundle import load_bundle, load_model, save_bundle, save_model
from honeypotnet.data import DatasetError, load_dataset
from honeypotnet.data.files import unpack_archive_once
from honeypotnet.honeypot import ProtectConfig, protect
from honeypotnet.models import create_model
from honeypotnet.oracles import ModelOracle, Oracle, OutputMode
from honeypotnet.training import FitConfig, accuracy, default_device, fit, predict_logits
from honeypotnet.verify import calibrate_tau0, train_reference_models, verify

REPO = Path(__file__).resolve().parents[1]
DATA_SEED = 0  # the data subsets (shadow, owner, pool) are fixed; --seeds vary the training only


# ============================================================================ protocol


@dataclass
class Protocol:
    """Sizes and schedules. FULL = PAPER.md §5; QUICK = the same pipeline on 1/10 of the data."""

    shadow: int = 10_000  # Tiny ImageNet val images (shadow set)
    owner: int = 10_000  # cifar10-jpeg/train images (L_norm)
    pool: int = 20_000  # Tiny ImageNet train images (thief pool)
    calib_per_class: int = 500  # cifar10-jpeg/test: first k of each class calibrate tau0 ...
    verify_per_class: int = 500  # ... the last k of each class verify the suspects
    thief_epochs: int = 12
    reference_epochs: int = 12
    reference_archs: tuple[str, ...] = ("cnn", "resnet20")
    outer_iters: int = 8  # T
    shadow_epochs: int = 3
    trigger_passes: int = 2
    honeypot_steps: int = 400
    alpha: float = 1e-3
    budget_scale: int = 1  # --budgets are divided by this (quick: 10)


FULL = Protocol()
# Quick: T=4, not 2: the first honeypot fine-tuning (its trigger comes from a barely trained shadow)
# costs fidelity that later iterations win back; at T=2 the quick victim lost 14 points of CTA
# (fidelity 76%) and its thieves answered the target on 78% of clean images; at T=4 fidelity is 96%.
QUICK = Protocol(shadow=1000, owner=1000, pool=2000, calib_per_class=100, verify_per_class=100,
                 thief_epochs=4, reference_epochs=3, outer_iters=4, shadow_epochs=2, budget_scale=10)


def base_config(p: Protocol, seed: int) -> ProtectConfig:
    """The "spec" preset (= PAPER.md §5's best, except shadow_norm_weight 0.2 instead of 1; the ablation
    "shadow-norm-weight" has §5's row; the library default before issue 8 made it "robust"), every field
    spelt out (library defaults may change; the fields added later come from the preset, all off)."""
    return ProtectConfig.preset("spec", target=0, trigger="uap", eps=16 / 255, patch_size=6, head="residual",
                                hidden=256, lam=3.0, outer_iters=p.outer_iters, shadow_arch="cnn",
                                shadow_epochs=p.shadow_epochs, shadow_warm_start=True, shadow_lr=0.05, shadow_batch=128,
                                trigger_passes=p.trigger_passes, trigger_step=None, momentum=0.9, trigger_batch=256,
                                honeypot_steps=p.honeypot_steps, honeypot_lr=1e-3, honeypot_batch=256, l_norm="kl",
                                shadow_norm_weight=0.2, seed=seed)


# name -> [(variant label, ProtectConfig overrides)]; each variant is one protect + one thief.
ABLATIONS: dict[str, list[tuple[str, dict]]] = {
    "trigger-patch": [("patch8x8", {"trigger": "patch", "patch_size": 8})],
    "eps": [("eps8", {"eps": 8 / 255}), ("eps24", {"eps": 24 / 255})],
    "iters": [("T4", {"outer_iters": 4}), ("T16", {"outer_iters": 16})],
    "lambda": [("lam1", {"lam": 1.0}), ("lam3", {"lam": 3.0}), ("lam10", {"lam": 10.0})],
    "shadow-reinit": [("shadow-reinit", {"shadow_warm_start": False})],
    "head-linear": [("head-linear", {"head": "linear"})],
    "shadow-norm-weight": [("paper-snw1", {"shadow_norm_weight": 1.0}), ("snw0.5", {"shadow_norm_weight": 0.5})],
}

SUBSTITUTE_COLUMNS = ["seed", "protection", "oracle", "arch", "budget", "output", "epochs", "queries", "cta", "asr", "hits", "n",
                      "unstamped_rate", "tau0", "p_value", "alpha", "stolen", "verdict", "clean_accuracy",
                      "stamped_accuracy", "seconds"]
PROTECTION_COLUMNS = ["seed", "protection", "overrides", "config", "victim_cta", "protected_cta", "cta_delta",
                      "fidelity", "protected_model_asr", "tau0", "calibration", "history", "seconds", "step_seconds"]


# ============================================================================ small helpers


def log(msg: str) -> None:
    print(msg, flush=True)


def _key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def unpack_once(tarball: Path, top: str) -> Path:
    """Unpack a ../shared tarball once (the same place and key as the tests use, so tests and
    benchmarks share one copy and one decode cache)."""
    try:
        return unpack_archive_once(tarball, top)
    except DatasetError as e:
        raise SystemExit(str(e)) from e


def load_results(paths: list[str], benchmark: str, same: tuple[str, ...]) -> list[tuple[str, dict]]:
    """The result files `paths` of `benchmark` (its JSON "benchmark" field), for merging into one report:
    (path, results) each; exits with a message when one cannot be read, is another benchmark's, or
    differs from the first in mode or in one of the `same` protocol fields."""
    runs = []
    for path in paths:
        try:
            r = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--merge: cannot read {path}: {e}")
        if not isinstance(r, dict) or r.get("benchmark") != benchmark:
            raise SystemExit(f"--merge: {path} is not a {benchmark} result")
        first_path, first = runs[0] if runs else (path, r)
        bad = (["mode"] if r.get("mode") != first.get("mode") else []) + \
            [repr(k) for k in same if r["protocol"].get(k) != first["protocol"].get(k)]
        if bad:
            raise SystemExit(f"--merge: {path} and {first_path} differ in {', '.join(bad)}")
        runs.append((path, r))
    return runs


def machine_info(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "honeypotnet": honeypotnet.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "git_commit": commit}


@contextlib.contextmanager
def timed_functions(module, names: list[str], acc: dict[str, float]):
    """Wrap module-level functions so the time spent in each is added to `acc` (how protect's time splits)."""
    saved = {n: getattr(module, n) for n in names}

    def wrap(name, fn):
        def inner(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
        return inner

    for n, fn in saved.items():
        setattr(module, n, wrap(n, fn))
    try:
        yield acc
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


# ============================================================================ oracle over a pre-answered pool


class PoolOracle(Oracle):
    """An Oracle whose answers to the thief pool were computed once, by the very model behind it.

    `_answer` looks every queried image up by its bytes (images come in as uint8/255 floats, so the
    round trip is exact). The base class counts queries and applies the output mode, so a thief
    sees exactly what ModelOracle(model, output) would answer and pays one query per image."""

    def __init__(self, probs: torch.Tensor, pool: torch.Tensor, output: OutputMode | None = None) -> None:
        super().__init__(output)
        if len(probs) != len(pool):
            raise ValueError("one answer per pool image expected")
        self.probs = probs
        self.num_classes = probs.shape[1]
        self.index = {self._digest(img): i for i, img in enumerate(pool)}

    @staticmethod
    def _digest(img_u8: torch.Tensor) -> bytes:
        return hashlib.blake2b(img_u8.contiguous().numpy().tobytes(), digest_size=16).digest()

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        u8 = (x.detach().cpu() * 255).round().to(torch.uint8)
        try:
            idx = [self.index[self._digest(img)] for img in u8]
        except KeyError:
            raise KeyError("PoolOracle was queried with an image outside the pool it was built for") from None
        return self.probs[idx]


# ============================================================================ units (resumable steps)


class DeadlineReached(Exception):
    """A unit would start after Units.deadline (its rel is the message): the run stops there."""


class Units:
    """Each unit: OUT/<rel>/unit.json written last (atomically), keyed by its parameters.
    deadline: a time.time() after which no unit starts (finished ones are still resumed): run()
    raises DeadlineReached instead, so a run lent a machine for minutes can write what it has."""

    def __init__(self, out: Path, resume: bool) -> None:
        self.out, self.resume = out, resume
        self.deadline: float | None = None
        self.timings: list[dict] = []
        self.finished: dict[str, dict] = {}  # rel -> record, for units this process ran or resumed

    def run(self, rel: str, params: dict, fn, stage: str) -> dict:
        """Run (or resume) one unit. Two processes sharing OUT (e.g. two bench scripts at once) take
        turns on the same unit: the second waits for the first's lock and then reuses its result."""
        d = self.out / rel
        key = _key(params)
        if rel in self.finished and self.finished[rel]["key"] == key:  # already run (or resumed) by this process
            return dict(self.finished[rel])
        d.parent.mkdir(parents=True, exist_ok=True)
        with open(d.parent / f".{d.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._run_locked(rel, d, key, params, fn, stage)

    def _run_locked(self, rel: str, d: Path, key: str, params: dict, fn, stage: str) -> dict:
        done = d / "unit.json"
        if self.resume and done.exists():
            rec = json.loads(done.read_text())
            if rec.get("key") == key:
                rec["resumed"] = True
                self.finished[rel] = rec
                self.timings.append({"unit": rel, "stage": stage, "seconds": rec.get("seconds", 0.0), "resumed": True})
                return dict(rec)
        if self.deadline is not None and time.time() > self.deadline:  # before anything on disk is removed
            raise DeadlineReached(rel)
        if d.exists() and not (self.resume and (d / "unit.key").exists() and (d / "unit.key").read_text() == key
                               and not done.exists()):
            shutil.rmtree(d)  # recompute from scratch (a partial state of the same key is kept with --resume)
        d.mkdir(parents=True, exist_ok=True)
        (d / "unit.key").write_text(key)
        t = time.time()
        rec = fn(d)
        rec.update(key=key, seconds=round(time.time() - t, 2), params=params)
        _write_json(done, rec)
        rec["resumed"] = False
        self.finished[rel] = rec
        self.timings.append({"unit": rel, "stage": stage, "seconds": rec["seconds"], "resumed": False})
        return dict(rec)


# ============================================================================ data


@dataclass
class Data:
    test_images: torch.Tensor
    test_labels: torch.Tensor
    calib: torch.Tensor  # indices into test
    verif: torch.Tensor
    shadow: torch.Tensor
    owner: torch.Tensor
    pool: torch.Tensor
    classes: list[str]
    train_images: torch.Tensor | None = None  # for --finetune-victim
    train_labels: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    @property
    def eval_idx(self) -> torch.Tensor:
        return torch.cat([self.calib, self.verif]).sort().values


def _subset(n_total: int, n: int, salt: int) -> torch.Tensor:
    if n > n_total:
        raise SystemExit(f"asked for {n} images of a set of {n_total}")
    g = torch.Generator().manual_seed(DATA_SEED * 1000 + salt)
    return torch.randperm(n_total, generator=g)[:n].sort().values


def resolve_roots(args) -> tuple[Path, Path]:
    shared = Path(args.shared)
    cifar = Path(args.cifar_root) if args.cifar_root else None
    tin = Path(args.tin_root) if args.tin_root else None
    if cifar is None:
        tb = shared / "data" / "cifar10-jpeg.tar.gz"
        if not tb.is_file():
            raise SystemExit(f"{tb} not found: pass --shared DIR or --cifar-root DIR (unpacked cifar10-jpeg)")
        cifar = unpack_once(tb, "cifar10-jpeg")
    if tin is None:
        tb = shared / "data" / "tiny-imagenet-200-subset.tar.gz"
        if not tb.is_file():
            raise SystemExit(f"{tb} not found: pass --shared DIR or --tin-root DIR (unpacked tiny-imagenet-200)")
        tin = unpack_once(tb, "tiny-imagenet-200")
    return cifar, tin


def split_per_class(labels: torch.Tensor, classes: int, n_calib: int, n_verif: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-set indices: the first n_calib of each class calibrate tau0, the last n_verif verify
    (file order = the original test_batch order per class; ImageFolder order is by class, so "the
    first 5,000" would be five classes only)."""
    calib, verif = [], []
    for c in range(classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < n_calib + n_verif:
            raise SystemExit(f"class {c} has {len(idx)} test images, need {n_calib + n_verif}")
        calib.append(idx[:n_calib])
        verif.append(idx[len(idx) - n_verif:])
    return torch.cat(calib), torch.cat(verif)


def load_data(args, p: Protocol) -> Data:
    cifar_root, tin_root = resolve_roots(args)
    test = load_dataset("imagefolder", cifar_root, "test")
    train = load_dataset("imagefolder", cifar_root, "train")
    shadow_all = load_dataset("tinyimagenet", tin_root, "val", size=32)
    pool_all = load_dataset("tinyimagenet", tin_root, "train", size=32)
    calib, verif = split_per_class(test.labels, len(test.classes), p.calib_per_class, p.verify_per_class)
    owner_idx = _subset(len(train), p.owner, 1)
    data = Data(test.images, test.labels, calib, verif,
                shadow_all.images[_subset(len(shadow_all), p.shadow, 2)].contiguous(),
                train.images[owner_idx].contiguous(),
                pool_all.images[_subset(len(pool_all), p.pool, 3)].contiguous(), list(test.classes))
    if args.finetune_victim:
        data.train_images, data.train_labels = train.images, train.labels
    data.info = {"cifar_root": str(cifar_root), "tin_root": str(tin_root), "test": len(test), "train": len(train),
                 "tin_val": len(shadow_all), "tin_train": len(pool_all), "calibration_images": len(data.calib),
                 "verification_images": len(data.verif), "shadow": len(data.shadow), "owner": len(data.owner),
                 "pool": len(data.pool),
                 "split": f"per class: first {p.calib_per_class} test images calibrate tau0, last "
                          f"{p.verify_per_class} verify (disjoint); subsets drawn with data seed {DATA_SEED}"}
    return data


# ============================================================================ the benchmark


class Reproduction:
    def __init__(self, args, p: Protocol, data: Data, device: torch.device) -> None:
        self.args, self.p, self.data, self.device = args, p, data, device
        self.units = Units(Path(args.out), args.resume)
        self.progress = args.progress
        self.victim_path = Path(args.victim_weights) if args.victim_weights else _find_victim(Path(args.shared))
        self.eval_images = data.test_images[data.eval_idx]
        self.eval_labels = data.test_labels[data.eval_idx]
        self.protections: list[dict] = []
        self.substitutes: list[dict] = []
        self.step_seconds: dict[str, tuple[float, float]] = {}  # protect's steps: (this run, incl. resumed)
        self._victim = None
        self._refs: dict[int, list] = {}
        self._refs_key: dict[int, str] = {}
        self._answers: dict[str, torch.Tensor] = {}
        self._prot_rows: dict[str, dict] = {}

    # ------------------------------------------------------------------ victim
    def victim(self):
        if self._victim is not None:
            return self._victim
        n_ft = self.args.finetune_victim
        params = {"weights": self.victim_path.name, "finetune_epochs": n_ft, "eval": len(self.eval_labels)}

        def run(d: Path) -> dict:
            model = create_model("resnet20", 10, pretrained=str(self.victim_path))
            before = accuracy(model, self.eval_images, self.eval_labels)
            if n_ft:
                fit(model, self.data.train_images, self.data.train_labels, FitConfig(epochs=n_ft, lr=0.01, seed=0),
                    progress=self.progress, desc="finetune victim", device=self.device)
                model.cpu()
            save_model(model, d / "victim.safetensors", "resnet20", 10, self.data.classes, source=self.victim_path.name,
                       finetune_epochs=n_ft)
            return {"cta_pretrained": before, "cta": accuracy(model, self.eval_images, self.eval_labels)}

        self.victim_rec = self.units.run("victim", params, run, "victim")
        self._victim, _ = load_model(Path(self.args.out) / "victim" / "victim.safetensors")
        self._victim.to(self.device)
        log(f"victim ResNet-20: CTA {100 * self.victim_rec['cta']:.2f}% on {len(self.eval_labels)} test images"
            + (f" (pretrained {100 * self.victim_rec['cta_pretrained']:.2f}%, fine-tuned {n_ft} epochs)" if n_ft else ""))
        return self._victim

    def victim_key(self) -> str:
        self.victim()
        return self.victim_rec["key"]

    def pool_answers(self, rel: str, model, parent_key: str) -> torch.Tensor:
        """The model's probabilities for every pool image (computed once, cached in its unit)."""
        if rel in self._answers:
            return self._answers[rel]

        def run(d: Path) -> dict:
            answers = query_oracle(ModelOracle(model), self.data.pool, batch_size=500, progress=self.progress)
            torch.save(answers, d / "answers.pt")
            return {"n": len(answers)}

        self.units.run(rel, {"model": parent_key, "pool": len(self.data.pool)}, run, "pool answers")
        self._answers[rel] = torch.load(Path(self.args.out) / rel / "answers.pt", weights_only=True)
        return self._answers[rel]

    # ------------------------------------------------------------------ reference models (the verification null)
    def references(self, seed: int) -> list:
        if seed in self._refs:
            return self._refs[seed]
        archs = list(self.p.reference_archs)
        params = {"victim": self.victim_key(), "archs": archs, "epochs": self.p.reference_epochs, "seed": seed,
                  "shadow": len(self.data.shadow)}

        def run(d: Path) -> dict:
            cfg = FitConfig(epochs=self.p.reference_epochs, seed=100 + seed)
            refs = train_reference_models(self.victim(), self.data.shadow, archs, 10, cfg, progress=self.progress,
                                          device=self.device)
            for arch, m in refs:
                save_model(m, d / f"{arch}.safetensors", arch, 10, self.data.classes)
            return {"archs": archs, "cta": {a: accuracy(m, self.eval_images, self.eval_labels) for a, m in refs}}

        rec = self.units.run(f"seed{seed}/references", params, run, "references")
        d = Path(self.args.out) / f"seed{seed}/references"
        self._refs[seed] = [(a, load_model(d / f"{a}.safetensors")[0].to(self.device)) for a in archs]
        self._refs_key[seed] = rec["key"]
        return self._refs[seed]

    # ------------------------------------------------------------------ protection (+ calibration)
    def protection(self, seed: int, name: str, overrides: dict) -> dict:
        cfg = replace(base_config(self.p, seed), **overrides)
        if cfg == base_config(self.p, seed):
            name, overrides = "base", {}
        rel = f"seed{seed}/protect-{name}"
        data = self.data
        params = {"victim": self.victim_key(), "config": cfg.key_dict(), "shadow": len(data.shadow), "owner": len(data.owner)}
        steps: dict[str, float] = {}

        def run(d: Path) -> dict:
            work = d / "work"
            self._seed_checkpoint(seed, cfg, work)
            names = ["simulate_extraction", "generate_trigger", "compute_features", "finetune_honeypot", "_iteration_stats"]
            with timed_functions(hp_module, names, steps):
                res = protect(self.victim(), data.shadow, data.owner, cfg, checkpoint_dir=work, progress=self.progress,
                              device=self.device)
            save_bundle(d / "bundle", res.model, res.trigger, arch="resnet20", target=cfg.target, classes=data.classes,
                        config=asdict(cfg), verification=None, history=res.history, overwrite=True,
                        extra={"benchmark": "bench/reproduce.py", "protection": name})
            vp = predict_logits(self.victim(), self.eval_images).argmax(1)
            pp = predict_logits(res.model.to(self.device), self.eval_images).argmax(1)
            v_cta = float((vp == self.eval_labels).float().mean())
            p_cta = float((pp == self.eval_labels).float().mean())
            own = verify(res.model, res.trigger, data.test_images[data.verif], data.test_labels[data.verif], cfg.target,
                         0.5, self.p.alpha)
            return {"victim_cta": v_cta, "protected_cta": p_cta, "cta_delta": p_cta - v_cta,
                    "fidelity": float((vp == pp).float().mean()), "protected_model_asr": own.asr,
                    "history": res.history, "audits": res.audits, "attempts": res.attempts,
                    "step_seconds": {k: round(v, 2) for k, v in steps.items()},
                    "trigger": res.trigger.describe()}

        if rel in self._prot_rows:  # e.g. the lambda ablation's lam3 is the base configuration
            return self._prot_rows[rel]
        rec = self.units.run(rel, params, run, "protect")
        for k, v in rec.get("step_seconds", {}).items():
            now, total = self.step_seconds.get(k, (0.0, 0.0))
            self.step_seconds[k] = (now + (0.0 if rec["resumed"] else v), total + v)
        refs = self.references(seed)

        def calibrate(d: Path) -> dict:
            b = load_bundle(Path(self.args.out) / rel / "bundle")
            cal = calibrate_tau0(refs, b.trigger, data.test_images[data.calib], data.test_labels[data.calib], b.target)
            ver = {"tau0": cal.tau0, "rule": cal.rule, "reference": cal.reference,
                   "images": f"cifar10-jpeg/test calibration half ({len(data.calib)} images, target class excluded)"}
            save_bundle(Path(self.args.out) / rel / "bundle", b.model, b.trigger, arch="resnet20", target=b.target,
                        classes=data.classes, config=b.manifest["config"], verification=ver,
                        history=b.manifest["history"], overwrite=True,
                        extra={"benchmark": "bench/reproduce.py", "protection": name})
            return {"tau0": cal.tau0, "calibration": asdict(cal)}

        cal = self.units.run(f"{rel}/calibration", {"protection": rec["key"], "references": self._refs_key[seed]},
                             calibrate, "calibration")
        bundle = load_bundle(Path(self.args.out) / rel / "bundle")
        row = {"seed": seed, "protection": name, "overrides": {k: _jsonable(v) for k, v in overrides.items()},
               "config": asdict(cfg), **{k: rec[k] for k in ("victim_cta", "protected_cta", "cta_delta", "fidelity",
                                                             "protected_model_asr", "history", "step_seconds")},
               "audits": rec.get("audits", []), "attempts": rec.get("attempts", []),
               "tau0": cal["tau0"], "calibration": cal["calibration"], "seconds": rec["seconds"],
               "key": rec["key"] + cal["key"], "rel": rel, "bundle": bundle}
        log(f"[seed {seed}] protect {name}: CTA {100 * row['victim_cta']:.2f} -> {100 * row['protected_cta']:.2f} "
            f"(fidelity {100 * row['fidelity']:.2f}%), protected model ASR {100 * row['protected_model_asr']:.1f}%, "
            f"tau0 {100 * row['tau0']:.2f}%  [{rec['seconds']:.0f} s{', resumed' if rec['resumed'] else ''}]")
        self.protections.append(row)
        self._prot_rows[rel] = row
        return row

    def _seed_checkpoint(self, seed: int, cfg: ProtectConfig, work: Path) -> None:
        """Start a protect run from a sibling's checkpoint of the same configuration at fewer outer
        iterations (the iters ablation extends T=8 to T=16 instead of redoing the first 8)."""
        if (work / "protect_state.pt").exists():
            return  # its own partial run (--resume) continues
        best = None
        for ck in (Path(self.args.out) / f"seed{seed}").glob("protect-*/work/protect_state.pt"):
            try:
                state = torch.load(ck, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - a broken sibling checkpoint is just not used
                continue
            it = int(state.get("iteration", 0))
            if str(state.get("config_hash", "")).split(":")[0] == cfg.hash() and it <= cfg.outer_iters \
                    and "audits" not in state:  # an audited run's checkpoint is its own
                if best is None or it > best[0]:
                    best = (it, ck)
        if best:
            work.mkdir(parents=True, exist_ok=True)
            shutil.copy2(best[1], work / "protect_state.pt")
            log(f"[seed {seed}] protect: starting from {best[1].parent.parent.name}'s checkpoint at T={best[0]}")

    # ------------------------------------------------------------------ thieves
    def thief(self, seed: int, oracle: str, arch: str, budget: int, mode: str, prot: dict | None,
              epochs: int | None = None, thief_seed: int | None = None) -> dict:
        """One extraction: oracle "protected" (prot's bundle) or "clean" (the unprotected victim);
        `epochs` other than the protocol's thief_epochs is a unit of its own (its name ends -e<epochs>),
        and so is a `thief_seed` other than the run's seed (-t<thief_seed>: the thief's initialisation,
        batch order and, below the pool's size, query subset, against the same protection)."""
        epochs = epochs or self.p.thief_epochs
        suffix = "" if epochs == self.p.thief_epochs else f"-e{epochs}"
        if thief_seed is not None and thief_seed != seed:
            suffix += f"-t{thief_seed}"
        tseed = seed if thief_seed is None else thief_seed
        if oracle == "protected":
            model, model_key, answers_rel = prot["bundle"].model.to(self.device), prot["key"], f"{prot['rel']}/pool-answers"
            rel = f"seed{seed}/thief-{prot['protection']}-{arch}-{budget}-{mode}{suffix}"
        else:
            model, model_key, answers_rel = self.victim(), self.victim_key(), "victim/pool-answers"
            rel = f"seed{seed}/thief-clean-{arch}-{budget}-{mode}{suffix}"
        probs = self.pool_answers(answers_rel, model, model_key)
        fitc = FitConfig(epochs=epochs, seed=tseed)
        params = {"model": model_key, "arch": arch, "budget": budget, "mode": mode, "fit": asdict(fitc), "seed": tseed,
                  "pool": len(self.data.pool)}

        def run(d: Path) -> dict:
            orc = PoolOracle(probs, self.data.pool, OutputMode(mode))
            res = random_extraction(orc, self.data.pool, budget, arch, 10, fitc, seed=tseed, progress=self.progress,
                                    work_dir=d / "work", device=self.device)
            # a resumed extraction (its answers cached in work/) pays here only the queries still missing
            if len(res.answers) != budget or orc.queries > budget:
                raise RuntimeError(f"thief has {len(res.answers)} answers ({orc.queries} queries in this run) "
                                   f"for a budget of {budget}")
            save_model(res.substitute, d / "substitute.safetensors", arch, 10, self.data.classes, oracle=oracle,
                       budget=budget, output=mode)
            shutil.rmtree(d / "work", ignore_errors=True)
            return {"queries": len(res.answers), "queries_this_run": res.queries,
                    "cta": accuracy(res.substitute, self.eval_images, self.eval_labels)}

        rec = self.units.run(rel, params, run, f"thief ({oracle}{', label-only' if mode == 'label' else ''})")
        rec["rel"] = rel
        return rec

    def evaluate(self, seed: int, thief: dict, oracle: str, arch: str, budget: int, mode: str, prot: dict) -> dict:
        """verify() of a substitute against a protection's trigger and calibrated tau0 (a unit of its own)."""
        data = self.data

        def run(d: Path) -> dict:
            sub, _ = load_model(Path(self.args.out) / thief["rel"] / "substitute.safetensors")
            b = prot["bundle"]
            return verify(sub.to(self.device), b.trigger, data.test_images[data.verif], data.test_labels[data.verif],
                          b.target, b.tau0, self.p.alpha).to_dict()

        v = self.units.run(f"{thief['rel']}/verify-{prot['protection']}", {"thief": thief["key"], "protection": prot["key"]},
                           run, "verification")
        v = {k: v[k] for k in ("n", "hits", "asr", "unstamped_rate", "tau0", "p_value", "alpha", "stolen", "verdict",
                               "clean_accuracy", "stamped_accuracy")}
        row = {"seed": seed, "protection": prot["protection"], "oracle": oracle, "arch": arch, "budget": budget,
               "output": mode, "epochs": thief["params"]["fit"]["epochs"], "queries": thief["queries"], "cta": thief["cta"],
               **v, "seconds": thief["seconds"]}
        log(f"[seed {seed}] {prot['protection']:>12} {oracle:>9} {arch:>8} {budget:>6} {mode:>5}: CTA {100 * row['cta']:.2f}%  "
            f"ASR {100 * row['asr']:.2f}%  unstamped {100 * row['unstamped_rate']:.2f}%  p {row['p_value']:.3g}  "
            f"{row['verdict']}  [{thief['seconds']:.0f} s{', resumed' if thief.get('resumed') else ''}]")
        self.substitutes.append(row)
        return row

    def pair(self, seed: int, prot: dict, arch: str, budget: int, mode: str, oracles=("protected", "clean"),
             epochs: int | None = None) -> None:
        """The protected thief and the clean thief with the same budget, seed and epochs (default the
        protocol's thief_epochs), both verified (`oracles`: only some of them)."""
        for oracle in oracles:
            t = self.thief(seed, oracle, arch, budget, mode, prot, epochs)
            self.evaluate(seed, t, oracle, arch, budget, mode, prot)

    # ------------------------------------------------------------------ plans
    def run_main(self, seeds, budgets, archs, full_grid_seeds=None) -> None:
        """Every seed: each substitute arch at each budget, plus a label-only thief. With
        full_grid_seeds, the other seeds run the first arch at the largest budget only (and the label-only thief)."""
        for seed in seeds:
            prot = self.protection(seed, "base", {})
            full = full_grid_seeds is None or seed in full_grid_seeds
            for arch in archs if full else archs[:1]:
                for budget in budgets if full else [max(budgets)]:
                    self.pair(seed, prot, arch, budget, "probs")
            self.pair(seed, prot, archs[0], max(budgets), "label")

    def run_ablation(self, name: str, seeds, budgets, archs) -> None:
        for seed in seeds:
            done = set()
            for label, overrides in [("base", {}), *ABLATIONS[name]]:
                prot = self.protection(seed, label, overrides)
                if prot["rel"] not in done:  # a variant equal to the base configuration is one row
                    done.add(prot["rel"])
                    self.pair(seed, prot, archs[0], max(budgets), "probs")


def _find_victim(shared: Path) -> Path:
    found = sorted((shared / "weights" / "resnet-cifar10").glob("resnet20-*.th"))
    if not found:
        raise SystemExit(f"no resnet20-*.th under {shared / 'weights' / 'resnet-cifar10'}: pass --shared or --victim-weights")
    return found[0]


def _jsonable(v):
    return v if isinstance(v, (int, str, bool)) else round(v, 6) if isinstance(v, float) else str(v)


# ============================================================================ tables


def _pct(xs: list[float]) -> str:
    xs = [100 * x for x in xs if x is not None]
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def format_tables(protections: list[dict], substitutes: list[dict], timings: dict) -> str:
    out = []
    out.append("| protection | victim CTA → protected (Δ) | fidelity | protected model ASR | tau0 | protect s | seeds |")
    out.append("| --- | --- | --- | --- | --- | --- | --- |")
    names = list(dict.fromkeys(p["protection"] for p in protections))
    for n in names:
        ps = [p for p in protections if p["protection"] == n]
        d = [p["cta_delta"] for p in ps]
        out.append(f"| {n} | {_pct([p['victim_cta'] for p in ps])} → {_pct([p['protected_cta'] for p in ps])} "
                   f"({'+' if statistics.mean(d) >= 0 else '−'}{abs(100 * statistics.mean(d)):.2f}) | "
                   f"{_pct([p['fidelity'] for p in ps])} | {_pct([p['protected_model_asr'] for p in ps])} | "
                   f"{_pct([p['tau0'] for p in ps])} | {statistics.mean(p['seconds'] for p in ps):.0f} | {len(ps)} |")
    out.append("")
    out.append("| protection | thief | budget | output | thief CTA (clean) | ASR (clean) | unstamped (clean) "
               "| acc. clean → stamped | flagged: stolen / clean | p (stolen) | tau0 | seeds |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    groups = list(dict.fromkeys((s["protection"], s["arch"], s["budget"], s["output"]) for s in substitutes))
    for g in groups:
        st = [s for s in substitutes if (s["protection"], s["arch"], s["budget"], s["output"]) == g and s["oracle"] == "protected"]
        cl = [s for s in substitutes if (s["protection"], s["arch"], s["budget"], s["output"]) == g and s["oracle"] == "clean"]
        pv = max(s["p_value"] for s in st) if st else None
        out.append(f"| {g[0]} | {g[1]} | {g[2]} | {'label-only' if g[3] == 'label' else 'soft'} | "
                   f"{_pct([s['cta'] for s in st])} ({_pct([s['cta'] for s in cl])}) | "
                   f"{_pct([s['asr'] for s in st])} ({_pct([s['asr'] for s in cl])}) | "
                   f"{_pct([s['unstamped_rate'] for s in st])} ({_pct([s['unstamped_rate'] for s in cl])}) | "
                   f"{_pct([s['clean_accuracy'] for s in st])} → {_pct([s['stamped_accuracy'] for s in st])} | "
                   f"{sum(s['stolen'] for s in st)}/{len(st)} / {sum(s['stolen'] for s in cl)}/{len(cl)} | "
                   f"{'—' if pv is None else f'{pv:.2g}'} | {_pct([s['tau0'] for s in st])} | {len(st)} |")
    out.append("")
    out.append("Percentages: mean ± sd over seeds. (clean) = the same thief (budget, seed) trained on the unprotected "
               "victim's answers. p (stolen) = the largest p-value over seeds. Flagged = H0: ASR ≤ tau0 rejected.")
    out.append("")
    out.append("| stage | seconds (this run) | seconds (incl. resumed units) |")
    out.append("| --- | --- | --- |")
    for stage, (now, total) in timings.items():
        out.append(f"| {stage} | {now:.0f} | {total:.0f} |")
    return "\n".join(out)


# ============================================================================ main


def add_data_args(ap: argparse.ArgumentParser, victim: bool = True) -> None:
    """Where the real data (and the victim's weights) come from: the options every bench script shares."""
    ap.add_argument("--shared", default=os.environ.get("HONEYPOTNET_SHARED", str(REPO.parent / "shared")),
                    help="the shared folder with data/*.tar.gz and weights/ (default ../shared)")
    ap.add_argument("--cifar-root", help="an unpacked cifar10-jpeg directory ({train,test}/<class>/*.jpg)")
    ap.add_argument("--tin-root", help="an unpacked tiny-imagenet-200 directory")
    if victim:
        ap.add_argument("--victim-weights", help="resnet20 checkpoint (default SHARED/weights/resnet-cifar10/resnet20-*.th)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (and README) for the protocol.")
    add_data_args(ap)
    ap.add_argument("--out", help="output directory (default runs/reproduce, runs/reproduce-quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="1/10 of the data, T=4, fewer epochs, one seed, substitute cnn")
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (quick and ablations: 0)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[5000, 10000, 20000],
                    help="query budgets (quick: divided by 10)")
    ap.add_argument("--substitutes", nargs="+", help="substitute archs (default cnn resnet20; quick: cnn)")
    ap.add_argument("--full-grid-seeds", type=int, nargs="+", metavar="SEED",
                    help="run every budget x substitute for these seeds only; the other seeds run the first "
                         "substitute at the largest budget (and the label-only thief). Default: every seed")
    ap.add_argument("--device", default=str(default_device()), help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--ablation", choices=sorted(ABLATIONS), help="run one ablation (base + variants, one thief each)")
    ap.add_argument("--finetune-victim", type=int, default=0, metavar="N",
                    help="fine-tune the victim N epochs on cifar10-jpeg/train first (default 0 = PAPER's setting)")
    ap.add_argument("--resume", action="store_true", help="skip finished units, continue partial ones")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                    help="progress bars (default: when stderr is a terminal)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = str(REPO / "runs" / ("reproduce-quick" if args.quick else "reproduce"))
    if args.seeds is None:
        args.seeds = [0] if (args.quick or args.ablation) else [0, 1, 2]
    if args.substitutes is None:
        args.substitutes = ["cnn"] if args.quick else ["cnn", "resnet20"]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    p = QUICK if args.quick else FULL
    budgets = sorted({b // p.budget_scale for b in args.budgets})
    if min(budgets) <= 0 or max(budgets) > p.pool:
        raise SystemExit(f"budgets {budgets} must lie in 1..{p.pool} (the pool)")
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    t = time.time()
    data = load_data(args, p)
    t_data = time.time() - t
    log(f"data: {json.dumps({k: v for k, v in data.info.items() if not k.endswith('root')})}  [{t_data:.0f} s]")

    rep = Reproduction(args, p, data, device)
    rep.victim()
    if args.ablation:
        rep.run_ablation(args.ablation, args.seeds, budgets, args.substitutes)
    else:
        rep.run_main(args.seeds, budgets, args.substitutes, args.full_grid_seeds)

    # trigger picture(s)
    first = rep.protections[0]
    shutil.copy2(out / first["rel"] / "bundle" / "trigger.png", out / "trigger.png")
    if args.ablation:
        for pr in rep.protections:
            shutil.copy2(out / pr["rel"] / "bundle" / "trigger.png", out / f"trigger-{pr['protection']}.png")

    # where time goes
    timings: dict[str, list[float]] = {"data load": [t_data, t_data]}
    for u in rep.units.timings:
        now, total = timings.setdefault(u["stage"], [0.0, 0.0])
        timings[u["stage"]] = [now + (0.0 if u["resumed"] else u["seconds"]), total + u["seconds"]]
    for k, v in rep.step_seconds.items():
        timings[f"  protect: {k}"] = list(v)
    wall = time.time() - t0
    timings["total wall time"] = [wall, wall]

    protections = [{k: v for k, v in pr.items() if k in PROTECTION_COLUMNS} for pr in rep.protections]
    results = {
        "benchmark": "bench/reproduce.py", "mode": "quick" if args.quick else "full", "ablation": args.ablation,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "protocol": {**asdict(p), "budgets": budgets, "seeds": args.seeds, "full_grid_seeds": args.full_grid_seeds, "substitutes": args.substitutes,
                     "finetune_victim": args.finetune_victim, "victim_weights": rep.victim_path.name,
                     "thief_fit": asdict(FitConfig(epochs=p.thief_epochs, seed=0)) | {"seed": "= run seed"},
                     "reference_fit": asdict(FitConfig(epochs=p.reference_epochs, seed=0)) | {"seed": "= 100 + run seed"},
                     "base_config": asdict(base_config(p, 0)) | {"seed": "= run seed"},
                     "ablation_variants": {k: [(n, {a: _jsonable(b) for a, b in o.items()}) for n, o in v]
                                           for k, v in ABLATIONS.items()},
                     "data": data.info},
        "machine": machine_info(device),
        "victim": {k: rep.victim_rec[k] for k in ("cta", "cta_pretrained")} | {"eval_images": len(rep.eval_labels)},
        "protections": protections,
        "substitutes": rep.substitutes,
        "substitute_columns": SUBSTITUTE_COLUMNS,
        "timings": {k: {"this_run": round(a, 1), "including_resumed": round(b, 1)} for k, (a, b) in timings.items()},
        "units": rep.units.timings,
    }
    name = f"ablation-{args.ablation}.json" if args.ablation else "results.json"
    _write_json(out / name, results)
    table = format_tables(protections, rep.substitutes, {k: tuple(v) for k, v in timings.items()})
    (out / (name.replace(".json", ".md"))).write_text(table + "\n")
    log("")
    log(table)
    log(f"\nwrote {out / name}, {out / 'trigger.png'}")
    return results


if __name__ == "__main__":
    main()
