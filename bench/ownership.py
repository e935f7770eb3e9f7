"""Ownership verification in practice: how many queries a verdict takes, and can the suspect see them coming?

    python -m bench.ownership --quick --reproduce-out runs/reproduce-quick      # after python -m bench.reproduce --quick

Reads a finished bench.reproduce output directory (nothing is written there): every protection's bundle
(its trigger, target and calibrated tau0) and every thief's substitute, stolen copies and clean twins alike.
The verification images are the protocol's held-out half of cifar10-jpeg/test (the images bench.reproduce
verifies on), target class excluded.

1. Queries to verdict. For every copy, the sequential test of docs/verification.md (verify(...,
   sequential=True): mixture likelihood-ratio martingales, stamped images `--batch-size` at a time, alpha
   `--alpha`, default 1e-6) over `--orders` random orders of the verification images: verdict (flagged /
   cleared / undecided) and stamped queries used, median and max over the orders. Each copy's answers to
   the stamped images are computed once and the test is replayed on each order; the first order also runs
   through honeypotnet.verify itself and must agree with the replay.
2. Stealth. A suspect who knows the method but not the trigger scores every query with a detector; each
   detector's ROC AUC (Mann-Whitney U) separates the owner's stamped verification images from the same
   images clean: (a) high-frequency energy of the input (mean |Laplacian|), (b) the copy's uncertainty
   (1 - max softmax), (c) feature squeezing (L1 between the copy's softmax on the image and on a median-
   filtered 2x2 / 4-bit copy, the larger), (d) a learned detector: the suspect crafts its own UAPs on its
   copy (random targets, the bundle's eps, steps.generate_trigger) and trains a small CNN to tell its own
   stamped images from clean ones. The suspect's own images are the calibration half of the test split
   (never a verification image; generous to the suspect: images of the owner's task).
3. Evasion. The suspect answers every query its best detector flags (threshold: 10% false alarms on its
   own clean images) with its best non-target class. Per query; and stateful (after a window of recent
   queries holds too many flagged ones, every later answer is evasive), against stamped-only verification
   and verification interleaving each stamped query with clean ones. What the sequential verdict becomes.
4. Quiet verification (`--scales`, default 1 0.75 0.5 0.35 0.25; `--scales` with none or `--no-quiet`: skip;
   `--quiet-protections`, default base robust). The owner verifies with the trigger scaled down, x + s·δ
   (scaled). Per protection and scale: tau0(s) by the protocol's own calibration (calibrate_tau0 over the
   seed's reference models on the calibration half; at s = 1 the bundle's tau0), every copy's ASR and
   queries to verdict at tau0(s), and for the stolen copies the AUCs of (a)-(d) on the images stamped at s,
   (d) trained at the bundle's eps as in 2, plus an adaptive (d) trained on the suspect's UAPs at s·eps (a
   suspect who knows the owner verifies at s), and the per-query evading suspect's verdict. The goal: some s
   with every detector at AUC <= 0.6, every stolen copy flagged and no clean twin flagged.

Output: OUT/ownership.json and OUT/ownership.md; `--record NAME` also docs/results/ownership/NAME.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binom

from honeypotnet.bundle import load_bundle, load_model
from honeypotnet.data import load_dataset
from honeypotnet.models import create_model
from honeypotnet.ops import to_float
from honeypotnet.steps import generate_trigger
from honeypotnet.training import FitConfig, fit, predict_logits
from honeypotnet.trigger import Trigger
from honeypotnet.verify import calibrate_tau0, default_stolen_asr, sequential_decision, verify

from .benchlib.args import add_reproduction_reader_args, finish_common_args
from .benchlib.common import command_line, log, machine_info, save_report
from .benchlib.data import POOLS, resolve_roots, split_per_class
from .benchlib.protocol import base_config, load_references, open_reproduction

NAME = "ownership"
STEALTH_GOAL = 0.6  # detector AUC (either direction) the verification queries should stay under
DETECTORS = {"laplacian": "(a) input high-frequency energy", "uncertainty": "(b) 1 - max softmax of the copy",
             "squeeze": "(c) feature squeezing (median 2x2 / 4-bit)", "learned": "(d) CNN trained on the suspect's own UAPs"}
PEERS = [("Dataset Inference (Maini et al., ICLR 2021)", ">99% confidence from 50 private samples"),
         ("UAP fingerprinting (Peng et al., CVPR 2022)", ">99.99% confidence with 20 fingerprints"),
         ("Neural Honeytrace (2025)", "1,857 queries to verify ownership")]


# ============================================================================ pure parts


def auc(pos, neg) -> float:
    """ROC AUC of scores `pos` (should be high) against `neg`: P(pos > neg) + P(pos = neg) / 2, the
    Mann-Whitney U statistic over n_pos * n_neg (ties count a half)."""
    pos, neg = np.asarray(pos, dtype=float).ravel(), np.sort(np.asarray(neg, dtype=float).ravel())
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("auc needs at least one score on each side")
    below = np.searchsorted(neg, pos, side="left")
    upto = np.searchsorted(neg, pos, side="right")
    return float((below + 0.5 * (upto - below)).sum() / (len(pos) * len(neg)))


def sequential_replay(hits, tau0: float, alpha: float, batch_size: int = 10, max_queries: int | None = None,
                      stolen_asr: float | None = None) -> tuple[str, int]:
    """verify(..., sequential=True)'s decision on a suspect whose answers to the stamped queries, in the order
    they are sent, are `hits` (1 = the target class): ("flagged" | "cleared" | "undecided", stamped queries).
    The library's own check (honeypotnet.verify.sequential_decision) after each batch."""
    hits = np.asarray(hits, dtype=float).ravel()
    stolen_asr = default_stolen_asr(tau0) if stolen_asr is None else stolen_asr
    limit = min(len(hits), max_queries or len(hits))
    if limit == 0:
        return "undecided", 0
    cum = np.cumsum(hits[:limit])
    for n in range(batch_size, limit + batch_size, batch_size):
        n = min(n, limit)
        decided = sequential_decision(int(cum[n - 1]), n, tau0, stolen_asr, alpha)
        if decided is not None:
            return ("flagged" if decided == "stolen" else "cleared"), n
    return "undecided", int(limit)


