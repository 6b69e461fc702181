"""The activation store's writer: whole shards only, one writer, resumable.

Zarr 3 writes a shard by reading the existing shard back, merging, and re-encoding all of
it, and concurrent partial writes to one shard silently lose data; so the writer buffers
incoming batches and only ever writes whole shards, one writer per store (an flock), and
records each shard, in order, only once it is durable. The layout is in
:mod:`pipeline.store.layout`; the arrays are created by :mod:`pipeline.store.arrays`.

The caller casts (or, for an 8-bit dtype, quantises) each batch straight into one of two
shard buffers; the shard pipeline (:mod:`pipeline.store.shards`) writes full shards, makes
them durable and records them on background threads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr

from .. import positions as P
from ..errors import StoreError
from ..provenance import acquire_lock, now_utc, sha256_json, write_json_atomic
from . import arrays, engine
from .encoding import cast_into, check_finite
from .layout import COMPLETE_NAME, LOCK_NAME, PROGRESS_DIR, StoreParams, array_names, record_name, shard_files
from .location import Location
from .manifest import write_manifest
from .shards import ShardBuffers, ShardPipeline


def _tensor(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A batch of states as a floating-point tensor, on the device it is on."""
    if isinstance(values, np.ndarray) and not values.flags.writeable:
        values = values.copy()  # torch warns on read-only numpy memory
    x = torch.as_tensor(values).detach()
    return x if x.is_floating_point() else x.float()


#: Puts tokens [i, j) of a batch into a shard's buffers at offset ``at``.
_Put = Callable[[ShardBuffers, int, int, int], None]


