"""What a thief who suspects a backdoor can do to the stolen copy, and what it costs him.

* `finetune`      — fine-tune the substitute on a small clean labelled set.
* `fine_prune`    — Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): prune the channels of the
                    last convolutional feature map that are least active on clean data, then fine-tune.
* `neural_cleanse`— Neural Cleanse (Wang et al., S&P 2019): reverse-engineer, for every class, the
                    smallest mask + pattern that sends clean images to it; a backdoored class needs a
                    much smaller mask. Anomaly index = |norm − median| / (1.4826 · MAD); index > 2 on
                    the small side flags the class.

Input purification (JPEG, blur) is in `honeypotnet.purify`; the verdict of a counter-measured copy is
`honeypotnet.verify.assess`.

Every function takes and returns plain `nn.Module`s (float images in [0,1], shape (N,3,H,W); uint8
accepted where images are data) and never modifies its input model unless told so (`inplace`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune
from tqdm.auto import tqdm

from .models import split_classifier
from .ops import batched_forward, to_float
from .training import FitConfig, fit

# ============================================================================ fine-tuning


def finetune(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int = 5, lr: float = 0.01, *,
             batch_size: int = 64, augment: bool = True, seed: int = 0, inplace: bool = False,
             progress: bool = False) -> nn.Module:
    """Fine-tune (all layers, SGD + Nesterov, cosine schedule) on a clean labelled set.

    images: uint8/float (N,3,H,W); labels: int64 (N,). Returns the fine-tuned model (a copy unless
    `inplace`), in eval mode."""
    _check_labelled(images, labels)
    if epochs < 0 or lr <= 0:
        raise ValueError(f"fine-tuning needs epochs >= 0 and lr > 0, got epochs={epochs}, lr={lr}")
    m = model if inplace else copy.deepcopy(model)
    if epochs:
        fit(m, images, labels.long(), FitConfig(epochs=epochs, batch_size=min(batch_size, len(images)), lr=lr,
                                                augment=augment, seed=seed, schedule="cosine"),
            progress=progress, desc="fine-tune")
    return m.eval()


def _check_labelled(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"need one integer label per image: {len(images)} images, labels of shape {tuple(labels.shape)}")
    if len(images) < 2:
        raise ValueError("need at least 2 clean labelled images")


# ============================================================================ fine-pruning


@dataclass
class PruneResult:
    model: nn.Module  # pruned (and fine-tuned) copy
    pruned: list[int]  # pruned channels of the last feature map
    channels: int  # channels in that feature map
    activation: list[float]  # mean activation per channel on the clean images (before pruning)

    @property
    def ratio(self) -> float:
        return len(self.pruned) / self.channels


@torch.inference_mode()
def channel_activations(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Mean activation (d,) of each channel of the last convolutional feature map on `images`.

    The feature map reaches the classifier only through global average pooling, so the mean over
    images of the penultimate features is the mean activation of each channel."""
    return batched_forward(split_classifier(model)[0], images, batch_size=batch_size, channels_last=False).mean(0)


def fine_prune(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, prune_ratio: float = 0.5,
               finetune_epochs: int = 5, lr: float = 0.01, *, batch_size: int = 64, seed: int = 0,
               progress: bool = False) -> PruneResult:
    """Fine-Pruning: mask the `prune_ratio` share of the last feature map's channels least active on
    the clean `images`, then fine-tune `finetune_epochs` epochs on (images, labels) with the mask held.

    Masking: the last feature map reaches the logits only through global average pooling and the
    final Linear, so pruning channel c = zeroing column c of that Linear; the mask is held during
    fine-tuning with torch.nn.utils.prune and made permanent at the end (plain state_dict, the
    pruned columns stay exactly zero). Returns a PruneResult with the pruned copy."""
    _check_labelled(images, labels)
    if not 0 <= prune_ratio < 1:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    m = copy.deepcopy(model).eval()
    act = channel_activations(m, images)
    d = len(act)
    k = int(round(prune_ratio * d))
    pruned = act.argsort()[:k].sort().values  # least active first
    _, head = split_classifier(m)
    mask = torch.ones_like(head.weight)
    mask[:, pruned] = 0
    torch_prune.custom_from_mask(head, "weight", mask)
    try:
        if finetune_epochs:
            finetune(m, images, labels, finetune_epochs, lr, batch_size=batch_size, seed=seed, inplace=True, progress=progress)
    finally:
        torch_prune.remove(head, "weight")
    return PruneResult(m.eval(), pruned.tolist(), d, act.tolist())


# ============================================================================ Neural Cleanse


@dataclass
class NeuralCleanseResult:
    norms: list[float]  # L1 norm of the reverse-engineered mask per class (pixels)
    anomaly_index: list[float]  # |norm - median| / (1.4826 * MAD) per class
    flagged: list[int]  # classes with norm below the median and anomaly index > threshold
    success: list[float]  # attack success rate of each class's reverse-engineered trigger (last check)
    threshold: float = 2.0
    masks: torch.Tensor | None = field(default=None, repr=False)  # (K,1,H,W)
    patterns: torch.Tensor | None = field(default=None, repr=False)  # (K,3,H,W)

    @property
    def max_anomaly(self) -> float:
        """Anomaly index of the class with the smallest mask (NC's detection statistic)."""
        return float(self.anomaly_index[min(range(len(self.norms)), key=self.norms.__getitem__)])

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("masks"), d.pop("patterns")
        return d | {"max_anomaly": self.max_anomaly, "smallest_class": int(min(range(len(self.norms)), key=self.norms.__getitem__))}


