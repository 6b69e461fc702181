"""The activation store's writer: whole shards only, one writer, resumable.

Zarr 3 writes a shard by reading the existing shard back, merging, and re-encoding all of
it, and concurrent partial writes to one shard silently lose data; so the writer buffers
incoming batches and only ever writes whole shards, one writer per store (an flock), and
records each shard, in order, only once it is durable. The layout is in
:mod:`pipeline.store.layout`.

Where work runs, so that a GPU's extraction is not held up by it: the caller casts each
batch straight into one of two shard buffers; one thread writes full shards (TensorStore
encodes their chunks on its own threads); one fsyncs them and writes their records; a pool
hashes their files for SHA256SUMS. A shard's fsync, its hashing and the next shard's write
overlap.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ..errors import StoreError, disk_full, disk_full_message
from ..provenance import acquire_lock, now_utc, package_versions, sha256_json, write_json_atomic
from . import engine
from .encoding import FILL, TOKEN_FILL, cast_into, check_finite, compressors
from .layout import (BF16_BITS, COMPLETE_NAME, FORMAT, LOCK_NAME, PROGRESS_DIR, SCHEMA_VERSION,
                     STORED_NP, StoreParams, check_schema, record_name, shard_checksums)
from .location import Location
from .manifest import file_digest, write_manifest


def _create_arrays(group: zarr.Group, p: StoreParams) -> None:
    encoding = BF16_BITS if p.dtype == "bfloat16" else None
    group.create_array(
        "resid", shape=(p.n_layers + 1, p.n_tokens, p.d_model), dtype=STORED_NP[p.dtype],
        shards=(p.n_layers + 1, p.shard_tokens, p.d_model), chunks=(1, p.chunk_tokens, p.d_model),
        compressors=compressors(p.compression, p.level), fill_value=FILL[p.dtype],
        dimension_names=("layer", "token", "feature"),
        attributes={"encoding": encoding, "dtype": p.dtype}, overwrite=True)
    group.create_array(
        "tokens", shape=(p.n_tokens,), dtype="int32", chunks=(p.shard_tokens,),
        compressors=compressors(p.compression, p.level), fill_value=TOKEN_FILL,
        dimension_names=("token",), overwrite=True)


def _own_fill_values(group: zarr.Group, p: StoreParams) -> bool:
    """Whether the arrays have the fill values above (False: a store begun before them)."""
    resid, tokens = group["resid"].metadata.fill_value, group["tokens"].metadata.fill_value
    want = np.array(FILL[p.dtype], dtype=STORED_NP[p.dtype])
    same = np.array_equal(np.asarray(resid, want.dtype), want, equal_nan=want.dtype.kind == "f")
    return bool(same and int(tokens) == TOKEN_FILL)


def _initial_attrs(p: StoreParams, provenance: dict, fingerprint: str) -> dict:
    return {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "fingerprint": fingerprint,
        "params": dataclasses.asdict(p), "provenance": provenance, "dtype": p.dtype,
        "encoding": BF16_BITS if p.dtype == "bfloat16" else None, "d_model": p.d_model,
        "n_layers": p.n_layers, "n_tokens": p.n_tokens, "seq_len": p.seq_len,
        "package_versions": package_versions(), "created": now_utc(), "finished": None,
        "complete": False,
    }


def _fingerprint(p: StoreParams, provenance: dict) -> str:
    try:
        return sha256_json({"params": dataclasses.asdict(p), "provenance": provenance})
    except TypeError as e:
        raise StoreError(f"store provenance must be JSON-serialisable: {e}") from e


def _check_resumable(root: Path, attrs: dict, p: StoreParams, provenance: dict) -> None:
    check_schema(attrs, str(root))
    if attrs.get("fingerprint") == _fingerprint(p, provenance):
        return
    old = {**attrs.get("params", {}), **{f"provenance.{k}": v for k, v in attrs.get("provenance", {}).items()}}
    new = {**dataclasses.asdict(p), **{f"provenance.{k}": v for k, v in provenance.items()}}
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
             if old.get(k) != new.get(k)]
    raise StoreError(f"the store at {root} was written with different parameters "
                     f"({'; '.join(diffs) or 'fingerprint differs'}); delete the store or "
                     "change the output path")


def _refuse_foreign_dir(root: Path) -> None:
    if (root / "zarr.json").exists() or not root.exists():
        return
    if not root.is_dir():
        raise StoreError(f"{root} exists and is not a directory; choose another store path")
    foreign = sorted(p.name for p in root.iterdir() if p.name != LOCK_NAME)
    if foreign:
        raise StoreError(f"{root} exists and is not a lenspipe activation store (it holds "
                         f"{', '.join(foreign[:5])}); refusing to write into it; choose a new path")


def _acquire_lock(root: Path) -> int:
    return acquire_lock(root / LOCK_NAME, f"the store at {root}", StoreError)


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _consolidate(root: Path) -> None:
    # Consolidated metadata lets a remote open cost one request. Zarr warns that it is not
    # in the v3 spec, and that our sidecar files are not zarr nodes; both are expected.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata is currently", zarr.errors.ZarrUserWarning)
        warnings.filterwarnings("ignore", "Object at .* is not recognized", zarr.errors.ZarrUserWarning)
        zarr.consolidate_metadata(str(root))


# ---------------------------------------------------------------- the writer

class StoreWriter:
    """Writes one store, whole shards only, resumably; see :meth:`open`.

    Use as a context manager: a clean exit finalizes, an exception leaves the store
    incomplete but keeps every durably written shard for a later resume.
    """

    def __init__(self, root: Path, params: StoreParams, group: zarr.Group, lock_fd: int,
                 records: list[dict], already_complete: bool, background: bool):
        self.root, self.params, self._group, self._lock_fd = root, params, group, lock_fd
        cfg = {"write_empty_chunks": True}  # every shard is a file: fsync-able, deletable
        self._resid = group["resid"].with_config(cfg)
        self._resid_shards: Any = None  # engine.shard_writer's handle, opened on first use (False: none)
        self._tokens = group["tokens"].with_config(cfg)
        self._records = records
        self.already_complete = already_complete
        self.resume_token = min(len(records) * params.shard_tokens, params.n_tokens)
        self._pos = self.resume_token  # next token index to receive
        self._buffers: list[tuple[np.ndarray, np.ndarray] | None] = [None, None]
        self._which = 0
        self._pending: Future | None = None  # the shard being written
        self._syncing: collections.deque[Future] = collections.deque()  # written, being made durable
        self._sync_failed = False
        self._executor = ThreadPoolExecutor(1, "lenspipe-store") if background else None
        self._syncer = ThreadPoolExecutor(1, "lenspipe-fsync") if background else None
        # SHA256SUMS digests of the shard files, hashed while later shards are written
        # (finalize hashes only what is missing or changed: see write_manifest); one thread
        # per CPU, since one thread hashes ~1.3 GB/s, less than a GPU's extraction writes.
        self._hasher = ThreadPoolExecutor(engine.io_threads(), "lenspipe-sha256") if background else None
        self._digests: dict[Path, Future] = {}
        self._broken = False
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike, *, n_layers: int, d_model: int, n_tokens: int,
             seq_len: int, dtype: str = "bfloat16", shard_tokens: int, chunk_tokens: int,
             compression: str = "zstd", level: int = 3, provenance: dict,
             background: bool = True) -> "StoreWriter":
        """Create the store at ``path``, or resume it if it was interrupted.

        Resuming needs identical parameters and provenance (else StoreError). A store that
        is already complete opens with ``already_complete=True`` and ``resume_token ==
        n_tokens``: nothing to write, finalize() is a no-op, write() raises. A second writer
        on the same store raises StoreError.
        """
        params = StoreParams(n_layers, d_model, n_tokens, seq_len, dtype, shard_tokens,
                             chunk_tokens, compression, level)
        params.validate()
        fingerprint = _fingerprint(params, provenance)
        root = Path(path).absolute()
        _refuse_foreign_dir(root)
        root.mkdir(parents=True, exist_ok=True)
        lock_fd = _acquire_lock(root)
        try:
            with engine.for_location(local_dir=True):
                return cls._open(root, params, provenance, fingerprint, lock_fd, background)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open(cls, root: Path, params: StoreParams, provenance: dict, fingerprint: str, lock_fd: int,
              background: bool) -> "StoreWriter":
        if (root / "zarr.json").exists():
            group = zarr.open_group(str(root), mode="r+", zarr_format=3, use_consolidated=False)
            _check_resumable(root, group.attrs.asdict(), params, provenance)
        else:
            group = zarr.create_group(str(root), attributes=_initial_attrs(params, provenance, fingerprint))
        _ensure_arrays(group, params)
        loc = Location(root)
        complete = loc.read_json(COMPLETE_NAME) is not None and group.attrs.get("complete") is True
        records = loc.load_records(params)
        with engine.for_location(local_dir=True, fill_ok=_own_fill_values(group, params)):
            writer = cls(root, params, group, lock_fd, records, complete, background)
        if not complete:
            writer._discard_unrecorded()
        return writer

    # -- appending ------------------------------------------------------------------

    def write(self, resid: torch.Tensor | np.ndarray, tokens: torch.Tensor | np.ndarray) -> None:
        """Append a batch at the current position: resid (n_layers+1, n, d_model), tokens (n,)."""
        self._check_writable()
        if self._pending is not None and self._pending.done():
            self._collect()  # surface a background failure now, not one shard later
        if isinstance(resid, np.ndarray) and not resid.flags.writeable:
            resid = resid.copy()  # torch warns on read-only numpy memory
        x = torch.as_tensor(resid).detach()  # (L+1, n, d), still on its device
        if not x.is_floating_point():
            x = x.float()
        tokens = torch.as_tensor(tokens).cpu().numpy()  # (n,)
        n = self._check_batch(x, tokens)
        if n == 0:
            return
        check_finite(x, self.params.dtype, self._pos, self.params.seq_len)
        toks = tokens.astype(np.int32)  # (n,)
        done = 0
        while done < n:
            done += self._buffer_some(x[:, done:], toks[done:])

    def _check_writable(self) -> None:
        if self.already_complete:
            raise StoreError(f"the store at {self.root} is already complete; nothing to write")
        if self._closed or self._broken:
            raise StoreError(f"this writer for {self.root} is closed or failed; reopen it to resume")

    def _check_batch(self, x: torch.Tensor, tok: np.ndarray) -> int:
        p = self.params
        if x.ndim != 3 or x.shape[0] != p.n_layers + 1 or x.shape[2] != p.d_model:
            raise StoreError(f"resid batch has shape {tuple(x.shape)}, expected "
                             f"({p.n_layers + 1}, n, {p.d_model})")
        n = x.shape[1]
        if tok.shape != (n,) or not np.issubdtype(tok.dtype, np.integer):
            raise StoreError(f"tokens batch must be ({n},) integers, got {tok.shape} {tok.dtype}")
        if n and (tok.min() < 0 or tok.max() > np.iinfo(np.int32).max):
            raise StoreError("token ids must fit in int32 and be non-negative")
        if self._pos + n > p.n_tokens:
            raise StoreError(f"batch of {n} tokens at position {self._pos} runs past the "
                             f"store's n_tokens={p.n_tokens}")
        return n

    def _buffer_some(self, x: torch.Tensor, toks: np.ndarray) -> int:
        """Cast as much of the batch (L+1, n, d) as fits into the current shard's buffer;
        submit the shard when full."""
        shard = self._pos // self.params.shard_tokens
        start, stop = self.params.shard_span(shard)
        take = min(x.shape[1], stop - self._pos)
        buf, tbuf = self._current_buffers()  # (L+1, shard_tokens, d), (shard_tokens,)
        at = self._pos - start
        cast_into(buf[:, at:at + take], x[:, :take], self.params.dtype)
        tbuf[at:at + take] = toks[:take]
        self._pos += take
        if self._pos == stop:
            self._submit(shard, buf[:, :stop - start], tbuf[:stop - start])
        return take

    def _current_buffers(self) -> tuple[np.ndarray, np.ndarray]:
        # Two shard buffers alternate: one being filled, one being written in the background.
        if self._buffers[self._which] is None:
            p = self.params
            self._buffers[self._which] = (
                np.empty((p.n_layers + 1, p.shard_tokens, p.d_model), STORED_NP[p.dtype]),
                np.empty((p.shard_tokens,), np.int32))
        return self._buffers[self._which]

    def _submit(self, shard: int, buf: np.ndarray, tbuf: np.ndarray) -> None:
        # Waiting for the previous shard's write first bounds memory at two shard buffers.
        self._collect()
        if self._executor is None:
            try:
                self._records.append(self._write_shard(shard, buf, tbuf))
            except BaseException:
                self._broken = True  # as in the background: no later shard may follow
                raise
            return
        self._pending = self._executor.submit(self._write_shard, shard, buf, tbuf)
        self._which ^= 1

    def _collect(self, everything: bool = False) -> None:
        """Wait for the shard being written (its buffer is needed again), record the shards
        made durable since, in order, and re-raise a background failure in the caller's
        thread. At most one shard is left waiting for its fsync; ``everything``: none."""
        try:
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self._syncing.append(pending.result())
            while self._syncing and (everything or len(self._syncing) > 1 or self._syncing[0].done()):
                self._records.append(self._syncing.popleft().result())
        except BaseException:
            self._broken = True
            raise

    def _write_shard(self, shard: int, buf: np.ndarray, tbuf: np.ndarray) -> "dict | Future":
        """Write one whole shard; its buffer is free again on return. It is made durable
        and only then recorded as done by :meth:`_make_durable`: inline without background
        threads, else on the fsync thread, whose future this returns.

        Three stages overlap on separate threads, as a GPU's extraction needs: this shard's
        fsync, its SHA-256 (from the page cache), and the next shard's write."""
        start, stop = self.params.shard_span(shard)
        try:
            self._write_resid(start, stop, buf)  # (L+1, n, d): covers the shard, no merge needed
            self._tokens[start:stop] = tbuf
        except (OSError, RuntimeError, ValueError) as e:
            self._raise_failure(e, shard)
        files = [self.root / arr.basename / arr.metadata.encode_chunk_key(coords)
                 for arr, coords in ((self._resid, (0, shard, 0)), (self._tokens, (shard,)))]
        if self._hasher is not None:
            self._digests.update((path, self._hasher.submit(file_digest, path)) for path in files)
        record = {"shard": shard, "start": start, "stop": stop, **shard_checksums(buf, tbuf)}
        if self._syncer is None:
            return self._make_durable(files, record)
        return self._syncer.submit(self._make_durable, files, record)

    def _make_durable(self, files: list[Path], record: dict) -> dict:
        """fsync the shard's files, then write its record. The fsync thread takes shards in
        order, and after a failure it records none: records stay a contiguous prefix."""
        if self._sync_failed:
            raise StoreError(f"shard {record['shard']} of {self.root} was not recorded: an earlier one failed")
        try:
            # The files, then the directories that name them (the shard's own directory is
            # new): a record must never outlive its shard, even after a power loss.
            dirs = dict.fromkeys(d for path in files for d in (path.parent, path.parent.parent))
            for path in [*files, *dirs]:
                _fsync_file(path)
            record["written"] = now_utc()
            write_json_atomic(self.root / record_name(record["shard"]), record)
        except BaseException as e:
            self._sync_failed = True
            if isinstance(e, (OSError, RuntimeError, ValueError)):
                self._raise_failure(e, record["shard"])
            raise
        return record

    def _raise_failure(self, e: BaseException, shard: int) -> None:
        """Re-raise a failed shard write: a full disk as the store's own message, any other
        error as it is. The shard is not recorded, so the store stays incomplete and a
        resume rewrites it."""
        if not disk_full(e):
            raise e
        raise StoreError(disk_full_message(e, f"shard {shard} of the store at {self.root}")) from e

    def _write_resid(self, start: int, stop: int, buf: np.ndarray) -> None:
        """One whole shard of activations: through TensorStore (:func:`engine.shard_writer`),
        else through zarr."""
        if self._resid_shards is None:
            handle = engine.shard_writer(str(self.root / self._resid.basename))
            self._resid_shards = False if handle is None else handle
        if self._resid_shards is False:
            self._resid[:, start:stop, :] = buf
        else:
            self._resid_shards[:, start:stop, :].write(buf).result()

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
            raise StoreError(f"shard {src_shard} of {src_root} ({record['stop'] - record['start']} tokens) "
                             f"does not fit shard {shard} of {self.root} ({stop - start} tokens)")
        for arr, src_coords, dst_coords in ((self._resid, (0, src_shard, 0), (0, shard, 0)),
                                            (self._tokens, (src_shard,), (shard,))):
            src = Path(src_root) / arr.basename / arr.metadata.encode_chunk_key(src_coords)
            dst = self.root / arr.basename / arr.metadata.encode_chunk_key(dst_coords)
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
            for arr, coords in ((self._resid, (0, shard, 0)), (self._tokens, (shard,))):
                (self.root / arr.basename / arr.metadata.encode_chunk_key(coords)).unlink(missing_ok=True)
            (self.root / record_name(shard)).unlink(missing_ok=True)
        for sub, pattern in (("resid", "*.partial"), ("resid", "*.__lock"), ("tokens", "*.partial"),
                             (PROGRESS_DIR, ".*.tmp")):
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
        if self._broken:
            raise StoreError(f"an earlier shard write to {self.root} failed; reopen to resume")
        if self._pos != p.n_tokens:
            raise StoreError(f"finalize called after {self._pos} of {p.n_tokens} tokens; the "
                             f"store at {self.root} stays incomplete (resumable)")
        self._collect(everything=True)
        if [r["shard"] for r in self._records] != list(range(p.n_shards)):
            raise StoreError(f"progress records under {self.root / PROGRESS_DIR} were changed "
                             "while writing; delete the store and extract again")
        finished = now_utc()
        self._group.update_attributes({"complete": True, "finished": finished})
        _consolidate(self.root)
        write_manifest(self.root, self._known_digests())
        write_json_atomic(self.root / COMPLETE_NAME, {
            "n_tokens": p.n_tokens, "n_shards": p.n_shards, "finished": finished,
            "fingerprint": self._group.attrs["fingerprint"],
            "records_sha256": sha256_json(self._records)})

    def _known_digests(self) -> dict[Path, tuple[int, int, str]]:
        """The shard files hashed so far; those still queued are left to write_manifest's
        parallel pass (cancelled here, so the one hashing thread is no tail)."""
        known = {}
        for path, future in self._digests.items():
            if future.cancel():
                continue
            with contextlib.suppress(Exception):  # e.g. the file vanished: hashed again, or missed
                if (digest := future.result()) is not None:
                    known[path] = digest
        return known

    def abort(self) -> None:
        """Stop without marking complete; shards already written stay for a resume."""
        if self._closed:
            return
        try:
            with contextlib.suppress(Exception):
                self._collect(everything=True)  # let the in-flight shards land: fewer to redo
        finally:
            self._release()

    def _release(self) -> None:
        self._closed = True
        for executor in (self._executor, self._syncer):
            if executor is not None:
                executor.shutdown(wait=True)
        if self._hasher is not None:
            self._hasher.shutdown(wait=True, cancel_futures=True)
        self._buffers = [None, None]
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> "StoreWriter":
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


def _ensure_arrays(group: zarr.Group, params: StoreParams) -> None:
    """Create the arrays unless present (a crash can fall between group and arrays)."""
    try:
        group["resid"], group["tokens"]
    except KeyError:
        _create_arrays(group, params)
