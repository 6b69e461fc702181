"""Cross-process reproducibility of training: identical runs in separate processes, some
while another process loads every core, compared bitwise (lens weights and validation KL).

    .venv/bin/python benchmarks/repro_train.py --runs 10 --loaded 4

Needs the default train and validation stores (`make run`, or the extract rules). Each run
is a fresh `python` process training the same lens (default config, a few layers so that
a run takes ~half a minute); run 0 is the reference. A last run with one torch thread
shows whether the result depends on the thread count. Last line:
``runs=N bitwise_equal=M loaded=K one_thread_equal=B``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORES = ROOT / "data/stores/smollm2-135m/shakespeare"
MODEL = ROOT / "data/models/smollm2-135m"

TRAIN = """
import sys, json, torch
from dataclasses import replace
from pathlib import Path
from pipeline.config import load_config
from pipeline.train import train
threads, layers, out = int(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3])
torch.set_num_threads(threads)
cfg = replace(load_config("config/config.yaml").train, layers=layers)
stores = Path(sys.argv[4])
m = train(stores / "train.zarr", stores / "validation.zarr", Path(sys.argv[5]), out, cfg, "affine")
print(json.dumps(m["val_kl"]))
"""

BURNER = """
import torch
torch.set_num_threads(2)
a = torch.randn(1536, 1536)
while True:
    a = torch.tanh(a @ a)
"""


def one_run(out: Path, layers: list[int], threads: int, loaded: bool) -> dict:
    burner = subprocess.Popen([sys.executable, "-c", BURNER]) if loaded else None
    try:
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", TRAIN, str(threads), json.dumps(layers), str(out), str(STORES), str(MODEL)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        seconds = time.perf_counter() - t0
    finally:
        if burner:
            burner.kill()
            burner.wait()
    weights = hashlib.sha256((out / "translators.safetensors").read_bytes()).hexdigest()
    return {
        "val_kl": json.loads(done.stdout.strip().splitlines()[-1]),
        "sha256": weights,
        "seconds": seconds,
        "threads": threads,
        "loaded": loaded,
    }


def difference(tmp: Path, i: int, r: dict, ref: dict) -> str:
    """How far run ``i`` is from run 0: max |dW| relative to max |W|, max |d val_kl|."""
    from safetensors.torch import load_file

    w, w0 = (load_file(tmp / f"run{j}" / "translators.safetensors") for j in (i, 0))
    rel = max(float((w[k] - w0[k]).abs().max() / w0[k].abs().max().clamp_min(1e-30)) for k in w0)
    dkl = max(abs(r["val_kl"][k] - ref["val_kl"][k]) for k in ref["val_kl"])
    return f"max|dW|/max|W| {rel:.1e}, max|d val_kl| {dkl:.1e} nats"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="runs with 2 threads (the first is the reference)")
    ap.add_argument("--loaded", type=int, default=4, help="how many of them run beside a CPU-bound process")
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--data", type=Path, default=ROOT / "data", help="data_dir holding the default stores")
    args = ap.parse_args()
    global STORES, MODEL
    STORES, MODEL = args.data / "stores/smollm2-135m/shakespeare", args.data / "models/smollm2-135m"
    layers = [int(x) for x in args.layers.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        plan = [(2, i >= args.runs - args.loaded) for i in range(args.runs)] + [(1, False)]
        for i, (threads, loaded) in enumerate(plan):
            r = one_run(Path(tmp) / f"run{i}", layers, threads, loaded)
            results.append(r)
            ref = results[0]
            same = r["sha256"] == ref["sha256"] and r["val_kl"] == ref["val_kl"]
            print(
                f"run {i:2d}  threads={threads} loaded={str(loaded):5s} {r['seconds']:6.1f} s  "
                f"weights {r['sha256'][:12]}  val_kl[{layers[-1]}]={r['val_kl'][str(layers[-1])]:.10f}  "
                f"{'bitwise equal' if same else 'DIFFERS: ' + difference(Path(tmp), i, r, ref)}",
                flush=True,
            )
    ref = results[0]
    two = results[:-1]
    equal = sum(r["sha256"] == ref["sha256"] and r["val_kl"] == ref["val_kl"] for r in two)
    one = results[-1]["sha256"] == ref["sha256"] and results[-1]["val_kl"] == ref["val_kl"]
    print(f"runs={len(two)} bitwise_equal={equal} loaded={args.loaded} one_thread_equal={one}")


if __name__ == "__main__":
    main()
