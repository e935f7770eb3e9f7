"""Loaders for on-disk datasets: CIFAR-10/100 (torchvision's pickles), ImageFolder trees, Tiny ImageNet.

Every loader returns an :class:`~honeypotnet.data.base.ImageDataset` with uint8 images
(N, 3, H, W) and int64 labels (N,).

Image files are decoded once (PIL, two threads, straight into a preallocated uint8 array) and
cached on disk as safetensors, so later loads cost a file read. The cache lives in
``cache_dir``, else ``$HONEYPOTNET_CACHE``, else ``~/.cache/honeypotnet``; its key covers the
loader, the absolute root, the split, the output size and a cheap signature of the source
files (count, names, sizes, mtimes), so editing, adding or removing a file rebuilds it. Cache
files are written atomically (temp file + ``os.replace``) and carry a CRC32 of their tensors;
an unreadable or corrupt cache file is rebuilt with a warning.

CIFAR pickles are not cached: unpickling them is as fast as reading a cache would be.

With ``lazy=True`` the file loaders list the files (and labels) only and return a
:class:`~honeypotnet.data.source.FileSource`, which decodes images batch by batch when asked: for
sets larger than memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..ops import atomic_path, atomic_write_bytes, exclusive
from .base import DatasetError, ImageDataset
from .source import FileSource, decode_image

__all__ = [
    "IMG_EXTENSIONS",
    "default_cache_dir",
    "decode_images",
    "load_cifar",
    "load_imagefolder",
    "load_tinyimagenet",
]

#: Extensions ImageFolder accepts (same as torchvision), matched case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: Bump when the cache layout or the decoding changes, so old entries are not reused.
CACHE_VERSION = 1

_DECODE_WORKERS = 2
_CHUNK = 256

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- small helpers


def _check_size(size: int | None) -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) < 1:
        raise DatasetError(f"size must be a positive integer (output images are size x size), got {size!r}")
    return int(size)


def _existing_dir(root: PathLike | None, what: str) -> Path:
    if root is None:
        raise DatasetError(f"{what}: a root directory is required")
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"{what}: root {str(path)!r} does not exist")
    if not path.is_dir():
        raise DatasetError(f"{what}: root {str(path)!r} is not a directory")
    return path


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=None, dynamic_ncols=True)


# ----------------------------------------------------------------------------- decoding


def decode_images(paths: Sequence[PathLike], size: int | None = None, desc: str = "decoding") -> torch.Tensor:
    """Decode image files into a uint8 tensor (N, 3, H, W).

    With ``size`` every image is resized to size x size (bilinear, antialiased); without it all
    images must share the first image's size, or a DatasetError names the first odd one.
    Greyscale, palette and RGBA images are converted to RGB.
    """
    size = _check_size(size)
    paths = [os.fspath(p) for p in paths]
    n = len(paths)
    if n == 0:
        raise DatasetError("no image files to decode")
    first = decode_image(paths[0], size)
    h, w = first.shape[:2]
    out = np.empty((n, 3, h, w), dtype=np.uint8)
    out[0] = first.transpose(2, 0, 1)

    def work(lo: int, hi: int) -> int:
        for i in range(lo, hi):
            a = decode_image(paths[i], size)
            if a.shape[:2] != (h, w):
                raise DatasetError(
                    f"images differ in size: {paths[i]!r} is {a.shape[1]}x{a.shape[0]} but "
                    f"{paths[0]!r} is {w}x{h}; pass size=... to resize every image"
                )
            out[i] = a.transpose(2, 0, 1)
        return hi - lo

    bar = _progress(n, desc)
    try:
        if bar is not None:
            bar.update(1)
        bounds = [(lo, min(lo + _CHUNK, n)) for lo in range(1, n, _CHUNK)]
        with ThreadPoolExecutor(max_workers=_DECODE_WORKERS, thread_name_prefix="decode") as pool:
            futures = [pool.submit(work, lo, hi) for lo, hi in bounds]
            try:
                for fut in futures:  # in order, so the first failing file is the one reported
                    done = fut.result()
                    if bar is not None:
                        bar.update(done)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        if bar is not None:
            bar.close()
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- cache


def unpack_archive_once(tarball: PathLike, top: str, cache_dir: PathLike | None = None) -> Path:
    """Unpack a dataset tarball once into ``<cache>/shared-unpacked`` and return ``<dest>/<top>``.

    The destination is keyed by the tarball's name, size and mtime, so a changed archive is
    unpacked again. Extraction goes to a temporary directory renamed into place, so an interrupted
    run never leaves a half-unpacked tree, and a concurrent run waits for it (a file lock) instead of
    unpacking the same archive beside it. Raises DatasetError if ``top`` is absent.
    """
    tarball = Path(tarball)
    if not tarball.is_file():
        raise DatasetError(f"archive not found: {tarball}")
    st = tarball.stat()
    stem = tarball.name.split(".")[0]
    dest = default_cache_dir(cache_dir) / "shared-unpacked" / f"{stem}-{st.st_size}-{st.st_mtime_ns}"
    if not (dest / top).is_dir():
        with exclusive(dest.parent / f".{dest.name}.lock"):  # a concurrent run waits, then finds it unpacked
            _unpack(tarball, dest, top, stem)
    if not (dest / top).is_dir():
        raise DatasetError(f"{tarball} does not contain {top}/")
    return dest / top


def _unpack(tarball: Path, dest: Path, top: str, stem: str) -> None:
    if not (dest / top).is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{stem}-"))
        try:
            with tarfile.open(tarball) as tar:
                try:
                    tar.extractall(tmp, filter="data")
                except TypeError:  # Python without extraction filters
                    tar.extractall(tmp)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not (dest / top).is_dir():  # not a concurrent run that won the race
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def default_cache_dir(cache_dir: PathLike | None = None) -> Path:
    """``cache_dir`` if given, else $HONEYPOTNET_CACHE, else ~/.cache/honeypotnet."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HONEYPOTNET_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "honeypotnet"


