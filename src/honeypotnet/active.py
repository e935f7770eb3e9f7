"""Active model extraction (ActiveThief, Pal et al., AAAI 2020) against any Oracle.

The thief starts from a random *initial seed* of its pool, then works in rounds: train a substitute
on everything bought so far, score the pool images not yet queried with a selection strategy, buy
the best-scored batch, repeat. The final substitute is trained from scratch on all bought answers
with the same training recipe as the random thief, so the strategies differ only in *which* images
were bought. One image = one query; no image is ever queried twice.

Strategies (`STRATEGIES`):

* ``random``  — KnockoffNets' random strategy, the reference: exactly `attacks.random_extraction`
  (same images for the same seed; the active strategies' initial seed is its first images).
* ``entropy`` — uncertainty sampling: the highest entropy of the substitute's softmax.
* ``kcenter`` — core-set (Sener & Savarese 2018): greedy k-center in the substitute's penultimate
  feature space, each new image the farthest from everything bought (and picked) so far.
* ``dfal``    — DeepFool Active Learning (Ducoffe & Precioso 2018): the smallest DeepFool
  perturbation that flips the substitute's label (images closest to its decision boundary),
  computed on a random candidate subset of the unqueried pool, few iterations, batched.

Round schedule: `initial` random images (default 10% of the budget), then `rounds` equal batches
(the last one takes the remainder). Between rounds the *round substitute* is warm-started: the same
model continues training for `round_epochs` epochs on all answers bought so far (cheap); it is only
used to score the pool.

Resuming: with `work_dir`, the bought indices, their answers, the round substitute and the final
training are checkpointed after every query batch / round / epoch; running the same call again
continues where it stopped and never pays for a query twice.

Note: when the budget equals the pool, every strategy buys the whole pool: the strategies coincide.
"""
from __future__ import annotations

import copy
import hashlib
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import attacks as _attacks
from .models import create_model, split_classifier
from .names import STRATEGIES
from .oracles import Oracle
from .ops import atomic_torch_save, batched_forward, to_float
from .training import FitConfig, fit, predict_logits

STATE_VERSION = 1


# ============================================================================ scores (no queries: the thief's own model)


