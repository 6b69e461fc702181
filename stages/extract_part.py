"""Snakemake rule extract_part: whole shards of one sequence range of a split (one job per part)."""
from pathlib import Path

import torch

from pipeline.config import parse_config
from pipeline.extract import extract_part
from pipeline.logs import run_stage
from pipeline.provenance import write_json_atomic


def main() -> None:
    torch.set_num_threads(snakemake.threads)
    cfg = parse_config(snakemake.config).extract
    p, w = snakemake.params, snakemake.wildcards
    summary = extract_part(Path(p.model_dir), Path(snakemake.input.split), Path(p.store), cfg, w.split, int(w.part))
    write_json_atomic(snakemake.output[0], summary)


run_stage(snakemake, main)  # noqa: F821 (snakemake is injected by the script directive)
