"""Aggregation of per-token metrics: calibration bins, per-sequence sums, bootstrap
confidence intervals over sequences, bits per byte.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import LenspipeError
from .token import _n_sequences

#: bootstrap_ci draws at most this many (replicate, sequence) indices at once, bounding its
#: memory whatever the number of sequences; results do not depend on it (draws are serial).
BOOT_BLOCK_ELEMENTS = 1 << 22


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

    def update(self, conf: Tensor, correct: Tensor, mask: Tensor | None = None) -> CalibrationBins:
        """conf (n,) in [0, 1], correct (n,) bool, mask (n,) bool (False: token ignored)."""
        conf = conf.detach().to("cpu", torch.float64).clamp(0.0, 1.0)
        correct = correct.detach().to("cpu", torch.float64)
        if mask is not None:
            keep = mask.detach().to("cpu", torch.bool)
            conf, correct = conf[keep], correct[keep]
        b = (conf * self.n_bins).long().clamp_(max=self.n_bins - 1)  # (m,) bin of each
        self.count += torch.bincount(b, minlength=self.n_bins)
        self.conf_sum += torch.bincount(b, weights=conf, minlength=self.n_bins)
        self.correct_sum += torch.bincount(b, weights=correct, minlength=self.n_bins)
        return self

    def merge(self, other: CalibrationBins) -> CalibrationBins:
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


def bootstrap_ci(
    sums: Tensor, counts: Tensor, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
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
    block = max(1, BOOT_BLOCK_ELEMENTS // n_seq)  # replicates per draw: bounded memory
    stats = []
    for start in range(0, n_boot, block):
        idx = torch.randint(0, n_seq, (min(block, n_boot - start), n_seq), generator=gen)
        stats.append(sums[idx].sum(1) / counts[idx].sum(1))  # (rows,) ratio of sums
    boot = torch.cat(stats)  # (n_boot,)
    # A replicate of only empty sequences has no mean (0/0 = nan): leave it out.
    alpha = (1.0 - level) / 2
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    lo, hi = torch.nanquantile(boot, q).tolist()  # linear, as numpy.percentile
    return lo, hi


def bits_per_byte(nats_sum: float, n_bytes: int) -> float:
    """Total nats over a text -> bits per UTF-8 byte: nats / ln 2 / bytes (tokenizer-free)."""
    if n_bytes <= 0:
        raise LenspipeError(f"bits_per_byte needs a positive byte count, got {n_bytes}")
    return float(nats_sum) / math.log(2) / int(n_bytes)
