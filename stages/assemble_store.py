"""Snakemake rule assemble_store: link a split's extraction parts into one store."""

from pathlib import Path

from pipeline.logs import run_stage
from pipeline.provenance import write_json_atomic
from pipeline.store.parts import assemble_store


def main() -> None:
    p = snakemake.params
    summary = assemble_store([Path(x) for x in p.parts], Path(p.store))
    write_json_atomic(snakemake.output[0], summary)


run_stage(snakemake, main)
