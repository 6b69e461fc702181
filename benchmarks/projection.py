"""Projection: disk, extraction and training time for N tokens of a bigger model on one GPU.

Not a measurement: it scales the per-token costs measured in RESULTS.md (SmolLM2-135M on
an H200) to another shape, assuming the forward pass scales with non-embedding parameters,
lens training with d_model x vocab (the unembedding dominates it), the store with
(n_layers + 1) x d_model, and the zarr write path stays at its measured ~0.5 GB/s per
writer process (so extraction is store-bound and parallel parts divide it).

    .venv/bin/python benchmarks/projection.py            # 1B tokens of a Llama-3.2-1B-shaped model
"""

from __future__ import annotations

import argparse

# measured (benchmarks/RESULTS.md): SmolLM2-135M, H200, bf16 store with zstd-3
MEASURED = {
    "bytes_per_value": 1.56,  # bf16 + zstd-3 on SmolLM2 activations (CPU bench_extract)
    # zarr write path, one process (store_io_bench, now bench_store_io.py; disk and RAM alike)
    "write_gb_s_per_writer": 0.5,
    "forward_tok_s": 631_579,  # bare forward, batch 64 x 256 (gpu_bench)
    "train_token_layers_s": 198_535,  # lens training, 8,192-token batches (gpu_bench)
    "nonembed_params": 106e6,
    "d_model": 576,
    "vocab": 49_152,
    "n_layers": 30,
}


def project(
    tokens: float, n_layers: int, d_model: int, vocab: int, nonembed_params: float, writers: int, train_tokens: float
) -> dict[str, float]:
    m = MEASURED
    disk = tokens * (n_layers + 1) * d_model * m["bytes_per_value"]
    forward_s = tokens / (m["forward_tok_s"] * m["nonembed_params"] / nonembed_params)
    write_s = disk / (m["write_gb_s_per_writer"] * 1e9 * writers)
    train_rate = m["train_token_layers_s"] * (m["d_model"] * m["vocab"]) / (d_model * vocab)
    train_s = train_tokens * n_layers / train_rate
    return {
        "disk_TB": disk / 1e12,
        "forward_h": forward_s / 3600,
        "store_write_h": write_s / 3600,
        "extract_h": max(forward_s, write_s) / 3600,
        "train_h": train_s / 3600,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=float, default=1e9)
    p.add_argument("--layers", type=int, default=16)  # Llama-3.2-1B
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--nonembed-params", type=float, default=0.97e9)
    p.add_argument("--train-tokens", type=float, default=250 * 262_144)  # the reference recipe
    args = p.parse_args()
    print(
        f"{args.tokens:.0e} tokens, {args.layers} layers x d_model {args.d_model}, vocab {args.vocab}, "
        f"{args.nonembed_params / 1e9:.2f}B non-embedding parameters; lens trained on {args.train_tokens:.3g} tokens"
    )
    print("| writers | disk (TB) | forward (h) | store writes (h) | extraction (h) | lens training, all layers (h) |")
    print("|---|---|---|---|---|---|")
    for writers in (1, 4, 16):
        r = project(
            args.tokens, args.layers, args.d_model, args.vocab, args.nonembed_params, writers, args.train_tokens
        )
        print(
            f"| {writers} | {r['disk_TB']:.1f} | {r['forward_h']:.1f} | {r['store_write_h']:.1f} | "
            f"{r['extract_h']:.1f} | {r['train_h']:.1f} |"
        )


if __name__ == "__main__":
    main()
