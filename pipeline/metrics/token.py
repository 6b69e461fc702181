"""Per-token lens metrics: (n, vocab) log-probabilities -> (n,) values, one function each.

Memory: the evaluation stage feeds chunks of (n, vocab) with a large vocab, so each function
allocates at most a couple of (n, vocab) float temporaries (reusing them in place) and bool
masks, never anything larger.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import LenspipeError


def _floating(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 (too coarse to sum a vocab in); float32/64 kept as is."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (n, vocab) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def log_probs(logits: Tensor) -> Tensor:
    """(n, vocab) logits -> (n, vocab) log-probabilities, float32 at least."""
    dtype = logits.dtype if logits.dtype == torch.float64 else torch.float32
    # dtype= makes log_softmax upcast inside the kernel: no upcast copy of the logits.
    return torch.log_softmax(logits, dim=-1, dtype=dtype)


def kl_div(final_logp: Tensor, lens_logp: Tensor) -> Tensor:
    """(n,) KL(final || lens) = sum_v p_v (log p_v - log q_v), p the model's final output."""
    _check_pair(final_logp, lens_logp)
    final_logp, lens_logp = _floating(final_logp), _floating(lens_logp)
    d = final_logp - lens_logp  # (n, vocab), the one float temporary kept
    d.mul_(final_logp.exp())  # exp: a second (n, vocab), freed at once
    kl = d.sum(-1)  # (n,)
    # 0 log 0 = 0: where p = 0 (log p = -inf) a term is 0 * (-inf or nan) = nan, meaning 0.
    # Such rows are rare (masked vocab), so they are fixed afterwards, not checked everywhere.
    bad = kl.isnan()
    if bad.any():
        rows = d[bad].masked_fill_(final_logp[bad].exp() == 0, 0.0)
        kl[bad] = rows.sum(-1)
    # Rounding can leave a tiny negative sum for near-identical inputs; KL is >= 0.
    return kl.clamp_min_(0.0)


def cross_entropy(lens_logp: Tensor, next_ids: Tensor) -> Tensor:
    """(n,) -log q(next token): a gather, no (n, vocab) temporary."""
    if lens_logp.ndim != 2 or next_ids.shape != lens_logp.shape[:1]:
        raise ValueError(f"logp {tuple(lens_logp.shape)} and ids {tuple(next_ids.shape)} disagree")
    return -_floating(lens_logp).gather(-1, next_ids.long()[:, None]).squeeze(-1)


def entropy(logp: Tensor) -> Tensor:
    """(n,) H = -sum_v p_v log p_v."""
    logp = _floating(logp)
    t = logp.exp()  # (n, vocab), reused in place for p log p
    t.mul_(logp)
    h = -t.sum(-1)  # (n,)
    bad = h.isnan()  # 0 * -inf = nan, whose limit is 0: fix rare rows
    if bad.any():
        h[bad] = -t[bad].masked_fill_(torch.isneginf(logp[bad]), 0.0).sum(-1)
    return h


def top1(logp: Tensor) -> tuple[Tensor, Tensor]:
    """(n, vocab) -> (ids (n,) int64, prob (n,)): the most likely token (first on ties, as
    torch.argmax) and its probability, clamped to [0, 1] against rounding."""
    values, ids = _floating(logp).max(dim=-1)
    return ids, values.exp().clamp_(0.0, 1.0)


def rank_of(logp: Tensor, ids: Tensor, buf: Tensor | None = None) -> Tensor:
    """(n,) int64 0-based rank of token ``ids[i]`` in row i, most likely first.

    Ties are broken by token id (lower id ranks first), the order torch.argmax uses, so the
    rank of ``top1(logp)[0]`` is exactly 0 and ``rank < 1`` is exactly argmax equality.
    Counts comparisons instead of sorting: bool (n, vocab) temporaries only, and no
    dependence on torch.topk's unspecified order among ties.
    """
    if logp.ndim != 2 or ids.shape != logp.shape[:1]:
        raise ValueError(f"logp {tuple(logp.shape)} and ids {tuple(ids.shape)} disagree")
    ids = ids.long()[:, None]  # (n, 1)
    target = logp.gather(-1, ids)  # (n, 1)
    # ``buf``: an (n, vocab) float buffer for the comparisons (a Workspace's). Counting
    # 0/1 floats is exact (counts < 2^24) and needs no temporary, where summing a bool
    # tensor first builds an int64 copy of it: 8 bytes per entry, 8x slower here.
    count = (lambda m: m.sum(-1)) if buf is None else (lambda m: m.sum(-1).long())
    rank = count(torch.gt(logp, target, out=buf))  # strictly more likely
    # Exact ties are rare in float logits: count equal entries in one pass, and break ties
    # by id only in the rows that have any.
    tied = count(torch.eq(logp, target, out=buf)) > 1
    if tied.any():
        cols = torch.arange(logp.shape[-1], device=logp.device)  # (vocab,)
        rank[tied] += ((logp[tied] == target[tied]) & (cols < ids[tied])).sum(-1)
    return rank


def topk_agreement(lens_logp: Tensor, final_logp: Tensor, k: int = 1) -> Tensor:
    """(n,) bool: the final top-1 token is among the lens top-k (k=1: top-1 agreement)."""
    _check_pair(lens_logp, final_logp)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, vocab = lens_logp.shape
    if k >= vocab:
        return torch.ones(n, dtype=torch.bool, device=lens_logp.device)
    # Same answer as rank_of(...) < k, several times faster: compare the target's log-prob
    # with the lens's k-th largest. Above it: in the top k; below: not; equal: a tie at the
    # boundary, settled by rank_of's id order for those (rare) rows only.
    target_ids = final_logp.argmax(dim=-1)  # (n,)
    target = lens_logp.gather(-1, target_ids[:, None]).squeeze(-1)  # (n,)
    kth = lens_logp.topk(k, dim=-1, sorted=False).values.amin(-1)  # (n,)
    agree = target > kth
    tied = target == kth
    if tied.any():
        agree[tied] = rank_of(lens_logp[tied], target_ids[tied]) < k
    return agree


def _n_sequences(n: int, seq_len: int) -> int:
    if seq_len < 1 or n % seq_len:
        raise LenspipeError(
            f"{n} tokens are not whole sequences of seq_len={seq_len}; the store and the configuration disagree"
        )
    return n // seq_len


def next_token_targets(ids: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """(n,) flattened whole sequences -> (next_ids (n,), mask (n,) bool).

    next_ids[i] = ids[i + 1] within the same sequence. The last position of each sequence has
    no target: mask False, and next_ids 0, a valid index so callers can gather unmasked.
    """
    if ids.ndim != 1:
        raise ValueError(f"ids must be (n,), got {tuple(ids.shape)}")
    n_seq = _n_sequences(ids.numel(), seq_len)
    seqs = ids.long().view(n_seq, seq_len)
    nxt = torch.zeros_like(seqs)
    nxt[:, :-1] = seqs[:, 1:]
    mask = torch.ones_like(seqs, dtype=torch.bool)
    mask[:, -1] = False
    return nxt.view(-1), mask.view(-1)


def adjacent_agreement(top1_ids_by_layer: Tensor) -> Tensor:
    """(L, n) top-1 ids per layer -> (L-1, n) bool: layer l and l+1 predict the same token."""
    if top1_ids_by_layer.ndim != 2:
        raise ValueError(f"expected (L, n), got {tuple(top1_ids_by_layer.shape)}")
    return top1_ids_by_layer[1:] == top1_ids_by_layer[:-1]
