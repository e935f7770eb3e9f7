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

    python -m bench.null_study --families mobilenetv2_small convmixer --reproduce-out runs/reproduce \
        --protection robust --arsenal-out runs/arsenal      # a null calibrated on more network families

`--families`: would reference models of families the null does not hold keep an innocent model of such a family
below tau0? Trains one clean reference per family from the *unprotected* victim exactly as the protocol's
references (its soft answers to the shadow set, the protocol's reference epochs and seed; resumable units in
OUT, nothing is written to the reproduction), recalibrates tau0 for the seed's protections with the protocol's
references and with them plus the families (verify.calibrate_tau0, on the calibration half), and re-judges
every copy bench.reproduce and the given bench.arsenal runs verified (their hits / n and paired p-values;
verify.stolen_verdict) under both. Output: OUT/null-families.json and .md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from honeypotnet.bundle import load_bundle, load_model, save_model
from honeypotnet.data import load_dataset
from honeypotnet.training import FitConfig, accuracy
from honeypotnet.verify import binomial_p_value, calibrate_tau0, stolen_verdict, train_reference_models

from .benchlib.args import add_common_args, add_data_args, default_out, finish_common_args
from .benchlib.common import command_line, log, machine_info, save_report, set_threads
from .benchlib.data import load_data, resolve_roots, split_per_class
from .benchlib.protocol import FULL, QUICK, load_references
from .benchlib.units import Units

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
    g = ap.add_argument_group("a null of more families (--families)")
    g.add_argument("--families", nargs="+", metavar="ARCH",
                   help="train a clean reference of each of these archs and re-judge every copy with them in the null")
    g.add_argument("--protection", nargs="+", help="--families: which protections of the seed (default: every one "
                                                   "the copies stole from)")
    g.add_argument("--seed", type=int, default=0, help="--families: the reproduction's seed (default 0)")
    g.add_argument("--arsenal-out", nargs="*", default=[], metavar="DIR",
                   help="--families: bench.arsenal runs made from the reproduction (their copies are re-judged too)")
    args = ap.parse_args(argv)
    args.reproduce_out = args.reproduce_out or str(default_out("reproduce", args.quick))
    if args.families:
        return finish_common_args(args, "null-families")
    args.robustness = args.robustness or str(default_out("robustness", args.quick) / "robustness.json")
    return finish_common_args(args, NAME)


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads()
    if args.families:
        return families_main(args, argv)
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


def family_references(args, p, src: Path, seed: int) -> list:
    """One clean reference per --families arch, trained like the protocol's references (the unprotected victim's
    soft answers to the shadow set, p.reference_epochs, seed 100 + seed): a resumable unit each in --out."""
    units = Units(Path(args.out), resume=True)
    victim, _ = load_model(src / "victim" / "victim.safetensors")
    victim_key = json.loads((src / "victim" / "unit.json").read_text())["key"]
    data = None
    refs = []
    for arch in args.families:
        rel = f"seed{seed}/reference-{arch}"

        def run(d: Path, arch=arch) -> dict:
            nonlocal data
            data = data or load_data(args, p)
            cfg = FitConfig(epochs=p.reference_epochs, seed=100 + seed)
            [(_, m)] = train_reference_models(victim, data.shadow, [arch], 10, cfg, device=torch.device(args.device))
            save_model(m.cpu(), d / f"{arch}.safetensors", arch, 10, data.classes)
            return {"arch": arch, "cta": accuracy(m, data.test_images[data.verif], data.test_labels[data.verif])}

        rec = units.run(rel, {"victim": victim_key, "arch": arch, "epochs": p.reference_epochs, "seed": seed,
                              "shadow": p.shadow}, run, "reference")
        log(f"reference {arch}: CTA {100 * rec['cta']:.2f}%  [{rec['seconds']:.0f} s{', resumed' if rec['resumed'] else ''}]")
        refs.append((arch, load_model(Path(args.out) / rel / f"{arch}.safetensors")[0].eval()))
    return refs


def judge(c: dict, tau0: float, alpha: float) -> dict:
    p_value = binomial_p_value(c["hits"], c["n"], tau0)
    return {"p_value": p_value, "stolen": stolen_verdict(p_value, c.get("paired_p_value"), alpha)}


