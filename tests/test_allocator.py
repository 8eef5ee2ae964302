"""keep_freed_memory: after it, freed blocks are reused without page faults and the heap is not trimmed (each case
in a fresh process, with no malloc settings inherited from the environment)."""
import os
import platform
import subprocess
import sys

import pytest

from ldm_lite.allocator import keep_freed_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# First malloc, touch and free 64 MiB straight from C (it extends the heap, and nothing else can land above it)
# and print by how much the program break, the end of the heap (sbrk(0)), moved down: glibc trims a freed heap
# top unless told not to. Then allocate, touch and free 64 MiB + 16 MiB tensors six times and print the fewest
# minor page faults of rounds 2-6 (the fewest: a small Python object landing between the blocks can move them).
SCRIPT = """
import ctypes, resource, sys, torch
from ldm_lite.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
libc.sbrk.argtypes, libc.sbrk.restype = [ctypes.c_ssize_t], ctypes.c_void_p
block = libc.malloc(64 * 2 ** 20)
libc.memset(block, 1, 64 * 2 ** 20)
heap_end = libc.sbrk(0)
libc.free(block)
trimmed = heap_end - libc.sbrk(0)
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    big, small = torch.ones(16 * 2 ** 20), torch.ones(4 * 2 ** 20)
    del big, small
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[1:]), trimmed)
"""
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}


def run(mode: str) -> tuple[str, int, int]:
    """(keep_freed_memory()'s result or None, fewest faults per round, bytes trimmed off the heap's end)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env=CLEAN_ENV)
    applied, faults, trimmed = out.stdout.split()
    return applied, int(faults), int(trimmed)


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory tunes glibc's malloc; this C library is not glibc")
def test_freed_memory_is_reused_without_page_faults_and_the_heap_is_not_trimmed():
    applied, kept_faults, trimmed = run("keep")
    assert applied == "True" and kept_faults < 200, kept_faults
    assert trimmed == 0  # without the M_TRIM_THRESHOLD setting glibc gives the freed 64 MiB back (measured)
    # The fault count above proves something only where the default allocator faults at all:
    pages = (16 + 4) * 2 ** 20 * 4 // 4096  # 20,480 pages of 4 KiB touched per round
    _, default_faults, _ = run("default")
    if default_faults <= pages // 2:  # e.g. transparent huge pages set to "always": few, large faults
        pytest.skip(f"the default allocator took only {default_faults} faults per round here: nothing to compare")


@pytest.mark.skipif(GLIBC, reason="glibc: the call applies (tested above)")
def test_other_c_libraries_are_left_alone():
    assert keep_freed_memory() is False
