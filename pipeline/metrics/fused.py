"""The fused passes: every per-token metric of a lens, and its KL, straight from its logits.

Exactness. Every sum over the vocabulary is one row's torch reduction (cascade-summed:
~1e-7 relative in float32, and the same bits whatever the thread count, since threads
split rows, never one row); sums over rows are float64. Two float32 shortcuts this
replaced were each off by 1e-4..1e-2 nats: one dot product over all (tokens x vocab)
values (512 x 49,152 in training), and trusting that a float32 softmax sums to 1: its
internal normaliser is accumulated less exactly, so over 49k entries the result sums
to 1 +- ~1e-5, which shifts lse-based KL by ~1e-5 x lse ~ 3e-4 nats. Both sums are now
measured with a cascade reduction and folded back in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .buffers import Workspace, workspace
from .token import _floating, rank_of


def row_dot(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """(n, vocab) x (n, vocab) -> (n,) sum_v a_v b_v, one cascade-summed reduction per row
    (bmm/einsum measured ~700x less accurate here: they accumulate long float32 runs).
    ``out``: an (n, vocab) buffer for the products (a fresh one otherwise)."""
    return torch.mul(a, b, out=out).sum(-1)


#: On the CPU the row-wise passes over (n, vocab) run on blocks of rows of about this many
#: bytes (float32: 21 rows of SmolLM2's 49,152-token vocabulary), so that every pass after
#: a block's first reads it from the cache, not from memory. Every reduction is per row,
#: so the results are bitwise those of one pass over all rows (tested). With this and the
#: segment argmax below, logit_stats on 1,024 x 49,152 logits went from 124 to 86 ms here
#: (benchmarks/bench_evaluate.py; RESULTS.md, fourth round).
CACHE_BLOCK_BYTES = 4 << 20


def row_blocks(z: Tensor) -> list[slice]:
    """Row slices of z (n, vocab) for the blocked passes: cache-sized blocks on the CPU,
    all rows at once elsewhere (a GPU wants few large kernels)."""
    n = z.shape[0]
    if z.device.type != "cpu" or n == 0:
        return [slice(0, n)]
    # Never a block of one row (unless n is 1): torch splits a lone row's reduction across
    # threads, which changes its bits; from two rows on, threads split rows (tested).
    # The first block is the largest (callers size their buffers by it).
    rows = max(2, CACHE_BLOCK_BYTES // max(1, z[0].numel() * z.element_size()))
    first = rows + 1 if n > rows and n % rows == 1 else rows  # a lone last row joins the first block
    starts = [0, *range(first, n, rows)]
    return [slice(i, min(j, n)) for i, j in zip(starts, starts[1:] + [n])]


def _target_block(logp: Tensor, p: Tensor, tmp: Tensor) -> Tensor:
    """target_stats of one block: fills p (rows, vocab) and returns sum p log p (rows,),
    with tmp (rows, vocab) as scratch."""
    torch.exp(logp, out=p)
    total = p.sum(-1, keepdim=True)  # (rows, 1) = 1 + O(1e-5)
    torch.sub(logp, total.log(), out=tmp)  # renormalised log p
    p.div_(total)
    return tmp.mul_(p).nan_to_num_(0.0).sum(-1)  # 0 log 0 = 0


def target_stats(logp: Tensor) -> dict[str, Tensor]:
    """The model's side of every KL from its log-probabilities (n, vocab), computed once
    per batch: its probabilities p (n, vocab), renormalised to sum to 1 (float32
    log_softmax alone is off by ~1e-5), and per row sum_v p log p (n,)."""
    p, ws = torch.empty_like(logp), workspace()
    neg_entropy = torch.cat([_target_block(logp[b], p[b], ws.like("target_tmp", logp[b])) for b in row_blocks(logp)])
    return {"p": p, "neg_entropy": neg_entropy}


def final_stats(final_logits: Tensor) -> dict[str, Tensor]:
    """What every lens is compared with, computed once per chunk: ``target_stats`` plus the
    model's top-1 ids (n,) (argmax of the log-probabilities: exp can merge near-ties)."""
    z = final_logits  # bf16 stays bf16: log_softmax upcasts inside the kernel
    dtype = z.dtype if z.dtype == torch.float64 else torch.float32
    p = torch.empty(z.shape, dtype=dtype, device=z.device)
    ws = workspace()  # the first block is the largest: later blocks get views of its buffers
    neg_entropy, top1 = [], []
    for b in row_blocks(p):
        lp = log_probs_into(z[b], ws.like("final_logp", p[b]))
        top1.append(lp.argmax(-1))
        neg_entropy.append(_target_block(lp, p[b], ws.like("target_tmp", p[b])))
    return {"p": p, "neg_entropy": torch.cat(neg_entropy), "top1": torch.cat(top1)}


