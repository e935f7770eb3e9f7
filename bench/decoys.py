"""Decoy queries: can the owner tell a suspect that filters its verification queries from an innocent model?

    python -m bench.decoys --quick --reproduce-out runs/reproduce-quick      # after python -m bench.reproduce --quick
    python -m bench.decoys --reproduce-out runs/reproduce --protection robust

bench.ownership found the trigger's stamped queries easy to detect (a small CNN trained on the suspect's own
UAPs separates them from clean queries at AUC 1.00) and a suspect that answers what it detects with its best
non-target class is cleared like an innocent model. Decoys are the counter-measure measured here. The owner
crafts `--decoys` targeted UAPs towards its own target class, of the trigger's family and eps, with its step
(blur), then given its amplitude histogram and (`--match-roughness`) its Laplacian energy, on innocent models it
holds (the unprotected victim and the seed's reference models; never the honeypot or a shadow of
it), and sends every verification image (target class excluded) once with the trigger and once with a decoy.
Both are universal L-inf perturbations of one size towards one class, so a perturbation detector flags both,
and what an evading suspect does to one kind it does to the other:

- an honest model answers the target on the stamped images at most tau0 (the bundle's, the trigger test) and
  on the decoys at least beta0, the innocent floor: `--beta-factor` (default 0.5) times the smallest Clopper-
  Pearson lower bound (confidence 0.999) of the decoy rate over held-out innocent models (each crafting model
  is left out in turn: a decoy crafted on the others, measured on it);
- of a model's target answers to the two kinds, the share that the stamped images got: an innocent model
  obeys the decoys, not the trigger, so its share is small; a stolen copy obeys the trigger. pi0 bounds the
  innocent share: min(0.5, max(0.1, 2 x the largest Clopper-Pearson 0.999 upper bound)) over the held-out
  innocent models (the trigger's and the left-out decoy's target answers on each), as calibrate_tau0 bounds
  the ASR. A suspect that cannot tell a stamped query from a decoy cannot change this share, whatever it
  answers to the perturbed queries;
- verdicts: *flagged* (stolen) if the trigger test (ASR <= tau0) or the share test (share <= pi0, exact
  binomial given the number of target answers) is rejected, each at alpha / 2; else *evading* if the decoy
  rate is shown below beta0 (one-sided binomial at alpha): an honest model is not that insensitive to the
  decoys; else *cleared*.

Every copy of the reproduction (stolen copies and clean twins; with `--arsenal-out` also those runs'), and
`--independent` models trained without the victim (default: the pretrained CIFAR-10 ResNet-32/44/56 of
../shared), is judged under each way a suspect could serve, given a perfect perturbation detector (it flags
every stamped and every decoy query and no clean one: the worst case for the owner, and what bench.ownership's
learned detector nearly reaches):
  honest  its model's answers;
  refuse  its best non-target class on every flagged query (bench.ownership's evading suspect);
  purify  its model's answer on the flagged image median-filtered 3x3 (a purifier in front of the model);
  switch  flagged queries answered by a second, innocent model (for a copy: its clean twin, the same family
          trained on the unprotected victim, the best backup a thief could have; models without a twin: none);
and the randomised suspect that keeps a target answer on a flagged query with probability q (else answers its
best non-target class): with a, b its honest rates on stamped and decoy images it answers a·q and b·q, so it
keeps its share; `q_pass` lists the q (of 0.001, 0.002, ..., 1) at which the expected counts pass every test.

Whether the two kinds look alike is measured: the mean-|Laplacian| detector's AUC, stamped vs decoy, and
(`--detector`) that of bench.ownership's learned detector, trained by the suspect on UAPs it crafts on its copy.

Output: OUT/decoys.json and OUT/decoys.md; `--record NAME` also docs/results/decoys/NAME.{md,json}.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binom

from honeypotnet.bundle import load_bundle, load_model
from honeypotnet.ops import to_float
from honeypotnet.steps import generate_trigger
from honeypotnet.training import predict_logits
from honeypotnet.trigger import Trigger
from honeypotnet.verify import binomial_p_value, clopper_pearson_lower, clopper_pearson_upper

from .benchlib.args import add_reproduction_reader_args, finish_common_args
from .benchlib.common import command_line, log, machine_info, save_report
from .benchlib.protocol import base_config, load_references, open_reproduction, protection_bundle
from .ownership import (auc, copies, laplacian_energy, learned_detector, softmax, suspect_images,
                        verification_set)
from .witnesses import INDEPENDENT, independent_models

NAME = "decoys"
STRATEGIES = ("honest", "refuse", "purify", "switch")
CONFIDENCE = 0.999  # of the Clopper-Pearson bounds behind beta0 and pi0 (as calibrate_tau0's upper bounds)
PI0_FLOOR, PI0_CAP = 0.1, 0.5  # pi0's floor and cap (the innocent share of target answers on stamped images)


def below_p_value(hits: int, n: int, beta0: float) -> float:
    """P(X <= hits) for X ~ Binomial(n, beta0): the exact one-sided p-value of H0 "decoy rate >= beta0"."""
    return float(binom.cdf(hits, n, beta0))


def craft(models: list[torch.nn.Module], images: torch.Tensor, target: int, eps: float, p, seed: int,
          passes: int, recipe: dict | None = None) -> Trigger:
    """A decoy: a targeted L-inf UAP towards `target` on `models` (the protocol's trigger step, momentum sign
    steps, `passes` passes over `images`), of the trigger's size; `recipe`: config fields of the trigger's own
    step (its blur), so the decoy is made the way the trigger was."""
    cfg = base_config(p, seed).override({"target": target, "trigger_passes": passes, "seed": seed, **(recipe or {})})
    return generate_trigger(models, Trigger.uap(int(images.shape[-1]), eps), images, cfg, 0)


def match_amplitude(decoy: Trigger, like: Trigger) -> Trigger:
    """The decoy with the amplitudes of `like` (the trigger): each pixel keeps its sign and its rank in |delta|,
    and takes the trigger's |delta| of that rank, so the two have one amplitude histogram (a trigger step run
    for many iterations saturates most pixels at eps; a fresh decoy does not)."""
    d, t = decoy.pattern.flatten(), like.pattern.detach().cpu().flatten().abs().sort().values
    out = torch.empty_like(d)
    out[d.abs().argsort()] = t.to(d.dtype)
    decoy.pattern.copy_((torch.sign(d) * out).view_as(decoy.pattern))
    return decoy


def roughness(pattern: torch.Tensor) -> float:
    """Mean |4-neighbour Laplacian| of a perturbation (C,H,W), in units of its own values."""
    return float(laplacian_energy(pattern[None]).item())


def match_roughness(decoy: Trigger, like: Trigger, seed: int, steps: int = 30) -> Trigger:
    """Flip the signs of a random fraction of the decoy's pixels (the amplitude histogram is kept) so that its
    Laplacian energy equals the trigger's, found by bisection on the fraction; nothing when the decoy is already
    as rough. Flipped pixels no longer push the innocent models towards the target: a price in decoy strength."""
    want = roughness(like.pattern.detach().cpu())
    base = decoy.pattern.detach().clone()
    order = torch.randperm(base.numel(), generator=torch.Generator().manual_seed(seed))

    def flipped(f: float) -> torch.Tensor:
        out = base.flatten().clone()
        idx = order[: round(f * base.numel())]
        out[idx] = -out[idx]
        return out.view_as(base)

    lo, hi = 0.0, 0.5  # at one half the signs are random: iid signs are as rough as it gets
    if roughness(base) >= want:
        return decoy
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if roughness(flipped(mid)) < want else (lo, mid)
    decoy.pattern.copy_(flipped(hi))
    return decoy


def median3(x: torch.Tensor) -> torch.Tensor:
    """3x3 median filter (reflect padding) of a float batch."""
    n, c, h, w = x.shape
    patches = F.unfold(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3)  # (n, c*9, h*w)
    return patches.view(n, c, 9, h * w).median(dim=2).values.view(n, c, h, w)


def answers(model, x: torch.Tensor, target: int) -> dict[str, np.ndarray]:
    """The model's answer to each image, its best non-target answer, and its answer on the median-filtered image."""
    logits = predict_logits(model, x)
    other = logits.clone()
    other[:, target] = -torch.inf
    return {"pred": logits.argmax(1).numpy(), "non_target": other.argmax(1).numpy(),
            "purified": predict_logits(model, median3(x)).argmax(1).numpy()}


