"""keep_freed_memory: after it, a freed block is reused without page faults (each case in a fresh process)."""
import platform
import subprocess
import sys

import pytest

from ldm_lite.allocator import keep_freed_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Allocate, touch and free 64 MiB + 16 MiB six times; print the fewest minor page faults of rounds 2-6
# (the fewest: a small Python object landing between the blocks can move them once).
SCRIPT = """
import resource, sys, torch
from ldm_lite.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    big, small = torch.ones(16 * 2 ** 20), torch.ones(4 * 2 ** 20)
    del big, small
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[1:]))
"""


def fewest_faults_per_round(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory tunes glibc's malloc; this C library is not glibc")
def test_freed_memory_is_reused_without_page_faults():
    pages = (16 + 4) * 2 ** 20 * 4 // 4096  # 20,480 pages of 4 KiB touched per round
    applied, default_faults = fewest_faults_per_round("default")
    assert applied == "None" and default_faults > pages // 2  # glibc hands the blocks back: they fault again
    applied, kept_faults = fewest_faults_per_round("keep")
    assert applied == "True" and kept_faults < 200, kept_faults


@pytest.mark.skipif(GLIBC, reason="glibc: the call applies (tested above)")
def test_other_c_libraries_are_left_alone():
    assert keep_freed_memory() is False
