"""GPU throughput of the extract and train stages, side by side with their baselines.

Runs on a CUDA machine without the real weights (they are not shipped there): a randomly
initialised model with SmolLM2-135M's exact architecture, which costs the same FLOPs.

    python benchmarks/gpu_bench.py [--tokens 65536] [--small]   # --small: CPU smoke test

Prints, each measured in this one process:
1. bare forward (bf16) tokens/s vs the real `extract()` call for several store codecs;
2. the real training loop (`run_training`, bf16 autocast) token-layers/s vs only the
   unembedding matmul + log-softmax forward/backward on the same shapes;
3. one whole `train()` call.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import _sync as sync
from bench_train import baseline_rate, training_rate

from pipeline.config import ExtractConfig, TrainConfig
from pipeline.extract import extract, load_model
from pipeline.model.head import load_unembed_head
from pipeline.model.prepare import MARKER, weights_hash
from pipeline.provenance import write_json_atomic
from pipeline.store.reader import open_store

SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)
SMALL = dict(
    SMOLLM2,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2048,
)


def make_inputs(root: Path, arch: dict, n_tokens: int, seq_len: int) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import write_packed_split

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**arch))
    model.save_pretrained(root / "model")
    write_json_atomic(
        root / "model" / MARKER,
        {
            "name": "random-smollm2",
            "source": "random",
            "model_type": "llama",
            "weights_sha256": weights_hash(root / "model"),
            "tokenizer_sha256": "none",
            "d_model": arch["hidden_size"],
            "n_layers": arch["num_hidden_layers"],
        },
    )
    for split, n in (("train", n_tokens), ("validation", 4 * seq_len)):
        write_packed_split(root / f"{split}.npz", n_seq=n // seq_len, seq_len=seq_len, vocab=arch["vocab_size"])
    return root / "model", root / "train.npz"


@torch.no_grad()
def bare_forward(model_dir: Path, split: Path, device, dtype, batch: int) -> float:
    import numpy as np

    model = load_model(model_dir, device, dtype)
    tokens = torch.from_numpy(np.load(split)["tokens"]).long().to(device)
    model(input_ids=tokens[:batch], use_cache=False)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for s in range(0, len(tokens), batch):
        model(input_ids=tokens[s : s + batch], use_cache=False)
    sync(device)
    return tokens.numel() / (time.perf_counter() - t0)


def extract_rate(model_dir, split, store: Path, cfg: ExtractConfig, n_tokens: int) -> float:
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    extract(model_dir, split, store, cfg, "train")
    return n_tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=64, help="sequences per forward pass")
    ap.add_argument("--small", action="store_true", help="tiny model on CPU (smoke test)")
    args = ap.parse_args()
    device = torch.device("cpu" if args.small else "cuda")
    dtype = torch.float32 if args.small else torch.bfloat16
    arch, seq_len = (SMALL, 64) if args.small else (SMOLLM2, 256)
    root = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    if device.type == "cuda":
        print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    model_dir, split = make_inputs(root, arch, args.tokens, seq_len)
    fw = bare_forward(model_dir, split, device, dtype, args.batch)
    print(f"bare forward: {fw:,.0f} tokens/s (batch {args.batch} x {seq_len})", flush=True)
    for compression, level in (("none", 0), ("zstd", 1), ("zstd", 3)):
        cfg = ExtractConfig(
            device=device.type,
            batch_size=args.batch,
            shard_tokens=16 * seq_len,
            chunk_tokens=512 if not args.small else 64,
            compression=compression,
            level=max(level, 1),
            max_tokens={"train": None},
        )
        ex = extract_rate(model_dir, split, root / "train.zarr", cfg, args.tokens)
        print(f"extract ({compression} {level}): {ex:,.0f} tokens/s  RATIO extract/forward {ex / fw:.3f}", flush=True)
    head = load_unembed_head(model_dir).to(device)
    for batch_tokens in (256,) if args.small else (2048, 8192):
        tcfg = TrainConfig(
            steps=6,
            batch_tokens=batch_tokens,
            buffer_shards=4,
            eval_every=10**6,
            checkpoint_every=0,
            patience=0,
            device=device.type,
        )
        store = open_store(root / "train.zarr")
        tr = training_rate(head, store, list(range(store.n_layers)), tcfg, device)
        base = baseline_rate(head, store.n_layers, 6, batch_tokens, device)
        print(
            f"train batch {batch_tokens}: {tr:,.0f} token-layers/s; baseline {base:,.0f}; "
            f"RATIO train/baseline {tr / base:.3f}",
            flush=True,
        )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
