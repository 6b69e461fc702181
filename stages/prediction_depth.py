"""Snakemake rule prediction_depth: prediction depth and early-exit curves per lens."""
from pathlib import Path

from pipeline.depth import DEFAULT_TAUS, prediction_depth
from pipeline.logs import run_stage


def main() -> None:
    p = snakemake.params
    prediction_depth(Path(p.token_dir), Path(snakemake.input.train_split), Path(p.out_dir),
                     taus=p.taus or DEFAULT_TAUS)


run_stage(snakemake, main)  # noqa: F821 (snakemake is injected by the script directive)
