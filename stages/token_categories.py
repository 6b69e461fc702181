"""Snakemake rule token_categories: logit vs tuned lens by category of the predicted token."""
from pathlib import Path

from pipeline.categories import token_categories
from pipeline.logs import run_stage


def main() -> None:
    p = snakemake.params
    token_categories(Path(p.token_dir), Path(p.model_dir), Path(p.out_dir), translator=p.translator)


run_stage(snakemake, main)  # noqa: F821 (snakemake is injected by the script directive)
