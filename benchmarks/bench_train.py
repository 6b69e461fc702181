"""Train-stage benchmark: lens training vs the unavoidable unembedding work, side by side.

Run (after `make run` has built the default stores):

    .venv/bin/python benchmarks/bench_train.py [--layers 10] [--steps 4] [--rounds 2]

Training a lens is bound by the unembedding: per layer and token, a (d_model x vocab)
matmul forward, its input-gradient matmul backward, and a softmax over the vocabulary.
This script times, in one process on the same shapes (batch_tokens x d_model x vocab):

(a) the real training loop (`pipeline.train.run_training`: store reads, shuffling, the
    shared target distribution, translators, the frozen head, KL, backward, clipping,
    optimizer) in token-layers/s, without the one-off setup and validation;
(b) only `log_softmax(h @ W_U^T)` forward and backward for the same number of layers;

and prints the ratio (a)/(b). It also times one whole `train()` call with the default
config (setup, least squares, validation included) for orientation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import TrainConfig, load_config
from pipeline.lens.tuned import TunedLens
from pipeline.model.head import load_unembed_head
from pipeline.store.reader import open_store
from pipeline.train import TrainState, autocast, make_optimizer, run_training, train

MODEL = ROOT / "data/models/smollm2-135m"
STORES = ROOT / "data/stores/smollm2-135m/shakespeare"


class NoValidation:
    def kl(self, lens, layers=None):  # validation is off in this benchmark
        return {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CPU = torch.device("cpu")


def training_rate(head, store, layers, cfg: TrainConfig, device=CPU) -> float:
    """Token-layers/s of the real training loop (no setup, no validation)."""
    lens = TunedLens.create(
        head, "affine", d_model=store.d_model, n_layers=store.n_layers, model_info={}, layers=layers
    ).to(device)
    opt, sched = make_optimizer(lens, cfg)
    _sync(device)
    t0 = time.perf_counter()
    run_training(lens, store, NoValidation(), cfg, TrainState(), opt, sched, (Path("/dev/null"), ""), device)
    _sync(device)
    return cfg.steps * cfg.batch_tokens * len(layers) / (time.perf_counter() - t0)


def baseline_rate(head, n_layers: int, steps: int, batch: int, device=CPU) -> float:
    """log_softmax(h W^T) forward + backward (input gradient only), nothing else; bf16
    autocast on CUDA as training uses."""
    weight = head.unembed.weight.detach().to(device)  # (vocab, d_model)
    p = torch.softmax(torch.randn(batch, weight.shape[0], device=device), -1)  # (batch, vocab)
    h = torch.randn(batch, weight.shape[1], device=device, requires_grad=True)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        for _ in range(n_layers):
            with autocast(device):
                z = h @ weight.T  # (batch, vocab)
            (torch.log_softmax(z.float(), dim=-1) * p).sum().backward()
    _sync(device)
    return steps * batch * n_layers / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=10, help="evenly spaced layers to train")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also time one whole default train() call")
    args = ap.parse_args()
    store = open_store(STORES / "train.zarr")
    head = load_unembed_head(MODEL)
    layers = [round(i * (store.n_layers - 1) / max(args.layers - 1, 1)) for i in range(args.layers)]
    cfg = TrainConfig(steps=args.steps, eval_every=10**6, checkpoint_every=0, patience=0)
    a, b = [], []
    for _ in range(args.rounds):
        a.append(training_rate(head, store, layers, cfg))
        b.append(baseline_rate(head, len(layers), args.steps, cfg.batch_tokens))
    print(
        f"threads={torch.get_num_threads()} layers={len(layers)} steps={args.steps} "
        f"batch_tokens={cfg.batch_tokens} d_model={store.d_model} vocab={head.unembed.weight.shape[0]}"
    )
    print(f"training  token-layers/s: {' '.join(f'{v:.0f}' for v in a)}")
    print(f"baseline  token-layers/s: {' '.join(f'{v:.0f}' for v in b)}")
    print(f"RATIO training/baseline: {sum(a) / sum(b):.3f}")
    if args.full:
        default = load_config(ROOT / "config/config.yaml").train
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            train(
                STORES / "train.zarr",
                STORES / "validation.zarr",
                MODEL,
                Path(tmp) / "lens",
                replace(default, checkpoint_every=0),
                "affine",
            )
            print(
                f"whole default train() call (all layers, setup + least squares + validation): "
                f"{time.perf_counter() - t0:.0f} s"
            )


if __name__ == "__main__":
    main()
