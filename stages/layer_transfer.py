"""Snakemake rule layer_transfer: the translator of layer i on the hidden states of layer j."""
from pathlib import Path

import torch

from pipeline.logs import run_stage
from pipeline.transfer import layer_transfer


def main() -> None:
    torch.set_num_threads(snakemake.threads)
    p = snakemake.params
    layer_transfer(Path(p.store), Path(p.model_dir), Path(p.lens_dir), Path(p.out_dir),
                   sample_tokens=p.tokens, layer_stride=p.stride)


run_stage(snakemake, main)  # noqa: F821 (snakemake is injected by the script directive)
