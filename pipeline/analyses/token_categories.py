"""Logit vs tuned lens per token category (seed: "Comparative Analysis").

Each evaluated position is categorised by the token it must predict (the true next
token), from the token's text: whitespace, punctuation, number, a word start (the token
begins with a space: a new word), a word piece (continues a word), or all caps (speaker
names in play scripts: ``HAMLET``). Per (category, layer): the mean KL of each lens to the
model, their gap, and how often the two lenses' top-1 predictions disagree.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..plots import figure, save
from ..tables import write_table_df
from .findings import Finding, bootstrap, model_token_index, seq_len_of, sequence_of, whole, write_findings
from .prediction_depth import read_token_table

#: The effect this analysis must be able to detect, and the sample size that gives it
#: (the report prints it beside the findings).
POWER = (
    "Power. The question is which kinds of token the two lenses disagree on most and least: the "
    "difference between the top-1 disagreement rates (averaged over layers) of the most and the least "
    "affected categories, and the same for the tuned lens's KL advantage, each with a bootstrap CI "
    "over the evaluated sequences. Rare categories decide the sample size: numbers and all-caps "
    "speaker names are a few percent of play tokens, so the 4,096 evaluated tokens hold ~100 of them, "
    "enough to resolve a disagreement difference of 0.1 (the measured one is ~0.4); a category with "
    "fewer than 30 tokens is left out of the comparison."
)


CATEGORIES = ("whitespace", "punctuation", "number", "all caps", "word start", "word piece", "other")
#: Categories with fewer evaluated tokens than this are left out of the findings.
MIN_TOKENS = 30


def categorise(text: str) -> str:
    """Category of one decoded token (see the module docstring)."""
    core = text.strip()
    if not core:
        return "whitespace"
    if all(not c.isalnum() for c in core):
        return "punctuation"
    if core.isdigit():
        return "number"
    if re.fullmatch(r"[A-Z]{2,}", core):
        return "all caps"
    if core.isalpha() or re.fullmatch(r"[A-Za-z']+", core):
        return "word start" if text[:1].isspace() else "word piece"
    return "other"


def run(artifacts, *, translator: str) -> None:
    """The rule's job (see pipeline.analyses): the token table of one run and its tokenizer."""
    token_categories(
        artifacts.need("token_metrics"), artifacts.need("model_dir"), artifacts.analyses_dir, translator=translator
    )