def log_probs_into(logits: Tensor, out: Tensor) -> Tensor:
    """:func:`log_probs` written into ``out`` (a buffer of the result's shape and dtype)."""
    return torch.log_softmax(logits, dim=-1, dtype=out.dtype, out=out)


def logsumexp_rows(z: Tensor, buf: Tensor) -> Tensor:
    """(n,) log sum_v exp(z_v) per row, as torch.logsumexp computes it (max + log of the
    cascade sum of exp(z - max)), with ``buf`` (n, vocab) as its temporary."""
    zmax = z.amax(-1)  # (n,)
    torch.sub(z, zmax[:, None], out=buf).exp_()
    lse = zmax + buf.sum(-1).log()
    bad = ~torch.isfinite(zmax)  # a row of -inf, or with +inf / NaN: torch's own answer
    if bad.any():
        lse[bad] = torch.logsumexp(z[bad], dim=-1)
    return lse


def kl_rows(z: Tensor, lse: Tensor, target: dict[str, Tensor], out: Tensor | None = None) -> Tensor:
    """(n,) float64 KL(p || softmax(z)) per row from the lens logits z (n, vocab), their
    exact logsumexp (n,) and ``target_stats``: sum p log p - <p, z> + lse."""
    f64 = torch.float64
    return target["neg_entropy"].to(f64) - row_dot(target["p"], z, out).to(f64) + lse.to(f64)


#: :func:`_argmax_rows` takes the maxima of segments of this many entries first.
ARGMAX_SEGMENT = 256


