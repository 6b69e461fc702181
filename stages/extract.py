"""Snakemake rule extract: every layer's residual stream of one split into a zarr store."""
from pathlib import Path

import torch

from pipeline.config import parse_config
from pipeline.extract import extract
from pipeline.logs import run_stage
from pipeline.provenance import write_json_atomic


def main() -> None:
    torch.set_num_threads(snakemake.threads)
    cfg = parse_config(snakemake.config).extract
    summary = extract(Path(snakemake.params.model_dir), Path(snakemake.input.split),
                      Path(snakemake.params.store), cfg, snakemake.wildcards.split)
    write_json_atomic(snakemake.output[0], summary)


run_stage(snakemake, main)  # noqa: F821 (snakemake is injected by the script directive)
