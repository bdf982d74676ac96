"""pipeline/hostmem.py: freed host memory is reused instead of being faulted in again from the kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from repblend.pipeline.hostmem import keep_freed_memory, malloc_mode
applied = keep_freed_memory() if sys.argv[1] == "keep" else False

def faults_of_one_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

for _ in range(8):  # the first times, the pages come from the kernel either way (the heap grows to fit)
    faults_of_one_tensor()
print(applied, faults_of_one_tensor(), malloc_mode())
"""

glibc_linux = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                                 reason="glibc on Linux only")


def _probe(mode: str, **env: str) -> tuple[str, int, str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env}).stdout.split(maxsplit=2)
    return out[0], int(out[1]), out[2].strip()


@glibc_linux
def test_freed_tensor_memory_is_reused_not_faulted_again():
    pages = 16 * 2**20 * 4 // os.sysconf("SC_PAGE_SIZE")
    applied, faults, mode = _probe("keep")
    assert applied == "True" and mode.startswith("glibc")
    assert faults < pages // 10, f"{faults} page faults for a reused 64 MiB tensor"
    applied, faults, mode = _probe("defaults")
    assert applied == "False" and mode == "default"
    assert faults > pages // 2, f"glibc's defaults refault a 64 MiB tensor ({faults} faults): the probe measures"


@glibc_linux
def test_env_leaves_glibc_defaults():
    applied, faults, _ = _probe("keep", REPBLEND_MALLOC="default")
    assert applied == "False"
    assert faults > 16 * 2**20 * 4 // os.sysconf("SC_PAGE_SIZE") // 2
