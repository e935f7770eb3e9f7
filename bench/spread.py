"""Where does the seed-to-seed spread of the robustness results come from: the protection or the thief?

    python -m bench.spread --variants negcr0.25-eps24 --seeds 0 2 --thief-seeds 10 20
    python -m bench.spread --quick                      # the same on bench.reproduce's quick protocol (a test)

bench.robustness runs one thief per protection, with the protection's seed. Its results vary a lot
from seed to seed (negcr0.25-eps24: the fine-tune pick kept 43% ASR on seed 0 and 85% on seed 2), and
since the protection and the thief share the seed, the two causes are confounded. Here each protection
(a variant at a seed: a reproduction unit, reused) is attacked by several thieves that differ only in
their own seed (initialisation, batch order; below the pool's size also the query subset): the run's
own thief (bench.robustness's, its units reused) plus one per `--thief-seeds`. Each thief's copy is
verified (docs/method.md, the protection's calibrated tau0) and fine-tuned on bench.robustness's 1,000
clean labelled images over its whole fine-tuning sweep (the thief keeps the setting with the best clean
accuracy).

Output: per (variant, protection seed, thief seed) the copy's CTA and ASR, and the thief's pick of
fine-tuning; per variant the spread of each measure split into its parts: the standard deviation of
the protections' means (between protections) and the pooled standard deviation over thieves of one
protection (within). Where within is as large as between, a single thief per seed cannot rank
protections; where between dominates, selecting among protect runs (best of k) is worth building.
Writes OUT/spread.md and OUT/spread.json (default runs/spread[-quick]).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from . import robustness as rb
from .benchlib.args import add_common_args, add_data_args
from .benchlib.common import command_line, load_results, log, machine_info, save_report
from .benchlib.data import load_data

NAME = "spread"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.spread", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, quick="bench.reproduce's quick protocol and fine-tuning sweep (a test)", resume=True)
    add_data_args(ap)
    ap.add_argument("--reproduce-out", help="bench.reproduce's units (default runs/reproduce; --quick: runs/reproduce-quick)")
    ap.add_argument("--variants", nargs="+", choices=sorted(rb.VARIANTS), default=["base"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="protection seeds")
    ap.add_argument("--thief-seeds", type=int, nargs="+", default=[10, 20],
                    help="more thieves per protection, beside the one with the protection's seed (default 10 20)")
    ap.add_argument("--budget", type=int, default=20000, help="thief query budget (quick: divided by 10)")
    ap.add_argument("--substitute", default="cnn", help="the thief's architecture (default cnn)")
    ap.add_argument("--labelled", type=int, default=1000, help="the thief's clean labelled images (default 1000)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="run nothing: one report (to --out) from these spread.json files")
    args = ap.parse_args(argv)
    if not args.merge and any(t in args.seeds for t in args.thief_seeds):
        ap.error("--thief-seeds must differ from --seeds (each protection's own seed already gives one thief)")
    rb.default_dirs(args, NAME)
    return args


def decompose(values: dict[int, list[float]]) -> dict:
    """values: protection seed -> one value per thief. Between: the SD of the protections' means;
    within: the pooled SD over thieves of one protection (protections with one thief add nothing)."""
    means = [statistics.mean(v) for v in values.values()]
    dev = [(x - statistics.mean(v)) ** 2 for v in values.values() for x in v]
    dof = sum(len(v) - 1 for v in values.values())
    return {"between_sd": statistics.stdev(means) if len(means) > 1 else None,
            "within_sd": (sum(dev) / dof) ** 0.5 if dof > 0 else None,
            "protection_means": means, "min": min(min(v) for v in values.values()),
            "max": max(max(v) for v in values.values())}


def _pc(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def tables(records: list[dict], parts: list[dict]) -> str:
    out = ["## Every thief", "",
           "| variant | protection seed | thief seed | CTA % | ASR % | verdict | FT pick | CTA after % | ASR after % | verdict after |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        out.append(f"| {r['variant']} | {r['seed']} | {r['thief_seed']} | {_pc(r['cta'])} | {_pc(r['asr'])} | "
                   f"{'flagged' if r['stolen'] else 'not flagged'} | {r['pick']} | {_pc(r['pick_cta'])} | "
                   f"{_pc(r['pick_asr'])} | {'flagged' if r['pick_stolen'] else 'not flagged'} |")
    out += ["", "## Spread (ASR, percentage points)", "",
            "| variant | measure | protections | thieves each | protections' means | between-protection SD | "
            "within-protection SD | min..max |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in parts:
        out.append(f"| {d['variant']} | {d['measure']} | {d['protections']} | {d['thieves']} | "
                   f"{' / '.join(_pc(m) for m in d['protection_means'])} | {_pc(d['between_sd'])} | "
                   f"{_pc(d['within_sd'])} | {_pc(d['min'])}..{_pc(d['max'])} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = command_line("bench.spread", argv)
    if args.merge:
        return merge(args.merge, args.out, command, args.record)
    p, budget, labelled_n = rb.sizes(args)
    full = rb.QUICK_SWEEP if args.quick else rb.Sweep()
    sweep = rb.Sweep(finetune=full.finetune, prune=[], purify=[], cleanse_steps=0)  # fine-tuning only
    device = torch.device(args.device)
    t0 = time.time()
    data = load_data(args, p)
    labelled, _ = rb.labelled_sets(data, p, labelled_n)
    rob = rb.Robustness(args, p, data, device, labelled, sweep)
    rob.rep.victim()
    records = []
    for v in args.variants:
        for seed in args.seeds:
            prot = rob.rep.protection(seed, v, rb.VARIANTS[v])
            for ts in [seed, *args.thief_seeds]:
                thief = rob.rep.thief(seed, "protected", args.substitute, budget, "probs", prot, thief_seed=ts)
                n = len(rob.rows)
                rob.counter_measures(seed, v, prot, "protected", thief)
                rows = rob.rows[n:]
                none = next(r for r in rows if r["measure"] == "none")
                (pick,) = rb.thief_picks(rows).values()  # this thief's rows only: one pick
                records.append({"variant": v, "seed": seed, "thief_seed": ts, "thief": thief["rel"],
                                "cta": none["cta"], "asr": none["asr"], "stolen": none["stolen"],
                                "pick": pick["measure"].replace("finetune-", ""), "pick_cta": pick["cta"],
                                "pick_asr": pick["asr"], "pick_stolen": pick["stolen"], "tau0": prot["tau0"],
                                "finetune": {r["measure"]: {"cta": r["cta"], "asr": r["asr"], "stolen": r["stolen"]}
                                             for r in rows if r["measure"].startswith("finetune")}})
    results = {"benchmark": "bench.spread", "mode": "quick" if args.quick else "full", "command": command,
               "protocol": {"variants": args.variants, "seeds": args.seeds, "thief_seeds": args.thief_seeds,
                            "budget": budget, "substitute": args.substitute, "labelled": labelled_n,
                            "finetune": sweep.finetune, "reproduce_out": args.reproduce_out},
               "machine": machine_info(device), "records": records, "seconds": round(time.time() - t0, 1)}
    return write(Path(args.out), results, t0, args.record)


def spread_parts(records: list[dict]) -> list[dict]:
    parts = []
    for v in dict.fromkeys(r["variant"] for r in records):
        for measure, key in (("extracted copy", "asr"), ("after the thief's pick of fine-tuning", "pick_asr")):
            by_prot: dict[int, list[float]] = {}
            for r in records:
                if r["variant"] == v:
                    by_prot.setdefault(r["seed"], []).append(r[key])
            counts = sorted({len(x) for x in by_prot.values()})
            parts.append({"variant": v, "measure": measure, "protections": len(by_prot),
                          "thieves": "/".join(map(str, counts)), **decompose(by_prot)})
    return parts


def write(out: Path, results: dict, t0: float, record: str | None = None) -> dict:
    results["spread"] = spread_parts(results["records"])
    md = tables(results["records"], results["spread"])
    written = save_report(out, "spread", results, md, record=record, folder=NAME)
    log("\n" + md)
    log(f"\nwrote {', '.join(map(str, written))}  [{time.time() - t0:.0f} s]")
    return results


def merge(paths: list[str], out: str, command: str = "", record: str | None = None) -> dict:
    """One spread report from several spread.json files (e.g. one process per protection seed on a GPU).
    Each (variant, protection seed, thief seed) must come from one file only, on one protocol."""
    t0 = time.time()
    runs = load_results(paths, "bench.spread", ("budget", "substitute", "labelled", "finetune"))
    first = runs[0][1]
    seen: dict[tuple, str] = {}
    records = []
    for path, r in runs:
        for rec in r["records"]:
            k = (rec["variant"], rec["seed"], rec["thief_seed"])
            if k in seen:
                raise SystemExit(f"--merge: {k[0]} seed {k[1]} thief seed {k[2]} is in both {seen[k]} and {path}")
            seen[k] = path
            records.append(rec)
    records.sort(key=lambda r: (r["variant"], r["seed"], r["thief_seed"] != r["seed"], r["thief_seed"]))
    results = {"benchmark": "bench.spread", "mode": first["mode"], "command": command,
               "merged_from": [{"file": str(p_), "command": r["command"], "machine": r["machine"], "seconds": r["seconds"]}
                               for p_, r in runs],
               "protocol": {**first["protocol"], "seeds": sorted({r["seed"] for r in records}),
                            "thief_seeds": sorted({r["thief_seed"] for r in records} - {r["seed"] for r in records})},
               "machine": first["machine"], "records": records, "seconds": round(sum(r["seconds"] for _, r in runs), 1)}
    return write(Path(out), results, t0, record)


if __name__ == "__main__":
    main()
