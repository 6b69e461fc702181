"""The training log table: one row per (step, layer) with the train loss and, at
validation steps, the validation KL. Written as Parquet next to the lens."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from .tables import write_table

SCHEMA = pa.schema([
    ("kind", pa.string()), ("step", pa.int64()), ("layer", pa.int64()),
    ("train_loss", pa.float64()), ("val_kl", pa.float64()), ("lr", pa.float64()),
])


def write_train_log(path: Path, history: list[dict], kind: str, provenance: dict) -> None:
    """Merge train and validation records of the same (step, layer) into one row."""
    rows: dict[tuple[int, int], dict] = {}
    for rec in history:
        row = rows.setdefault((rec["step"], rec["layer"]), {"kind": kind, "step": rec["step"],
                                                           "layer": rec["layer"], "train_loss": None,
                                                           "val_kl": None, "lr": None})
        row.update({k: v for k, v in rec.items() if k in ("train_loss", "val_kl", "lr")})
    schema = SCHEMA.with_metadata({"lenspipe": json.dumps(provenance, default=str)})
    table = pa.Table.from_pylist([rows[k] for k in sorted(rows)], schema=schema)
    write_table(table, path)
