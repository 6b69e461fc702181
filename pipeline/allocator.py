"""Keep freed memory in the process: no page faults for the stages' large temporaries.

glibc serves an allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and
returns it with munmap on free, and it trims the heap's free top back to the kernel. Every
(tokens x vocab) float32 tensor of a lens step (512 x 49,152: 100 MB; evaluation's 1,024-token
chunks: 200 MB) is far above that, so each one came back from the kernel as zero-filled pages,
faulted in one by one on first touch: a default `make run` spent 584 of its 2,666 CPU-seconds
in the kernel with 143 M minor page faults (issue 13). With mmap off and trimming off, the
heap keeps what it has freed and the next tensor of the same size reuses it. The cost is that
the process keeps its peak memory until it exits, which is what a stage does anyway.

Only the main arena is affected in practice: threads get their own arenas, whose large
blocks glibc still maps one by one. Evaluation runs its chunks in dask threads, so its hot
loop also reuses its own buffers (``pipeline.metrics.Workspace``).
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
