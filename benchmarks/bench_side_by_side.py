"""Two 1-thread jobs side by side against one 2-thread job, on evaluation's own work.

    .venv/bin/python benchmarks/bench_side_by_side.py [--units 2 --rounds 2]

Whether the rules should take one thread each, so that Snakemake runs two jobs at once on
a 2-core machine (measured: no; see benchmarks/RESULTS.md). One "unit" is
``evaluate_tensors`` on one 1,024-token chunk of SmolLM2's shapes (4 layers, logit + affine
lens, every metric; see bench_evaluate.py).
Arm "one job": a single process with 2 torch threads does 2 x ``--units`` units. Arm "side
by side": two processes with 1 thread each do ``--units`` units at once. Both arms are
timed from process start to the last exit, so imports and set-up count as they do in a job.
Rounds alternate the arms; the best round of each is kept. Last line:
``ratio=X`` = one job's time / side by side's (above 1: side by side is faster).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

WORKER = """
import sys, tempfile, numpy as np, torch
sys.path[:0] = [{root!r}, {bench!r}]
from bench_evaluate import SEQ_LEN, lenses
from pipeline.evaluate import Job, evaluate_tensors
lens = lenses(576, 49152, 4)
g = torch.Generator().manual_seed(0)
x, ids = torch.randn(5, 1024, 576, generator=g) * 4, torch.randint(0, 49152, (1024,), generator=g)
with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
    job = Job(store="", model_dir="", lens_dirs=(), seq_len=SEQ_LEN, n_layers=4, topk=5, n_bins=10, token_dir=tmp)
    for _ in range({units}):
        evaluate_tensors(job, lens, x, ids, tuple(range(4)), np.full(1024, 4, np.int64), 0)
"""


def run_arm(procs: int, threads: int, units: int) -> float:
    here = Path(__file__).resolve().parent
    code = WORKER.format(root=str(here.parent), bench=str(here), units=units)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    running = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(procs)]
    if any(p.wait() for p in running):
        raise SystemExit("a worker failed")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--units", type=int, default=2, help="units per side-by-side process")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    best = {"one job, 2 threads": float("inf"), "side by side, 1 thread each": float("inf")}
    for _ in range(a.rounds):
        best["one job, 2 threads"] = min(best["one job, 2 threads"], run_arm(1, 2, 2 * a.units))
        best["side by side, 1 thread each"] = min(best["side by side, 1 thread each"], run_arm(2, 1, a.units))
    for name, s in best.items():
        print(f"{name:28s} {s:6.1f} s for {2 * a.units} units")
    print(f"ratio={best['one job, 2 threads'] / best['side by side, 1 thread each']:.2f}")


if __name__ == "__main__":
    main()
