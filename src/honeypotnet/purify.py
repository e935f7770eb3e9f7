"""Input purification a thief may put in front of its copy: JPEG re-compression or Gaussian blur.

`purify` works on uint8 or float [0, 1] batches (N,3,H,W) and is differentiable on float input (blur),
so the trigger step can optimise through it; `PurifiedModel` wraps a model so that it purifies what it
is asked, as a thief's deployed copy would.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torch import nn

from .ops import to_float, to_uint8

PURIFY_METHODS = ("jpeg", "blur")


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
        u8 = to_uint8(images)
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
