"""The three steps of one outer iteration of `protect`, each a plain function on tensors and modules.

Images are uint8 tensors (N, 3, H, W) or image sources (honeypotnet.data.ImageSource) read batch by
batch: the steps only take len(), .shape and batches images[index] of them.

    1. simulate_extraction  train a shadow on the shadow set labelled by F_H's soft answers
    2. generate_trigger     momentum sign steps (MI-FGSM) of a universal trigger on the shadows, kept off
                            innocent (negative) models
    3. finetune_honeypot    tune H: keep F's outputs on clean features, answer y_t on stamped ones

and the simulated thief's fine-tuning that step 2 also aims at (finetune_set, finetuned_copy).
Every random stream is `stream(cfg, name, iteration, index)`, one name per stream.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProtectConfig
from .countermeasures import fine_prune
from .head import HoneypotLayer
from .ops import device_of, seed_of, take, to_float
from .purify import purify
from .training import FitConfig, fit
from .trigger import Trigger


def stream(cfg: ProtectConfig, name: str, iteration: int = 0, index: int = 0) -> int:
    """The seed of random stream `name` (of the `index`-th model) at outer iteration `iteration`."""
    return seed_of(cfg.seed, name, iteration, index)


def simulate_extraction(shadow: nn.Module, head: nn.Module, shadow_images: torch.Tensor, shadow_feats: torch.Tensor,
                        cfg: ProtectConfig, iteration: int, *, stream_name: str = "shadow", index: int = 0,
                        progress: bool = False, epochs: int | None = None) -> nn.Module:
    """Step 1: train `shadow` (in place) on the shadow set labelled by head(f(x))'s soft answers.

    head: the honeypot layer (the shadow), or the victim's own last layer (a negative shadow, an
    innocent copy). shadow_feats: f(x) of the shadow images, (N, d). epochs: default cfg.shadow_epochs."""
    with torch.no_grad():
        answers = torch.softmax(head(shadow_feats.to(device_of(head))), 1).cpu()
    fit(shadow, shadow_images, answers,
        FitConfig(epochs=cfg.shadow_epochs if epochs is None else epochs, batch_size=cfg.shadow_batch, lr=cfg.shadow_lr,
                  seed=stream(cfg, stream_name, iteration, index)),
        progress=progress, desc=f"{stream_name} {iteration + 1}")
    return shadow.eval()


def generate_trigger(shadows: list[nn.Module], trigger: Trigger, images: torch.Tensor, cfg: ProtectConfig,
                     iteration: int, negatives: list[nn.Module] = (), chunk: int | None = None) -> Trigger:
    """Step 2: targeted universal perturbation on the shadows with momentum sign steps, projected (in place).

        g <- μ·g + ∇/‖∇‖₁ ;  δ <- δ − α·sign(g) ;  δ <- Π(δ)

    minimising mean_s CE(s(x ⊕ δ), y_t) + cfg.negative_weight · Σ_n mean(−log(1 − p_target(n(x ⊕ δ)))).
    cfg.trigger_blur b > 0: each batch also goes through the models Gaussian-blurred with σ ~ U(b/4, b)
    (cfg.trigger_blur_split: the second half of each batch is blurred instead, no image added).
    cfg.negative_noise s > 0: each negative runs with its weights times (1 + s·N(0, 1)), fresh per batch.
    cfg.negative_per_batch k > 0: each batch goes through a random k of the negatives only, their term
    scaled by (number of negatives) / k, so its expectation is the full term at a fraction of the cost.
    Each model's term is differentiated on its own and the gradients summed, so the step's memory is that of
    one model's graph; `chunk` c splits each batch further, c images (and their blurred copies) per pass, for
    large images: the same step up to float rounding, in the memory of c images. The models' parameters are
    left as they were (frozen for the step, restored after)."""
    negatives = list(negatives) if cfg.negative_weight > 0 else []
    models = list(shadows) + negatives
    params = [p for m in models for p in m.parameters()]
    was = [p.requires_grad for p in params]
    for m in models:
        m.eval()
    for p in params:
        p.requires_grad_(False)
    dev = trigger.pattern.device
    alpha = cfg.step_size()
    g = torch.zeros_like(trigger.pattern)
    gen = torch.Generator().manual_seed(stream(cfg, "trigger", iteration))
    noise_gen = torch.Generator().manual_seed(stream(cfg, "negative-noise", iteration))
    pick_gen = torch.Generator().manual_seed(stream(cfg, "negative-pick", iteration))
    k = min(cfg.negative_per_batch or len(negatives), len(negatives))
    scale = 1.0 if k == len(negatives) else len(negatives) / k
    target = torch.full((2 * cfg.trigger_batch,), cfg.target, dtype=torch.long, device=dev)
    for _ in range(cfg.trigger_passes):
        perm = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), cfg.trigger_batch):
            x = to_float(images[perm[i : i + cfg.trigger_batch]], dev)
            delta = trigger.pattern.clone().requires_grad_(True)
            sigma = blur_sigma(cfg.trigger_blur, gen)
            picked = negatives if k == len(negatives) else \
                [negatives[j] for j in torch.randperm(len(negatives), generator=pick_gen)[:k].tolist()]
            terms = [(s, None) for s in shadows] + [(neg, noisy_params(neg, cfg.negative_noise, noise_gen))
                                                    for neg in picked]
            # the loss's gradient as the sum of its terms' gradients, one model's graph (and one chunk of the
            # batch) alive at a time: the same step, up to float rounding, in the memory of the largest term
            c = len(x) if not chunk or chunk >= len(x) else int(chunk)
            whole = c == len(x)
            split = bool(sigma) and cfg.trigger_blur_split
            n = len(x) * (2 if sigma and not split else 1)
            grad = torch.zeros_like(delta)
            for lo in range(0, len(x), c):
                stamped = trigger.stamp(x[lo : lo + c], delta)
                if split:  # the images after the batch's middle go blurred (the same rows whatever the chunk)
                    plain = max(0, len(x) // 2 - lo)
                    if plain < len(stamped):
                        stamped = torch.cat([stamped[:plain], purify(stamped[plain:], "blur", sigma=sigma)])
                elif sigma:
                    stamped = torch.cat([stamped, purify(stamped, "blur", sigma=sigma)])
                y = target[: len(stamped)]
                for j, (m, weights) in enumerate(terms):
                    if weights is None:
                        loss = F.cross_entropy(m(stamped), y) if whole else \
                            F.cross_entropy(m(stamped), y, reduction="sum") / n
                        loss = loss / len(shadows)
                    else:  # −log(1 − p_t), computed stably from the log-probabilities
                        logp = F.log_softmax(forward_with(m, stamped, weights), 1)
                        others = torch.cat([logp[:, : cfg.target], logp[:, cfg.target + 1 :]], 1)
                        lse = torch.logsumexp(others, 1)
                        loss = -cfg.negative_weight * scale * (lse.mean() if whole else lse.sum() / n)
                    grad += torch.autograd.grad(loss, delta, retain_graph=j < len(terms) - 1)[0]
            g = cfg.momentum * g + grad / grad.abs().sum().clamp_min(1e-12)
            with torch.no_grad():
                trigger.pattern.sub_(alpha * g.sign())
                trigger.project_()
    for p, w in zip(params, was):
        p.requires_grad_(w)
    return trigger


def noisy_params(model: nn.Module, noise: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """{} for noise <= 0; else every parameter w of `model` replaced by w·(1 + noise·N(0, 1)) drawn from gen, for
    torch.func.functional_call: a random member of a family of innocent models around `model` (buffers
    unchanged; the model itself is not modified)."""
    if noise <= 0:
        return {}
    return {name: p * (1 + noise * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
            for name, p in model.named_parameters()}


def forward_with(model: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """model(x) with `params` (e.g. noisy_params) in place of its own weights; model(x) when params is empty."""
    return torch.func.functional_call(model, params, (x,)) if params else model(x)


def noisy_forward(model: nn.Module, x: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    """model(x), or (noise > 0) model(x) with the weights of noisy_params(model, noise, gen)."""
    return forward_with(model, x, noisy_params(model, noise, gen))


def blur_sigma(max_sigma: float, gen: torch.Generator) -> float:
    """The trigger step's blur for one batch: σ ~ U(0.25, 1)·max_sigma drawn from gen; 0 (no draw) when
    max_sigma <= 0."""
    if max_sigma <= 0:
        return 0.0
    return (0.25 + 0.75 * float(torch.rand((), generator=gen))) * max_sigma


def finetune_set(n_shadow: int, images: torch.Tensor, clean_logits: torch.Tensor,
                 cfg: ProtectConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The simulated thief's clean labelled set: cfg.shadow_finetune_images owner images (the rows of
    `images` after the first n_shadow), labelled by the victim (the argmax of its clean_logits). `images` may
    be an image source (read batch by batch): the set is then a view of it, nothing decoded."""
    n_owner = len(images) - n_shadow
    if n_owner < 1:
        raise ValueError("this configuration simulates a thief who fine-tunes its copy (thief.finetune_epochs or "
                         "negatives.finetune_epochs > 0, as in the default robust preset): pass owner_images, "
                         "or use ProtectConfig.preset('spec')")
    gen = torch.Generator().manual_seed(stream(cfg, "finetune-set"))
    pick = n_shadow + torch.randperm(n_owner, generator=gen)[: cfg.shadow_finetune_images]
    return take(images, pick), clean_logits[pick].argmax(1)


