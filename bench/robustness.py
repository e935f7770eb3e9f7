"""Can the thief wash the honeypot's backdoor out of its copy? (issue 8)

    python bench/robustness.py                          # base protection, seed 0, cnn thief at 20k
    python bench/robustness.py --variants base shadow-ft2 eps24 --resume
    python bench/robustness.py --quick                  # the same on reproduce.py's quick protocol (a test)

Protocol: bench/reproduce.py's (victim, shadow set, pool, calibrated tau0, verification half); its
units are shared: the protection and the thieves are reproduce.py units in `--reproduce-out`
(default runs/reproduce, runs/reproduce-quick with --quick), so a finished reproduction is reused and
every variant here is also a reproduce.py unit. For each protection variant (VARIANTS below: the
base configuration and the options issue 8 asks to try), the protected-extraction substitute and the
clean substitute (same thief, unprotected victim) go through every counter-measure a suspicious thief
has, and each result is verified with the bundle's trigger and calibrated tau0 (PAPER.md §3):

  fine-tune    all layers, on `--labelled` (1,000) clean labelled cifar10-jpeg/train images the
               defender never used (disjoint from the owner set), swept over epochs x learning rate
               (the thief keeps the setting with the best clean accuracy: the "thief's pick" row)
  fine-prune   prune 20/50/80% of the last feature map's least active channels on those images,
               then fine-tune 5 epochs at lr 0.01 (Liu et al. 2018)
  purify       JPEG re-compression (quality 50, 75) or Gaussian blur (sigma 0.5, 1.0) of every input
               at inference
  cleanse      Neural Cleanse: per-class reverse-engineered mask norms and anomaly index on the
               substitute (> 2 on the small side flags the class); reported for the target class

Output: a markdown table on stdout and OUT/robustness.md, OUT/robustness.json, and
OUT/robustness-finetune.png (ASR against the thief's fine-tuning epochs, one line per learning rate
and protection variant, the clean substitute dashed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from honeypotnet.bundle import load_model
from honeypotnet.countermeasures import assess, fine_prune, finetune, neural_cleanse
from honeypotnet.data import load_dataset
from honeypotnet.training import accuracy, default_device

REPO = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(REPO / "bench"))
import reproduce as rp  # noqa: E402  (the same protocol, data and resumable units)

# Protection variants: name -> ProtectConfig overrides of reproduce.base_config (the library default).
VARIANTS: dict[str, dict] = {
    "base": {},
    "paper-snw1": {"shadow_norm_weight": 1.0},  # PAPER.md §5's configuration
    "eps20": {"eps": 20 / 255},  # between the default and eps24
    "eps24": {"eps": 24 / 255},  # a stronger trigger
    "shadow-ft2": {"shadow_finetune_epochs": 2},  # the thief's fine-tuning simulated in the loop
    "shadow-reinit": {"shadow_warm_start": False},  # a fresh shadow every iteration (reproduce.py ablation)
    "shadow-ft2-eps24": {"shadow_finetune_epochs": 2, "eps": 24 / 255},
}


@dataclass
class Sweep:
    finetune: list[tuple[int, float]] = field(default_factory=lambda: [(e, lr) for lr in (0.01, 0.05) for e in (1, 3, 5, 10)])
    prune: list[float] = field(default_factory=lambda: [0.2, 0.5, 0.8])
    prune_finetune: tuple[int, float] = (5, 0.01)
    purify: list[tuple[str, dict]] = field(default_factory=lambda: [
        ("jpeg-q75", {"method": "jpeg", "quality": 75}), ("jpeg-q50", {"method": "jpeg", "quality": 50}),
        ("blur-0.5", {"method": "blur", "sigma": 0.5}), ("blur-1.0", {"method": "blur", "sigma": 1.0})])
    cleanse_steps: int = 300
    cleanse_images: int = 500


QUICK_SWEEP = Sweep(finetune=[(1, 0.01), (3, 0.05)], prune=[0.5], prune_finetune=(1, 0.01),
                    purify=[("jpeg-q50", {"method": "jpeg", "quality": 50}), ("blur-1.0", {"method": "blur", "sigma": 1.0})],
                    cleanse_steps=20, cleanse_images=100)


class Robustness:
    def __init__(self, args, p, data, device, labelled: tuple[torch.Tensor, torch.Tensor], sweep: Sweep) -> None:
        self.rep = rp.Reproduction(reproduce_args(args), p, data, device)
        self.args, self.p, self.data, self.device = args, p, data, device
        self.labelled = labelled
        self.sweep = sweep
        self.rows: list[dict] = []
        self.cleanse: list[dict] = []
        self.protections: list[dict] = []

    def _assess(self, model, prot, purification=None) -> dict:
        d, b = self.data, prot["bundle"]
        return assess(model.to(self.device), b.trigger, d.test_images[d.verif], d.test_labels[d.verif], b.target, b.tau0,
                      alpha=self.p.alpha, cta_images=self.rep.eval_images, cta_labels=self.rep.eval_labels,
                      purification=purification)

    def counter_measures(self, seed: int, variant: str, prot: dict, oracle: str, thief: dict) -> None:
        sub, _ = load_model(Path(self.args.reproduce_out) / thief["rel"] / "substitute.safetensors")
        sub.eval()
        x, y = self.labelled
        sw = self.sweep
        base = {"seed": seed, "variant": variant, "oracle": oracle, "thief": thief["rel"]}

        def unit(name: str, params: dict, fn) -> dict:
            rel = f"{thief['rel']}/robust-{prot['protection']}-{name}"
            rec = self.rep.units.run(rel, {"thief": thief["key"], "protection": prot["key"], "labelled": len(x), **params},
                                     lambda d: fn(), "counter-measures")
            row = {**base, "measure": name, **{k: v for k, v in rec.items() if k not in ("params", "key")}}
            self.rows.append(row)
            if "asr" in row:
                rp.log(f"[{variant:>16} {oracle:>9}] {name:<18} CTA {100 * row['cta']:.2f}%  ASR {100 * row['asr']:.2f}%  "
                    f"p {row['p_value']:.3g}  {row['verdict']}")
            return row

        unit("none", {}, lambda: self._assess(sub, prot))
        for epochs, lr in sw.finetune:
            unit(f"finetune-e{epochs}-lr{lr:g}", {"epochs": epochs, "lr": lr},
                 lambda e=epochs, l=lr: {"epochs": e, "lr": l,
                                         **self._assess(finetune(sub, x, y, e, l, seed=seed), prot)})
        pe, plr = sw.prune_finetune
        for ratio in sw.prune:
            def fp(r=ratio):
                res = fine_prune(sub, x, y, r, pe, plr, seed=seed)
                return {"prune_ratio": r, "pruned": len(res.pruned), "channels": res.channels,
                        "finetune_epochs": pe, "lr": plr, **self._assess(res.model, prot)}
            unit(f"fineprune-{ratio:g}", {"ratio": ratio, "epochs": pe, "lr": plr}, fp)
        for name, spec in sw.purify:
            unit(f"purify-{name}", spec, lambda s=spec: {**s, **self._assess(sub, prot, purification=s)})

        def nc():
            imgs = x[: sw.cleanse_images]
            t = time.time()
            res = neural_cleanse(sub.to(self.device), imgs, steps=sw.cleanse_steps, seed=seed)
            tgt = prot["bundle"].target
            return {"norms": res.norms, "anomaly_index": res.anomaly_index, "flagged": res.flagged,
                    "target_anomaly_index": res.anomaly_index[tgt], "target_flagged": tgt in res.flagged,
                    "target_norm_rank": sorted(res.norms).index(res.norms[tgt]), "nc_seconds": round(time.time() - t, 1)}
        r = unit("neural-cleanse", {"steps": sw.cleanse_steps, "images": sw.cleanse_images}, nc)
        rp.log(f"[{variant:>16} {oracle:>9}] neural cleanse: target anomaly index {r['target_anomaly_index']:.2f} "
            f"(rank {r['target_norm_rank']} of {len(r['norms'])} by mask norm), flagged {r['flagged']}")
        self.cleanse.append(r)

    def run(self, seeds, variants, arch: str, budget: int) -> None:
        for seed in seeds:
            for v in variants:
                prot = self.rep.protection(seed, v, VARIANTS[v])
                self.protections.append({k: prot[k] for k in ("seed", "protection", "overrides", "victim_cta", "protected_cta",
                                                               "cta_delta", "fidelity", "tau0", "seconds")})
                for oracle in ("protected", "clean"):
                    if oracle == "clean" and v != variants[0]:
                        continue  # the clean substitute does not depend on the protection: once per seed
                    t = self.rep.thief(seed, oracle, arch, budget, "probs", prot)
                    self.counter_measures(seed, v, prot, oracle, t)


# ============================================================================ tables and plot


def _f(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def format_table(protections: list[dict], rows: list[dict]) -> str:
    out = ["| variant | victim CTA → protected (Δ) | fidelity | tau0 |", "| --- | --- | --- | --- |"]
    for p in protections:
        out.append(f"| {p['protection']} | {_f(p['victim_cta'])} → {_f(p['protected_cta'])} ({100 * p['cta_delta']:+.2f}) "
                   f"| {_f(p['fidelity'])} | {_f(p['tau0'])} |")
    out += ["", "| variant | substitute | counter-measure | thief CTA | ASR | p | verdict |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["measure"] == "neural-cleanse":
            out.append(f"| {r['variant']} | {r['oracle']} | Neural Cleanse | — | target anomaly index "
                       f"{r['target_anomaly_index']:.2f} | — | {'target flagged' if r['target_flagged'] else 'target not flagged'} |")
            continue
        p = r["p_value"]
        out.append(f"| {r['variant']} | {r['oracle']} | {r['measure']} | {_f(r['cta'])} | {_f(r['asr'])} | "
                   f"{'< 1e-300' if p == 0 else f'{p:.2g}'} | {'STOLEN' if r['stolen'] else 'not flagged'} |")
    picks = thief_picks(rows)
    if picks:
        out += ["", "Thief's pick (the fine-tuning setting with the best clean accuracy):", ""]
        for (v, o), r in picks.items():
            out.append(f"- {v} / {o}: {r['measure']}: CTA {_f(r['cta'])} (before {_f(r['cta_before'])}), ASR {_f(r['asr'])}, "
                       f"{'STOLEN' if r['stolen'] else 'not flagged'}")
    return "\n".join(out)


def thief_picks(rows: list[dict]) -> dict:
    picks = {}
    for key in dict.fromkeys((r["variant"], r["oracle"]) for r in rows):
        ft = [r for r in rows if (r["variant"], r["oracle"]) == key and r["measure"].startswith("finetune")]
        none = [r for r in rows if (r["variant"], r["oracle"]) == key and r["measure"] == "none"]
        if ft:
            best = max(ft, key=lambda r: r["cta"])
            picks[key] = {**best, "cta_before": none[0]["cta"] if none else None}
    return picks


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = list(dict.fromkeys((r["variant"], r["oracle"]) for r in rows))
    lrs = sorted({r["lr"] for r in rows if r["measure"].startswith("finetune")})
    for i, (v, o) in enumerate(keys):
        none = [r for r in rows if (r["variant"], r["oracle"]) == (v, o) and r["measure"] == "none"]
        for lr in lrs:
            pts = sorted((r["epochs"], r["asr"]) for r in rows
                         if (r["variant"], r["oracle"]) == (v, o) and r["measure"].startswith("finetune") and r["lr"] == lr)
            if none:
                pts = [(0, none[0]["asr"])] + pts
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", linestyle="--" if o == "clean" else "-",
                    color=f"C{i}", alpha=1.0 if lr == lrs[0] else 0.55, label=f"{v} / {o} substitute, lr {lr:g}")
    ax.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("thief's fine-tuning epochs on 1,000 clean labelled images")
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("Backdoor left after the thief fine-tunes its copy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ main


def reproduce_args(args) -> argparse.Namespace:
    """reproduce.py's options for its data loader and units: its working directory, always resumed
    (a finished reproduction's units are reused, never recomputed)."""
    return argparse.Namespace(shared=args.shared, cifar_root=args.cifar_root, tin_root=args.tin_root,
                              victim_weights=args.victim_weights, out=args.reproduce_out, resume=True,
                              progress=args.progress, finetune_victim=0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_data_args(ap)
    ap.add_argument("--reproduce-out", help="reproduce.py's output directory, whose units are reused and extended "
                                            "(default runs/reproduce; --quick: runs/reproduce-quick)")
    ap.add_argument("--out", help="where the table, JSON and plot go (default runs/robustness[-quick])")
    ap.add_argument("--quick", action="store_true", help="reproduce.py's quick protocol and a small sweep (a smoke test)")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["base"], help="protection variants")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--budget", type=int, default=20000, help="thief query budget (quick: divided by 10)")
    ap.add_argument("--substitute", default="cnn", help="the thief's architecture (default cnn)")
    ap.add_argument("--labelled", type=int, default=1000, help="clean labelled images the thief has (default 1000)")
    ap.add_argument("--device", default=str(default_device()))
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty())
    args = ap.parse_args(argv)
    suffix = "-quick" if args.quick else ""
    args.reproduce_out = args.reproduce_out or str(REPO / "runs" / f"reproduce{suffix}")
    args.out = args.out or str(REPO / "runs" / f"robustness{suffix}")
    if args.variants[0] != "base" and "base" in args.variants:
        args.variants.remove("base")
        args.variants.insert(0, "base")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    p = rp.QUICK if args.quick else rp.FULL
    sweep = QUICK_SWEEP if args.quick else Sweep()
    budget = args.budget // p.budget_scale
    labelled_n = max(20, args.labelled // (10 if args.quick else 1))
    device = torch.device(args.device)
    t0 = time.time()
    data = rp.load_data(reproduce_args(args), p)
    # the thief's clean labelled set: cifar10-jpeg/train images outside the owner subset
    train = load_dataset("imagefolder", data.info["cifar_root"], "train")
    owner_idx = rp._subset(len(train), p.owner, 1)
    free = torch.ones(len(train), dtype=torch.bool)
    free[owner_idx] = False
    g = torch.Generator().manual_seed(4)
    cand = free.nonzero().flatten()
    pick = cand[torch.randperm(len(cand), generator=g)[:labelled_n]]
    labelled = (train.images[pick].contiguous(), train.labels[pick].contiguous())
    rob = Robustness(args, p, data, device, labelled, sweep)
    rob.rep.victim()
    rob.run(args.seeds, args.variants, args.substitute, budget)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rob.protections, rob.rows)
    picks = thief_picks(rob.rows)
    results = {"benchmark": "bench/robustness.py", "mode": "quick" if args.quick else "full",
               "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "protocol": {"reproduce_out": args.reproduce_out, "variants": {v: {k: rp._jsonable(x) for k, x in VARIANTS[v].items()}
                                                                              for v in args.variants},
                            "seeds": args.seeds, "budget": budget, "substitute": args.substitute, "labelled": labelled_n,
                            "sweep": {"finetune": sweep.finetune, "prune": sweep.prune, "prune_finetune": sweep.prune_finetune,
                                      "purify": sweep.purify, "cleanse_steps": sweep.cleanse_steps,
                                      "cleanse_images": sweep.cleanse_images}},
               "machine": rp.machine_info(device), "protections": rob.protections, "rows": rob.rows,
               "thief_picks": [{"variant": k[0], "oracle": k[1], **v} for k, v in picks.items()],
               "victim_cta": accuracy(rob.rep.victim(), rob.rep.eval_images, rob.rep.eval_labels),
               "seconds": round(time.time() - t0, 1)}
    rp._write_json(out / "robustness.json", results)
    (out / "robustness.md").write_text(table + "\n")
    plot(rob.rows, out / "robustness-finetune.png")
    rp.log("")
    rp.log(table)
    rp.log(f"\nwrote {out / 'robustness.json'}, {out / 'robustness-finetune.png'}  [{time.time() - t0:.0f} s]")
    return results


if __name__ == "__main__":
    main()
