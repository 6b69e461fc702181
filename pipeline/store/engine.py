"""Which engine reads and writes the store's chunks.

The store is plain zarr v3 whichever engine runs. Three are used, each where it measured
fastest (``benchmarks/bench_store_io.py``; the numbers are in ``benchmarks/RESULTS.md``):

- TensorStore (Google's C++ zarr library, on PyPI) writes every activation shard
  (:func:`shard_writer`) and reads complete local stores (:func:`read_array`);
- ``zarrs`` (the Rust codec pipeline for zarr-python, on PyPI) serves every other zarr
  array operation on a local directory: the token ids, stores still being written, dask;
- zarr-python's own ``BatchedCodecPipeline`` reads remote stores and .zip exports: zarrs
  0.2.3 fails on fsspec storage options ("Unsupported storage option for
  HTTPFileSystem"), see :func:`for_location`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

PIPELINES = {
    "zarrs": "zarrs.ZarrsCodecPipeline",
    "zarr": "zarr.core.codec_pipeline.BatchedCodecPipeline",
}
DEFAULT = "zarrs"


_chosen: str | None = None
_tensorstore_reads = True
_shard_writes = True
_LOCK = threading.RLock()


def configure(
    pipeline: str = DEFAULT, threads: int | None = None, tensorstore_reads: bool = True, shard_writes: bool = True
) -> None:
    """Select the codec pipeline (and its thread count) for every zarr array opened after,
    whether complete local stores are read through TensorStore (:func:`read_array`), and
    whether the store writer writes its activation shards through it (:func:`shard_writer`)."""
    global _chosen, _tensorstore_reads, _shard_writes
    import zarr

    if pipeline not in PIPELINES:
        raise ValueError(f"unknown codec pipeline {pipeline!r}; one of {sorted(PIPELINES)}")
    settings = {"codec_pipeline.path": PIPELINES[pipeline]}
    if threads is not None:
        settings["threading.max_workers"] = threads
    zarr.config.set(settings)
    _chosen, _tensorstore_reads, _shard_writes = pipeline, tensorstore_reads, shard_writes


def read_array(array_dir: str):
    """A read-only TensorStore handle on the zarr v3 array in the local directory
    ``array_dir``, or None where reads go through zarr (``configure(tensorstore_reads=False)``).

    Why: a one-layer read touches one inner chunk per ``chunk_tokens`` in every shard, and
    zarr-python spends ~0.3 ms of indexing on each, which held such reads at 0.44-0.52x of
    raw file reads; TensorStore reads the same shards at ~1x
    (benchmarks/bench_one_layer_read.py). With zstd it also read ranges of all layers
    1.2-1.35x faster than zarrs (uncompressed, within ~10% either way; RESULTS.md, fifth
    round). No cache: every read comes from the files."""
    if not _tensorstore_reads:
        return None
    return _tensorstore(array_dir, write=False)


def shard_writer(array_dir: str):
    """A TensorStore handle that writes whole shards of the zarr v3 array in the local
    directory ``array_dir``, or None where shards are written through zarr
    (``configure(shard_writes=False)``).

    Why: zarrs wrote an uncompressed shard at ~0.3x of a raw file write, even in /dev/shm,
    TensorStore at ~0.7x; compressed, ~20% faster (benchmarks/RESULTS.md, fifth round).
    The bytes are plain zarr v3 as before; each shard file appears by an atomic rename of
    ``<shard>.__lock``, which a killed write leaves behind (the writer's resume deletes it)."""
    if not _shard_writes:
        return None
    return _tensorstore(array_dir, write=True)


def _tensorstore(array_dir: str, write: bool):
    import tensorstore as ts  # ~1 s to import: only where a layer is read or a shard written

    threads = io_threads()
    # file_io_sync off for writes: the writer's fsync thread syncs each shard file and its
    # directories itself, while the file is hashed and the next shard written
    # (writer.StoreWriter._make_durable).
    context = ts.Context(
        {
            "data_copy_concurrency": {"limit": threads},
            "file_io_concurrency": {"limit": threads},
            "file_io_sync": not write,
        }
    )
    # Chunks equal to the fill value are written too: a store begun before the writer's
    # own fill values (fill 0) must still get a file for an all-zero chunk.
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": array_dir},
        "store_data_equal_to_fill_value": write,
    }
    if write:
        return ts.open(spec, write=True, open=True, context=context).result()
    return ts.open(spec, read=True, open=True, context=context).result()


def io_threads() -> int:
    """The CPUs this process may run on: the thread count for parallel I/O and hashing."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def activate() -> str:
    """The default pipeline, unless one was chosen already (the store's readers and writers
    call this before opening arrays). Returns the pipeline in use."""
    if _chosen is None:
        configure(DEFAULT)
    return _chosen


@contextlib.contextmanager
def for_location(local_dir: bool, fill_ok: bool = True) -> Iterator[None]:
    """Context in which to open a store's arrays: the chosen pipeline for a local directory,
    zarr-python's for a URL or a .zip (an array keeps the pipeline it was opened with).
    ``fill_ok=False``: arrays of a store written before the fill values of
    ``pipeline.store.encoding.FILL`` (fill 0), which zarrs could leave without a chunk file
    when a chunk is all zeros: zarr-python's pipeline.

    zarr's config is one process-wide dict, and dask opens stores from several threads: a
    lock keeps one thread's setting from being restored under another's open."""
    import zarr

    chosen = activate()
    name = chosen if local_dir and fill_ok else "zarr"
    with _LOCK, zarr.config.set({"codec_pipeline.path": PIPELINES[name]}):
        yield
