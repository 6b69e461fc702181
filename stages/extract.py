"""Snakemake rules extract and extract_part: every layer's residual stream of one split, or
of one part of it ({part}: whole shards of a sequence range), into a zarr store."""

from pathlib import Path

from pipeline.extract import extract, extract_part
from pipeline.logs import run_stage
from pipeline.provenance import write_json_atomic
from pipeline.workflow import typed


def main() -> None:
    p, w = snakemake.params, snakemake.wildcards
    args = (Path(p.model_dir), Path(snakemake.input.split), Path(p.store), typed(p.extract), w.split)
    part = getattr(w, "part", None)
    summary = extract(*args) if part is None else extract_part(*args, int(part))
    write_json_atomic(snakemake.output[0], summary)


run_stage(snakemake, main)