def families_main(args, argv) -> dict:
    from .ownership import copies, label_of, verification_set  # the copies and images as bench.ownership reads them

    p = QUICK if args.quick else FULL
    src = Path(args.reproduce_out)
    _, _, calib_images, calib_labels = verification_set(args, p)
    rows = [c for c in copies(src, [Path(a) for a in args.arsenal_out]) if c["seed"] == args.seed and "hits" in c]
    protections = args.protection or sorted({c["protection"] for c in rows})
    base = load_references(src, args.seed, p.reference_archs)
    extra = family_references(args, p, src, args.seed)
    results = []
    for name in protections:
        b = load_bundle(src / f"seed{args.seed}" / f"protect-{name}" / "bundle")
        before = calibrate_tau0(base, b.trigger, calib_images, calib_labels, b.target)
        after = calibrate_tau0(base + extra, b.trigger, calib_images, calib_labels, b.target)
        if abs(before.tau0 - b.tau0) > 1e-9:
            raise SystemExit(f"{name}: tau0 recomputed {before.tau0} != the bundle's {b.tau0} (other references?)")
        judged = []
        for c in (c for c in rows if c["protection"] == name):
            alpha = c.get("alpha") or p.alpha
            old, new = judge(c, before.tau0, alpha), judge(c, after.tau0, alpha)
            where = f" ({c['rel'].split('/')[0]})" if str(c.get("source", "")).startswith("arsenal") else ""
            judged.append({"copy": c["rel"], "label": label_of(c) + where, "oracle": c["oracle"], "output": c["output"],
                           "asr": c["hits"] / c["n"], "hits": c["hits"], "n": c["n"],
                           "paired_p_value": c.get("paired_p_value"), "before": old, "after": new})
            log(f"{name} {c['rel']}: ASR {100 * c['hits'] / c['n']:.2f}%  {'flagged' if old['stolen'] else 'cleared'}"
                f" -> {'flagged' if new['stolen'] else 'cleared'}")
        count = {o: {"n": sum(j["oracle"] == o for j in judged),
                     "flagged_before": sum(j["before"]["stolen"] for j in judged if j["oracle"] == o),
                     "flagged_after": sum(j["after"]["stolen"] for j in judged if j["oracle"] == o)}
                 for o in ("protected", "clean")}
        results.append({"protection": name, "tau0_before": before.tau0, "tau0_after": after.tau0,
                        "reference": after.reference, "copies": judged, **count})
        log(f"{name}: tau0 {100 * before.tau0:.2f}% -> {100 * after.tau0:.2f}%  (" + ", ".join(
            f"{r['arch']} {100 * r['asr']:.2f}%" for r in after.reference) + ")")
    md = ["| protection | tau0: references → + families | reference ASR | stolen flagged | clean flagged |",
          "| --- | --- | --- | --- | --- |"]
    for r in results:
        refs = ", ".join(f"{x['arch']} {100 * x['asr']:.2f}" for x in r["reference"])
        md.append(f"| {r['protection']} | {100 * r['tau0_before']:.2f} → {100 * r['tau0_after']:.2f} | {refs} | "
                  f"{r['protected']['flagged_before']} → {r['protected']['flagged_after']} of {r['protected']['n']} | "
                  f"{r['clean']['flagged_before']} → {r['clean']['flagged_after']} of {r['clean']['n']} |")
    md += ["", "| protection | copy | oracle | output | ASR % | verdict: references → + families |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for j in sorted(r["copies"], key=lambda j: (j["oracle"] != "protected", j["copy"])):
            v = lambda x: "flagged" if x["stolen"] else "cleared"  # noqa: E731
            md.append(f"| {r['protection']} | {j['label']} | {j['oracle']} | {j['output']} | {100 * j['asr']:.2f} | "
                      f"{v(j['before'])} → {v(j['after'])} |")
    out = {"benchmark": "bench.null_study", "mode": "quick" if args.quick else "full", "study": "families",
           "command": command_line("bench.null_study", argv), "reproduce_out": str(src),
           "arsenal_out": list(args.arsenal_out), "seed": args.seed, "families": args.families,
           "machine": machine_info(torch.device(args.device)), "results": results}
    written = save_report(Path(args.out), "null-families", out, "\n".join(md), record=args.record, folder=NAME)
    log("\n".join(md))
    log(f"wrote {', '.join(map(str, written))}")
    return out


if __name__ == "__main__":
    main()
