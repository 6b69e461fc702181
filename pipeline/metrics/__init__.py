"""Per-token lens metrics and their aggregation: pure functions on tensors (no I/O, no model).

Shapes: ``logits``/``logp`` (n, vocab); ``ids`` (n,) int64; ``mask`` (n,) bool; per-token
results (n,) in the input's float dtype (float32 at least). Natural logs (nats) unless a
name says bits. Flattened tokens are whole sequences laid end to end, ``seq_len`` each.

- ``token``      per-token metrics from log-probabilities: KL, cross-entropy, entropy, top-1, ranks
- ``aggregate``  calibration bins, per-sequence sums, bootstrap CIs over sequences, bits per byte
- ``buffers``    ``Workspace``: reusable (n, vocab) buffers, one set per thread
- ``fused``      every per-token metric of a lens straight from its logits, exact, in cache-sized blocks

Each module imports only those above it in this list (``token`` and ``buffers`` none).
The package re-exports the public functions and classes (``from pipeline import metrics as M``);
the tuning constants (``fused.CACHE_BLOCK_BYTES``, ``fused.ARGMAX_SEGMENT``,
``aggregate.BOOT_BLOCK_ELEMENTS``) are read where they are defined: set them there.
"""

from .aggregate import CalibrationBins, bits_per_byte, bootstrap_ci, per_sequence_sums
from .buffers import Workspace, workspace
from .fused import (
    final_stats,
    kl_and_lse,
    kl_from_logits,
    kl_rows,
    log_probs_into,
    logit_stats,
    logsumexp_rows,
    row_blocks,
    row_dot,
    target_stats,
)
from .token import (
    adjacent_agreement,
    cross_entropy,
    entropy,
    kl_div,
    log_probs,
    next_token_targets,
    rank_of,
    top1,
    topk_agreement,
)

__all__ = [
    "adjacent_agreement",
    "cross_entropy",
    "entropy",
    "kl_div",
    "log_probs",
    "next_token_targets",
    "rank_of",
    "top1",
    "topk_agreement",
    "CalibrationBins",
    "bits_per_byte",
    "bootstrap_ci",
    "per_sequence_sums",
    "Workspace",
    "workspace",
    "final_stats",
    "kl_and_lse",
    "kl_from_logits",
    "kl_rows",
    "log_probs_into",
    "logit_stats",
    "logsumexp_rows",
    "row_blocks",
    "row_dot",
    "target_stats",
]
