"""Which zarr codec pipeline encodes and decodes the store's chunks.

The store is plain zarr v3 whichever pipeline runs; only the engine differs.
``zarrs`` (the Rust codec pipeline for zarr-python, on PyPI) encodes, decodes and does the
file I/O of a shard's chunks in parallel outside the GIL; zarr-python's own
``BatchedCodecPipeline`` does them chunk by chunk in Python. ``benchmarks/bench_store_io.py``
measures both against raw file I/O; the numbers are in ``benchmarks/RESULTS.md``.
Where zarrs cannot serve an array (a store type it does not know, e.g. a remote URL or a
.zip), it hands the array back to zarr-python's pipeline by itself.
"""

from __future__ import annotations

PIPELINES = {
    "zarrs": "zarrs.ZarrsCodecPipeline",
    "zarr": "zarr.core.codec_pipeline.BatchedCodecPipeline",
}
DEFAULT = "zarrs"


def configure(pipeline: str = DEFAULT, threads: int | None = None) -> None:
    """Select the codec pipeline (and its thread count) for every zarr array opened after."""
    import zarr

    if pipeline not in PIPELINES:
        raise ValueError(f"unknown codec pipeline {pipeline!r}; one of {sorted(PIPELINES)}")
    zarr.config.set({"codec_pipeline.path": PIPELINES[pipeline], "threading.max_workers": threads})
