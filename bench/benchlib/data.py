"""The data of the protocol: CIFAR-10 (victim, owner, test split) and Tiny ImageNet (shadow set, thief pool)
from ../shared, unpacked once into the cache the tests share (one copy, one decode cache)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from honeypotnet.data import DatasetError, load_dataset
from honeypotnet.data.files import unpack_archive_once

DATA_SEED = 0  # the data subsets (shadow, owner, pool) are fixed; --seeds vary the training only


@dataclass
class Data:
    test_images: torch.Tensor
    test_labels: torch.Tensor
    calib: torch.Tensor  # indices into test
    verif: torch.Tensor
    shadow: torch.Tensor
    owner: torch.Tensor
    pool: torch.Tensor  # the thief's pool: Tiny ImageNet train (natural images, another distribution)
    classes: list[str]
    train_images: torch.Tensor | None = None  # for --finetune-victim
    train_labels: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    pool_in: torch.Tensor | None = None  # an in-distribution pool: cifar10-jpeg/train images outside the owner's
    _mixed: torch.Tensor | None = field(default=None, init=False, repr=False)  # pool_images("mixed"), drawn once

    @property
    def eval_idx(self) -> torch.Tensor:
        return torch.cat([self.calib, self.verif]).sort().values

    def pool_images(self, name: str) -> torch.Tensor:
        """A thief's pool by name (POOLS): "tin" (Tiny ImageNet train), "cifar" (CIFAR-10 train images the
        owner never used: a thief with unlabeled images like the owner's), "mixed" (a random half of each,
        as many images as the others)."""
        if name == "tin":
            return self.pool
        if self.pool_in is None:
            raise ValueError("this Data has no in-distribution pool")
        if name == "cifar":
            return self.pool_in
        if name == "mixed":
            if self._mixed is None:
                half = len(self.pool) // 2
                tin = self.pool[subset(len(self.pool), half, 5)]
                cif = self.pool_in[subset(len(self.pool_in), len(self.pool) - half, 6)]
                self._mixed = torch.cat([tin, cif])[subset(len(self.pool), len(self.pool), 7, ordered=False)].contiguous()
            return self._mixed
        raise ValueError(f"unknown pool {name!r}: one of {', '.join(POOLS)}")


POOLS = {"tin": "Tiny ImageNet", "cifar": "CIFAR-10 (in-distribution)", "mixed": "½ Tiny ImageNet + ½ CIFAR-10"}


def subset(n_total: int, n: int, salt: int, ordered: bool = True) -> torch.Tensor:
    """n indices of range(n_total) (sorted unless ordered=False), a fixed draw per salt (1 owner, 2 shadow,
    3 pool, 4 in-distribution pool, 5-7 the mixed pool)."""
    if n > n_total:
        raise SystemExit(f"asked for {n} images of a set of {n_total}")
    g = torch.Generator().manual_seed(DATA_SEED * 1000 + salt)
    idx = torch.randperm(n_total, generator=g)[:n]
    return idx.sort().values if ordered else idx


def unpack_once(tarball: Path, top: str) -> Path:
    """Unpack a ../shared tarball once (the same place and key as the tests use)."""
    try:
        return unpack_archive_once(tarball, top)
    except DatasetError as e:
        raise SystemExit(str(e)) from e


def resolve_roots(args) -> tuple[Path, Path]:
    """(cifar10-jpeg root, tiny-imagenet-200 root) from --cifar-root / --tin-root, else ../shared's tarballs."""
    shared = Path(args.shared)
    cifar = Path(args.cifar_root) if args.cifar_root else None
    tin = Path(args.tin_root) if args.tin_root else None
    if cifar is None:
        tb = shared / "data" / "cifar10-jpeg.tar.gz"
        if not tb.is_file():
            raise SystemExit(f"{tb} not found: pass --shared DIR or --cifar-root DIR (unpacked cifar10-jpeg)")
        cifar = unpack_once(tb, "cifar10-jpeg")
    if tin is None:
        tb = shared / "data" / "tiny-imagenet-200-subset.tar.gz"
        if not tb.is_file():
            raise SystemExit(f"{tb} not found: pass --shared DIR or --tin-root DIR (unpacked tiny-imagenet-200)")
        tin = unpack_once(tb, "tiny-imagenet-200")
    return cifar, tin


