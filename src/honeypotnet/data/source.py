"""Image sources: sets of images read batch by batch, for sets larger than memory.

`protect` and the loops it drives (training, the trigger step, feature caching) touch their images only
through three things: ``len(images)``, ``images.shape`` (N, 3, H, W) and ``images[index]``, a batch
(index a LongTensor, a bool mask, a list or a slice) -> uint8 tensor (B, 3, H, W). A uint8 tensor in
memory does all three (and stays the default: nothing changes for it); an :class:`ImageSource` does
them by decoding only the items asked for:

- :class:`FileSource`: image files (a flat folder, an ImageFolder tree, Tiny ImageNet), decoded and
  resized to ``size`` on demand: ``load_dataset(..., lazy=True)``;
- :class:`DatasetSource`: any torch ``Dataset`` (torchvision's ImageFolder, ...), items fetched on
  demand: ``as_images(dataset, lazy=True, size=...)``;
- :class:`IndexedSource` (a view: ``source.take(index)``, ``source.subset(index)``) and
  :class:`ConcatSource` (``concat(a, b)``: the shadow and owner sets as one), which decode nothing
  themselves.

Sequential passes (``batches``) can decode in DataLoader worker processes (``workers=N``); a batch is
decoded with ``threads`` threads (PIL releases the GIL). Every source counts what it decoded
(``decoded``, ``largest_batch``), so a test can check that a whole set was never held at once.
Only pixels are streamed: per-image figures (features, labels, answers) are small and stay in memory.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from .base import DatasetError

_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR


class ImageSource:
    """Images read on demand. Subclasses define ``__len__``, ``item_shape`` (3, H, W) and ``load(index)``
    (a LongTensor of indices in range -> a tensor (B, 3, H, W) of ``dtype``).

    An ImageSource also stands where an :class:`ImageDataset` does: ``.images`` (itself), ``.labels``
    (int64 (N,) or None, known without decoding), ``.classes``, ``.name``, ``.subset(index)``."""

    dtype: torch.dtype = torch.uint8
    labels: torch.Tensor | None = None
    classes: list[str] = []
    name: str = ""
    workers: int = 0  # DataLoader worker processes of sequential passes (0: decode in this process)

    def __init__(self) -> None:
        self.decoded = 0  # items decoded so far (views count in their base)
        self.largest_batch = 0  # the most items one request decoded

    # ------------------------------------------------------------------ what subclasses define
    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def item_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def load(self, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ the tensor-like surface
    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.item_shape))

    @property
    def ndim(self) -> int:
        return 4

    @property
    def image_size(self) -> int:
        return int(self.item_shape[-1])

    @property
    def nbytes(self) -> int:
        """What the whole set would take in memory as one tensor."""
        return len(self) * int(np.prod(self.item_shape)) * torch.empty((), dtype=self.dtype).element_size()

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        idx = self.indices(index)
        out = self.load(idx)
        self.decoded += len(idx)
        self.largest_batch = max(self.largest_batch, len(idx))
        return out

    def indices(self, index) -> torch.Tensor:
        """Any index (slice, list, LongTensor, bool mask) as a LongTensor of positions in range."""
        n = len(self)
        if isinstance(index, slice):
            return torch.arange(n)[index]
        t = torch.as_tensor(index)
        if t.dtype == torch.bool:
            if t.shape != (n,):
                raise IndexError(f"a bool mask of shape {tuple(t.shape)} for {n} images")
            return t.nonzero().flatten()
        if t.ndim != 1 or t.is_floating_point():
            raise IndexError(f"index an image source with a 1-D integer index, got {t.dtype} {tuple(t.shape)}")
        t = torch.where(t < 0, t + n, t.long())
        if len(t) and (int(t.min()) < 0 or int(t.max()) >= n):
            raise IndexError(f"index out of range for {n} images")
        return t

    @property
    def images(self) -> "ImageSource":
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def take(self, index) -> "ImageSource":
        """A view of the items at `index` (positions in this source); nothing is decoded."""
        return IndexedSource(self, self.indices(index))

    def subset(self, index) -> "ImageSource":
        """As ImageDataset.subset: a view of the items at `index`, with their labels."""
        return self.take(index)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The whole set in order, batch by batch (what a forward pass over it reads): the same batches as
        ``self[i : i + batch_size]``, decoded ahead in ``workers`` processes when workers > 0."""
        n = len(self)
        if self.workers <= 0 or n <= batch_size:
            for i in range(0, n, batch_size):
                yield self[i : i + batch_size]
            return
        from torch.utils.data import DataLoader

        spans = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
        loader = DataLoader(_Batches(self), batch_size=None, sampler=spans, num_workers=self.workers)
        for x in loader:
            self.decoded += len(x)
            self.largest_batch = max(self.largest_batch, len(x))
            yield x

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name or ''!s}, {len(self)} x {tuple(self.item_shape)}, lazy)"