@torch.inference_mode()
def entropy_scores(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Entropy (nats) of the model's softmax for each image (N,), uint8/float images (N,3,H,W)."""
    logp = F.log_softmax(predict_logits(model, images, batch_size), dim=1)
    return -(logp.exp() * logp).sum(1)


@torch.inference_mode()
def feature_vectors(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Penultimate features (N,d) of a classifier (see models.split_classifier), in eval mode, on CPU."""
    return batched_forward(split_classifier(model)[0], images, batch_size=batch_size, channels_last=False)


def min_distances(points: torch.Tensor, centers: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Euclidean distance (M,) of every point (M,d) to its nearest center (L,d); inf when L = 0."""
    if len(centers) == 0:
        return torch.full((len(points),), float("inf"))
    out = torch.empty(len(points))
    for i in range(0, len(points), chunk):
        out[i : i + chunk] = torch.cdist(points[i : i + chunk], centers).min(1).values
    return out


def coverage_radius(points: torch.Tensor, centers: torch.Tensor) -> float:
    """max over points of the distance to the nearest center: what k-center minimises."""
    return float(min_distances(points, centers).max()) if len(points) else 0.0


def kcenter_greedy(candidates: torch.Tensor, centers: torch.Tensor, n: int, *, return_radius: bool = False):
    """Greedy k-center (a 2-approximation): pick `n` rows of `candidates` (M,d), each the farthest
    from `centers` (L,d) and the rows picked before it. Returns their indices (n,) in pick order
    (and, with return_radius, the coverage radius of the unpicked candidates afterwards)."""
    if n > len(candidates):
        raise ValueError(f"cannot pick {n} of {len(candidates)} candidates")
    dist = min_distances(candidates, centers)
    picked = torch.empty(n, dtype=torch.long)
    for j in range(n):
        i = int(torch.argmax(dist))  # no centers at all: every distance is inf, start at row 0
        picked[j] = i
        dist = torch.minimum(dist, (candidates - candidates[i]).pow(2).sum(1).sqrt())
        dist[i] = -1.0  # never picked twice (distance to itself is 0 anyway)
    if return_radius:
        return picked, float(dist.max().clamp_min(0)) if len(dist) else 0.0
    return picked


def deepfool_distances(model: nn.Module, images: torch.Tensor, *, max_iter: int = 3, overshoot: float = 0.02,
                       top_classes: int = 4, batch_size: int = 250) -> torch.Tensor:
    """L2 norm (N,) of the DeepFool perturbation (Moosavi-Dezfooli et al. 2016) that changes the
    model's label of each image: small = close to the decision boundary.

    Batched: every image of a batch takes its linearised step towards the nearest of its `top_classes`
    runner-up classes, at most `max_iter` steps; gradients come from one backward pass per class for
    the whole batch (in eval mode the images do not interact). An image not flipped after `max_iter`
    steps scores its accumulated perturbation plus the remaining linearised distance."""
    if max_iter < 1 or top_classes < 1:
        raise ValueError("deepfool needs max_iter >= 1 and top_classes >= 1")
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for b in range(0, len(images), batch_size):
        x0 = to_float(images[b : b + batch_size], dev)
        n = len(x0)
        dist = torch.full((n,), float("nan"), device=dev)
        with torch.no_grad():
            logits0 = model(x0)
        if logits0.shape[1] < 2:
            raise ValueError("DeepFool needs a classifier with at least 2 classes")
        k = min(top_classes, logits0.shape[1] - 1)
        order = logits0.argsort(1, descending=True)
        label_all, others_all = order[:, 0], order[:, 1 : 1 + k]
        act = torch.arange(n, device=dev)  # images not flipped yet: only these are pushed further
        r_act = torch.zeros_like(x0)  # accumulated perturbation of the active images
        for it in range(max_iter + 1):
            x = (x0[act] + (1 + overshoot) * r_act).clamp(0, 1).requires_grad_(True)
            logits = model(x)
            label, others = label_all[act], others_all[act]
            flipped = logits.argmax(1) != label
            if flipped.any():
                dist[act[flipped]] = ((1 + overshoot) * r_act[flipped]).flatten(1).norm(dim=1)
                keep = ~flipped
                act, r_act, label, others = act[keep], r_act[keep], label[keep], others[keep]
                if len(act) == 0:
                    break
                x = (x0[act] + (1 + overshoot) * r_act).clamp(0, 1).requires_grad_(True)
                logits = model(x)
            rows = torch.arange(len(act), device=dev)
            g0 = torch.autograd.grad(logits[rows, label].sum(), x, retain_graph=True)[0]
            best_pert = torch.full((len(act),), float("inf"), device=dev)
            best_w = torch.zeros_like(x)
            for j in range(k):
                gj = torch.autograd.grad(logits[rows, others[:, j]].sum(), x, retain_graph=j < k - 1)[0]
                w = gj - g0
                f = (logits[rows, others[:, j]] - logits[rows, label]).detach()
                pert = f.abs() / w.flatten(1).norm(dim=1).clamp_min(1e-12)
                better = pert < best_pert
                best_pert = torch.where(better, pert, best_pert)
                best_w[better] = w[better]
            if it == max_iter:  # out of iterations: what is left, linearised
                dist[act] = ((1 + overshoot) * r_act).flatten(1).norm(dim=1) + best_pert
                break
            wn = best_w.flatten(1).norm(dim=1).clamp_min(1e-12)
            r_act = r_act + (best_pert + 1e-4)[:, None, None, None] * best_w / wn[:, None, None, None]
        out.append(dist.detach().cpu())
    model.train(was)
    return torch.cat(out) if out else torch.empty(0)


# ============================================================================ one selection step


def select(strategy: str, model: nn.Module, pool: torch.Tensor, bought: torch.Tensor, n: int, *,
           generator: torch.Generator | None = None, dfal_candidates: int | None = None, dfal_iters: int = 3,
           dfal_classes: int = 4, batch_size: int = 500) -> tuple[torch.Tensor, dict]:
    """Pick `n` pool indices not in `bought` with `strategy`, scored with the thief's `model`.

    Returns (indices (n,), info): info holds the strategy's score of the picked images and of the
    scored candidates (mean), so a caller can see the pick is not a random one. No oracle query."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    taken = torch.zeros(len(pool), dtype=torch.bool)
    taken[bought] = True
    free = (~taken).nonzero().flatten()
    if n > len(free):
        raise ValueError(f"cannot buy {n} more images: only {len(free)} of the pool are left unqueried")
    g = generator or torch.Generator().manual_seed(0)
    info: dict = {"strategy": strategy, "candidates": len(free)}
    if n == len(free):
        return free, info | {"note": "pool exhausted: every remaining image is bought"}
    if strategy == "random":
        return free[torch.randperm(len(free), generator=g)[:n]], info
    if strategy == "entropy":
        s = entropy_scores(model, pool[free], batch_size)
        top = s.topk(n).indices
        return free[top], info | {"score": "entropy", "picked_mean": float(s[top].mean()), "candidates_mean": float(s.mean()),
                                  "picked_percentile": _percentile(s, top)}
    if strategy == "kcenter":
        feats_free = feature_vectors(model, pool[free], batch_size)
        feats_bought = feature_vectors(model, pool[bought], batch_size)
        before = min_distances(feats_free, feats_bought)
        pick, radius_after = kcenter_greedy(feats_free, feats_bought, n, return_radius=True)
        return free[pick], info | {"score": "distance to nearest bought image (features)",
                                   "picked_mean": float(before[pick].mean()), "candidates_mean": float(before.mean()),
                                   "picked_percentile": _percentile(before, pick),
                                   "radius_before": float(before.max()), "radius_after": radius_after}
    # dfal: score a random subset of the unqueried images (DeepFool is the expensive one)
    m = min(len(free), max(2 * n, 500) if dfal_candidates is None else int(dfal_candidates))
    if m < n:
        raise ValueError(f"dfal_candidates={m} is smaller than the batch of {n} to buy")
    cand = free[torch.randperm(len(free), generator=g)[:m]]
    d = deepfool_distances(model, pool[cand], max_iter=dfal_iters, top_classes=dfal_classes, batch_size=max(1, batch_size // 2))
    top = (-d).topk(n).indices
    return cand[top], info | {"candidates": m, "score": "DeepFool perturbation L2",
                              "picked_mean": float(d[top].mean()), "candidates_mean": float(d.mean()),
                              "picked_percentile": _percentile(d, top)}


def _percentile(scores: torch.Tensor, picked: torch.Tensor) -> float:
    """Mean rank (0 = lowest score, 1 = highest) of the picked candidates: about 0.5 for a random pick."""
    if len(scores) < 2:
        return 0.5
    ranks = scores.argsort().argsort().float() / (len(scores) - 1)
    return float(ranks[picked].mean())


# ============================================================================ the thief


def round_sizes(budget: int, rounds: int, initial: int | None = None) -> list[int]:
    """[initial seed, batch of round 1, ..., batch of round `rounds`], summing to `budget`."""
    if budget <= 0:
        raise ValueError(f"query budget must be positive, got {budget}")
    if rounds < 1:
        raise ValueError(f"an active thief needs rounds >= 1, got {rounds}")
    n0 = max(1, budget // 10) if initial is None else int(initial)
    if not 1 <= n0 < budget:
        raise ValueError(f"the initial seed must hold between 1 and budget-1 = {budget - 1} images, got {n0}")
    rest = budget - n0
    rounds = min(rounds, rest)
    base, extra = divmod(rest, rounds)
    return [n0] + [base + (1 if i < extra else 0) for i in range(rounds)]


def _pool_digest(pool: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(str((tuple(pool.shape), str(pool.dtype))).encode())
    step = max(1, len(pool) // 512)  # a sample of the pool: cheap, and enough to tell pools apart
    h.update(pool[::step].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def extract(oracle: Oracle, pool: torch.Tensor, budget: int, arch: str | nn.Module, num_classes: int,
            strategy: str = "random", *, rounds: int = 5, initial: int | None = None,
            fit_config: FitConfig | None = None, round_epochs: int | None = None, seed: int = 0,
            progress: bool = False, work_dir: str | os.PathLike | None = None, device=None,
            dfal_candidates: int | None = None, dfal_iters: int = 3, dfal_classes: int = 4,
            query_batch: int = 256) -> "_attacks.ExtractionResult":
    """Model extraction with a selection `strategy` (see the module docstring); returns an
    ExtractionResult whose `indices` are the bought pool images (in buying order) and `rounds` one
    record per round (batch size, the strategy's scores of picked vs candidate images, seconds).

    pool: the thief's uint8 images (N,3,H,W). budget: queries = images bought (each once).
    fit_config: training of the final substitute (as for random_extraction). round_epochs: epochs of
    warm-started training of the round substitute per round (default max(1, epochs // 4)).
    work_dir: checkpoints for resuming (a directory of this extraction only)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if budget <= 0:
        raise ValueError(f"query budget must be positive, got {budget}")
    if budget > len(pool):
        raise ValueError(f"query budget {budget} exceeds the pool of {len(pool)} images")
    if pool.ndim != 4 or pool.shape[1] != 3:
        raise ValueError(f"the pool must be images (N, 3, H, W), got shape {tuple(pool.shape)}")
    if strategy == "random":
        res = _attacks.random_extraction(oracle, pool, budget, arch, num_classes, fit_config, seed=seed,
                                         progress=progress, work_dir=work_dir, device=device)
        return res
    cfg = fit_config or FitConfig()
    sizes = round_sizes(budget, rounds, initial)
    if budget == len(pool):
        warnings.warn(f"budget {budget} = the whole pool: strategy {strategy!r} buys the same images as random",
                      stacklevel=2)
    r_epochs = max(1, cfg.epochs // 4) if round_epochs is None else int(round_epochs)
    if r_epochs < 1:
        raise ValueError(f"round_epochs must be >= 1, got {r_epochs}")
    wd = Path(work_dir) if work_dir else None
    key = {"version": STATE_VERSION, "strategy": strategy, "budget": budget, "sizes": sizes, "seed": seed,
           "pool": _pool_digest(pool), "arch": arch if isinstance(arch, str) else type(arch).__name__,
           "num_classes": num_classes, "round_epochs": r_epochs, "fit": repr(cfg),
           "dfal": [dfal_candidates, dfal_iters, dfal_classes] if strategy == "dfal" else None}
    state = {"key": key, "batches": [], "answers": [], "trained": -1, "model": None, "rounds": []}
    state_path = wd / "active_state.pt" if wd else None
    if state_path and state_path.exists():
        saved = torch.load(state_path, weights_only=True)
        if saved.get("key") != key:
            raise ValueError(f"{wd} holds the state of a different extraction ({_diff(saved.get('key'), key)}); "
                             "use another work_dir or delete it")
        state = saved

    def save() -> None:
        if state_path:
            atomic_torch_save(state, state_path)

    # the round substitute: the thief's architecture, its own initialisation
    if isinstance(arch, str):
        torch.manual_seed(cfg.seed)
        round_model = create_model(arch, num_classes)
    else:
        round_model = copy.deepcopy(arch)
    if device is not None:
        round_model.to(device)
    if state["model"] is not None:
        round_model.load_state_dict(state["model"])
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))  # = random_extraction's draw
    before = oracle.queries
    bar = tqdm(total=len(sizes), initial=len(state["answers"]), desc=f"{strategy} rounds", disable=None if progress else True, leave=False)
    for r, n in enumerate(sizes):
        if len(state["batches"]) <= r:  # choose batch r
            t = time.time()
            if r == 0:
                idx, info = perm[:n].clone(), {"strategy": "random (initial seed)"}
            else:
                bought = torch.cat(state["batches"])
                g = torch.Generator().manual_seed(seed * 1_000_003 + r)
                idx, info = select(strategy, round_model, pool, bought, n, generator=g, dfal_candidates=dfal_candidates,
                                   dfal_iters=dfal_iters, dfal_classes=dfal_classes)
            state["batches"].append(idx)
            state["rounds"].append({**info, "round": r, "bought": n, "select_seconds": round(time.time() - t, 2)})
            save()
        idx = state["batches"][r]
        if len(state["answers"]) <= r:  # buy batch r (resumable per query batch)
            cache = wd / f"answers-round{r}.pt" if wd else None
            state["answers"].append(_attacks.query_oracle(oracle, pool[idx], batch_size=query_batch, progress=progress,
                                                          cache=cache))
            save()
            if cache:
                cache.unlink(missing_ok=True)
            bar.update(1)
        if r < len(sizes) - 1 and state["trained"] < r:  # warm-start the round substitute on all bought so far
            bought = torch.cat(state["batches"][: r + 1])
            answers = torch.cat(state["answers"][: r + 1])
            targets = answers.argmax(1) if _attacks.is_one_hot(answers) else answers
            rc = FitConfig(epochs=r_epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, augment=cfg.augment, seed=cfg.seed + 1 + r, schedule=cfg.schedule)
            ck = wd / f"round{r}_ckpt.pt" if wd else None
            fit(round_model, pool[bought], targets, rc, checkpoint=ck, progress=progress, desc=f"round {r + 1} substitute")
            state["model"] = {k: v.detach().cpu().clone() for k, v in round_model.state_dict().items()}
            state["trained"] = r
            save()
            if ck:
                ck.unlink(missing_ok=True)
    bar.close()
    indices = torch.cat(state["batches"])
    answers = torch.cat(state["answers"])
    if len(indices) != budget or len(torch.unique(indices)) != budget:
        raise RuntimeError(f"internal error: bought {len(indices)} images ({len(torch.unique(indices))} distinct) "
                           f"for a budget of {budget}")
    images = pool[indices]
    sub = _attacks.train_substitute(arch, num_classes, images, answers, cfg, progress=progress,
                                    checkpoint=wd / "substitute_ckpt.pt" if wd else None, device=device)
    return _attacks.ExtractionResult(sub, images, answers, oracle.queries - before, indices=indices,
                                     strategy=strategy, rounds=[dict(r) for r in state["rounds"]])


def _diff(a, b) -> str:
    if not isinstance(a, dict):
        return "unreadable key"
    keys = [k for k in set(a) | set(b) if a.get(k) != b.get(k)]
    return "differs in " + ", ".join(sorted(keys))


__all__ = ["STRATEGIES", "extract", "select", "round_sizes", "entropy_scores", "feature_vectors", "kcenter_greedy",
           "min_distances", "coverage_radius", "deepfool_distances"]
