"""The embedded default dataset: procedural coloured shapes, no files needed.

Labelled splits ("train", "test") hold one shape of ten classes on a smooth two-colour gradient
background. The unlabeled splits ("shadow" for the defender, "pool" for the thief; same
distribution, different seeds, so they never share images) are *differently distributed*
natural-ish clutter: one to three smaller shapes of any class, some as outlines, on busier
backgrounds (stripes, blotches, gradients) with more pixel noise. That mirrors the paper's
setting of a CIFAR victim queried with Tiny ImageNet images.

Sizing matters for the method (docs/method.md): the trigger must stand above the data's own noise,
so the labelled images carry little pixel noise (σ = 2/255) and the pool moderate noise.

Everything is vectorised numpy (8,000 clutter images take about 2 s on one core); a process keeps the splits it
made (up to 256 MiB) and hands out copies.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import DatasetError, ImageDataset

CLASSES = [
    "disk", "square", "triangle", "plus", "ring",
    "hbars", "vbars", "diagonal", "checker", "diamond",
]
SPLITS = {"train": (8000, 11), "test": (2000, 23), "shadow": (8000, 37), "pool": (12000, 53)}


def _shape_masks(cls: np.ndarray, cx, cy, r, angle, xx, yy) -> np.ndarray:
    """Soft masks (B, S, S) in [0, 1] for shape classes `cls` (B,) with centres, radii, angles (B,)."""
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    rr = r[:, None, None]
    dist = np.sqrt(dx**2 + dy**2)
    period = np.maximum(rr / 2.0, 2.0)
    inside_box = (np.abs(u) <= rr) & (np.abs(v) <= rr)
    m = np.zeros(dx.shape, dtype=np.float32)
    sel = lambda k: (cls == k)  # noqa: E731
    for k in range(10):
        i = sel(k)
        if not i.any():
            continue
        U, V, D, R, P, B = u[i], v[i], dist[i], rr[i], period[i], inside_box[i]
        if k == 0:  # disk
            mk = D <= R
        elif k == 1:  # square
            mk = B
        elif k == 2:  # triangle (pointing along -v)
            mk = (V <= R * 0.8) & (V >= -R) & (np.abs(U) <= (V + R) * 0.55)
        elif k == 3:  # plus
            mk = ((np.abs(U) <= R * 0.3) & (np.abs(V) <= R)) | ((np.abs(V) <= R * 0.3) & (np.abs(U) <= R))
        elif k == 4:  # ring
            mk = (D <= R) & (D >= R * 0.55)
        elif k == 5:  # horizontal bars
            mk = B & (np.floor(V / P) % 2 == 0)
        elif k == 6:  # vertical bars
            mk = B & (np.floor(U / P) % 2 == 0)
        elif k == 7:  # diagonal stripes
            mk = (D <= R * 1.1) & (np.floor((U + V) / (P * 1.2)) % 2 == 0)
        elif k == 8:  # checkerboard
            mk = B & ((np.floor(U / P) + np.floor(V / P)) % 2 == 0)
        else:  # diamond
            mk = (np.abs(U) + np.abs(V)) <= R * 1.2
        m[i] = mk
    return m


def _random_colours(rng: np.random.Generator, n: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    return rng.uniform(lo, hi, size=(n, 3)).astype(np.float32)


def _gradient_background(rng, n, xx, yy, size, contrast=0.35):
    base = _random_colours(rng, n, 0.15, 0.85)
    other = np.clip(base + rng.uniform(-contrast, contrast, size=(n, 3)), 0, 1).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi, n)
    t = (np.cos(theta)[:, None, None] * xx[None] + np.sin(theta)[:, None, None] * yy[None]) / size + 0.5
    t = np.clip(t, 0, 1)[:, None]
    return base[:, :, None, None] * (1 - t) + other[:, :, None, None] * t


def _contrasting(rng, bg_mean: np.ndarray) -> np.ndarray:
    """Foreground colours that differ from the background by a visible margin."""
    col = _random_colours(rng, bg_mean.shape[0])
    close = np.abs(col - bg_mean).sum(1) < 0.6
    col[close] = 1.0 - bg_mean[close]
    return col


def _labelled(n: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    labels = rng.integers(0, 10, n)
    img = _gradient_background(rng, n, xx, yy, size)
    r = rng.uniform(0.25, 0.38, n) * size
    cx = size / 2 + rng.uniform(-0.12, 0.12, n) * size
    cy = size / 2 + rng.uniform(-0.12, 0.12, n) * size
    angle = rng.uniform(-0.35, 0.35, n)
    mask = _shape_masks(labels, cx, cy, r, angle, xx, yy)[:, None]
    fg = _contrasting(rng, img.mean(axis=(2, 3)))[:, :, None, None]
    img = img * (1 - mask) + fg * mask
    img = img + rng.normal(0, 2 / 255, img.shape).astype(np.float32)
    return img, labels


def _clutter(n: int, seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    img = _gradient_background(rng, n, xx, yy, size, contrast=0.6)
    # Busier backgrounds: random stripes or low-frequency blotches on part of the pool.
    kind = rng.integers(0, 3, n)
    freq = rng.uniform(0.15, 0.6, n)[:, None, None]
    th = rng.uniform(0, np.pi, n)
    wave = np.sin(freq * (np.cos(th)[:, None, None] * xx + np.sin(th)[:, None, None] * yy))
    tint = rng.uniform(-0.25, 0.25, (n, 3)).astype(np.float32)
    img += np.where(kind[:, None, None, None] == 1, tint[:, :, None, None] * wave[:, None], 0)
    low = rng.normal(0, 1, (n, 3, 4, 4)).astype(np.float32)
    blot = torch.nn.functional.interpolate(torch.from_numpy(low), size=(size, size), mode="bicubic", align_corners=False).numpy()
    img += np.where(kind[:, None, None, None] == 2, 0.12 * blot, 0)
    for _ in range(3):
        present = rng.random(n) < 0.75
        cls = rng.integers(0, 10, n)
        r = rng.uniform(0.12, 0.32, n) * size
        cx, cy = rng.uniform(0.15, 0.85, n) * size, rng.uniform(0.15, 0.85, n) * size
        angle = rng.uniform(-np.pi, np.pi, n)
        mask = _shape_masks(cls, cx, cy, r, angle, xx, yy)
        outline = rng.random(n) < 0.3
        if outline.any():
            shrunk = _shape_masks(cls[outline], cx[outline], cy[outline], r[outline] * 0.7, angle[outline], xx, yy)
            mask[outline] = np.clip(mask[outline] - shrunk, 0, 1)
        mask = (mask * present[:, None, None])[:, None]
        fg = _random_colours(rng, n)[:, :, None, None]
        img = img * (1 - mask) + fg * mask
    img = img + rng.normal(0, 5 / 255, img.shape).astype(np.float32)
    return img


def make_shapes(split: str = "train", n: int | None = None, seed: int = 0, size: int = 32) -> ImageDataset:
    """The embedded procedural dataset.

    split: "train" / "test" (labelled, 10 classes) or "shadow" / "pool" (unlabeled clutter).
    n: number of images (default: 8000 / 2000 / 8000 / 12000).
    seed: added to the split's own seed, so splits never share images.
    Returns an ImageDataset with uint8 images (n, 3, size, size).
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for 'shapes'; expected one of {sorted(SPLITS)}")
    default_n, split_seed = SPLITS[split]
    n = default_n if n is None else int(n)
    if n <= 0 or size < 8:
        raise DatasetError(f"'shapes' needs n > 0 and size >= 8, got n={n}, size={size}")
    key = (split, n, split_seed + 1000 * int(seed), int(size))
    made = _CACHE.get(key)
    if made is None:
        made = _generate(*key)
        _CACHE.put(key, made)
    images, lab = made
    # each caller gets tensors of its own (a clone costs milliseconds, generating 8,000 images seconds)
    return ImageDataset(images.clone(), None if lab is None else lab.clone(), list(CLASSES), f"shapes/{split}")


class _Generated:
    """The splits made in this process, most recently used last, up to CACHE_BYTES of images: the CLI takes
    `shapes:SPLIT:LIMIT` as a random subset of the whole split, and a session (the test suite, a notebook, the
    demo) asks for the same splits again and again."""

    CACHE_BYTES = 256 * 2**20

    def __init__(self) -> None:
        self.entries: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def get(self, key: tuple):
        hit = self.entries.pop(key, None)
        if hit is not None:
            self.entries[key] = hit
        return hit

    def put(self, key: tuple, value: tuple) -> None:
        self.entries[key] = value
        while sum(v[0].numel() for v in self.entries.values()) > self.CACHE_BYTES and len(self.entries) > 1:
            self.entries.pop(next(iter(self.entries)))


_CACHE = _Generated()


def _generate(split: str, n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    chunks, labels = [], []
    for start in range(0, n, 2000):  # bounded memory for large n
        m = min(2000, n - start)
        if split in ("train", "test"):
            img, lab = _labelled(m, seed + start, size)
            labels.append(lab)
        else:
            img = _clutter(m, seed + start, size)
        chunks.append(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8))
    return torch.from_numpy(np.concatenate(chunks)), torch.from_numpy(np.concatenate(labels)).long() if labels else None
