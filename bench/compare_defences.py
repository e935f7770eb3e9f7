"""HoneypotNet side by side with the extraction defences users would pick instead (docs/defences.md).

    python -m bench.compare_defences                      # full protocol, budget 20000, substitute cnn
    python -m bench.compare_defences --resume             # after a kill: finished units are skipped
    python -m bench.compare_defences --quick              # a tiny version of everything (a test runs it)
    python -m bench.compare_defences --settings none hp mad1.0 --thieves probs

Protocol: bench.reproduce's (CIFAR-10 victim = the pretrained ResNet-20, Tiny ImageNet thief
pool, same data split, same thief: KnockoffNets random queries, FitConfig(epochs=12, seed)). The
victim, the HoneypotNet protection of seed 0 (bundle + calibrated tau0), the reference models and
the pool answers are taken from bench.reproduce's output (`--from-reproduce`, default
runs/reproduce): their finished units are copied into OUT/reproduce and reused when their keys
match; whatever is missing or different is computed there by the same pipeline (the
source directory is never modified).

Each defence setting (SETTINGS below; several per defence, plus HoneypotNet alone and composed
with top-k / rounding) is measured four ways:
  victim CTA      accuracy of the *defended* API's top-1 on the CIFAR-10 test images of
                  bench.reproduce's evaluation set, as a benign user sees it (+ fidelity to the
                  undefended model's labels, mean L1 change of the answers)
  latency         seconds per query of the defended API, batches of 1 and of 256 test images, over
                  the time of the undefended victim measured in the same run (ratio; medians)
  substitute CTA  a probability thief (soft answers) and a label-only thief (the API returns the
                  top-1 of the defended answer), each `--budgets` queries per `--substitutes` arch,
                  trained on the defended answers; accuracy on the same evaluation set
  ownership       HoneypotNet rows: verify() with the bundle's trigger and calibrated tau0 on the
                  verification half; DAWN rows: dawn_verify() on the watermarks DAWN served to that
                  thief (null 1/(K-1); the reference models' agreement is reported as a check);
                  other rows: n/a. HoneypotNet's test is also run on every substitute (JSON:
                  honeypot_check) to show it flags none of the other defences' thieves.

Cost: the victim's and the protected model's probabilities on the pool are computed once
(bench.reproduce's pool-answers units); a thief's oracle is DefendedOracle(PoolOracle(probs), defences),
so a defence costs only its post-processing (MAD: one forward pass of its surrogate; Adaptive
Misinformation: one of its misinformation model). Thieves whose answers are identical (e.g. the
label-only thief of every argmax-preserving defence) share one substitute (keyed by the answers'
hash). Every unit (answers, substitute, evaluation, benign CTA) is resumable (`--resume`).

Output: a markdown table on stdout and in OUT/compare-defences.md, OUT/compare-defences.json, and
OUT/compare-defences.png (substitute CTA vs victim CTA, one point per defence setting and thief).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from honeypotnet.attacks import query_oracle, train_substitute
from honeypotnet.bundle import load_model, save_model
from honeypotnet.defences import DAWN, DefendedOracle, dawn_verify, make_defence, train_misinformation_model
from honeypotnet.models import create_model
from honeypotnet.oracles import ModelOracle, OutputMode
from honeypotnet.ops import to_float
from honeypotnet.training import FitConfig, accuracy
from honeypotnet.verify import verify

from .benchlib.args import add_common_args, add_data_args, default_out, finish_common_args
from .benchlib.common import (command_line, log, machine_info, save_report, set_threads, stage_timings,
                              timings_json)
from .benchlib.data import find_victim, load_data, owner_labels
from .benchlib.oracle import PoolOracle
from .benchlib.protocol import FULL, QUICK, Reproduction
from .benchlib.units import Units

NAME = "compare-defences"


# ============================================================================ settings


@dataclass(frozen=True)
class Setting:
    """One row group: `model` ("victim" or "protected" = HoneypotNet) behind `defences` (registry
    names and parameters, applied in order; MAD's surrogate, AM's misinformation model and DAWN's
    key are supplied by the benchmark)."""

    id: str
    label: str
    family: str
    model: str = "victim"
    defences: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()

    def spec(self) -> list:
        return [[n, dict(p)] for n, p in self.defences]


def S(id: str, label: str, family: str, *defs, model: str = "victim") -> Setting:
    return Setting(id, label, family, model, tuple((n, tuple(sorted(p.items()))) for n, p in defs))


SETTINGS: list[Setting] = [
    S("none", "no defence", "none"),
    S("top1", "top-1 label only", "label", ("label", {})),
    S("top3", "top-3", "topk", ("topk", {"k": 3})),
    S("round2", "rounding 2 dec.", "rounding", ("rounding", {"decimals": 2})),
    S("round1", "rounding 1 dec.", "rounding", ("rounding", {"decimals": 1})),
    S("noise0.05", "Gaussian noise σ=0.05", "gaussian", ("gaussian", {"sigma": 0.05})),
    S("noise0.2", "Gaussian noise σ=0.2", "gaussian", ("gaussian", {"sigma": 0.2})),
    S("rs0.3", "reverse sigmoid β=0.3 γ=0.2", "reverse_sigmoid", ("reverse_sigmoid", {"beta": 0.3, "gamma": 0.2})),
    S("rs1.0", "reverse sigmoid β=1 γ=0.2", "reverse_sigmoid", ("reverse_sigmoid", {"beta": 1.0, "gamma": 0.2})),
    S("mad0.1", "MAD ε=0.1", "mad", ("mad", {"epsilon": 0.1})),
    S("mad0.5", "MAD ε=0.5", "mad", ("mad", {"epsilon": 0.5})),
    S("mad1.0", "MAD ε=1", "mad", ("mad", {"epsilon": 1.0})),
    S("madarg1.0", "MAD-argmax ε=1", "mad_argmax", ("mad_argmax", {"epsilon": 1.0})),
    S("madarg2.0", "MAD-argmax ε=2", "mad_argmax", ("mad_argmax", {"epsilon": 2.0})),
    S("am0.5", "Adaptive Misinformation τ=0.5", "adaptive_misinformation", ("adaptive_misinformation", {"tau": 0.5})),
    S("am0.8", "Adaptive Misinformation τ=0.8", "adaptive_misinformation", ("adaptive_misinformation", {"tau": 0.8})),
    S("dawn0.01", "DAWN r=1%", "dawn", ("dawn", {"rate": 0.01})),
    S("dawn0.05", "DAWN r=5%", "dawn", ("dawn", {"rate": 0.05})),
    S("hp", "HoneypotNet", "honeypot", model="protected"),
    S("hp+top1", "HoneypotNet + top-1", "honeypot", ("label", {}), model="protected"),
    S("hp+top3", "HoneypotNet + top-3", "honeypot", ("topk", {"k": 3}), model="protected"),
    S("hp+round2", "HoneypotNet + rounding 2", "honeypot", ("rounding", {"decimals": 2}), model="protected"),
]
BY_ID = {s.id: s for s in SETTINGS}
QUICK_SETTINGS = ["none", "top1", "top3", "round2", "noise0.2", "rs0.3", "mad1.0", "madarg1.0", "am0.5", "dawn0.05",
                  "hp", "hp+top1", "hp+round2"]

# --quick: bench.reproduce's pipeline at a tiny size (its own protection; a smoke test of the whole
# benchmark, not a measurement)
TINY = replace(QUICK, shadow=500, owner=500, pool=1000, calib_per_class=50, verify_per_class=50, thief_epochs=2,
               reference_epochs=1, outer_iters=1, shadow_epochs=1, trigger_passes=1, honeypot_steps=50, budget_scale=20)

NU = 1000.0  # Adaptive Misinformation's sharpness (the paper's value)
MAD_SURROGATE = "cnn"  # MAD's stand-in for the thief's model: a randomly initialised thief architecture


def _h(*parts) -> str:
    m = hashlib.sha256()
    for p in parts:
        m.update(p.numpy().tobytes() if isinstance(p, torch.Tensor) else json.dumps(p, sort_keys=True, default=str).encode())
        m.update(b"|")
    return m.hexdigest()[:16]


# ============================================================================ the benchmark


class Comparison:
    def __init__(self, args, p, data, device) -> None:
        self.args, self.p, self.data, self.device, self.seed = args, p, data, device, args.seed
        self.out = Path(args.out)
        self.units = Units(self.out, args.resume)
        # the reproduction's pipeline, in OUT/reproduce (always resumed: these are inputs, not measurements)
        self.rep = Reproduction(self.out / "reproduce", p, data, device, victim_path=find_victim(args), resume=True,
                                progress=args.progress)
        self.eval_images, self.eval_labels = self.rep.eval_images, self.rep.eval_labels
        self.rows: list[dict] = []
        self.benign: dict[str, dict] = {}
        self.latency: dict[str, dict] = {}
        self._mis = None
        self._mis_key = None
        self._eval_probs: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ inputs
    def setup(self) -> None:
        rep = self.rep
        self.victim = rep.victim()
        self.victim_key = rep.victim_key()
        self.prot = rep.protection(self.seed, "base", {})
        self.bundle = self.prot["bundle"]
        self.protected = self.bundle.model.to(self.device).eval()
        self.refs = rep.references(self.seed)
        self.pool_probs = {
            "victim": rep.pool_answers("victim/pool-answers", self.victim, self.victim_key),
            "protected": rep.pool_answers(f"{self.prot['rel']}/pool-answers", self.protected, self.prot["key"]),
        }
        self.model_keys = {"victim": self.victim_key, "protected": self.prot["key"]}
        self.models = {"victim": self.victim, "protected": self.protected}

    def surrogate(self):
        with torch.random.fork_rng(devices=[]):  # the same random initialisation every time, global RNG untouched
            torch.manual_seed(1000 + self.seed)
            return create_model(MAD_SURROGATE, 10).to(self.device).eval()

    def misinformation(self):
        if self._mis is not None:
            return self._mis
        data, seed = self.data, self.seed
        cfg = FitConfig(epochs=self.p.thief_epochs, lr=0.2, seed=seed)
        params = {"arch": "cnn", "fit": asdict(cfg), "owner": len(data.owner), "owner_labels": "cifar10-jpeg/train"}

        def run(d: Path) -> dict:
            labels = owner_labels(data, self.p)
            model = train_misinformation_model("cnn", 10, data.owner, labels, cfg, progress=self.args.progress,
                                               device=self.device)
            save_model(model, d / "misinformation.safetensors", "cnn", 10, data.classes)
            return {"accuracy": accuracy(model, self.eval_images, self.eval_labels)}

        rec = self.units.run(f"seed{seed}/misinformation", params, run, "misinformation model")
        self._mis = load_model(self.out / f"seed{seed}/misinformation/misinformation.safetensors")[0].to(self.device).eval()
        self._mis_key = rec["key"]
        log(f"misinformation model: accuracy {100 * rec['accuracy']:.2f}% on the evaluation images (it avoids the true class)")
        return self._mis

    def dawn_key(self) -> str:
        return f"compare-defences owner key, seed {self.seed}"  # the owner's secret (fixed: results reproduce)

    def build(self, s: Setting) -> list:
        """The Defence objects of a setting (fresh instances: DAWN records what it serves)."""
        out = []
        for name, params in s.defences:
            kw = dict(params)
            if name in ("mad", "mad_argmax"):
                kw["surrogate"] = self.surrogate()
            elif name == "adaptive_misinformation":
                kw.update(nu=NU, misinformation_model=self.misinformation())
            elif name == "dawn":
                kw["key"] = self.dawn_key()
            elif name == "gaussian":
                kw["seed"] = self.seed
            out.append(make_defence(name, **kw))
        return out

    def setting_key(self, s: Setting) -> dict:
        extra = {}
        names = {n for n, _ in s.defences}
        if names & {"mad", "mad_argmax"}:
            extra["surrogate"] = [MAD_SURROGATE, 1000 + self.seed]
        if "adaptive_misinformation" in names:
            self.misinformation()
            extra["misinformation"], extra["nu"] = self._mis_key, NU
        if "dawn" in names:
            extra["dawn_key"] = self.dawn_key()
        if "gaussian" in names:
            extra["noise_seed"] = self.seed
        return {"model": self.model_keys[s.model], "defences": s.spec(), **extra}

    # ------------------------------------------------------------------ benign users
    def eval_probs(self, model: str) -> torch.Tensor:
        """The model's probabilities on the evaluation images (computed once per model)."""
        if model not in self._eval_probs:
            self._eval_probs[model] = query_oracle(ModelOracle(self.models[model]), self.eval_images, batch_size=500)
        return self._eval_probs[model]

    def benign_cta(self, s: Setting) -> dict:
        def run(d: Path) -> dict:
            # what DefendedOracle(ModelOracle(model), defences) answers, from the model's answers computed once
            api = DefendedOracle(PoolOracle(self.eval_probs(s.model), self.eval_images), self.build(s))
            ans = query_oracle(api, self.eval_images, batch_size=500)
            ref = self.eval_probs("victim")
            return {"victim_cta": float((ans.argmax(1) == self.eval_labels).float().mean()),
                    "fidelity": float((ans.argmax(1) == ref.argmax(1)).float().mean()),
                    "answer_l1": float((ans - ref).abs().sum(1).mean()), "n": len(ans)}

        rec = self.units.run(f"seed{self.seed}/benign/{s.id}", {**self.setting_key(s), "eval": len(self.eval_labels)},
                             run, "benign CTA")
        self.benign[s.id] = rec
        return rec

    # ------------------------------------------------------------------ latency (never resumed: one run, one baseline)
    def measure_latency(self, settings: list[Setting], repeats: int) -> None:
        g = torch.Generator().manual_seed(7)
        imgs = self.eval_images[torch.randperm(len(self.eval_images), generator=g)[:256]]
        x1, x256 = [to_float(imgs[i : i + 1]) for i in range(min(repeats, 256))], to_float(imgs)

        def timing(api) -> tuple[float, float]:
            api(x256[:8])  # warm-up
            t1 = []
            for x in x1:
                t = time.perf_counter()
                api(x)
                t1.append(time.perf_counter() - t)
            t256 = []
            for _ in range(max(1, repeats // 10)):
                t = time.perf_counter()
                api(x256)
                t256.append((time.perf_counter() - t) / 256)
            return statistics.median(t1), statistics.median(t256)

        base = timing(ModelOracle(self.victim))
        self.latency["_baseline"] = {"s_per_query_1": base[0], "s_per_query_256": base[1]}
        for s in settings:
            t = timing(DefendedOracle(ModelOracle(self.models[s.model]), self.build(s)))
            self.latency[s.id] = {"s_per_query_1": t[0], "s_per_query_256": t[1], "ratio_1": t[0] / base[0],
                                  "ratio_256": t[1] / base[1]}
        log(f"latency (undefended victim): {1e3 * base[0]:.2f} ms/query at batch 1, {1e3 * base[1]:.3f} ms/query at batch 256")

    # ------------------------------------------------------------------ thieves
    def answers(self, s: Setting, mode: str, budget: int) -> dict:
        """The defended API's answers to the thief's `budget` queries (and DAWN's watermarks)."""
        pool, seed = self.data.pool, self.seed
        rel = f"seed{seed}/answers/{s.id}-{mode}-{budget}"
        params = {**self.setting_key(s), "mode": mode, "budget": budget, "seed": seed, "pool": len(pool)}

        def run(d: Path) -> dict:
            # the same draw as attacks.random_extraction(seed=seed): budget random pool images
            idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:budget]
            defences = self.build(s)
            api = DefendedOracle(PoolOracle(self.pool_probs[s.model], pool), defences, output=OutputMode(mode))
            ans = query_oracle(api, pool[idx], batch_size=256, progress=self.args.progress)
            if api.queries != budget or len(ans) != budget:
                raise RuntimeError(f"the thief paid {api.queries} queries for a budget of {budget}")
            torch.save({"idx": idx, "answers": ans}, d / "answers.pt")
            rec = {"queries": api.queries, "hash": _h(idx, ans), "one_hot": bool(((ans == 0) | (ans == 1)).all()
                                                                                 and (ans.sum(1) == 1).all())}
            dawn = [x for x in defences if isinstance(x, DAWN)]
            if dawn:
                st = dawn[0].state()
                torch.save({"images": st["images"], "labels": st["labels"]}, d / "watermarks.pt")
                rec.update(watermarks=len(st["labels"]), watermark_hash=_h(st["images"], st["labels"]))
            return rec

        rec = self.units.run(rel, params, run, "answers")
        rec["rel"] = rel
        return rec

    def substitute(self, ans: dict, arch: str, budget: int) -> dict:
        fitc = FitConfig(epochs=self.p.thief_epochs, seed=self.seed)
        rel = f"seed{self.seed}/substitutes/{arch}-{budget}-{ans['hash']}"
        params = {"answers": ans["hash"], "arch": arch, "budget": budget, "fit": asdict(fitc)}

        def run(d: Path) -> dict:
            st = torch.load(self.out / ans["rel"] / "answers.pt", weights_only=True)
            sub = train_substitute(arch, 10, self.data.pool[st["idx"]], st["answers"], fitc, progress=self.args.progress,
                                   checkpoint=d / "substitute_ckpt.pt", device=self.device)
            save_model(sub, d / "substitute.safetensors", arch, 10, self.data.classes, budget=budget)
            (d / "substitute_ckpt.pt").unlink(missing_ok=True)
            return {"cta": accuracy(sub, self.eval_images, self.eval_labels)}

        rec = self.units.run(rel, params, run, "thief")
        rec["rel"] = rel
        return rec

    def evaluate(self, s: Setting, ans: dict, sub: dict) -> dict:
        data, b = self.data, self.bundle
        has_dawn = "watermarks" in ans

        def run(d: Path) -> dict:
            model = load_model(self.out / sub["rel"] / "substitute.safetensors")[0].to(self.device)
            rec = {"honeypot_check": verify(model, b.trigger, data.test_images[data.verif], data.test_labels[data.verif],
                                            b.target, b.tau0, self.p.alpha).to_dict()}
            if has_dawn:
                wm = torch.load(self.out / ans["rel"] / "watermarks.pt", weights_only=True)
                if len(wm["labels"]):
                    rec["dawn"] = dawn_verify(model, wm["images"], wm["labels"], alpha=self.p.alpha).to_dict()
                    rec["dawn_references"] = {a: dawn_verify(m, wm["images"], wm["labels"], alpha=self.p.alpha).to_dict()
                                              for a, m in self.refs}
                else:
                    rec["dawn"] = None
            return rec

        # one evaluation per substitute (and watermark set): rows that share a substitute share it
        wm = ans.get("watermark_hash")
        key = {"substitute": sub["key"], "protection": self.prot["key"], "watermarks": wm}
        return self.units.run(f"{sub['rel']}/evaluation{'-dawn-' + wm if wm else ''}", key, run, "ownership tests")

    def run_setting(self, s: Setting, thieves: list[str], archs: list[str], budgets: list[int]) -> None:
        ben = self.benign_cta(s)
        for mode in thieves:
            for budget in budgets:
                ans = self.answers(s, mode, budget)
                for arch in archs:
                    sub = self.substitute(ans, arch, budget)
                    ev = self.evaluate(s, ans, sub)
                    hpv = ev["honeypot_check"]
                    if s.model == "protected":
                        own = {"test": "honeypot", "p_value": hpv["p_value"], "paired_p_value": hpv.get("paired_p_value"),
                               "stolen": hpv["stolen"],
                               "verdict": hpv["verdict"], "statistic": hpv["asr"], "null": hpv["tau0"]}
                    elif "watermarks" in ans:
                        dv = ev.get("dawn")
                        own = ({"test": "dawn", "p_value": dv["p_value"], "stolen": dv["stolen"], "verdict": dv["verdict"],
                                "statistic": dv["agreement_rate"], "null": dv["null_rate"]} if dv else
                               {"test": "dawn", "p_value": None, "stolen": False, "verdict": "no watermark served",
                                "statistic": None, "null": None})
                    else:
                        own = {"test": "n/a", "p_value": None, "stolen": None, "verdict": "n/a", "statistic": None, "null": None}
                    row = {"setting": s.id, "label": s.label, "family": s.family, "model": s.model,
                           "defences": s.spec(), "victim_cta": ben["victim_cta"], "fidelity": ben["fidelity"],
                           "answer_l1": ben["answer_l1"], "thief": mode, "arch": arch, "budget": budget,
                           "queries": ans["queries"], "answers_one_hot": ans["one_hot"], "substitute_cta": sub["cta"],
                           "substitute_key": sub["key"], "ownership": own, "honeypot_check": hpv,
                           "watermarks": ans.get("watermarks"), "dawn": ev.get("dawn"),
                           "dawn_references": ev.get("dawn_references"), "seconds_thief": sub["seconds"],
                           "resumed": bool(sub.get("resumed"))}
                    self.rows.append(row)
                    verdict = "" if own["p_value"] is None else f" p={own['p_value']:.3g} {own['verdict']}"
                    log(f"{s.id:>10} {mode:>5} {arch:>6} {budget:>6}: victim CTA {100 * ben['victim_cta']:.2f}%  "
                        f"substitute CTA {100 * sub['cta']:.2f}%  ownership {own['test']}{verdict}"
                        f"  [{sub['seconds']:.0f} s{', resumed' if sub.get('resumed') else ''}]")


# ============================================================================ output


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _p(p) -> str:
    return "—" if p is None else ("< 1e-300" if p == 0 else f"{p:.2g}")


def format_table(rows: list[dict], latency: dict) -> str:
    out = ["| defence | model | victim CTA (benign) | latency ×, batch 1 / 256 | thief | budget | substitute CTA "
           "| ownership test | statistic (null) | p-value | verdict |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lat = latency.get(r["setting"])
        lat_s = f"{lat['ratio_1']:.2f} / {lat['ratio_256']:.2f}" if lat else "—"
        o = r["ownership"]
        stat = "—" if o["statistic"] is None else f"{_pct(o['statistic'])}% ({_pct(o['null'])}%)"
        out.append(f"| {r['label']} | {'HoneypotNet' if r['model'] == 'protected' else 'victim'} | {_pct(r['victim_cta'])} "
                   f"| {lat_s} | {'label-only' if r['thief'] == 'label' else 'probabilities'} ({r['arch']}) | {r['budget']} "
                   f"| {_pct(r['substitute_cta'])} | {o['test']} | {stat} | {_p(o['p_value'])} | {o['verdict']} |")
    others = [r for r in rows if r["model"] != "protected"]
    flagged = sum(bool(r["honeypot_check"]["stolen"]) for r in others)
    out.append("")
    out.append("CTA in %, on the evaluation images. Latency: seconds per query over the undefended victim's, same run "
               "(medians). statistic: HoneypotNet = ASR of the stamped verification images (tau0); DAWN = agreement "
               "with the watermark labels (null 1/(K-1)). "
               f"HoneypotNet's test on the substitutes of the non-HoneypotNet rows: {flagged}/{len(others)} flagged.")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, arch: str, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(dict.fromkeys(r["family"] for r in rows))
    cmap = plt.get_cmap("tab20")
    palette = [cmap(i) for i in [*range(0, 20, 2), *range(1, 20, 2)]]  # 20 distinct colours, strong ones first
    fig, ax = plt.subplots(figsize=(9, 6.5))
    for r in rows:
        if r["arch"] != arch or r["budget"] != budget:
            continue
        c = palette[fams.index(r["family"]) % 20]
        marker = "o" if r["thief"] == "probs" else "x"
        ax.scatter(100 * r["victim_cta"], 100 * r["substitute_cta"], color=c, marker=marker, s=45)
        ax.annotate(r["setting"], (100 * r["victim_cta"], 100 * r["substitute_cta"]), fontsize=7,
                    xytext=(3, 3 if r["thief"] == "probs" else -9), textcoords="offset points", color=c)
    for f in fams:
        ax.scatter([], [], color=palette[fams.index(f) % 20], label=f)
    ax.scatter([], [], color="k", marker="o", label="probability thief")
    ax.scatter([], [], color="k", marker="x", label="label-only thief")
    ax.set_xlabel("victim CTA as benign users see it (%)  → better utility")
    ax.set_ylabel("substitute CTA (%)  ↓ better security")
    ax.set_title(f"Utility / security trade-off ({arch} thief, {budget} queries)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)


# ============================================================================ main


def reuse_reproduce(src: Path, dst: Path, seed: int) -> list[str]:
    """Copy bench.reproduce's finished input units (victim, protection, calibration, references, pool
    answers) from `src` into `dst` (files only; partial work directories and thieves are left out),
    so their keys can be checked and reused without ever writing to `src`."""
    copied = []
    for rel, subdirs in [("victim", []), ("victim/pool-answers", []), (f"seed{seed}/references", []),
                         (f"seed{seed}/protect-base", ["bundle"]), (f"seed{seed}/protect-base/calibration", []),
                         (f"seed{seed}/protect-base/pool-answers", [])]:
        s, d = src / rel, dst / rel
        if not (s / "unit.json").is_file():
            continue
        src_key = json.loads((s / "unit.json").read_text()).get("key")
        if (d / "unit.json").is_file():
            marker = d / "copied_from.json"
            if not marker.is_file() or json.loads(marker.read_text()).get("key") == src_key:
                continue  # computed here, or copied before from the same source unit
            for f in d.iterdir():  # the source unit was re-run since it was copied: copy it again
                if f.is_file():
                    f.unlink()
            for sub in subdirs:
                shutil.rmtree(d / sub, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
        for f in s.iterdir():
            if f.is_file():
                shutil.copy2(f, d / f.name)
        for sub in subdirs:
            if (s / sub).is_dir():
                shutil.copytree(s / sub, d / sub, dirs_exist_ok=True)
        (d / "copied_from.json").write_text(json.dumps({"source": str(s), "key": src_key}))
        copied.append(rel)
    return copied


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.compare_defences", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring and docs/defences.md.")
    add_common_args(ap, quick="tiny protocol and a subset of the settings (a smoke test)", resume=False)
    add_data_args(ap)
    ap.add_argument("--from-reproduce", metavar="DIR",
                    help="bench.reproduce's output to reuse (read only; default runs/reproduce, none with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", type=int, nargs="+", default=[20000], help="thief query budgets (quick: divided by 20)")
    ap.add_argument("--substitutes", nargs="+", default=["cnn"], help="substitute architectures (default cnn)")
    ap.add_argument("--thieves", nargs="+", choices=["probs", "label"], default=["probs", "label"],
                    help="probability thief and/or label-only thief (default both)")
    ap.add_argument("--settings", nargs="+", metavar="ID",
                    help=f"defence settings to run (default all; quick: {' '.join(QUICK_SETTINGS)}); ids: "
                         + " ".join(BY_ID))
    ap.add_argument("--latency-repeats", type=int, help="timed single-image queries per setting (default 50, quick 3; "
                    "batches of 256: a tenth as many, at least 1); 0 skips the latency measurement")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default $OMP_NUM_THREADS, else all cores)")
    args = ap.parse_args(argv)
    if args.from_reproduce is None and not args.quick:
        args.from_reproduce = str(default_out("reproduce", False))
    if args.settings is None:
        args.settings = QUICK_SETTINGS if args.quick else [s.id for s in SETTINGS]
    unknown = [s for s in args.settings if s not in BY_ID]
    if unknown:
        ap.error(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(BY_ID)}")
    if args.latency_repeats is None:
        args.latency_repeats = 3 if args.quick else 50
    if args.latency_repeats < 0:
        ap.error("--latency-repeats must be >= 0")
    return finish_common_args(args, NAME)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(max(1, args.threads))
    else:
        set_threads()
    p = TINY if args.quick else FULL
    budgets = sorted({b // p.budget_scale for b in args.budgets})
    if min(budgets) <= 0 or max(budgets) > p.pool:
        raise SystemExit(f"budgets {budgets} must lie in 1..{p.pool} (the pool)")
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.from_reproduce:
        src = Path(args.from_reproduce)
        if src.resolve() == (out / "reproduce").resolve():
            raise SystemExit("--from-reproduce must not be OUT/reproduce itself")
        copied = reuse_reproduce(src, out / "reproduce", args.seed) if src.is_dir() else []
        log(f"reproduction artefacts from {src}: {', '.join(copied) if copied else 'none copied'} "
            f"(reused where their keys match, recomputed in {out / 'reproduce'} otherwise)")

    data = load_data(args, p)
    log(f"data: {json.dumps({k: v for k, v in data.info.items() if not k.endswith('root')})}  [{time.time() - t0:.0f} s]")
    cmp = Comparison(args, p, data, device)
    cmp.setup()
    settings = [BY_ID[i] for i in args.settings]
    if args.latency_repeats:
        cmp.measure_latency(settings, args.latency_repeats)
    for s in settings:
        cmp.run_setting(s, args.thieves, args.substitutes, budgets)

    stages = stage_timings(cmp.units.timings + cmp.rep.units.timings)
    wall = time.time() - t0
    stages["total wall time"] = [wall, wall]
    results = {
        "benchmark": "bench.compare_defences", "mode": "quick" if args.quick else "full",
        "command": command_line("bench.compare_defences", argv),
        "protocol": {**asdict(p), "budgets": budgets, "seed": args.seed, "substitutes": args.substitutes,
                     "thieves": args.thieves, "thief_fit": asdict(FitConfig(epochs=p.thief_epochs, seed=args.seed)),
                     "eval_images": len(cmp.eval_labels), "verification_images": len(data.verif),
                     "mad_surrogate": f"randomly initialised {MAD_SURROGATE} (seed {1000 + args.seed})",
                     "adaptive_misinformation_nu": NU, "latency_repeats": args.latency_repeats,
                     "from_reproduce": args.from_reproduce, "data": data.info},
        "machine": machine_info(device),
        "victim": {"cta": cmp.rep.victim_rec["cta"]},
        "protection": {k: cmp.prot[k] for k in ("victim_cta", "protected_cta", "fidelity", "tau0")},
        "settings": [{"id": s.id, "label": s.label, "family": s.family, "model": s.model, "defences": s.spec()}
                     for s in settings],
        "latency": cmp.latency,
        "benign": {k: {a: v[a] for a in ("victim_cta", "fidelity", "answer_l1")} for k, v in cmp.benign.items()},
        "rows": cmp.rows,
        "timings": timings_json(stages),
    }
    table = format_table(cmp.rows, cmp.latency)
    written = save_report(out, "compare-defences", results, table, record=args.record, folder=NAME)
    plot(cmp.rows, out / "compare-defences.png", args.substitutes[0], max(budgets))
    log("")
    log(table)
    log(f"\nwrote {', '.join(map(str, written))}, {out / 'compare-defences.png'}  [{wall:.0f} s]")
    return results


if __name__ == "__main__":
    main()
