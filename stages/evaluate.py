"""Snakemake rules evaluate and evaluate_across: logit vs tuned lenses on a held-out split -> Parquet tables."""

from pathlib import Path

from pipeline.evaluate import evaluate
from pipeline.logs import run_stage
from pipeline.workflow import typed


def main() -> None:
    w, p = snakemake.wildcards, snakemake.params
    cfg = typed(p.evaluate)
    identity = {
        "model": w.model,
        "revision": p.revision,
        "corpus": w.corpus,
        "train_corpus": p.train_corpus,
        "split": cfg.split,
    }
    evaluate(
        Path(p.store),
        Path(snakemake.input.split),
        Path(p.model_dir),
        {k: Path(v) for k, v in p.lens_dirs.items()},
        cfg,
        Path(p.out_dir),
        identity,
        threads=snakemake.threads,
    )


run_stage(snakemake, main)
