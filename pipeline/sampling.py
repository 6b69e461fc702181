"""Which whole sequences of a split or a store a stage reads.

Packed splits are in document order and stores keep corpus order, so the first N tokens
of either cover only the first documents (on the default test split, Hamlet and Henry V
but never Much Ado). Every sample here is of whole sequences, spread over the whole
range, and a pure function of (n, k, seed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from .positions import as_key


def select_sequences(n_total: int, budget: int | None, seed: int) -> np.ndarray:
    """Indices of ``budget`` sequences out of ``n_total``: a seeded random subset, sorted.

    Used for extraction: a uniform random subset, so any budget is an unbiased sample of
    the split (null or a budget >= n_total: every sequence).
    """
    if budget is None or budget >= n_total:
        return np.arange(n_total)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=budget, replace=False))


def spread_sequences(n_total: int, k: int | None, seed: int) -> np.ndarray:
    """``k`` sorted sequence indices out of ``n_total``, one drawn at random (``seed``)
    from each of ``k`` equal strata, so every part of the range is represented (k None
    or >= n_total: all of them).

    Stratified rather than uniform: with the few sequences evaluation and validation
    afford, a uniform draw can still miss a whole document.
    """
    if k is None or k >= n_total:
        return np.arange(n_total)
    if k < 1:
        raise ValueError(f"need at least one sequence, got k={k}")
    bounds = (np.arange(k + 1) * n_total) // k  # (k+1,) stratum edges, strictly increasing
    rng = np.random.default_rng([seed, n_total, k])
    return bounds[:-1] + rng.integers(0, bounds[1:] - bounds[:-1])


def runs(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted sequence indices -> maximal runs [first, last + 1) of consecutive ones."""
    out: list[tuple[int, int]] = []
    for s in map(int, seqs):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


def token_index(seqs: Sequence[int], seq_len: int) -> np.ndarray:
    """(len(seqs) * seq_len,) int64 token indices of whole sequences ``seqs``."""
    seqs = np.asarray(seqs, dtype=np.int64)
    return (seqs[:, None] * seq_len + np.arange(seq_len)).reshape(-1)


def read_sequences(store, layers, seqs: Sequence[int]) -> torch.Tensor:
    """(len(layers), len(seqs) * seq_len, d_model) float32: whole store sequences ``seqs``,
    read as contiguous runs (one slice per run, not per sequence). ``layers``: block layers,
    or lens positions (position, layer) (``pipeline.positions``)."""
    L = store.seq_len
    keys = [as_key(k) for k in layers]
    parts = [store.states(keys, a * L, b * L) for a, b in runs(seqs)]  # (k, n_i, d)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def read_sequence_tokens(store, seqs: Sequence[int]) -> torch.Tensor:
    """(len(seqs) * seq_len,) int64 token ids of store sequences ``seqs``."""
    L = store.seq_len
    return torch.cat([store.tokens(a * L, b * L) for a, b in runs(seqs)])


def split_sequences(store, seqs: Sequence[int]) -> list[int]:
    """Store sequence indices -> indices of the same sequences in their packed split."""
    sel = store.provenance.get("seq_index", "all")
    return [int(s) for s in seqs] if sel == "all" else [int(sel[int(s)]) for s in seqs]


def document_counts(doc_index: np.ndarray, doc_ids: Sequence[str]) -> dict[str, int]:
    """Tokens per document name, from a packed split's per-token ``doc_index`` (any shape)."""
    counts = Counter(np.asarray(doc_index).reshape(-1).tolist())
    return {doc_ids[i]: int(n) for i, n in sorted(counts.items(), key=lambda kv: doc_ids[kv[0]])}


def format_documents(counts: dict[str, int]) -> str:
    """``{'hamlet': 1536, ...}`` -> ``'hamlet=1536, ...'`` (a table cell a person can read)."""
    return ", ".join(f"{doc}={n}" for doc, n in counts.items())
