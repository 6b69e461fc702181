"""How many steps the translator kinds without a least-squares start need to catch up.

    .venv/bin/python benchmarks/kind_budgets.py [--layers 6 18] [--steps 200] [--runs mlp:adam:1 scaling:sgd:1]

`affine` and `linear` start from the closed-form least-squares fit; `mlp` and `scaling`
start at the identity (the logit lens) and have only their KL steps. Each run trains one
kind on the default train store (batch 512 tokens, validation on 1,024 tokens every
steps/8 steps, no early stopping), and the table gives the validation KL per step beside
the default affine lens's (least squares + 8 steps), as measured by the same validation.
Runs are `kind:optimizer:lr_scale`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

# The default run's stores and model, and the library on the path: as train_curves.py.
from train_curves import MODEL, STORES, TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 18])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--runs", nargs="+", default=["mlp:sgd:1", "mlp:adam:1", "scaling:sgd:1"])
    args = ap.parse_args()
    val = dict(val_tokens=1024, patience=0, checkpoint_every=0, layers=args.layers)
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref = train(
            STORES / "train.zarr",
            STORES / "validation.zarr",
            MODEL,
            Path(tmp) / "affine",
            TrainConfig(**val, eval_every=4),
            "affine",
        )["val_kl"]
        for run in args.runs:
            kind, opt, lr = run.split(":")
            cfg = TrainConfig(
                **val, steps=args.steps, optimizer=opt, lr_scale=float(lr), eval_every=max(1, args.steps // 8)
            )
            t0 = time.monotonic()
            train(STORES / "train.zarr", STORES / "validation.zarr", MODEL, Path(tmp) / run, cfg, kind)
            log = pd.read_parquet(Path(tmp) / run / "train_log.parquet").dropna(subset=["val_kl"])
            curves[f"{run} ({time.monotonic() - t0:.0f} s)"] = log.pivot(index="step", columns="layer", values="val_kl")
    print(
        "validation KL (nats) on 1,024 tokens, batches of 512 tokens; the default affine lens: "
        + ", ".join(f"layer {k} {v:.3f}" for k, v in sorted(ref.items(), key=lambda kv: int(kv[0])))
    )
    for layer in args.layers:
        print(f"\nlayer {layer}")
        print(pd.DataFrame({run: c[layer] for run, c in curves.items()}).round(3).to_markdown())


if __name__ == "__main__":
    main()
