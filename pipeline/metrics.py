"""Per-token lens metrics and their aggregation: pure functions on tensors (no I/O, no model).

Shapes: ``logits``/``logp`` (n, vocab); ``ids`` (n,) int64; ``mask`` (n,) bool; per-token
results (n,) in the input's float dtype (float32 at least). Natural logs (nats) unless a
name says bits. Flattened tokens are whole sequences laid end to end, ``seq_len`` each.

Memory: the evaluation stage feeds chunks of (n, vocab) with a large vocab, so each function
allocates at most a couple of (n, vocab) float temporaries (reusing them in place) and bool
masks, never anything larger.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

from .errors import LenspipeError

#: bootstrap_ci draws at most this many (replicate, sequence) indices at once, bounding its
#: memory whatever the number of sequences; results do not depend on it (draws are serial).
BOOT_BLOCK_ELEMENTS = 1 << 22


def _floating(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 (too coarse to sum a vocab in); float32/64 kept as is."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (n, vocab) tensors of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")


# --------------------------------------------------------------------------- per token

def log_probs(logits: Tensor) -> Tensor:
    """(n, vocab) logits -> (n, vocab) log-probabilities, float32 at least."""
    dtype = logits.dtype if logits.dtype == torch.float64 else torch.float32
    # dtype= makes log_softmax upcast inside the kernel: no upcast copy of the logits.
    return torch.log_softmax(logits, dim=-1, dtype=dtype)


def kl_div(final_logp: Tensor, lens_logp: Tensor) -> Tensor:
    """(n,) KL(final || lens) = sum_v p_v (log p_v - log q_v), p the model's final output."""
    _check_pair(final_logp, lens_logp)
    final_logp, lens_logp = _floating(final_logp), _floating(lens_logp)
    d = final_logp - lens_logp                 # (n, vocab), the one float temporary kept
    d.mul_(final_logp.exp())                   # exp: a second (n, vocab), freed at once
    kl = d.sum(-1)                             # (n,)
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
    t = logp.exp()                             # (n, vocab), reused in place for p log p
    t.mul_(logp)
    h = -t.sum(-1)                             # (n,)
    bad = h.isnan()                            # 0 * -inf = nan, whose limit is 0: fix rare rows
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
    ids = ids.long()[:, None]                                    # (n, 1)
    target = logp.gather(-1, ids)                                # (n, 1)
    # ``buf``: an (n, vocab) float buffer for the comparisons (a Workspace's). Counting
    # 0/1 floats is exact (counts < 2^24) and needs no temporary, where summing a bool
    # tensor first builds an int64 copy of it: 8 bytes per entry, 8x slower here.
    count = (lambda m: m.sum(-1)) if buf is None else (lambda m: m.sum(-1).long())
    rank = count(torch.gt(logp, target, out=buf))                # strictly more likely
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
    target_ids = final_logp.argmax(dim=-1)                                # (n,)
    target = lens_logp.gather(-1, target_ids[:, None]).squeeze(-1)        # (n,)
    kth = lens_logp.topk(k, dim=-1, sorted=False).values.amin(-1)         # (n,)
    agree = target > kth
    tied = target == kth
    if tied.any():
        agree[tied] = rank_of(lens_logp[tied], target_ids[tied]) < k
    return agree


def _n_sequences(n: int, seq_len: int) -> int:
    if seq_len < 1 or n % seq_len:
        raise LenspipeError(f"{n} tokens are not whole sequences of seq_len={seq_len}; the "
                            "store and the configuration disagree")
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


# --------------------------------------------------------------------------- aggregation

