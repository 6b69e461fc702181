"""Extract-stage benchmark: extraction vs the bare forward pass, storage and read costs.

Run (after `make run` has prepared the default model and corpus):

    .venv/bin/python benchmarks/bench_extract.py [--batches 4] [--rounds 2]

Everything is measured side by side in one process with the same settings, and printed as
ratios (the machines are noisy; absolute times are for orientation only):

1. throughput of the real `extract()` call (model load, logits check, background shard
   writes, everything) over the bare `model(input_ids)` forward pass, on the same batches;
2. bytes per stored value and compression ratio for each codec on the same activations;
3. read throughput (decoded float32 GB/s) for one layer over all tokens (training's read)
   and all layers over one batch of tokens (evaluation's read), for several inner-chunk
   sizes, which is how the default chunking was chosen.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import ExtractConfig
from pipeline.corpus import load_split
from pipeline.extract import extract, load_model
from pipeline.store.info import measure_compression
from pipeline.store.reader import open_store
from pipeline.store.writer import StoreWriter

MODEL = ROOT / "data/models/smollm2-135m"
SPLIT = ROOT / "data/corpora/shakespeare/smollm2-135m/test.npz"


def bare_forward(model, tokens: torch.Tensor, batch_size: int) -> float:
    """Tokens/s of the plain forward pass (logits included) over ``tokens``."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(tokens), batch_size):
            model(input_ids=tokens[s : s + batch_size], use_cache=False)
    return tokens.numel() / (time.perf_counter() - t0)


def extract_rate(n_tokens: int, batch_size: int, tmp: Path) -> float:
    """Tokens/s of the whole extract() call writing a bf16/zstd store of ``n_tokens``."""
    out = tmp / "bench.zarr"
    shutil.rmtree(out, ignore_errors=True)
    cfg = ExtractConfig(max_tokens={"test": n_tokens}, batch_size=batch_size, seed=0)
    t0 = time.perf_counter()
    extract(MODEL, SPLIT, out, cfg, "test")
    return n_tokens / (time.perf_counter() - t0)


def write_variant(src, out: Path, compression: str, chunk_tokens: int) -> None:
    p = src.attrs["params"]
    with StoreWriter.open(
        out,
        n_layers=src.n_layers,
        d_model=src.d_model,
        n_tokens=src.n_tokens,
        seq_len=src.seq_len,
        dtype="bfloat16",
        shard_tokens=p["shard_tokens"],
        chunk_tokens=chunk_tokens,
        compression=compression,
        provenance={"bench": True},
    ) as w:
        for s in range(0, src.n_tokens, p["shard_tokens"]):
            e = min(s + p["shard_tokens"], src.n_tokens)
            w.write(src.layers(range(src.n_layers + 1), s, e), src.tokens(s, e))


def read_rates(path: Path, batch_tokens: int) -> tuple[float, float]:
    """Decoded GB/s for (one layer, all tokens) and (all layers, one batch of tokens)."""
    store = open_store(path)
    t0 = time.perf_counter()
    x = store.layers(store.n_layers // 2)  # (n_tokens, d_model)
    one = x.numel() * 4 / (time.perf_counter() - t0) / 1e9
    t0 = time.perf_counter()
    n = 0
    for s in range(0, store.n_tokens, batch_tokens):
        n += store.layers(range(store.n_layers + 1), s, s + batch_tokens).numel()
    return one, n * 4 / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=4, help="batches of 8 x 256 tokens per arm")
    ap.add_argument("--rounds", type=int, default=2, help="alternating forward/extract rounds")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    batch = 8
    packed = load_split(SPLIT)
    n_tokens = args.batches * batch * packed.meta["seq_len"]
    # the same sequences extract() selects, so both arms see identical inputs
    from pipeline.sampling import select_sequences

    idx = select_sequences(len(packed.tokens), n_tokens // packed.meta["seq_len"], 0)
    tokens = torch.from_numpy(packed.tokens[idx]).long()
    model = load_model(MODEL, torch.device("cpu"), torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        bare_forward(model, tokens[:batch], batch)  # warm-up
        fw, ex = [], []
        for _ in range(args.rounds):
            fw.append(bare_forward(model, tokens, batch))
            ex.append(extract_rate(n_tokens, batch, tmp))
        print(f"threads={torch.get_num_threads()} tokens/arm={n_tokens} rounds={args.rounds}")
        print(f"forward  tokens/s: {' '.join(f'{v:.0f}' for v in fw)}")
        print(f"extract  tokens/s: {' '.join(f'{v:.0f}' for v in ex)}")
        print(f"RATIO extract/forward (mean of rounds): {sum(ex) / sum(fw):.3f}")
        storage(tmp / "bench.zarr", tmp, batch * packed.meta["seq_len"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def storage(src_path: Path, tmp: Path, batch_tokens: int) -> None:
    src = open_store(src_path)
    values = (src.n_layers + 1) * src.n_tokens * src.d_model
    print(f"\nstore: {src.n_layers + 1} layers x {src.n_tokens} tokens x {src.d_model} (bf16)")
    print(
        f"{'compression':12} {'chunk':>6} {'bytes/value':>11} {'ratio':>6} {'1-layer GB/s':>13} {'all-layers GB/s':>16}"
    )
    for compression, chunk in [("none", 512), ("zstd", 512), ("blosc-zstd", 512), ("zstd", 128), ("zstd", 2048)]:
        out = tmp / f"{compression}-{chunk}.zarr"
        write_variant(src, out, compression, chunk)
        c = measure_compression(out)
        one, allr = read_rates(out, batch_tokens)
        print(
            f"{compression:12} {chunk:>6} {c['stored_bytes'] / values:>11.3f} {c['ratio']:>6.2f} "
            f"{one:>13.2f} {allr:>16.2f}"
        )
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
