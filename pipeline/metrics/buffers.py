"""Reusable (n, vocab) buffers, one set per thread: fewer page faults for the fused passes."""

from __future__ import annotations

import threading

import torch
from torch import Tensor


class Workspace:
    """Reusable (n, vocab) buffers for :func:`pipeline.metrics.fused.logit_stats`, one set per thread.

    Every fresh (1,024 x 49,152) float32 temporary is a 200 MB allocation, which glibc
    serves with mmap and returns with munmap: the kernel zero-fills it page by page on
    first touch (~1 GB/s here), so allocating was slower than the arithmetic. Writing into
    buffers kept across lenses and layers (``out=``) removes those page faults.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def take(
        self,
        name: str,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """An uninitialised buffer of this shape and dtype, the same one while they do not change
        (or while only its leading dimension shrinks: then a leading view of it).
        On a GPU a fresh tensor: the caching allocator already reuses memory without page
        faults, and buffers held here would keep GBs of device memory for the whole run."""
        if torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        shape = tuple(shape)
        buf = self._buffers.get(name)
        if (
            buf is not None
            and buf.dtype == dtype
            and buf.device == torch.device(device)
            and buf.ndim == len(shape)
            and buf.shape[1:] == shape[1:]
            and buf.shape[0] >= shape[0]
        ):
            return buf[: shape[0]]  # fewer rows (a last, partial block): a leading view, contiguous
        self._buffers.pop(name, None)  # free the old one first: peak memory stays one buffer
        buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def like(self, name: str, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return self.take(name, t.shape, t.dtype if dtype is None else dtype, t.device)


_LOCAL = threading.local()


def workspace() -> Workspace:
    """This thread's :class:`Workspace` (dask runs evaluation chunks in threads)."""
    if not hasattr(_LOCAL, "ws"):
        _LOCAL.ws = Workspace()
    return _LOCAL.ws
