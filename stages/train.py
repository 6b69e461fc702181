"""Snakemake rule train: one tuned lens (one translator kind) from the cached activations."""
from pathlib import Path

import torch

from pipeline.config import parse_config
from pipeline.logs import run_stage
from pipeline.train import train


def main() -> None:
    torch.set_num_threads(snakemake.threads)
    cfg = parse_config(snakemake.config).train
    p = snakemake.params
    train(Path(p.train_store), Path(p.val_store), Path(p.model_dir), Path(p.lens_dir), cfg,
          snakemake.wildcards.kind)


run_stage(snakemake, main)  # noqa: F821 (snakemake is injected by the script directive)
