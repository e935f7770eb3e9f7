"""Natural witnesses: ownership evidence from unmodified images, which no perturbation detector can see.

    python -m bench.witnesses --reproduce-out runs/reproduce-indist --protection robust --arsenal-out runs/arsenal-families

The trigger's verification queries are perturbed images, and a suspect who knows the method can learn to spot
them (bench.ownership: AUC up to 1.0) and answer them evasively. A witness is an ordinary image instead: one of
the owner's natural images on which the honeypot raised the target class's probability most over the unprotected
victim's. A copy trained on the protected API's answers learned those raised answers, so it may answer the target
on the witnesses more often than an innocent model does. The owner needs nothing but images and both models.

For one protection of a finished bench.reproduce run (read only):
1. Witnesses. Per pool of the owner's natural images (the protocol's shadow set, Tiny ImageNet val, which the
   thief's pool never overlaps; and cifar10-jpeg/test, the owner's held-out images of its own task), the images
   are ranked by p_protected(target) - p_victim(target), among those the victim does not answer the target (and,
   where the pool has labels, not of the target class); the top `--witnesses` (default 100) are the witnesses.
2. Null. tau0 by the trigger's own rule (verify.calibrate_tau0: twice the largest Clopper-Pearson upper bound
   over the seed's reference models, floor 5%, cap 50%) with the witnesses as the (unstamped) images. Beside it,
   `--independent` models that never saw the victim's answers (default: the pretrained CIFAR-10 ResNet-32/44/56
   of SHARED/weights/resnet-cifar10, trained on the true labels by someone else): their rates are the
   false-positive check the references cannot give, since the references imitate the victim.
3. Every copy (the reproduction's thieves and clean twins; `--arsenal-out`: bench.arsenal runs made from it):
   its rate of target answers on the witnesses, the fixed-n one-sided binomial p-value against tau0, and the
   sequential test of docs/verification.md (alpha `--alpha`, batches of `--batch-size`) over `--orders` random
   orders of the witnesses: verdict and queries used.
4. Stealth. For each stolen copy, the ROC AUC of bench.ownership's input and output detectors (high-frequency
   energy, the copy's uncertainty, feature squeezing) separating the witnesses from `--others` of the pool's other
   images (the ordinary traffic they hide in), and what a suspect answering its best detector's flagged queries evasively
   (10% false alarms on the other images) does to the verdict.

Output: OUT/witnesses.json and OUT/witnesses.md; `--record NAME` also docs/results/witnesses/NAME.{md,json}.
"""
from __future__ import annotations

import argparse
import glob
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from honeypotnet.bundle import load_bundle, load_model
from honeypotnet.data import load_dataset
from honeypotnet.models import create_model
from honeypotnet.ops import to_float
from honeypotnet.trigger import Trigger
from honeypotnet.verify import binomial_p_value, calibrate_tau0

from .benchlib.args import add_common_args, add_data_args, finish_common_args
from .benchlib.common import command_line, log, machine_info, save_report
from .benchlib.data import resolve_roots
from .benchlib.protocol import load_references, open_reproduction, protection_bundle
from .ownership import auc, copies, detector_scores, evade, label_of, orders, sequential_replay, softmax, summarize

NAME = "witnesses"
WITNESS_DETECTORS = ("laplacian", "uncertainty", "squeeze")
# innocent models trained on the true labels, never on the victim's answers (SHARED = --shared)
INDEPENDENT = [f"resnet{d}=SHARED/weights/resnet-cifar10/resnet{d}-*.th" for d in (32, 44, 56)]


def identity_trigger(image_size: int) -> Trigger:
    """A trigger that stamps nothing (mask 0): verify's machinery on unmodified images."""
    return Trigger(torch.zeros(3, image_size, image_size), torch.zeros(1, image_size, image_size), "patch")


