"""The paper's measurement on real data (docs/method.md, docs/research/reproduction.md) as a pipeline of
resumable units, shared by bench.reproduce, bench.robustness, bench.spread, bench.compare_defences and
bench.arsenal:

  victim      the pretrained CIFAR-10 ResNet-20 (optionally fine-tuned N epochs on cifar10-jpeg/train)
  references  clean substitutes of the unprotected victim ("cnn", "resnet20") trained on the shadow
              set: the verification null, one set per seed shared by every protection
  protection  protect() with a configuration (base_config + overrides), its bundle, and tau0
              calibrated over the references on the calibration half of the test split
  pool        each model's answers to the thief pool, computed once (PoolOracle looks them up)
  thieves     random_extraction at a budget / arch / output mode, against a protection or the victim
  verify      verify() of a thief's copy with a protection's trigger and tau0 (verification half)

Every unit writes OUT/<unit>/unit.json (+ its models) and is skipped by a later run with the same key
when resumed (units.Units).
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from honeypotnet.attacks import query_oracle, random_extraction
from honeypotnet.bundle import load_bundle, load_model, save_bundle, save_model
from honeypotnet.config import ProtectConfig
from honeypotnet.metrics import benign_costs
from honeypotnet.models import create_model
from honeypotnet.oracles import ModelOracle, OutputMode
from honeypotnet.protect import ProtectEvent, protect
from honeypotnet.state import STATE_FILE, run_key
from honeypotnet.training import FitConfig, accuracy, fit, predict_logits
from honeypotnet.verify import calibrate_tau0, train_reference_models, verify

from .common import jsonable, log, set_threads
from .data import Data
from .oracle import PoolOracle
from .units import Units


def open_reproduction(args) -> tuple["Protocol", Path]:
    """The start of a study that reads a finished bench.reproduce run: torch's threads set (set_threads), then
    the run's protocol (QUICK with --quick, else FULL) and its directory (--reproduce-out)."""
    set_threads()
    return (QUICK if args.quick else FULL), Path(args.reproduce_out)


def protection_bundle(out: Path, seed: int, protection: str) -> Path:
    """Where a reproduction in `out` keeps protection `protection`'s bundle of seed `seed`."""
    return Path(out) / f"seed{seed}" / f"protect-{protection}" / "bundle"


def load_references(out: Path, seed: int, archs) -> list:
    """The seed's saved reference models of a reproduction in `out`: (arch, model in eval mode) per arch, from
    OUT/seed<seed>/references/<arch>.safetensors (where Reproduction.references writes them)."""
    d = Path(out) / f"seed{seed}" / "references"
    return [(a, load_model(d / f"{a}.safetensors")[0].eval()) for a in archs]


@dataclass
class Protocol:
    """Sizes and schedules. FULL = the paper's protocol; QUICK = the same pipeline on 1/10 of the data."""

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
# The reference models train as long as the thieves (FULL: 12 and 12). With 3 reference epochs against
# 4 thief epochs the references answered the quick trigger 0.3-0.6%, tau0 sat at its 5% floor and clean
# 2,000-query copies (9-12%) were flagged; at 4 epochs tau0 is 15.3% and none is (the stolen copies'
# p-values stay 0). On another machine (other floating-point results) the same 4 epochs gave references
# at 1-2%, tau0 8.4% and a clean label-only copy at 11.7% flagged: the references see the 1,000-image
# shadow set, the thieves 2,000 queries, so at 4 epochs each the references get half the thieves' steps.
# 8 reference epochs give them the thieves' number of steps.
QUICK = Protocol(shadow=1000, owner=1000, pool=2000, calib_per_class=100, verify_per_class=100,
                 thief_epochs=4, reference_epochs=8, outer_iters=4, shadow_epochs=2, budget_scale=10)


