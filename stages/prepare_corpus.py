"""Snakemake rule prepare_corpus: split, tokenize and pack a corpus with a model's tokenizer."""

from pathlib import Path

from pipeline.corpus import prepare_corpus
from pipeline.logs import run_stage
from pipeline.workflow import typed


def main() -> None:
    p = snakemake.params
    prepare_corpus(typed(p.corpus), Path(p.model_dir), Path(p.out_dir), Path(p.cache_dir))


run_stage(snakemake, main)
