"""Would a null calibrated on clean *extracted* copies keep verification sound for a stronger trigger? (issue 8)

    python bench/null_study.py            # reads runs/reproduce and runs/robustness/robustness.json

bench/robustness.py found that clean copies extracted from the unprotected victim answer a stronger
trigger's target (eps 20/255) more often than the two reference models tau0 is calibrated on, so
verification flagged innocent copies. This study recalibrates tau0 for every protection of a
robustness run with the same rule (verify.calibrate_tau0) over other reference models: the clean
extracted substitutes of the *other* seeds (CNN and ResNet-20 at 20k soft labels, CNN label-only,
CNN at 5k; trained with other seeds, so independent of the copies being judged), and re-judges every
verification of the run (its hits and n) under that tau0. It prints, per variant and seed, tau0 and
how many protected copies and clean copies are flagged under each null. No model is trained.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from honeypotnet.bundle import load_bundle, load_model
from honeypotnet.data import load_dataset
from honeypotnet.verify import binomial_p_value, calibrate_tau0

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import reproduce as rp  # noqa: E402

EXTRACTED = ["thief-clean-cnn-20000-probs", "thief-clean-resnet20-20000-probs", "thief-clean-cnn-20000-label",
             "thief-clean-cnn-5000-probs"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    rp.add_data_args(ap, victim=False)
    ap.add_argument("--reproduce-out", default=str(REPO / "runs" / "reproduce"))
    ap.add_argument("--robustness", default=str(REPO / "runs" / "robustness" / "robustness.json"),
                    help="a bench/robustness.py result (its rows and substitutes are re-judged)")
    ap.add_argument("--out", default=str(REPO / "runs" / "null-study.json"))
    args = ap.parse_args(argv)
    rob = json.loads(Path(args.robustness).read_text())
    out_dir = Path(args.reproduce_out)
    cifar_root, _ = rp.resolve_roots(argparse.Namespace(**vars(args), victim_weights=None))
    test = load_dataset("imagefolder", cifar_root, "test")
    calib, _ = rp.split_per_class(test.labels, len(test.classes), rp.FULL.calib_per_class, rp.FULL.verify_per_class)
    seeds = sorted({p["seed"] for p in rob["protections"]})
    results = []
    for p in rob["protections"]:
        s, v = p["seed"], p["protection"]
        refs = []
        for o in seeds:
            if o == s:
                continue
            for name in EXTRACTED:
                f = out_dir / f"seed{o}" / name / "substitute.safetensors"
                if f.exists():
                    refs.append((f"seed{o}/{name}", load_model(f)[0].eval()))
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
        results.append({"seed": s, "variant": v, "tau0_references": p["tau0"], "tau0_extracted": cal.tau0,
                        "extracted_reference": cal.reference, **count})
        rp.log(f"{v:>8} seed {s}: tau0 {100 * p['tau0']:.1f}% -> {100 * cal.tau0:.1f}% (max reference ASR "
               f"{100 * max(r['asr'] for r in cal.reference):.1f}%)  protected flagged {count['protected']['flagged_references']}"
               f" -> {count['protected']['flagged_extracted']} of {count['protected']['n']}  clean flagged "
               f"{count['clean']['flagged_references']} -> {count['clean']['flagged_extracted']} of {count['clean']['n']}")
    rp._write_json(Path(args.out), {"benchmark": "bench/null_study.py", "robustness": args.robustness, "results": results})
    return {"results": results}


if __name__ == "__main__":
    main()
