"""The CPU memory allocator, tuned for torch's large, short-lived tensors.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and hands it
back to the kernel when it is freed; it also trims the heap's top once 2 × that threshold is free. A CPU
training step allocates and frees activations of tens of MiB in every batch, so each batch faults its
memory in again page by page: on a 2-core machine, one outer iteration of `protect` (default preset, 1,000
shadow + 1,000 owner images) and its benchmark spent 41 of 114 CPU seconds in the kernel. Raising both
thresholds keeps the freed blocks in the heap for the next batch: that protect call took 26 s instead of
36 s, at the same peak memory (`python -m bench.speed` measures it).

`tune_allocator()` does that once per process through glibc's mallopt. The CLI's compute verbs and the
benchmarks call it; the library never does on import, so a program embedding it keeps its own allocator
unless it calls this. It does nothing (and says why) off glibc, when the environment already chooses
(MALLOC_*_ or GLIBC_TUNABLES malloc settings, a jemalloc / tcmalloc / mimalloc LD_PRELOAD), or when
HONEYPOTNET_MALLOC=0. The memory freed by a step stays with the process (up to 2 GiB above its peak)
rather than going back to the kernel, which suits a batch job, not a long-lived server.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 1 << 30        # blocks up to 1 GiB come from the heap and are reused
TRIM_THRESHOLD = (1 << 31) - 1  # the heap's free top is given back only past 2 GiB (mallopt takes an int)
TOP_PAD = 256 << 20             # the heap grows 256 MiB at a time

_state: str | None = None


def _libc():
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def environment_choice() -> str | None:
    """Why the environment's own allocator settings win, or None."""
    if os.environ.get("HONEYPOTNET_MALLOC", "").strip().lower() in ("0", "off", "false", "no"):
        return "HONEYPOTNET_MALLOC=0"
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        if k in os.environ:
            return f"{k} is set"
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc"
    preload = os.environ.get("LD_PRELOAD", "")
    for lib in ("jemalloc", "tcmalloc", "mimalloc"):
        if lib in preload:
            return f"{lib} is preloaded"
    return None


def set_thresholds(mmap: int, trim: int, top: int) -> bool:
    """Set glibc's mmap and trim thresholds and top pad (bytes). False where there is no glibc mallopt."""
    libc = _libc()
    if libc is None:
        return False
    ok = True
    for param, value in ((M_MMAP_THRESHOLD, mmap), (M_TRIM_THRESHOLD, trim), (M_TOP_PAD, top)):
        ok &= bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(int(value))))
    return ok


def tune_allocator() -> str:
    """Keep torch's freed CPU tensors in the heap for reuse (see the module's text). Once per process;
    returns "tuned", or why not ("not glibc", "HONEYPOTNET_MALLOC=0", "jemalloc is preloaded", ...)."""
    global _state
    if _state is None:
        why = environment_choice()
        if why is not None:
            _state = why
        elif _libc() is None:
            _state = "not glibc"
        else:
            _state = "tuned" if set_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD, TOP_PAD) else "mallopt refused"
    return _state