def finetuned_copy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float,
                   seed: int, progress: bool = False, desc: str = "fine-tune", prune_ratio: float = 0.0) -> nn.Module:
    """A copy of `model` fine-tuned the way a suspicious thief would (a few epochs on a small clean labelled
    set), for generate_trigger to aim at what survives such fine-tuning. prune_ratio > 0: fine-pruned instead
    (that share of the last feature map's channels, the least active on `images`, masked first and kept masked;
    countermeasures.fine_prune with its own fine-tuning recipe, the benchmark thief's: cosine schedule, batch 64),
    for a trigger that does not live in the channels a pruning thief removes."""
    if prune_ratio:  # fine_prune reads an image source (a streamed owner set) batch by batch, as fit does
        return fine_prune(model, images, labels, prune_ratio, epochs, lr, seed=seed, progress=progress).model
    ft = copy.deepcopy(model)
    fit(ft, images, labels, FitConfig(epochs=epochs, batch_size=64, lr=lr, seed=seed), progress=progress, desc=desc)
    return ft.eval()


@torch.no_grad()
def lean_toward_target(clean_logits: torch.Tensor, clean_feats: torch.Tensor, stamped_feats: torch.Tensor,
                       n_shadow: int, target: int, strength: float, flip: float = 0.0) -> torch.Tensor:
    """The clean term's reference with head.owner_lean and head.owner_flip, on the owner rows (after the
    first n_shadow); shadow rows and rows whose top-1 is the target are unchanged.

    Both follow the trigger's feature shift u = mean(f(x ⊕ δ) − f(x)): a row's alignment is the z-score of
    its features' projection on u over the owner rows.

    owner_lean (`strength`): the victim's distribution moves up to `strength` of its non-target mass to the
    target, in proportion to the alignment (clipped to [0, 3], / 3: rows at or below the mean do not lean).
    The top-1 class is kept with a margin (the target's share stays at most half the rescaled top class's).
    A thief whose queries look like the owner's images then learns "more u, more target" from soft answers
    whose labels are the victim's.

    owner_flip (`flip`, 0 = off): rows aligned above the mean whose runner-up is the target with at least
    `flip` times the top class's probability swap the two: the answer becomes the target, with the old top's
    probability. These are the images where the victim is least sure against the target, so a flip costs
    little accuracy (and wins some where the victim under-answers the target), and a label-only thief sees
    target labels along u. Returns logits (log-probabilities) of the same shape."""
    out = clean_logits.clone()
    if (strength <= 0 and flip <= 0) or len(clean_logits) <= n_shadow:
        return out
    u = (stamped_feats - clean_feats).flatten(1).mean(0)
    feats = clean_feats[n_shadow:].flatten(1)
    a = (feats - feats.mean(0)) @ (u / u.norm().clamp_min(1e-12))
    z = (a - a.mean()) / a.std().clamp_min(1e-12)
    share = z.clamp(0, 3) / 3
    p = torch.softmax(clean_logits[n_shadow:].float(), 1)
    pt, top = p[:, target], p.max(1).values
    share = torch.where(p.argmax(1) == target, torch.zeros_like(share), share)
    cap = top / (top + 2 * (1 - pt))  # at the cap the target's share is half the rescaled top-1's
    c = torch.maximum(pt, torch.minimum(pt + strength * share * (1 - pt), cap))
    q = p * ((1 - c) / (1 - pt).clamp_min(1e-12)).unsqueeze(1)
    q[:, target] = c
    if flip > 0 and p.shape[1] > 1:
        top2 = p.topk(2, 1)
        swap = (top2.indices[:, 1] == target) & (pt >= flip * top) & (z > 0)
        rows = swap.nonzero().flatten()
        q[rows] = p[rows]
        q[rows, target] = top[rows]
        q[rows, top2.indices[rows, 0]] = pt[rows]
    out[n_shadow:] = q.clamp_min(1e-12).log()
    return out


