"""Held-out KL vs training steps, identity start vs least-squares start.

    .venv/bin/python benchmarks/train_curves.py [--layers 3 12 21] [--steps 60] [--optimizers sgd adam]

Trains affine lenses on the default train store with each (optimizer, init) pair, records
the validation KL every `--every` steps (from the train log), and prints one table per
layer: rows = steps, columns = runs, plus the logit lens for reference.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import TrainConfig
from pipeline.train import train

STORES = ROOT / "data/stores/smollm2-135m/shakespeare"
MODEL = ROOT / "data/models/smollm2-135m"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 12, 21])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--val-tokens", type=int, default=1024)
    ap.add_argument("--optimizers", nargs="+", default=["sgd", "adam"])
    args = ap.parse_args()
    curves, logit = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for opt in args.optimizers:
            for init in ("identity", "lstsq"):
                cfg = TrainConfig(
                    layers=args.layers,
                    steps=args.steps,
                    optimizer=opt,
                    init=init,
                    eval_every=args.every,
                    val_tokens=args.val_tokens,
                    patience=0,
                    checkpoint_every=0,
                )
                out = Path(tmp) / f"{opt}-{init}"
                metrics = train(STORES / "train.zarr", STORES / "validation.zarr", MODEL, out, cfg, "affine")
                logit = metrics["val_kl_logit_lens"]
                log = pd.read_parquet(out / "train_log.parquet").dropna(subset=["val_kl"])
                curves[f"{opt}/{init}"] = log.pivot(index="step", columns="layer", values="val_kl")
    print(f"validation KL (nats) on {args.val_tokens} tokens; batch 512 tokens/step; affine translators")
    for layer in args.layers:
        table = pd.DataFrame({run: c[layer] for run, c in curves.items()})
        print(f"\nlayer {layer} (logit lens {logit[str(layer)]:.2f})")
        print(table.round(3).to_markdown())


if __name__ == "__main__":
    main()
