"""The activation store: every layer's residual stream for a packed corpus, in zarr v3.

Layout of a store directory (a zarr v3 group)::

    zarr.json            group attributes: format, schema_version, params, provenance, ...
    resid/               (n_layers+1, n_tokens, d_model); shard = (all layers, shard_tokens,
                         d_model), inner chunk = (1, chunk_tokens, d_model); bfloat16 is
                         stored as its raw bits in uint16 (attribute encoding=bfloat16-bits)
    tokens/              (n_tokens,) int32; one chunk per shard
    progress/shard-NNNNNN.json   one record per durably written shard (per-layer xxh3-128 checksum)
    writer.lock          flock'ed by the one writer
    COMPLETE             written last by finalize; readers refuse a store without it

The writer (:mod:`pipeline.store_writer`) only ever writes whole shards; verification
lives in :mod:`pipeline.store_verify`. This module holds the layout and the reader.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import dask.array as da
import fsspec
import numpy as np
import torch
import xxhash
import zarr

from pipeline.errors import StoreError

SCHEMA_VERSION = 1
FORMAT = "lenspipe-activations"
BF16_BITS = "bfloat16-bits"
COMPLETE_NAME = "COMPLETE"
LOCK_NAME = "writer.lock"
PROGRESS_DIR = "progress"

_STORED_NP = {"bfloat16": np.dtype("uint16"), "float16": np.dtype("float16"), "float32": np.dtype("float32")}
_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_COMPRESSIONS = ("zstd", "blosc-zstd", "none")


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

    def validate(self) -> None:
        for name in ("n_layers", "d_model", "n_tokens", "seq_len", "shard_tokens", "chunk_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise StoreError(f"store parameter {name} must be a positive integer, got {value!r}")
        if self.dtype not in _STORED_NP:
            raise StoreError(f"store dtype {self.dtype!r} is not one of {sorted(_STORED_NP)}")
        if self.compression not in _COMPRESSIONS:
            raise StoreError(f"store compression {self.compression!r} is not one of {_COMPRESSIONS}")
        if self.compression == "zstd" and not 1 <= self.level <= 22:
            raise StoreError(f"zstd level must be 1..22, got {self.level}")
        if self.compression == "blosc-zstd" and not 0 <= self.level <= 9:
            raise StoreError(f"blosc-zstd level must be 0..9, got {self.level}")
        for name, multiple_of in (("shard_tokens", "chunk_tokens"), ("shard_tokens", "seq_len"),
                                  ("n_tokens", "seq_len")):
            a, b = getattr(self, name), getattr(self, multiple_of)
            if a % b:
                raise StoreError(f"{name}={a} must be a multiple of {multiple_of}={b}")

    @property
    def n_shards(self) -> int:
        return -(-self.n_tokens // self.shard_tokens)

    def shard_span(self, i: int) -> tuple[int, int]:
        """Token range [start, stop) of shard i; the last one may be short."""
        start = i * self.shard_tokens
        return start, min(start + self.shard_tokens, self.n_tokens)


# ---------------------------------------------------------------- encoding / checksums

def _to_tensor(raw: np.ndarray, encoding: str | None) -> torch.Tensor:
    """Stored numpy values -> float32 tensor (bf16 bits are reinterpreted, not converted)."""
    raw = np.ascontiguousarray(raw)
    if encoding == BF16_BITS:
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(raw).float()


def _decode_block(block: np.ndarray, encoding: str | None) -> np.ndarray:
    """Numpy-only decode for dask: a bf16 is the top half of the float32 with the same bits."""
    if encoding == BF16_BITS:
        return (block.astype(np.uint32) << 16).view(np.float32)
    return block.astype(np.float32)


def _array_digest(a: np.ndarray) -> str:
    # xxh3-128 rather than sha256: these checksums guard against corruption, not tampering,
    # and sha256 (~0.5 GB/s) cost as much as the whole shard write; xxh3 runs at memory speed.
    return xxhash.xxh3_128_hexdigest(memoryview(np.ascontiguousarray(a)).cast("B"))


def shard_checksums(resid: np.ndarray, tokens: np.ndarray) -> dict[str, Any]:
    """Checksums of the stored bytes of one shard: per layer (resid (L+1, n, d)) and tokens."""
    return {"resid_xxh3": [_array_digest(layer) for layer in resid],
            "tokens_xxh3": _array_digest(tokens)}


def record_name(i: int) -> str:
    return f"{PROGRESS_DIR}/shard-{i:06d}.json"


# ---------------------------------------------------------------- locations (local or URL)

#: Seconds a remote store may stay silent (connect or read) before the read fails.
URL_TIMEOUT_ENV = "LENSPIPE_URL_TIMEOUT"
DEFAULT_URL_TIMEOUT = 60.0


def url_timeout() -> float:
    return float(os.environ.get(URL_TIMEOUT_ENV, DEFAULT_URL_TIMEOUT))


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options bounding how long a silent server can stall a read.

    fsspec's defaults wait minutes (HTTP) or retry for long (S3); a stalled read should
    fail with a message instead of hanging a Snakemake job until its runtime limit.
    """
    protocol = url.split("://", 1)[0]
    t = url_timeout()
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": t, "read_timeout": t, "retries": {"max_attempts": 2}}}
    return {}