def _clean_term(out: torch.Tensor, ref: torch.Tensor, l_norm: str) -> torch.Tensor:
    """L_norm per row: KL from the reference's distribution, CE to its top-1, or both (head.l_norm)."""
    per = torch.zeros(len(out), device=out.device)
    if "kl" in l_norm:
        per = per + F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="none").sum(1)
    if "ce" in l_norm:
        per = per + F.cross_entropy(out, ref.argmax(1), reduction="none")
    return per


def _logit_gains(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row and class c, (out_c − out_y) − (ref_c − ref_y), y the reference's top-1: how many logits c gained
    (signed) on the reference's answer (0 in column y)."""
    y = ref.argmax(1, keepdim=True)
    return (out - out.gather(1, y)) - (ref - ref.gather(1, y))


def target_logit_gain(out: torch.Tensor, ref: torch.Tensor, target: int) -> torch.Tensor:
    """Per row, how many logits the target gained (signed) on the reference's answer, e.g. a protected model's logits
    against the victim's."""
    return _logit_gains(out, ref)[:, target]


def _target_gain(out: torch.Tensor, ref: torch.Tensor, target: int) -> torch.Tensor:
    """head.target_hold's per-row term: relu(target_logit_gain) (0 where the reference's top-1 is the target: its
    column of the gains is 0). The KL to ref hardly sees the gain on rows where ref is sure (the target's probability
    stays ~0), yet the same gain flips the less sure answers of unseen images."""
    return target_logit_gain(out, ref, target).clamp_min(0)


def _answer_gain(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """head.answer_hold's per-row term: relu of the largest (out_c − out_y) − (ref_c − ref_y) over the classes c ≠ y,
    y the reference's top-1: how much the closest-gaining class moved toward taking the answer over."""
    return _logit_gains(out, ref).scatter(1, ref.argmax(1, keepdim=True), float("-inf")).amax(1).clamp_min(0)


def _holds(out: torch.Tensor, ref: torch.Tensor, cfg: ProtectConfig) -> torch.Tensor | float:
    """head.target_hold and head.answer_hold's per-row terms, weighted (0 when both are off)."""
    per = 0.0
    if cfg.target_hold > 0:
        per = per + cfg.target_hold * _target_gain(out, ref, cfg.target)
    if cfg.answer_hold > 0:
        per = per + cfg.answer_hold * _answer_gain(out, ref)
    return per


def _mixed_norm(honeypot: HoneypotLayer, clean_feats: torch.Tensor, clean_logits: torch.Tensor, n_shadow: int,
                cfg: ProtectConfig, gen: torch.Generator, dev) -> torch.Tensor:
    """head.mix_norm's term: L_norm on λ·f(a) + (1−λ)·f(b) for pairs of owner images (all clean images when there
    are none), λ ~ U(0, 1), against λ·F(a) + (1−λ)·F(b): the victim's last layer is affine, so that is exactly
    its answer on the mixed features."""
    lo = n_shadow if len(clean_feats) > n_shadow else 0
    ia = torch.randint(lo, len(clean_feats), (cfg.honeypot_batch,), generator=gen)
    ib = torch.randint(lo, len(clean_feats), (cfg.honeypot_batch,), generator=gen)
    lam = torch.rand(cfg.honeypot_batch, 1, generator=gen)
    z = (lam * clean_feats[ia] + (1 - lam) * clean_feats[ib]).to(dev)
    ref = (lam * clean_logits[ia] + (1 - lam) * clean_logits[ib]).to(dev)
    out = honeypot(z)
    return (_clean_term(out, ref, cfg.l_norm) + _holds(out, ref, cfg)).mean()


def finetune_honeypot(honeypot: HoneypotLayer, opt: torch.optim.Optimizer, clean_feats: torch.Tensor,
                      clean_logits: torch.Tensor, stamped_feats: torch.Tensor, cfg: ProtectConfig,
                      iteration: int, n_shadow: int = 0) -> dict:
    """Step 3: minimise w·L_norm(H(f(x)), F(x)) + λ·CE(H(f(x ⊕ δ)), y_t) over cached features.

    The first `n_shadow` rows of clean_feats are shadow-set images, weighted cfg.shadow_norm_weight
    (owner images 1). Returns the last step's losses."""
    dev = device_of(honeypot)
    gen = torch.Generator().manual_seed(stream(cfg, "honeypot", iteration))
    honeypot.train()
    last = {}
    for _ in range(cfg.honeypot_steps):
        ic = torch.randint(0, len(clean_feats), (cfg.honeypot_batch,), generator=gen)
        it = torch.randint(0, len(stamped_feats), (cfg.honeypot_batch,), generator=gen)
        z, ref = clean_feats[ic].to(dev), clean_logits[ic].to(dev)
        w = torch.where(ic < n_shadow, cfg.shadow_norm_weight, 1.0).to(dev)
        out = honeypot(z)
        per = _clean_term(out, ref, cfg.l_norm)
        if cfg.target_hold > 0 or cfg.answer_hold > 0:  # on the owner's rows (every row when there are none)
            owner_rows = (ic >= n_shadow) if len(clean_feats) > n_shadow else torch.ones_like(ic, dtype=torch.bool)
            per = per + owner_rows.to(dev) * _holds(out, ref, cfg)
        norm = (w * per).mean()
        if cfg.mix_norm > 0:
            norm = norm + cfg.mix_norm * _mixed_norm(honeypot, clean_feats, clean_logits, n_shadow, cfg, gen, dev)
        backdoor = F.cross_entropy(honeypot(stamped_feats[it].to(dev)), torch.full((len(it),), cfg.target, device=dev))
        loss = norm + cfg.lam * backdoor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = {"l_norm": float(norm.detach()), "l_backdoor": float(backdoor.detach())}
    honeypot.eval()
    return last
