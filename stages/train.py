"""Snakemake rules train and train_group: one tuned lens (one translator kind), or one layer
group of it ({group}: merged by merge_lens), from the cached activations."""

from pathlib import Path

from pipeline.logs import run_stage
from pipeline.train import train, train_group
from pipeline.workflow import typed


def main() -> None:
    p, w = snakemake.params, snakemake.wildcards
    args = (Path(p.train_store), Path(p.val_store), Path(p.model_dir), Path(p.lens_dir), typed(p.train), w.kind)
    group = getattr(w, "group", None)
    if group is None:
        train(*args)
    else:
        train_group(*args, int(group))


run_stage(snakemake, main)
