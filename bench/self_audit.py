"""Can the owner tell a strong protection from a weak one before any thief shows up? (issue 8)

    python bench/self_audit.py                      # every protection robustness.py has attacked
    python bench/self_audit.py --protections base:0 base:1 negcr0.25-eps24:2
    python bench/self_audit.py --quick              # reproduce.py's quick protocol (a test)

bench/spread.py measured that the fine-tuned thief's ASR varies far more from one protect run to the
next (same configuration, another seed) than from one thief to the next against the same protection.
If the owner could rank protect runs without a real thief, protecting k times and keeping the best
would lift the worst case. The audit uses only what the owner has:

  1. extract a CNN copy from the protected model on the owner's shadow set (Tiny ImageNet val; the
     thieves of the protocol query Tiny ImageNet train), soft labels, the protocol's thief epochs;
  2. fine-tune it as a suspicious thief would (3 and 10 epochs at lr 0.01; 10 epochs at lr 0.01 is
     the setting the thieves' sweep picked most often) on 1,000 of the owner's labelled images
     (never the thief's);
  3. measure the ASR of the copy and of each fine-tuned copy on the calibration half of the test set
     (the verification half stays unused): three audit scores.

Each protection must exist already (reproduce.py / robustness.py units; none is trained here), and
so must its real 20k CNN thief's fine-tuning sweep (robustness.py's units), which gives the real
figures the audit is compared with: the thief's pick of fine-tuning (best clean accuracy over the
sweep). Output: one row per protection; per audit score, its rank correlation with the real pick's
ASR over all protections and within each variant, and the real pick's ASR of the protection the
score ranks first (OUT/self-audit.md, .json; default runs/self-audit[-quick]).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from honeypotnet.attacks import query_oracle, train_substitute
from honeypotnet.bundle import load_model, save_model
from honeypotnet.countermeasures import assess, finetune
from honeypotnet.oracles import ModelOracle
from honeypotnet.training import FitConfig, default_device

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import reproduce as rp  # noqa: E402
import robustness as rb  # noqa: E402

# the audit copy is fine-tuned like this (besides being measured as extracted)
AUDIT_FINETUNES = ((3, 0.01), (10, 0.01))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_data_args(ap)
    ap.add_argument("--reproduce-out", help="reproduce.py's units (default runs/reproduce; --quick: runs/reproduce-quick)")
    ap.add_argument("--out", help="where self-audit.md and .json go (default runs/self-audit[-quick])")
    ap.add_argument("--quick", action="store_true", help="reproduce.py's quick protocol (a test)")
    ap.add_argument("--protections", nargs="+", metavar="VARIANT:SEED",
                    help="which protections (default: every one whose real thief robustness.py fine-tuned)")
    ap.add_argument("--budget", type=int, default=20000, help="the real thief's budget (quick: divided by 10)")
    ap.add_argument("--labelled", type=int, default=1000, help="the owner's labelled images (default 1000)")
    ap.add_argument("--device", default=str(default_device()))
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty())
    args = ap.parse_args(argv)
    rb.default_dirs(args, "self-audit")
    return args


def real_finetune(out: Path, seed: int, variant: str, budget: int) -> dict | None:
    """The real thief's fine-tuning sweep (robustness.py's units): {measure: {cta, asr}}, or None."""
    thief = out / f"seed{seed}" / f"thief-{variant}-cnn-{budget}-probs"
    res = {}
    for f in sorted(thief.glob(f"robust-{variant}-finetune-*/unit.json")) + [thief / f"robust-{variant}-none/unit.json"]:
        if f.exists():
            rec = json.loads(f.read_text())
            res[f.parent.name.replace(f"robust-{variant}-", "")] = {"cta": rec["cta"], "asr": rec["asr"]}
    return res if "none" in res and len(res) > 1 else None


def spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):  # average ranks over ties
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    if statistics.pstdev(rx) == 0 or statistics.pstdev(ry) == 0:
        return None
    return statistics.correlation(rx, ry)


def _corr(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    p, budget, labelled_n = rb.sizes(args)
    device = torch.device(args.device)
    out_units = Path(args.reproduce_out)
    if args.protections:
        wanted = []
        for spec in args.protections:
            v, _, s = spec.rpartition(":")
            if v not in rb.VARIANTS or not s.isdigit():
                raise SystemExit(f"--protections: {spec!r} is not VARIANT:SEED with a variant of {sorted(rb.VARIANTS)}")
            wanted.append((v, int(s)))
    else:
        wanted = sorted((v, int(d.name[4:])) for d in out_units.glob("seed*") for v in rb.VARIANTS
                        if real_finetune(out_units, int(d.name[4:]), v, budget))
    if not wanted:
        raise SystemExit(f"no protection with a fine-tuned real thief under {out_units} (run bench/robustness.py first)")
    t0 = time.time()
    data = rp.load_data(rb.reproduce_args(args), p)
    _, (ox, oy) = rb.labelled_sets(data, p, labelled_n)
    rep = rp.Reproduction(rb.reproduce_args(args), p, data, device)
    rep.victim()
    rows = []
    for v, seed in wanted:
        real = real_finetune(out_units, seed, v, budget)
        if real is None:
            rp.log(f"[{v} seed {seed}] no real thief's fine-tuning sweep: skipped")
            continue
        rep.units.deadline = time.time()  # resume the protection, never train it here
        try:
            prot = rep.protection(seed, v, rb.VARIANTS[v])
        except rp.DeadlineReached:
            rp.log(f"[{v} seed {seed}] the protection's units are missing or stale: skipped")
            continue
        finally:
            rep.units.deadline = None
        b = prot["bundle"]
        fitc = FitConfig(epochs=p.thief_epochs, seed=700 + seed)
        imgs, labels = data.test_images[data.calib], data.test_labels[data.calib]
        rel = f"{prot['rel']}/self-audit"

        def extract(d: Path, b=b, fitc=fitc) -> dict:
            answers = query_oracle(ModelOracle(b.model.to(device).eval()), data.shadow, batch_size=500)
            copy = train_substitute("cnn", 10, data.shadow, answers, fitc, progress=args.progress, device=device)
            save_model(copy, d / "substitute.safetensors", "cnn", 10, data.classes)
            a = assess(copy, b.trigger, imgs, labels, b.target, b.tau0, alpha=p.alpha)
            return {"cta": a["cta"], "asr": a["asr"]}

        rec = rep.units.run(rel, {"protection": prot["key"], "fit": asdict(fitc), "shadow": len(data.shadow)}, extract,
                            "self-audit copy")
        copy = load_model(Path(args.reproduce_out) / rel / "substitute.safetensors")[0].to(device)
        audit = {"copy": rec["asr"]}
        seconds = rec["seconds"]
        for e, lr in AUDIT_FINETUNES:
            def tune(_d: Path, e=e, lr=lr, b=b, seed=seed) -> dict:
                a = assess(finetune(copy, ox, oy, e, lr, seed=seed), b.trigger, imgs, labels, b.target, b.tau0, alpha=p.alpha)
                return {"cta": a["cta"], "asr": a["asr"]}
            ft_rec = rep.units.run(f"{rel}/finetune-e{e}-lr{lr:g}", {"copy": rec["key"], "epochs": e, "lr": lr,
                                                                    "labelled": labelled_n}, tune, "self-audit fine-tune")
            audit[f"e{e}-lr{lr:g}"] = ft_rec["asr"]
            seconds += ft_rec["seconds"]
        ft = {k: r for k, r in real.items() if k.startswith("finetune")}
        # robustness.py's rule for the thief's pick, on the real thief's unit records
        (pick,) = rb.thief_picks([{"variant": v, "oracle": "protected", "seed": seed, "measure": k, **r}
                                  for k, r in real.items()]).values()
        pick_name = pick["measure"]
        row = {"variant": v, "seed": seed, "tau0": prot["tau0"], "audit": audit, "audit_copy_cta": rec["cta"],
               "real_asr": real["none"]["asr"], "real_pick": pick_name.replace("finetune-", ""), "real_pick_asr": pick["asr"],
               "real_finetune": {k.replace("finetune-", ""): r["asr"] for k, r in ft.items()}, "seconds": round(seconds, 1)}
        rows.append(row)
        rp.log(f"[{v} seed {seed}] audit ASR: " + ", ".join(f"{k} {100 * x:.1f}%" for k, x in audit.items()) +
               f" | real thief: {100 * row['real_asr']:.1f}%, pick ({row['real_pick']}) {100 * row['real_pick_asr']:.1f}%"
               f"  [{seconds:.0f} s{', resumed' if rec['resumed'] else ''}]")
    if not rows:
        raise SystemExit("no protection could be audited (each needs its protection's units and its real thief's "
                         "fine-tuning sweep: bench/robustness.py makes both)")
    scores = list(rows[0]["audit"])
    corr = []
    groups = [("all", rows)] + [(v, [r for r in rows if r["variant"] == v]) for v in dict.fromkeys(r["variant"] for r in rows)]
    for name, rs in groups:
        if len(rs) < 2:
            continue
        y = [r["real_pick_asr"] for r in rs]
        for score in scores:
            best = max(rs, key=lambda r: r["audit"][score])
            corr.append({"group": name, "score": score, "n": len(rs), "spearman": spearman([r["audit"][score] for r in rs], y),
                         "audit_best": f"seed {best['seed']}" if name != "all" else f"{best['variant']} seed {best['seed']}",
                         "audit_best_real_pick_asr": best["real_pick_asr"],
                         "real_best_pick_asr": max(y), "real_worst_pick_asr": min(y)})
    md = ["| variant | seed | tau0 % | " + " | ".join(f"audit: {k} ASR %" for k in scores) +
          " | real thief ASR % | real pick | real pick ASR % |", "| --- " * (6 + len(scores)) + "|"]
    md += [f"| {r['variant']} | {r['seed']} | {100 * r['tau0']:.1f} | " + " | ".join(f"{100 * r['audit'][k]:.1f}" for k in scores) +
           f" | {100 * r['real_asr']:.1f} | {r['real_pick']} | {100 * r['real_pick_asr']:.1f} |" for r in rows]
    md += ["", "| group | audit score | protections | Spearman with the real pick's ASR | audit's choice | its real pick ASR % | "
           "best / worst real pick ASR % |", "| --- | --- | --- | --- | --- | --- | --- |"]
    md += [f"| {c['group']} | {c['score']} | {c['n']} | {_corr(c['spearman'])} | {c['audit_best']} | "
           f"{100 * c['audit_best_real_pick_asr']:.1f} | {100 * c['real_best_pick_asr']:.1f} / "
           f"{100 * c['real_worst_pick_asr']:.1f} |" for c in corr]
    text = "\n".join(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"benchmark": "bench/self_audit.py", "mode": "quick" if args.quick else "full",
               "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "protocol": {"audit_finetunes": AUDIT_FINETUNES, "thief_epochs": p.thief_epochs, "labelled": labelled_n,
                            "shadow": len(data.shadow), "budget": budget, "reproduce_out": args.reproduce_out},
               "machine": rp.machine_info(device), "rows": rows, "correlation": corr, "seconds": round(time.time() - t0, 1)}
    rp._write_json(out / "self-audit.json", results)
    (out / "self-audit.md").write_text(text + "\n")
    rp.log("\n" + text)
    rp.log(f"\nwrote {out / 'self-audit.md'}, {out / 'self-audit.json'}  [{time.time() - t0:.0f} s]")
    return results


if __name__ == "__main__":
    main()
