"""One layer over all tokens from the store against raw files, by inner chunk size (issue 13).

    .venv/bin/python benchmarks/bench_one_layer_read.py

The same synthetic stream as bench_store_io.py (31 layers x 16,384 tokens x 576 bf16, shard
4,096 tokens, zarrs pipeline), written once as raw files and once per store layout
(uncompressed with inner chunks of 512 tokens, the default, and of 4,096 = one chunk per
layer and shard; zstd-3 at 512). Each store is read by both one-layer readers: zarr, and
TensorStore (``engine.read_array``, the default for local stores). Best of 5 reads of
layer 15 each, from the page cache; store reads with the store already open and, apart,
with its opening. Ratios are raw time / store time (zstd: the codec's own cost included).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
import bench_store_io as B

from pipeline.store import engine
from pipeline.store.reader import open_store

N_TOKENS, SHAPE, LAYER = 16384, (31, 16384, 576), 15


def best(fn, rounds: int = 5) -> float:
    out = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def main() -> None:
    engine.configure("zarrs", threads=2)
    x = B.activations(SHAPE[0] - 1, SHAPE[2])  # (L+1, batch, d)
    root = Path(tempfile.mkdtemp(prefix="bench_one_layer_read-"))
    try:
        B.raw_write(root / "raw", x, N_TOKENS)
        raw = best(lambda: B.raw_read_layer(root / "raw", SHAPE, LAYER))
        print(f"raw one layer {raw * 1e3:.1f} ms")
        for compression, chunk in (("none", 512), ("none", 4096), ("zstd:3", 512)):
            path = root / f"{compression}-{chunk}.zarr"
            B.store_write(path, x, N_TOKENS, compression, chunk_tokens=chunk)
            for reader in ("zarr", "tensorstore"):
                engine.configure("zarrs", threads=2, tensorstore_reads=reader == "tensorstore")
                opened = open_store(path)
                read = best(lambda opened=opened: opened.layers(LAYER))
                both = best(lambda path=path: open_store(path).layers(LAYER))
                print(
                    f"{compression} chunk {chunk} {reader:11s}: read (opened) {read * 1e3:.1f} ms, ratio "
                    f"{raw / read:.2f}; open + read {both * 1e3:.1f} ms, ratio {raw / both:.2f}"
                )
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
