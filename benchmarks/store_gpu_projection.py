"""Projection, not a measurement: the store on a GPU machine, from its CPU costs measured here.

    python benchmarks/store_gpu_projection.py [--cores 16 --disk-gb-s 1.4 --forward-tok-s 631579
        --train-token-layers-s 940686] [--dtypes bfloat16,fp8,int8] [--source STORE]
        [--compressions none,zstd:3,blosc-lz4-bitshuffle:5]

No GPU was lent when issue 13's store work was done, so its GPU targets (extraction >= 0.5x
the bare forward pass, or >= 0.8x the disk where the disk is the limit; training >= 0.6x
its unembedding-bound baseline) could not be measured. This script measures, on this
machine, the CPU seconds (every thread's) that the store's real write and read paths spend
per token, for each storage dtype (``--dtypes``: an 8-bit dtype's quantisation, scales and
decode included) and codec, and its bytes on disk per token, and scales them to a GPU
machine's cores, in tokens/s:

- extraction: the store keeps up with min(cores / write CPU s per token, disk bytes/s /
  stored bytes per token) tokens/s; the GPU's bare forward pass makes forward_tok_s. The
  smallest of the three rates is the bound that applies. Fewer bytes per token (an 8-bit
  dtype: about half of bf16's) move the disk's bound up in proportion;
- training reads every layer of each batch once per step: at its unembedding-bound
  baseline it needs train_token_layers_s token-layers/s from the store, which the reads
  supply at cores / read CPU s per token-layer.

It assumes the store's work spreads over all cores (TensorStore and zarrs encode and decode
chunks on io_threads(), the writer hashes on as many threads; one thread writes each shard's
bytes and one fsyncs, which bench_store_io measures at >1 GB/s each here) and that the disk
sustains its rate. Defaults: the H200 machine of benchmarks/RESULTS.md (16 cores, `dd` to
/tmp 1.4 GB/s, SmolLM2-135M's bare forward 631,579 tokens/s, its training baseline 940,686
token-layers/s at 8,192-token batches).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_store_io import add_input_arguments, input_activations, store_bytes, store_read_all, store_write, timed_cpu

from pipeline.allocator import keep_freed_memory
from pipeline.store import engine
from pipeline.store.dtypes import DTYPES
from pipeline.store.reader import open_store


def cpu_seconds(fn, rounds: int = 2) -> float:
    """Least CPU seconds (every thread's) of ``rounds`` calls."""
    return min(timed_cpu(fn)[1] for _ in range(rounds))


def store_costs(root: Path, x: torch.Tensor, n_tokens: int, compression: str, dtype: str) -> dict[str, float]:
    """CPU s per token of a whole store write and of an all-layer read, and the bytes on
    disk per token (values and row scales)."""
    path = root / f"{dtype}-{compression.replace(':', '-')}"

    def write() -> None:
        shutil.rmtree(path, ignore_errors=True)
        store_write(path, x, n_tokens, compression, dtype=dtype)

    write()  # once untimed: TensorStore's import, the first buffers' page faults
    w = cpu_seconds(write)
    store = open_store(path)
    r = cpu_seconds(lambda: store_read_all(store), 3)
    size = store_bytes(path)
    shutil.rmtree(path)
    return {"write": w / n_tokens, "read": r / n_tokens, "bytes": size / n_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cores", type=int, default=16)
    ap.add_argument("--disk-gb-s", type=float, default=1.4)
    ap.add_argument("--forward-tok-s", type=float, default=631_579)
    ap.add_argument("--train-token-layers-s", type=float, default=940_686)
    add_input_arguments(ap)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dtypes", default="bfloat16,fp8,int8")
    ap.add_argument("--compressions", default="none,zstd:3,blosc-lz4-bitshuffle:5")
    args = ap.parse_args()
    keep_freed_memory()
    engine.configure(threads=torch.get_num_threads())
    x, source = input_activations(args)  # (L+1, batch, d) float32
    n_layers, d_model = x.shape[0] - 1, x.shape[2]
    bf16_bytes = DTYPES["bfloat16"].bytes_per_token(n_layers, d_model)
    print(
        f"measured here on {source}: {torch.get_num_threads()} threads; projected to {args.cores} cores, disk "
        f"{args.disk_gb_s} GB/s; the bare forward makes {args.forward_tok_s:,.0f} tokens/s "
        f"({args.forward_tok_s * bf16_bytes / 1e9:.1f} GB/s as bf16), training at its baseline reads "
        f"{args.train_token_layers_s:,.0f} token-layers/s"
    )
    print(
        "| dtype | compression | bytes/token on disk | vs bf16 uncompressed | write CPU us/token | "
        "read CPU us/token | store writes tok/s (cores) | disk tok/s | extraction tok/s | x forward | bound | "
        "store reads token-layers/s (cores) | training x baseline (reads) |"
    )
    print("|" + "---|" * 13)
    root = Path(tempfile.mkdtemp(prefix="store_gpu_projection-"))
    try:
        for dtype in args.dtypes.split(","):
            for comp in args.compressions.split(","):
                c = store_costs(root, x, args.tokens, comp, dtype)
                rates = {
                    "forward pass": args.forward_tok_s,
                    "store CPU": args.cores / c["write"],
                    "disk": args.disk_gb_s * 1e9 / c["bytes"],
                }
                bound = min(rates, key=rates.get)
                reads = args.cores / c["read"] * (n_layers + 1)  # token-layers/s
                print(
                    f"| {dtype} | {comp} | {c['bytes']:,.0f} | {c['bytes'] / bf16_bytes:.3f} | "
                    f"{c['write'] * 1e6:.2f} | {c['read'] * 1e6:.2f} | {rates['store CPU']:,.0f} | "
                    f"{rates['disk']:,.0f} | {rates[bound]:,.0f} | {rates[bound] / args.forward_tok_s:.3f} | "
                    f"{bound} | {reads:,.0f} | {min(1.0, reads / args.train_token_layers_s):.2f} |",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
