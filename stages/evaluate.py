"""Snakemake rule evaluate: logit vs tuned lenses on the held-out split -> Parquet tables."""
from pathlib import Path

import torch

from pipeline.config import parse_config
from pipeline.evaluate import evaluate
from pipeline.logs import run_stage


def main() -> None:
    torch.set_num_threads(snakemake.threads)
    cfg = parse_config(snakemake.config)
    w, p = snakemake.wildcards, snakemake.params
    model = cfg.model(w.model)
    identity = {"model": w.model, "revision": model.revision, "corpus": w.corpus, "split": cfg.evaluate.split}
    evaluate(Path(p.store), Path(snakemake.input.split), Path(p.model_dir),
             {k: Path(v) for k, v in p.lens_dirs.items()}, cfg.evaluate, Path(p.out_dir), identity,
             threads=snakemake.threads)


run_stage(snakemake, main)  # noqa: F821 (snakemake is injected by the script directive)
