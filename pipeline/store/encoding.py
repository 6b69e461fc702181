"""How activations become stored chunks: the range check, the cast (or, for the 8-bit
dtypes, the per-row quantisation) into a shard buffer, the codecs. Shared by the writer and
the benchmarks; no zarr arrays here. The dtypes themselves: :mod:`pipeline.store.dtypes`."""

from __future__ import annotations

import numpy as np
import torch
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from ..errors import StoreError
from .dtypes import DTYPES, FP8_E4M3_BITS, StorageDtype


def torch_dtype(spec: StorageDtype) -> torch.dtype:
    return getattr(torch, spec.torch_name)


def check_finite(x: torch.Tensor, dtype: str, first_index: int, seq_len: int, what: str = "layer") -> None:
    """Refuse a batch (rows, n, d) with inf/nan, or with values the storage dtype cannot hold;
    the message names the row as ``what`` N (``layer``, ``attention layer``).

    One min/max reduction on the source tensor, on its own device (the GPU when extraction
    runs there); only a suspicious batch pays for the exact check of a cast copy (bf16
    elementwise ops are slow on CPUs). A scaled (8-bit) dtype holds any finite value, so
    there only inf/nan is refused, checked on the values themselves."""
    spec = DTYPES[dtype]
    lo, hi = torch.aminmax(x)
    peak = max(-float(lo), float(hi))
    if not peak <= spec.max:  # also true for nan
        bad = ~torch.isfinite(x if spec.scaled else x.to(torch_dtype(spec)))
        if bool(bad.any()):
            _raise_nonfinite(x, bad, dtype, first_index, seq_len, what)


def cast_into(out: np.ndarray, x: torch.Tensor, dtype: str, scale: np.ndarray | None = None) -> None:
    """Values ``x`` (L+1, k, d) -> ``out``, a slice of a shard buffer in the storage dtype
    (and, for a scaled dtype, their row scales -> ``scale`` (L+1, k) float32).

    On the CPU the cast writes straight into the buffer: one pass, where a cast copy then
    copied into the buffer made two and allocated a batch-sized temporary. On a GPU the cast
    runs there, so only the compact storage dtype crosses to the host."""
    spec = DTYPES[dtype]
    target = _target(out, spec)
    if spec.scaled:
        _quantise_into(target, torch.from_numpy(scale), x, spec)
        return
    if x.device.type != "cpu":
        x = x.to(torch_dtype(spec))
    target.copy_(x)


def _target(out: np.ndarray, spec: StorageDtype) -> torch.Tensor:
    """A torch view of the shard buffer slice ``out`` in the storage dtype (numpy has no
    bfloat16 or float8: those buffers hold their bits as uint16 / uint8)."""
    if spec.encoding is not None:
        signed = out.view(np.int16) if out.dtype.itemsize == 2 else out
        return torch.from_numpy(signed).view(torch_dtype(spec))
    return torch.from_numpy(out)


def row_scales(x: torch.Tensor, spec: StorageDtype) -> torch.Tensor:
    """(L+1, k) float32 scales of the rows of ``x`` (L+1, k, d): absmax / qmax, and 1 where
    that is 0 (an all-zero row, or one below float32's range once divided)."""
    lo, hi = torch.aminmax(x, dim=-1)  # a reduction: no batch-sized |x| temporary
    s = torch.maximum(-lo, hi).float().div_(spec.qmax)
    return s.masked_fill_(s == 0, 1.0)


def _quantise_into(target: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, spec: StorageDtype) -> None:
    """q = round(clamp(x / scale, +-qmax)) into ``target`` (L+1, k, d), scales into ``scale``.

    Layer by layer, through one layer-sized float32 temporary (1/(L+1) of the batch): x / s,
    clamped so float rounding of x / s never casts past qmax (an absmax just above a
    multiple of qmax; a subnormal scale of a few bits, where x / s can reach 1.5 qmax):
    int8 would wrap, e4m3fn become NaN on a cast that does not saturate (torch's CPU cast
    saturates). Then rounded to nearest (int8: ``round``, ties to even; fp8: torch's cast).
    On a GPU the quantisation runs there and only the 8-bit values and the scales cross to
    the host."""
    s = row_scales(x, spec)  # (L+1, k) on x's device
    tmp = torch.empty(x.shape[1:], dtype=torch.float32, device=x.device)  # (k, d)
    on_cpu = x.device.type == "cpu"
    for layer in range(x.shape[0]):
        torch.div(x[layer], s[layer, :, None], out=tmp)
        tmp.clamp_(-spec.qmax, spec.qmax)
        if spec.encoding != FP8_E4M3_BITS:
            tmp.round_()
        target[layer].copy_(tmp if on_cpu else tmp.to(torch_dtype(spec)))
    scale.copy_(s)


def _raise_nonfinite(
    x: torch.Tensor, bad: torch.Tensor, dtype: str, first_index: int, seq_len: int, what: str = "layer"
) -> None:
    layer, t, feature = (int(v) for v in bad.nonzero()[0])
    index = first_index + t
    seq, pos = divmod(index, seq_len)
    where = f"{what} {layer}, token index {index} (sequence {seq}, position {pos}), feature {feature}"
    value = float(x[layer, t, feature])
    if not np.isfinite(value):
        raise StoreError(
            f"non-finite activation {value} at {where}: the model itself produced "
            "inf/nan; run it in bfloat16 or float32 rather than float16"
        )
    raise StoreError(
        f"activation {value:g} at {where} overflows store dtype {dtype}; use store dtype 'bfloat16' or 'float32'"
    )


#: blosc compressions: (codec, shuffle). A byte shuffle puts the bf16s' sign/exponent bytes
#: (low entropy) apart from their mantissa bytes (noise); a bit shuffle goes further and
#: puts each bit of the 16 in a plane of its own, so that the nearly constant high exponent
#: bits become runs that LZ4, which has no entropy coder, can shorten.
BLOSC = {
    "blosc-zstd": ("zstd", "shuffle"),
    "blosc-lz4": ("lz4", "shuffle"),
    "blosc-lz4-bitshuffle": ("lz4", "bitshuffle"),
}


def compressors(compression: str, level: int, typesize: int = 2) -> list | None:
    """The codecs of an array: ``typesize`` is its item size (blosc's shuffles group bytes
    by it)."""
    if compression == "zstd":
        # checksum=True: a corrupt chunk fails loudly on every read, not only under verify.
        return [ZstdCodec(level=level, checksum=True)]
    if compression in BLOSC:
        cname, shuffle = BLOSC[compression]
        # blosc has no checksum of its own: crc32c (zarr v3's codec) makes a corrupt chunk
        # fail every read too, as zstd's checksum does. It costs ~10% of a blosc-lz4 write's
        # CPU through TensorStore, whose build here computes it without the CPU's crc32 unit.
        return [BloscCodec(cname=cname, clevel=level, shuffle=shuffle, typesize=typesize), Crc32cCodec()]
    return None


#: Fill value of the token ids (which are >= 0); the values' own are ``StorageDtype.fill``,
#: the scales' ``SCALE_FILL``. No written chunk can equal its fill value, so every inner
#: chunk and every shard is a file whatever the codec pipeline: zarrs skips chunks equal to
#: the fill value even when told to write them.
TOKEN_FILL = -1