def token_categories(token_dir: Path, model_dir: Path, out_dir: Path, *, translator: str) -> pd.DataFrame:
    """Write token_categories.parquet and .png; returns the table."""
    from transformers import AutoTokenizer

    tokens, _, n_layers, next_ids = read_token_table(token_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = np.unique(next_ids[next_ids >= 0])
    by_id = {int(i): categorise(tok.decode([int(i)])) for i in ids}
    # next_ids come in token_index order; evaluated tokens are a sample of the store, so
    # token_index has gaps: key the categories by it, never by position
    index = model_token_index(tokens)
    cat = pd.Series([by_id.get(int(i), "other") for i in next_ids], index=index, dtype=object)
    both = paired_tokens(tokens, cat, translator)
    df = category_table(both, translator)
    df["n_layers"] = n_layers
    prov = {"analysis": "token_categories", "token_dir": str(token_dir), "translator": translator}
    write_table_df(df, Path(out_dir) / "token_categories.parquet", prov)
    write_findings(category_findings(both, seq_len_of(tokens)), out_dir, "token_categories", prov)
    plot_categories(df, Path(out_dir) / "token_categories.png")
    return df


def paired_tokens(tokens: pd.DataFrame, cat: pd.Series, translator: str) -> pd.DataFrame:
    """Per (layer, token) with a next token: both lenses' KL and top-1, the category of the
    token to predict and whether the two top-1s differ. ``cat``: the category of each
    token's next token, indexed by token_index."""

    def lens_rows(lens, tr):
        g = tokens[(tokens.lens == lens) & (tokens.translator == tr)]
        return g[g.next_token_rank >= 0][["layer", "token_index", "kl", "top1_id"]]

    logit, tuned = lens_rows("logit", "none"), lens_rows("tuned", translator)
    both = logit.merge(tuned, on=["layer", "token_index"], suffixes=("_logit", "_tuned"))
    both["category"] = cat.loc[both.token_index.to_numpy()].to_numpy()
    both["disagree"] = both.top1_id_logit != both.top1_id_tuned
    both["kl_gap"] = both.kl_logit - both.kl_tuned
    return both


def category_table(both: pd.DataFrame, translator: str) -> pd.DataFrame:
    """Per (category, layer): mean KL per lens, gap, top-1 disagreement (``paired_tokens``)."""
    out = (
        both.groupby(["category", "layer"])
        .agg(
            n=("kl_logit", "size"),
            kl_logit=("kl_logit", "mean"),
            kl_tuned=("kl_tuned", "mean"),
            top1_disagree=("disagree", "mean"),
        )
        .reset_index()
    )
    out["kl_gap"] = out.kl_logit - out.kl_tuned
    out["translator"] = translator
    return out


def category_findings(both: pd.DataFrame, seq_len: int) -> list[Finding]:
    """The most minus the least affected category (of those with MIN_TOKENS tokens), for
    top-1 disagreement and for the KL gap, averaged over layers; bootstrap over sequences."""
    per_token = both.groupby(["token_index", "category"])[["disagree", "kl_gap"]].mean().reset_index()
    per_token["sequence"] = sequence_of(per_token.token_index, seq_len)
    counts = per_token.groupby("category").size()
    cats = sorted(counts[counts >= MIN_TOKENS].index)
    if len(cats) < 2:
        return []
    seqs = np.unique(per_token.sequence)
    per_token["one"] = 1.0

    def grid(col):  # (n_seq, n_cat) per-sequence sums of a per-token column
        return (
            per_token.pivot_table(index="sequence", columns="category", values=col, aggfunc="sum")
            .reindex(index=seqs, columns=cats)
            .fillna(0.0)
            .to_numpy()
        )

    n = grid("one")
    out = []
    for col, what in (("disagree", "top-1 disagreement rate"), ("kl_gap", "KL advantage of the tuned lens [nats]")):
        sums = grid(col)  # (n_seq, n_cat)
        means = sums.sum(0) / n.sum(0)
        hi_c, lo_c = int(np.argmax(means)), int(np.argmin(means))

        def stat(idx, hi_c=hi_c, lo_c=lo_c, sums=sums):
            s, c = sums[idx].sum(0), n[idx].sum(0)
            return s[hi_c] / c[hi_c] - s[lo_c] / c[lo_c] if c[hi_c] > 0 and c[lo_c] > 0 else np.nan

        lo, hi = bootstrap(stat, len(seqs))
        out.append(
            Finding(
                f"{what}: {cats[hi_c]} minus {cats[lo_c]} tokens",
                stat(*whole(len(seqs))),
                lo,
                hi,
                0.0,
                len(seqs),
                "sequences",
            )
        )
    return out


def plot_categories(df: pd.DataFrame, path: Path) -> None:
    cats = [c for c in CATEGORIES if c in set(df.category)]
    fig, axes = figure(1, 2, (15, 4.8))
    grid = df.pivot(index="category", columns="layer", values="top1_disagree").reindex(cats)
    im = axes[0].imshow(grid.to_numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1)
    n = df.groupby("category").n.max().reindex(cats)
    axes[0].set_yticks(range(len(cats)), [f"{c} (n={n[c]})" for c in cats])
    axes[0].set(xlabel="layer", title="top-1 disagreement, logit vs tuned lens")
    fig.colorbar(im, ax=axes[0], fraction=0.03)
    for c in cats:
        g = df[df.category == c]
        axes[1].plot(g.layer, g.kl_gap, marker="o", ms=3, label=c)
    axes[1].set(
        yscale="symlog",
        xlabel="layer",
        ylabel="KL(logit lens) - KL(tuned lens) [nats]",
        title="where the tuned lens helps most",
    )
    save(fig, path, axes[1:])


def summary(df: pd.DataFrame) -> str:
    mean = df.groupby("category").agg(gap=("kl_gap", "mean"), dis=("top1_disagree", "mean"), n=("n", "max"))
    top, low = mean.gap.idxmax(), mean.gap.idxmin()
    return (
        f"averaged over layers, the lenses disagree most on {mean.dis.idxmax()} tokens "
        f"(top-1 differs {mean.dis.max():.0%} of the time) and least on {mean.dis.idxmin()} "
        f"({mean.dis.min():.0%}); the tuned lens's KL advantage is largest for {top} "
        f"({mean.gap[top]:.1f} nats) and smallest for {low} ({mean.gap[low]:.1f} nats)."
    )