class CalibrationBins:
    """Reliability table of (confidence, correct) pairs in ``n_bins`` equal-width bins of
    [0, 1]; bin b holds b/n_bins <= conf < (b+1)/n_bins, and conf = 1 the last bin.
    Sums are float64 so streaming many chunks loses no precision."""

    def __init__(self, n_bins: int = 10):
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = n_bins
        self.count = torch.zeros(n_bins, dtype=torch.int64)
        self.conf_sum = torch.zeros(n_bins, dtype=torch.float64)
        self.correct_sum = torch.zeros(n_bins, dtype=torch.float64)

    def update(self, conf: Tensor, correct: Tensor,
               mask: Tensor | None = None) -> "CalibrationBins":
        """conf (n,) in [0, 1], correct (n,) bool, mask (n,) bool (False: token ignored)."""
        conf = conf.detach().to("cpu", torch.float64).clamp(0.0, 1.0)
        correct = correct.detach().to("cpu", torch.float64)
        if mask is not None:
            keep = mask.detach().to("cpu", torch.bool)
            conf, correct = conf[keep], correct[keep]
        b = (conf * self.n_bins).long().clamp_(max=self.n_bins - 1)   # (m,) bin of each
        self.count += torch.bincount(b, minlength=self.n_bins)
        self.conf_sum += torch.bincount(b, weights=conf, minlength=self.n_bins)
        self.correct_sum += torch.bincount(b, weights=correct, minlength=self.n_bins)
        return self

    def merge(self, other: "CalibrationBins") -> "CalibrationBins":
        """Add another accumulator's counts (e.g. another chunk or worker) into this one."""
        if other.n_bins != self.n_bins:
            raise ValueError(f"cannot merge {other.n_bins} bins into {self.n_bins}")
        self.count += other.count
        self.conf_sum += other.conf_sum
        self.correct_sum += other.correct_sum
        return self

    @property
    def total(self) -> int:
        return int(self.count.sum())

    def table(self) -> dict[str, list]:
        """One list entry per bin; means of empty bins are None (JSON-safe, NaN in pandas)."""
        n = self.count.tolist()
        conf, acc = self.conf_sum.tolist(), self.correct_sum.tolist()
        return {
            "bin_lower": [b / self.n_bins for b in range(self.n_bins)],
            "bin_upper": [(b + 1) / self.n_bins for b in range(self.n_bins)],
            "count": n,
            "mean_confidence": [c / k if k else None for c, k in zip(conf, n)],
            "accuracy": [a / k if k else None for a, k in zip(acc, n)],
        }

    def ece(self) -> float:
        """sum_b (n_b / N) |acc_b - conf_b|, i.e. sum_b |correct_sum_b - conf_sum_b| / N.
        NaN when nothing was accumulated."""
        total = self.total
        if total == 0:
            return math.nan
        return float((self.correct_sum - self.conf_sum).abs().sum() / total)


def per_sequence_sums(values: Tensor, mask: Tensor | None, seq_len: int) -> tuple[Tensor, Tensor]:
    """(n,) per-token values of whole sequences -> (sums (n_seq,) float64, counts (n_seq,)
    int64) over unmasked tokens. Masked values are dropped, not multiplied by 0, so an inf or
    nan at a position without a target cannot poison its sequence."""
    if values.ndim != 1 or (mask is not None and mask.shape != values.shape):
        raise ValueError(f"values {tuple(values.shape)} and mask disagree")
    n_seq = _n_sequences(values.numel(), seq_len)
    v = values.detach().to(torch.float64).reshape(n_seq, seq_len)
    if mask is None:
        return v.sum(1), torch.full((n_seq,), seq_len, dtype=torch.int64, device=v.device)
    m = mask.reshape(n_seq, seq_len).bool()
    return torch.where(m, v, 0.0).sum(1), m.sum(1)


