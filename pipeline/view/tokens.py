"""The cache browser's table: one row per evaluated held-out token, built from the per-token
table (``token_metrics/``) without running the model.

Each row holds the token and the one it should predict (decoded), its document and
sequence, the category of the token to predict (``token_categories.categorise``), the mean
KL over layers of the logit lens and of the tuned lens, the prediction depth of both
(``prediction_depth.prediction_depth_of``: the first layer from which the lens's top-1 stays
the model's) and the share of layers where the two lenses' top-1 differ. The per-token
table is read one lens at a time, a few columns of it, so a run of 100k tokens x 30
layers never sits in memory whole; the summary (a few MB at 100k tokens) is built once per
run and then filtered, sorted and paged for each request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .catalog import records
from .errors import BadRequest, NotFound

#: Columns a page may be sorted by, and the numeric ones a filter may bound.
SORTABLE = ("index", "kl_tuned", "kl_logit", "kl_gap", "depth_tuned", "depth_logit", "disagree", "model_rank")
MAX_PAGE = 500


def _lens_arrays(token_dir: Path, lens: str, translator: str, n_layers: int) -> dict[str, np.ndarray]:
    """(layer, token) arrays of one lens's top-1 ids and KL, tokens in token_index order."""
    import pandas as pd

    df = pd.read_parquet(
        token_dir,
        columns=["layer", "token_index", "top1_id", "kl"],
        filters=[("lens", "=", lens), ("translator", "=", translator), ("position", "=", "block")],
    ).sort_values(["layer", "token_index"], kind="stable")
    if df.empty:
        raise NotFound(f"the per-token table at {token_dir} has no rows of the {lens} lens ({translator})")
    if sorted(df.layer.unique()) != list(range(n_layers)):  # a lens of some layers only
        raise NotFound(
            f"the {lens} lens ({translator}) has no translator at some layers: the cache browser's "
            "means and depths need every layer (train.layers: all)"
        )
    n = len(df) // n_layers
    return {
        "top1": df.top1_id.to_numpy().reshape(n_layers, n),
        "kl": df.kl.to_numpy(dtype=np.float64).reshape(n_layers, n),
    }


def _depth(top1: np.ndarray, final: np.ndarray) -> np.ndarray:
    import torch

    from ..analyses.prediction_depth import prediction_depth_of

    return prediction_depth_of(torch.from_numpy(top1.copy()), torch.from_numpy(final.copy())).numpy()


def build_token_table(artifacts, translator: str, tokenizer) -> Any:
    """The summary DataFrame of one run's evaluated tokens (see the module docstring)."""
    import pandas as pd

    from ..analyses.token_categories import categorise
    from ..corpus import load_split
    from ..sampling import split_sequences
    from ..store.reader import open_store

    token_dir = artifacts.need("token_metrics")
    model = pd.read_parquet(
        token_dir,
        columns=["token_index", "token_id", "next_token_id", "top1_id", "next_token_rank", "layer"],
        filters=[("lens", "=", "model"), ("position", "=", "block")],
    ).sort_values("token_index")
    n_layers = int(model.layer.iloc[0])
    index = model.token_index.to_numpy()
    final = model.top1_id.to_numpy()
    logit = _lens_arrays(token_dir, "logit", "none", n_layers)
    tuned = _lens_arrays(token_dir, "tuned", translator, n_layers)
    store = open_store(artifacts.need("store"))
    seq_len = store.seq_len
    packed = load_split(artifacts.need("split"))
    split_seq = np.asarray(split_sequences(store, index // seq_len))
    doc = packed.doc_index[split_seq, index % seq_len]
    vocab = {}

    def text(ids):
        for i in np.unique(ids[ids >= 0]):
            vocab.setdefault(int(i), tokenizer.decode([int(i)]))
        return [vocab.get(int(i), "") for i in ids]

    next_ids = model.next_token_id.to_numpy()
    table = pd.DataFrame(
        {
            "index": index,
            "seq": index // seq_len,
            "document": np.asarray(packed.meta["doc_ids"], dtype=object)[doc],
            "token": text(model.token_id.to_numpy()),
            "next": text(next_ids),
            "kl_logit": logit["kl"].mean(0),
            "kl_tuned": tuned["kl"].mean(0),
            "depth_logit": _depth(logit["top1"], final),
            "depth_tuned": _depth(tuned["top1"], final),
            "disagree": (logit["top1"] != tuned["top1"]).mean(0),
            "model_rank": model.next_token_rank.to_numpy(),
        }
    )
    table["kl_gap"] = table.kl_logit - table.kl_tuned
    table["category"] = [categorise(t) if i >= 0 else "none" for t, i in zip(table.next, next_ids)]
    return table


def page(table, filters: dict[str, str], *, sort: str = "index", desc: bool = False, offset: int = 0, limit: int = 50):
    """One page of the token table: filtered (``category``, ``document``, ``seq``, and
    ``min_<col>`` / ``max_<col>`` bounds of a sortable column), sorted, sliced."""
    if sort not in SORTABLE:
        raise BadRequest(f"sort must be one of {', '.join(SORTABLE)}, not {sort!r}")
    if not 0 < limit <= MAX_PAGE or offset < 0:
        raise BadRequest(f"limit must be 1..{MAX_PAGE} and offset >= 0")
    mask = np.ones(len(table), dtype=bool)
    for key, value in filters.items():
        if value in (None, ""):
            continue
        if key in ("category", "document"):
            mask &= (table[key] == value).to_numpy()
        elif key == "seq":
            mask &= (table.seq == _number(key, value, int)).to_numpy()
        elif key[:4] in ("min_", "max_") and key[4:] in SORTABLE:
            col, bound = table[key[4:]].to_numpy(), _number(key, value, float)
            mask &= col >= bound if key[:4] == "min_" else col <= bound
        else:
            raise BadRequest(f"unknown filter {key!r}")
    hits = table[mask]
    order = hits.sort_values(sort, ascending=not desc, kind="stable")
    if "categories" not in table.attrs:  # the filters' choices, once per table
        table.attrs.update(categories=sorted(set(table.category)), documents=sorted(set(table.document)))
    return {
        "total": int(len(hits)),
        "offset": offset,
        "rows": records(order.iloc[offset : offset + limit]),
        "categories": table.attrs["categories"],
        "documents": table.attrs["documents"],
    }


def _number(key: str, value: str, kind):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise BadRequest(f"bad filter value: {key}={value!r} is not a number") from None


def context(store, index: int, tokenizer, before: int = 24, after: int = 8) -> dict[str, Any]:
    """The text around stored token ``index`` (within its sequence), decoded token by token."""
    if not 0 <= index < store.n_tokens:
        raise NotFound(f"token {index} is not in the store ({store.n_tokens} tokens)")
    start = max(index // store.seq_len * store.seq_len, index - before)
    stop = min((index // store.seq_len + 1) * store.seq_len, index + after + 1)
    ids = store.tokens(start, stop).tolist()
    return {"start": start, "index": index, "tokens": [tokenizer.decode([i]) for i in ids]}