def _timed_out(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, TimeoutError):
            return True
        e = e.__cause__ or e.__context__
    return False


#: What to do about a damaged store or export (every reader's damage message ends with it).
DAMAGED_ADVICE = ("the store may be corrupt or its copy incomplete (lenspipe verify checks it): "
                  "download it again or re-extract it")


def _read_failure(where: str, e: BaseException, what: str) -> StoreError:
    """A read failure as one message: a timeout says so, else the data may be damaged."""
    if _timed_out(e):
        return StoreError(f"reading {where} timed out (no answer within {url_timeout():g} s); check "
                          f"the network or the server, or raise {URL_TIMEOUT_ENV} (seconds)")
    return StoreError(f"{what} {where}: {e!r}; {DAMAGED_ADVICE}")


class _Location:
    """Where a store lives: a local path or an fsspec URL, for zarr and for sidecar JSON."""

    def __init__(self, path_or_url: str | os.PathLike):
        text = str(path_or_url)
        self.is_url = "://" in text
        self.zarr_store = text if self.is_url else os.path.abspath(text)
        self.options = storage_options(text) if self.is_url else {}
        self.is_zip = not self.is_url and text.endswith(".zip") and os.path.isfile(text)
        self._sizes: dict[str, int] | None = None  # a zip's member sizes, once needed
        if self.is_zip:  # a store exported with `lenspipe export --to zip`, read in place
            self.fs, self.root = _zip_fs(self.zarr_store), ""
        else:
            self.fs, self.root = fsspec.core.url_to_fs(self.zarr_store, **self.options)

    def zarr_target(self):
        """What zarr.open_group gets: a ZipStore for a .zip, else the path or URL."""
        return zarr.storage.ZipStore(self.zarr_store, mode="r") if self.is_zip else self.zarr_store

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}" if self.root else name

    def read_bytes(self, name: str) -> bytes | None:
        """A file of the store, or None if it does not exist."""
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None
        except Exception as e:  # a bad CRC in a zip, a network failure: the data's problem, not a bug
            raise _read_failure(f"{self.zarr_store}/{name}", e, "cannot read") from e

    def read_json(self, name: str) -> Any | None:
        data = self.read_bytes(name)
        if data is None:
            return None
        try:
            value = json.loads(data)
        except ValueError as e:
            raise StoreError(f"{self.zarr_store}/{name} is not valid JSON ({e}); {DAMAGED_ADVICE}") from e
        if not isinstance(value, dict):  # every sidecar is an object: anything else is damage
            raise StoreError(f"{self.zarr_store}/{name} is not a JSON object; {DAMAGED_ADVICE}")
        return value

    def load_records(self, params: StoreParams) -> list[dict]:
        """The contiguous prefix of shard records whose spans match the layout."""
        records = []
        for i in range(params.n_shards):
            rec = self.read_json(record_name(i))
            if rec is None or (rec.get("start"), rec.get("stop")) != params.shard_span(i):
                break
            records.append(rec)
        return records

    def missing_shard(self, params: StoreParams, start: int, stop: int) -> str | None:
        """The first shard file of tokens [start, stop) absent (or empty) in a local or zip store.

        zarr reads a missing or empty shard as zeros, silently: a copy cut short must fail
        instead. One stat per shard read (a dict lookup in a zip); remote stores are left
        to verify, which checks every file.
        """
        if self.is_url:
            return None
        if self.is_zip and self._sizes is None:
            self._sizes = {i.filename: i.file_size for i in self.fs.zip.infolist()}
        for i in range(start // params.shard_tokens, -(-stop // params.shard_tokens)):
            for name in (f"resid/c/0/{i}/0", f"tokens/c/{i}"):
                if not (self._sizes.get(name) if self.is_zip else _file_size(self.path(name))):
                    return name
        return None


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _zip_fs(path: str):
    """fsspec's view of a zip; a file that is no zip (truncated, damaged) is a StoreError."""
    import zipfile

    try:
        # skip_instance_cache: a re-downloaded file under the same name must be read anew.
        fs = fsspec.filesystem("zip", fo=path, skip_instance_cache=True)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise StoreError(f"{path} is not a readable zip archive ({e}): the download or copy is "
                         "truncated or damaged; download it again, or export it again with "
                         "lenspipe export STORE --to zip") from e
    return fs


def _check_schema(attrs: dict, where: str) -> None:
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{where} is a zarr group but not a lenspipe activation store "
                         f"(attribute format is {attrs.get('format')!r}, expected {FORMAT!r})")
    version = attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(f"store schema version {version}, this lenspipe reads {SCHEMA_VERSION}; "
                         f"upgrade lenspipe or re-extract ({where})")