def _argmax_rows(z: Tensor) -> tuple[Tensor, Tensor]:
    """(argmax (n,), max (n,)) of each row of z (n, vocab), with argmax's tie rule (the
    lowest id among the maxima). torch's amax is vectorised and its argmax is not (~4x
    slower here, and topk ~6x), so: the maxima of segments of the row, then argmax within
    the first segment that holds the row's maximum. NaN counts as the maximum, as in
    argmax and amax (tested)."""
    n, vocab = z.shape
    seg = min(ARGMAX_SEGMENT, vocab)
    whole = vocab // seg * seg
    m = z[:, :whole].view(n, whole // seg, seg).amax(-1)  # (n, segments)
    if whole < vocab:
        m = torch.cat([m, z[:, whole:].amax(-1, keepdim=True)], 1)
    zmax = m.amax(-1)  # (n,)
    cols = (m.argmax(-1, keepdim=True) * seg + torch.arange(seg, device=z.device)).clamp_(max=vocab - 1)  # (n, seg)
    top = cols.gather(-1, z.gather(-1, cols).argmax(-1, keepdim=True)).squeeze(-1)  # clamped repeats come last
    return top, zmax


def kl_from_logits(z: Tensor, target: dict[str, Tensor], ws: Workspace | None = None) -> Tensor:
    """(n,) float64 KL(p || softmax(z)) per row from lens logits z (n, vocab) and
    ``target_stats``, with one temporary from ``ws`` (default: this thread's workspace);
    ``kl_and_lse`` also returns the logsumexp (training's backward needs it)."""
    return kl_and_lse(z, target, ws)[0]


def kl_and_lse(z: Tensor, target: dict[str, Tensor], ws: Workspace | None = None) -> tuple[Tensor, Tensor]:
    """(KL (n,) float64, logsumexp (n,)) of lens logits z (n, vocab) against ``target_stats``,
    in cache-sized row blocks (:func:`row_blocks`)."""
    z = _floating(z)  # a bf16 head's logits are summed in float32
    ws = workspace() if ws is None else ws
    kl, lse = [], []
    for b in row_blocks(z):
        t = ws.like("kl_tmp", z[b])  # a view of the first (largest) block's buffer
        lse.append(logsumexp_rows(z[b], t))
        kl.append(kl_rows(z[b], lse[-1], {key: target[key][b] for key in ("p", "neg_entropy")}, t))
    return torch.cat(kl), torch.cat(lse)


def logit_stats(
    z: Tensor, final: dict[str, Tensor], next_ids: Tensor, k: int, with_rank: bool = False, ws: Workspace | None = None
) -> dict[str, Tensor]:
    """Every per-token metric of one lens from its logits z (n, vocab), in ~7 passes over
    each cache-sized block of rows (:func:`row_blocks`).

    Same values as the functions of :mod:`pipeline.metrics.token` (tests check it), but
    from the logits directly: with lse = logsumexp(z), KL(p || q) = sum p log p - <p, z> + lse,
    H(q) = lse - E_q[z], CE = lse - z[next], top-1 probability = exp(max z - lse).
    No log_softmax tensor is built and the model's side is shared across lenses
    (``final_stats``): on SmolLM2's 49,152-token vocabulary this made evaluation ~3x
    faster than composing those functions. KL and entropy are float64 per token.
    Temporaries go to ``ws`` (default: this thread's :func:`workspace`).
    """
    z = _floating(z)
    ws = workspace() if ws is None else ws
    parts = [
        _logit_stats_rows(z[b], {key: v[b] for key, v in final.items()}, next_ids[b], k, with_rank, ws)
        for b in row_blocks(z)
    ]
    return parts[0] if len(parts) == 1 else {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _logit_stats_rows(
    z: Tensor, final: dict[str, Tensor], next_ids: Tensor, k: int, with_rank: bool, ws: Workspace
) -> dict[str, Tensor]:
    """:func:`logit_stats` of one block of rows."""
    top, zmax = _argmax_rows(z)  # (n,) x 2
    q = torch.softmax(z, dim=-1, out=ws.like("q", z))  # (n, vocab): one fused pass
    q_top = q.gather(-1, top[:, None]).squeeze(-1)  # (n,) = exp(zmax - lse) >= 1/vocab
    # softmax's own normaliser is inexact; its output's cascade sum measures the error
    q_sum = q.sum(-1)  # (n,) = 1 + O(1e-5)
    lse = zmax - q_top.log() + q_sum.log()  # exact logsumexp without another exp pass
    tmp = ws.like("tmp", z)
    out = {
        "top1": top,
        "top1_prob": (q_top / q_sum).clamp(0.0, 1.0),
        # H(q) = lse - E_q[z], with E_q over the renormalised q
        "entropy": lse.double() - torch.mul(q, z, out=tmp).sum(-1).double() / q_sum.double(),
        "kl": kl_rows(z, lse, final, tmp).clamp_(min=0.0),
        "ce": lse - z.gather(-1, next_ids[:, None]).squeeze(-1),
    }
    out["agree_top1"] = top == final["top1"]
    # in the lens's top k: its rank (ties by id), by two counting passes that read the
    # block from the cache; topk itself was the slowest pass of all
    out["agree_topk"] = (rank_of(z, final["top1"], tmp) < k) & ~zmax.isnan()  # a NaN row agrees with nothing
    if with_rank:
        out["rank"] = rank_of(z, next_ids, ws.like("tmp", z))
    return out
