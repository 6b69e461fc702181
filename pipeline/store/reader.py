"""Reading a store: :func:`open_store` and :class:`ActivationStore` (values as float32 tensors).

The layout is in :mod:`pipeline.store.layout`; a store is reached through a
:class:`~pipeline.store.location.Location` (local directory, .zip, or URL).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .. import positions as P
from ..errors import StoreError
from . import engine
from .decode import _decode_block, decode, decode_bf16, decode_into, to_tensor  # noqa: F401 (re-exported)
from .dtypes import SCALE_ARRAY
from .layout import COMPLETE_NAME, check_schema, params_from_attrs
from .location import DAMAGED_ADVICE, Location, read_failure

if TYPE_CHECKING:  # torch takes seconds to import: `lenspipe info` and verify never need it
    import torch


# ---------------------------------------------------------------- opening


def open_store(path_or_url: str | os.PathLike, *, allow_incomplete: bool = False) -> ActivationStore:
    """Open a store for reading: a local path or an fsspec URL (file://, https://, s3://...)."""
    if not _is_url(path_or_url):
        _check_local(os.path.abspath(path_or_url))
    loc = Location(path_or_url)
    with engine.for_location(local_dir=not (loc.is_url or loc.is_zip)):
        return _open(loc, allow_incomplete)


def _open(loc: Location, allow_incomplete: bool) -> ActivationStore:
    where = loc.zarr_store
    try:
        # use_consolidated=None: one metadata request when finalize consolidated it.
        group = zarr.open_group(
            loc.zarr_target(), mode="r", zarr_format=3, use_consolidated=None, storage_options=loc.options or None
        )
        attrs = group.attrs.asdict()
    except Exception as e:  # zarr's error types vary by store backend
        raise read_failure(
            where, e, "not a lenspipe activation store (no readable zarr group: its zarr.json is missing or damaged) at"
        ) from e
    check_schema(attrs, where)
    complete = attrs.get("complete") is True and loc.read_json(COMPLETE_NAME) is not None
    if not complete and loc.is_zip:  # export verifies first: a zip without the marker is damaged
        raise StoreError(f"{where} holds no valid completion marker ({COMPLETE_NAME}); {DAMAGED_ADVICE}")
    if not complete and not allow_incomplete:
        raise StoreError(
            f"the store at {where} is incomplete (extraction was interrupted or is "
            "still running); re-run extract to resume it, or pass "
            "allow_incomplete=True to read the shards written so far"
        )
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
        raise StoreError(
            f"{where} is an HDF5 export; lenspipe reads a store as zarr (a directory, "
            f"or a .zip export in place): rebuild one with `lenspipe import {where} "
            f"STORE` (`lenspipe verify {where}` checks the file)"
        )
    raise StoreError(
        f"{where} is a file, not an activation store (a zarr directory, or a .zip written by lenspipe export)"
    )


def is_hdf5_file(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    except OSError:
        return False  # unreadable: the caller's own open says why


#: Reads go in token pieces of at most this size, through TensorStore or zarr alike
#: (``ActivationStore._read_layers``; benchmarks/RESULTS.md, fourth and fifth rounds).
READ_TOKENS = 1024
#: Pieces in flight while one is decoded. One-layer reads through TensorStore touch only
#: 2 inner chunks a piece: with one piece ahead its 2 threads idled between pieces, and
#: zstd one-layer reads ran ~1.5x slower than with two (RESULTS.md, fifth round).
READ_AHEAD = 2


class ActivationStore:
    """Read access to a store; values come back as float32 whatever the storage dtype."""

    def __init__(self, group: zarr.Group, attrs: dict, loc: Location, complete: bool):
        self.attrs = attrs
        self.provenance: dict = attrs["provenance"]
        self.params = params_from_attrs(attrs)
        self.n_layers, self.d_model = self.params.n_layers, self.params.d_model
        self.n_tokens, self.seq_len = self.params.n_tokens, self.params.seq_len
        self.dtype: str = self.params.dtype
        self.is_complete = complete
        self.location = loc
        self.spec = self.params.spec
        self.positions: tuple[str, ...] = self.params.positions
        """The lens positions it holds (``pipeline.positions``): block, and maybe attention."""
        #: Every array of stored values by name: resid (L+1, n_tokens, d) and attn (L, n_tokens,
        #: d) in the storage dtype, scale and attn_scale (rows, n_tokens) float32.
        self.value_arrays: dict[str, zarr.Array] = {a.name: group[a.name] for a in self.params.value_arrays()}
        self._tokens = group["tokens"]  # (n_tokens,) int32
        #: What a read of one position's values reads: its states, and their scales in a scaled dtype.
        self._states = {
            name: [self.value_arrays[a] for a in (pos.array, pos.scale_array) if a in self.value_arrays]
            for name, pos in P.POSITIONS.items()
            if name in self.positions
        }
        self._resid = self.value_arrays["resid"]
        self._scale = self.value_arrays.get(SCALE_ARRAY)  # None unless scaled
        self._value_arrays = self._states[P.BLOCK.name]
        #: engine.read_array's handles per position, opened on first use (False: none)
        self._ts_by_position: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"ActivationStore({self.location.zarr_store!r}, layers={self.n_layers + 1}, "
            f"tokens={self.n_tokens}, d_model={self.d_model}, dtype={self.dtype})"
        )

    @property
    def written_tokens(self) -> int:
        """Tokens durably written: n_tokens when complete, else the recorded shards' span."""
        if self.is_complete:
            return self.n_tokens
        records = self.location.load_records(self.params)
        return records[-1]["stop"] if records else 0

    def layers(
        self, layers: int | Sequence[int], start: int = 0, stop: int | None = None, position: str = "block"
    ) -> torch.Tensor:
        """(len(layers), n, d_model) float32, or (n, d_model) for one int layer: the block
        residual (layer l = the input of block l), or with ``position="attention"`` the
        residual inside block l after its attention sublayer (:meth:`attention`)."""
        import torch

        start, stop = self._token_range(start, stop)
        if isinstance(layers, (int, np.integer)):
            idx = [self._layer(layers, position)]
            return torch.from_numpy(
                self._read(lambda: self._read_layers(idx, start, stop, position)[0], start, stop)
            )  # (n, d)
        idx = [self._layer(i, position) for i in layers]
        return torch.from_numpy(self._read(lambda: self._read_layers(idx, start, stop, position), start, stop))

    def states(self, keys: Sequence[tuple[str, int]], start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(len(keys), n, d_model) float32: the lens positions ``keys`` = (position, layer), in
        the order given, one read per position (block keys only: one :meth:`layers` read)."""
        import torch

        by_position = {}
        for i, (position, layer) in enumerate(keys):
            by_position.setdefault(position, []).append((i, layer))
        if len(by_position) == 1:
            ((position, rows),) = by_position.items()
            return self.layers([layer for _, layer in rows], start, stop, position)
        out = None
        for position, rows in by_position.items():
            x = self.layers([layer for _, layer in rows], start, stop, position)  # (k, n, d)
            if out is None:
                out = torch.empty((len(keys), *x.shape[1:]), dtype=x.dtype)
            out[[i for i, _ in rows]] = x
        return out

    def attention(self, layers: int | Sequence[int], start: int = 0, stop: int | None = None) -> torch.Tensor:
        """:meth:`layers` at the attention position: inside block l, after its attention."""
        return self.layers(layers, start, stop, position=P.ATTENTION.name)

    def _read_layers(self, idx: list[int], start: int, stop: int, position: str = "block") -> np.ndarray:
        """(k, n, d) float32 values of the layers ``idx``, decoded into one array.

        Reads go in pieces of at most READ_TOKENS tokens (cut at multiples of it), the next
        READ_AHEAD pieces' reads in flight while one is decoded straight into the output:
        reading and decoding overlap (TensorStore, zarrs and numpy all release the GIL), and
        no undecoded copy of the whole range is made. A complete store in a local directory
        is read through TensorStore (:func:`engine.read_array`), any other through zarr.
        A scaled store's scales are read beside the values, piece by piece, alike."""
        out = np.empty((len(idx), stop - start, self.d_model), np.float32)
        cuts = [start, *range((start // READ_TOKENS + 1) * READ_TOKENS, stop, READ_TOKENS), stop]
        pieces = list(zip(cuts, cuts[1:]))
        arrays = self._position_arrays(position)
        handles = self._tensorstore(position)
        # Basic slices only: zarr 3.1's orthogonal selection (`oindex`) measured ~30x
        # slower than a slice over the same shard. Both read only the chosen layers' chunks.
        if len(idx) > 1 and idx == list(range(idx[0], idx[0] + len(idx))):
            layers = slice(idx[0], idx[0] + len(idx))
            if handles is None:
                self._zarr_range(arrays, layers, pieces, out)
            else:
                self._pipelined(
                    pieces, lambda a, b: _Reads([h[layers, a:b].read() for h in handles]), lambda a, b: out[:, a:b]
                )
            return out
        for i, layer in enumerate(idx):
            if handles is None:
                self._decode(self._stored(arrays, layer, start, stop), out[i])
            else:
                self._pipelined(
                    pieces,
                    lambda a, b, layer=layer: _Reads([h[layer, a:b].read() for h in handles]),
                    lambda a, b, i=i: out[i, a:b],
                )
        return out

    @staticmethod
    def _stored(arrays: list, layers: int | slice, a: int, b: int) -> list[np.ndarray]:
        """The stored values of ``layers`` x tokens [a, b) (and their scales) of one
        position's ``arrays``, through zarr."""
        return [arr[layers, a:b] for arr in arrays]

    def _decode(self, stored: list[np.ndarray], out: np.ndarray) -> None:
        decode_into(stored[0], out, self.spec, stored[1] if len(stored) > 1 else None)

    def _tensorstore(self, position: str = "block") -> list | None:
        """TensorStore's handles on one position's arrays (``resid`` and ``scale``, or
        ``attn`` and ``attn_scale``) of a complete store in a local directory, opened on first
        use; None where reads go through zarr (a URL, a .zip, an incomplete store, or
        ``engine.configure(tensorstore_reads=False)``).

        Why: zarr-python spends ~0.3 ms of indexing on each inner chunk, which held one-layer
        reads at ~0.5x of raw file reads (TensorStore: ~1x); and with zstd, TensorStore read
        ranges of all layers 1.2-1.35x faster than zarrs (benchmarks/RESULTS.md, fourth and
        fifth rounds)."""
        if position not in self._ts_by_position:
            local = self.is_complete and not (self.location.is_url or self.location.is_zip)
            handles = (
                [
                    engine.read_array(os.path.join(self.location.zarr_store, arr.basename))
                    for arr in self._states[position]
                ]
                if local
                else [None]
            )
            self._ts_by_position[position] = False if None in handles else handles
        return None if self._ts_by_position[position] is False else self._ts_by_position[position]

    @property
    def _ts_handles(self) -> Any:
        """The block position's TensorStore handles: None before a read, False where reads go
        through zarr."""
        return self._ts_by_position.get(P.BLOCK.name)

    def _zarr_range(self, arrays: list, layers: slice, pieces: list[tuple[int, int]], out: np.ndarray) -> None:
        """Layers ``layers`` into ``out`` (k, n, d), through zarr: it read a whole shard of
        all layers ~3.4x slower than the same bytes in 1,024-token pieces."""
        if len(pieces) == 1:  # no second thread for a short read
            self._decode(self._stored(arrays, layers, *pieces[0]), out)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, "lenspipe-read") as pool:
            self._pipelined(
                pieces, lambda a, b: pool.submit(self._stored, arrays, layers, a, b), lambda a, b: out[:, a:b]
            )

    def _pipelined(self, pieces: list[tuple[int, int]], submit, out_of) -> None:
        """Decode each piece into ``out_of(a, b)`` (offsets from the first piece's start)
        while ``submit(a, b)`` (a future of its stored arrays) reads the next READ_AHEAD."""
        origin = pieces[0][0]
        pending = collections.deque(submit(a, b) for a, b in pieces[:READ_AHEAD])
        for i, (a, b) in enumerate(pieces):
            stored = pending.popleft().result()
            if i + READ_AHEAD < len(pieces):
                pending.append(submit(*pieces[i + READ_AHEAD]))
            self._decode(stored, out_of(a - origin, b - origin))

    def tokens(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        import torch

        start, stop = self._token_range(start, stop)
        raw = self._read(lambda: self._tokens[start:stop], start, stop)  # (n,) int32
        return torch.from_numpy(raw.astype(np.int64))

    def dask(self, position: str = "block"):
        """Lazy (n_layers+1, n_tokens, d_model) float32 dask array, one block per inner chunk
        (``position="attention"``: (n_layers, n_tokens, d_model))."""
        import dask.array as da  # ~2 s to import: only for the callers that want it

        values, *scales = self._position_arrays(position)
        raw = da.from_zarr(values, chunks=values.chunks)
        if not scales:
            return raw.map_blocks(_decode_block, self.spec, dtype=np.float32)
        scale = da.from_zarr(scales[0], chunks=scales[0].chunks)[:, :, None]  # blocks aligned with raw's
        return da.map_blocks(_decode_block, raw, self.spec, scale, dtype=np.float32)

    def _position_arrays(self, position: str) -> list:
        if position not in self._states:
            raise StoreError(
                f"the store at {self.location.zarr_store} holds positions {list(self.positions)}, not "
                f"{position!r}: extract it with extract.positions including {position!r}"
            )
        return self._states[position]

    def _layer(self, i: int, position: str = "block") -> int:
        self._position_arrays(position)
        n = P.POSITIONS[position].n_states(self.n_layers)
        if not -n <= int(i) < n:
            where = "" if position == P.BLOCK.name else f" at the {position} position"
            raise StoreError(f"layer {i} out of range: the store holds layers 0..{n - 1}{where}")
        return int(i) % n

    def _token_range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.n_tokens if stop is None else stop
        if not 0 <= start <= stop <= self.n_tokens:
            raise StoreError(f"token range [{start}, {stop}) outside the store's 0..{self.n_tokens}")
        return start, stop

    def _read(self, read, start: int, stop: int):
        missing = self.location.missing_shard(self.params, start, stop) if self.is_complete else None
        if missing:
            raise StoreError(f"{self.location.zarr_store}: shard file {missing} is missing or empty; {DAMAGED_ADVICE}")
        try:
            return read()
        except Exception as e:  # a decode failure is the data's problem, not a bug here
            raise read_failure(self.location.zarr_store, e, "cannot read") from e


class _Reads:
    """TensorStore's read futures of one piece (values, scales) as one future of a list."""

    def __init__(self, futures: list):
        self._futures = futures

    def result(self) -> list[np.ndarray]:
        return [f.result() for f in self._futures]


def check_store_model(store: ActivationStore, model_dir: Path) -> dict[str, Any]:
    """The model info of ``model_dir``, after checking the store was extracted from it."""
    from ..model.prepare import read_model_info

    info = read_model_info(model_dir)
    theirs = store.provenance.get("model", {}).get("weights_sha256")
    if theirs != info["weights_sha256"]:
        raise StoreError(
            f"the store {store.location.zarr_store} was extracted from model weights "
            f"{theirs}, but {model_dir} holds {info['weights_sha256']}: use the model the "
            "store was made from"
        )
    if store.d_model != info["d_model"] or store.n_layers != info["n_layers"]:
        raise StoreError("the store's d_model/n_layers do not match the model's")
    return info
