"""Snakemake rule report: plots and one self-contained HTML (+ Markdown) report."""

from pathlib import Path

from pipeline.logs import run_stage
from pipeline.report import report
from pipeline.workflow import typed


def main() -> None:
    p = snakemake.params
    runs = [run.declaring(snakemake.input) for run in p.runs]  # reads only what its rule declares
    report(runs, p.kinds, Path(p.out_dir), typed(p.report).prompts, p.with_analyses)


run_stage(snakemake, main)
