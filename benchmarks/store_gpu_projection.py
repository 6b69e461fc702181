"""Projection, not a measurement: the store on a GPU machine, from its CPU costs measured here.

    python benchmarks/store_gpu_projection.py [--cores 16 --disk-gb-s 1.4 --forward-tok-s 631579
        --train-token-layers-s 940686] [--compressions none,zstd:3,blosc-lz4-bitshuffle:5]

No GPU was lent when issue 13's store work was done, so its GPU targets (extraction >= 0.5x
the bare forward pass, or >= 0.8x the disk where the disk is the limit; training >= 0.6x
its unembedding-bound baseline) could not be measured. This script measures, on this
machine, the CPU seconds (every thread's) that the store's real write and read paths spend
per GB of bf16 activations, for each codec, and scales them to a GPU machine's cores:

- extraction: the store keeps up with min(cores / write CPU s/GB, disk / stored fraction)
  GB/s of activations; the GPU's bare forward pass makes forward_tok_s x (layers+1) x
  d_model x 2 bytes/s. The smallest of the three rates is the bound that applies;
- training reads every layer of each batch once per step: at its unembedding-bound
  baseline it needs train_token_layers_s x d_model x 2 bytes/s from the store, which the
  reads supply at cores / read CPU s/GB.

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
from bench_store_io import activations, store_read_all, store_write, timed_cpu  # noqa: E402
from pipeline.allocator import keep_freed_memory  # noqa: E402
from pipeline.store import engine  # noqa: E402
from pipeline.store.reader import open_store  # noqa: E402


def cpu_seconds(fn, rounds: int = 2) -> float:
    """Least CPU seconds (every thread's) of ``rounds`` calls."""
    return min(timed_cpu(fn)[1] for _ in range(rounds))


def store_costs(root: Path, x: torch.Tensor, n_tokens: int, compression: str) -> dict[str, float]:
    """CPU s per GB of bf16 activations: a whole store write, an all-layer read; and the
    stored bytes / raw bytes."""
    gb = x.shape[0] * n_tokens * x.shape[2] * 2 / 1e9
    path = root / compression.replace(":", "-")

    def write() -> None:
        shutil.rmtree(path, ignore_errors=True)
        store_write(path, x, n_tokens, compression)

    write()  # once untimed: TensorStore's import, the first buffers' page faults
    w = cpu_seconds(write)
    store = open_store(path)
    r = cpu_seconds(lambda: store_read_all(store), 3)
    size = sum(p.stat().st_size for p in (path / "resid").rglob("*") if p.is_file())
    shutil.rmtree(path)
    return {"write": w / gb, "read": r / gb, "frac": size / (gb * 1e9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cores", type=int, default=16)
    ap.add_argument("--disk-gb-s", type=float, default=1.4)
    ap.add_argument("--forward-tok-s", type=float, default=631_579)
    ap.add_argument("--train-token-layers-s", type=float, default=940_686)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--compressions", default="none,zstd:3,blosc-lz4-bitshuffle:5")
    args = ap.parse_args()
    keep_freed_memory()
    engine.configure(threads=torch.get_num_threads())
    x = activations(args.layers, args.d_model)  # (L+1, batch, d) float32
    token_bytes = (args.layers + 1) * args.d_model * 2
    forward = args.forward_tok_s * token_bytes / 1e9  # GB/s of activations the GPU makes
    need = args.train_token_layers_s * args.d_model * 2 / 1e9  # GB/s training reads
    print(f"measured here: {torch.get_num_threads()} threads; projected to {args.cores} cores, disk "
          f"{args.disk_gb_s} GB/s; the bare forward makes {forward:.1f} GB/s of activations, training at "
          f"its baseline reads {need:.2f} GB/s")
    print("| compression | stored / raw | write CPU s/GB | read CPU s/GB | store writes GB/s (cores) | "
          "disk, GB/s of activations | extraction tok/s | x forward | bound | store reads GB/s (cores) | "
          "training x baseline (reads) |")
    print("|" + "---|" * 11)
    root = Path(tempfile.mkdtemp(prefix="store_gpu_projection-"))
    try:
        for comp in args.compressions.split(","):
            c = store_costs(root, x, args.tokens, comp)
            cpu_w, disk = args.cores / c["write"], args.disk_gb_s / c["frac"]
            rates = {"forward pass": forward, "store CPU": cpu_w, "disk": disk}
            bound = min(rates, key=rates.get)
            tok_s = rates[bound] * 1e9 / token_bytes
            reads = args.cores / c["read"]
            print(f"| {comp} | {c['frac']:.3f} | {c['write']:.2f} | {c['read']:.2f} | {cpu_w:.1f} | {disk:.2f} | "
                  f"{tok_s:,.0f} | {tok_s / args.forward_tok_s:.3f} | {bound} | {reads:.1f} | "
                  f"{min(1.0, reads / need):.2f} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
