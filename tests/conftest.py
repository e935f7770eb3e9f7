"""Shared test fixtures: the optional ../shared folder and real data unpacked from it.

The shared folder is $HONEYPOTNET_SHARED, else ``<repo>/../shared``. Tests that need it are
skipped when it (or the file they need) is absent, so the suite runs anywhere; with
HONEYPOTNET_REQUIRE_SHARED=1 (set by .ci/run) they fail instead, so a run that silently lost its
data cannot pass as green.
Tarballs are unpacked once, into $HONEYPOTNET_CACHE/shared-unpacked (default
~/.cache/honeypotnet/shared-unpacked), and reused by later sessions.
"""
from __future__ import annotations

import os
from pathlib import Path

# Under pytest-xdist (pyproject's addopts run the suite on several workers) each worker gets an equal
# share of the cores, set before torch is first imported: workers with every core each would slow one
# another 5-100x. Subprocesses the tests start (the CLI, servers, benchmarks) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest

from honeypotnet.allocator import tune_allocator
from honeypotnet.data import DatasetError
from honeypotnet.data.files import unpack_archive_once

tune_allocator()  # as the CLI's compute verbs and the benchmarks do: the suite trains torch models in-process

pytest_plugins = ("pytester",)  # tests/test_bundle.py runs a small pytest session of this conftest in-process

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRE_SHARED_ENV = "HONEYPOTNET_REQUIRE_SHARED"
# session fixtures that cost minutes, and the test files that use them: under pytest-xdist the files of
# one fixture run on one worker, so it is made once (tests/test_architecture.py checks this list)
SHARED_RUNS = {
    "reproduce_quick": ("test_arsenal_quick.py", "test_decoys_bench.py", "test_reproduce_quick.py",
                        "test_robustness_quick.py"),
    "quick_demo": ("test_active.py", "test_art_interop.py", "test_default_e2e.py", "test_pipeline.py", "test_serve.py"),
}
SHARED_RUN_OF_FILE = {file: run for run, files in SHARED_RUNS.items() for file in files}


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): one worker per core, at most 4 (the suite's long tests come in
    a few groups, so more workers would mostly repeat session fixtures)."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduling for this suite (pyproject's addopts: `-n auto`): a test file's tests run
    on one worker, so its module fixtures are made once, and the files of one SHARED_RUNS group run on
    one worker, so its session fixture is made once; the largest groups start first."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return SHARED_RUN_OF_FILE.get(Path(file).name, file)

    return SharedRunScheduling(config, log)


def shared_required() -> bool:
    """True when $HONEYPOTNET_REQUIRE_SHARED is 1: missing shared data fails a test instead of skipping it."""
    return os.environ.get(REQUIRE_SHARED_ENV, "").strip() == "1"


def missing_shared(reason: str) -> None:
    """Something from the shared folder is absent: skip the test, or fail it when shared data is required.
    (Also available as the `missing_shared` fixture, for test modules that look for their own files.)"""
    if shared_required():
        pytest.fail(f"{reason} ({REQUIRE_SHARED_ENV}=1: shared data is required)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(name="missing_shared", scope="session")
def missing_shared_fixture():
    """`missing_shared(reason)`: skip, or fail under HONEYPOTNET_REQUIRE_SHARED=1."""
    return missing_shared


def shared_path() -> Path:
    """Where the shared folder would be (it may not exist)."""
    env = os.environ.get("HONEYPOTNET_SHARED")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared"


def unpack_once(tarball: Path, top: str) -> Path:
    """Unpack ``tarball`` once (see honeypotnet.data.files.unpack_archive_once); skip (or fail, see
    `missing_shared`) if ``top`` is absent."""
    try:
        return unpack_archive_once(tarball, top)
    except DatasetError as e:
        missing_shared(str(e))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder (data/, weights/, ...); skips the test when absent (fails it under
    HONEYPOTNET_REQUIRE_SHARED=1)."""
    path = shared_path()
    if not path.is_dir():
        missing_shared(f"shared folder {path} not present (set HONEYPOTNET_SHARED)")
    return path


def _shared_tarball(shared: Path, name: str) -> Path:
    path = shared / "data" / name
    if not path.is_file():
        missing_shared(f"{path} not present")
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
def caltech101_root(shared_dir: Path) -> Path:
    """Caltech-101 as an ImageFolder tree: ``<root>/{train,test}/<class>/*.jpg`` (101 classes, variable sizes)."""
    return unpack_once(_shared_tarball(shared_dir, "caltech101.tar.gz"), "caltech101")


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
    """`python -m bench.reproduce --quick` run once per session (a subprocess from the repository root:
    the one smoke test of the module entry point) on the real data of ../shared (CIFAR-10 JPEG victim
    data, Tiny ImageNet queries; about 2-3 minutes on 2 idle cores), into a temporary directory;
    returns (output dir, argv after `-m bench.reproduce`, stdout). Used by tests/test_reproduce_quick.py
    and, as the artefacts they read, by the other bench tests."""
    import subprocess
    import sys

    if not list((shared_dir / "weights" / "resnet-cifar10").glob("resnet20-*.th")):
        missing_shared("no resnet20 weights under ../shared/weights/resnet-cifar10")
    out = tmp_path_factory.mktemp("reproduce") / "quick"
    argv = ["--quick", "--out", str(out), "--shared", str(shared_dir), "--cifar-root", str(cifar10_jpeg_root),
            "--tin-root", str(tinyimagenet_root), "--device", "cpu", "--no-progress"]
    # the timeout only guards against a hang on a busy machine
    proc = subprocess.run([sys.executable, "-m", "bench.reproduce", *argv], capture_output=True, text=True,
                          timeout=1500, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, argv, proc.stdout


@pytest.fixture(scope="session")
def toy_victim():
    """A small CNN trained one epoch on 300 embedded shapes, with 300 shadow images beside it: the victim of the
    tests that compare protect runs of one option on and off -> (victim, shadow images, owner ImageDataset)."""
    import torch

    from honeypotnet.data import load_dataset
    from honeypotnet.models import create_model
    from honeypotnet.training import FitConfig, fit

    shadow = load_dataset("shapes", split="shadow", n=300).images
    owner = load_dataset("shapes", split="train", n=300)
    torch.manual_seed(0)
    victim = create_model("cnn_small", 10)
    fit(victim, owner.images, owner.labels, FitConfig(epochs=1, seed=0), progress=False)
    return victim, shadow, owner