class _Batches(torch.utils.data.Dataset):
    """What a DataLoader worker reads: item = a list of positions -> that batch, decoded."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, span: list[int]) -> torch.Tensor:
        return self.source.load(torch.tensor(span, dtype=torch.long))


def pixel_hash(shape):
    """A sha256 started with the images' shape, to be fed their bytes in order."""
    h = hashlib.sha256()
    h.update(repr(tuple(int(s) for s in shape)).encode())
    return h


# ----------------------------------------------------------------------------- files


def decode_image(path: str, size: int | None = None) -> np.ndarray:
    """One image file as an RGB uint8 array (H, W, 3), resized to size x size when asked."""
    try:
        with Image.open(path) as im:
            if size is not None and im.format == "JPEG":
                # Let libjpeg scale big images by 1/2, 1/4 or 1/8 while decoding, keeping at
                # least 2x the target so the bilinear resize below still sets the look.
                im.draft("RGB", (2 * size, 2 * size))
            return resize_image(im, size)  # converting to RGB loads (and so fully decodes) the file
    except FileNotFoundError as exc:
        raise DatasetError(f"image file {path!r} is missing ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot decode image file {path!r}: {exc}") from exc


def resize_image(im: Image.Image, size: int | None) -> np.ndarray:
    """A PIL image as RGB uint8 (H, W, 3), resized to size x size (bilinear, antialiased) when asked."""
    rgb = im.convert("RGB")
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), _BILINEAR)  # PIL filters antialias
    return np.asarray(rgb)


class FileSource(ImageSource):
    """Image files decoded on demand (decode_image, as the in-memory loaders decode: RGB, resized to ``size`` x
    ``size`` when given, else every file must share the first one's size)."""

    def __init__(self, files: Sequence[str | os.PathLike], size: int | None = None, labels: torch.Tensor | None = None,
                 classes: Sequence[str] = (), name: str = "", *, threads: int = 2, workers: int = 0) -> None:
        super().__init__()
        if not files:
            raise DatasetError("no image files")
        self.files = [os.fspath(f) for f in files]
        self.size = size
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if self.labels is not None and self.labels.shape != (len(self.files),):
            raise DatasetError(f"{len(self.labels)} labels for {len(self.files)} files")
        self.classes, self.name = list(classes), name
        self.threads, self.workers = max(1, int(threads)), int(workers)
        self._shape: tuple[int, int, int] | None = (3, size, size) if size is not None else None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def item_shape(self) -> tuple[int, int, int]:
        if self._shape is None:
            h, w = self.decode_one(0).shape[:2]
            self._shape = (3, h, w)
        return self._shape

    def decode_one(self, i: int) -> np.ndarray:
        return decode_image(self.files[i], self.size)

    def load(self, index: torch.Tensor) -> torch.Tensor:
        _, h, w = self.item_shape
        out = np.empty((len(index), 3, h, w), dtype=np.uint8)

        def work(j: int) -> None:
            a = self.decode_one(int(index[j]))
            if a.shape[:2] != (h, w):
                raise DatasetError(f"images differ in size: {self.files[int(index[j])]!r} is {a.shape[1]}x{a.shape[0]}, "
                                   f"not {w}x{h}; pass size=... (--image-size) to resize every image")
            out[j] = a.transpose(2, 0, 1)

        if self.threads == 1 or len(index) < 2:
            for j in range(len(index)):
                work(j)
        else:
            with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="decode") as pool:
                list(pool.map(work, range(len(index))))
        return torch.from_numpy(out)


# ----------------------------------------------------------------------------- torch datasets