def _params_from_attrs(attrs: dict) -> StoreParams:
    return StoreParams(**attrs["params"])


# ---------------------------------------------------------------- writer helpers

def open_store(path_or_url: str | os.PathLike, *, allow_incomplete: bool = False) -> "ActivationStore":
    """Open a store for reading: a local path or an fsspec URL (file://, https://, s3://...)."""
    if not _is_url(path_or_url):
        _check_local(os.path.abspath(path_or_url))
    loc = _Location(path_or_url)
    where = loc.zarr_store
    try:
        # use_consolidated=None: one metadata request when finalize consolidated it.
        group = zarr.open_group(loc.zarr_target(), mode="r", zarr_format=3, use_consolidated=None,
                                storage_options=loc.options or None)
        attrs = group.attrs.asdict()
    except Exception as e:  # zarr's error types vary by store backend
        raise _read_failure(where, e, "not a lenspipe activation store (no readable zarr group: its "
                            "zarr.json is missing or damaged) at") from e
    _check_schema(attrs, where)
    complete = attrs.get("complete") is True and loc.read_json(COMPLETE_NAME) is not None
    if not complete and loc.is_zip:  # export verifies first: a zip without the marker is damaged
        raise StoreError(f"{where} holds no valid completion marker ({COMPLETE_NAME}); {DAMAGED_ADVICE}")
    if not complete and not allow_incomplete:
        raise StoreError(f"the store at {where} is incomplete (extraction was interrupted or is "
                         "still running); re-run extract to resume it, or pass "
                         "allow_incomplete=True to read the shards written so far")
    try:
        return ActivationStore(group, attrs, loc, complete)
    except (KeyError, TypeError, ValueError) as e:
        # zarr.json parsed, but lacks what every store written by lenspipe has: damage, not a bug.
        raise StoreError(f"the metadata of the store at {where} is damaged ({e!r}); {DAMAGED_ADVICE}") from e


def _is_url(path_or_url: str | os.PathLike) -> bool:
    return "://" in str(path_or_url)


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _check_local(where: str) -> None:
    """A local store is a directory or an exported .zip; say what else the path is."""
    if os.path.isdir(where) or (where.endswith(".zip") and os.path.isfile(where)):
        return
    if not os.path.exists(where):
        raise StoreError(f"no activation store at {where} (no such directory); run the extract stage")
    if where.endswith((".h5", ".hdf5")) or is_hdf5_file(where):
        raise StoreError(f"{where} is an HDF5 export; lenspipe reads a store as zarr (a directory, "
                         f"or a .zip export in place): rebuild one with `lenspipe import {where} "
                         f"STORE` (`lenspipe verify {where}` checks the file)")
    raise StoreError(f"{where} is a file, not an activation store (a zarr directory, or a .zip "
                     "written by lenspipe export)")


