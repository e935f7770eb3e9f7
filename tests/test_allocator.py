"""The CPU allocator tuning (honeypotnet.allocator): measured in fresh processes, by the page faults that a
loop of large torch allocations causes with glibc's defaults and once tuned."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from honeypotnet import allocator

PROBE = r"""
import json, resource, sys, torch
from honeypotnet.allocator import tune_allocator
state = tune_allocator() if sys.argv[1] == "tune" else "untouched"
x = torch.ones(1)
def step():
    a = torch.empty(16 << 20, dtype=torch.float32)  # 64 MiB, like a batch's activations
    a.fill_(1.0)
    return float(a[::4096].sum())
for _ in range(5):  # the heap's top settles in the first few steps
    step()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"state": state, "faults": faults}))
"""

glibc = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


def probe(mode: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "HONEYPOTNET_MALLOC", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, "OMP_NUM_THREADS": "1", **env},
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_tuned_allocator_reuses_freed_tensors():
    default, tuned = probe("default"), probe("tune")
    assert tuned["state"] == "tuned"
    # 20 steps of 64 MiB each: with glibc's defaults every allocation is a fresh mmap, faulted in page by page
    # (≈ 16k pages of 4 KiB, every step); tuned, the heap keeps the freed block and most steps fault nothing.
    # Counted step by step, not in total: a few steps of the tuned run may fault the block in again (seen on a CI
    # machine: 6 blocks' worth of 20, as the heap's top grows, or when the kernel's NUMA balancing unmaps pages to
    # sample them), which says nothing about reuse; the typical step does.
    block = 8000
    assert sum(f > block for f in default["faults"]) >= 18, default
    assert sum(f < block // 8 for f in tuned["faults"]) >= 12, (default, tuned)


def test_environment_choice_wins(monkeypatch):
    for k in ("HONEYPOTNET_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
              "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(k, raising=False)
    assert allocator.environment_choice() is None
    for k, v, why in (("HONEYPOTNET_MALLOC", "0", "HONEYPOTNET_MALLOC=0"),
                      ("MALLOC_MMAP_THRESHOLD_", "65536", "MALLOC_MMAP_THRESHOLD_ is set"),
                      ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1", "GLIBC_TUNABLES sets malloc"),
                      ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2", "jemalloc is preloaded")):
        monkeypatch.setenv(k, v)
        assert allocator.environment_choice() == why
        monkeypatch.delenv(k)


def test_once_per_process(monkeypatch):
    first = allocator.tune_allocator()
    monkeypatch.setenv("HONEYPOTNET_MALLOC", "0")
    assert allocator.tune_allocator() == first  # decided once; a later call changes nothing
