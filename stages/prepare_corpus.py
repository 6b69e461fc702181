"""Snakemake rule prepare_corpus: split, tokenize and pack a corpus with a model's tokenizer."""
from pathlib import Path

from pipeline.config import parse_config
from pipeline.corpus import prepare_corpus
from pipeline.logs import run_stage


def main() -> None:
    cfg = parse_config(snakemake.config).corpus(snakemake.wildcards.corpus)
    prepare_corpus(cfg, Path(snakemake.params.model_dir), Path(snakemake.params.out_dir),
                   Path(snakemake.params.cache_dir))


run_stage(snakemake, main)  # noqa: F821 (snakemake is injected by the script directive)