def anomaly_index(norms: torch.Tensor | list[float]) -> torch.Tensor:
    """MAD-based anomaly index of Neural Cleanse: |x - median| / (1.4826 * median |x - median|)."""
    x = torch.as_tensor(norms, dtype=torch.float64)
    med = x.quantile(0.5)  # numpy's median (the mean of the two middle values for an even count)
    mad = 1.4826 * (x - med).abs().quantile(0.5)
    return (x - med).abs() / mad.clamp_min(1e-12)


def reverse_engineer_trigger(model: nn.Module, images: torch.Tensor, target: int, *, steps: int = 200,
                             batch_size: int = 64, lr: float = 0.1, init_cost: float = 1e-3,
                             success_threshold: float = 0.99, patience: int = 10, seed: int = 0
                             ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The smallest mask (1,H,W) and pattern (3,H,W) such that (1-m)·x + m·p is classified `target`:
    Adam on CE + cost·|m|₁ with Neural Cleanse's cost schedule (cost ×1.5 after `patience` steps at
    success ≥ threshold, ÷1.5^1.5 after `patience` steps below). Returns (mask, pattern, L1 norm of
    the best successful mask — or of the last mask if none succeeded, success rate)."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    h, w = images.shape[-2:]
    # tanh parametrisation (values stay in [0,1]); the mask starts small (about 0.1 per pixel)
    m_raw = (torch.rand(1, 1, h, w, generator=g) - 0.5 - 1.1).to(dev).requires_grad_(True)
    p_raw = (torch.rand(1, 3, h, w, generator=g) * 2 - 1).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([m_raw, p_raw], lr=lr, betas=(0.5, 0.9))
    cost, up, down = init_cost, 0, 0
    best = (None, None, math.inf)
    tgt = torch.full((batch_size,), target, dtype=torch.long, device=dev)
    succ_hist: list[float] = []
    for step in range(steps):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=g)
        x = to_float(images[idx], dev)
        mask = (torch.tanh(m_raw) + 1) / 2
        pattern = (torch.tanh(p_raw) + 1) / 2
        logits = model((1 - mask) * x + mask * pattern)
        ce = F.cross_entropy(logits, tgt[: len(x)])
        l1 = mask.sum()
        loss = ce + cost * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        succ = float((logits.argmax(1) == target).float().mean())
        succ_hist.append(succ)
        if succ >= success_threshold and float(l1.detach()) < best[2]:
            best = (mask.detach().clone(), pattern.detach().clone(), float(l1.detach()))
        # NC's dynamic cost: more weight on the norm while the trigger works, less when it does not
        if succ >= success_threshold:
            up, down = up + 1, 0
        else:
            up, down = 0, down + 1
        if up >= patience:
            cost, up = (cost * 1.5 if cost > 0 else init_cost), 0
        elif down >= patience:
            cost, down = cost / 1.5**1.5, 0
    last_succ = sum(succ_hist[-patience:]) / max(1, len(succ_hist[-patience:]))
    if best[0] is None:  # never reached the threshold: report the last mask (a large norm, as it should be)
        mask = ((torch.tanh(m_raw) + 1) / 2).detach()
        pattern = ((torch.tanh(p_raw) + 1) / 2).detach()
        return mask[0].cpu(), pattern[0].cpu(), float(mask.sum()), last_succ
    return best[0][0].cpu(), best[1][0].cpu(), best[2], last_succ


def neural_cleanse(model: nn.Module, images: torch.Tensor, *, classes: list[int] | None = None, steps: int = 200,
                   batch_size: int = 64, lr: float = 0.1, init_cost: float = 1e-3, threshold: float = 2.0,
                   seed: int = 0, progress: bool = False) -> NeuralCleanseResult:
    """Neural Cleanse detector: per class (default all K) the reverse-engineered trigger's mask
    norm, the MAD anomaly index, and the flagged classes (norm below the median, index > threshold).

    images: clean images (uint8/float (N,3,H,W)); a few hundred are enough. Cost: `steps` forward +
    backward passes of `batch_size` images per class. The model's parameters are not changed."""
    if images.ndim != 4 or images.shape[1] != 3 or len(images) < 2:
        raise ValueError(f"neural_cleanse needs clean images (N>=2, 3, H, W), got {tuple(images.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    was = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        k = _num_classes(model, images)
        cls = list(range(k)) if classes is None else [int(c) for c in classes]
        if len(cls) < 3 or any(not 0 <= c < k for c in cls):
            raise ValueError(f"neural_cleanse needs >= 3 valid classes of 0..{k - 1}, got {cls}")
        norms, succ, masks, patterns = [], [], [], []
        for c in tqdm(cls, desc="neural cleanse", disable=None if progress else True, leave=False):
            m, p, n, s = reverse_engineer_trigger(model, images, c, steps=steps, batch_size=batch_size, lr=lr,
                                                  init_cost=init_cost, seed=seed + c)
            norms.append(n), succ.append(s), masks.append(m), patterns.append(p)
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was)
    ai = anomaly_index(norms)
    med = float(torch.tensor(norms, dtype=torch.float64).quantile(0.5))
    flagged = [c for c, n, a in zip(cls, norms, ai.tolist()) if n < med and a > threshold]
    return NeuralCleanseResult(norms, ai.tolist(), flagged, succ, threshold, torch.stack(masks), torch.stack(patterns))


@torch.no_grad()
def _num_classes(model: nn.Module, images: torch.Tensor) -> int:
    dev = next(model.parameters()).device
    return int(model(to_float(images[:2], dev)).shape[1])


__all__ = ["finetune", "fine_prune", "channel_activations", "PruneResult", "neural_cleanse", "reverse_engineer_trigger",
           "anomaly_index", "NeuralCleanseResult"]