class StoreWriter:
    """Writes one store, whole shards only, resumably; see :meth:`open`.

    Use as a context manager: a clean exit finalizes, an exception leaves the store
    incomplete but keeps every durably written shard for a later resume.
    """

    def __init__(
        self,
        root: Path,
        params: StoreParams,
        group: zarr.Group,
        lock_fd: int,
        records: list[dict],
        already_complete: bool,
        background: bool,
    ):
        self.root, self.params, self._group, self._lock_fd = root, params, group, lock_fd
        self._shards = ShardPipeline(root, params, group, records, background)
        self._records = records  # the pipeline appends each shard's record once it is durable
        self.already_complete = already_complete
        self.resume_token = min(len(records) * params.shard_tokens, params.n_tokens)
        self._pos = self.resume_token  # next token index to receive
        self._buffers: list[ShardBuffers | None] = [None, None]
        self._which = 0
        self._background = background
        self._closed = False

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        n_layers: int,
        d_model: int,
        n_tokens: int,
        seq_len: int,
        dtype: str = "bfloat16",
        shard_tokens: int,
        chunk_tokens: int,
        compression: str = "zstd",
        level: int = 3,
        positions: tuple[str, ...] | list[str] = P.DEFAULT,
        provenance: dict,
        background: bool = True,
    ) -> StoreWriter:
        """Create the store at ``path``, or resume it if it was interrupted.

        Resuming needs identical parameters and provenance (else StoreError). A store that
        is already complete opens with ``already_complete=True`` and ``resume_token ==
        n_tokens``: nothing to write, finalize() is a no-op, write() raises. A second writer
        on the same store raises StoreError.
        """
        params = StoreParams(
            n_layers,
            d_model,
            n_tokens,
            seq_len,
            dtype,
            shard_tokens,
            chunk_tokens,
            compression,
            level,
            tuple(positions),
        )
        params.validate()
        fingerprint = arrays.fingerprint(params, provenance)
        root = Path(path).absolute()
        arrays.refuse_foreign_dir(root)
        root.mkdir(parents=True, exist_ok=True)
        lock_fd = acquire_lock(root / LOCK_NAME, f"the store at {root}", StoreError)
        try:
            with engine.for_location(local_dir=True):
                return cls._open(root, params, provenance, fingerprint, lock_fd, background)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open(
        cls, root: Path, params: StoreParams, provenance: dict, fingerprint: str, lock_fd: int, background: bool
    ) -> StoreWriter:
        if (root / "zarr.json").exists():
            group = zarr.open_group(str(root), mode="r+", zarr_format=3, use_consolidated=False)
            arrays.check_resumable(root, group.attrs.asdict(), params, provenance)
        else:
            group = zarr.create_group(str(root), attributes=arrays.initial_attrs(params, provenance, fingerprint))
        arrays.ensure_arrays(group, params)
        loc = Location(root)
        complete = loc.read_json(COMPLETE_NAME) is not None and group.attrs.get("complete") is True
        records = loc.load_records(params)
        with engine.for_location(local_dir=True, fill_ok=arrays.own_fill_values(group, params)):
            writer = cls(root, params, group, lock_fd, records, complete, background)
        if not complete:
            writer._discard_unrecorded()
        return writer

    # -- appending ------------------------------------------------------------------

    def write(
        self,
        resid: torch.Tensor | np.ndarray,
        tokens: torch.Tensor | np.ndarray,
        attention: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Append a batch at the current position: resid (n_layers+1, n, d_model), tokens (n,)
        and, in a store of the attention position, attention (n_layers, n, d_model)."""
        self._check_writable()
        states = {P.BLOCK.name: _tensor(resid)}  # (rows, n, d), still on its device
        if attention is not None:
            states[P.ATTENTION.name] = _tensor(attention)
        tokens = torch.as_tensor(tokens).cpu().numpy()  # (n,)
        shapes = {P.POSITIONS[name].array: tuple(x.shape) for name, x in states.items()}
        n = self._check_batch(shapes, tokens)
        if n == 0:
            return
        dtype = self.params.dtype
        for name, x in states.items():
            check_finite(x, dtype, self._pos, self.params.seq_len, P.POSITIONS[name].layer_word)
        targets = [(P.POSITIONS[name], x) for name, x in states.items()]

        def put(bufs: ShardBuffers, at: int, i: int, j: int) -> None:
            for pos, x in targets:
                scale = bufs.values.get(pos.scale_array)
                cast_into(
                    bufs.values[pos.array][:, at : at + j - i],
                    x[:, i:j],
                    dtype,
                    None if scale is None else scale[:, at : at + j - i],
                )

        self._append(n, tokens.astype(np.int32), put)

    def write_stored(
        self, resid: np.ndarray, tokens: np.ndarray, scale: np.ndarray | None = None, **others: np.ndarray
    ) -> None:
        """Append a batch of values already in the storage dtype, as another store holds them
        (an HDF5 export's import): resid (n_layers+1, n, d_model), tokens (n,), for a scaled
        dtype scale (n_layers+1, n) float32, and the store's other value arrays by name
        (attn (n_layers, n, d_model), attn_scale (n_layers, n)). Copied bit for bit, after a
        check that they are values a writer stores (finite, scales > 0)."""
        self._check_writable()
        p, spec = self.params, self.params.spec
        given = {
            name: np.asarray(a) for name, a in ({"resid": resid, "scale": scale} | others).items() if a is not None
        }
        tokens = np.asarray(tokens)
        arrays = p.value_arrays()
        resid, scale = given.get("resid"), given.get("scale")
        if resid is None or resid.dtype != spec.stored or (scale is None) == spec.scaled:
            raise StoreError(
                f"stored values of a {spec.name} store are {spec.stored}"
                + (" with float32 row scales" if spec.scaled else " without scales")
                + f", got {None if resid is None else resid.dtype}"
                + ("" if scale is None else " with scales")
            )
        if sorted(given) != sorted(a.name for a in arrays) or any(
            given[a.name].dtype != spec.stored for a in arrays if not a.is_scale
        ):
            raise StoreError(
                f"stored values of a {spec.name} store of positions {list(p.positions)} are "
                f"{', '.join(f'{a.name} ({a.dtype(p)})' for a in arrays)}; got "
                f"{', '.join(f'{k} ({v.dtype})' for k, v in sorted(given.items()))}"
            )
        n = self._check_batch({a.name: given[a.name].shape for a in arrays}, tokens)
        given = {a.name: given[a.name].astype(np.float32, copy=False) if a.is_scale else given[a.name] for a in arrays}
        if not all(
            (np.isfinite(given[a.name]) & (given[a.name] > 0)).all() if a.is_scale else spec.valid(given[a.name])
            for a in arrays
        ):
            raise StoreError(
                f"stored values at token {self._pos} hold inf/nan (or invalid scales); the source is damaged"
            )

        def put(bufs: ShardBuffers, at: int, i: int, j: int) -> None:
            for name, values in given.items():
                bufs.values[name][:, at : at + j - i] = values[:, i:j]

        self._append(n, tokens.astype(np.int32), put)

    def _check_writable(self) -> None:
        if self.already_complete:
            raise StoreError(f"the store at {self.root} is already complete; nothing to write")
        if self._closed or self._shards.broken:
            raise StoreError(f"this writer for {self.root} is closed or failed; reopen it to resume")

    def _check_batch(self, shapes: dict[str, tuple[int, ...]], tok: np.ndarray) -> int:
        """The batch's token count, after checking the shape of each array given (by name:
        resid, attn, and any scales) and of the tokens."""
        p = self.params
        states = {P.POSITIONS[name].array: P.POSITIONS[name] for name in p.positions}
        missing = sorted(set(states) - set(shapes))
        if missing or set(shapes) - {a.name for a in p.value_arrays()}:
            raise StoreError(
                f"a batch of this store holds {', '.join(states)} (positions {list(p.positions)}); "
                f"got {', '.join(shapes)}" + (" (extract with these positions, or write them)" if missing else "")
            )
        n = shapes["resid"][1] if len(shapes["resid"]) > 1 else -1
        for name, shape in shapes.items():
            a = next(a for a in p.value_arrays() if a.name == name)
            want = a.shape(p, n)
            if tuple(shape) != want:
                want_text = str(want).replace(str(n), "n") if n >= 0 else str(want)
                raise StoreError(f"{name} batch has shape {tuple(shape)}, expected {want_text}")
        if tok.shape != (n,) or not np.issubdtype(tok.dtype, np.integer):
            raise StoreError(f"tokens batch must be ({n},) integers, got {tok.shape} {tok.dtype}")
        if n and (tok.min() < 0 or tok.max() > np.iinfo(np.int32).max):
            raise StoreError("token ids must fit in int32 and be non-negative")
        if self._pos + n > p.n_tokens:
            raise StoreError(f"batch of {n} tokens at position {self._pos} runs past the store's n_tokens={p.n_tokens}")
        return n

    def _append(self, n: int, toks: np.ndarray, put: _Put) -> None:
        """Tokens [0, n) of a batch into the shard buffers through ``put``, shard by shard;
        each shard is submitted as it fills."""
        self._shards.poll()
        done = 0
        while done < n:
            shard = self._pos // self.params.shard_tokens
            start, stop = self.params.shard_span(shard)
            take = min(n - done, stop - self._pos)
            bufs = self._current_buffers()
            at = self._pos - start
            put(bufs, at, done, done + take)
            bufs.tokens[at : at + take] = toks[done : done + take]
            self._pos += take
            done += take
            if self._pos == stop:
                self._shards.submit(shard, bufs.head(stop - start))
                if self._background:
                    self._which ^= 1

    def _current_buffers(self) -> ShardBuffers:
        # Two shard buffers alternate: one being filled, one being written in the background.
        if self._buffers[self._which] is None:
            self._buffers[self._which] = ShardBuffers.empty(self.params)
        return self._buffers[self._which]

    def adopt_shard(self, src_root: Path, src_shard: int, record: dict) -> None:
        """Take a finished shard of another store with the same layout as the next shard.

        Its files are hard-linked (copied across file systems) and its record renumbered;
        the checksums stay, so verify re-checks the data against what its writer recorded.
        Used to assemble extraction parts; each shard still had exactly one writer.
        """
        self._check_writable()
        p = self.params
        shard = self._pos // p.shard_tokens
        start, stop = p.shard_span(shard)
        if self._pos != start or record["stop"] - record["start"] != stop - start:
            raise StoreError(
                f"shard {src_shard} of {src_root} ({record['stop'] - record['start']} tokens) "
                f"does not fit shard {shard} of {self.root} ({stop - start} tokens)"
            )
        for src_name, dst_name in zip(shard_files(p, src_shard), shard_files(p, shard)):
            src, dst = Path(src_root) / src_name, self.root / dst_name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        rec = {**record, "shard": shard, "start": start, "stop": stop, "adopted_from": f"{src_root}#{src_shard}"}
        write_json_atomic(self.root / record_name(shard), rec)
        self._records.append(rec)
        self._pos = stop

    # -- resume / finish --------------------------------------------------------------

    def _discard_unrecorded(self) -> None:
        """Delete leftovers of shards not recorded as done, so they are written from scratch.

        Zarr reads an existing shard back before overwriting it; a stale or torn one would
        cost a read or fail to parse. Temp files of a killed write (zarr's *.partial,
        TensorStore's *.__lock, our .*.tmp) go too.
        """
        for shard in range(len(self._records), self.params.n_shards):
            for name in shard_files(self.params, shard):
                (self.root / name).unlink(missing_ok=True)
            (self.root / record_name(shard)).unlink(missing_ok=True)
        leftovers = [(name, pattern) for name in array_names(self.params) for pattern in ("*.partial", "*.__lock")]
        for sub, pattern in [*leftovers, (PROGRESS_DIR, ".*.tmp")]:
            for leftover in (self.root / sub).rglob(pattern):
                leftover.unlink(missing_ok=True)

    def finalize(self) -> None:
        """Flush, record checksums, mark complete (COMPLETE last), release the lock."""
        if self._closed:
            return
        try:
            if not self.already_complete:
                self._finish()
        except BaseException:
            self.abort()
            raise
        self._release()

    def close(self) -> None:
        self.finalize()

    def _finish(self) -> None:
        p = self.params
        if self._shards.broken:
            raise StoreError(f"an earlier shard write to {self.root} failed; reopen to resume")
        if self._pos != p.n_tokens:
            raise StoreError(
                f"finalize called after {self._pos} of {p.n_tokens} tokens; the "
                f"store at {self.root} stays incomplete (resumable)"
            )
        self._shards.collect(everything=True)
        if [r["shard"] for r in self._records] != list(range(p.n_shards)):
            raise StoreError(
                f"progress records under {self.root / PROGRESS_DIR} were changed "
                "while writing; delete the store and extract again"
            )
        finished = now_utc()
        self._group.update_attributes({"complete": True, "finished": finished})
        arrays.consolidate(self.root)
        write_manifest(self.root, self._shards.known_digests())
        write_json_atomic(
            self.root / COMPLETE_NAME,
            {
                "n_tokens": p.n_tokens,
                "n_shards": p.n_shards,
                "finished": finished,
                "fingerprint": self._group.attrs["fingerprint"],
                "records_sha256": sha256_json(self._records),
            },
        )

    def abort(self) -> None:
        """Stop without marking complete; shards already written stay for a resume."""
        if self._closed:
            return
        try:
            with contextlib.suppress(Exception):
                self._shards.collect(everything=True)  # let the in-flight shards land: fewer to redo
        finally:
            self._release()

    def _release(self) -> None:
        self._closed = True
        self._shards.shutdown()
        self._buffers = [None, None]
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    def __del__(self) -> None:
        # A dropped writer (as after a crash) must not keep the lock for the process' life.
        if getattr(self, "_lock_fd", -1) >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
