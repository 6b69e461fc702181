"""Snakemake rule merge_lens: the layer-group lenses of one kind -> one lens."""

from pathlib import Path

from pipeline.logs import run_stage
from pipeline.merge import merge_lens


def main() -> None:
    merge_lens(
        [Path(f).parent for f in snakemake.input.groups],
        Path(snakemake.params.model_dir),
        Path(snakemake.params.lens_dir),
    )


run_stage(snakemake, main)
