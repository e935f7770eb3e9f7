"""`protect`: turn a victim classifier into a protected one with a honeypot layer (docs/method.md).

    victim F = h ∘ f          (f frozen features, h the last Linear layer)
    protected F_H = H ∘ f     (H the honeypot layer, same shape as h)

For T outer iterations: 1. simulate_extraction (shadow), 2. generate_trigger, 3. finetune_honeypot
(honeypotnet.steps). Only H trains; f(x) of clean images is computed once, f(x ⊕ δ) once per iteration.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import ProtectConfig
from .data import as_images, concat, is_lazy
from .data.source import pixel_hash
from .head import HoneypotLayer, install_honeypot
from .models import create_model, split_classifier
from .negatives import NegativeCache, NegativeShadows
from .ops import attack_success_rate, batched_forward, device_of, take
from .state import fingerprint, key_of, load_state, save_state
from .steps import (finetune_honeypot, finetune_set, finetuned_copy, generate_trigger, lean_toward_target,
                    simulate_extraction, stream)
from .trigger import Trigger


GATE_FIDELITY = 0.90  # ProtectResult.gate's defaults: what `protect` (CLI) requires before it writes a bundle
GATE_ASR = 0.50


@dataclass
class ProtectResult:
    model: nn.Module  # the protected model F_H (the victim's architecture, last layer a HoneypotLayer), on CPU
    trigger: Trigger  # the secret trigger (on CPU)
    config: ProtectConfig
    history: list[dict] = field(default_factory=list)  # one record per outer iteration

    def gate(self, min_fidelity: float = GATE_FIDELITY, min_asr: float = GATE_ASR) -> list[str]:
        """What makes this protection unfit to deploy ([] when it passes): the protected model must answer
        like the victim on clean images (fidelity, measured on the shadow and owner images) and send
        stamped images to the target (its own ASR), or it either harms users or protects nothing."""
        if not self.history:
            return ["no outer iteration ran (loop.outer_iters = 0)"]
        last = self.history[-1]
        out = []
        if last["fidelity"] < min_fidelity:
            out.append(f"fidelity {last['fidelity']:.1%} < {min_fidelity:.0%}: the protected model no longer answers "
                       "like the victim on clean images (more loop.outer_iters, a smaller head.lam, or a wider head trained "
                       "longer, e.g. head.hidden=1024 head.steps=2000, which took MobileNetV3-small from 66% to 96%)")
        if last["honeypot_asr"] < min_asr:
            out.append(f"the protected model's own ASR {last['honeypot_asr']:.1%} < {min_asr:.0%}: its answers carry "
                       "no backdoor to teach (more loop.outer_iters)")
        return out


@dataclass
class ProtectEvent:
    """What `protect(..., callback=)` is told after each outer iteration it runs (not those resumed)."""

    iteration: int  # 1-based
    total: int  # cfg.outer_iters
    record: dict  # the history record of this iteration
    seconds: dict[str, float]  # wall time of each step of this iteration


def protect(victim: nn.Module, shadow_images: torch.Tensor, owner_images: torch.Tensor | None = None,
            config: ProtectConfig | None = None, *, num_classes: int | None = None,
            checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
            device: torch.device | str | None = None, head: str | Callable[[nn.Module], nn.Module] | None = None,
            callback: Callable[[ProtectEvent], None] | None = None, batch_size: int = 500,
            cache_dir: str | os.PathLike | None = None) -> ProtectResult:
    """Turn `victim` into a protected model with a honeypot layer.

    victim: any classifier taking images in [0, 1] whose last layer is an nn.Linear applied last: found
        by find_head (registry, torchvision, timm models, nn.Sequential) or named by `head` (a dotted path
        such as "classifier.3", or a callable returning the Linear).
    shadow_images: natural unlabeled images standing in for a thief's queries, (N,3,H,W) uint8 or float in
        [0, 1] (a tensor, an ImageDataset, a torch Dataset or DataLoader: data.as_images), or an image source
        read batch by batch for a set larger than memory (data.ImageSource: load_dataset(..., lazy=True),
        as_images(dataset, lazy=True)); only the batches a step reads are decoded, and the result is the
        same as with the same images as a tensor.
    owner_images: a sample of the owner's own data, same forms and image size (needed by the robust preset).
    checkpoint_dir: the state is saved there after every outer iteration; a later call with the same
        config, victim and images resumes from it (and may extend loop.outer_iters).
    callback: called with a ProtectEvent after each outer iteration (e.g. step timings).
    batch_size: images per forward pass of the victim's features and of the ASR figures, and at most per pass of
        the trigger step (a larger trigger.batch is split, the same step up to float rounding); smaller bounds
        the memory of large images (the training steps' batches are config fields: shadow.batch, head.batch).
    cache_dir: with negatives.once > 0 (the robust preset), the extracted negative shadows are cached there by
        content (negatives.NegativeCache) and a later run with the same victim, images, seed and extraction
        settings loads them instead of training them again (the same result); None: no cache.
    The caller's global torch random state is left as it was."""
    cfg = config or ProtectConfig()
    shadow_images = as_images(shadow_images, "shadow_images")
    if cfg.shadow_owner_share > 0 and owner_images is None:
        raise ValueError("shadow.owner_share > 0 has the shadows query owner images: pass owner_images")
    if owner_images is not None:
        owner_images = as_images(owner_images, "owner_images")
        if owner_images.shape[1:] != shadow_images.shape[1:]:
            raise ValueError(f"owner_images are {tuple(owner_images.shape[1:])} but shadow_images "
                             f"{tuple(shadow_images.shape[1:])}: resize both sets to one image size")
    with torch.random.fork_rng(devices=None if torch.cuda.is_available() else []):
        torch.manual_seed(stream(cfg, "init"))
        return _run(victim, shadow_images, owner_images, cfg, num_classes, checkpoint_dir, progress, device, head,
                    callback, batch_size, cache_dir)


def _run(victim, shadow_images, owner_images, cfg, num_classes, checkpoint_dir, progress, device, head, callback,
         batch_size, cache_dir):
    bs = int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device else device_of(victim)
    victim = copy.deepcopy(victim).to(device).eval().requires_grad_(False)
    features, head = split_classifier(victim, head)
    k = num_classes or head.out_features
    if not 0 <= cfg.target < k:
        raise ValueError(f"target class {cfg.target} out of range for {k} classes")
    n_shadow = len(shadow_images)
    images = shadow_images if owner_images is None else concat(shadow_images, owner_images)
    # a set read batch by batch is fingerprinted (for the checkpoint's key) on the one pass that reads it all
    digest = pixel_hash((n_shadow, *images.shape)) if is_lazy(images) else None

    features.to(memory_format=torch.channels_last)  # NHWC convolutions: 1.4-1.6x faster on CPU
    clean_feats = batched_forward(features, images, device=device, batch_size=bs,  # f(x), cached once
                                  observe=None if digest is None else lambda x: digest.update(x.contiguous().numpy().tobytes()))
    with torch.no_grad():
        clean_logits = head(clean_feats.to(device)).cpu()
    # what the shadows query (and the trigger is optimised on): the shadow set, plus a share of the owner images
    n_query = n_shadow + round(cfg.shadow_owner_share * (len(images) - n_shadow))
    query_images, query_feats = take(images, slice(0, n_query)), clean_feats[:n_query]
    ft_images, ft_labels = finetune_set(n_shadow, images, clean_logits, cfg) if cfg.simulates_finetuning() \
        else (None, None)

    honeypot = HoneypotLayer.from_linear(head, cfg.head, cfg.hidden).to(device)
    opt = torch.optim.Adam(honeypot.parameters(), lr=cfg.honeypot_lr)
    size = images.shape[-1]
    trigger = (Trigger.uap(size, cfg.eps) if cfg.trigger == "uap"
               else Trigger.patch(size, cfg.patch_size, seed=cfg.seed)).to(device)
    shadow = create_model(cfg.shadow_arch, k).to(device)
    more = []  # shadow.more_archs: shadows of other families, extracted like the shadow
    for i, arch in enumerate(cfg.more_shadow_archs()):
        torch.manual_seed(stream(cfg, "shadow-more-init", 0, i))
        more.append(create_model(arch, k).to(device))
    if digest is None:
        data = fingerprint(victim, shadow_images, owner_images)
    else:  # the pixels' hash stands for the images (so a checkpoint of the same images as tensors differs)
        data = fingerprint(victim, torch.tensor(list(digest.digest()), dtype=torch.uint8))
    key = key_of(cfg, data)
    # the negatives' extraction reads the victim and the images the shadows query, nothing else: another owner
    # set that the shadows do not query (shadow.owner_share 0) reuses them (a set read batch by batch: all its pixels)
    cache = None if cache_dir is None else \
        NegativeCache(cache_dir, data if digest is not None else fingerprint(victim, query_images), n_query, k, device)
    negatives = NegativeShadows(cfg, k, device, cache)
    history: list[dict] = []
    state = load_state(checkpoint_dir, key, device)
    if state is not None:
        honeypot.load_state_dict(state["honeypot"])
        opt.load_state_dict(state["opt"])
        trigger.load_state_dict(state["trigger"])
        shadow.load_state_dict(state["shadow"])
        for m, sd in zip(more, state.get("shadow_more", [])):
            m.load_state_dict(sd)
        negatives.load_state_dict(state)
        history = state["history"]

    bar = tqdm(total=cfg.outer_iters, initial=min(len(history), cfg.outer_iters), desc="protect",
               disable=None if progress else True)
    for it in range(len(history), cfg.outer_iters):
        seconds: dict[str, float] = {}
        t = time.perf_counter()

        def lap(step: str) -> None:
            nonlocal t
            now = time.perf_counter()
            seconds[step] = seconds.get(step, 0.0) + now - t
            t = now

        # 1. the thief's extraction, simulated on the shadow (and innocent copies on the negatives)
        if not cfg.shadow_warm_start and it > 0:
            torch.manual_seed(stream(cfg, "shadow-init", it))
            shadow = create_model(cfg.shadow_arch, k).to(device)
        simulate_extraction(shadow, honeypot, query_images, query_feats, cfg, it, progress=progress)
        for i, arch in enumerate(cfg.more_shadow_archs()):
            if not cfg.shadow_warm_start and it > 0:
                torch.manual_seed(stream(cfg, "shadow-more-init", it, i))
                more[i] = create_model(arch, k).to(device)
            simulate_extraction(more[i], honeypot, query_images, query_feats, cfg, it, index=i + 1, progress=progress)
        inherited = attack_success_rate(shadow, trigger, shadow_images, cfg.target, n=1000, batch_size=bs)
        lap("shadow")
        negatives.extract(head, query_images, query_feats, it, progress)
        lap("negatives")
        # the thief's fine-tuning of its copy, simulated
        shadows = [shadow]
        if cfg.shadow_finetune_epochs:
            shadows.append(finetuned_copy(shadow, ft_images, ft_labels, epochs=cfg.shadow_finetune_epochs,
                                          lr=cfg.shadow_finetune_lr, seed=stream(cfg, "shadow-ft", it),
                                          progress=progress, desc=f"shadow fine-tune {it + 1}"))
        pruned = None
        if cfg.shadow_prune_ratio:
            pruned = finetuned_copy(shadow, ft_images, ft_labels, epochs=cfg.shadow_finetune_epochs,
                                    lr=cfg.shadow_finetune_lr, seed=stream(cfg, "shadow-prune", it), progress=progress,
                                    prune_ratio=cfg.shadow_prune_ratio)
            shadows.append(pruned)
        shadows += more
        neg_ft = negatives.finetuned(ft_images, ft_labels, it, progress)
        lap("fine-tuned copies")
        # 2. the trigger
        generate_trigger(shadows, trigger, query_images, cfg, it, negatives.models + neg_ft, chunk=bs)
        lap("trigger")
        extra = {}
        if pruned is not None:
            extra["shadow_pruned_asr"] = attack_success_rate(pruned, trigger, shadow_images, cfg.target, n=1000,
                                                             batch_size=bs)
        for i, (arch, m) in enumerate(zip(cfg.more_shadow_archs(), more)):
            extra[f"shadow{i + 1}_{arch}_asr"] = attack_success_rate(m, trigger, shadow_images, cfg.target, n=1000,
                                                                     batch_size=bs)
        for name, m in zip(negatives.names(), neg_ft):
            extra[name + "_ft_asr"] = attack_success_rate(m, trigger, shadow_images, cfg.target, n=1000, batch_size=bs)
        for name, m in zip(negatives.names(), negatives.models):
            extra[name + "_asr"] = attack_success_rate(m, trigger, shadow_images, cfg.target, n=1000, batch_size=bs)
        # 3. the honeypot layer
        stamped_feats = batched_forward(features, images, transform=trigger.stamp, device=device, batch_size=bs)
        lap("stamped features")
        ref_logits = lean_toward_target(clean_logits, clean_feats, stamped_feats, n_shadow, cfg.target,
                                        cfg.owner_lean, cfg.owner_flip)  # the victim's answers when both are 0
        losses = finetune_honeypot(honeypot, opt, clean_feats, ref_logits, stamped_feats, cfg, it, n_shadow)
        lap("honeypot")
        with torch.no_grad():
            fidelity = float((honeypot(clean_feats.to(device)).argmax(1).cpu() == clean_logits.argmax(1)).float().mean())
            hp_asr = float((honeypot(stamped_feats.to(device)).argmax(1) == cfg.target).float().mean())
        record = {"iteration": it + 1, "inherited_asr": inherited, **losses,
                  "shadow_asr": attack_success_rate(shadow, trigger, shadow_images, cfg.target, n=1000, batch_size=bs),
                  "fidelity": fidelity, "honeypot_asr": hp_asr, **extra}
        history.append(record)
        save_state(checkpoint_dir, key, it + 1, history,
                   {"honeypot": honeypot.state_dict(), "opt": opt.state_dict(), "trigger": trigger.state_dict(),
                    "shadow": shadow.state_dict(), **negatives.state_dict(),
                    **({"shadow_more": [m.state_dict() for m in more]} if more else {})})
        lap("checkpoint")
        bar.update(1)
        bar.set_postfix(inherited=f"{inherited:.2f}", shadow_asr=f"{record['shadow_asr']:.2f}", fidelity=f"{fidelity:.3f}")
        if callback is not None:
            callback(ProtectEvent(it + 1, cfg.outer_iters, record, seconds))
    bar.close()

    protected = install_honeypot(victim, honeypot, features.head_attr).requires_grad_(True)
    return ProtectResult(protected.cpu().eval(), trigger.cpu(), cfg, history)
