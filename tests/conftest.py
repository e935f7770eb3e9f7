"""Shared test fixtures: the optional ../shared folder and real data unpacked from it.

The shared folder is $HONEYPOTNET_SHARED, else ``<repo>/../shared``. Tests that need it are
skipped when it (or the file they need) is absent, so the suite runs anywhere.
Tarballs are unpacked once, into $HONEYPOTNET_CACHE/shared-unpacked (default
~/.cache/honeypotnet/shared-unpacked), and reused by later sessions.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from honeypotnet.data import DatasetError
from honeypotnet.data.files import unpack_archive_once

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_path() -> Path:
    """Where the shared folder would be (it may not exist)."""
    env = os.environ.get("HONEYPOTNET_SHARED")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared"


def unpack_once(tarball: Path, top: str) -> Path:
    """Unpack ``tarball`` once (see honeypotnet.data.files.unpack_archive_once); skip if ``top`` is absent."""
    try:
        return unpack_archive_once(tarball, top)
    except DatasetError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder (data/, weights/, ...); skips the test when absent."""
    path = shared_path()
    if not path.is_dir():
        pytest.skip(f"shared folder {path} not present (set HONEYPOTNET_SHARED)")
    return path


def _shared_tarball(shared: Path, name: str) -> Path:
    path = shared / "data" / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def cifar10_jpeg_root(shared_dir: Path) -> Path:
    """ImageFolder root of real CIFAR-10 as JPEG: ``<root>/{train,test}/<class>/*.jpg``."""
    return unpack_once(_shared_tarball(shared_dir, "cifar10-jpeg.tar.gz"), "cifar10-jpeg")


@pytest.fixture(scope="session")
def tinyimagenet_root(shared_dir: Path) -> Path:
    """Tiny ImageNet subset root (wnids.txt, words.txt, val/ with 10k images, train/ 100 per class)."""
    return unpack_once(_shared_tarball(shared_dir, "tiny-imagenet-200-subset.tar.gz"), "tiny-imagenet-200")


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """One small run of the whole chain on the embedded data (victim -> protect -> bundle -> thieves
    -> verify; `honeypotnet.demo.QUICK`, about a minute on 2 CPU cores), shared by every test that
    needs a protected model: returns (output dir with victim.safetensors and bundle/, results dict)."""
    from honeypotnet.demo import QUICK, run_demo

    out = tmp_path_factory.mktemp("demo")
    results = run_demo(out, sizes=QUICK, progress=False)
    return out, results


@pytest.fixture(scope="session")
def reproduce_quick(shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path_factory):
    """`bench/reproduce.py --quick` run once per session on the real data of ../shared (CIFAR-10 JPEG
    victim data, Tiny ImageNet queries; about 2-3 minutes on 2 idle cores), into a temporary
    directory; returns (output dir, command, stdout). Used by tests/test_reproduce_quick.py and, as
    the artefacts it reads, by tests/test_arsenal_quick.py."""
    import subprocess
    import sys

    if not list((shared_dir / "weights" / "resnet-cifar10").glob("resnet20-*.th")):
        pytest.skip("no resnet20 weights under ../shared/weights/resnet-cifar10")
    out = tmp_path_factory.mktemp("reproduce") / "quick"
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "reproduce.py"), "--quick", "--out", str(out), "--shared",
           str(shared_dir), "--cifar-root", str(cifar10_jpeg_root), "--tin-root", str(tinyimagenet_root),
           "--device", "cpu", "--no-progress"]
    # the timeout only guards against a hang on a busy machine
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, cmd, proc.stdout