def is_hdf5_file(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    except OSError:
        return False  # unreadable: the caller's own open says why


class ActivationStore:
    """Read access to a store; values come back as float32 whatever the storage dtype."""

    def __init__(self, group: zarr.Group, attrs: dict, loc: _Location, complete: bool):
        self.attrs = attrs
        self.provenance: dict = attrs["provenance"]
        self.params = _params_from_attrs(attrs)
        self.n_layers, self.d_model = self.params.n_layers, self.params.d_model
        self.n_tokens, self.seq_len = self.params.n_tokens, self.params.seq_len
        self.dtype: str = self.params.dtype
        self.is_complete = complete
        self.location = loc
        self._resid = group["resid"]  # (L+1, n_tokens, d) in the storage dtype
        self._tokens = group["tokens"]  # (n_tokens,) int32
        self._encoding = self._resid.attrs.get("encoding")

    def __repr__(self) -> str:
        return (f"ActivationStore({self.location.zarr_store!r}, layers={self.n_layers + 1}, "
                f"tokens={self.n_tokens}, d_model={self.d_model}, dtype={self.dtype})")

    @property
    def written_tokens(self) -> int:
        """Tokens durably written: n_tokens when complete, else the recorded shards' span."""
        if self.is_complete:
            return self.n_tokens
        records = self.location.load_records(self.params)
        return records[-1]["stop"] if records else 0

    def layers(self, layers: int | Sequence[int], start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(len(layers), n, d_model) float32, or (n, d_model) for one int layer."""
        start, stop = self._token_range(start, stop)
        if isinstance(layers, (int, np.integer)):
            raw = self._read(lambda: self._resid[self._layer(layers), start:stop, :], start, stop)  # (n, d)
        else:
            idx = [self._layer(i) for i in layers]
            raw = self._read(lambda: self._read_layers(idx, start, stop), start, stop)  # (k, n, d)
        return _to_tensor(raw, self._encoding)

    def _read_layers(self, idx: list[int], start: int, stop: int) -> np.ndarray:
        # Basic slices only: zarr 3.1's orthogonal selection (`oindex`) measured ~30x
        # slower than a slice over the same shard. Both read only the chosen layers' chunks.
        if not idx:
            return np.empty((0, stop - start, self.d_model), self._resid.dtype)
        if idx == list(range(idx[0], idx[0] + len(idx))):
            return self._resid[idx[0]:idx[0] + len(idx), start:stop, :]  # (k, n, d)
        return np.stack([self._resid[i, start:stop, :] for i in idx])  # (k, n, d)

    def tokens(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        start, stop = self._token_range(start, stop)
        raw = self._read(lambda: self._tokens[start:stop], start, stop)  # (n,) int32
        return torch.from_numpy(raw.astype(np.int64))

    def dask(self) -> da.Array:
        """Lazy (n_layers+1, n_tokens, d_model) float32 view, one block per inner chunk."""
        raw = da.from_zarr(self._resid, chunks=self._resid.chunks)
        return raw.map_blocks(_decode_block, self._encoding, dtype=np.float32)

    def _layer(self, i: int) -> int:
        n = self.n_layers + 1
        if not -n <= int(i) < n:
            raise StoreError(f"layer {i} out of range: the store holds layers 0..{n - 1}")
        return int(i) % n

    def _token_range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.n_tokens if stop is None else stop
        if not 0 <= start <= stop <= self.n_tokens:
            raise StoreError(f"token range [{start}, {stop}) outside the store's 0..{self.n_tokens}")
        return start, stop

    def _read(self, read, start: int, stop: int):
        missing = self.location.missing_shard(self.params, start, stop) if self.is_complete else None
        if missing:
            raise StoreError(f"{self.location.zarr_store}: shard file {missing} is missing or empty; "
                             f"{DAMAGED_ADVICE}")
        try:
            return read()
        except Exception as e:  # a decode failure is the data's problem, not a bug here
            raise _read_failure(self.location.zarr_store, e, "cannot read") from e


def verify(path_or_url: str | os.PathLike) -> dict:
    """Check a store end to end; see :func:`pipeline.store_verify.verify`."""
    from pipeline.store_verify import verify as _verify  # late: store_verify imports this module
    return _verify(path_or_url)


def measure_compression(path: str | os.PathLike) -> dict:
    """Bytes on disk for resid vs uncompressed; see :mod:`pipeline.store_verify`."""
    from pipeline.store_verify import measure_compression as _measure
    return _measure(path)

__all__ = ["SCHEMA_VERSION", "ActivationStore", "StoreParams", "StoreWriter", "measure_compression",  # noqa: F822
           "open_store", "shard_checksums", "verify"]


def __getattr__(name: str):
    # The writer lives in its own module; keep ``from pipeline.store import StoreWriter``.
    if name == "StoreWriter":
        from pipeline.store_writer import StoreWriter

        return StoreWriter
    raise AttributeError(f"module 'pipeline.store' has no attribute {name!r}")