def orders(n: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` fixed random permutations of range(n) (order 0 included)."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(n) for _ in range(count)]


def summarize(runs: list[tuple[str, int]]) -> dict:
    """Queries to verdict over orders: runs [(verdict, stamped queries)] -> median / max / min queries, the
    verdict (the one every order reached, else 'mixed'), and how many orders reached each."""
    if not runs:
        raise ValueError("no runs to summarize")
    q = [n for _, n in runs]
    counts = {v: sum(1 for d, _ in runs if d == v) for v in ("flagged", "cleared", "undecided")}
    verdicts = {d for d, _ in runs}
    return {"verdict": verdicts.pop() if len(verdicts) == 1 else "mixed", "counts": counts, "orders": len(runs),
            "median": float(statistics.median(q)), "max": int(max(q)), "min": int(min(q))}


def queries_to_verdict(model, trigger: Trigger, images: torch.Tensor, labels: torch.Tensor, target: int, tau0: float,
                       alpha: float = 1e-6, *, n_orders: int = 20, seed: int = 0, batch_size: int = 10,
                       max_queries: int | None = None, check_with_verify: bool = True,
                       stolen_asr: float | None = None) -> dict:
    """The sequential test on a suspect model over `n_orders` random orders of the (non-target) images: the
    model's answers to every stamped image once, then sequential_replay per order. With check_with_verify the
    first order also runs through honeypotnet.verify(..., sequential=True) and must reach the same verdict
    after the same number of queries."""
    keep = labels != target
    images, labels = images[keep], labels[keep]
    pred = stamped_predictions(model, trigger, images)
    hits = (pred == target).numpy().astype(float)
    perms = orders(len(hits), n_orders, seed)
    runs = [sequential_replay(hits[p], tau0, alpha, batch_size, max_queries, stolen_asr) for p in perms]
    out = {"asr": float(hits.mean()), "n": len(hits), "runs": runs, **summarize(runs)}
    if check_with_verify:
        p = torch.as_tensor(perms[0])
        v = verify(model, trigger, images[p], labels[p], target, tau0, alpha, sequential=True,
                   batch_size=batch_size, max_queries=max_queries, stolen_asr=stolen_asr)
        lib = {"stolen": "flagged"}.get(v.sequential["decided"], v.sequential["decided"])
        if (lib, v.sequential["stamped_queries"]) != tuple(runs[0]):
            raise RuntimeError(f"replay {runs[0]} disagrees with verify(sequential=True): {lib} after "
                               f"{v.sequential['stamped_queries']}")
        out["verify_check"] = {"decided": lib, "stamped_queries": v.sequential["stamped_queries"]}
    return out


def scaled(trigger: Trigger, s: float) -> Trigger:
    """The trigger at amplitude s in (0, 1]: pattern s·δ, the same mask (s = 1: the same trigger). A uap's
    eps becomes s·eps (Trigger projects its pattern onto its eps; the scaled pattern lies within it)."""
    s = float(s)
    if not 0 < s <= 1:  # NaN fails too
        raise ValueError(f"trigger scale must be in (0, 1], got {s}")
    t = trigger.cpu()
    return Trigger(s * t.pattern, t.mask, t.family, s * t.eps if t.family == "uap" else t.eps)


def stamped_predictions(model, trigger: Trigger, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The model's top-1 answers to the images stamped as verify stamps them (float, not re-quantised)."""
    trigger = trigger.cpu()
    return torch.cat([predict_logits(model, trigger.stamp(to_float(images[i:i + batch_size]))).argmax(1)
                      for i in range(0, len(images), batch_size)])


# ============================================================================ detectors


def laplacian_energy(x: torch.Tensor) -> torch.Tensor:
    """(a) mean |4-neighbour Laplacian| per image (float (N,3,H,W) in [0,1])."""
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3).abs().mean((1, 2, 3))


def median_2x2(x: torch.Tensor) -> torch.Tensor:
    """Feature squeezing's median filter over 2x2 windows (the mean of the two middle values)."""
    p = F.pad(x, (0, 1, 0, 1), mode="replicate")
    w = torch.stack([p[..., :-1, :-1], p[..., :-1, 1:], p[..., 1:, :-1], p[..., 1:, 1:]]).sort(0).values
    return (w[1] + w[2]) / 2


def bit_depth(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    levels = 2 ** bits - 1
    return torch.round(x * levels) / levels


def softmax(model, x: torch.Tensor) -> torch.Tensor:
    return predict_logits(model, x).softmax(1)


def detector_scores(model, x: torch.Tensor, learned=None, adaptive=None) -> dict[str, np.ndarray]:
    """Every detector's score (higher = more suspicious) of float images x on the suspect's copy `model`
    (`learned`: the suspect's trained detector, a 2-class model, or None; `adaptive`: another, trained on
    UAPs of the quiet verification's amplitude, or None)."""
    p = softmax(model, x)
    squeeze = torch.maximum((p - softmax(model, median_2x2(x))).abs().sum(1), (p - softmax(model, bit_depth(x))).abs().sum(1))
    out = {"laplacian": laplacian_energy(x), "uncertainty": 1 - p.max(1).values, "squeeze": squeeze}
    for name, det in (("learned", learned), ("adaptive", adaptive)):
        if det is not None:
            out[name] = softmax(det, x)[:, 1]
    return {k: v.numpy().astype(float) for k, v in out.items()}


def learned_detector(model, own_images: torch.Tensor, eps: float, p, *, n_uaps: int = 4, passes: int = 10,
                     epochs: int = 8, seed: int = 0, avoid: int | None = None) -> tuple[torch.nn.Module, list[dict]]:
    """(d) The suspect's own detector: `n_uaps` targeted UAPs crafted on its copy (distinct random targets, never
    `avoid` (the owner's target, which the suspect does not know: a UAP towards it would find the backdoor
    itself), L-inf eps, the protocol's trigger step, `passes` passes over its images) and a cnn_small trained
    to tell its images stamped with them (label 1) from the same images clean (label 0, repeated to balance)."""
    g = torch.Generator().manual_seed(seed)
    targets = [t for t in torch.randperm(10, generator=g).tolist() if t != avoid][:n_uaps]
    stamped, info = [], []
    x = to_float(own_images)
    for u, t in enumerate(targets):
        cfg = base_config(p, seed).override({"target": t, "trigger_passes": passes, "seed": 1000 * (seed + 1) + u})
        trig = generate_trigger([model], Trigger.uap(int(own_images.shape[-1]), eps), own_images, cfg, 0)
        s = trig.stamp(x)
        info.append({"target": t, "asr_on_copy": float((predict_logits(model, s).argmax(1) == t).float().mean())})
        stamped.append(s)
    images = torch.cat([x.repeat(n_uaps, 1, 1, 1), *stamped])
    labels = torch.cat([torch.zeros(n_uaps * len(x), dtype=torch.long), torch.ones(n_uaps * len(x), dtype=torch.long)])
    torch.manual_seed(seed)
    det = create_model("cnn_small", 2)
    fit(det, images, labels, FitConfig(epochs=epochs, augment=False, seed=seed), progress=False, desc="detector")
    return det.cpu().eval(), info


def evasive_hits(stamped_pred: np.ndarray, flagged: np.ndarray, target: int) -> np.ndarray:
    """A suspect answering flagged queries with its best non-target class: a hit only where it answered the
    target and the query was not flagged."""
    return ((stamped_pred == target) & ~flagged).astype(float)


def window_limit(window: int, fpr: float, tolerance: float = 0.01) -> int:
    """The least k with P(Binomial(window, fpr) >= k) <= tolerance: a window of clean traffic trips the
    stateful suspect at most `tolerance` of the time."""
    k = 1
    while binom.sf(k - 1, window, fpr) > tolerance:
        k += 1
    return k


def stateful_run(hit: np.ndarray, flag_stamped: np.ndarray, flag_clean: np.ndarray, tau0: float, alpha: float,
                 *, clean_per_stamped: int = 0, window: int = 20, limit: int = 3, batch_size: int = 10,
                 stolen_asr: float | None = None) -> dict:
    """A stateful suspect: it keeps the last `window` queries' detector flags and, once `limit` of them are
    flagged, answers every later query evasively (never the target). The owner sends each stamped query
    followed by `clean_per_stamped` clean ones (flags `flag_clean`, cycled) and runs the sequential test on the
    stamped answers. Returns the verdict, stamped and total queries, and after how many queries it tripped."""
    recent: list[bool] = []
    tripped_at = None
    answers = []
    total = 0
    ci = 0
    stolen_asr = default_stolen_asr(tau0) if stolen_asr is None else stolen_asr
    for i in range(len(hit)):
        events = [bool(flag_stamped[i])] + [bool(flag_clean[(ci + j) % len(flag_clean)]) for j in range(clean_per_stamped)]
        ci += clean_per_stamped
        answers.append(0.0 if tripped_at is not None else float(hit[i]))
        for f in events:  # the suspect sees the stamped query, then the clean ones
            total += 1
            recent = (recent + [f])[-window:]
            if tripped_at is None and sum(recent) >= limit:
                tripped_at = total
        n = len(answers)
        if n % batch_size == 0 or n == len(hit):
            decided = sequential_decision(sum(answers), n, tau0, stolen_asr, alpha)
            if decided is not None:
                return {"verdict": "flagged" if decided == "stolen" else "cleared", "stamped": n, "total": total,
                        "tripped_at": tripped_at}
    return {"verdict": "undecided", "stamped": len(hit), "total": total, "tripped_at": tripped_at}


# ============================================================================ the run


def copies(reproduce_out: Path, arsenal_outs: list[Path] = ()) -> list[dict]:
    """Every copy bench.reproduce verified (results.json and ablation-*.json), then every copy of each
    bench.arsenal run in `arsenal_outs` made from this reproduction (--from-reproduce): its row, with `rel` (a
    name, unique over the sources), `dir` (the unit's folder) and `bundle` (its protection's, relative to
    reproduce_out) filled in; only finished units."""
    rows, seen = [], set()
    files = [reproduce_out / "results.json", *sorted(reproduce_out.glob("ablation-*.json"))]
    for path in files:
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        thief_epochs = r["protocol"].get("thief_epochs")
        for s in r.get("substitutes", []):
            suffix = "" if s.get("epochs") in (None, thief_epochs) else f"-e{s['epochs']}"
            pool = s.get("pool", "tin")
            suffix += "" if pool == "tin" else f"-{pool}"
            who = s["protection"] if s["oracle"] == "protected" else "clean"
            rel = s.get("rel") or f"seed{s['seed']}/thief-{who}-{s['arch']}-{s['budget']}-{s['output']}{suffix}"
            key = (rel, s["protection"], s["seed"])
            if key in seen or not (reproduce_out / rel / "unit.json").is_file():
                continue
            seen.add(key)
            rows.append({**s, "pool": pool, "rel": rel, "dir": str(reproduce_out / rel), "source": "reproduce",
                         "bundle": f"seed{s['seed']}/protect-{s['protection']}/bundle"})
    for a in arsenal_outs:
        rows += arsenal_copies(reproduce_out, Path(a))
    if not rows:
        raise SystemExit(f"{reproduce_out}: no finished thieves in results.json (run python -m bench.reproduce first)")
    return rows


ARSENAL_PARTS = ("strategies", "outputs", "families", "art")  # parts whose rows are extraction copies (not counter)


def arsenal_copies(reproduce_out: Path, arsenal_out: Path) -> list[dict]:
    """The copies of one bench.arsenal run (its results.json), which must have stolen from `reproduce_out`'s
    bundle: rows in copies()' form; `rel` is ARSENAL_DIR/UNIT. Counter-measure rows are left out (they are
    copies changed after the theft, not thieves)."""
    path = arsenal_out / "results.json"
    if not path.is_file():
        raise SystemExit(f"{arsenal_out}: no results.json (run python -m bench.arsenal --from-reproduce first)")
    r = json.loads(path.read_text())
    src = Path(r.get("from_reproduce") or "")
    if not r.get("from_reproduce") or src.resolve() != reproduce_out.resolve():
        raise SystemExit(f"{arsenal_out}: stole from {r.get('from_reproduce') or 'its own protection'}, not from "
                         f"{reproduce_out}; give the bench.reproduce run it was made from")
    seed, protection = int(r.get("reproduce_seed", 0)), r["bundle"]["protection"]
    out = []
    for part in ARSENAL_PARTS:
        for s in r.get(part) or []:
            if not s.get("rel") or not (arsenal_out / s["rel"] / "substitute.safetensors").is_file():
                continue
            arch = s.get("family") or s.get("arch")
            if s.get("trainer") not in (None, "fit"):
                arch = f"{arch}, {s['trainer']} loop"
            out.append({"seed": seed, "protection": protection, "oracle": s["oracle"], "arch": arch,
                        "budget": s["budget"], "output": s["output"], "pool": "tin", "asr": s["asr"],
                        "stolen": s["stolen"], **{k: s[k] for k in ("hits", "n", "paired_p_value", "alpha") if k in s},
                        "rel": f"{arsenal_out.name}/{s['rel']}", "dir": str(arsenal_out / s["rel"]),
                        "source": f"arsenal {part}", "bundle": f"seed{seed}/protect-{protection}/bundle"})
    return out


def verification_set(args, p) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(verification images, labels, calibration images, labels): the protocol's halves of cifar10-jpeg/test."""
    cifar_root, _ = resolve_roots(args) if not args.cifar_root else (Path(args.cifar_root), None)
    test = load_dataset("imagefolder", cifar_root, "test")
    calib, verif = split_per_class(test.labels, len(test.classes), p.calib_per_class, p.verify_per_class)
    return test.images[verif], test.labels[verif], test.images[calib], test.labels[calib]


def label_of(c: dict) -> str:
    pool = "" if c["pool"] == "tin" else f", {POOLS[c['pool']]}"
    where = ", arsenal" if str(c.get("source", "")).startswith("arsenal") else ""
    return f"{c['arch']}{pool}{where}"


def suspect_images(own: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The suspect's own images split in two: a quarter held out (its detectors' clean false-alarm
    threshold), the rest to craft its UAPs and train its learned detector on."""
    perm = np.random.default_rng(seed + 1).permutation(len(own))
    n_hold = max(1, len(own) // 4)
    return own[torch.as_tensor(perm[:n_hold])], own[torch.as_tensor(perm[n_hold:])]


def evade(aucs: dict, s_stamp: dict, s_clean: dict, s_hold: dict, pred: np.ndarray, target: int, fpr: float) -> dict:
    """The evading suspect's flags: its best detector in either direction (chosen with the owner's images: the
    worst case for the owner), thresholded at `fpr` false alarms on its own held-out clean images (scores
    `s_hold`); the stamped queries it flags, the clean ones it would, and its answers' hits once it answers
    every flagged query evasively (`pred`: its answers to the stamped queries)."""
    best = max(aucs, key=lambda k: max(aucs[k], 1 - aucs[k]))
    sign = 1.0 if aucs[best] >= 0.5 else -1.0
    hold, stamp, clean = sign * s_hold[best], sign * s_stamp[best], sign * s_clean[best]
    thr = float(np.quantile(hold, 1 - fpr))
    flag_s, flag_c = stamp > thr, clean > thr
    return {"best": best, "direction": sign, "threshold": thr, "flag_stamped": flag_s, "flag_clean": flag_c,
            "fpr_own": float(np.mean(hold > thr)), "hits_evaded": evasive_hits(pred, flag_s, target)}


def stealth(c: dict, model, bundle, vx, vy, own_hold, learned, uaps: list[dict], args) -> dict:
    """AUC of each detector on the owner's stamped vs clean verification images (target class excluded), and
    what the evading suspect does to the sequential verdict (`learned`: the suspect's detector (d) or None,
    trained on its other images; `uaps`: what its UAPs reached)."""
    keep = vy != bundle.target
    x = to_float(vx[keep])
    xs = bundle.trigger.cpu().stamp(x)
    s_clean, s_stamp = detector_scores(model, x, learned), detector_scores(model, xs, learned)
    s_hold = detector_scores(model, to_float(own_hold), learned)
    aucs = {k: auc(s_stamp[k], s_clean[k]) for k in s_clean}
    pred = predict_logits(model, xs).argmax(1).numpy()
    target, tau0 = bundle.target, bundle.tau0
    hits = (pred == target).astype(float)
    e = evade(aucs, s_stamp, s_clean, s_hold, pred, target, args.fpr)
    flag_s, flag_c, ev = e["flag_stamped"], e["flag_clean"], e["hits_evaded"]
    perms = orders(len(hits), args.orders, args.seed)
    per_query = summarize([sequential_replay(ev[q], tau0, args.alpha, args.batch_size, stolen_asr=args.stolen_asr)
                           for q in perms])
    fpr_seen = e["fpr_own"]
    limit = window_limit(args.window, max(args.fpr, fpr_seen))
    state = {}
    for r in (0, 1, 3):
        runs = [stateful_run(hits[q], flag_s[q], flag_c[q], tau0, args.alpha, clean_per_stamped=r, window=args.window,
                             limit=limit, batch_size=args.batch_size, stolen_asr=args.stolen_asr) for q in perms]
        state[str(r)] = {**summarize([(u["verdict"], u["stamped"]) for u in runs]),
                         "total_median": float(statistics.median(u["total"] for u in runs)),
                         "tripped": sum(u["tripped_at"] is not None for u in runs),
                         "tripped_at_median": (float(statistics.median(u["tripped_at"] for u in runs if u["tripped_at"]))
                                               if any(u["tripped_at"] for u in runs) else None)}
    return {"copy": c["rel"], "protection": c["protection"], "aucs": aucs, "best": e["best"], "direction": e["direction"],
            "uaps": uaps, "threshold": e["threshold"], "fpr_own": fpr_seen, "fpr_verification": float(flag_c.mean()),
            "tpr_stamped": float(flag_s.mean()), "asr": float(hits.mean()), "asr_evaded": float(ev.mean()),
            "per_query": per_query, "window": args.window, "window_limit": limit, "stateful": state}


def quiet(prows: list[dict], bundle, refs: list, vx, vy, cx, cy, detectors: dict, own: tuple, p, args) -> list[dict]:
    """Quiet verification of one protection's copies (`prows`: stolen copies and clean twins) at each scale s of
    args.scales: the trigger scaled (x + s·δ), tau0(s) by the protocol's recipe (calibrate_tau0 over the seed's
    references `refs` on the calibration half `cx`, `cy`), every copy's ASR and queries to verdict at tau0(s);
    for the stolen copies the detectors' AUCs on the verification images stamped at s -- (a)-(c), the learned
    detector (d) trained at the bundle's eps (`detectors[(rel, protection)]`, reused across scales) and an
    adaptive one, learned_detector on the suspect's UAPs at s·eps -- and the evading suspect's per-query
    verdict (`own`: the suspect's held-out and training images, suspect_images). One entry per scale."""
    own_hold, own_train = own
    target = bundle.target
    keep = vy != target
    x = to_float(vx[keep])
    out = []
    for sc in args.scales:
        trig = scaled(bundle.trigger, sc)
        cal = calibrate_tau0(refs, trig, cx, cy, target)
        out.append({"protection": prows[0]["protection"], "scale": sc, "eps": trig.eps, "tau0": cal.tau0,
                    "tau0_bundle": bundle.tau0, "calibration": asdict(cal), "copies": [], "stealth": [], "_trigger": trig})
    perms = orders(int(keep.sum()), args.orders, args.seed)
    for r in prows:
        model, _ = load_model(Path(r["dir"]) / "substitute.safetensors")
        model.eval()
        learned = detectors.get((r["rel"], r["protection"]))
        for e in out:
            t0, trig, tau0 = time.time(), e["_trigger"], e["tau0"]
            q = queries_to_verdict(model, trig, vx, vy, target, tau0, args.alpha, n_orders=args.orders,
                                   seed=args.seed, batch_size=args.batch_size, stolen_asr=args.stolen_asr)
            e["copies"].append({"copy": r["rel"], "oracle": r["oracle"], "label": label_of(r), "output": r["output"],
                                **{k: v for k, v in q.items() if k != "runs"}})
            if r["oracle"] != "protected":
                continue
            adaptive = None
            if learned is not None:  # at s = 1 the adaptive detector is the learned one (same eps, same seed)
                adaptive = learned if e["scale"] == 1 else learned_detector(model, own_train, trig.eps, p, seed=args.seed,
                                                                            avoid=target)[0]
            xs = trig.stamp(x)
            s_clean, s_stamp = detector_scores(model, x, learned, adaptive), detector_scores(model, xs, learned, adaptive)
            s_hold = detector_scores(model, to_float(own_hold), learned, adaptive)
            aucs = {k: auc(s_stamp[k], s_clean[k]) for k in s_clean}
            pred = predict_logits(model, xs).argmax(1).numpy()
            ev = evade(aucs, s_stamp, s_clean, s_hold, pred, target, args.fpr)
            per_query = summarize([sequential_replay(ev["hits_evaded"][o], tau0, args.alpha, args.batch_size,
                                                     stolen_asr=args.stolen_asr) for o in perms])
            e["stealth"].append({"copy": r["rel"], "label": label_of(r), "output": r["output"], "aucs": aucs,
                                 "best": ev["best"], "separation": separation(aucs), "asr": q["asr"],
                                 "tpr_stamped": float(ev["flag_stamped"].mean()),
                                 "asr_evaded": float(ev["hits_evaded"].mean()), "per_query": per_query})
            log(f"quiet {r['rel']} s={e['scale']:g}: ASR {100 * q['asr']:.1f}% {q['verdict']} (tau0 {100 * tau0:.1f}%)  "
                + "  ".join(f"{k} {v:.3f}" for k, v in aucs.items()) + f"  | evaded: {per_query['verdict']}  "
                f"[{time.time() - t0:.0f} s]")
    for e in out:
        del e["_trigger"]
        e["summary"] = quiet_summary(e, args.learned)
    return out


def separation(aucs: dict) -> float:
    """The best detector's AUC in either direction (a detector below 0.5 separates reversed)."""
    return max(max(a, 1 - a) for a in aucs.values())


def quiet_summary(e: dict, learned: bool) -> dict:
    """One protection at one scale: stolen copies flagged in every order / total, median of their median
    queries and the largest max, clean twins flagged in any order, each detector's AUC range over the stolen
    copies, the best separation, the evading suspect's verdicts, and whether the goal holds (every detector
    including the adaptive one at AUC <= STEALTH_GOAL either way, every stolen copy flagged, no clean twin
    flagged; None without the learned detectors)."""
    stolen = [c for c in e["copies"] if c["oracle"] == "protected"]
    clean = [c for c in e["copies"] if c["oracle"] != "protected"]
    flagged = sum(c["counts"]["flagged"] == c["orders"] for c in stolen)
    fp = sum(c["counts"]["flagged"] > 0 for c in clean)
    names = list(e["stealth"][0]["aucs"]) if e["stealth"] else []
    ranges = {k: [min(t["aucs"][k] for t in e["stealth"]), max(t["aucs"][k] for t in e["stealth"])] for k in names}
    sep = max((t["separation"] for t in e["stealth"]), default=float("nan"))
    evaded = {v: sum(t["per_query"]["verdict"] == v for t in e["stealth"]) for v in ("flagged", "cleared", "undecided", "mixed")}
    ok = flagged == len(stolen) and fp == 0 and sep <= STEALTH_GOAL
    return {"stolen": len(stolen), "stolen_flagged": flagged, "clean": len(clean), "clean_flagged": fp,
            "stolen_median": float(statistics.median(c["median"] for c in stolen)) if stolen else float("nan"),
            "stolen_max": max((c["max"] for c in stolen), default=0), "asr": [c["asr"] for c in stolen],
            "auc_range": ranges, "separation": sep, "evaded": evaded, "goal": ok if learned else None}


def _q(s: dict) -> str:
    med = f"{s['median']:.0f}" if float(s["median"]).is_integer() else f"{s['median']:.1f}"
    return f"{med} / {s['max']}"


def _v(s: dict) -> str:
    if s["verdict"] != "mixed":
        return s["verdict"]
    return "mixed (" + ", ".join(f"{k} {v}" for k, v in s["counts"].items() if v) + ")"


def report(rows: list[dict], st: list[dict], summary: dict, args, qt: list[dict] = ()) -> str:
    out = [f"# Ownership verification: queries to verdict and stealth ({'quick' if args.quick else 'full'} protocol)", "",
           f"Sequential test (docs/verification.md) at alpha {args.alpha:g}, stamped queries {args.batch_size} at a time, "
           f"over {args.orders} random orders of the {rows[0]['qtv']['n']} non-target verification images; queries = "
           "stamped queries sent until the verdict (median / max over the orders); a copy is cleared once its ASR is "
           "shown below " + (f"{args.stolen_asr:g}" if args.stolen_asr is not None else
                             "verify's default stolen ASR (0.5, or halfway between tau0 and 1)") + ".", "",
           "| protection | copy | thief (pool) | budget | output | ASR | tau0 | verdict | queries median / max |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['protection']} | {'stolen' if r['oracle'] == 'protected' else 'clean twin'} | {label_of(r)} | "
                   f"{r['budget']} | {'label-only' if r['output'] == 'label' else 'soft'} | {100 * r['qtv']['asr']:.1f}% | "
                   f"{100 * r['tau0_bundle']:.1f}% | {_v(r['qtv'])} | {_q(r['qtv'])} |")
    s = summary
    out += ["", f"- stolen copies flagged within {args.goal_queries} queries (every order): "
                f"{s['stolen_within']}/{s['stolen']} (goal: all)",
            f"- median queries to verdict over stolen copies (median of their medians): {s['stolen_median']:g} (goal: <= 30); "
            f"largest max: {s['stolen_max']}",
            f"- clean twins flagged (false positives, any order): {s['false_positives']}/{s['clean']} (goal: 0); "
            f"cleared: {s['clean_cleared']}, undecided after every image: {s['clean_undecided']}",
            "", "Published figures of other ownership tests, for context only (their own claims on their own "
                "protocols, **not measured here**):", ""]
    out += [f"- {n}: {c}" for n, c in PEERS]
    out += ["", "## Stealth: can the suspect detect the verification queries?", "",
            "ROC AUC of each detector separating the owner's stamped verification images from the same images clean "
            "(0.5 = blind; goal <= 0.6). " + "; ".join(f"{k}: {v}" for k, v in DETECTORS.items()) + ".", "",
            "An AUC below 0.5 means the reversed score separates (1 - AUC); the last column is the best detector "
            "in either direction.", "",
            "| protection | copy | thief (pool) | output | " + " | ".join(f"AUC {k}" for k in DETECTORS)
            + " | best, either direction |",
            "| --- | --- | --- | --- | " + " | ".join("---" for _ in DETECTORS) + " | --- |"]
    by_rel = {(r["rel"], r["protection"]): r for r in rows}
    for t in st:
        r = by_rel[(t["copy"], t["protection"])]
        cells = [f"{t['aucs'][k]:.3f}" if k in t["aucs"] else "—" for k in DETECTORS]
        sep = max(t["aucs"][t["best"]], 1 - t["aucs"][t["best"]])
        out.append(f"| {r['protection']} | stolen | {label_of(r)} | {r['output']} | " + " | ".join(cells)
                   + f" | {t['best']}{'' if t['direction'] > 0 else ' (reversed)'}: {sep:.3f} |")
    if any(t["uaps"] for t in st):
        out += ["", "(d): the suspect's UAPs reach " + "; ".join(
            f"{label_of(by_rel[(t['copy'], t['protection'])])} {by_rel[(t['copy'], t['protection'])]['output']}: "
            + ", ".join(f"{100 * u['asr_on_copy']:.0f}%" for u in t["uaps"]) for t in st if t["uaps"])
            + " ASR on its own copy (their random targets)."]
    out += ["", "## Evasion: the suspect answers what its best detector flags with a non-target class", "",
            f"Threshold: {100 * args.fpr:.0f}% false alarms on the suspect's own clean images. Per query: every flagged "
            f"query answered evasively. Stateful: once {st[0]['window_limit'] if st else '?'} of the last {args.window} "
            "queries are flagged (a window of clean traffic trips it at most 1% of the time), every later answer is "
            "evasive; the owner sends stamped queries alone (1:0) or each followed by 1 or 3 clean ones (1:1, 1:3). "
            "Verdict and stamped queries median / max over the orders; total = stamped + clean queries (median).", "",
            "| protection | copy | best detector (AUC) | stamped flagged / clean flagged | ASR → evaded | per query | "
            "stateful 1:0 (total) | stateful 1:1 (total) | stateful 1:3 (total) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in st:
        r = by_rel[(t["copy"], t["protection"])]
        cells = [f"{_v(t['stateful'][k])}, {_q(t['stateful'][k])} ({t['stateful'][k]['total_median']:.0f})"
                 for k in ("0", "1", "3")]
        sep = max(t["aucs"][t["best"]], 1 - t["aucs"][t["best"]])
        out.append(f"| {r['protection']} | {label_of(r)} {r['output']} | {t['best']}{'' if t['direction'] > 0 else ' (reversed)'} ({sep:.2f}) | "
                   f"{100 * t['tpr_stamped']:.0f}% / {100 * t['fpr_verification']:.0f}% | {100 * t['asr']:.0f}% → "
                   f"{100 * t['asr_evaded']:.0f}% | {_v(t['per_query'])}, {_q(t['per_query'])} | " + " | ".join(cells) + " |")
    if qt:
        out += ["", quiet_report(qt, args)]
    return "\n".join(out)


def _range(r: list[float]) -> str:
    return f"{r[0]:.3f}" if f"{r[0]:.3f}" == f"{r[1]:.3f}" else f"{r[0]:.3f}–{r[1]:.3f}"


def quiet_report(qt: list[dict], args) -> str:
    """The quiet-verification section: one row per protection and scale, the goal per protection, then
    per stolen copy."""
    out = ["## Quiet verification: the trigger scaled down (x + s·δ)", "",
           "The owner verifies with s·δ (s = 1: the trigger as trained). tau0(s): the protocol's calibration "
           "(calibrate_tau0 over the seed's reference models on the calibration half of the test split) for the "
           "scaled trigger. Stolen copies flagged in every order / total, their queries (median of medians / "
           "largest max), clean twins flagged in any order. AUC ranges over the stolen copies: (a) mean "
           "|Laplacian|; learned (d), trained on the suspect's UAPs at the bundle's eps; adaptive, trained on its "
           "UAPs at s·eps (a suspect who knows the owner verifies at s); 'any' = the best of all five detectors "
           f"((a)-(d) and adaptive) in either direction. Evaded: the per-query evading suspect's verdicts "
           f"(its best detector at {100 * args.fpr:.0f}% false alarms on its own clean images). Goal: AUC <= "
           f"{STEALTH_GOAL} for every detector, every stolen copy flagged, no clean twin flagged.", "",
           "| protection | s | eps | tau0(s) | stolen flagged | queries median / max | clean twins flagged | "
           "AUC laplacian | AUC learned (eps) | AUC adaptive (s·eps) | any, either way | evaded: flagged / cleared / other | goal |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in qt:
        u = e["summary"]
        rg = u["auc_range"]
        cells = [_range(rg[k]) if k in rg else "—" for k in ("laplacian", "learned", "adaptive")]
        ev = u["evaded"]
        goal = "—" if u["goal"] is None else ("met" if u["goal"] else "no")
        out.append(f"| {e['protection']} | {e['scale']:g} | {255 * e['eps']:.1f}/255 | {100 * e['tau0']:.1f}% | "
                   f"{u['stolen_flagged']}/{u['stolen']} | {u['stolen_median']:g} / {u['stolen_max']} | "
                   f"{u['clean_flagged']}/{u['clean']} | " + " | ".join(cells) + f" | {u['separation']:.3f} | "
                   f"{ev['flagged']} / {ev['cleared']} / {ev['undecided'] + ev['mixed']} | {goal} |")
    out += [""]
    for name in dict.fromkeys(e["protection"] for e in qt):
        es = [e for e in qt if e["protection"] == name]
        met = [e["scale"] for e in es if e["summary"]["goal"]]
        one = [e for e in es if e["scale"] == 1]
        check = ""
        if one:
            d = one[0]["tau0"] - one[0]["tau0_bundle"]
            check = (f" At s = 1 tau0 is {100 * one[0]['tau0']:.2f}%, the bundle's {100 * one[0]['tau0_bundle']:.2f}%"
                     + (" (reproduced)." if abs(d) < 1e-9 else f" (differs by {100 * d:+.2f} points)."))
        if any(e["summary"]["goal"] is None for e in es):
            verdict = "not judged (no learned detectors: --no-learned)."
        elif met:
            verdict = "goal met at s = " + ", ".join(f"{x:g}" for x in met) + "."
        else:
            verdict = "no scale meets the goal."
        if one and one[0]["summary"]["stolen_flagged"] < one[0]["summary"]["stolen"]:
            u = one[0]["summary"]
            verdict += f" Already at s = 1 only {u['stolen_flagged']}/{u['stolen']} stolen copies are flagged."
        out.append(f"- **{name}**: {verdict}{check}")
    out += ["", "Per stolen copy: ASR at s, verdict and queries (median / max), AUC (a) / (d) / adaptive, the "
                "evading suspect's verdict.", "",
            "| protection | s | thief (pool) | output | ASR | verdict, queries | AUC laplacian / learned / adaptive | evaded |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in qt:
        by = {c["copy"]: c for c in e["copies"]}
        for t in e["stealth"]:
            c = by[t["copy"]]
            a = " / ".join(f"{t['aucs'][k]:.3f}" if k in t["aucs"] else "—" for k in ("laplacian", "learned", "adaptive"))
            out.append(f"| {e['protection']} | {e['scale']:g} | {t['label']} | {t['output']} | {100 * t['asr']:.1f}% | "
                       f"{_v(c)}, {_q(c)} | {a} | {_v(t['per_query'])}, {_q(t['per_query'])} |")
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.ownership", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reproduction_reader_args(ap, "the quick protocol's verification half (100 images per class), as bench.reproduce "
                                     "--quick", "their thieves and clean twins are measured too")
    ap.add_argument("--alpha", type=float, default=1e-6, help="the sequential test's level (default 1e-6)")
    ap.add_argument("--orders", type=int, default=20, help="random orders of the verification images per copy")
    ap.add_argument("--batch-size", type=int, default=10, help="stamped queries per step of the test (verify's default 10)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the orders and of the suspect's detector")
    ap.add_argument("--stolen-asr", type=float, default=None, metavar="P",
                    help="the sequential test clears a copy once its ASR is shown below P (default: verify's, 0.5 "
                         "or halfway between tau0 and 1); a P just above tau0 keeps testing weak stolen copies")
    ap.add_argument("--goal-queries", type=int, default=100, help="the goal: every stolen copy flagged within this many")
    ap.add_argument("--fpr", type=float, default=0.10, help="the evading suspect's false-alarm rate on clean queries")
    ap.add_argument("--window", type=int, default=20, help="the stateful suspect's window of recent queries")
    ap.add_argument("--learned", action=argparse.BooleanOptionalAction, default=True,
                    help="train detector (d) for each stolen copy (default on)")
    ap.add_argument("--scales", type=float, nargs="*", default=[1, 0.75, 0.5, 0.35, 0.25],
                    help="quiet verification: the trigger's amplitudes s in (0, 1] (default 1 0.75 0.5 0.35 0.25; "
                         "none: skip)")
    ap.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=True,
                    help="the quiet-verification study (default on)")
    ap.add_argument("--quiet-protections", nargs="+", default=["base", "robust"],
                    help="protections the quiet study covers (default base robust)")
    args = ap.parse_args(argv)
    bad = [x for x in args.scales if not 0 < x <= 1]
    if bad:
        ap.error(f"--scales must lie in (0, 1], got {bad}")
    return finish_common_args(args, NAME)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    p, src = open_reproduction(args)
    vx, vy, cx, cy = verification_set(args, p)
    log(f"verification half: {len(vx)} images; the suspect's own images (calibration half): {len(cx)}")
    rows, bundles = [], {}
    for c in copies(src, args.arsenal_out):
        b = bundles.get(c["bundle"]) or load_bundle(src / c["bundle"])
        bundles[c["bundle"]] = b
        if b.tau0 is None:
            log(f"skip {c['rel']}: {c['bundle']} has no calibrated tau0")
            continue
        model, _ = load_model(Path(c["dir"]) / "substitute.safetensors")
        model.eval()
        q = queries_to_verdict(model, b.trigger, vx, vy, b.target, b.tau0, args.alpha, n_orders=args.orders,
                               seed=args.seed, batch_size=args.batch_size, stolen_asr=args.stolen_asr)
        row = {k: c[k] for k in ("seed", "protection", "oracle", "arch", "budget", "output", "pool", "rel", "dir", "source",
                                 "asr", "stolen")}
        row |= {"asr_fixed_n": c["asr"], "stolen_fixed_n": c["stolen"], "tau0_bundle": b.tau0, "target": b.target,
                "qtv": {k: v for k, v in q.items()}}
        rows.append(row)
        log(f"{c['protection']:>8} {c['oracle']:>9} {c['rel']}: ASR {100 * q['asr']:.1f}%  {q['verdict']}  "
            f"queries median {q['median']:g} max {q['max']}")
    stolen = [r for r in rows if r["oracle"] == "protected"]
    clean = [r for r in rows if r["oracle"] == "clean"]
    summary = {"stolen": len(stolen), "clean": len(clean),
               "stolen_within": sum(r["qtv"]["counts"]["flagged"] == r["qtv"]["orders"] and r["qtv"]["max"] <= args.goal_queries
                                    for r in stolen),
               "stolen_median": float(statistics.median(r["qtv"]["median"] for r in stolen)) if stolen else float("nan"),
               "stolen_max": max((r["qtv"]["max"] for r in stolen), default=0),
               "false_positives": sum(r["qtv"]["counts"]["flagged"] > 0 for r in clean),
               "clean_cleared": sum(r["qtv"]["verdict"] == "cleared" for r in clean),
               "clean_undecided": sum(r["qtv"]["counts"]["undecided"] > 0 for r in clean)}
    st, detectors = [], {}
    own = suspect_images(cx, args.seed)
    quiet_on = args.quiet and bool(args.scales)
    for r in stolen:
        b = bundles[f"seed{r['seed']}/protect-{r['protection']}/bundle"]
        model, _ = load_model(Path(r["dir"]) / "substitute.safetensors")
        model.eval()
        t = time.time()
        learned, uaps = (learned_detector(model, own[1], b.trigger.eps, p, seed=args.seed, avoid=b.target)
                         if args.learned else (None, []))
        if quiet_on and r["protection"] in args.quiet_protections:  # reused by the quiet study
            detectors[(r["rel"], r["protection"])] = learned
        s = stealth(r, model, b, vx, vy, own[0], learned, uaps, args)
        st.append(s)
        log(f"stealth {r['rel']}: " + "  ".join(f"{k} {v:.3f}" for k, v in s["aucs"].items())
            + f"  | evaded ASR {100 * s['asr_evaded']:.0f}%: {s['per_query']['verdict']}  [{time.time() - t:.0f} s]")
    qt, refs = [], {}
    if quiet_on:
        for seed, name in dict.fromkeys((r["seed"], r["protection"]) for r in stolen if r["protection"] in args.quiet_protections):
            refs[seed] = refs.get(seed) or load_references(src, seed, p.reference_archs)
            prows = [r for r in rows if r["seed"] == seed and r["protection"] == name]
            qt += quiet(prows, bundles[f"seed{seed}/protect-{name}/bundle"], refs[seed], vx, vy, cx, cy, detectors,
                        own, p, args)
    for r in rows:
        r["qtv"]["runs"] = [list(x) for x in r["qtv"]["runs"]]
    results = {"benchmark": "bench.ownership", "mode": "quick" if args.quick else "full",
               "what": "Queries to a sequential ownership verdict for every stolen copy and clean twin of a "
                       "bench.reproduce run, and the stealth of the verification queries (detector AUC, evasion)",
               "command": command_line("bench.ownership", argv),
               "protocol": {"reproduce_out": str(src), "arsenal_out": [str(a) for a in args.arsenal_out],
                            "stolen_asr": args.stolen_asr, "alpha": args.alpha, "orders": args.orders,
                            "batch_size": args.batch_size, "seed": args.seed, "goal_queries": args.goal_queries,
                            "fpr": args.fpr, "window": args.window, "learned": args.learned,
                            "scales": args.scales if quiet_on else [],
                            "quiet_protections": args.quiet_protections if quiet_on else [],
                            "verification_images": len(vx), "own_images": len(cx), "detectors": DETECTORS,
                            "peers_published_not_measured": [{"method": n, "claim": c} for n, c in PEERS]},
               "machine": machine_info(torch.device("cpu")), "summary": summary, "copies": rows, "stealth": st,
               "quiet": qt,
               "seconds": round(time.time() - t0, 1)}
    md = report(rows, st, summary, args, qt)
    written = save_report(Path(args.out), NAME, results, md, record=args.record, folder=NAME)
    log("")
    log(md)
    log(f"\nwrote {', '.join(map(str, written))}")
    return results


if __name__ == "__main__":
    main()
