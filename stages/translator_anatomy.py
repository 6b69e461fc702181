"""Snakemake rule translator_anatomy: distance from identity, spectra, bias, adjacent similarity."""
from pathlib import Path

import torch

from pipeline.anatomy import translator_anatomy
from pipeline.logs import run_stage


def main() -> None:
    torch.set_num_threads(snakemake.threads)
    p = snakemake.params
    translator_anatomy(Path(p.lens_dir), Path(p.model_dir), Path(p.out_dir))


run_stage(snakemake, main)  # noqa: F821 (snakemake is injected by the script directive)
