"""Named datasets behind one function, :func:`load_dataset`.

>>> ds = load_dataset("shapes", split="test")                  # embedded, no files needed
>>> ds = load_dataset("cifar10", "~/data", "train")             # torchvision's pickles
>>> ds = load_dataset("imagefolder", "data/cifar10-jpeg", "test")
>>> ds = load_dataset("tinyimagenet", "data/tiny-imagenet-200", "val", size=32)

Every loader returns an :class:`ImageDataset` (uint8 images (N, 3, H, W), int64 labels).
Decoded image files are cached on disk (see :mod:`honeypotnet.data.files`).

Sets larger than memory are read batch by batch instead (:mod:`honeypotnet.data.source`):

>>> src = load_dataset("folder", "data/pool", size=224, lazy=True)     # a FileSource, nothing decoded
>>> src = as_images(torchvision.datasets.ImageFolder("data/pool"), lazy=True, size=224)
>>> protect(victim, src, owner_images, cfg)                              # decodes only the batches it reads
"""
from __future__ import annotations

import os

import torch

from .base import DatasetError, ImageDataset
from .files import load_cifar, load_folder, load_imagefolder, load_tinyimagenet
from .source import ConcatSource, DatasetSource, FileSource, ImageSource, IndexedSource, concat, is_lazy

__all__ = [
    "ConcatSource",
    "DatasetSource",
    "FileSource",
    "ImageSource",
    "IndexedSource",
    "concat",
    "is_lazy",
    "DATASETS",
    "DatasetError",
    "ImageDataset",
    "as_images",
    "load_cifar",
    "load_dataset",
    "load_folder",
    "load_imagefolder",
    "load_tinyimagenet",
]

#: Names load_dataset accepts; all but "shapes" read files under ``root``.
DATASETS = ("shapes", "cifar10", "cifar100", "imagefolder", "folder", "tinyimagenet")

_FILE_BASED = {
    "cifar10": "a directory holding cifar-10-batches-py/ (torchvision's python format)",
    "cifar100": "a directory holding cifar-100-python/ (torchvision's python format)",
    "imagefolder": "a directory laid out as root/<split>/<class>/<image files>",
    "folder": "a directory of image files (found recursively; no labels), or root/<split>/",
    "tinyimagenet": "the tiny-imagenet-200 directory (wnids.txt, words.txt, train/, val/)",
}


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str | None = "train",
    *,
    size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    lazy: bool = False,
    **kwargs,
) -> ImageDataset | ImageSource:
    """Load dataset ``name`` ("shapes", "cifar10", "cifar100", "imagefolder", "folder", "tinyimagenet").

    root: data directory (not used by "shapes", required by the others).
    split: "train"/"test" (shapes also "shadow", "pool"; tinyimagenet "train"/"val";
        imagefolder any sub-directory of root, or None for root itself).
    size: resize every image to size x size (shapes: generated at that size, default 32).
    cache_dir: where decoded images are cached (default $HONEYPOTNET_CACHE or ~/.cache/honeypotnet).
    lazy: for the file datasets (imagefolder, folder, tinyimagenet), a FileSource that decodes images
        batch by batch when asked instead of an ImageDataset in memory (for sets larger than memory);
        shapes and the CIFAR pickles are in memory anyway and come as an ImageDataset.
    kwargs: passed to the loader (shapes: n, seed; file loaders: cache=False to skip the cache).
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if key == "shapes":
        from . import synthetic  # imported lazily: only the embedded default needs it

        return synthetic.make_shapes(split, size=size or 32, **kwargs)
    if root is None:
        raise DatasetError(f"dataset {key!r} needs root: {_FILE_BASED[key]}")
    if key in ("cifar10", "cifar100"):
        if split is None:
            raise DatasetError(f"dataset {key!r} needs a split: 'train' or 'test'")
        return load_cifar(root, split, 10 if key == "cifar10" else 100, size=size, cache_dir=cache_dir, **kwargs)
    if key == "imagefolder":
        return load_imagefolder(root, split, size=size, cache_dir=cache_dir, lazy=lazy, **kwargs)
    if key == "folder":
        return load_folder(root, split, size=size, cache_dir=cache_dir, lazy=lazy, **kwargs)
    if split is None:
        raise DatasetError("dataset 'tinyimagenet' needs a split: 'train' or 'val'")
    return load_tinyimagenet(root, split, size=size, cache_dir=cache_dir, lazy=lazy, **kwargs)


def as_images(data, name: str = "images", *, lazy: bool = False, size: int | None = None):
    """Images in the forms people have, as one tensor (N, 3, H, W) (uint8, or float in [0, 1]):
    a tensor, an ImageDataset, any torch Dataset (items: an image tensor, or (image, label, ...)), or a
    DataLoader (batches: images, or (images, labels, ...)). Float images outside [0, 1] are refused:
    every model here takes [0, 1] input and normalises inside (see create_model(normalize=...)).

    An ImageSource (load_dataset(..., lazy=True)) is passed through as it is: read batch by batch.
    lazy=True: a Dataset (or a DataLoader's dataset, in the dataset's own order) becomes a DatasetSource
    whose items are fetched (and resized to `size` x `size` when given) only when a batch asks for them,
    instead of being gathered into one tensor; tensors and ImageDatasets are in memory already and come
    back as they are."""
    from torch.utils.data import DataLoader, Dataset

    if size is not None and not lazy:
        raise ValueError(f"{name}: size= resizes a lazily read dataset (lazy=True); resize tensors beforehand")
    if isinstance(data, ImageSource):
        if len(data) == 0 or len(data.item_shape) != 3 or data.item_shape[0] != 3:
            raise ValueError(f"{name} must be a non-empty set of images (3, H, W), got {tuple(data.shape)}")
        return data
    if lazy and isinstance(data, (DataLoader, Dataset)):
        ds = data.dataset if isinstance(data, DataLoader) else data
        if len(ds) == 0:
            raise ValueError(f"{name} is empty")
        return DatasetSource(ds, size, name=name)
    if isinstance(data, ImageDataset):
        return data.images
    if isinstance(data, torch.Tensor):
        x = data
    elif isinstance(data, (DataLoader, Dataset)):
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=256, shuffle=False)
        parts = [batch[0] if isinstance(batch, (tuple, list)) else batch for batch in loader]
        if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
            raise ValueError(f"{name}: the dataset must yield image tensors (use a ToTensor-like transform)")
        x = torch.cat([p if p.dtype == torch.uint8 else p.float() for p in parts])
    else:
        raise ValueError(f"{name}: expected a tensor (N, 3, H, W), an ImageDataset, a Dataset or a DataLoader, "
                         f"got {type(data).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must be images of shape (N, 3, H, W), got {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError(f"{name} is empty")
    if x.dtype != torch.uint8:
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"{name} holds values in [{lo:.3g}, {hi:.3g}], not [0, 1]: pass raw images (uint8, or "
                             "float in [0, 1]); normalisation belongs to the model (create_model(normalize=...))")
    return x