def _file_signature(root: Path, files: Sequence[PathLike]) -> str:
    """Cheap fingerprint of a file list: count + relative names + sizes + mtimes."""
    h = hashlib.sha256()
    h.update(str(len(files)).encode())
    prefix = os.path.join(str(root), "")
    for f in files:
        f = os.fspath(f)
        try:
            st = os.stat(f)
        except OSError as exc:
            raise DatasetError(f"cannot read {f!r}: {exc}") from exc
        rel = f[len(prefix):] if f.startswith(prefix) else os.path.relpath(f, root)
        h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _crc(t: torch.Tensor) -> str:
    return f"{zlib.crc32(memoryview(t.contiguous().numpy()).cast('B')):08x}"


def _read_cache(path: Path) -> ImageDataset | None:
    """The cached dataset, or None when the file is missing or unusable (with a warning)."""
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            images = f.get_tensor("images")
            labels = f.get_tensor("labels")
        if int(meta.get("version", -1)) != CACHE_VERSION:
            raise ValueError(f"cache version {meta.get('version')!r} != {CACHE_VERSION}")
        if _crc(images) != meta.get("crc_images") or _crc(labels) != meta.get("crc_labels"):
            raise ValueError("checksum mismatch")
        classes = json.loads(meta["classes"])
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError("bad class list")
        return ImageDataset(images, labels if labels.numel() or len(images) == 0 else None, classes, meta.get("name", ""))
    except Exception as exc:  # noqa: BLE001 - any failure means "rebuild"
        warnings.warn(f"ignoring unreadable dataset cache {str(path)!r} ({type(exc).__name__}: {exc}); rebuilding it",
                      RuntimeWarning, stacklevel=3)
        return None


def _write_cache(path: Path, ds: ImageDataset, info: dict) -> None:
    """Write ds atomically to path (+ a JSON sidecar); failures only warn."""
    from safetensors.torch import save_file

    labels = ds.labels if ds.labels is not None else torch.zeros(0, dtype=torch.int64)
    images = ds.images.contiguous()
    labels = labels.contiguous()
    meta = {
        "version": str(CACHE_VERSION),
        "classes": json.dumps(list(ds.classes)),
        "name": ds.name,
        "crc_images": _crc(images),
        "crc_labels": _crc(labels),
    }
    try:
        # Sidecar first (informational only), then the safetensors file is the commit point.
        sidecar = dict(info, classes=list(ds.classes), num_images=len(ds), shape=list(images.shape),
                       version=CACHE_VERSION)
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(sidecar, indent=1).encode())
        with atomic_path(path) as tmp:
            save_file({"images": images, "labels": labels}, tmp, metadata=meta)
    except Exception as exc:  # noqa: BLE001 - caching is best effort
        warnings.warn(f"could not write dataset cache {str(path)!r}: {exc}", RuntimeWarning, stacklevel=3)


