"""Tidy Parquet tables of the evaluation (schemas documented in the README).

``layer_metrics.parquet``: one row per (model, revision, corpus, train_corpus, split, lens,
translator, layer); ``calibration.parquet``: one row per (..., lens, translator, layer, bin).
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

LOGIT = "logit"
MODEL = "model"  # the model's own output distribution: the baseline row at layer n_layers

IDENTITY = [("model", pa.string()), ("revision", pa.string()), ("corpus", pa.string()),
            ("train_corpus", pa.string()), ("split", pa.string()), ("lens", pa.string()), ("translator", pa.string()),
            ("layer", pa.int64()), ("depth", pa.float64())]
METRICS = ["kl", "kl_bpb", "ce", "ppl", "bpb", "acc", "agree_top1", "agree_topk", "entropy", "ece",
           "consistency"]
WITH_CI = ["kl", "ce", "bpb", "acc", "agree_top1", "agree_topk", "entropy", "consistency"]
LAYER_SCHEMA = pa.schema(IDENTITY + [("documents", pa.string()), ("n_tokens", pa.int64()),
                                     ("n_predicted", pa.int64())]
                         + [(m, pa.float64()) for m in METRICS]
                         + [(f"{m}_{b}", pa.float64()) for m in WITH_CI for b in ("lo", "hi")])
CALIBRATION_SCHEMA = pa.schema(IDENTITY + [("bin", pa.int64()), ("bin_lower", pa.float64()),
                                           ("bin_upper", pa.float64()), ("count", pa.int64()),
                                           ("mean_confidence", pa.float64()), ("accuracy", pa.float64())])


def lens_identity(name: str) -> tuple[str, str | None]:
    """Result key -> (lens, translator): the logit lens, the model itself, or a tuned kind."""
    if name in (LOGIT, MODEL):
        return name, None
    return "tuned", name


def _identity(ident: dict[str, Any], name: str, layer: int, n_layers: int) -> dict[str, Any]:
    lens, translator = lens_identity(name)
    train_corpus = ident.get("train_corpus", ident["corpus"]) if lens == "tuned" else None
    return {"model": ident["model"], "revision": ident.get("revision"), "corpus": ident["corpus"],
            "train_corpus": train_corpus, "split": ident["split"], "lens": lens, "translator": translator, "layer": layer,
            "depth": layer / n_layers}


def layer_metrics_table(rows: list[dict], ident: dict[str, Any], n_layers: int, tokens_per_byte: float,
                        provenance: dict[str, Any], documents: str) -> pa.Table:
    """``documents``: the evaluated tokens per document (``hamlet=1536, ...``), in every row."""
    out = []
    for r in rows:
        row = _identity(ident, r["lens"], r["layer"], n_layers) | {k: r.get(k) for k in LAYER_SCHEMA.names
                                                                   if k in r and k not in ("lens", "layer")}
        # KL in bits per byte, as the reference reports it: nats/token x tokens/byte / ln 2
        row["kl_bpb"] = r["kl"] * tokens_per_byte / 0.6931471805599453
        row["documents"] = documents
        out.append(row)
    schema = LAYER_SCHEMA.with_metadata({"lenspipe": json.dumps(provenance, default=str)})
    return pa.Table.from_pylist(out, schema=schema)


def calibration_table(tables: dict[tuple[str, int], dict[str, list]], ident: dict[str, Any], n_layers: int,
                      provenance: dict[str, Any]) -> pa.Table:
    out = []
    for (name, layer), t in sorted(tables.items()):
        base = _identity(ident, name, layer, n_layers)
        for b in range(len(t["count"])):
            out.append(base | {"bin": b, **{k: t[k][b] for k in ("bin_lower", "bin_upper", "count",
                                                                  "mean_confidence", "accuracy")}})
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
