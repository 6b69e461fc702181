"""Snakemake rule compare_models: every run's per-layer curves on a normalised depth axis."""
from pathlib import Path

from pipeline.compare import compare_models
from pipeline.logs import run_stage


def main() -> None:
    compare_models([Path(p) for p in snakemake.input], Path(snakemake.params.out_dir))


run_stage(snakemake, main)  # noqa: F821 (snakemake is injected by the script directive)
