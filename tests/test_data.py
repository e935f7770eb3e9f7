"""Dataset loaders: CIFAR pickles, ImageFolder, Tiny ImageNet, the cache and the dispatcher."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import honeypotnet.data.files as files_mod
from honeypotnet.data import (
    DATASETS,
    DatasetError,
    ImageDataset,
    load_cifar,
    load_dataset,
    load_imagefolder,
    load_tinyimagenet,
)

# ----------------------------------------------------------------------------- fake data


def _pickle(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def make_fake_cifar(root, num_classes=10, per_batch=4, n_test=3):
    """A tiny CIFAR tree in torchvision's layout; returns {split: (data (N,3072), labels)}."""
    rng = np.random.default_rng(num_classes)
    out = {}
    if num_classes == 10:
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True)
        train_d, train_l = [], []
        for i in range(1, 6):
            d = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            lab = [int(x) for x in rng.integers(0, 10, per_batch)]
            _pickle(base / f"data_batch_{i}", {b"batch_label": b"x", b"data": d, b"labels": lab})
            train_d.append(d)
            train_l += lab
        out["train"] = (np.concatenate(train_d), train_l)
        d = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
        lab = [int(x) for x in rng.integers(0, 10, n_test)]
        _pickle(base / "test_batch", {b"data": d, b"labels": lab})
        out["test"] = (d, lab)
        _pickle(base / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    else:
        base = root / "cifar-100-python"
        base.mkdir(parents=True)
        for split, n in (("train", per_batch * 5), ("test", n_test)):
            d = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            lab = [int(x) for x in rng.integers(0, 100, n)]
            _pickle(base / split, {b"data": d, b"fine_labels": lab, b"coarse_labels": [0] * n})
            out[split] = (d, lab)
        _pickle(base / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    return out


def _img(h, w, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    return im if mode == "RGB" else im.convert(mode)


def make_imagefolder(root, split="train", classes=("dog", "cat", "bird"), per_class=3, size=8):
    """root/split/<class>/ with PNG and JPEG files; returns {path: array} of the PNGs."""
    pngs = {}
    for ci, cls in enumerate(classes):
        d = root / split / cls if split else root / cls
        d.mkdir(parents=True)
        for j in range(per_class):
            im = _img(size, size, 100 * ci + j)
            if j % 2 == 0:
                p = d / f"{j:03d}.png"
                im.save(p)
                pngs[p] = np.asarray(im)
            else:
                im.save(d / f"{j:03d}.JPG", quality=95)
        (d / "notes.txt").write_text("not an image")
    return pngs


def make_tinyimagenet(root, wnids=("n03", "n01", "n02"), n_train=2, n_val=4, size=16):
    """A tiny Tiny-ImageNet layout; val_i has class wnids[i % len(wnids)], val_1 is greyscale."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    # words.txt covers more wnids than used, lists synonyms, and lacks the last used wnid
    (root / "words.txt").write_text(
        "n00\tentity\n" + "".join(f"{w}\tname {w}, synonym\n" for w in wnids[:-1])
    )
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(n_val):
        mode = "L" if i == 1 else "RGB"
        _img(size, size, 1000 + i, mode).save(root / "val" / "images" / f"val_{i}.JPEG", quality=95)
        lines.append(f"val_{i}.JPEG\t{wnids[i % len(wnids)]}\t0\t0\t{size}\t{size}")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    for k, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(n_train):
            _img(size, size, 2000 + 10 * k + j).save(d / f"{w}_{j}.JPEG", quality=95)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    return root


def _cache_files(cache_dir, ext=".safetensors"):
    d = cache_dir / "datasets"
    return sorted(p for p in d.iterdir() if p.name.endswith(ext)) if d.exists() else []


def _same(a: ImageDataset, b: ImageDataset):
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    assert a.classes == b.classes
    assert a.name == b.name


# ----------------------------------------------------------------------------- CIFAR


def test_cifar10_pickles(tmp_path):
    ref = make_fake_cifar(tmp_path)
    ds = load_cifar(tmp_path, "train")
    assert isinstance(ds, ImageDataset)
    assert ds.images.shape == (20, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == ref["train"][1]
    assert ds.classes == [f"c{i}" for i in range(10)]
    # rows are R plane, G plane, B plane, each row-major 32x32
    d = ref["train"][0]
    assert ds.images[7, 1, 2, 5].item() == d[7, 1024 + 2 * 32 + 5]
    test = load_dataset("cifar10", tmp_path, "test")
    assert len(test) == 3 and test.labels.tolist() == ref["test"][1]
    # root may be the batches directory itself; size resizes
    direct = load_cifar(tmp_path / "cifar-10-batches-py", "test", size=16)
    assert direct.images.shape == (3, 3, 16, 16)


def test_cifar100_fine_labels(tmp_path):
    ref = make_fake_cifar(tmp_path, num_classes=100)
    ds = load_dataset("cifar100", tmp_path, "train")
    assert ds.images.shape == (20, 3, 32, 32)
    assert ds.labels.tolist() == ref["train"][1]
    assert ds.num_classes == 100 and ds.classes[3] == "f3"
    assert np.array_equal(ds.images.reshape(20, -1).numpy(), ref["train"][0])


def test_cifar_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_cifar(tmp_path / "nope", "train")
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_cifar(tmp_path, "train")  # empty dir: says which files it expected
    make_fake_cifar(tmp_path)
    with pytest.raises(DatasetError, match="'train' or 'test'"):
        load_cifar(tmp_path, "val")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="test_batch"):
        load_cifar(tmp_path, "test")


# ----------------------------------------------------------------------------- ImageFolder


def test_imagefolder_layout_and_pixels(tmp_path):
    pngs = make_imagefolder(tmp_path / "data")
    ds = load_imagefolder(tmp_path / "data", "train", cache_dir=tmp_path / "cache")
    assert ds.classes == ["bird", "cat", "dog"]  # sorted like torchvision
    assert ds.images.shape == (9, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # sorted file order within a class: 000.png, 001.JPG, 002.png; PNG pixels are exact
    bird0 = pngs[tmp_path / "data" / "train" / "bird" / "000.png"]
    assert np.array_equal(ds.images[0].permute(1, 2, 0).numpy(), bird0)
    assert ds.name == "data/train"


def test_imagefolder_flat_root_and_modes(tmp_path):
    root = tmp_path / "flat"
    make_imagefolder(root, split=None, classes=("a", "b"), per_class=2)
    _img(8, 8, 7, "L").save(root / "a" / "grey.png")
    _img(8, 8, 8, "RGBA").save(root / "b" / "alpha.png")
    ds = load_dataset("imagefolder", root, None, cache_dir=tmp_path / "cache")
    assert ds.classes == ["a", "b"] and len(ds) == 6
    with pytest.raises(DatasetError, match="split=None"):
        load_imagefolder(root, "train")


def test_imagefolder_resize_and_mixed_sizes(tmp_path):
    root = tmp_path / "mixed"
    make_imagefolder(root, classes=("x", "y"), per_class=2, size=8)
    _img(12, 10, 5).save(root / "train" / "y" / "zz_big.png")
    with pytest.raises(DatasetError, match=r"zz_big\.png.*size="):
        load_imagefolder(root, "train", cache=False)
    ds = load_imagefolder(root, "train", size=6, cache=False)
    assert ds.images.shape == (5, 3, 6, 6)
    assert _cache_files(tmp_path / "cache") == []


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_imagefolder(tmp_path / "missing", "train")
    root = tmp_path / "data"
    make_imagefolder(root, classes=("a", "b"), per_class=2)
    with pytest.raises(DatasetError, match=r"split 'test' not found.*train"):
        load_imagefolder(root, "test")
    (root / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match="without image files.*empty"):
        load_imagefolder(root, "train", cache=False)
    (root / "train" / "empty").rmdir()
    (root / "train" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match=r"cannot decode image file .*broken\.png"):
        load_imagefolder(root, "train", cache=False)
    noimg = tmp_path / "noimg" / "train" / "a"
    noimg.mkdir(parents=True)
    (noimg / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no image files"):
        load_imagefolder(tmp_path / "noimg", "train")
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no class folders"):
        load_imagefolder(tmp_path / "noclass", "train")


# ----------------------------------------------------------------------------- cache


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    root = tmp_path / "data"
    make_imagefolder(root)
    cache = tmp_path / "cache"
    first = load_imagefolder(root, "train", cache_dir=cache)
    entries = _cache_files(cache)
    assert len(entries) == 1 and len(_cache_files(cache, ".json")) == 1

    def boom(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(files_mod, "decode_images", boom)
    _same(first, load_imagefolder(root, "train", cache_dir=cache))

    # a changed file changes the signature: rebuilt, and the stale entry is dropped
    monkeypatch.undo()
    _img(8, 8, 999).save(root / "train" / "cat" / "zzz.png")
    second = load_imagefolder(root, "train", cache_dir=cache)
    assert len(second) == len(first) + 1
    assert len(_cache_files(cache)) == 1 and _cache_files(cache) != entries


def test_cache_env_and_disabled(tmp_path, monkeypatch):
    root = tmp_path / "data"
    make_imagefolder(root, classes=("a",), per_class=1)
    monkeypatch.setenv("HONEYPOTNET_CACHE", str(tmp_path / "envcache"))
    load_dataset("imagefolder", root, "train")
    assert len(_cache_files(tmp_path / "envcache")) == 1
    load_dataset("imagefolder", root, "train", cache_dir=tmp_path / "off", cache=False)
    assert not (tmp_path / "off").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncate", "flip"])
def test_corrupt_cache_is_rebuilt(tmp_path, damage):
    root = tmp_path / "data"
    make_imagefolder(root)
    cache = tmp_path / "cache"
    first = load_imagefolder(root, "train", cache_dir=cache)
    (entry,) = _cache_files(cache)
    raw = bytearray(entry.read_bytes())
    if damage == "garbage":
        raw = bytearray(b"\x00not a safetensors file")
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[-20] ^= 0xFF  # inside the tensor data: caught by the checksum
    entry.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        again = load_imagefolder(root, "train", cache_dir=cache)
    _same(first, again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt file reads cleanly
        _same(first, load_imagefolder(root, "train", cache_dir=cache))
    assert not [p for p in (cache / "datasets").iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- Tiny ImageNet


def test_tinyimagenet(tmp_path):
    root = make_tinyimagenet(tmp_path / "tiny-imagenet-200")
    cache = tmp_path / "cache"
    val = load_tinyimagenet(root, "val", cache_dir=cache)
    assert val.images.shape == (4, 3, 16, 16)
    assert val.labels.tolist() == [0, 1, 2, 0]  # index in wnids.txt order, annotation order
    assert val.classes == ["name n03", "name n01", "n02"]  # first synonym, else the wnid
    grey = val.images[1]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    train = load_dataset("tinyimagenet", tmp_path, "train", size=8, cache_dir=cache)  # parent dir works
    assert train.images.shape == (6, 3, 8, 8)
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert train.name == "tinyimagenet/train"


def test_tinyimagenet_errors(tmp_path):
    root = make_tinyimagenet(tmp_path / "t")
    with pytest.raises(DatasetError, match="use 'val'"):
        load_tinyimagenet(root, "test")
    with pytest.raises(DatasetError, match="wnids.txt"):
        load_tinyimagenet(tmp_path, "val")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match="line 1"):
        load_tinyimagenet(root, "val")
    for p in (root / "train" / "n02" / "images").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="n02"):
        load_tinyimagenet(root, "train", cache=False)


# ----------------------------------------------------------------------------- dispatcher


def test_dispatcher_names_and_errors(tmp_path):
    assert DATASETS == ("shapes", "cifar10", "cifar100", "imagefolder", "folder", "tinyimagenet")
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist", tmp_path)
    assert all(n in str(err.value) for n in DATASETS)
    for name in DATASETS[1:]:
        with pytest.raises(DatasetError, match="root"):
            load_dataset(name)
    assert issubclass(DatasetError, ValueError)


def test_dispatcher_shapes():
    pytest.importorskip("honeypotnet.data.synthetic")
    ds = load_dataset("shapes", split="test", n=16, size=24)
    assert isinstance(ds, ImageDataset)
    assert ds.images.shape == (16, 3, 24, 24) and ds.labels.shape == (16,)


def test_shapes_made_once_per_process_each_caller_with_its_own_copy(monkeypatch):
    """A split asked for again comes from the process's store, the same pixels, in tensors of the caller's own (what
    one caller writes into them the next does not see); other sizes, seeds and lengths are made anew; the store
    drops its least recently used splits beyond its byte budget."""
    from honeypotnet.data import synthetic

    monkeypatch.setattr(synthetic, "_CACHE", synthetic._Generated())
    a = load_dataset("shapes", split="train", n=40, size=16)
    b = load_dataset("shapes", split="train", n=40, size=16)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.data_ptr() != b.images.data_ptr() and a.labels.data_ptr() != b.labels.data_ptr()
    a.images.zero_()
    a.labels.fill_(3)
    c = load_dataset("shapes", split="train", n=40, size=16)
    assert torch.equal(c.images, b.images) and torch.equal(c.labels, b.labels)
    assert not torch.equal(load_dataset("shapes", split="train", n=40, size=16, seed=1).images, c.images)
    assert len(synthetic._CACHE.entries) == 2
    one = 40 * 3 * 16 * 16
    monkeypatch.setattr(synthetic._Generated, "CACHE_BYTES", 2 * one)  # room for two such splits
    load_dataset("shapes", split="train", n=40, size=16)  # the seed-0 split, now the most recently used
    load_dataset("shapes", split="shadow", n=40, size=16)
    assert [k[0] for k in synthetic._CACHE.entries] == ["train", "shadow"]  # seed 1's split went first
    assert synthetic._CACHE.entries.keys() == {("train", 40, 11, 16), ("shadow", 40, 37, 16)}


# ----------------------------------------------------------------------------- real data (optional)


def test_real_cifar10_jpeg_test_split(cifar10_jpeg_root, tmp_path):
    ds = load_dataset("imagefolder", cifar10_jpeg_root, "test", cache_dir=tmp_path)
    assert ds.images.shape == (10000, 3, 32, 32)
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert ds.labels.bincount().tolist() == [1000] * 10


def test_real_tinyimagenet_val(tinyimagenet_root, tmp_path):
    ds = load_dataset("tinyimagenet", tinyimagenet_root, "val", size=32, cache_dir=tmp_path)
    assert ds.images.shape == (10000, 3, 32, 32)
    assert ds.num_classes == 200 and ds.labels.bincount().tolist() == [50] * 200
    assert "goldfish" in ds.classes


def test_a_process_decoding_the_same_files_is_waited_for_and_its_entry_read(tmp_path, monkeypatch):
    """Two processes loading one dataset on a cold cache (pytest-xdist workers, two CLI jobs): the second waits
    for the first's entry instead of decoding everything again."""
    import subprocess
    import sys
    import time

    root = tmp_path / "data"
    make_imagefolder(root)
    cache, started = tmp_path / "cache", tmp_path / "started"
    script = (
        "import sys, time\n"
        "import honeypotnet.data.files as f\n"
        "real = f.decode_images\n"
        "def slow(*a, **k):\n"
        f"    open({str(started)!r}, 'w').close(); time.sleep(2); return real(*a, **k)\n"
        "f.decode_images = slow\n"
        f"f.load_imagefolder({str(root)!r}, 'train', cache_dir={str(cache)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the first process never started decoding"

        def boom(*a, **k):
            raise AssertionError("decoded again while another process was decoding the same files")

        monkeypatch.setattr(files_mod, "decode_images", boom)
        ds = load_imagefolder(root, "train", cache_dir=cache)
    finally:
        assert proc.wait(timeout=120) == 0
    assert len(_cache_files(cache)) == 1 and len(ds) > 0
