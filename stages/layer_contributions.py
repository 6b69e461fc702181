"""Snakemake rule layer_contributions: tuned-lens KL drop per block vs the real cost of skipping it."""
from pathlib import Path

import torch

from pipeline.contributions import layer_contributions
from pipeline.logs import run_stage


def main() -> None:
    torch.set_num_threads(snakemake.threads)
    p = snakemake.params
    layer_contributions(Path(snakemake.input.tables), Path(p.token_dir), Path(p.model_dir), Path(snakemake.input.split),
                        Path(p.out_dir), translator=p.translator, sample_tokens=p.skip_tokens)


run_stage(snakemake, main)  # noqa: F821 (snakemake is injected by the script directive)