class DatasetSource(ImageSource):
    """A torch Dataset read item by item on demand. Items: an image (a tensor (3, H, W), uint8 or float in
    [0, 1], or a PIL image) or a tuple (image, label, ...). ``size``: resize every image to size x size
    (PIL images bilinear as the file loaders, tensors by antialiased bilinear interpolation). Labels are
    taken from the dataset's ``targets`` when it has them (torchvision's ImageFolder, CIFAR), without
    decoding anything."""

    def __init__(self, dataset, size: int | None = None, name: str = "", *, workers: int = 0) -> None:
        super().__init__()
        self.dataset, self.size, self.workers = dataset, size, int(workers)
        self.name = name or type(dataset).__name__
        targets = getattr(dataset, "targets", None)
        if targets is not None and len(targets) == len(dataset):
            self.labels = torch.as_tensor(list(targets) if not isinstance(targets, torch.Tensor) else targets).long()
        self.classes = list(getattr(dataset, "classes", []) or [])
        first = self.item(0)
        self._shape = tuple(first.shape)
        self.dtype = first.dtype

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def item_shape(self) -> tuple[int, int, int]:
        return self._shape

    def item(self, i: int) -> torch.Tensor:
        x = self.dataset[i]
        x = x[0] if isinstance(x, (tuple, list)) else x
        if isinstance(x, Image.Image):
            return torch.from_numpy(resize_image(x, self.size).transpose(2, 0, 1).copy())
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"{self.name}: items must be images (3, H, W) (a tensor or a PIL image), got "
                             f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        x = x if x.dtype == torch.uint8 else x.float()
        if self.size is not None and x.shape[-2:] != (self.size, self.size):
            y = torch.nn.functional.interpolate(x[None].float(), size=(self.size, self.size), mode="bilinear",
                                                antialias=True, align_corners=False)[0]
            x = y.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y.clamp(0, 1)
        return x

    def load(self, index: torch.Tensor) -> torch.Tensor:
        items = [self.item(int(i)) for i in index]
        if any(t.shape != items[0].shape or t.dtype != self.dtype for t in items):
            raise ValueError(f"{self.name}: items differ in size or type; pass size=... to resize every image")
        x = torch.stack(items) if items else torch.empty((0, *self.item_shape), dtype=self.dtype)
        if x.dtype != torch.uint8 and len(x) and (not torch.isfinite(x).all() or x.min() < -1e-6 or x.max() > 1 + 1e-6):
            raise ValueError(f"{self.name}: float images must hold values in [0, 1] (normalisation belongs to the model)")
        return x


# ----------------------------------------------------------------------------- views and concatenation


class IndexedSource(ImageSource):
    """The items of `base` at `index` (a view: decoding goes through `base`)."""

    def __init__(self, base: ImageSource, index: torch.Tensor) -> None:
        super().__init__()
        self.base, self.index = base, index.long()
        self.dtype, self.classes, self.name, self.workers = base.dtype, base.classes, base.name, base.workers
        self.labels = None if base.labels is None else base.labels[self.index]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def item_shape(self) -> tuple[int, int, int]:
        return self.base.item_shape

    def load(self, index: torch.Tensor) -> torch.Tensor:
        return self.base[self.index[index]]

    def take(self, index) -> ImageSource:
        return IndexedSource(self.base, self.index[self.indices(index)])


class ConcatSource(ImageSource):
    """Several sets (tensors or sources of one image shape) as one, in order. uint8 when every part is;
    otherwise float in [0, 1] (uint8 parts divided by 255)."""

    def __init__(self, parts: Sequence) -> None:
        super().__init__()
        self.parts = list(parts)
        shapes = {tuple(p.shape[1:]) for p in self.parts}
        if len(shapes) != 1:
            raise ValueError(f"cannot concatenate images of shapes {sorted(shapes)}: resize every set to one size")
        self._shape = shapes.pop()
        self.dtype = torch.uint8 if all(p.dtype == torch.uint8 for p in self.parts) else torch.float32
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).tolist()
        labels = [getattr(p, "labels", None) for p in self.parts]
        self.labels = None if any(lab is None for lab in labels) else torch.cat(labels)
        self.workers = max(getattr(p, "workers", 0) for p in self.parts)
        self.name = "+".join(getattr(p, "name", "") or "tensor" for p in self.parts)

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def item_shape(self) -> tuple[int, int, int]:
        return self._shape

    def load(self, index: torch.Tensor) -> torch.Tensor:
        out = torch.empty((len(index), *self._shape), dtype=self.dtype)
        for part, lo, hi in zip(self.parts, self.offsets, self.offsets[1:]):
            mine = (index >= lo) & (index < hi)
            if mine.any():
                x = part[index[mine] - lo]
                out[mine] = x if x.dtype == self.dtype else x.float().div_(255.0)
        return out


def is_lazy(images) -> bool:
    """Whether `images` is an ImageSource (read on demand) rather than a tensor in memory."""
    return isinstance(images, ImageSource)


def concat(*parts):
    """The sets one after the other: torch.cat when every part is a tensor (in memory, as before), else a
    ConcatSource that decodes nothing until asked."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(list(parts))
    return ConcatSource(parts)
