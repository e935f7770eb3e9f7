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
