"""The writer's shard pipeline: whole shards written, made durable and recorded, in order,
on background threads (:class:`ShardPipeline`), from the shard buffers the writer fills
(:class:`ShardBuffers`).

Where work runs, so that a GPU's extraction is not held up by it: one thread writes full
shards (TensorStore encodes their chunks on its own threads); one fsyncs them and writes
their records; a pool hashes their files for SHA256SUMS. A shard's fsync, its hashing and
the next shard's write overlap. Without background threads every step runs inline.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import StoreError, disk_full, disk_full_message
from ..provenance import now_utc, write_json_atomic
from . import engine
from .layout import StoreParams, array_names, checksums_of, record_name, shard_files
from .manifest import file_digest


@dataclasses.dataclass
class ShardBuffers:
    """One shard's stored values, per value array of the store (``StoreParams.value_arrays``):
    resid (L+1, shard_tokens, d) in the storage dtype, attn (L, shard_tokens, d) where the
    attention position is stored, and for a scaled dtype each one's row scales (rows,
    shard_tokens) float32; and the tokens (shard_tokens,) int32."""

    values: dict[str, np.ndarray]
    tokens: np.ndarray

    @classmethod
    def empty(cls, p: StoreParams) -> ShardBuffers:
        return cls(
            {a.name: np.empty(a.shape(p, p.shard_tokens), a.dtype(p)) for a in p.value_arrays()},
            np.empty((p.shard_tokens,), np.int32),
        )

    def head(self, n: int) -> ShardBuffers:
        """The first ``n`` tokens (a short last shard)."""
        return ShardBuffers({name: a[:, :n] for name, a in self.values.items()}, self.tokens[:n])


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ShardPipeline:
    """Writes whole shards of one store and records each once it is durable, in order.

    ``submit`` hands over a full shard's buffers (free again once the next ``submit`` or
    ``collect`` returns); ``records`` is the contiguous prefix of durable shards. A failure
    on any thread is re-raised in the caller's and stops every later shard (``broken``).
    """

    def __init__(self, root: Path, params: StoreParams, group: zarr.Group, records: list[dict], background: bool):
        self.root, self.params, self.records = root, params, records
        cfg = {"write_empty_chunks": True}  # every shard is a file: fsync-able, deletable
        self._arrays = {name: group[name].with_config(cfg) for name in array_names(params)}
        self._shard_writers: dict[str, Any] = {}  # engine.shard_writer's handles, opened on first use (False: none)
        self._pending: Future | None = None  # the shard being written
        self._syncing: collections.deque[Future] = collections.deque()  # written, being made durable
        self._sync_failed = False
        self.broken = False
        self._executor = ThreadPoolExecutor(1, "lenspipe-store") if background else None
        self._syncer = ThreadPoolExecutor(1, "lenspipe-fsync") if background else None
        # SHA256SUMS digests of the shard files, hashed while later shards are written
        # (finalize hashes only what is missing or changed: see write_manifest); one thread
        # per CPU, since one thread hashes ~1.3 GB/s, less than a GPU's extraction writes.
        self._hasher = ThreadPoolExecutor(engine.io_threads(), "lenspipe-sha256") if background else None
        self._digests: dict[Path, Future] = {}

    def poll(self) -> None:
        """Surface a finished background write's failure now, not one shard later."""
        if self._pending is not None and self._pending.done():
            self.collect()

    def submit(self, shard: int, bufs: ShardBuffers) -> None:
        # Waiting for the previous shard's write first bounds memory at two shard buffers.
        self.collect()
        if self._executor is None:
            try:
                self.records.append(self._write_shard(shard, bufs))
            except BaseException:
                self.broken = True  # as in the background: no later shard may follow
                raise
            return
        self._pending = self._executor.submit(self._write_shard, shard, bufs)

    def collect(self, everything: bool = False) -> None:
        """Wait for the shard being written (its buffer is needed again), record the shards
        made durable since, in order, and re-raise a background failure in the caller's
        thread. At most one shard is left waiting for its fsync; ``everything``: none."""
        try:
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self._syncing.append(pending.result())
            while self._syncing and (everything or len(self._syncing) > 1 or self._syncing[0].done()):
                self.records.append(self._syncing.popleft().result())
        except BaseException:
            self.broken = True
            raise

    def _write_shard(self, shard: int, bufs: ShardBuffers) -> dict | Future:
        """Write one whole shard; its buffers are free again on return. It is made durable
        and only then recorded as done by :meth:`_make_durable`: inline without background
        threads, else on the fsync thread, whose future this returns.

        Three stages overlap on separate threads, as a GPU's extraction needs: this shard's
        fsync, its SHA-256 (from the page cache), and the next shard's write."""
        start, stop = self.params.shard_span(shard)
        try:
            self._write_values(start, stop, bufs)  # covers the shard, no merge needed
            self._arrays["tokens"][start:stop] = bufs.tokens
        except (OSError, RuntimeError, ValueError) as e:
            self._raise_failure(e, shard)
        files = [self.root / name for name in shard_files(self.params, shard)]
        if self._hasher is not None:
            self._digests.update((path, self._hasher.submit(file_digest, path)) for path in files)
        record = {"shard": shard, "start": start, "stop": stop, **checksums_of(bufs.values, bufs.tokens)}
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

    def _write_values(self, start: int, stop: int, bufs: ShardBuffers) -> None:
        """One whole shard of every position's states (and of their scales): through
        TensorStore (:func:`engine.shard_writer`), else through zarr."""
        for name, values in bufs.values.items():
            self._write_array(name, start, stop, values)

    def _write_array(self, name: str, start: int, stop: int, values: np.ndarray) -> None:
        handle = self._shard_writers.get(name)
        if handle is None:
            handle = engine.shard_writer(str(self.root / name))
            self._shard_writers[name] = handle = False if handle is None else handle
        if handle is False:
            self._arrays[name][:, start:stop] = values
        else:
            handle[:, start:stop].write(values).result()

    def known_digests(self) -> dict[Path, tuple[int, int, str]]:
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

    def shutdown(self) -> None:
        for executor in (self._executor, self._syncer):
            if executor is not None:
                executor.shutdown(wait=True)
        if self._hasher is not None:
            self._hasher.shutdown(wait=True, cancel_futures=True)
