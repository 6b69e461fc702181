"""Run train or evaluate slowed down, one marker file per unit of work (for kill tests).

    python tests/slowed_stage.py train|evaluate ROOT OUT MARKERS DELAY

ROOT holds model/, train.zarr, test.zarr, test.npz, affine/ (see test_reliability.setup).
Each step (train) or chunk (evaluate) sleeps DELAY s and then drops a file in MARKERS,
so a test can SIGKILL the process after a chosen amount of work.
"""

import sys
import time
from pathlib import Path

import torch

import pipeline.evaluate as ev
import pipeline.train as tr
from pipeline.config import EvaluateConfig, TrainConfig

TRAIN = {
    "steps": 6,
    "batch_tokens": 64,
    "val_tokens": 64,
    "eval_every": 2,
    "patience": 0,
    "checkpoint_every": 1,
    "init": "identity",
    "optimizer": "adam",
}
EVALUATE = {"max_tokens": None, "chunk_tokens": 16, "bootstrap": 50}
IDENT = {"model": "tiny", "revision": None, "corpus": "rand", "split": "test"}


def slowed(fn, markers: Path, delay: float):
    def wrapper(*a, **k):
        out = fn(*a, **k)
        time.sleep(delay)
        n = len(list(markers.iterdir()))
        (markers / f"{n:04d}").touch()
        return out

    return wrapper


def run(stage: str, root: Path, out: Path, markers: Path | None = None, delay: float = 0.0) -> None:
    torch.set_num_threads(1)
    if markers is not None:
        markers.mkdir(parents=True, exist_ok=True)
        if stage == "train":
            tr.train_step = slowed(tr.train_step, markers, delay)
        else:
            ev.evaluate_chunk = slowed(ev.evaluate_chunk, markers, delay)
    if stage == "train":
        tr.train(root / "train.zarr", root / "test.zarr", root / "model", out, TrainConfig(**TRAIN), "affine")
    else:
        ev.evaluate(
            root / "test.zarr",
            root / "test.npz",
            root / "model",
            {"affine": root / "affine"},
            EvaluateConfig(**EVALUATE),
            out,
            IDENT,
        )


if __name__ == "__main__":
    stage, root, out, markers, delay = sys.argv[1:6]
    run(stage, Path(root), Path(out), Path(markers), float(delay))