def _cached(
    loader: str,
    root: Path,
    split: str | None,
    size: int | None,
    files: Sequence[PathLike],
    build: Callable[[], ImageDataset],
    cache_dir: PathLike | None,
    cache: bool,
) -> ImageDataset:
    """Return build() through the on-disk cache (see module docstring)."""
    if not cache:
        return build()
    abs_root = str(root.resolve())
    where = hashlib.sha256(json.dumps([loader, abs_root, split, size]).encode()).hexdigest()[:16]
    key = hashlib.sha256(
        json.dumps([CACHE_VERSION, loader, abs_root, split, size, _file_signature(root, files)]).encode()
    ).hexdigest()[:16]
    directory = default_cache_dir(cache_dir) / "datasets"
    safe_split = re.sub(r"[^A-Za-z0-9_.-]", "_", split or "all")
    stem = f"{loader}-{safe_split}-{size or 'orig'}-{where}"
    path = directory / f"{stem}-{key}.safetensors"
    ds = _read_cache(path)
    if ds is not None:
        return ds
    with exclusive(directory / f".{stem}.lock"):  # a process decoding the same files first: wait and read its entry
        ds = _read_cache(path)
        if ds is None:
            ds = build()
            _write_cache_and_prune(path, ds, directory, stem, key,
                                   {"loader": loader, "root": abs_root, "split": split, "size": size, "key": key})
    return ds


def _write_cache_and_prune(path: Path, ds: ImageDataset, directory: Path, stem: str, key: str, info: dict) -> None:
    _write_cache(path, ds, info)
    # Drop stale entries for the same (loader, root, split, size) made from older file versions.
    for old in directory.glob(f"{stem}-*"):
        if old.name.startswith(f"{stem}-{key}") or old.name.endswith(".tmp"):
            continue
        try:
            old.unlink()
        except OSError:
            pass


# ----------------------------------------------------------------------------- CIFAR


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except FileNotFoundError as exc:
        raise DatasetError(f"CIFAR file {str(path)!r} is missing") from exc
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"cannot read CIFAR pickle {str(path)!r}: {exc}") from exc


def _resize_tensor(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 (N, 3, H, W) to (N, 3, size, size), in chunks."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for lo in range(0, images.shape[0], 4096):
        x = images[lo:lo + 4096].float()
        y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[lo:lo + 4096] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_cifar(
    root: PathLike,
    split: str = "train",
    num_classes: int = 10,
    *,
    size: int | None = None,
    cache_dir: PathLike | None = None,
    cache: bool = True,
) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 from torchvision's on-disk format (the python pickles).

    ``root`` holds ``cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta) or
    ``cifar-100-python/`` (train, test, meta), or is that directory itself. ``split`` is
    "train" (50,000 images) or "test" (10,000). CIFAR-100 labels are the 100 fine labels.
    Pickles run code when loaded: only point this at data you trust. ``cache_dir`` and
    ``cache`` are accepted for a uniform signature and unused: unpickling is already fast.
    """
    del cache_dir, cache
    size = _check_size(size)
    if num_classes not in (10, 100):
        raise DatasetError(f"CIFAR num_classes must be 10 or 100, got {num_classes!r}")
    if split not in ("train", "test"):
        raise DatasetError(f"unknown CIFAR-{num_classes} split {split!r}; expected 'train' or 'test'")
    what = f"CIFAR-{num_classes}"
    root = _existing_dir(root, what)
    if num_classes == 10:
        sub, files = "cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        meta_name, names_key, label_key = "batches.meta", b"label_names", b"labels"
    else:
        sub, files = "cifar-100-python", {"train": ["train"], "test": ["test"]}
        meta_name, names_key, label_key = "meta", b"fine_label_names", b"fine_labels"
    base = root / sub if (root / sub).is_dir() else root
    missing = [f for f in files[split] if not (base / f).is_file()]
    if missing:
        raise DatasetError(
            f"{what} {split} split not found: expected {', '.join(missing)} in {str(root / sub)!r} "
            f"(or directly in {str(root)!r}), torchvision's python-pickle layout"
        )
    datas, labels = [], []
    for name in files[split]:
        d = _unpickle(base / name)
        if b"data" not in d or label_key not in d:
            raise DatasetError(f"{str(base / name)!r} lacks {b'data'!r} or {label_key!r}; is it a {what} batch?")
        data = np.asarray(d[b"data"])
        lab = np.asarray(d[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or lab.shape != (data.shape[0],):
            raise DatasetError(
                f"{str(base / name)!r}: expected uint8 data (N, 3072) and N labels, "
                f"got data {data.dtype} {data.shape} and {lab.shape[0]} labels"
            )
        datas.append(data)
        labels.append(lab)
    images = torch.from_numpy(np.concatenate(datas).reshape(-1, 3, 32, 32))
    y = torch.from_numpy(np.concatenate(labels))
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DatasetError(f"{what} labels in {str(base)!r} outside 0..{num_classes - 1}")

    classes: list[str]
    if (base / meta_name).is_file():
        meta = _unpickle(base / meta_name)
        raw = meta.get(names_key, [])
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in raw]
        if len(classes) != num_classes:
            raise DatasetError(f"{str(base / meta_name)!r} lists {len(classes)} class names, expected {num_classes}")
    else:
        warnings.warn(f"{str(base / meta_name)!r} missing; using default class names", RuntimeWarning, stacklevel=2)
        classes = list(CIFAR10_CLASSES) if num_classes == 10 else [f"class_{i}" for i in range(num_classes)]
    if size is not None:
        images = _resize_tensor(images, size)
    return ImageDataset(images.contiguous(), y, classes, f"cifar{num_classes}/{split}")


# ----------------------------------------------------------------------------- ImageFolder


def _image_files(directory: Path) -> list[str]:
    """Image files under directory (recursively, hidden entries skipped), sorted by path."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return found


