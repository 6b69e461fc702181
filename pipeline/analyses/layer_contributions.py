"""Layer contributions and pruning candidates (seed: "Layer Pruning", "Performance Bottlenecks").

Under the tuned lens, block ``b`` (which maps residual ``b`` to ``b + 1``) contributes the
KL drop ``kl[b] - kl[b + 1]`` (``kl[n_layers] = 0``: the output is the model). Blocks with
the smallest drop are the pruning candidates. To check what that ranking is worth, each
block is then actually skipped (its output replaced by its input) on a sample of
held-out sequences, and the change in next-token loss is measured; the table holds both,
the findings their rank correlation and how stable each ranking's top 3 is.

Skipping block ``b`` changes nothing before it, so the model runs once per batch and each
skip resumes from the stored-in-memory residual ``b`` at block ``b + 1``
(``pipeline.model.resume``): about half the work of a full forward pass per block.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import LenspipeError
from ..plots import figure, save
from ..progress import Progress
from ..sampling import spread_sequences, token_index
from ..tables import block_rows, read_provenance, read_token_metrics, write_table_df
from .findings import BOOTSTRAP, Finding, bootstrap, spearman, whole, write_findings

log = logging.getLogger(__name__)

#: Pruning candidates per ranking (the "top 3" whose stability is a finding).
#: The effect this analysis must be able to detect, and the sample size that gives it
#: (the report prints it beside the findings).
POWER = (
    "Power. Two questions, both answered by a bootstrap over the sampled sequences (each resample "
    "recomputes every block's KL drop and skip cost): does the lens's ranking predict the real "
    "removal cost (Spearman over the blocks, null 0), and are the pruning candidates the same "
    "whichever sequences are drawn (each of the 3 candidates must be among the 3 smallest in at least "
    "95% of resamples). Per-sequence skip costs and KL drops vary by a factor of ~2 between "
    "sequences, so ranks of blocks whose costs are within ~10% of each other swap under resampling. "
    "The default 8 sequences (2,048 tokens, ``analyses.skip_tokens``; the fewest a finding resolves "
    "on) gave SmolLM2 a Spearman of 0.35 [0.27, 0.48], which excludes 0, and skip-cost candidates "
    "that are stable (in the top 3 in 87-98% of resamples); the lens's own candidates were not "
    "(52-63%): their KL drops lie within a few hundredths of a nat of each other, closer than 8 "
    "sequences resolve. Each doubling of the sequences costs as much again (~70 s on 2 cores) and "
    "narrows the intervals by ~1.4x."
)


TOP = 3
#: A candidate must be among the TOP in at least this share of bootstrap resamples.
STABLE = 0.95
#: Sequences per forward pass of the skip measurements (bounds the (batch, pos, vocab) logits).
BATCH_SEQUENCES = 4


def kl_drops(kl: np.ndarray) -> np.ndarray:
    """Per-layer KL (..., n_layers) for layers 0..n_layers-1 -> drop of each block (..., n_layers)."""
    return kl - np.concatenate([kl[..., 1:], np.zeros_like(kl[..., :1])], axis=-1)


def token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) float64 next-token cross-entropy of logits (B, T, vocab) on ids (B, T)."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    return -lp.gather(-1, ids[:, 1:, None])[..., 0].double()


@torch.no_grad()
def skip_costs(model, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence of ids (S, T): the summed next-token loss of the model (S,) and of the
    model with each block skipped in turn (S, n_layers), both in nats over T-1 positions."""
    from ..model.resume import Resumable

    n_layers = None
    base, skipped = [], []
    with Progress(len(ids), "skip blocks", unit="seq") as bar:
        for b in range(0, len(ids), BATCH_SEQUENCES):
            x = ids[b : b + BATCH_SEQUENCES]
            r = Resumable(model, x)
            n_layers = r.n_layers
            base.append(token_ce(r.logits, x).sum(1))
            # skipping block k: its output is its input, so block k + 1 resumes from resid[k]
            skipped.append(
                torch.stack([token_ce(r.logits_from(k + 1, r.resid[k]), x).sum(1) for k in range(n_layers)], 1)
            )
            bar.update(len(x))
    return torch.cat(base).numpy(), torch.cat(skipped).numpy()