def find_victim(args) -> Path:
    """--victim-weights, else the pretrained ResNet-20 under SHARED/weights/resnet-cifar10."""
    if getattr(args, "victim_weights", None):
        return Path(args.victim_weights)
    shared = Path(args.shared)
    found = sorted((shared / "weights" / "resnet-cifar10").glob("resnet20-*.th"))
    if not found:
        raise SystemExit(f"no resnet20-*.th under {shared / 'weights' / 'resnet-cifar10'}: pass --shared or --victim-weights")
    return found[0]


def split_per_class(labels: torch.Tensor, classes: int, n_calib: int, n_verif: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-set indices: the first n_calib of each class calibrate tau0, the last n_verif verify
    (file order = the original test_batch order per class; ImageFolder order is by class, so "the
    first 5,000" would be five classes only)."""
    calib, verif = [], []
    for c in range(classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < n_calib + n_verif:
            raise SystemExit(f"class {c} has {len(idx)} test images, need {n_calib + n_verif}")
        calib.append(idx[:n_calib])
        verif.append(idx[len(idx) - n_verif:])
    return torch.cat(calib), torch.cat(verif)


def load_data(args, p, keep_train: bool = False) -> Data:
    """The protocol's data at the sizes of `p` (a protocol.Protocol): test split, owner subset of
    cifar10-jpeg/train, shadow subset of Tiny ImageNet val and pool subset of its train split, both
    at 32 px. keep_train: also keep every train image and label (to fine-tune the victim)."""
    cifar_root, tin_root = resolve_roots(args)
    test = load_dataset("imagefolder", cifar_root, "test")
    train = load_dataset("imagefolder", cifar_root, "train")
    shadow_all = load_dataset("tinyimagenet", tin_root, "val", size=32)
    pool_all = load_dataset("tinyimagenet", tin_root, "train", size=32)
    calib, verif = split_per_class(test.labels, len(test.classes), p.calib_per_class, p.verify_per_class)
    owner_idx = subset(len(train), p.owner, 1)
    data = Data(test.images, test.labels, calib, verif,
                shadow_all.images[subset(len(shadow_all), p.shadow, 2)].contiguous(),
                train.images[owner_idx].contiguous(),
                pool_all.images[subset(len(pool_all), p.pool, 3)].contiguous(), list(test.classes))
    outside = torch.ones(len(train), dtype=torch.bool)
    outside[owner_idx] = False
    rest = outside.nonzero().flatten()  # never the owner's images (nor the test split: another folder)
    data.pool_in = train.images[rest[subset(len(rest), min(p.pool, len(rest)), 4)]].contiguous()
    if keep_train:
        data.train_images, data.train_labels = train.images, train.labels
    data.info = {"cifar_root": str(cifar_root), "tin_root": str(tin_root), "test": len(test), "train": len(train),
                 "tin_val": len(shadow_all), "tin_train": len(pool_all), "calibration_images": len(data.calib),
                 "verification_images": len(data.verif), "shadow": len(data.shadow), "owner": len(data.owner),
                 "pool": len(data.pool), "pool_in": len(data.pool_in),
                 "split": f"per class: first {p.calib_per_class} test images calibrate tau0, last "
                          f"{p.verify_per_class} verify (disjoint); subsets drawn with data seed {DATA_SEED}"}
    return data


def owner_labels(data: Data, p) -> torch.Tensor:
    """The labels of the owner images (load_data keeps only the images): the same subset of cifar10-jpeg/train."""
    train = load_dataset("imagefolder", data.info["cifar_root"], "train")
    idx = subset(len(train), p.owner, 1)
    if not torch.equal(train.images[idx], data.owner):
        raise RuntimeError("owner images do not match the protocol's subset of cifar10-jpeg/train")
    return train.labels[idx]
