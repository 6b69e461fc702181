"""Keep freed memory in the process: fewer page faults for the stages' temporaries.

glibc serves an allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh
mmap, returns it with munmap on free, and trims the heap's free top back to the kernel, so
the next temporary of that size comes back as zero-filled pages faulted in one by one. A
model's forward pass (extraction, the live-model analyses) makes many such mid-size
temporaries. With mmap off and trimming off, the heap keeps what it has freed (the page
faults and system time it saves are measured in benchmarks/RESULTS.md). The cost is that the
process keeps its peak memory until it exits, which is what a stage does anyway.

It does not help with the (tokens x vocab) tensors of 100 MB and more: torch's 64-byte
aligned request does not fit the freed block of the same size, so the heap grows instead.
Evaluation, training and validation write those into reused buffers
(``pipeline.metrics.Workspace``), which also serves dask's threads: their arenas map large
blocks one by one whatever this says.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h
_done = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (idempotent). False where the C
    library is not glibc (nothing changes there)."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _done
