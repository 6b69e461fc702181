"""The storage dtypes of a store: one table that config, schema, writer, reader, verify,
export and the benchmarks all read (``extract.dtype`` is a key of :data:`DTYPES`).

Unscaled dtypes hold each value as it is: ``bfloat16`` (as its raw bits in uint16: numpy
has no bfloat16), ``float16``, ``float32``.

Scaled dtypes hold each value in 8 bits, with one float32 **scale per row** (per layer and
token: d_model values) in a second array ``scale`` (n_layers+1, n_tokens) beside
``resid``::

    scale = absmax(row) / qmax          (a row whose scale would be 0 gets 1: its values are 0)
    q     = round(clamp(x / scale, -qmax, qmax))    in the 8-bit format, round to nearest
    x'    = float32(q) * scale          (the decode; exact in float32 but for the product's rounding)

- ``fp8``: float8 e4m3fn (4 exponent bits, 3 mantissa bits, no inf; qmax 448), stored as
  its raw bits in uint8 (attribute ``encoding: float8_e4m3fn-bits``);
- ``int8``: int8 (qmax 127; -128 is never stored).

Why per row: the residual stream has a few rows (attention-sink tokens: the first token of
a sequence, separators) with |x| ~ 1,000-25,000 beside ordinary rows of |x| ~ 5. One scale
per tensor (or per layer) sized for the sinks would leave the ordinary rows a handful of
the 255 int8 levels, or push them into fp8's subnormals; one scale per row gives every row
the format's whole range. What a row scale cannot help: outlier *dimensions* within a row.
A row whose absmax is one feature at 100x the others gives those others only ~1 int8 level
each (most round to 0), while fp8's exponent keeps their relative precision (~6%) down to
2^-9 of the absmax. ``benchmarks/store_dtype_quality.py`` measures both on SmolLM2.

A scaled dtype cannot overflow (any finite row has a finite scale), so only non-finite
inputs are refused, with the same message as for every dtype, before any scale is computed:
a scale is therefore always finite and > 0.

No torch, no zarr here (``lenspipe info`` and ``verify`` never import torch): the torch
dtype is named, and resolved by :mod:`pipeline.store.encoding`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BF16_BITS = "bfloat16-bits"
FP8_E4M3_BITS = "float8_e4m3fn-bits"
#: Name of the per-row scale array of a scaled store.
SCALE_ARRAY = "scale"


@dataclasses.dataclass(frozen=True)
class StorageDtype:
    """How one storage dtype is held and checked."""

    name: str
    """The config value (``extract.dtype``) and the store's ``dtype`` attribute."""
    stored: np.dtype
    """numpy dtype of the ``resid`` array."""
    encoding: str | None
    """``resid``'s ``encoding`` attribute: how its numbers map to values (None: as they are)."""
    torch_name: str
    """The torch dtype the cast or quantisation goes through (``getattr(torch, name)``)."""
    max: float
    """Largest magnitude held: beyond it a value overflows (unscaled); for a scaled dtype
    float32's largest, since a finite row always has a finite scale."""
    fill: int | float
    """Fill value of ``resid``, one no written value can equal (values are checked before
    they are stored), so every chunk is a file whatever the codec pipeline (engine.py)."""
    qmax: float | None = None
    """Scaled dtypes: the largest quantised magnitude (scale = absmax / qmax); else None."""

    @property
    def scaled(self) -> bool:
        return self.qmax is not None

    @property
    def schema_version(self) -> int:
        """The store schema version its stores are written with: 2 adds the scale array, so
        a lenspipe that predates it refuses such a store by version, and unscaled stores keep
        version 1, readable by every lenspipe."""
        return 2 if self.scaled else 1

    def bytes_per_value(self) -> float:
        """Stored bytes per value, uncompressed, without the scales."""
        return float(self.stored.itemsize)

    def bytes_per_token(self, n_layers: int, d_model: int) -> int:
        """Uncompressed bytes of one token: (n_layers+1) rows of d_model values (+ a float32
        scale per row)."""
        row = d_model * self.stored.itemsize + (SCALE_DTYPE.itemsize if self.scaled else 0)
        return (n_layers + 1) * row

    def valid(self, values: np.ndarray) -> bool:
        """Whether stored values (any shape, the storage dtype) are all values a writer
        stores: no inf/nan, never the fill value of an 8-bit format."""
        if self.encoding == BF16_BITS:
            # A bf16 is inf/nan exactly when its 8 exponent bits are all ones.
            return not np.any((values & 0x7F80) == 0x7F80)
        if self.encoding == FP8_E4M3_BITS:
            # e4m3fn has no inf; NaN is S.1111.111 only (the writer clamps to +-448 first).
            return not np.any((values & 0x7F) == 0x7F)
        if self.name == "int8":
            return not np.any(values == -128)  # quantised values are clamped to +-127
        return bool(np.isfinite(values).all())

    def problem(self, values: np.ndarray, scale: np.ndarray | None = None) -> str | None:
        """What is wrong with stored values (..., d_model) and their row scales (...), as
        verify words it, or None when a writer could have stored them: no inf/nan (nor an
        8-bit fill value), scales finite and > 0, and every value decoding finite."""
        if not self.valid(values):
            return "holds values outside -127..127" if self.name == "int8" else "holds inf/nan values"
        if not self.scaled:
            return None
        if scale is None or scale.shape != values.shape[:-1]:
            return "has no scale for every row"
        if not (np.isfinite(scale) & (scale > 0)).all():
            return "holds scales that are not finite and > 0"
        with np.errstate(over="ignore"):
            if not np.isfinite(self._row_absmax(values) * scale).all():
                return "holds values that decode to inf (value x scale overflows float32)"
        return None

    def _row_absmax(self, values: np.ndarray) -> np.ndarray:
        """float32 largest |q| of each row of valid 8-bit values."""
        if self.encoding == FP8_E4M3_BITS:
            # the magnitude of an e4m3fn grows with its 7 low bits (NaN aside, refused before)
            return FP8_TABLE[np.bitwise_and(values, 0x7F).max(axis=-1, initial=0)]
        return np.abs(values.astype(np.int16)).max(axis=-1, initial=0).astype(np.float32)