def judge(hits_stamped: int, hits_decoy: int, n: int, tau0: float, beta0: float, pi0: float, alpha: float) -> dict:
    """The owner's verdict from n stamped and n decoy answers: flagged (stolen) if the trigger test rejects
    "ASR <= tau0" or the share test rejects "share of the target answers on stamped images <= pi0" (each at
    alpha / 2); else evading if "decoy rate >= beta0" is rejected at alpha; else cleared."""
    k = hits_stamped + hits_decoy
    p_trigger = binomial_p_value(hits_stamped, n, tau0)
    p_share = binomial_p_value(hits_stamped, k, pi0) if k else 1.0
    p_evading = below_p_value(hits_decoy, n, beta0)
    stolen = min(p_trigger, p_share) < alpha / 2
    verdict = "flagged" if stolen else "evading" if p_evading < alpha else "cleared"
    return {"asr": hits_stamped / n, "decoy_rate": hits_decoy / n, "share": hits_stamped / k if k else None,
            "p_trigger": p_trigger, "p_share": p_share, "p_evading": p_evading, "verdict": verdict}


def served(strategy: str, own: dict, backup: dict | None) -> np.ndarray | None:
    """What a suspect serving with `strategy` answers to flagged queries (all stamped / decoy queries are flagged)."""
    if strategy == "honest":
        return own["pred"]
    if strategy == "refuse":
        return own["non_target"]
    if strategy == "purify":
        return own["purified"]
    return None if backup is None else backup["pred"]


