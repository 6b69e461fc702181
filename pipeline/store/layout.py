"""What a store holds and where: names, parameters, the storage dtypes, shard checksums.

Layout of a store directory (a zarr v3 group)::

    zarr.json            group attributes: format, schema_version, params, provenance, ...
    resid/               (n_layers+1, n_tokens, d_model); shard = (all layers, shard_tokens,
                         d_model), inner chunk = (1, chunk_tokens, d_model); bfloat16 is
                         stored as its raw bits in uint16 (attribute encoding=bfloat16-bits),
                         fp8 as its raw bits in uint8 (float8_e4m3fn-bits), int8 as int8
    scale/               fp8 and int8 only: (n_layers+1, n_tokens) float32, one scale per row;
                         shard = (all layers, shard_tokens), inner chunk = (1, chunk_tokens)
    attn/                with positions [block, attention] only: (n_layers, n_tokens, d_model),
                         the residual inside each block after its attention sublayer
                         (:mod:`pipeline.positions`); sharded, chunked, encoded like resid/
    attn_scale/          fp8 and int8 with attention: attn/'s row scales, like scale/
    tokens/              (n_tokens,) int32; one chunk per shard
    progress/shard-NNNNNN.json   one record per durably written shard (per-layer xxh3-128 checksum)
    SHA256SUMS           sha256 of every file, in ``sha256sum`` format, written at finalize
    writer.lock          flock'ed by the one writer
    COMPLETE             written last by finalize; readers refuse a store without it

Everything the writer, the reader, verify and export must agree on lives here (the storage
dtypes in :mod:`pipeline.store.dtypes`), so none of them imports another to learn it. No
torch, no zarr.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import xxhash

from .. import positions as P
from ..errors import StoreError
from .dtypes import DTYPES, SCALE_DTYPE, StorageDtype

#: The newest store schema version. 1: resid + tokens; 2: also the per-row ``scale`` array
#: of the 8-bit dtypes; 3: also the attention position's ``attn`` array (and its scales).
#: Each store is written with the lowest version that describes it (:func:`schema_version`):
#: a bfloat16 store of block states is still version 1.
SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
FORMAT = "lenspipe-activations"
COMPLETE_NAME = "COMPLETE"
LOCK_NAME = "writer.lock"
PROGRESS_DIR = "progress"
#: Per-file sha256 of a finished store, in ``sha256sum`` format.
MANIFEST_NAME = "SHA256SUMS"
#: The JSON attributes of an HDF5 export (``lenspipe export --to hdf5``), and the one holding their sha256.
H5_META = ("lenspipe_attrs", "lenspipe_records", "lenspipe_complete")
H5_META_SHA256 = "lenspipe_meta_sha256"

COMPRESSIONS = ("zstd", "blosc-zstd", "blosc-lz4", "blosc-lz4-bitshuffle", "none")


@dataclasses.dataclass(frozen=True)
class StoreParams:
    """Everything that fixes the store's layout; part of the resume fingerprint."""

    n_layers: int
    d_model: int
    n_tokens: int
    seq_len: int
    dtype: str
    shard_tokens: int
    chunk_tokens: int
    compression: str
    level: int
    positions: tuple[str, ...] = P.DEFAULT
    """The lens positions stored (:mod:`pipeline.positions`): ``block`` in ``resid``, and
    ``attention`` in ``attn``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", tuple(self.positions))  # JSON gives a list

    def as_attrs(self) -> dict[str, Any]:
        """The parameters as the store's attributes hold them (and its fingerprint hashes
        them): a block-only store leaves ``positions`` out, so it is the store every lenspipe
        before positions wrote, fingerprint included, and caches made then stay valid."""
        out = dataclasses.asdict(self)
        if self.positions == P.DEFAULT:
            del out["positions"]
        else:
            out["positions"] = list(self.positions)
        return out

    def validate(self) -> None:
        for name in ("n_layers", "d_model", "n_tokens", "seq_len", "shard_tokens", "chunk_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise StoreError(f"store parameter {name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise StoreError(f"store dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.compression not in COMPRESSIONS:
            raise StoreError(f"store compression {self.compression!r} is not one of {COMPRESSIONS}")
        if self.compression == "zstd" and not 1 <= self.level <= 22:
            raise StoreError(f"zstd level must be 1..22, got {self.level}")
        if self.compression.startswith("blosc") and not 0 <= self.level <= 9:
            raise StoreError(f"{self.compression} level must be 0..9, got {self.level}")
        for name, multiple_of in (
            ("shard_tokens", "chunk_tokens"),
            ("shard_tokens", "seq_len"),
            ("n_tokens", "seq_len"),
        ):
            a, b = getattr(self, name), getattr(self, multiple_of)
            if a % b:
                raise StoreError(f"{name}={a} must be a multiple of {multiple_of}={b}")
        try:
            if P.check(self.positions) != self.positions:
                raise ValueError(f"positions {list(self.positions)} are not in the order {P.names()}")
        except ValueError as e:
            raise StoreError(f"store parameter positions: {e}") from None

    @property
    def spec(self) -> StorageDtype:
        return DTYPES[self.dtype]

    @property
    def n_shards(self) -> int:
        return -(-self.n_tokens // self.shard_tokens)

    def shard_span(self, i: int) -> tuple[int, int]:
        """Token range [start, stop) of shard i; the last one may be short."""
        start = i * self.shard_tokens
        return start, min(start + self.shard_tokens, self.n_tokens)

    @property
    def schema_version(self) -> int:
        """The version it is written with: 3 with the attention array, else the dtype's
        (so a lenspipe that predates an array refuses the store by version)."""
        return 3 if P.ATTENTION.name in self.positions else self.spec.schema_version

    def value_arrays(self) -> list[ValueArray]:
        """The arrays of stored values, each sharded by tokens with all its rows in a shard:
        every position's states, and (8-bit dtypes) their row scales."""
        out = []
        for name in self.positions:
            pos = P.POSITIONS[name]
            out.append(ValueArray(pos.array, name, pos.n_states(self.n_layers), False))
            if self.spec.scaled:
                out.append(ValueArray(pos.scale_array, name, pos.n_states(self.n_layers), True))
        return out

    def bytes_per_token(self) -> int:
        """Uncompressed bytes of one token: every position's rows (+ a float32 scale per row)."""
        return sum(a.rows * a.row_bytes(self) for a in self.value_arrays())


