"""Stored values back to float32: the reader's decode of every storage dtype (bf16 bits,
fp8 bits and int8 times their row scales, float16/32), in numpy, into the caller's array.
The dtypes themselves: :mod:`pipeline.store.dtypes`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .dtypes import BF16_BITS, DTYPES, FP8_E4M3_BITS, StorageDtype

if TYPE_CHECKING:  # torch takes seconds to import: `lenspipe info` and verify never need it
    import torch


def to_tensor(raw: np.ndarray, spec: StorageDtype, scale: np.ndarray | None = None) -> torch.Tensor:
    """Stored numpy values (and row scales) -> float32 tensor."""
    import torch

    return torch.from_numpy(decode(raw, spec, scale))


def decode(raw: np.ndarray, spec: StorageDtype, scale: np.ndarray | None = None) -> np.ndarray:
    """Stored values (and, for a scaled dtype, their row scales ``raw.shape[:-1]``) ->
    a new float32 array."""
    out = np.empty(raw.shape, np.float32)
    decode_into(raw, out, spec, scale)
    return out


def decode_bf16(raw: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (int16) -> float32: a bf16 is the top half of the float32 with the
    same bits. One numpy shift into the output (~5 GB/s of float32 out here), where torch's
    bfloat16 -> float32 conversion into a fresh tensor ran at ~1.1 GB/s (page faults)."""
    return decode(raw, DTYPES["bfloat16"])


def decode_into(raw: np.ndarray, out: np.ndarray, spec: StorageDtype, scale: np.ndarray | None = None) -> None:
    """Stored values -> float32 written into ``out`` (same shape; it may be a strided view).
    A scaled dtype's values are multiplied by their row's scale (``scale``: raw.shape[:-1]).

    bf16 as one numpy shift into ``out`` (~2.2 GB/s of bf16 per core here). torch's own
    conversion into a preallocated output runs ~1.7x faster per core, but its two OpenMP
    threads then contend with the reading threads of zarrs and TensorStore: one-layer reads
    with zstd lost ~25% (benchmarks/RESULTS.md, fifth round). int8: one multiply, float32(q)
    * scale. fp8: see :func:`_decode_fp8`."""
    if spec.encoding == BF16_BITS:
        # int16 -> uint32 sign-extends; the shift pushes those extension bits out of the word
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32, casting="unsafe")
    elif spec.encoding == FP8_E4M3_BITS:
        _decode_fp8(raw, out, scale)
    elif spec.scaled:
        np.multiply(raw, scale[..., None], out=out, dtype=np.float32)
    else:
        np.copyto(out, raw, casting="same_kind")  # float16 / float32 -> float32


#: The float32 bits of an fp8 e4m3fn placed at bits 26..20 and 31 (see _decode_fp8).
_FP8_MASK = np.uint32(0x87F00000).view(np.int32)
_TWO_120 = np.float32(2.0**120)


def _decode_fp8(raw: np.ndarray, out: np.ndarray, scale: np.ndarray) -> None:
    """fp8 e4m3fn bits -> float32(q) * scale, bit for bit, at ~1.4 G values/s per core here
    (a 256-entry table through ``np.take``: ~0.5, since take widens the indices to int64).

    The 7 exponent and mantissa bits of an e4m3fn, placed at bits 26..20 of a float32 (the
    sign at 31), make a float32 of exactly 2^-120 times its value, subnormals included (both
    formats' subnormals have the smallest exponent). Shifting the int8 view left by 20
    sign-extends into bits 31..27; the mask keeps bit 31 (the sign) only. The 2^120 is
    folded into the scale, exactly (a power of 2), where that stays finite; the product then
    rounds once, as float32(q) * scale does."""
    raw, out, scale = (a[None] for a in (raw, out, scale)) if raw.ndim == 2 else (raw, out, scale)
    with np.errstate(over="ignore"):
        folded = scale * _TWO_120
    exact = bool(np.isfinite(folded).all())  # scale < 2^8 (a row absmax below 114,688)
    for i in range(raw.shape[0]):  # a layer at a time: the three passes stay in the cache
        bits = out[i].view(np.int32)
        np.left_shift(raw[i].view(np.int8), 20, out=bits, dtype=np.int32, casting="unsafe")
        np.bitwise_and(bits, _FP8_MASK, out=bits)
        if exact:
            np.multiply(out[i], folded[i, ..., None], out=out[i])
        else:
            np.multiply(out[i], _TWO_120, out=out[i])
            np.multiply(out[i], scale[i, ..., None], out=out[i])


def _decode_block(block: np.ndarray, spec: StorageDtype, scale: np.ndarray | None = None) -> np.ndarray:
    """Numpy-only decode for dask; ``scale`` with a trailing axis of 1 (dask aligns blocks)."""
    return decode(block, spec, None if scale is None else scale[..., 0])
