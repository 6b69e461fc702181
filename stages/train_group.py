"""Snakemake rule train_group: one layer group of one lens (a separate job; merged by merge_lens)."""
from pathlib import Path

import torch

from pipeline.config import parse_config
from pipeline.logs import run_stage
from pipeline.train import train_group


def main() -> None:
    torch.set_num_threads(snakemake.threads)
    cfg = parse_config(snakemake.config).train
    p, w = snakemake.params, snakemake.wildcards
    train_group(Path(p.train_store), Path(p.val_store), Path(p.model_dir), Path(p.lens_dir), cfg, w.kind,
                int(w.group))


run_stage(snakemake, main)  # noqa: F821 (snakemake is injected by the script directive)
