"""The training log table: one row per (step, position, layer) with the train loss and, at
validation steps, the validation KL. Written as Parquet next to the lens."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from .positions import BLOCK, depth_rank
from .tables import write_table

SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("step", pa.int64()),
        ("layer", pa.int64()),
        ("position", pa.string()),
        ("train_loss", pa.float64()),
        ("val_kl", pa.float64()),
        ("lr", pa.float64()),
    ]
)


def write_train_log(path: Path, history: list[dict], kind: str, provenance: dict) -> None:
    """Merge train and validation records of the same (step, position, layer) into one row;
    rows by step, then in depth order (block 0, attention 0, block 1, ...). A record without
    a position is the block position's."""
    rows: dict[tuple[int, tuple[int, float]], dict] = {}
    for rec in history:
        key = (rec.get("position", BLOCK.name), rec["layer"])
        row = rows.setdefault(
            (rec["step"], depth_rank(key)),
            {
                "kind": kind,
                "step": rec["step"],
                "layer": rec["layer"],
                "position": key[0],
                "train_loss": None,
                "val_kl": None,
                "lr": None,
            },
        )
        row.update({k: v for k, v in rec.items() if k in ("train_loss", "val_kl", "lr")})
    schema = SCHEMA.with_metadata({"lenspipe": json.dumps(provenance, default=str)})
    table = pa.Table.from_pylist([rows[k] for k in sorted(rows)], schema=schema)
    write_table(table, path)
