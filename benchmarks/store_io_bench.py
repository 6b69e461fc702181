"""Store write/read bandwidth alone (no model), to tell disk- from code-bound extraction.

    python benchmarks/store_io_bench.py [--tokens 32768] [--dir /tmp]

Prints MB/s of raw stored bytes for: writing whole shards (bf16, zstd 1 and none) through
StoreWriter with and without the background thread, and reading one layer / all layers.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.store.reader import open_store  # noqa: E402
from pipeline.store.writer import StoreWriter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--d-model", type=int, default=576)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir))
    batch = 8192
    x = torch.randn(args.layers + 1, batch, args.d_model)
    raw = (args.layers + 1) * args.tokens * args.d_model * 2 / 1e6  # MB as bf16
    for compression in ("none", "zstd"):
        for background in (False, True):
            path = root / f"{compression}-{background}.zarr"
            t0 = time.perf_counter()
            with StoreWriter.open(path, n_layers=args.layers, d_model=args.d_model, n_tokens=args.tokens,
                                  seq_len=256, shard_tokens=4096, chunk_tokens=512, compression=compression,
                                  level=1, provenance={}, background=background) as w:
                for s in range(0, args.tokens, batch):
                    w.write(x, torch.zeros(batch, dtype=torch.long))
            dt = time.perf_counter() - t0
            print(f"write {compression:5} background={background!s:5}: {raw / dt:7.0f} MB/s raw", flush=True)
    store = open_store(root / "zstd-True.zarr")
    t0 = time.perf_counter()
    store.layers(args.layers // 2)
    print(f"read one layer, all tokens: {raw / (args.layers + 1) / (time.perf_counter() - t0):7.0f} MB/s raw")
    t0 = time.perf_counter()
    for s in range(0, args.tokens, 4096):
        store.layers(range(args.layers + 1), s, s + 4096)
    print(f"read all layers by shard:   {raw / (time.perf_counter() - t0):7.0f} MB/s raw")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