#: The dtype of the per-row scales, and their fill value (scales are finite: never NaN).
SCALE_DTYPE = np.dtype("float32")
SCALE_FILL = float("nan")

_F32_MAX = float(np.finfo(np.float32).max)

DTYPES: dict[str, StorageDtype] = {
    d.name: d
    for d in (
        StorageDtype(
            "bfloat16", np.dtype("uint16"), BF16_BITS, "bfloat16", 3.3895313892515355e38, 0x7FC0
        ),  # 0x7FC0: a bf16 NaN
        StorageDtype("float16", np.dtype("float16"), None, "float16", 65504.0, float("nan")),
        StorageDtype("float32", np.dtype("float32"), None, "float32", _F32_MAX, float("nan")),
        StorageDtype(
            "fp8", np.dtype("uint8"), FP8_E4M3_BITS, "float8_e4m3fn", _F32_MAX, 0x7F, qmax=448.0
        ),  # 0x7F: an e4m3fn NaN
        StorageDtype("int8", np.dtype("int8"), None, "int8", _F32_MAX, -128, qmax=127.0),
    )
}


def storage_dtype(name: str) -> StorageDtype:
    return DTYPES[name]


def _fp8_e4m3fn_table() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn bit patterns (NaN at 0x7F and 0xFF):
    exponent bias 7, subnormals m/8 * 2^-6. Built here, so decoding needs neither torch
    nor ml_dtypes (a test checks it against torch's own e4m3fn, pattern by pattern)."""
    bits = np.arange(256)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exp, man = (bits >> 3) & 0xF, bits & 0x7
    value = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7.0))
    value = np.where((exp == 0xF) & (man == 0x7), np.nan, sign * value)
    return value.astype(np.float32)


#: fp8 bits -> float32, for :func:`pipeline.store.reader.decode_into` (``np.take``).
FP8_TABLE = _fp8_e4m3fn_table()