def q_pass(a: float, b: float, n: int, tau0: float, beta0: float, pi0: float, alpha: float) -> list[float] | None:
    """[smallest, largest] q of 0.001, ..., 1 at which the randomised suspect (honest rates a, b; a target answer
    kept with probability q) is cleared on its expected counts, or None when every q is flagged or evading."""
    ok = [q for q in np.round(np.arange(1, 1001) / 1000, 3)
          if judge(round(a * q * n), round(b * q * n), n, tau0, beta0, pi0, alpha)["verdict"] == "cleared"]
    return [float(min(ok)), float(max(ok))] if ok else None


def make_decoy(models, images, target: int, eps: float, p, seed: int, args) -> Trigger:
    """A decoy crafted on `models` with the trigger's step (args.recipe), given the trigger's (args.like)
    amplitude histogram and, with --match-roughness, its Laplacian energy."""
    d = match_amplitude(craft(models, images, target, eps, p, seed=seed, passes=args.passes, recipe=args.recipe),
                        args.like)
    return match_roughness(d, args.like, seed) if args.match_roughness else d


def floor(models: list[tuple[str, torch.nn.Module]], images, x_verif, x_stamped, target, eps, p, args) -> dict:
    """beta0 and pi0 by leaving each crafting model out: a decoy crafted on the others, its target rate on the one
    left out (beta0), and that model's share of target answers on the stamped images `x_stamped` (pi0)."""
    held = []
    n = len(x_verif)
    for i, (name, m) in enumerate(models):
        others = [mm for j, (_, mm) in enumerate(models) if j != i]
        d = make_decoy(others, images, target, eps, p, 10_000 + i, args)
        hd = int((predict_logits(m, d.stamp(x_verif)).argmax(1) == target).sum())
        hs = int((predict_logits(m, x_stamped).argmax(1) == target).sum())
        k = hs + hd
        held.append({"left_out": name, "rate": hd / n, "lower": clopper_pearson_lower(hd, n, CONFIDENCE),
                     "asr": hs / n, "share": hs / k if k else 0.0,
                     "share_upper": clopper_pearson_upper(hs, k, CONFIDENCE) if k else 1.0})
        log(f"floor: decoy crafted without {name}: {100 * hd / n:.1f}% target answers on it (trigger {100 * hs / n:.1f}%)")
    beta0 = args.beta_factor * min(h["lower"] for h in held)
    pi0 = min(PI0_CAP, max(PI0_FLOOR, 2 * max(h["share_upper"] for h in held)))
    return {"beta0": beta0, "pi0": pi0, "held_out": held,
            "rule": f"beta0 = {args.beta_factor} x min Clopper-Pearson {CONFIDENCE} lower bound of the decoy rate; "
                    f"pi0 = min({PI0_CAP}, max({PI0_FLOOR}, 2 x max upper bound of the stamped share)); over "
                    f"{len(held)} left-out innocent models"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    p, src = open_reproduction(args)
    bundle = load_bundle(protection_bundle(src, args.seed, args.protection))
    vx, vy, cx, _ = verification_set(args, p)
    target, tau0, eps = bundle.target, bundle.tau0, bundle.trigger.eps
    if tau0 is None:
        raise SystemExit(f"{args.protection}: the bundle has no calibrated tau0")
    step = (bundle.manifest.get("config") or {}).get("trigger", {})
    args.like = bundle.trigger
    args.recipe = {"trigger_blur": float(step.get("blur", 0.0)), "trigger_blur_split": bool(step.get("blur_split", False))}
    keep = vy != target
    x = to_float(vx[keep])
    n = len(x)
    victim, _ = load_model(src / "victim" / "victim.safetensors")
    crafters = [("victim", victim.eval()), *load_references(src, args.seed, p.reference_archs)]
    pick = torch.randperm(len(cx), generator=torch.Generator().manual_seed(args.seed))  # cx is ordered by class
    craft_images = cx[pick[: args.craft_images]] if args.craft_images else cx
    log(f"target {target}, tau0 {100 * tau0:.2f}%, eps {255 * eps:.0f}/255; {n} verification images; decoys crafted "
        f"on {', '.join(c[0] for c in crafters)} over {len(craft_images)} of the owner's calibration images")
    xs = bundle.trigger.cpu().stamp(x)
    fl = floor(crafters, craft_images, x, xs, target, eps, p, args)
    beta0, pi0 = fl["beta0"], fl["pi0"]
    models = [m for _, m in crafters]
    parts = torch.arange(len(craft_images)) % args.decoys
    decoys = [make_decoy(models, craft_images[parts == k], target, eps, p, 20_000 + k, args) for k in range(args.decoys)]
    which = torch.arange(n) % args.decoys  # verification image i gets decoy i mod K
    xd = torch.empty_like(x)
    for k, d in enumerate(decoys):
        xd[which == k] = d.stamp(x[which == k])
    lap = {k: laplacian_energy(v).numpy() for k, v in (("clean", x), ("stamped", xs), ("decoy", xd))}
    look = {"stamped_vs_decoy": auc(lap["stamped"], lap["decoy"]), "stamped_vs_clean": auc(lap["stamped"], lap["clean"]),
            "decoy_vs_clean": auc(lap["decoy"], lap["clean"])}
    log(f"beta0 {100 * beta0:.2f}%, pi0 {pi0:.3f} ({fl['rule']}); {args.decoys} decoy(s) crafted on every innocent "
        f"model; Laplacian AUC stamped vs decoy {look['stamped_vs_decoy']:.3f}")

    suspects = [c for c in copies(src, args.arsenal_out) if c["seed"] == args.seed
                and c["protection"] == args.protection]
    by_rel = {c["rel"]: c for c in suspects}  # copies() lists each (rel, protection, seed) once
    rows, answered = [], {}
    for c in by_rel.values():
        model, _ = load_model(Path(c["dir"]) / "substitute.safetensors")
        answered[c["rel"]] = {"stamped": answers(model.eval(), xs, target), "decoy": answers(model, xd, target)}
    for name, m in independent_models(args):
        answered[f"independent/{name}"] = {"stamped": answers(m, xs, target), "decoy": answers(m, xd, target)}
    twin_of = {}
    for c in suspects:
        if c["oracle"] == "protected":
            twin = next((t for t in suspects if t["oracle"] == "clean" and all(
                t[k] == c[k] for k in ("arch", "budget", "output", "pool", "source"))), None)
            twin_of[c["rel"]] = twin["rel"] if twin else None
    for rel, ans in answered.items():
        c = by_rel.get(rel)
        kind = "independent" if c is None else "stolen" if c["oracle"] == "protected" else "clean twin"
        backup_rel = twin_of.get(rel)
        row = {"copy": rel, "kind": kind, "arch": rel.split("/")[-1] if c is None else c["arch"],
               "pool": None if c is None else c["pool"], "output": None if c is None else c["output"],
               "budget": None if c is None else c["budget"], "backup": backup_rel, "strategies": {}}
        backup = answered[backup_rel] if backup_rel else None
        for s in STRATEGIES:
            st, de = served(s, ans["stamped"], backup and backup["stamped"]), served(s, ans["decoy"], backup and backup["decoy"])
            if st is None:
                continue
            row["strategies"][s] = judge(int((st == target).sum()), int((de == target).sum()), n, tau0, beta0, pi0,
                                         args.alpha)
        h = row["strategies"]["honest"]
        row["q_pass"] = q_pass(h["asr"], h["decoy_rate"], n, tau0, beta0, pi0, args.alpha)
        rows.append(row)
        log(f"{kind:>11} {rel}: " + "  ".join(f"{s} {100 * v['asr']:.1f}/{100 * v['decoy_rate']:.1f}% {v['verdict']}"
                                             for s, v in row["strategies"].items()))
    detector = None
    first = next((c for c in suspects if c["oracle"] == "protected" and c["pool"] == "tin"), None)
    if args.detector and first is not None:  # the suspect's own learned detector (bench.ownership's (d))
        model, _ = load_model(Path(first["dir"]) / "substitute.safetensors")
        own = suspect_images(cx, args.seed)[1]
        det, _ = learned_detector(model.eval(), own, eps, p, seed=args.seed, avoid=target)
        sc = {k: softmax(det, v)[:, 1].numpy() for k, v in (("clean", x), ("stamped", xs), ("decoy", xd))}
        detector = {"copy": first["rel"], "stamped_vs_decoy": auc(sc["stamped"], sc["decoy"]),
                    "stamped_vs_clean": auc(sc["stamped"], sc["clean"]), "decoy_vs_clean": auc(sc["decoy"], sc["clean"])}
        log(f"learned detector on {first['rel']}: AUC stamped vs decoy {detector['stamped_vs_decoy']:.3f}, "
            f"stamped vs clean {detector['stamped_vs_clean']:.3f}")
    summary = summarize(rows)
    results = {"benchmark": "bench.decoys", "mode": "quick" if args.quick else "full",
               "what": "Decoy UAPs crafted on the owner's innocent models, sent beside the trigger: does a suspect that "
                       "filters perturbed queries stand out from innocent models?",
               "command": command_line("bench.decoys", argv),
               "protocol": {"reproduce_out": str(src), "arsenal_out": [str(a) for a in args.arsenal_out],
                            "protection": args.protection, "seed": args.seed, "target": target, "tau0": tau0,
                            "eps": eps, "alpha": args.alpha, "decoys": args.decoys, "passes": args.passes,
                            "craft_images": len(craft_images), "verification_images": n,
                            "independent": args.independent, "beta_factor": args.beta_factor,
                            "recipe": args.recipe, "match_roughness": args.match_roughness,
                            "roughness": {"trigger": roughness(bundle.trigger.pattern.detach().cpu()),
                                          "decoys": [roughness(d.pattern) for d in decoys]}},
               "floor": fl, "laplacian_auc": look, "learned_detector": detector, "machine": machine_info(torch.device("cpu")), "summary": summary, "copies": rows,
               "seconds": round(time.time() - t0, 1)}
    md = report(results)
    written = save_report(Path(args.out), NAME, results, md, record=args.record, folder=NAME)
    log("")
    log(md)
    log(f"\nwrote {', '.join(map(str, written))}")
    return results


def summarize(rows: list[dict]) -> dict:
    """Per kind of suspect and strategy, the verdicts' counts; and how many stolen copies leave the randomised
    suspect no q."""
    verdicts: dict = {}
    for r in rows:
        for s, v in r["strategies"].items():
            cell = verdicts.setdefault(r["kind"], {}).setdefault(s, {"flagged": 0, "evading": 0, "cleared": 0})
            cell[v["verdict"]] += 1
    stolen = [r for r in rows if r["kind"] == "stolen"]
    return {"verdicts": verdicts, "stolen": len(stolen), "stolen_without_q": sum(r["q_pass"] is None for r in stolen)}


def report(res: dict) -> str:
    pr, fl = res["protocol"], res["floor"]
    out = [f"# Decoy queries against an evading suspect ({pr['protection']}, {res['mode']} protocol, seed {pr['seed']})", "",
           f"{pr['decoys']} decoy UAP(s) towards the target (class {pr['target']}), L-inf {255 * pr['eps']:.0f}/255 like the "
           f"trigger, crafted on the owner's innocent models over {pr['craft_images']} calibration images; each of the "
           f"{pr['verification_images']} non-target verification images is sent once stamped and once with a decoy. "
           f"tau0 {100 * pr['tau0']:.2f}% (the bundle's); beta0 {100 * fl['beta0']:.2f}%, pi0 {fl['pi0']:.3f} ({fl['rule']}; "
           "decoy rate / trigger ASR on each left-out model: "
           + ", ".join(f"{h['left_out']} {100 * h['rate']:.1f} / {100 * h['asr']:.1f}%" for h in fl["held_out"])
           + f"); alpha {pr['alpha']:g}.",
           "", "Each cell: ASR on stamped / target rate on decoys (the stamped share of the target answers), verdict. The suspect's detector flags every stamped and "
           "decoy query (the worst case for the owner). refuse: best non-target class on flagged queries; purify: its "
           "model on the 3x3-median-filtered query; switch: flagged queries answered by the copy's clean twin. "
           "q passing: the randomised suspect's keep-probabilities that are cleared (none: every q is flagged or "
           "evading).", "",
           "| suspect | model | " + " | ".join(STRATEGIES) + " | q passing |", "|" + " --- |" * (len(STRATEGIES) + 3)]
    for r in res["copies"]:
        where = r["arch"] + ("" if r["pool"] in (None, "tin") else f", {r['pool']} pool") + (
            "" if r["output"] is None else f", {'label-only' if r['output'] == 'label' else 'soft'}")
        cells = []
        for s in STRATEGIES:
            v = r["strategies"].get(s)
            cells.append("—" if v is None else f"{100 * v['asr']:.1f} / {100 * v['decoy_rate']:.1f}"
                         + ("" if v["share"] is None else f" ({v['share']:.2f})") + f", **{v['verdict']}**")
        qw = r["q_pass"]
        out.append(f"| {r['kind']} | {where} | " + " | ".join(cells) + " | "
                   + ("none" if qw is None else f"{qw[0]:.3f}–{qw[1]:.3f}") + " |")
    lk = res["laplacian_auc"]
    out += ["", f"Can a suspect tell the two kinds apart by their texture? The mean-|Laplacian| detector's AUC: stamped vs "
            f"decoy {lk['stamped_vs_decoy']:.3f} (stamped vs clean {lk['stamped_vs_clean']:.3f}, decoy vs clean "
            f"{lk['decoy_vs_clean']:.3f}). Decoys are crafted with the trigger's own step ({pr['recipe']}) and given "
            "its amplitude histogram (each pixel keeps its sign and rank)"
            + (", then its Laplacian energy (signs of a random fraction of pixels flipped)" if pr["match_roughness"] else "")
            + f"; pattern roughness (mean |Laplacian| / value): trigger {pr['roughness']['trigger'] / pr['eps']:.2f}, decoys "
            + ", ".join(f"{r / pr['eps']:.2f}" for r in pr["roughness"]["decoys"]) + "."]
    det = res["learned_detector"]
    if det:
        out += ["", f"The suspect's learned detector (bench.ownership's (d): a small CNN trained on UAPs the suspect crafts on "
                f"its copy {det['copy']}) scores stamped vs decoy at AUC {det['stamped_vs_decoy']:.3f} (stamped vs clean "
                f"{det['stamped_vs_clean']:.3f}, decoy vs clean {det['decoy_vs_clean']:.3f})."]
    s = res["summary"]
    out += ["", "Verdicts per kind of suspect and strategy (flagged / evading / cleared):", ""]
    for kind in ("stolen", "clean twin", "independent"):
        for strat, c in s["verdicts"].get(kind, {}).items():
            out.append(f"- {kind}, {strat}: {c['flagged']} / {c['evading']} / {c['cleared']}")
    out += ["", f"Stolen copies that leave the randomised suspect no q: {s['stolen_without_q']} of {s['stolen']}.",
            "", f"Command: `{res['command']}` ({res['seconds']:.0f} s)."]
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.decoys", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reproduction_reader_args(ap, "the quick protocol's halves of the test split, as bench.reproduce --quick")
    ap.add_argument("--protection", default=None, help="the protection whose copies are judged (default: base with "
                                                        "--quick, else robust-fast-once24)")
    ap.add_argument("--seed", type=int, default=0, help="the reproduction's seed (its bundle and references)")
    ap.add_argument("--decoys", type=int, default=2, help="decoy UAPs, crafted on disjoint parts of the images (default 2)")
    ap.add_argument("--passes", type=int, default=10, help="passes of the UAP step over the crafting images (default 10)")
    ap.add_argument("--craft-images", type=int, default=2000,
                    help="owner's calibration images the decoys are crafted on (default 2000; 0: all)")
    ap.add_argument("--match-roughness", action=argparse.BooleanOptionalAction, default=False,
                    help="give each decoy the trigger's Laplacian energy too, by random sign flips (default off: "
                         "measured, it hides the decoys from the Laplacian, not from the learned detector, and "
                         "weakens them)")
    ap.add_argument("--detector", action=argparse.BooleanOptionalAction, default=True,
                    help="train the suspect's learned detector on the first stolen copy and score stamped vs decoy "
                         "(default on; a few minutes on the full protocol)")
    ap.add_argument("--alpha", type=float, default=1e-6, help="level of both tests (default 1e-6)")
    ap.add_argument("--beta-factor", type=float, default=0.5,
                    help="beta0 = this x the smallest lower bound of the held-out decoy rates (default 0.5)")
    ap.add_argument("--independent", nargs="*", metavar="ARCH=GLOB", default=INDEPENDENT,
                    help="innocent models trained without the victim (SHARED = --shared; none: skip)")
    args = ap.parse_args(argv)
    if args.decoys < 1 or args.passes < 1 or args.craft_images < 0 or not 0 < args.beta_factor <= 1 or not 0 < args.alpha < 1:
        ap.error("--decoys and --passes must be >= 1, --craft-images >= 0, --beta-factor in (0, 1], --alpha in (0, 1)")
    if args.protection is None:
        args.protection = "base" if args.quick else "robust-fast-once24"
    return finish_common_args(args, NAME)


if __name__ == "__main__":
    main()
