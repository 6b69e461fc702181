"""Snakemake rule prepare_model: any causal LM -> a local Hugging Face model directory."""

from pathlib import Path

from pipeline.logs import run_stage
from pipeline.model.prepare import prepare_model
from pipeline.workflow import typed


def main() -> None:
    p = snakemake.params
    prepare_model(typed(p.model), Path(p.model_dir), Path(p.cache_dir))


run_stage(snakemake, main)