def _lens_kl(tokens: pd.DataFrame, lens: str, translator: str, n_layers: int, seq_len: int) -> np.ndarray:
    """(n_seq, n_layers) per sequence (in token_index order) the summed per-token KL of one
    lens at each layer."""
    g = tokens[(tokens.lens == lens) & (tokens.translator == translator)]
    if sorted(g.layer.unique()) != list(range(n_layers)):
        raise LenspipeError(f"layer contributions need the {translator!r} tuned lens on all {n_layers} layers")
    g = g.assign(sequence=g.token_index // seq_len)
    return (
        g.pivot_table(index="sequence", columns="layer", values="kl", aggfunc="sum").sort_index().to_numpy(np.float64)
    )


def skip_sample(layer_metrics: Path, seq_len: int, skip_tokens: int) -> tuple[list[int], list[int]]:
    """(store, packed-split) indices of the sequences to skip blocks on: whole sequences
    spread over the ones the evaluation used, so KL drops and skip costs share tokens."""
    evaluated = read_provenance(layer_metrics).get("evaluated")
    if not evaluated:
        raise LenspipeError(
            f"{layer_metrics} does not record which sequences were evaluated (an older "
            "lenspipe wrote it); re-run the evaluate rule"
        )
    pick = spread_sequences(len(evaluated["sequences"]), max(1, skip_tokens // seq_len), 0)
    return ([evaluated["sequences"][i] for i in pick], [evaluated["split_sequences"][i] for i in pick])


def run(artifacts, *, translator: str, skip_tokens: int) -> None:
    """The rule's job (see pipeline.analyses): the evaluation tables, the model, the evaluated split."""
    layer_contributions(
        artifacts.need("layer_metrics"),
        artifacts.need("token_metrics"),
        artifacts.need("model_dir"),
        artifacts.need("split"),
        artifacts.analyses_dir,
        translator=translator,
        skip_tokens=skip_tokens,
    )


class Contributions:
    """Per-sequence sums behind every number of the table, so that a bootstrap resample of
    sequences (``idx``) recomputes all of them: KL per lens and layer, base and skip loss."""

    def __init__(self, kl: dict[str, np.ndarray], base: np.ndarray, skipped: np.ndarray, n_tok: int, n_pred: int):
        self.kl, self.base, self.skipped, self.n_tok, self.n_pred = kl, base, skipped, n_tok, n_pred

    def drops(self, idx, lens: str = "tuned") -> np.ndarray:
        return kl_drops(self.kl[lens][idx].sum(0) / (len(idx) * self.n_tok))  # (n_layers,)

    def delta(self, idx) -> np.ndarray:
        return (self.skipped[idx].sum(0) - self.base[idx].sum()) / (len(idx) * self.n_pred)  # (n_layers,)

    def resamples(self, n_boot: int = BOOTSTRAP, seed: int = 0):
        rng = np.random.default_rng([seed, len(self.base)])
        for _ in range(n_boot):
            idx = rng.integers(0, len(self.base), len(self.base))
            yield self.drops(idx), self.delta(idx)


def _smallest(values: np.ndarray, k: int = TOP) -> np.ndarray:
    return np.argsort(values, kind="stable")[:k]


def layer_contributions(
    layer_metrics: Path,
    token_dir: Path,
    model_dir: Path,
    split: Path,
    out_dir: Path,
    *,
    translator: str,
    skip_tokens: int,
) -> pd.DataFrame:
    """Write layer_contributions.parquet, its findings and .png; returns the table.

    KL drops and skip costs are measured on the same ``skip_tokens`` held-out tokens
    (whole evaluated sequences); ``kl_drop_all`` gives the drops over every evaluated token.
    """
    from transformers import AutoModelForCausalLM

    from ..corpus import load_split

    packed = load_split(split)
    seq_len = packed.tokens.shape[1]
    store_seqs, split_seqs = skip_sample(layer_metrics, seq_len, skip_tokens)
    tokens = read_token_metrics(token_dir, ["lens", "translator", "layer", "token_index", "kl"])  # block rows
    tokens = tokens[tokens.token_index.isin(token_index(store_seqs, seq_len))]
    tokens = tokens.astype({"lens": str, "translator": str, "kl": np.float64})
    n_layers = int(tokens.loc[tokens.lens == "model", "layer"].iloc[0])
    kl = {
        "tuned": _lens_kl(tokens, "tuned", translator, n_layers, seq_len),
        "logit": _lens_kl(tokens, "logit", "none", n_layers, seq_len),
    }
    lm = block_rows(pd.read_parquet(layer_metrics))
    kl_all = lm[(lm.lens == "tuned") & (lm.translator == translator)].sort_values("layer").kl.to_numpy()
    ids = torch.from_numpy(packed.tokens[split_seqs]).long()  # (n_seq, seq_len): the same tokens
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base, skipped = skip_costs(model, ids)
    c = Contributions(kl, base, skipped, seq_len, seq_len - 1)
    df = contribution_table(c, kl_all, ids.numel(), translator)
    findings = contribution_findings(c, df)
    prov = {
        "analysis": "layer_contributions",
        "layer_metrics": str(layer_metrics),
        "token_dir": str(token_dir),
        "sample_sequences": store_seqs,
        "sample_split_sequences": split_seqs,
        "spearman_kl_drop_vs_skip_delta_ce": findings[0].estimate if findings else None,
    }
    write_table_df(df, Path(out_dir) / "layer_contributions.parquet", prov)
    write_findings(findings, out_dir, "layer_contributions", prov)
    plot_contributions(df, Path(out_dir) / "layer_contributions.png")
    return df


def contribution_table(c: Contributions, kl_all: np.ndarray, sample_tokens: int, translator: str) -> pd.DataFrame:
    """Per block: KL drops and skip cost with bootstrap CIs, ranks, and the share of
    resamples in which the block is among the TOP smallest of each ranking."""
    n_seq, n_layers = len(c.base), c.skipped.shape[1]
    idx = np.arange(n_seq)
    boots = list(c.resamples()) if n_seq > 1 else []
    drops = np.array([d for d, _ in boots]).reshape(-1, n_layers)
    deltas = np.array([s for _, s in boots]).reshape(-1, n_layers)

    def q(a, p):
        return np.percentile(a, p, axis=0) if len(a) else np.full(n_layers, np.nan)

    def top(a):
        return np.bincount(np.argsort(a, axis=1, kind="stable")[:, :TOP].ravel(), minlength=n_layers) / max(len(a), 1)

    df = pd.DataFrame(
        {
            "block": np.arange(n_layers),
            "kl_drop": c.drops(idx),
            "kl_drop_lo": q(drops, 2.5),
            "kl_drop_hi": q(drops, 97.5),
            "kl_drop_logit": c.drops(idx, "logit"),
            "kl_drop_all": kl_drops(kl_all),
            "skip_delta_ce": c.delta(idx),
            "skip_delta_ce_lo": q(deltas, 2.5),
            "skip_delta_ce_hi": q(deltas, 97.5),
            "top3_freq_lens": top(drops) if len(drops) else np.nan,
            "top3_freq_skip": top(deltas) if len(deltas) else np.nan,
            "base_ce": c.base.sum() / (n_seq * c.n_pred),
            "sample_tokens": sample_tokens,
            "sample_sequences": n_seq,
            "translator": translator,
        }
    )
    df["rank_lens"] = df.kl_drop.rank(method="first").astype(int)  # 1 = smallest drop = first pruning candidate
    df["rank_skip"] = df.skip_delta_ce.rank(method="first").astype(int)
    return df


def contribution_findings(c: Contributions, df: pd.DataFrame) -> list[Finding]:
    n_seq = len(c.base)
    stat = lambda idx: spearman(c.drops(idx), c.delta(idx))  # noqa: E731
    lo, hi = bootstrap(stat, n_seq)
    out = [
        Finding(
            "Spearman(tuned-lens KL drop, loss increase when skipped) over blocks",
            stat(*whole(n_seq)),
            lo,
            hi,
            0.0,
            n_seq,
            "sequences",
        )
    ]
    for col, rank, what in (
        ("top3_freq_lens", "rank_lens", "the lens's"),
        ("top3_freq_skip", "rank_skip", "the skip cost's"),
    ):
        for _, r in df[df[rank] <= TOP].sort_values(rank).iterrows():
            out.append(
                Finding(
                    f"block {int(r.block)} among {what} {TOP} pruning candidates: share of resamples",
                    float(r[col]),
                    np.nan,
                    np.nan,
                    STABLE,
                    n_seq,
                    "sequences",
                    "at_least",
                )
            )
    return out


def _err(df: pd.DataFrame, col: str):
    """Error bars (2, n) of a column from its _lo/_hi CI columns (none where they are NaN)."""
    lo, hi = df[f"{col}_lo"].to_numpy(), df[f"{col}_hi"].to_numpy()
    v = df[col].to_numpy()
    return None if np.isnan(lo).all() else np.abs(np.stack([v - lo, hi - v]))


def plot_contributions(df: pd.DataFrame, path: Path) -> None:
    fig, axes = figure(1, 2, (14, 4.8))
    axes[0].bar(
        df.block - 0.2, df.kl_drop, width=0.4, yerr=_err(df, "kl_drop"), capsize=2, label="tuned-lens KL drop [nats]"
    )
    ax2 = axes[0].twinx()
    ax2.bar(
        df.block + 0.2,
        df.skip_delta_ce,
        width=0.4,
        yerr=_err(df, "skip_delta_ce"),
        capsize=2,
        color="tab:red",
        alpha=0.7,
        label="loss increase when skipped",
    )
    ax2.set_ylabel("next-token loss increase when skipped [nats]", color="tab:red")
    axes[0].set(
        xlabel="block",
        ylabel="KL drop across the block [nats]",
        title=f"what each block contributes (95% CIs over {int(df.sample_sequences.iloc[0])} sequences)",
    )
    axes[1].scatter(df.kl_drop, df.skip_delta_ce)
    for _, r in df.iterrows():
        axes[1].annotate(str(int(r.block)), (r.kl_drop, r.skip_delta_ce), fontsize=7)
    axes[1].set(
        yscale="symlog",
        xlabel="tuned-lens KL drop [nats]",
        ylabel="loss increase when skipped [nats]",
        title=f"lens ranking vs real removal cost (Spearman {spearman(df.kl_drop, df.skip_delta_ce):.2f})",
    )
    save(fig, path, axes)


def summary(df: pd.DataFrame) -> str:
    cand = df.sort_values("rank_lens").head(TOP)
    cheap = df.sort_values("rank_skip").head(TOP)
    return (
        f"smallest tuned-lens contributions (pruning candidates): blocks {', '.join(map(str, cand.block))} "
        f"(among the {TOP} smallest in {', '.join(f'{x:.0%}' for x in cand.top3_freq_lens)} of bootstrap "
        f"resamples), whose removal costs {', '.join(f'{x:+.3f}' for x in cand.skip_delta_ce)} nats of "
        f"next-token loss (base {df.base_ce.iloc[0]:.3f}); the cheapest blocks to remove are "
        f"{', '.join(map(str, cheap.block))} ({', '.join(f'{x:.0%}' for x in cheap.top3_freq_skip)} of "
        f"resamples); the costliest removal is block {int(df.skip_delta_ce.idxmax())} "
        f"({df.skip_delta_ce.max():+.3f}); Spearman(lens drop, removal cost) = "
        f"{spearman(df.kl_drop, df.skip_delta_ce):.2f} over {len(df)} blocks, on "
        f"{int(df.sample_sequences.iloc[0])} sequences."
    )