def base_config(p: Protocol, seed: int) -> ProtectConfig:
    """The "spec" preset (the paper's best, except the clean term's shadow-set weight 0.2 instead of 1;
    bench.reproduce's ablation "shadow-norm-weight" has the paper's row) at the protocol's schedule.
    The fields the protocol measures are spelt out, so a change of the preset file shows here; the
    robustness study's options (negative shadows, the simulated thief's fine-tuning, trigger blur)
    come from the preset, all off."""
    return ProtectConfig.preset("spec", target=0, trigger="uap", eps=16 / 255, patch_size=6, head="residual",
                                hidden=256, lam=3.0, outer_iters=p.outer_iters, shadow_arch="cnn",
                                shadow_epochs=p.shadow_epochs, shadow_warm_start=True, shadow_lr=0.05, shadow_batch=128,
                                trigger_passes=p.trigger_passes, trigger_step=0.0, momentum=0.9, trigger_batch=256,
                                honeypot_steps=p.honeypot_steps, honeypot_lr=1e-3, honeypot_batch=256, l_norm="kl",
                                shadow_norm_weight=0.2, seed=seed)


def preset_overrides(name: str) -> dict:
    """The fields where preset `name` differs from "spec": base_config(...).override(preset_overrides("robust"))
    is the robust preset (the library default) at the protocol's schedule."""
    other, spec = ProtectConfig.preset(name), ProtectConfig.preset("spec")
    return {f.name: getattr(other, f.name) for f in fields(other) if getattr(other, f.name) != getattr(spec, f.name)}


SUBSTITUTE_COLUMNS = ["seed", "protection", "oracle", "arch", "budget", "output", "pool", "epochs", "queries", "cta", "asr", "hits", "n",
                      "unstamped_rate", "tau0", "p_value", "alpha", "stolen", "verdict", "clean_accuracy",
                      "stamped_accuracy", "seconds"]
PROTECTION_COLUMNS = ["seed", "protection", "overrides", "config", "victim_cta", "protected_cta", "cta_delta",
                      "fidelity", "benign", "protected_model_asr", "tau0", "calibration", "history", "seconds",
                      "step_seconds"]


