"""Snakemake rule prepare_model: any causal LM -> a local Hugging Face model directory."""
from pathlib import Path

import torch

from pipeline.config import parse_config
from pipeline.logs import run_stage
from pipeline.model import prepare_model


def main() -> None:
    torch.set_num_threads(snakemake.threads)
    cfg = parse_config(snakemake.config).model(snakemake.wildcards.model)
    prepare_model(cfg, Path(snakemake.params.model_dir), Path(snakemake.params.cache_dir))


run_stage(snakemake, main)  # noqa: F821 (snakemake is injected by the script directive)
