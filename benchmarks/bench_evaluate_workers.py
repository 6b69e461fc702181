"""Evaluation throughput with 1 vs 2 dask.distributed workers, side by side (issue 6).

Each worker is a process with one task slot; torch threads per worker = cores / workers,
so both arms use the same cores. Rounds alternate the arms; prints tokens/s and the ratio.

    .venv/bin/python benchmarks/bench_evaluate_workers.py --tokens 1024 --chunk 256 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

DATA = Path("data")
RUN = dict(model="smollm2-135m", corpus="shakespeare")


def one(n_workers: int, args, cores: int) -> float:
    import torch
    from distributed import Client, LocalCluster

    from pipeline import paths
    from pipeline.config import EvaluateConfig
    from pipeline.evaluate import evaluate

    fill = lambda p, **kw: Path(paths.fill(p, data_dir=DATA, **RUN, **kw))  # noqa: E731
    threads = max(1, cores // n_workers)
    with (
        LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.run(torch.set_num_threads, threads)
        cfg = EvaluateConfig(
            max_tokens=args.tokens,
            chunk_tokens=args.chunk,
            bootstrap=100,
            token_metrics=False,
            scheduler=cluster.scheduler_address,
        )
        out = Path(tempfile.mkdtemp())
        t0 = time.perf_counter()
        evaluate(
            fill(paths.STORE, split="test"),
            fill(paths.CORPUS_SPLIT, split="test"),
            fill(paths.MODEL_DIR),
            {"affine": fill(paths.LENS_DIR, kind="affine")},
            cfg,
            out,
            {"model": RUN["model"], "corpus": RUN["corpus"], "split": "test"},
        )
        seconds = time.perf_counter() - t0
        shutil.rmtree(out)
    return args.tokens / seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for n in (1, 2) if r % 2 == 0 else (2, 1):
            rates[n].append(one(n, args, cores))
            print(f"round {r + 1}: {n} worker(s): {rates[n][-1]:.1f} tok/s", flush=True)
    mean = {n: sum(v) / len(v) for n, v in rates.items()}
    print(
        f"\n{cores} cores, {args.tokens} tokens in chunks of {args.chunk}: 1 worker {mean[1]:.1f} tok/s, "
        f"2 workers {mean[2]:.1f} tok/s, ratio 2/1 = {mean[2] / mean[1]:.2f}"
    )


if __name__ == "__main__":
    main()
