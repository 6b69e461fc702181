"""Snakemake rule report: plots and one self-contained HTML (+ Markdown) report."""
from pathlib import Path

from pipeline.logs import run_stage
from pipeline.report import DEFAULT_PROMPTS, write_report


def main() -> None:
    p = snakemake.params
    runs = [dict(r, lens_dirs={k: Path(v) for k, v in r["lens_dirs"].items()}) for r in p.runs]
    write_report(runs, Path(p.out_dir), p.prompts if p.prompts is not None else DEFAULT_PROMPTS,
                 Path(p.compare) if p.compare else None)


run_stage(snakemake, main)  # noqa: F821 (snakemake is injected by the script directive)