def _class_dirs(directory: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def load_imagefolder(
    root: PathLike,
    split: str | None = "train",
    *,
    size: int | None = None,
    cache_dir: PathLike | None = None,
    cache: bool = True,
    lazy: bool = False,
) -> ImageDataset | FileSource:
    """An ImageFolder tree: ``root/split/<class>/<images>`` (or ``root/<class>/...`` with split=None).

    Classes are the sorted sub-directory names (as torchvision's ImageFolder, hidden ones
    skipped); images inside a class folder are found recursively, with the extensions in
    IMG_EXTENSIONS. All images must share one size unless ``size`` resizes them to size x size.
    ``lazy=True``: a FileSource (labels and classes known, each image decoded when a batch asks for it;
    no cache) instead of decoding every file into memory.
    """
    size = _check_size(size)
    root = _existing_dir(root, "ImageFolder")
    if split is None:
        folder = root
    else:
        folder = root / split
        if not folder.is_dir():
            available = _class_dirs(root)
            raise DatasetError(
                f"ImageFolder split {split!r} not found: expected directory {str(folder)!r} holding one folder "
                f"per class; {str(root)!r} contains {available or 'no directories'}"
                + (" (pass split=None to use root itself as the class folder)" if available else "")
            )
    classes = _class_dirs(folder)
    if not classes:
        raise DatasetError(f"no class folders in {str(folder)!r}: expected {str(folder)!r}/<class>/<image files>")
    files: list[str] = []
    labels: list[int] = []
    empty = []
    for idx, cls in enumerate(classes):
        found = _image_files(folder / cls)
        if not found:
            empty.append(cls)
        files.extend(found)
        labels.extend([idx] * len(found))
    if not files:
        raise DatasetError(
            f"no image files ({', '.join(IMG_EXTENSIONS)}) under {str(folder)!r}/<class>/"
        )
    if empty:
        raise DatasetError(
            f"class folder(s) without image files in {str(folder)!r}: {', '.join(empty)} "
            f"(expected files ending in {', '.join(IMG_EXTENSIONS)})"
        )
    name = f"{root.resolve().name}/{split}" if split is not None else root.resolve().name
    if lazy:
        return FileSource(files, size, torch.tensor(labels, dtype=torch.int64), classes, name)

    def build() -> ImageDataset:
        images = decode_images(files, size, desc=f"decoding {name}")
        return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), classes, name)

    return _cached("imagefolder", root, split, size, files, build, cache_dir, cache)


def load_folder(
    root: PathLike,
    split: str | None = None,
    *,
    size: int | None = None,
    cache_dir: PathLike | None = None,
    cache: bool = True,
    lazy: bool = False,
) -> ImageDataset | FileSource:
    """Every image under ``root`` (or ``root/split``), found recursively: an unlabeled set (labels None),
    e.g. a shadow set or a thief's pool that is just a directory of images. ``lazy=True``: a FileSource
    that decodes each image when a batch asks for it."""
    size = _check_size(size)
    root = _existing_dir(root, "image folder")
    folder = root if split in (None, "", ".") else root / split
    if not folder.is_dir():
        raise DatasetError(f"image folder {str(folder)!r} not found")
    files = _image_files(folder)
    if not files:
        raise DatasetError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {str(folder)!r}")
    name = folder.resolve().name
    if lazy:
        return FileSource(files, size, None, [], name)

    def build() -> ImageDataset:
        return ImageDataset(decode_images(files, size, desc=f"decoding {name}"), None, [], name)

    return _cached("folder", root, split, size, files, build, cache_dir, cache)