class Reproduction:
    """The protocol's units in `out` (Units(out, resume)); protections, substitutes and step_seconds
    collect what this process ran or resumed."""

    def __init__(self, out: str | Path, p: Protocol, data: Data, device: torch.device, *, victim_path: Path,
                 resume: bool = True, progress: bool = False, finetune_victim: int = 0) -> None:
        self.out, self.p, self.data, self.device = Path(out), p, data, device
        self.units = Units(self.out, resume)
        self.progress = progress
        self.victim_path = Path(victim_path)
        self.finetune_victim = finetune_victim
        if finetune_victim and data.train_images is None:
            raise ValueError("finetune_victim needs load_data(..., keep_train=True)")
        self.eval_images = data.test_images[data.eval_idx]
        self.eval_labels = data.test_labels[data.eval_idx]
        self.protections: list[dict] = []
        self.substitutes: list[dict] = []
        self.step_seconds: dict[str, tuple[float, float]] = {}  # protect's steps: (this run, incl. resumed)
        self.victim_rec: dict | None = None
        self._victim = None
        self._victim_eval_logits: torch.Tensor | None = None
        self._refs: dict[int, list] = {}
        self._refs_key: dict[int, str] = {}
        self._answers: dict[str, torch.Tensor] = {}
        self._prot_rows: dict[str, dict] = {}

    # ------------------------------------------------------------------ victim
    def victim_eval_logits(self) -> torch.Tensor:
        """The victim's logits on the evaluation images (computed once: every protection compares with them)."""
        if self._victim_eval_logits is None:
            self._victim_eval_logits = predict_logits(self.victim(), self.eval_images)
        return self._victim_eval_logits

    def victim(self):
        if self._victim is not None:
            return self._victim
        n_ft = self.finetune_victim
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
        self._victim, _ = load_model(self.out / "victim" / "victim.safetensors")
        self._victim.to(self.device)
        log(f"victim ResNet-20: CTA {100 * self.victim_rec['cta']:.2f}% on {len(self.eval_labels)} test images"
            + (f" (pretrained {100 * self.victim_rec['cta_pretrained']:.2f}%, fine-tuned {n_ft} epochs)" if n_ft else ""))
        return self._victim

    def victim_key(self) -> str:
        self.victim()
        return self.victim_rec["key"]

    def pool_answers(self, rel: str, model, parent_key: str, pool: str = "tin") -> torch.Tensor:
        """The model's probabilities for every image of the named pool (computed once, cached in its unit)."""
        if rel in self._answers:
            return self._answers[rel]
        images = self.data.pool_images(pool)

        def run(d: Path) -> dict:
            answers = query_oracle(ModelOracle(model), images, batch_size=500, progress=self.progress)
            torch.save(answers, d / "answers.pt")
            return {"n": len(answers)}

        params = {"model": parent_key, "pool": len(images)} | ({} if pool == "tin" else {"pool_set": pool})
        self.units.run(rel, params, run, "pool answers")
        self._answers[rel] = torch.load(self.out / rel / "answers.pt", weights_only=True)
        return self._answers[rel]

    # ------------------------------------------------------------------ reference models (the verification null)
    def references(self, seed: int) -> list:
        """The seed's clean reference models, one per protocol.reference_archs (a unit shared by every
        protection of the seed). calibrate_tau0 runs per protection (its trigger), on these models."""
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
        self._refs[seed] = [(a, m.to(self.device)) for a, m in load_references(self.out, seed, archs)]
        self._refs_key[seed] = rec["key"]
        return self._refs[seed]

    def references_key(self, seed: int) -> str:
        self.references(seed)
        return self._refs_key[seed]

    # ------------------------------------------------------------------ protection (+ calibration)
    def config(self, seed: int, overrides: dict) -> ProtectConfig:
        return base_config(self.p, seed).override(overrides) if overrides else base_config(self.p, seed)

    def protection(self, seed: int, name: str, overrides: dict) -> dict:
        """protect() with base_config + overrides (a unit: OUT/seed<seed>/protect-<name>, keyed on the
        whole configuration), then tau0 over the seed's references (a unit of its own)."""
        cfg = self.config(seed, overrides)
        if cfg == base_config(self.p, seed):
            name, overrides = "base", {}
        rel = f"seed{seed}/protect-{name}"
        if rel in self._prot_rows:  # e.g. the lambda ablation's lam3 is the base configuration
            return self._prot_rows[rel]
        data = self.data
        # keyed on the config's identity: an option added later, left at its old behaviour, keeps earlier units valid
        params = {"victim": self.victim_key(), "config": cfg.identity(), "shadow": len(data.shadow), "owner": len(data.owner)}

        def run(d: Path) -> dict:
            work = d / "work"
            self._seed_checkpoint(seed, cfg, work)
            steps: dict[str, float] = {}

            def on_iteration(event: ProtectEvent) -> None:  # wall time of protect's steps, from protect itself
                for k, v in event.seconds.items():
                    steps[k] = steps.get(k, 0.0) + v

            res = protect(self.victim(), data.shadow, data.owner, cfg, checkpoint_dir=work, progress=self.progress,
                          device=self.device, callback=on_iteration, cache_dir=self.out / "negatives-cache")
            save_bundle(d / "bundle", res.model, res.trigger, arch="resnet20", target=cfg.target, classes=data.classes,
                        config=cfg.to_dict(), verification=None, history=res.history, overwrite=True,
                        extra={"benchmark": "bench.reproduce", "protection": name})
            vp = self.victim_eval_logits().argmax(1)
            pp = predict_logits(res.model.to(self.device), self.eval_images).argmax(1)
            v_cta = float((vp == self.eval_labels).float().mean())
            p_cta = float((pp == self.eval_labels).float().mean())
            own = verify(res.model, res.trigger, data.test_images[data.verif], data.test_labels[data.verif], cfg.target,
                         0.5, self.p.alpha)
            return {"victim_cta": v_cta, "protected_cta": p_cta, "cta_delta": p_cta - v_cta,
                    "fidelity": float((vp == pp).float().mean()), "protected_model_asr": own.asr,
                    "history": res.history, "step_seconds": {k: round(v, 2) for k, v in steps.items()},
                    "trigger": res.trigger.describe()}

        rec = self.units.run(rel, params, run, "protect")
        for k, v in rec.get("step_seconds", {}).items():
            now, total = self.step_seconds.get(k, (0.0, 0.0))
            self.step_seconds[k] = (now + (0.0 if rec["resumed"] else v), total + v)
        refs = self.references(seed)

        def calibrate(d: Path) -> dict:
            b = load_bundle(self.out / rel / "bundle")
            cal = calibrate_tau0(refs, b.trigger, data.test_images[data.calib], data.test_labels[data.calib], b.target)
            ver = {"tau0": cal.tau0, "rule": cal.rule, "reference": cal.reference,
                   "images": f"cifar10-jpeg/test calibration half ({len(data.calib)} images, target class excluded)"}
            save_bundle(self.out / rel / "bundle", b.model, b.trigger, arch="resnet20", target=b.target,
                        classes=data.classes, config=b.manifest["config"], verification=ver,
                        history=b.manifest["history"], overwrite=True,
                        extra={"benchmark": "bench.reproduce", "protection": name})
            return {"tau0": cal.tau0, "calibration": asdict(cal)}

        cal = self.units.run(f"{rel}/calibration", {"protection": rec["key"], "references": self._refs_key[seed]},
                             calibrate, "calibration")
        bundle = load_bundle(self.out / rel / "bundle")
        # what honest users pay, on the evaluation images: KL(victim || protected) and both models' ECE
        benign = benign_costs(self.victim_eval_logits(),
                              predict_logits(bundle.model.to(self.device), self.eval_images), self.eval_labels)
        row = {"seed": seed, "protection": name, "overrides": {k: jsonable(v) for k, v in overrides.items()},
               "benign": benign,
               "config": cfg.to_dict(), **{k: rec[k] for k in ("victim_cta", "protected_cta", "cta_delta", "fidelity",
                                                               "protected_model_asr", "history", "step_seconds")},
               "tau0": cal["tau0"], "calibration": cal["calibration"], "seconds": rec["seconds"],
               "key": rec["key"] + cal["key"], "rel": rel, "bundle": bundle}
        log(f"[seed {seed}] protect {name}: CTA {100 * row['victim_cta']:.2f} -> {100 * row['protected_cta']:.2f} "
            f"(fidelity {100 * row['fidelity']:.2f}%), protected model ASR {100 * row['protected_model_asr']:.1f}%, "
            f"tau0 {100 * row['tau0']:.2f}%  [{rec['seconds']:.0f} s{', resumed' if rec['resumed'] else ''}]")
        self.protections.append(row)
        self._prot_rows[rel] = row
        return row

    def _seed_checkpoint(self, seed: int, cfg: ProtectConfig, work: Path) -> None:
        """Start a protect run from a sibling's checkpoint of the same run at fewer outer iterations
        (same configuration but loop.outer_iters, same victim and images: the checkpoint's run key;
        the iters ablation extends T=8 to T=16 instead of redoing the first 8)."""
        if (work / STATE_FILE).exists():
            return  # its own partial run (--resume) continues
        key = run_key(cfg, self.victim(), self.data.shadow, self.data.owner)
        best = None
        for ck in (self.out / f"seed{seed}").glob(f"protect-*/work/{STATE_FILE}"):
            try:
                state = torch.load(ck, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - a broken sibling checkpoint is just not used
                continue
            it = int(state.get("iteration", 0)) if isinstance(state, dict) else 0
            if isinstance(state, dict) and state.get("run_key") == key and 0 < it <= cfg.outer_iters:
                if best is None or it > best[0]:
                    best = (it, ck)
        if best:
            work.mkdir(parents=True, exist_ok=True)
            shutil.copy2(best[1], work / STATE_FILE)
            log(f"[seed {seed}] protect: starting from {best[1].parent.parent.name}'s checkpoint at T={best[0]}")

    # ------------------------------------------------------------------ thieves
    def thief(self, seed: int, oracle: str, arch: str, budget: int, mode: str, prot: dict | None,
              epochs: int | None = None, thief_seed: int | None = None, pool: str = "tin") -> dict:
        """One extraction: oracle "protected" (prot's bundle) or "clean" (the unprotected victim);
        `epochs` other than the protocol's thief_epochs is a unit of its own (its name ends -e<epochs>),
        and so is a `thief_seed` other than the run's seed (-t<thief_seed>: the thief's initialisation,
        batch order and, below the pool's size, query subset, against the same protection), and a
        `pool` other than Tiny ImageNet (-<pool>: data.POOLS, e.g. "cifar", in-distribution images)."""
        epochs = epochs or self.p.thief_epochs
        suffix = "" if epochs == self.p.thief_epochs else f"-e{epochs}"
        if thief_seed is not None and thief_seed != seed:
            suffix += f"-t{thief_seed}"
        if pool != "tin":
            suffix += f"-{pool}"
        answers_name = "pool-answers" if pool == "tin" else f"pool-answers-{pool}"
        tseed = seed if thief_seed is None else thief_seed
        if oracle == "protected":
            model, model_key, answers_rel = prot["bundle"].model.to(self.device), prot["key"], f"{prot['rel']}/{answers_name}"
            rel = f"seed{seed}/thief-{prot['protection']}-{arch}-{budget}-{mode}{suffix}"
        else:
            model, model_key, answers_rel = self.victim(), self.victim_key(), f"victim/{answers_name}"
            rel = f"seed{seed}/thief-clean-{arch}-{budget}-{mode}{suffix}"
        probs = self.pool_answers(answers_rel, model, model_key, pool)
        images = self.data.pool_images(pool)
        fitc = FitConfig(epochs=epochs, seed=tseed)
        params = {"model": model_key, "arch": arch, "budget": budget, "mode": mode, "fit": asdict(fitc), "seed": tseed,
                  "pool": len(images)} | ({} if pool == "tin" else {"pool_set": pool})

        def run(d: Path) -> dict:
            orc = PoolOracle(probs, images, OutputMode(mode))
            res = random_extraction(orc, images, budget, arch, 10, fitc, seed=tseed, progress=self.progress,
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

        rec = self.units.run(rel, params, run, f"thief ({oracle}{', label-only' if mode == 'label' else ''}"
                                               f"{'' if pool == 'tin' else ', ' + pool + ' pool'})")
        rec["rel"] = rel
        rec["pool_set"] = pool
        return rec

    def evaluate(self, seed: int, thief: dict, oracle: str, arch: str, budget: int, mode: str, prot: dict) -> dict:
        """verify() of a substitute against a protection's trigger and calibrated tau0 (a unit of its own)."""
        data = self.data

        def run(d: Path) -> dict:
            sub, _ = load_model(self.out / thief["rel"] / "substitute.safetensors")
            b = prot["bundle"]
            return verify(sub.to(self.device), b.trigger, data.test_images[data.verif], data.test_labels[data.verif],
                          b.target, b.tau0, self.p.alpha).to_dict()

        v = self.units.run(f"{thief['rel']}/verify-{prot['protection']}", {"thief": thief["key"], "protection": prot["key"]},
                           run, "verification")
        v = {k: v[k] for k in ("n", "hits", "asr", "unstamped_rate", "tau0", "p_value", "alpha", "stolen", "verdict",
                               "clean_accuracy", "stamped_accuracy")}
        row = {"seed": seed, "protection": prot["protection"], "oracle": oracle, "arch": arch, "budget": budget,
               "output": mode, "pool": thief.get("pool_set", "tin"), "epochs": thief["params"]["fit"]["epochs"], "queries": thief["queries"], "cta": thief["cta"],
               **v, "seconds": thief["seconds"]}
        log(f"[seed {seed}] {prot['protection']:>12} {oracle:>9} {arch:>8} {budget:>6} {mode:>5} {row['pool']:>5}: CTA {100 * row['cta']:.2f}%  "
            f"ASR {100 * row['asr']:.2f}%  unstamped {100 * row['unstamped_rate']:.2f}%  p {row['p_value']:.3g}  "
            f"{row['verdict']}  [{thief['seconds']:.0f} s{', resumed' if thief.get('resumed') else ''}]")
        self.substitutes.append(row)
        return row

    def pair(self, seed: int, prot: dict, arch: str, budget: int, mode: str, oracles=("protected", "clean"),
             epochs: int | None = None, pool: str = "tin") -> None:
        """The protected thief and the clean thief with the same budget, seed, epochs (default the
        protocol's thief_epochs) and pool, both verified (`oracles`: only some of them)."""
        for oracle in oracles:
            t = self.thief(seed, oracle, arch, budget, mode, prot, epochs, pool=pool)
            self.evaluate(seed, t, oracle, arch, budget, mode, prot)
