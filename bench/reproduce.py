"""Reproduce the paper's measurement (docs/method.md) on real data: CIFAR-10 victim, Tiny ImageNet queries.

    python -m bench.reproduce                       # full protocol: 3 seeds x 3 budgets x 2 substitutes
    python -m bench.reproduce --quick               # the same pipeline on 1/10 of the data (a few minutes)
    python -m bench.reproduce --ablation eps --resume   # one ablation, reusing the main run's units
    python -m bench.reproduce --resume              # after a kill: finished units are skipped

Protocol (the paper's protocol, so the figures compare; bench.benchlib.protocol runs it):
  victim     pretrained ResNet-20 (../shared/weights/resnet-cifar10/resnet20-*.th), CTA 81.03% on
             cifar10-jpeg/test; `--finetune-victim N` fine-tunes it N epochs on cifar10-jpeg/train first.
  defender   shadow set = Tiny ImageNet val (10k, resized to 32 px); owner images for L_norm = a fixed
             random 10k of cifar10-jpeg/train; ProtectConfig.preset("spec") = the paper's best (UAP eps
             16/255, residual head hidden 256, lambda 3, T 8, CNN shadow warm-started 3 epochs/iteration,
             2 trigger passes, 400 honeypot steps, lr 1e-3, batch 256, target 0) except shadow_norm_weight
             0.2 (the paper's protocol: 1; `--ablation shadow-norm-weight` has its row as "paper-snw1").
  null       clean substitutes of the unprotected victim ("cnn", "resnet20", 12 epochs) trained on the
             shadow set -> calibrate_tau0 on the calibration half of cifar10-jpeg/test; the suspects are
             verified on the other half (the halves never share an image; split per class, so both hold
             all ten classes: the first 500 test images of each class calibrate, the last 500 verify).
  thieves    Tiny ImageNet train (20k, resized to 32; disjoint from the shadow set) is the pool;
             random_extraction(PoolOracle(model), pool, budget, arch, FitConfig(epochs=12, seed)) for each
             budget and substitute arch, against the protected model and against the unprotected victim
             (the "clean" substitute: same budget, same seed). A label-only thief at the largest budget
             (first arch), against both. `--pools` (default all): at the largest budget, a thief with
             images like the owner's (CIFAR-10 train outside the owner's 10k; soft and label-only) and one
             with half Tiny ImageNet, half CIFAR-10 (soft), each with its clean twin.
  measured   substitute CTA, ASR (verify() on the verification half, target class excluded), unstamped
             target rate, verdict + p-value with the bundle's tau0, accuracy clean vs stamped; victim CTA
             before/after and fidelity; wall time of every stage (and of protect's steps, as protect's
             callback reports them).

Every finished unit (victim, protection, reference models, calibration, each thief, each
verification) writes OUT/<unit>/unit.json (+ its models); `--resume` skips the units whose key (the
parameters they depend on) matches and continues partial ones (protect per outer iteration,
thieves per epoch). Without `--resume` each unit is recomputed from scratch.

Speed: the pool is answered once per model (victim, each protected model) and a thief's oracle looks
its images up in those answers (benchlib.oracle.PoolOracle); every thief still counts its own queries
(one image = one query, through the Oracle base class, output mode applied as usual).

Output: a markdown table on stdout, OUT/results.json (OUT/ablation-<name>.json for --ablation), the
trigger as OUT/trigger.png, the protected bundles (with the calibrated null) under OUT/seed<s>/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from honeypotnet.training import FitConfig

from .benchlib.args import add_common_args, add_data_args, finish_common_args
from .benchlib.common import (command_line, jsonable, log, machine_info, pct, save_report, set_threads, stage_timings,
                              timings_json, timings_table)
from .benchlib.data import POOLS, find_victim, load_data
from .benchlib.protocol import (FULL, PROTECTION_COLUMNS, QUICK, SUBSTITUTE_COLUMNS, Reproduction, base_config,
                                 preset_overrides)
from .benchlib.units import code_summary

NAME = "reproduce"
ROBUST = preset_overrides("robust")  # the library's default preset, as overrides of the protocol's spec base
# the robust preset as it was until its negative shadows were extracted once (negatives.once 24, per_batch 1,
# trigger.blur_split): the in-distribution study's base, kept so its rows (and the units bench.ownership,
# bench.witnesses and bench.robustness share with it) stay the configurations they were measured with
ROBUST_EVERY = {**ROBUST, "negative_once": 0, "negative_per_batch": 0, "trigger_blur_split": False}

# name -> [(variant label, ProtectConfig overrides)]; each variant is one protect + one thief.
ABLATIONS: dict[str, list[tuple[str, dict]]] = {
    "trigger-patch": [("patch8x8", {"trigger": "patch", "patch_size": 8})],
    "eps": [("eps8", {"eps": 8 / 255}), ("eps24", {"eps": 24 / 255})],
    "iters": [("T4", {"outer_iters": 4}), ("T16", {"outer_iters": 16})],
    "lambda": [("lam1", {"lam": 1.0}), ("lam3", {"lam": 3.0}), ("lam10", {"lam": 10.0})],
    "shadow-reinit": [("shadow-reinit", {"shadow_warm_start": False})],
    "head-linear": [("head-linear", {"head": "linear"})],
    "shadow-norm-weight": [("paper-snw1", {"shadow_norm_weight": 1.0}), ("snw0.5", {"shadow_norm_weight": 0.5})],
    # the thief with images like the owner's (--pools cifar mixed): the robust default of the time (ROBUST_EVERY); L_norm as
    # cross-entropy to the victim's labels (top-1 kept, the rest of the distribution free) instead of KL;
    # and the shadows querying half the owner images too (shadow.owner_share), so the trigger step aims
    # at what an in-distribution thief learns
    "in-distribution": [("robust", ROBUST_EVERY), ("robust-lnorm-ce", {**ROBUST_EVERY, "l_norm": "ce"}),
                        ("robust-owner0.5", {**ROBUST_EVERY, "shadow_owner_share": 0.5}),
                        ("robust-lnorm-ce-owner0.5", {**ROBUST_EVERY, "l_norm": "ce", "shadow_owner_share": 0.5}),
                        # the owner images' soft answers lean toward the target along the trigger's feature shift
                        # (head.owner_lean; top-1 kept), alone and with the shadows querying owner images
                        ("robust-lean0.5", {**ROBUST_EVERY, "owner_lean": 0.5}),
                        ("robust-lean1", {**ROBUST_EVERY, "owner_lean": 1.0}),
                        ("robust-lean1-owner0.5", {**ROBUST_EVERY, "owner_lean": 1.0, "shadow_owner_share": 0.5}),
                        # the default since 2026-12-06 (negatives extracted once) and owner_lean on it; the names and
                        # configurations of bench.robustness's variants, so the two share their units
                        ("robust-fast-once24", ROBUST),
                        ("robust-once24-lean0.2", {**ROBUST, "owner_lean": 0.2}),
                        ("robust-once24-lean0.3", {**ROBUST, "owner_lean": 0.3}),
                        ("robust-once24-lean0.5", {**ROBUST, "owner_lean": 0.5}),
                        # head.owner_flip: label flips where the victim's runner-up is the target
                        ("robust-once24-flip0.1", {**ROBUST, "owner_flip": 0.1}),
                        ("robust-once24-flip0.03", {**ROBUST, "owner_flip": 0.03}),
                        # both options together
                        ("robust-once24-lean0.2-flip0.1", {**ROBUST, "owner_lean": 0.2, "owner_flip": 0.1})],
    # the head terms that took a 101-class victim's cost from 5.5 to 0.7 pt (docs/research/many-classes.md) on this
    # protocol: the clean term on mixed features (head.mix_norm), the shadow set's answers kept as the owner's
    # (shadow_norm_weight 1, which cost the label-only thief before: it runs here too), and a hold on every class's
    # logit gain over the victim's answer (head.answer_hold); then the same without shadow_norm_weight 1
    "head-hold": [("robust-fast-once24", ROBUST),
                  ("robust-once24-mix10-snw1-any1", {**ROBUST, "mix_norm": 10.0, "shadow_norm_weight": 1.0,
                                                     "answer_hold": 1.0}),
                  ("robust-once24-mix10-any1", {**ROBUST, "mix_norm": 10.0, "answer_hold": 1.0}),
                  # each of the two terms alone: which one costs the thieves their backdoor
                  ("robust-once24-mix10", {**ROBUST, "mix_norm": 10.0}),
                  ("robust-once24-any1", {**ROBUST, "answer_hold": 1.0}),
                  # the hold runs inside head.mix_norm's term at that term's weight (10 x 1 above): here 10 x 0.1 on the
                  # mixed features, 0.1 on the owner's rows
                  ("robust-once24-mix10-snw1-any0.1", {**ROBUST, "mix_norm": 10.0, "shadow_norm_weight": 1.0,
                                                       "answer_hold": 0.1})],
}
# ablations whose rows also meet the label-only Tiny ImageNet thief (the others: the soft one only)
ABLATION_LABEL_ONLY = {"head-hold"}
# the thieves each protection also meets, besides the Tiny ImageNet grid: (pool, output) at the largest budget
EXTRA_POOL_THIEVES = [("cifar", "probs"), ("cifar", "label"), ("mixed", "probs")]


# ============================================================================ plans


def pool_thieves(rep: Reproduction, seed: int, prot: dict, arch: str, budget: int, pools,
                 oracles=("protected", "clean")) -> None:
    """The thieves of the other pools (EXTRA_POOL_THIEVES whose pool is in `pools`), each with its clean twin
    (`oracles`: only some of them)."""
    for pool, mode in EXTRA_POOL_THIEVES:
        if pool in pools:
            rep.pair(seed, prot, arch, budget, mode, oracles=oracles, pool=pool)


def run_main(rep: Reproduction, seeds, budgets, archs, full_grid_seeds=None, pools=("tin",)) -> None:
    """Every seed: each substitute arch at each budget, plus a label-only thief, on the Tiny ImageNet pool;
    then the in-distribution and mixed pools' thieves at the largest budget. With full_grid_seeds, the other
    seeds run the first arch at the largest budget only (and the label-only and other pools' thieves)."""
    for seed in seeds:
        prot = rep.protection(seed, "base", {})
        full = full_grid_seeds is None or seed in full_grid_seeds
        for arch in archs if full else archs[:1]:
            for budget in budgets if full else [max(budgets)]:
                rep.pair(seed, prot, arch, budget, "probs")
        rep.pair(seed, prot, archs[0], max(budgets), "label")
        pool_thieves(rep, seed, prot, archs[0], max(budgets), pools)


def run_ablation(rep: Reproduction, name: str, seeds, budgets, archs, pools=("tin",), only=None) -> None:
    for seed in seeds:
        done = set()
        for label, overrides in [("base", {}), *ABLATIONS[name]]:
            if only and label not in only:
                continue
            prot = rep.protection(seed, label, overrides)
            if prot["rel"] not in done:  # a variant equal to the base configuration is one row
                done.add(prot["rel"])
                rep.pair(seed, prot, archs[0], max(budgets), "probs")
                if name in ABLATION_LABEL_ONLY:
                    rep.pair(seed, prot, archs[0], max(budgets), "label")
                pool_thieves(rep, seed, prot, archs[0], max(budgets), pools)


# ============================================================================ tables


def _benign(ps: list[dict], key: str, digits: int, scale: float = 1.0) -> str:
    """Mean of one benign-user cost over seeds ('—' for rows recorded before it was measured)."""
    xs = [p["benign"][key] * scale for p in ps if "benign" in p]
    return f"{statistics.mean(xs):.{digits}f}" if xs else "—"


def format_tables(protections: list[dict], substitutes: list[dict], timings: dict[str, list[float]]) -> str:
    out = []
    out.append("| protection | victim CTA → protected (Δ) | fidelity | KL(victim ‖ protected), nats | ECE: victim → "
               "protected | protected model ASR | tau0 | protect s | seeds |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    names = list(dict.fromkeys(p["protection"] for p in protections))
    for n in names:
        ps = [p for p in protections if p["protection"] == n]
        d = [p["cta_delta"] for p in ps]
        out.append(f"| {n} | {pct([p['victim_cta'] for p in ps])} → {pct([p['protected_cta'] for p in ps])} "
                   f"({'+' if statistics.mean(d) >= 0 else '−'}{abs(100 * statistics.mean(d)):.2f}) | "
                   f"{pct([p['fidelity'] for p in ps])} | {_benign(ps, 'kl', 3)} | "
                   f"{_benign(ps, 'ece_victim', 1, 100)} → {_benign(ps, 'ece_protected', 1, 100)} | "
                   f"{pct([p['protected_model_asr'] for p in ps])} | "
                   f"{pct([p['tau0'] for p in ps])} | {statistics.mean(p['seconds'] for p in ps):.0f} | {len(ps)} |")
    out.append("")
    out.append("| protection | thief | budget | output | thief CTA (clean) | ASR (clean) | unstamped (clean) "
               "| acc. clean → stamped | flagged: stolen / clean | p (stolen) | tau0 | seeds |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    def key(s: dict) -> tuple:
        return s["protection"], s["arch"], s["budget"], s["output"], s.get("pool", "tin")

    groups = list(dict.fromkeys(map(key, substitutes)))
    for g in groups:
        st = [s for s in substitutes if key(s) == g and s["oracle"] == "protected"]
        cl = [s for s in substitutes if key(s) == g and s["oracle"] == "clean"]
        pv = max(s["p_value"] for s in st) if st else None
        thief = g[1] if g[4] == "tin" else f"{g[1]}, {POOLS[g[4]]} pool"
        out.append(f"| {g[0]} | {thief} | {g[2]} | {'label-only' if g[3] == 'label' else 'soft'} | "
                   f"{pct([s['cta'] for s in st])} ({pct([s['cta'] for s in cl])}) | "
                   f"{pct([s['asr'] for s in st])} ({pct([s['asr'] for s in cl])}) | "
                   f"{pct([s['unstamped_rate'] for s in st])} ({pct([s['unstamped_rate'] for s in cl])}) | "
                   f"{pct([s['clean_accuracy'] for s in st])} → {pct([s['stamped_accuracy'] for s in st])} | "
                   f"{sum(s['stolen'] for s in st)}/{len(st)} / {sum(s['stolen'] for s in cl)}/{len(cl)} | "
                   f"{'—' if pv is None else f'{pv:.2g}'} | {pct([s['tau0'] for s in st])} | {len(st)} |")
    out.append("")
    out.append("Percentages: mean ± sd over seeds. (clean) = the same thief (budget, seed) trained on the unprotected "
               "victim's answers. p (stolen) = the largest p-value over seeds. Flagged = H0: ASR ≤ tau0 rejected.")
    out.append("")
    out.append(timings_table(timings))
    return "\n".join(out)


# ============================================================================ main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.reproduce", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (and docs/research/reproduction.md) for the protocol.")
    add_common_args(ap, quick="1/10 of the data, T=4, fewer epochs, one seed, substitute cnn", resume=False)
    add_data_args(ap)
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (quick and ablations: 0)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[5000, 10000, 20000],
                    help="query budgets (quick: divided by 10)")
    ap.add_argument("--substitutes", nargs="+", help="substitute archs (default cnn resnet20; quick: cnn)")
    ap.add_argument("--full-grid-seeds", type=int, nargs="+", metavar="SEED",
                    help="run every budget x substitute for these seeds only; the other seeds run the first "
                         "substitute at the largest budget (and the label-only thief). Default: every seed")
    ap.add_argument("--ablation", choices=sorted(ABLATIONS),
                    help="run one ablation (base + variants, one Tiny ImageNet thief each (head-hold: a label-only one too), "
                         "plus the other pools')")
    ap.add_argument("--only", nargs="+", metavar="VARIANT",
                    help="with --ablation: run only these of its rows (base and the variants' names)")
    ap.add_argument("--pools", nargs="+", choices=sorted(POOLS), default=["tin", "cifar", "mixed"],
                    help="thieves' pools: tin (Tiny ImageNet train, the paper's), cifar (CIFAR-10 train images outside "
                         "the owner's: in-distribution), mixed (half each); the other pools add a soft and a "
                         "label-only cifar thief and a soft mixed one at the largest budget (default: all)")
    ap.add_argument("--finetune-victim", type=int, default=0, metavar="N",
                    help="fine-tune the victim N epochs on cifar10-jpeg/train first (default 0 = the paper's setting)")
    args = finish_common_args(ap.parse_args(argv), NAME)
    if args.only:
        if not args.ablation:
            ap.error("--only needs --ablation")
        names = ["base", *(n for n, _ in ABLATIONS[args.ablation])]
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            ap.error(f"--only: {', '.join(unknown)} not in the {args.ablation} ablation ({', '.join(names)})")
    if args.seeds is None:
        args.seeds = [0] if (args.quick or args.ablation) else [0, 1, 2]
    if args.substitutes is None:
        args.substitutes = ["cnn"] if args.quick else ["cnn", "resnet20"]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads()
    p = QUICK if args.quick else FULL
    budgets = sorted({b // p.budget_scale for b in args.budgets})
    if min(budgets) <= 0 or max(budgets) > p.pool:
        raise SystemExit(f"budgets {budgets} must lie in 1..{p.pool} (the pool)")
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    t = time.time()
    data = load_data(args, p, keep_train=bool(args.finetune_victim))
    t_data = time.time() - t
    log(f"data: {json.dumps({k: v for k, v in data.info.items() if not k.endswith('root')})}  [{t_data:.0f} s]")

    rep = Reproduction(out, p, data, device, victim_path=find_victim(args), resume=args.resume, progress=args.progress,
                       finetune_victim=args.finetune_victim)
    rep.victim()
    if args.ablation:
        run_ablation(rep, args.ablation, args.seeds, budgets, args.substitutes, args.pools, args.only)
    else:
        run_main(rep, args.seeds, budgets, args.substitutes, args.full_grid_seeds, args.pools)

    # trigger picture(s)
    first = rep.protections[0]
    shutil.copy2(out / first["rel"] / "bundle" / "trigger.png", out / "trigger.png")
    if args.ablation:
        for pr in rep.protections:
            shutil.copy2(out / pr["rel"] / "bundle" / "trigger.png", out / f"trigger-{pr['protection']}.png")

    # where time goes
    timings = stage_timings(rep.units.timings, {"data load": t_data})
    for k, v in rep.step_seconds.items():
        timings[f"  protect: {k}"] = list(v)
    wall = time.time() - t0
    timings["total wall time"] = [wall, wall]

    protections = [{k: v for k, v in pr.items() if k in PROTECTION_COLUMNS} for pr in rep.protections]
    results = {
        "benchmark": "bench.reproduce", "mode": "quick" if args.quick else "full", "ablation": args.ablation,
        "command": command_line("bench.reproduce", argv),
        "protocol": {**asdict(p), "budgets": budgets, "seeds": args.seeds, "full_grid_seeds": args.full_grid_seeds,
                     "substitutes": args.substitutes, "pools": args.pools, "finetune_victim": args.finetune_victim,
                     "victim_weights": rep.victim_path.name,
                     "thief_fit": asdict(FitConfig(epochs=p.thief_epochs, seed=0)) | {"seed": "= run seed"},
                     "reference_fit": asdict(FitConfig(epochs=p.reference_epochs, seed=0)) | {"seed": "= 100 + run seed"},
                     "base_config": base_config(p, 0).to_dict() | {"seed": "loop.seed = run seed"},
                     "ablation_variants": {k: [(n, {a: jsonable(b) for a, b in o.items()}) for n, o in v]
                                           for k, v in ABLATIONS.items()},
                     "data": data.info},
        "machine": machine_info(device),
        "victim": {k: rep.victim_rec[k] for k in ("cta", "cta_pretrained")} | {"eval_images": len(rep.eval_labels)},
        "protections": protections,
        "substitutes": rep.substitutes,
        "substitute_columns": SUBSTITUTE_COLUMNS,
        "timings": timings_json(timings),
        "units": rep.units.timings,
    }
    stem = f"ablation-{args.ablation}" if args.ablation else "results"
    table = format_tables(protections, rep.substitutes, timings) + "\n\n" + code_summary(rep.units.timings)
    written = save_report(out, stem, results, table, record=args.record, folder=NAME)
    log("")
    log(table)
    log(f"\nwrote {', '.join(map(str, written))}, {out / 'trigger.png'}")
    return results


if __name__ == "__main__":
    main()
