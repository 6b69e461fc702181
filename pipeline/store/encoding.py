"""How activations become stored chunks: the range check, the cast into a shard buffer, the
codecs and the fill values. Shared by the writer and the benchmarks; no zarr arrays here."""

from __future__ import annotations

import numpy as np
import torch
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from ..errors import StoreError


_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: Largest magnitude each storage dtype holds; beyond it the exact (slow) check runs.
_MAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": float(np.finfo(np.float32).max)}


def check_finite(x: torch.Tensor, dtype: str, first_index: int, seq_len: int) -> None:
    """Refuse a batch (L+1, n, d) with inf/nan, or with values the storage dtype cannot hold.

    One min/max reduction on the source tensor, on its own device (the GPU when extraction
    runs there); only a suspicious batch pays for the exact check of a cast copy (bf16
    elementwise ops are slow on CPUs)."""
    lo, hi = torch.aminmax(x)
    peak = max(-float(lo), float(hi))
    if not peak <= _MAX[dtype]:  # also true for nan
        cast = x.to(_TORCH[dtype])
        bad = ~torch.isfinite(cast)
        if bool(bad.any()):
            _raise_nonfinite(x, bad, dtype, first_index, seq_len)


def cast_into(out: np.ndarray, x: torch.Tensor, dtype: str) -> None:
    """Values ``x`` (L+1, k, d) -> ``out``, a slice of a shard buffer in the storage dtype.

    On the CPU the cast writes straight into the buffer: one pass, where a cast copy then
    copied into the buffer made two and allocated a batch-sized temporary. On a GPU the cast
    runs there, so only the compact storage dtype crosses to the host."""
    if dtype == "bfloat16":  # numpy has no bfloat16: the buffer holds its bits as uint16
        target = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
    else:
        target = torch.from_numpy(out)
    if x.device.type != "cpu":
        x = x.to(_TORCH[dtype])
    target.copy_(x)


def _raise_nonfinite(x: torch.Tensor, bad: torch.Tensor, dtype: str, first_index: int,
                     seq_len: int) -> None:
    layer, t, feature = (int(v) for v in bad.nonzero()[0])
    index = first_index + t
    seq, pos = divmod(index, seq_len)
    where = f"layer {layer}, token index {index} (sequence {seq}, position {pos}), feature {feature}"
    value = float(x[layer, t, feature])
    if not np.isfinite(value):
        raise StoreError(f"non-finite activation {value} at {where}: the model itself produced "
                         "inf/nan; run it in bfloat16 or float32 rather than float16")
    raise StoreError(f"activation {value:g} at {where} overflows store dtype {dtype}; "
                     "use store dtype 'bfloat16' or 'float32'")


#: blosc compressions: (codec, shuffle). A byte shuffle puts the bf16s' sign/exponent bytes
#: (low entropy) apart from their mantissa bytes (noise); a bit shuffle goes further and
#: puts each bit of the 16 in a plane of its own, so that the nearly constant high exponent
#: bits become runs that LZ4, which has no entropy coder, can shorten.
BLOSC = {"blosc-zstd": ("zstd", "shuffle"), "blosc-lz4": ("lz4", "shuffle"),
         "blosc-lz4-bitshuffle": ("lz4", "bitshuffle")}


def compressors(compression: str, level: int) -> list | None:
    if compression == "zstd":
        # checksum=True: a corrupt chunk fails loudly on every read, not only under verify.
        return [ZstdCodec(level=level, checksum=True)]
    if compression in BLOSC:
        cname, shuffle = BLOSC[compression]
        # blosc has no checksum of its own: crc32c (zarr v3's codec) makes a corrupt chunk
        # fail every read too, as zstd's checksum does. It costs ~10% of a blosc-lz4 write's
        # CPU through TensorStore, whose build here computes it without the CPU's crc32 unit.
        return [BloscCodec(cname=cname, clevel=level, shuffle=shuffle, typesize=2), Crc32cCodec()]
    return None


#: Fill values no written chunk can equal (values are checked finite before they are stored;
#: token ids are >= 0), so every inner chunk and every shard is a file whatever the codec
#: pipeline: zarrs skips chunks equal to the fill value even when told to write them.
FILL = {"bfloat16": 0x7FC0, "float16": float("nan"), "float32": float("nan")}  # 0x7FC0: bf16 NaN
TOKEN_FILL = -1
