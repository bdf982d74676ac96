"""pipeline/hostmem.py: freed host memory is reused instead of being faulted in again from the kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource, sys, torch
from repblend.pipeline.hostmem import keep_freed_memory, malloc_mode
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB)

def faults(make_and_free):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    make_and_free()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def raw_block():  # glibc's own contract: one block, freed, asked for again
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)

def tensor():  # torch asks posix_memalign, whose padded request misses a freed block of the exact size, so the
    t = torch.empty(SIZE // 4)  # heap grows a few times (8 at most in 38 probes) before freed blocks coalesce to fit
    t.fill_(1.0)
    del t

raw = [faults(raw_block) for _ in range(3)]
for _ in range(24):
    faults(tensor)
print(applied, raw[-1], sum(faults(tensor) for _ in range(4)), malloc_mode())
"""

glibc_linux = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                                 reason="glibc on Linux only")


def _probe(mode: str, **env: str) -> tuple[str, int, int, str]:
    """(applied, faults of a reused raw 64 MiB block, faults of 4 reused 64 MiB tensors, malloc mode)."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env}).stdout.split(maxsplit=3)
    return out[0], int(out[1]), int(out[2]), out[3].strip()


PAGES = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")


@glibc_linux
def test_freed_memory_is_reused_not_faulted_again():
    applied, raw, tensors, mode = _probe("keep")
    assert applied == "True" and mode.startswith("glibc")
    assert raw < PAGES // 10, f"{raw} page faults for a reused 64 MiB block"
    assert tensors < PAGES // 10, f"{tensors} page faults for 4 reused 64 MiB tensors"


@glibc_linux
def test_env_leaves_glibc_defaults():
    """Also the control of the test above: under glibc's defaults the same probe refaults, so it measures."""
    applied, raw, tensors, mode = _probe("keep", REPBLEND_MALLOC="default")
    assert applied == "False" and mode == "default"
    assert raw > PAGES // 2 and tensors > 2 * PAGES, f"glibc's defaults refault ({raw}, {tensors}): the probe measures"
