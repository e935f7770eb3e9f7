"""Would a null calibrated on clean *extracted* copies keep verification sound for a stronger trigger?
(the robustness study; docs/research/null-and-false-positives.md)

    python -m bench.null_study            # reads runs/reproduce and runs/robustness/robustness.json
    python -m bench.null_study --quick    # runs/reproduce-quick and runs/robustness-quick (the quick split)

bench.robustness found that clean copies extracted from the unprotected victim answer a stronger
trigger's target (eps 20/255) more often than the two reference models tau0 is calibrated on, so
verification flagged innocent copies. This study recalibrates tau0 for every protection of a
robustness run with the same rule (verify.calibrate_tau0) over other reference models: the clean
extracted substitutes of the *other* seeds (CNN and ResNet-20 at 20k soft labels, CNN label-only,
CNN at 5k; trained with other seeds, so independent of the copies being judged), and re-judges every
verification of the run (its hits and n) under that tau0. It prints, per variant and seed, tau0 and
how many protected copies and clean copies are flagged under each null. No model is trained.
Output: OUT/null-study.json and OUT/null-study.md (default runs/null-study[-quick]).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from honeypotnet.bundle import load_bundle, load_model
from honeypotnet.data import load_dataset
from honeypotnet.verify import binomial_p_value, calibrate_tau0

from .benchlib.args import add_common_args, add_data_args, default_out, finish_common_args
from .benchlib.common import command_line, log, save_report, set_threads
from .benchlib.data import resolve_roots, split_per_class
from .benchlib.protocol import FULL, QUICK

NAME = "null-study"
EXTRACTED = ["thief-clean-cnn-{full}-probs", "thief-clean-resnet20-{full}-probs", "thief-clean-cnn-{full}-label",
             "thief-clean-cnn-{quarter}-probs"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.null_study", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, quick="the quick protocol's runs and test split", resume=None, progress=False)
    add_data_args(ap, victim=False)
    ap.add_argument("--reproduce-out", help="bench.reproduce's units (default runs/reproduce; --quick: runs/reproduce-quick)")
    ap.add_argument("--robustness", help="a bench.robustness result whose rows and substitutes are re-judged "
                                         "(default runs/robustness[-quick]/robustness.json)")
    args = ap.parse_args(argv)
    args.reproduce_out = args.reproduce_out or str(default_out("reproduce", args.quick))
    args.robustness = args.robustness or str(default_out("robustness", args.quick) / "robustness.json")
    return finish_common_args(args, NAME)


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads()
    device = torch.device(args.device)
    p = QUICK if args.quick else FULL
    rob = json.loads(Path(args.robustness).read_text())
    out_dir = Path(args.reproduce_out)
    cifar_root, _ = resolve_roots(args)
    test = load_dataset("imagefolder", cifar_root, "test")
    calib, _ = split_per_class(test.labels, len(test.classes), p.calib_per_class, p.verify_per_class)
    full = rob["protocol"]["budget"]
    names = [n.format(full=full, quarter=max(1, full // 4)) for n in EXTRACTED]
    seeds = sorted({pr["seed"] for pr in rob["protections"]})
    results = []
    for pr in rob["protections"]:
        s, v = pr["seed"], pr["protection"]
        refs = []
        for o in seeds:
            if o == s:
                continue
            for name in names:
                f = out_dir / f"seed{o}" / name / "substitute.safetensors"
                if f.exists():
                    refs.append((f"seed{o}/{name}", load_model(f)[0].eval().to(device)))
        if not refs:
            raise SystemExit(f"no clean extracted substitutes of other seeds than {s} under {out_dir}")
        b = load_bundle(out_dir / f"seed{s}" / f"protect-{v}" / "bundle")
        cal = calibrate_tau0(refs, b.trigger, test.images[calib], test.labels[calib], b.target)
        recs = [r for r in rob["rows"] if (r["seed"], r["variant"]) == (s, v) and "hits" in r]
        recs += [r for r in rob["substitutes"] if (r["seed"], r["protection"]) == (s, v)]
        count = {}
        for oracle in ("protected", "clean"):
            mine = [r for r in recs if r["oracle"] == oracle]
            count[oracle] = {"n": len(mine), "flagged_references": sum(r["stolen"] for r in mine),
                             "flagged_extracted": sum(binomial_p_value(r["hits"], r["n"], cal.tau0) < r["alpha"] for r in mine)}
        results.append({"seed": s, "variant": v, "tau0_references": pr["tau0"], "tau0_extracted": cal.tau0,
                        "extracted_reference": cal.reference, **count})
        log(f"{v:>8} seed {s}: tau0 {100 * pr['tau0']:.1f}% -> {100 * cal.tau0:.1f}% (max reference ASR "
            f"{100 * max(r['asr'] for r in cal.reference):.1f}%)  protected flagged {count['protected']['flagged_references']}"
            f" -> {count['protected']['flagged_extracted']} of {count['protected']['n']}  clean flagged "
            f"{count['clean']['flagged_references']} -> {count['clean']['flagged_extracted']} of {count['clean']['n']}")
    md = ["| variant | seed | tau0: references → extracted copies | protected flagged (references → extracted) "
          "| clean flagged (references → extracted) |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        md.append(f"| {r['variant']} | {r['seed']} | {100 * r['tau0_references']:.1f} → {100 * r['tau0_extracted']:.1f} | "
                  f"{r['protected']['flagged_references']} → {r['protected']['flagged_extracted']} of {r['protected']['n']} | "
                  f"{r['clean']['flagged_references']} → {r['clean']['flagged_extracted']} of {r['clean']['n']} |")
    out = {"benchmark": "bench.null_study", "mode": "quick" if args.quick else "full",
           "command": command_line("bench.null_study", argv), "robustness": args.robustness, "results": results}
    written = save_report(Path(args.out), "null-study", out, "\n".join(md), record=args.record, folder=NAME)
    log(f"wrote {', '.join(map(str, written))}")
    return out


if __name__ == "__main__":
    main()
