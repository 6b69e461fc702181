"""What every analysis reports besides its tables: its findings, each an estimate with a 95%
confidence interval, its sample size and whether the interval resolves the question.

A finding answers one question of its analysis ("do injected instructions score higher
than normal text?") with a statistic, its 95% CI (a bootstrap over the units that are
independent: sequences of text, windows, directions, prompts) and the value that would
mean "no effect" (the null). Its verdict:

- ``differs``: resolved when the CI excludes the null (AUROC 0.5, a correlation 0, a
  difference 0);
- ``includes``: a control, resolved when the CI contains its expected value (normal text
  against normal text must sit at AUROC 0.5; if it does not, the detector is biased and
  no other AUROC of the table can be trusted);
- ``at_least``: a stability, resolved when the estimate reaches the threshold (a pruning
  candidate in the top 3 of at least 95% of bootstrap resamples);
- ``none``: no sampling (a property of the trained lens itself): no CI, no verdict.

Anything else is "not resolved at this sample size", and so is any finding on fewer than
``MIN_UNITS`` units: the report says so beside the number, and the remedy is the
analysis's sample-size setting. Each analysis module states in ``POWER``, a paragraph that
begins with "Power.", the effect it must be able to detect and the sample size that gives
it; the report prints it (``power_of``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import LenspipeError

TESTS = ("differs", "includes", "at_least", "none")
UNRESOLVED = "not resolved at this sample size"
BOOTSTRAP = 1000
LEVEL = 0.95
#: Fewer independent units than this resolve nothing: a bootstrap over a handful of
#: sequences (2 of them, say) gives intervals far too narrow to be believed.
MIN_UNITS = 8


@dataclass(frozen=True)
class Finding:
    question: str
    """What it answers, as a short phrase ("AUROC, injected instructions vs normal text")."""
    estimate: float
    """The statistic on the whole sample."""
    lo: float
    """Lower end of its 95% CI (NaN where there is no sampling)."""
    hi: float
    """Upper end of its 95% CI."""
    null: float
    """The value meaning "no effect" (``differs``), the expected value (``includes``) or the
    threshold (``at_least``); NaN for ``none``."""
    n: int
    """Sample size: the number of independent units resampled."""
    unit: str
    """What the units are ("sequences", "windows per class", "directions", "prompts")."""
    test: str = "differs"
    """How the verdict is read (see the module docstring): differs, includes, at_least, none."""

    def __post_init__(self) -> None:
        if self.test not in TESTS:
            raise ValueError(f"finding test {self.test!r} is not one of {TESTS}")

    @property
    def resolved(self) -> bool | None:
        if self.test == "none":
            return None
        if self.n < MIN_UNITS:
            return False
        if self.test == "at_least":
            return bool(self.estimate >= self.null)
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return False
        inside = self.lo <= self.null <= self.hi
        return inside if self.test == "includes" else not inside

    @property
    def verdict(self) -> str:
        r = self.resolved
        return "n/a (no sampling)" if r is None else "resolved" if r else UNRESOLVED


def findings_table(findings: list[Finding]) -> pd.DataFrame:
    """One row per finding, with its verdict (the ``<rule>_findings`` table)."""
    rows = [dataclasses.asdict(f) | {"resolved": f.resolved, "verdict": f.verdict} for f in findings]
    cols = [f.name for f in dataclasses.fields(Finding)] + ["resolved", "verdict"]
    return pd.DataFrame(rows, columns=cols).astype({"resolved": object})


def write_findings(findings: list[Finding], out_dir: Path, rule: str, provenance: dict) -> pd.DataFrame:
    from ..tables import write_table_df

    df = findings_table(findings)
    write_table_df(
        df, Path(out_dir) / f"{rule}_findings.parquet", provenance | {"bootstrap": BOOTSTRAP, "level": LEVEL}
    )
    return df


def bootstrap(
    stat: Callable[..., float], *n_units: int, n_boot: int = BOOTSTRAP, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile CI of ``stat(units, ...)``, one array of unit indices per independent group
    (``n_units`` gives each group's size), each drawn with replacement from 0..n-1 (the
    whole sample is ``np.arange(n)``). Replicates whose statistic is NaN (e.g. a rank
    correlation of a constant resample) are left out; fewer than 2 units: no CI."""
    if min(n_units, default=0) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng([seed, *n_units])
    boot = np.array([stat(*(rng.integers(0, n, n) for n in n_units)) for _ in range(n_boot)], dtype=float)
    boot = boot[np.isfinite(boot)]
    if not len(boot):
        return math.nan, math.nan
    alpha = (1 - level) / 2
    lo, hi = np.percentile(boot, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def whole(*n_units: int) -> list[np.ndarray]:
    """The whole sample: every unit once, for each group (the estimate's ``stat`` arguments)."""
    return [np.arange(n) for n in n_units]


def mean_finding(
    question: str,
    per_unit: np.ndarray,
    unit: str,
    null: float = 0.0,
    *,
    weights=None,
    test: str = "differs",
    seed: int = 0,
) -> Finding:
    """The mean of per-unit values (weighted by ``weights``, e.g. each sequence's token
    count, so the estimate is the token mean) with its bootstrap CI over units."""
    v = np.asarray(per_unit, float)
    w = np.ones_like(v) if weights is None else np.asarray(weights, float)
    stat = lambda idx: float((v[idx] * w[idx]).sum() / w[idx].sum()) if w[idx].sum() > 0 else math.nan  # noqa: E731
    lo, hi = bootstrap(stat, len(v), seed=seed)
    return Finding(question, stat(*whole(len(v))), lo, hi, null, len(v), unit, test)


def spearman(a, b) -> float:
    """Rank correlation (average ranks for ties); NaN when either side is constant."""
    ra, rb = (pd.Series(np.asarray(x, float)).rank().to_numpy() for x in (a, b))
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def sequence_of(token_index: np.ndarray, seq_len: int) -> np.ndarray:
    """The store sequence of each token index (tokens of a sequence are correlated: the
    bootstrap resamples sequences, never tokens)."""
    return np.asarray(token_index, np.int64) // int(seq_len)


def per_sequence(values: np.ndarray, sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sequence ids, sums, counts) of per-token values grouped by their sequence."""
    ids, inverse = np.unique(sequences, return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(values, float), minlength=len(ids))
    return ids, sums, np.bincount(inverse, minlength=len(ids)).astype(float)


def model_token_index(tokens: pd.DataFrame) -> np.ndarray:
    """(n,) the evaluated token indices in the order read_token_table's arrays use."""
    return np.sort(tokens.loc[tokens.lens == "model", "token_index"].to_numpy())


def seq_len_of(tokens: pd.DataFrame) -> int:
    """The store's sequence length, from the per-token table alone: evaluated tokens are
    whole sequences, in token_index order, and the last position of each has no next token
    (next_token_rank -1), so the first sequence's length is where its end marker sits."""
    model = tokens[tokens.lens == "model"].sort_values("token_index")
    ends = np.flatnonzero(model.next_token_rank.to_numpy() < 0)
    if not len(ends):
        raise LenspipeError("the per-token table marks no sequence end (next_token_rank -1): re-run evaluate")
    return int(ends[0]) + 1


def lens_kl_by_sequence(token_dir: Path, translator: str) -> pd.DataFrame:
    """Per evaluated sequence of a per-token table: the sums over its tokens of the logit and
    the tuned lens's KL, each averaged over (block) layers (``logit``, ``tuned``), and its token count
    (``n``): what every "how much does the tuned lens remove" finding is a ratio of."""
    from ..tables import read_token_metrics

    cols = ["lens", "translator", "layer", "token_index", "kl"]
    t = read_token_metrics(token_dir, cols).astype({"lens": str, "translator": str})  # block rows
    seq_len = seq_len_of(
        read_token_metrics(token_dir, ["lens", "token_index", "next_token_rank"]).astype({"lens": str})
    )
    per_token = {}
    for lens, tr in (("logit", "none"), ("tuned", translator)):
        g = t[(t.lens == lens) & (t.translator == tr)]
        per_token[lens] = g.groupby("token_index").kl.mean()  # mean over layers, per token
    both = pd.DataFrame(per_token).dropna()
    both["sequence"] = sequence_of(both.index.to_numpy(), seq_len)
    return (
        both.groupby("sequence").agg(logit=("logit", "sum"), tuned=("tuned", "sum"), n=("logit", "size")).reset_index()
    )


def removed_share(seqs: pd.DataFrame) -> Callable[[np.ndarray], float]:
    """stat(idx): the share of the logit lens's KL the tuned lens removes, 1 - tuned / logit,
    over the resampled sequences of ``lens_kl_by_sequence``."""
    logit, tuned = seqs.logit.to_numpy(), seqs.tuned.to_numpy()
    return lambda idx: 1.0 - tuned[idx].sum() / logit[idx].sum()


def kl_reduction(seqs: pd.DataFrame) -> Callable[[np.ndarray], float]:
    """stat(idx): the mean KL the tuned lens removes per token, (logit - tuned) / n [nats]."""
    d, n = (seqs.logit - seqs.tuned).to_numpy(), seqs.n.to_numpy(float)
    return lambda idx: d[idx].sum() / n[idx].sum()


def power_of(module) -> str:
    """An analysis module's ``POWER``: the effect it must detect and the sample size that
    gives it."""
    return getattr(module, "POWER", "")


def format_finding(f: pd.Series | Finding) -> str:
    """``estimate [lo, hi]`` to a sensible number of digits."""
    digits = 3 if max(abs(f.estimate), abs(f.hi) if math.isfinite(f.hi) else 0) < 10 else 1
    if not math.isfinite(f.lo):
        return f"{f.estimate:.{digits}f}"
    return f"{f.estimate:.{digits}f} [{f.lo:.{digits}f}, {f.hi:.{digits}f}]"
