"""The trigger: a pattern δ with a mask M, stamped on images in [0, 1]."""
from __future__ import annotations

import torch
from torch import nn


class Trigger(nn.Module):
    """A pattern δ (3,H,W) with a mask M (1,H,W); `stamp(x) = clamp((1-M)·x + M·(x+δ), 0, 1)`.

    family "patch": M is a square, δ free in [-1, 1].
    family "uap":   M = 1 everywhere, ‖δ‖∞ ≤ eps (a full-image universal adversarial perturbation).
    """

    def __init__(self, pattern: torch.Tensor, mask: torch.Tensor, family: str, eps: float = 1.0) -> None:
        super().__init__()
        if family not in ("patch", "uap"):
            raise ValueError(f"unknown trigger family {family!r}; expected 'patch' or 'uap'")
        if pattern.ndim != 3 or pattern.shape[0] != 3 or mask.shape != (1, *pattern.shape[1:]):
            raise ValueError(f"trigger pattern must be (3,H,W) and mask (1,H,W); got {tuple(pattern.shape)}, {tuple(mask.shape)}")
        if not (torch.isfinite(pattern).all() and torch.isfinite(mask).all()):
            raise ValueError("trigger pattern or mask contains NaN/inf")
        self.family, self.eps = family, float(eps)
        self.register_buffer("pattern", pattern.float().clone())
        self.register_buffer("mask", mask.float().clone())
        self.project_()

    @classmethod
    def patch(cls, image_size: int = 32, size: int = 6, location: str = "bottom-right", seed: int = 0) -> "Trigger":
        if not 1 <= size <= image_size:
            raise ValueError(f"patch size must be in [1, {image_size}], got {size}")
        mask = torch.zeros(1, image_size, image_size)
        r0 = image_size - size if "bottom" in location else 0
        c0 = image_size - size if "right" in location else 0
        if location == "center":
            r0 = c0 = (image_size - size) // 2
        mask[:, r0 : r0 + size, c0 : c0 + size] = 1
        g = torch.Generator().manual_seed(seed)
        pattern = (torch.rand(3, image_size, image_size, generator=g) * 2 - 1) * mask
        return cls(pattern, mask, "patch", 1.0)

    @classmethod
    def uap(cls, image_size: int = 32, eps: float = 16 / 255) -> "Trigger":
        if not 0 < eps <= 1:
            raise ValueError(f"eps must be in (0, 1], got {eps}")
        return cls(torch.zeros(3, image_size, image_size), torch.ones(1, image_size, image_size), "uap", eps)

    @property
    def image_size(self) -> int:
        return int(self.pattern.shape[-1])

    def stamp(self, x: torch.Tensor, pattern: torch.Tensor | None = None) -> torch.Tensor:
        """Stamp a float batch (N,3,H,W) in [0,1]; `pattern` overrides δ (for gradient steps)."""
        if x.shape[-2:] != self.pattern.shape[-2:]:
            raise ValueError(f"trigger is {tuple(self.pattern.shape[-2:])} but images are {tuple(x.shape[-2:])}")
        d = self.pattern if pattern is None else pattern
        return (x + self.mask * d).clamp(0, 1)

    @torch.no_grad()
    def project_(self) -> "Trigger":
        """Project δ onto the family's constraint set (in place)."""
        bound = 1.0 if self.family == "patch" else self.eps
        self.pattern.clamp_(-bound, bound).mul_(self.mask)
        return self

    def to_image(self) -> torch.Tensor:
        """uint8 (3,H,W) picture of δ for people: mid-grey = 0, full range = the constraint."""
        bound = 1.0 if self.family == "patch" else self.eps
        return ((0.5 + self.pattern / (2 * bound)).clamp(0, 1) * 255).round().to(torch.uint8)

    def amplified(self) -> torch.Tensor:
        """uint8 (3,H,W) picture of δ amplified to the full range: mid-grey = 0, black / white = the largest
        |δ| the trigger holds (so a trigger of a few levels is as visible as one at its bound)."""
        peak = float(self.pattern.abs().max())
        return ((0.5 + self.pattern / (2 * peak if peak > 0 else 1.0)).clamp(0, 1) * 255).round().to(torch.uint8)

    @torch.no_grad()
    def picture(self, example: torch.Tensor | None = None, min_side: int = 192, gap: int = 4) -> torch.Tensor:
        """What people look at (a bundle's trigger.png): uint8 (3, H', W'), the amplified trigger, preceded by
        `example` (an image (3,H,W), uint8 or float in [0, 1]) clean and stamped when one is given; panels
        side by side on white, enlarged (nearest neighbour) to at least `min_side` pixels high."""
        panels = [self.amplified().cpu()]
        if example is not None:
            x = example.detach().cpu()
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            if x.shape != self.pattern.shape:
                raise ValueError(f"the example is {tuple(x.shape)} but the trigger {tuple(self.pattern.shape)}")
            stamped = self.stamp(x[None].to(self.pattern.device))[0].cpu()  # what a suspect is shown
            panels = [(x * 255).round().to(torch.uint8), (stamped * 255).round().to(torch.uint8)] + panels
        scale = max(1, -(-min_side // self.image_size))
        panels = [p.repeat_interleave(scale, 1).repeat_interleave(scale, 2) for p in panels]
        side = panels[0].shape[1]
        white = torch.full((3, side, gap), 255, dtype=torch.uint8)
        row = [panels[0]]
        for p in panels[1:]:
            row += [white, p]
        return torch.cat(row, 2)

    def describe(self) -> dict:
        return {"family": self.family, "eps": self.eps, "image_size": self.image_size,
                "mask_pixels": int(self.mask.sum())}