@dataclasses.dataclass(frozen=True)
class ValueArray:
    """One array of stored values: a position's states (rows, n_tokens, d_model) in the
    storage dtype, or their per-row scales (rows, n_tokens) float32."""

    name: str
    position: str
    rows: int
    is_scale: bool

    def shape(self, p: StoreParams, n_tokens: int | None = None) -> tuple[int, ...]:
        n = p.n_tokens if n_tokens is None else n_tokens
        return (self.rows, n) if self.is_scale else (self.rows, n, p.d_model)

    def dtype(self, p: StoreParams) -> np.dtype:
        return SCALE_DTYPE if self.is_scale else p.spec.stored

    def row_bytes(self, p: StoreParams) -> int:
        return SCALE_DTYPE.itemsize if self.is_scale else p.d_model * p.spec.stored.itemsize

    def shard_file(self, i: int) -> str:
        """Shard i's file, relative to the store root (zarr v3's default chunk keys)."""
        return f"{self.name}/c/0/{i}" if self.is_scale else f"{self.name}/c/0/{i}/0"

    @property
    def what(self) -> str:
        """How verify names one of its rows: ``layer`` (of resid), ``scales of layer``,
        ``attention layer``, ``scales of attention layer``."""
        return f"{'scales of ' if self.is_scale else ''}{P.POSITIONS[self.position].layer_word}"


def params_from_attrs(attrs: dict) -> StoreParams:
    return StoreParams(**attrs["params"])


def check_schema(attrs: dict, where: str) -> None:
    if attrs.get("format") != FORMAT:
        raise StoreError(
            f"{where} is a zarr group but not a lenspipe activation store "
            f"(attribute format is {attrs.get('format')!r}, expected {FORMAT!r})"
        )
    version = attrs.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise StoreError(
            f"store schema version {version}, this lenspipe reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; upgrade lenspipe or re-extract ({where})"
        )


def array_names(p: StoreParams) -> tuple[str, ...]:
    """The store's arrays, each sharded by tokens: every shard has one file in each
    (resid, tokens, then the rest of :meth:`StoreParams.value_arrays`)."""
    values = [a.name for a in p.value_arrays()]
    return (values[0], "tokens", *values[1:])


def shard_files(p: StoreParams, i: int) -> list[str]:
    """The files of shard i, relative to the store root (zarr v3's default chunk keys)."""
    keys = {a.name: a.shard_file(i) for a in p.value_arrays()} | {"tokens": f"tokens/c/{i}"}
    return [keys[name] for name in array_names(p)]


def record_name(i: int) -> str:
    return f"{PROGRESS_DIR}/shard-{i:06d}.json"


def _array_digest(a: np.ndarray) -> str:
    # xxh3-128 rather than sha256: these checksums guard against corruption, not tampering,
    # and sha256 (~0.5 GB/s) cost as much as the whole shard write; xxh3 runs at memory speed.
    return xxhash.xxh3_128_hexdigest(memoryview(np.ascontiguousarray(a)).cast("B"))


def shard_checksums(
    resid: np.ndarray, tokens: np.ndarray, scale: np.ndarray | None = None, **others: np.ndarray
) -> dict[str, Any]:
    """Checksums of the stored bytes of one shard: per layer (resid (L+1, n, d)), tokens,
    per layer of the scales (scale (L+1, n)) of a scaled store, and per row of the other
    value arrays (``others`` by name: attn (L, n, d), attn_scale (L, n))."""
    sums = {"resid_xxh3": [_array_digest(layer) for layer in resid], "tokens_xxh3": _array_digest(tokens)}
    for name, values in ({"scale": scale} | others).items():
        if values is not None:
            sums[f"{name}_xxh3"] = [_array_digest(row) for row in values]
    return sums


def checksums_of(values: dict[str, np.ndarray], tokens: np.ndarray) -> dict[str, Any]:
    """:func:`shard_checksums` of a shard's value arrays given by name (resid, scale, attn, ...)."""
    others = dict(values)
    return shard_checksums(others.pop("resid"), tokens, others.pop("scale", None), **others)