def select_witnesses(p_protected: torch.Tensor, p_victim: torch.Tensor, target: int, k: int,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k images whose target probability the honeypot raised most (p_protected[:, t] -
    p_victim[:, t], largest first), among those the victim does not answer t and (labels given) whose label is
    not t. Fewer than k when fewer qualify. Uses only the owner's two models, never a suspect's answers."""
    if p_protected.shape != p_victim.shape or p_protected.ndim != 2:
        raise ValueError(f"probabilities must be (N, K) alike, got {tuple(p_protected.shape)} and {tuple(p_victim.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ok = p_victim.argmax(1) != target
    if labels is not None:
        ok &= labels != target
    gain = (p_protected[:, target] - p_victim[:, target]).masked_fill(~ok, float("-inf"))
    order = torch.argsort(gain, descending=True, stable=True)
    return order[: min(k, int(ok.sum()))]


def score_copy(pred: np.ndarray, target: int, tau0: float, args) -> dict:
    hits = (pred == target).astype(float)
    perms = orders(len(hits), args.orders, args.seed)
    runs = [sequential_replay(hits[p], tau0, args.alpha, args.batch_size) for p in perms]
    return {"rate": float(hits.mean()), "hits": int(hits.sum()), "n": len(hits),
            "p_fixed": binomial_p_value(int(hits.sum()), len(hits), tau0), **summarize(runs)}


def evaded_verdict(model, w: torch.Tensor, others: torch.Tensor, pred: np.ndarray, target: int, tau0: float,
                   args) -> dict:
    """Detector AUCs (witnesses vs the pool's other images) on the copy, and the verdict once the copy answers
    whatever its best detector flags (bench.ownership.evade; threshold: args.fpr false alarms on the other
    images) with its best non-target class (`pred`: its answers to the witnesses)."""
    sw, so = detector_scores(model, to_float(w)), detector_scores(model, to_float(others))
    sw, so = ({k: d[k] for k in WITNESS_DETECTORS} for d in (sw, so))
    aucs = {k: auc(sw[k], so[k]) for k in WITNESS_DETECTORS}
    e = evade(aucs, sw, so, so, pred, target, args.fpr)
    hits = e["hits_evaded"]
    perms = orders(len(hits), args.orders, args.seed)
    ev = summarize([sequential_replay(hits[p], tau0, args.alpha, args.batch_size) for p in perms])
    return {"aucs": aucs, "best": e["best"], "separation": max(aucs[e["best"]], 1 - aucs[e["best"]]),
            "flagged": float(e["flag_stamped"].mean()), "rate_evaded": float(hits.mean()), "evaded": ev}


def pools(args, p) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    cifar_root, tin_root = resolve_roots(args)
    tin = load_dataset("tinyimagenet", tin_root, "val", size=32).images[: p.shadow]
    test = load_dataset("imagefolder", cifar_root, "test")
    return {"tin-val (shadow set)": (tin, None), "cifar10 test (held out)": (test.images, test.labels)}


def independent_models(args) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for spec in args.independent:
        arch, _, pattern = spec.partition("=")
        files = sorted(glob.glob(pattern.replace("SHARED", str(Path(args.shared)))))
        if not files:
            log(f"independent {arch}: no file matches {pattern}; skipped")
            continue
        out.append((arch, create_model(arch, 10, pretrained=files[0]).eval()))
    return out


def report(res: dict, args) -> str:
    out = [f"# Natural witnesses: ownership evidence from unmodified images ({res['protection']}, "
           f"{'quick' if args.quick else 'full'} protocol)", "",
           f"{args.witnesses} witnesses per pool: the owner's natural images on which the honeypot raised the target's "
           "probability most over the victim's (victim not answering the target). tau0 by the trigger's rule over the "
           f"reference models on the witnesses; sequential test at alpha {args.alpha:g} over {args.orders} orders "
           "(verdict, queries median / max); fixed-n p against tau0 with every witness.", ""]
    for name, pool in res["pools"].items():
        out += [f"## {name}: {pool['n']} witnesses of {pool['pool_size']}, tau0 {100 * pool['tau0']:.1f}%", "",
                f"The protected model answers the target on {100 * pool['protected_rate']:.0f}% of them. "
                "References: " + ", ".join(f"{r['arch']} {100 * r['asr']:.1f}%" for r in pool["calibration"]["reference"])
                + ". Independent models (never saw the victim's answers): "
                + (", ".join(f"{k} {100 * v['rate']:.1f}% ({v['verdict']})" for k, v in pool["independent"].items()) or "none")
                + ".", "",
                "| copy | thief | output | trigger ASR | witness rate | fixed-n p | sequential verdict | queries median / max |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in pool["copies"]:
            s = c["score"]
            out.append(f"| {'stolen' if c['oracle'] == 'protected' else 'clean twin'} | {c['label']} | "
                       f"{'label-only' if c['output'] == 'label' else 'soft'} | {100 * c['asr']:.1f}% | {100 * s['rate']:.1f}% | "
                       f"{s['p_fixed']:.1e} | {s['verdict']} | {s['median']:g} / {s['max']} |")
        st = pool["stealth"]
        if st:
            out += ["", "Stealth (stolen copies): AUC witnesses vs the pool's other images; the suspect answering its best "
                        f"detector's flagged queries ({100 * args.fpr:.0f}% false alarms) evasively:", "",
                    "| copy | " + " | ".join(f"AUC {k}" for k in WITNESS_DETECTORS) + " | flagged | rate → evaded | evaded verdict |",
                    "| --- | " + " | ".join("---" for _ in WITNESS_DETECTORS) + " | --- | --- | --- |"]
            for c in st:
                e = c["stealth"]
                out.append(f"| {c['label']} {c['output']} | " + " | ".join(f"{e['aucs'][k]:.3f}" for k in WITNESS_DETECTORS)
                           + f" | {100 * e['flagged']:.0f}% | {100 * c['score']['rate']:.1f}% → {100 * e['rate_evaded']:.1f}% | "
                           f"{e['evaded']['verdict']} |")
        out.append("")
    s = res["summary"]
    out += ["## Summary", ""] + [f"- {name}: stolen flagged (every order) {v['stolen_flagged']}/{v['stolen']}, median "
                                 f"queries {v['stolen_median']:g}; clean twins flagged {v['clean_flagged']}/{v['clean']}; "
                                 f"independent models flagged {v['independent_flagged']}/{v['independent']}; largest "
                                 f"detector separation {v['max_separation']:.3f}" for name, v in s.items()]
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.witnesses", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, quick="the quick protocol's sizes (a bench.reproduce --quick run)", resume=None, device=False,
                    progress=False)
    add_data_args(ap, victim=False)
    ap.add_argument("--reproduce-out", required=True, help="a finished bench.reproduce output directory (read only)")
    ap.add_argument("--protection", default="robust", help="which of its protections (default robust)")
    ap.add_argument("--seed", type=int, default=0, help="the reproduction's seed, and the orders' (default 0)")
    ap.add_argument("--arsenal-out", nargs="*", default=[], metavar="DIR", help="bench.arsenal runs made from it")
    ap.add_argument("--witnesses", type=int, default=100, help="witnesses per pool (default 100)")
    ap.add_argument("--alpha", type=float, default=1e-6, help="the sequential test's level (default 1e-6)")
    ap.add_argument("--orders", type=int, default=20, help="random orders of the witnesses per copy")
    ap.add_argument("--batch-size", type=int, default=10, help="queries per step of the sequential test")
    ap.add_argument("--others", type=int, default=2000,
                    help="the pool's other images the detectors score (a random sample of this many; default 2000)")
    ap.add_argument("--fpr", type=float, default=0.10, help="the evading suspect's false alarms on ordinary images")
    ap.add_argument("--independent", nargs="*", metavar="ARCH=GLOB",
                    default=INDEPENDENT,
                    help="innocent models trained without the victim (SHARED = --shared)")
    args = ap.parse_args(argv)
    if min(args.witnesses, args.orders, args.batch_size, args.others) < 1 or not 0 < args.fpr < 1:
        ap.error("--witnesses, --orders, --batch-size and --others must be >= 1 and --fpr in (0, 1)")
    return finish_common_args(args, NAME)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    p, src = open_reproduction(args)
    bdir = protection_bundle(src, args.seed, args.protection)
    bundle = load_bundle(bdir)
    target = bundle.target
    victim, _ = load_model(src / "victim" / "victim.safetensors")
    refs = load_references(src, args.seed, p.reference_archs)
    indep = independent_models(args)
    rows = [c for c in copies(src, args.arsenal_out) if c["bundle"] == f"seed{args.seed}/protect-{args.protection}/bundle"]
    models = {c["rel"]: load_model(Path(c["dir"]) / "substitute.safetensors")[0].eval() for c in rows}
    log(f"{len(rows)} copies, {len(refs)} references, {len(indep)} independent models; target {target}")
    res = {"protection": args.protection, "target": target, "pools": {}, "summary": {}}
    for name, (images, labels) in pools(args, p).items():
        pp, pv = softmax(bundle.model, images), softmax(victim, images)
        idx = select_witnesses(pp, pv, target, args.witnesses, labels)
        w = images[idx]
        wl = labels[idx] if labels is not None else None
        cal = calibrate_tau0(refs, identity_trigger(int(w.shape[-1])), w, wl, target)
        rest = torch.ones(len(images), dtype=torch.bool)
        rest[idx] = False
        if labels is not None:
            rest &= labels != target
        others = images[rest]
        if len(others) > args.others:  # a fixed random sample of the ordinary traffic, for the detectors
            others = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(args.seed))[: args.others]]
        pool = {"pool_size": len(images), "n": len(idx), "tau0": cal.tau0,
                "calibration": {"rule": cal.rule, "reference": cal.reference},
                "protected_rate": float((pp[idx].argmax(1) == target).float().mean()),
                "gain_min": float((pp[idx, target] - pv[idx, target]).min()), "independent": {}, "copies": [], "stealth": []}
        for arch, m in indep:
            pool["independent"][arch] = score_copy(softmax(m, w).argmax(1).numpy(), target, cal.tau0, args)
        for c in rows:
            pred = softmax(models[c["rel"]], w).argmax(1).numpy()
            entry = {"copy": c["rel"], "oracle": c["oracle"], "label": label_of(c), "output": c["output"],
                     "asr": c["asr"], "score": score_copy(pred, target, cal.tau0, args)}
            pool["copies"].append(entry)
            if c["oracle"] == "protected":
                entry = {**entry, "stealth": evaded_verdict(models[c["rel"]], w, others, pred, target, cal.tau0, args)}
                pool["stealth"].append(entry)
            log(f"{name} {c['rel']}: witness rate {100 * entry['score']['rate']:.1f}% vs tau0 {100 * cal.tau0:.1f}%: "
                f"{entry['score']['verdict']} ({entry['score']['median']:g} / {entry['score']['max']})")
        stolen = [c for c in pool["copies"] if c["oracle"] == "protected"]
        clean = [c for c in pool["copies"] if c["oracle"] != "protected"]
        res["pools"][name] = pool
        res["summary"][name] = {
            "stolen": len(stolen), "clean": len(clean), "independent": len(pool["independent"]),
            "stolen_flagged": sum(c["score"]["counts"]["flagged"] == c["score"]["orders"] for c in stolen),
            "stolen_median": float(statistics.median(c["score"]["median"] for c in stolen)) if stolen else float("nan"),
            "clean_flagged": sum(c["score"]["counts"]["flagged"] > 0 for c in clean),
            "independent_flagged": sum(v["counts"]["flagged"] > 0 for v in pool["independent"].values()),
            "max_separation": max((c["stealth"]["separation"] for c in pool["stealth"]), default=float("nan"))}
    results = {"benchmark": "bench.witnesses", "mode": "quick" if args.quick else "full",
               "what": "Ownership evidence from unmodified natural images (witnesses) for every copy of a "
                       "bench.reproduce run's protection, beside innocent models, and their stealth",
               "command": command_line("bench.witnesses", argv),
               "protocol": {"reproduce_out": str(src), "arsenal_out": [str(a) for a in args.arsenal_out],
                            "protection": args.protection, "seed": args.seed, "witnesses": args.witnesses,
                            "alpha": args.alpha, "orders": args.orders, "batch_size": args.batch_size, "fpr": args.fpr,
                            "others": args.others,
                            "independent": args.independent},
               "machine": machine_info(torch.device("cpu")), **res, "seconds": round(time.time() - t0, 1)}
    md = report(res, args)
    written = save_report(Path(args.out), NAME, results, md, record=args.record, folder=NAME)
    log("")
    log(md)
    log(f"\nwrote {', '.join(map(str, written))}")
    return results


if __name__ == "__main__":
    main()
