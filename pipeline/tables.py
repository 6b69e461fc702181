"""Tidy Parquet tables of the evaluation (schemas documented in docs/reference/tables.md).

``layer_metrics.parquet``: one row per (model, revision, corpus, train_corpus, split, lens,
translator, layer, position); ``calibration.parquet``: one row per (..., lens, translator,
layer, position, bin). ``position`` is the lens position (``pipeline.positions``): ``block``
(the residual between blocks: every row of a store without attention states) or
``attention`` (inside block ``layer``, after its attention sublayer); ``depth`` places both
on one axis (attention ``l`` at ``(l + 0.5) / n_layers``). Analyses of the block depth axis
read the block rows (:func:`block_rows`, :func:`read_token_metrics`).
``corpus`` is the corpus evaluated, ``train_corpus`` the one a tuned lens was trained on
(null for the logit lens and the model, which are trained on nothing). Provenance
(run config, store fingerprint, lens hashes, package versions) lives in the schema
metadata under the key ``lenspipe``. ``layer`` stays a plain int64 column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import positions as P

LOGIT = "logit"
MODEL = "model"  # the model's own output distribution: the baseline row at layer n_layers

IDENTITY = [
    ("model", pa.string()),
    ("revision", pa.string()),
    ("corpus", pa.string()),
    ("train_corpus", pa.string()),
    ("split", pa.string()),
    ("lens", pa.string()),
    ("translator", pa.string()),
    ("layer", pa.int64()),
    ("position", pa.string()),
    ("depth", pa.float64()),
]
METRICS = ["kl", "kl_bpb", "ce", "ppl", "bpb", "acc", "agree_top1", "agree_topk", "entropy", "ece", "consistency"]
WITH_CI = ["kl", "ce", "bpb", "acc", "agree_top1", "agree_topk", "entropy", "consistency"]
LAYER_SCHEMA = pa.schema(
    IDENTITY
    + [("documents", pa.string()), ("n_tokens", pa.int64()), ("n_predicted", pa.int64())]
    + [(m, pa.float64()) for m in METRICS]
    + [(f"{m}_{b}", pa.float64()) for m in WITH_CI for b in ("lo", "hi")]
)
CALIBRATION_SCHEMA = pa.schema(
    IDENTITY
    + [
        ("bin", pa.int64()),
        ("bin_lower", pa.float64()),
        ("bin_upper", pa.float64()),
        ("count", pa.int64()),
        ("mean_confidence", pa.float64()),
        ("accuracy", pa.float64()),
    ]
)


def lens_identity(name: str) -> tuple[str, str | None]:
    """Result key -> (lens, translator): the logit lens, the model itself, or a tuned kind."""
    if name in (LOGIT, MODEL):
        return name, None
    return "tuned", name


def _identity(ident: dict[str, Any], name: str, position: str, layer: int, n_layers: int) -> dict[str, Any]:
    lens, translator = lens_identity(name)
    train_corpus = ident.get("train_corpus", ident["corpus"]) if lens == "tuned" else None
    return {
        "model": ident["model"],
        "revision": ident.get("revision"),
        "corpus": ident["corpus"],
        "train_corpus": train_corpus,
        "split": ident["split"],
        "lens": lens,
        "translator": translator,
        "layer": layer,
        "position": position,
        "depth": P.depth(position, layer, n_layers),
    }


def layer_metrics_table(
    rows: list[dict],
    ident: dict[str, Any],
    n_layers: int,
    tokens_per_byte: float,
    provenance: dict[str, Any],
    documents: str,
) -> pa.Table:
    """``documents``: the evaluated tokens per document (``hamlet=1536, ...``), in every row."""
    out = []
    for r in rows:
        row = _identity(ident, r["lens"], r.get("position", P.BLOCK.name), r["layer"], n_layers) | {
            k: r.get(k) for k in LAYER_SCHEMA.names if k in r and k not in ("lens", "layer", "position")
        }
        # KL in bits per byte, as the reference reports it: nats/token x tokens/byte / ln 2
        row["kl_bpb"] = r["kl"] * tokens_per_byte / 0.6931471805599453
        row["documents"] = documents
        out.append(row)
    schema = LAYER_SCHEMA.with_metadata({"lenspipe": json.dumps(provenance, default=str)})
    return pa.Table.from_pylist(out, schema=schema)


def calibration_table(
    tables: dict[tuple[str, str, int], dict[str, list]],
    ident: dict[str, Any],
    n_layers: int,
    provenance: dict[str, Any],
) -> pa.Table:
    """``tables`` by (lens name, position, layer); rows lens by lens, in depth order."""
    out = []
    for (name, position, layer), t in sorted(tables.items(), key=lambda kv: (kv[0][0], P.depth_rank(kv[0][1:]))):
        base = _identity(ident, name, position, layer, n_layers)
        for b in range(len(t["count"])):
            out.append(
                base
                | {"bin": b, **{k: t[k][b] for k in ("bin_lower", "bin_upper", "count", "mean_confidence", "accuracy")}}
            )
    schema = CALIBRATION_SCHEMA.with_metadata({"lenspipe": json.dumps(provenance, default=str)})
    return pa.Table.from_pylist(out, schema=schema)


def write_table(table: pa.Table, path: Path) -> None:
    """zstd Parquet, via a temporary name so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. disk full: leave no half-written file behind
        raise


def read_provenance(path: Path) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"lenspipe", b"{}"))


def write_table_df(df, path: Path, provenance: dict[str, Any]) -> None:
    """An analysis table (a DataFrame) as Parquet, with provenance and package versions."""
    from .provenance import package_versions

    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = provenance | {"versions": package_versions()}
    write_table(table.replace_schema_metadata({"lenspipe": json.dumps(meta, default=str)}), path)


def block_rows(df):
    """The rows of a table (layer_metrics, calibration, the per-token table) at the block
    position: the block depth axis every analysis of layers reads. A table from before
    positions has no ``position`` column: all its rows are block rows."""
    return df[df.position == P.BLOCK.name] if "position" in df.columns else df


def read_token_metrics(token_dir: Path, columns: list[str] | None = None, positions: tuple[str, ...] = P.DEFAULT):
    """The per-token table (``token_metrics/``) as a DataFrame, at ``positions`` only
    (default the block position; None: every position), read with a filter so the other
    positions' rows are never loaded. ``columns``: as ``pandas.read_parquet``'s."""
    import pandas as pd
    import pyarrow.dataset as ds

    schema = ds.dataset(str(token_dir), format="parquet", partitioning="hive").schema
    if positions is None or "position" not in schema.names:
        return pd.read_parquet(token_dir, columns=columns)
    want = None if columns is None else list(dict.fromkeys([*columns, "position"]))
    df = pd.read_parquet(token_dir, columns=want, filters=[("position", "in", list(positions))])
    return df if columns is None or "position" in columns else df.drop(columns="position")