# ----------------------------------------------------------------------------- Tiny ImageNet


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DatasetError(f"Tiny ImageNet: {what} {str(path)!r} is missing") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"Tiny ImageNet: cannot read {what} {str(path)!r}: {exc}") from exc


def load_tinyimagenet(
    root: PathLike,
    split: str = "train",
    *,
    size: int | None = None,
    cache_dir: PathLike | None = None,
    cache: bool = True,
    lazy: bool = False,
) -> ImageDataset | FileSource:
    """Tiny ImageNet (200 classes, 64x64): ``root/{wnids.txt, words.txt, train/, val/}``.

    ``split`` is "train" (``train/<wnid>/images/*.JPEG``) or "val" (``val/images`` labelled by
    ``val/val_annotations.txt``, in that file's order). Labels index wnids.txt; class names
    are the first synonym in words.txt (the wnid where words.txt lacks it). Greyscale images
    become RGB. ``root`` may also be the directory that contains ``tiny-imagenet-200/``.
    Use ``size=32`` to feed a CIFAR-sized model. ``lazy=True``: a FileSource (decoded batch by batch).
    """
    size = _check_size(size)
    if split not in ("train", "val"):
        hint = " (the test split has no public labels; use 'val')" if split == "test" else ""
        raise DatasetError(f"unknown Tiny ImageNet split {split!r}; expected 'train' or 'val'{hint}")
    root = _existing_dir(root, "Tiny ImageNet")
    if not (root / "wnids.txt").is_file() and (root / "tiny-imagenet-200" / "wnids.txt").is_file():
        root = root / "tiny-imagenet-200"
    if not (root / "wnids.txt").is_file():
        raise DatasetError(
            f"Tiny ImageNet: {str(root / 'wnids.txt')!r} is missing; expected "
            f"root/{{wnids.txt, words.txt, train/<wnid>/images/, val/images/, val/val_annotations.txt}}"
        )
    wnids = [w.strip() for w in _read_lines(root / "wnids.txt", "class list") if w.strip()]
    if not wnids:
        raise DatasetError(f"Tiny ImageNet: {str(root / 'wnids.txt')!r} lists no classes")
    index = {w: i for i, w in enumerate(wnids)}
    words: dict[str, str] = {}
    if (root / "words.txt").is_file():
        for line in _read_lines(root / "words.txt", "class names"):
            wnid, _, text = line.partition("\t")
            if wnid.strip() in index and text.strip():
                words[wnid.strip()] = text.split(",")[0].strip()
    classes = [words.get(w, w) for w in wnids]

    files: list[str] = []
    labels: list[int] = []
    meta_files = [root / "wnids.txt"] + ([root / "words.txt"] if (root / "words.txt").is_file() else [])
    if split == "val":
        ann = root / "val" / "val_annotations.txt"
        img_dir = root / "val" / "images"
        if not img_dir.is_dir():
            raise DatasetError(f"Tiny ImageNet val split: expected image directory {str(img_dir)!r}")
        for n, line in enumerate(_read_lines(ann, "val annotations"), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1].strip() not in index:
                raise DatasetError(
                    f"Tiny ImageNet: line {n} of {str(ann)!r} is not '<file>\\t<wnid from wnids.txt>...': {line!r}"
                )
            files.append(os.path.join(img_dir, parts[0].strip()))
            labels.append(index[parts[1].strip()])
        meta_files.append(ann)
    else:
        train = root / "train"
        if not train.is_dir():
            raise DatasetError(f"Tiny ImageNet train split: expected directory {str(train)!r} with <wnid>/images/")
        empty = []
        for wnid in wnids:
            d = train / wnid / "images"
            if not d.is_dir():
                d = train / wnid  # tolerate the flat <wnid>/*.JPEG variant
            found = [
                os.path.join(d, f)
                for f in sorted((e.name for e in os.scandir(d) if _is_image(e.name) and e.is_file()), key=_natural_key)
            ] if d.is_dir() else []
            if not found:
                empty.append(wnid)
            files.extend(found)
            labels.extend([index[wnid]] * len(found))
        if empty:
            shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise DatasetError(f"Tiny ImageNet train split: no images in {str(train)!r}/<wnid>/images for {shown}")
    if not files:
        raise DatasetError(f"Tiny ImageNet {split} split under {str(root)!r} has no images")
    name = f"tinyimagenet/{split}"
    if lazy:
        return FileSource(files, size, torch.tensor(labels, dtype=torch.int64), classes, name)

    def build() -> ImageDataset:
        images = decode_images(files, size, desc=f"decoding {name}")
        return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), classes, name)

    return _cached("tinyimagenet", root, split, size, meta_files + files, build, cache_dir, cache)
