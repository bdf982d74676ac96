"""Keep freed host memory inside the process, so large CPU tensors are not faulted in again page by page.

glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh mapping and unmaps it on free.
An image encoder's activations at 224 px are hundreds of MiB, so each forward and backward on a CPU starts from
zeroed pages again. With mmap and trimming off (what `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` in the
environment also give), on 2 cores: `repblend encode` of 1000 images 21.0 s instead of 29.4 s, an inversion step
(33 images, EfficientNet-Lite0) 0.80 s instead of 1.05; the price is a peak RSS 14-25 % higher, kept until the
process exits, which a batch job does anyway (torch allocates with posix_memalign, whose padded request misses a
freed block of the same size, so a repeated size grows the heap a few times over before freed blocks coalesce).
The `repblend` command applies it at start; `REPBLEND_MALLOC=default` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_state = {"applied": False}


def keep_freed_memory() -> bool:
    """Turn glibc's mmap-backed allocations and heap trimming off; True when in effect (glibc on Linux only)."""
    if _state["applied"]:
        return True
    if os.environ.get("REPBLEND_MALLOC", "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _state["applied"] = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _state["applied"]


def malloc_mode() -> str:
    """What the run directory records, since it moves CPU timings."""
    return "glibc: mmap and trimming off (pipeline/hostmem.py)" if _state["applied"] else "default"
