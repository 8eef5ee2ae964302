"""Keep freed host memory inside the process, so CPU training steps and sampling passes stop page-faulting it in.

PyTorch on CPU has no caching allocator: every activation is a malloc and a free. By default glibc gives
large freed blocks back to the kernel: it unmaps blocks over its mmap threshold and trims the top of the
heap. The next step then writes to fresh pages, which costs a page fault and a zeroed page per 4 KiB. Measured
on this project's 2-core CPU (see docs/benchmarks.md): a `ddpm_cifar10` training step at batch 32 takes about
140,000 faults in bf16 and 340,000 in float32, and 5-19 % of the step's time goes on them. A batch-64 float32
forward pass takes about 400,000. With every block served from the heap and the heap never trimmed, the
count drops to zero for the main thread, where PyTorch's CPU ops allocate. Other threads' arenas still mmap
blocks too large for them.

The cost is that memory, once freed, stays with the process until it exits. Peaks from start-up, such as data
loading, are kept, and heap fragmentation can add more: peak RSS in training runs was 3-12 % higher. Only
`python -m train` (switch `train.keep_freed_memory`), `python -m sample` (`--no-keep-freed-memory`) and the
benchmarks (on request) call this. Library functions leave the allocator alone. The call overrides
MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_ settings. With another allocator preloaded (jemalloc, tcmalloc) it has
no effect.
"""
import ctypes
import sys

# mallopt(3) parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every block from the heap (no mmap) and never trim the heap. Process-wide.

    Returns True when applied, False where the C library is not glibc (macOS, Windows, musl), where it is a
    no-op. Blocks allocated before the call keep their old treatment, so call it early.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library the interpreter runs on
        libc.gnu_get_libc_version  # only glibc has this symbol; musl has mallopt as a no-op stub
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # M_MMAP_MAX 0: no mmap'd blocks, so nothing is unmapped on free; M_TRIM_THRESHOLD -1: never trim.
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