def bootstrap_ci(sums: Tensor, counts: Tensor, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile CI of the token mean sum(sums) / sum(counts), resampling SEQUENCES with
    replacement: tokens of one sequence are correlated, so resampling tokens would give
    intervals that are too narrow. Deterministic for a seed: replicate r uses the r-th
    n_seq draws of torch.Generator().manual_seed(seed) from randint(0, n_seq)."""
    sums = sums.detach().cpu().to(torch.float64).reshape(-1)
    counts = counts.detach().cpu().to(torch.float64).reshape(-1)
    n_seq = sums.numel()
    if n_seq == 0 or counts.shape != sums.shape or float(counts.sum()) <= 0:
        raise LenspipeError("bootstrap_ci: no tokens to resample (empty split or all masked)")
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    gen = torch.Generator().manual_seed(seed)
    block = max(1, BOOT_BLOCK_ELEMENTS // n_seq)     # replicates per draw: bounded memory
    stats = []
    for start in range(0, n_boot, block):
        idx = torch.randint(0, n_seq, (min(block, n_boot - start), n_seq), generator=gen)
        stats.append(sums[idx].sum(1) / counts[idx].sum(1))       # (rows,) ratio of sums
    boot = torch.cat(stats)                                       # (n_boot,)
    # A replicate of only empty sequences has no mean (0/0 = nan): leave it out.
    alpha = (1.0 - level) / 2
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    lo, hi = torch.nanquantile(boot, q).tolist()               # linear, as numpy.percentile
    return lo, hi


def bits_per_byte(nats_sum: float, n_bytes: int) -> float:
    """Total nats over a text -> bits per UTF-8 byte: nats / ln 2 / bytes (tokenizer-free)."""
    if n_bytes <= 0:
        raise LenspipeError(f"bits_per_byte needs a positive byte count, got {n_bytes}")
    return float(nats_sum) / math.log(2) / int(n_bytes)


# --------------------------------------------------------------------------- fused
#
# Exactness. Every sum over the vocabulary is one row's torch reduction (cascade-summed:
# ~1e-7 relative in float32, and the same bits whatever the thread count, since threads
# split rows, never one row); sums over rows are float64. Two float32 shortcuts this
# replaced were each off by 1e-4..1e-2 nats: one dot product over all (tokens x vocab)
# values (512 x 49,152 in training), and trusting that a float32 softmax sums to 1: its
# internal normaliser is accumulated less exactly, so over 49k entries the result sums
# to 1 +- ~1e-5, which shifts lse-based KL by ~1e-5 x lse ~ 3e-4 nats. Both sums are now
# measured with a cascade reduction and folded back in.

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


class Workspace:
    """Reusable (n, vocab) buffers for :func:`logit_stats`, one set per thread.

    Every fresh (1,024 x 49,152) float32 temporary is a 200 MB allocation, which glibc
    serves with mmap and returns with munmap: the kernel zero-fills it page by page on
    first touch (~1 GB/s here), so allocating was slower than the arithmetic. Writing into
    buffers kept across lenses and layers (``out=``) removes those page faults.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> Tensor:
        """An uninitialised buffer of this shape and dtype, the same one while they do not change
        (or while only its leading dimension shrinks: then a leading view of it).
        On a GPU a fresh tensor: the caching allocator already reuses memory without page
        faults, and buffers held here would keep GBs of device memory for the whole run."""
        if torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        shape = tuple(shape)
        buf = self._buffers.get(name)
        if (buf is not None and buf.dtype == dtype and buf.device == torch.device(device) and buf.ndim == len(shape)
                and buf.shape[1:] == shape[1:] and buf.shape[0] >= shape[0]):
            return buf[:shape[0]]  # fewer rows (a last, partial block): a leading view, contiguous
        self._buffers.pop(name, None)  # free the old one first: peak memory stays one buffer
        buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def like(self, name: str, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return self.take(name, t.shape, t.dtype if dtype is None else dtype, t.device)


_LOCAL = threading.local()


def workspace() -> Workspace:
    """This thread's :class:`Workspace` (dask runs evaluation chunks in threads)."""
    if not hasattr(_LOCAL, "ws"):
        _LOCAL.ws = Workspace()
    return _LOCAL.ws


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


def logit_stats(z: Tensor, final: dict[str, Tensor], next_ids: Tensor, k: int,
                with_rank: bool = False, ws: Workspace | None = None) -> dict[str, Tensor]:
    """Every per-token metric of one lens from its logits z (n, vocab), in ~7 passes over
    each cache-sized block of rows (:func:`row_blocks`).

    Same values as the functions above (tests check it), but from the logits directly:
    with lse = logsumexp(z), KL(p || q) = sum p log p - <p, z> + lse, H(q) = lse - E_q[z],
    CE = lse - z[next], top-1 probability = exp(max z - lse).
    No log_softmax tensor is built and the model's side is shared across lenses
    (``final_stats``): on SmolLM2's 49,152-token vocabulary this made evaluation ~3x
    faster than composing the functions above. KL and entropy are float64 per token.
    Temporaries go to ``ws`` (default: this thread's :func:`workspace`).
    """
    z = _floating(z)
    ws = workspace() if ws is None else ws
    parts = [_logit_stats_rows(z[b], {key: v[b] for key, v in final.items()}, next_ids[b], k, with_rank, ws)
             for b in row_blocks(z)]
    return parts[0] if len(parts) == 1 else {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _logit_stats_rows(z: Tensor, final: dict[str, Tensor], next_ids: Tensor, k: int, with_rank: bool,
                      ws: Workspace) -> dict[str, Tensor]:
    """:func:`logit_stats` of one block of rows."""
    top, zmax = _argmax_rows(z)  # (n,) x 2
    q = torch.softmax(z, dim=-1, out=ws.like("q", z))  # (n, vocab): one fused pass
    q_top = q.gather(-1, top[:, None]).squeeze(-1)  # (n,) = exp(zmax - lse) >= 1/vocab
    # softmax's own normaliser is inexact; its output's cascade sum measures the error
    q_sum = q.sum(-1)  # (n,) = 1 + O(1e-5)
    lse = zmax - q_top.log() + q_sum.log()  # exact logsumexp without another exp pass
    tmp = ws.like("tmp", z)
    out = {
        "top1": top, "top1_prob": (q_top / q_sum).clamp(0.0, 1.0),
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
