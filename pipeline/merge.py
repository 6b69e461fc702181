"""Merge the lenses of layer groups (trained by separate jobs) into one lens.

A group is an ordinary lens with translators for some layers; the merged lens has the
union (``TunedLens.merge`` refuses overlapping groups or groups of different models or
kinds), their validation metrics, and their training logs concatenated.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .lens.tuned import TunedLens, read_lens_meta
from .model.head import load_unembed_head
from .tables import write_table


def merge_lens(group_dirs: list[Path], model_dir: Path, out_dir: Path) -> TunedLens:
    """Write the union of the group lenses at ``out_dir`` (lens + train_log.parquet)."""
    head = load_unembed_head(model_dir)
    lenses = [TunedLens.load(d, head=head, model_dir=model_dir) for d in group_dirs]
    merged = lenses[0]
    for other in lenses[1:]:
        merged = merged.merge(other)
    metas = [read_lens_meta(Path(d)) for d in group_dirs]
    metrics = {"groups": [m.get("metrics") for m in metas], "group_dirs": [str(d) for d in group_dirs]}
    for key in ("val_kl", "val_kl_logit_lens", "val_kl_init"):
        metrics[key] = {k: v for m in metas for k, v in (m.get("metrics") or {}).get(key, {}).items()}
    config = dict(metas[0].get("training_config") or {})
    config["layers"] = merged.layers
    merged.save(out_dir, training_config=config, metrics=metrics)
    logs = [pq.read_table(Path(d) / "train_log.parquet") for d in group_dirs]
    # by step, then depth order: at one layer "block" before "attention" (descending names)
    table = pa.concat_tables(logs).sort_by([("step", "ascending"), ("layer", "ascending"), ("position", "descending")])
    write_table(table.replace_schema_metadata(logs[0].schema.metadata), Path(out_dir) / "train_log.parquet")
    return merged
