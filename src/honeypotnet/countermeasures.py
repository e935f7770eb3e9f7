"""What a thief who suspects a backdoor can do to the stolen copy, and what it costs him.

* `finetune`      — fine-tune the substitute on a small clean labelled set.
* `fine_prune`    — Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): prune the channels of the
                    last convolutional feature map that are least active on clean data, then fine-tune.
* `neural_cleanse`— Neural Cleanse (Wang et al., S&P 2019): reverse-engineer, for every class, the
                    smallest mask + pattern that sends clean images to it; a backdoored class needs a
                    much smaller mask. Anomaly index = |norm − median| / (1.4826 · MAD); index > 2 on
                    the small side flags the class.
* `purify`        — input purification at inference: JPEG re-compression or Gaussian blur of every
                    input (`PurifiedModel` wraps a model so that it purifies what it is asked).
* `assess`        — substitute CTA, ASR and the ownership verdict of a (counter-measured) model.

Every function takes and returns plain `nn.Module`s (float images in [0,1], shape (N,3,H,W); uint8
accepted where images are data) and never modifies its input model unless told so (`inplace`).
"""
from __future__ import annotations

import copy
import io
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils import prune as torch_prune
from tqdm.auto import tqdm

from .models import split_classifier
from .training import FitConfig, accuracy, fit, to_float

PURIFY_METHODS = ("jpeg", "blur")


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
    features, _ = split_classifier(model)
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    total = None
    for i in range(0, len(images), batch_size):
        f = features(to_float(images[i : i + batch_size], dev)).float().sum(0).cpu()
        total = f if total is None else total + f
    model.train(was)
    return total / len(images)


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
        for c in tqdm(cls, desc="neural cleanse", disable=not progress, leave=False):
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


# ============================================================================ input purification


def purify(images: torch.Tensor, method: str = "jpeg", *, quality: int = 75, sigma: float = 1.0,
           kernel_size: int | None = None) -> torch.Tensor:
    """Purify inputs: JPEG re-compression at `quality` (Pillow) or Gaussian blur
    with `sigma` (kernel 2·ceil(2σ)+1 unless given). Same shape, dtype and device as `images`
    (uint8 or float in [0,1], (N,3,H,W))."""
    if method not in PURIFY_METHODS:
        raise ValueError(f"unknown purification {method!r}; expected one of {PURIFY_METHODS}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if len(images) == 0:
        return images.clone()
    dev, dtype = images.device, images.dtype
    if method == "jpeg":
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        u8 = images.cpu() if dtype == torch.uint8 else (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        out = torch.from_numpy(np.stack([_jpeg_roundtrip(img, quality) for img in u8.permute(0, 2, 3, 1).numpy()]))
        out = out.permute(0, 3, 1, 2).contiguous()
        return out.to(dev) if dtype == torch.uint8 else out.to(dev, dtype).div_(255.0)
    from torchvision.transforms.v2.functional import gaussian_blur

    if sigma <= 0:
        raise ValueError(f"blur sigma must be positive, got {sigma}")
    k = kernel_size or 2 * math.ceil(2 * sigma) + 1
    if k % 2 == 0 or k < 1:
        raise ValueError(f"blur kernel size must be odd and positive, got {k}")
    x = to_float(images)
    y = gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])
    return (y * 255).round().clamp(0, 255).to(torch.uint8) if dtype == torch.uint8 else y.to(dtype)


def _jpeg_roundtrip(hwc_u8: np.ndarray, quality: int) -> np.ndarray:
    """Encode one uint8 (H,W,3) image as JPEG with Pillow (standard 4:2:0 chroma subsampling) and decode it."""
    buf = io.BytesIO()
    Image.fromarray(hwc_u8, "RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


class PurifiedModel(nn.Module):
    """`model` that purifies every input first (the thief's deployed copy): forward(x) = model(purify(x))."""

    def __init__(self, model: nn.Module, method: str = "jpeg", **kwargs) -> None:
        super().__init__()
        purify(torch.zeros(1, 3, 8, 8), method, **kwargs)  # validate the settings now
        self.model, self.method, self.kwargs = model, method, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(purify(x, self.method, **self.kwargs))

    def extra_repr(self) -> str:
        return f"method={self.method}, {self.kwargs}"


# ============================================================================ evaluation


def assess(model: nn.Module, trigger, images: torch.Tensor, labels: torch.Tensor, target: int, tau0: float, *,
           alpha: float = 1e-3, cta_images: torch.Tensor | None = None, cta_labels: torch.Tensor | None = None,
           purification: dict | None = None) -> dict:
    """CTA, ASR and the verdict of `model` (optionally wrapped in PurifiedModel(**purification)).

    images/labels: the owner's verification images (stamped with `trigger`, target class excluded, by
    verify()); cta_images/cta_labels: where clean accuracy is measured (default the same images)."""
    from .verify import verify

    suspect = PurifiedModel(model, **purification) if purification else model
    v = verify(suspect, trigger, images, labels, target, tau0, alpha)
    ci, cl = (images, labels) if cta_images is None else (cta_images, cta_labels)
    return {"cta": accuracy(suspect, ci, cl), "asr": v.asr, "hits": v.hits, "n": v.n, "unstamped_rate": v.unstamped_rate,
            "p_value": v.p_value, "tau0": v.tau0, "alpha": v.alpha, "stolen": v.stolen, "verdict": v.verdict,
            "clean_accuracy": v.clean_accuracy, "stamped_accuracy": v.stamped_accuracy}


__all__ = ["finetune", "fine_prune", "channel_activations", "PruneResult", "neural_cleanse", "reverse_engineer_trigger",
           "anomaly_index", "NeuralCleanseResult", "purify", "PurifiedModel", "PURIFY_METHODS", "assess"]
