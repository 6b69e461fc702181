"""``lenspipe info STORE``: a human summary of an activation store (local path or URL),
and its size on disk against the uncompressed size."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .reader import ActivationStore, open_store


def store_info(path_or_url: str | os.PathLike) -> dict[str, Any]:
    """What a user wants to know before using a store: what, how much, how big, complete?"""
    store = open_store(path_or_url, allow_incomplete=True)
    prov, params = store.provenance, store.params
    model, corpus = (v if isinstance(v := prov.get(k), dict) else {} for k in ("model", "corpus"))
    info = {
        "store": str(path_or_url),
        "complete": store.is_complete,
        "model": model.get("name"),
        "source": model.get("source"),
        "revision": model.get("revision"),
        "model_type": model.get("model_type"),
        "weights_sha256": model.get("weights_sha256"),
        "corpus_split": corpus.get("split"),
        "corpus_fingerprint": corpus.get("fingerprint"),
        "tokens": store.n_tokens,
        "written_tokens": store.written_tokens,
        "seq_len": store.seq_len,
        "layers": store.n_layers + 1,
        "d_model": store.d_model,
        "dtype": store.dtype,
        "compression": f"{params.compression} {params.level}" if params.compression != "none" else "none",
        "shard_tokens": params.shard_tokens,
        "chunk_tokens": params.chunk_tokens,
        "created": store.attrs.get("created"),
        "finished": store.attrs.get("finished"),
    }
    raw_token = params.bytes_per_token()
    rows = sum(a.rows for a in params.value_arrays() if not a.is_scale)
    info.update(
        scaled=store.spec.scaled,
        positions=list(store.positions),
        raw_bytes_per_token=raw_token,
        raw_bytes_per_value=raw_token / (rows * store.d_model),
        states_per_token=rows,
    )
    try:  # sizes on disk are known for local stores only
        sizes = measure_compression(path_or_url)
        info.update(
            stored_bytes=sizes["stored_bytes"],
            raw_bytes=sizes["raw_bytes"],
            ratio=sizes["ratio"],
            stored_bytes_per_token=sizes["stored_bytes"] / store.n_tokens,
        )
    except (OSError, TypeError, ValueError):
        info.update(stored_bytes=None, raw_bytes=None, ratio=None, stored_bytes_per_token=None)
    return info


def format_info(info: dict[str, Any]) -> str:
    def gb(n):
        return "unknown (remote)" if n is None else f"{n / 1e9:.2f} GB"

    state = (
        "complete"
        if info["complete"]
        else f"INCOMPLETE ({info['written_tokens']:,} of {info['tokens']:,} tokens written)"
    )
    lines = [
        f"store:        {info['store']} ({state})",
        f"model:        {info['model']} [{info['model_type']}] from {info['source']}"
        + (f" @ {info['revision']}" if info["revision"] else ""),
        f"weights:      sha256 {info['weights_sha256']}",
        f"corpus:       split {info['corpus_split']}, fingerprint {info['corpus_fingerprint']}",
        f"tokens:       {info['tokens']:,} ({info['tokens'] // info['seq_len']:,} sequences of {info['seq_len']})",
        f"layers:       {info['layers']} x d_model {info['d_model']}, {info['dtype']}"
        + (" (a float32 scale per layer and token)" if info["scaled"] else ""),
        f"positions:    {', '.join(info['positions'])} ({info['states_per_token']} states per token)",
        f"bytes:        {info['raw_bytes_per_value']:.3f} per value, {info['raw_bytes_per_token']:,} per token "
        "uncompressed"
        + (
            ""
            if info["stored_bytes_per_token"] is None
            else f"; {info['stored_bytes_per_token']:,.0f} per token on disk"
        ),
        f"storage:      {info['compression']}, shards of {info['shard_tokens']} tokens, "
        f"chunks of {info['chunk_tokens']}",
        f"size on disk: {gb(info['stored_bytes'])} (raw {gb(info['raw_bytes'])}"
        + (f", compression {info['ratio']:.2f}x)" if info["ratio"] else ")"),
        f"created:      {info['created']}, finished: {info['finished']}",
    ]
    return "\n".join(lines)


def measure_compression(path: str | os.PathLike) -> dict:
    """Bytes stored on disk for the activations (``resid``, ``attn`` where stored, and the
    scales of an 8-bit store) vs their uncompressed size (local stores and zips)."""
    store = open_store(path, allow_incomplete=True)
    stored = _stored_value_bytes(store)
    raw = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in store.value_arrays.values())
    return {
        "stored_bytes": stored,
        "raw_bytes": raw,
        "ratio": raw / stored if stored else float("nan"),
        "dtype": store.dtype,
        "compression": store.params.compression,
        "level": store.params.level,
    }


def _stored_value_bytes(store: ActivationStore) -> int:
    loc = store.location
    names = tuple(f"{a.basename}/" for a in store.value_arrays.values())
    if loc.is_url:
        raise ValueError(f"sizes on disk are unknown for a remote store ({loc.zarr_store})")
    if loc.is_zip:
        return sum(
            i.compress_size
            for i in loc.fs.zip.infolist()
            if i.filename.startswith(names) and not i.filename.endswith("zarr.json")
        )
    return sum(
        f.stat().st_size
        for name in names
        for f in (Path(loc.root) / name).rglob("*")
        if f.is_file() and f.name != "zarr.json"
    )
