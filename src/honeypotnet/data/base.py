"""The one dataset type every loader returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class DatasetError(ValueError):
    """A dataset root is missing, malformed or asked for an unknown split/name."""


@dataclass
class ImageDataset:
    """Decoded images held in memory.

    images: uint8 tensor, shape (N, 3, H, W), RGB, values 0..255.
    labels: int64 tensor, shape (N,), or None for an unlabeled pool.
    classes: class names, index = label.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise DatasetError(
                f"images must be a uint8 tensor of shape (N, 3, H, W), got {tuple(self.images.shape)} {self.images.dtype}"
            )
        if self.labels is not None:
            if self.labels.shape != (self.images.shape[0],):
                raise DatasetError(f"labels shape {tuple(self.labels.shape)} does not match {self.images.shape[0]} images")
            self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def float(self) -> torch.Tensor:
        """Images as float32 in [0, 1], shape (N, 3, H, W)."""
        return self.images.float().div_(255.0)

    def subset(self, index: torch.Tensor | slice | list[int]) -> "ImageDataset":
        idx = index if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)
        return ImageDataset(
            self.images[idx].contiguous(),
            None if self.labels is None else self.labels[idx].contiguous(),
            list(self.classes),
            self.name,
        )

    def unlabeled(self) -> "ImageDataset":
        return ImageDataset(self.images, None, list(self.classes), self.name)
