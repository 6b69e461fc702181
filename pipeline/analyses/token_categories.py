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

from .prediction_depth import read_token_table
from ..plots import figure, save
from ..tables import write_table_df

CATEGORIES = ("whitespace", "punctuation", "number", "all caps", "word start", "word piece", "other")


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


def run(inputs, *, translator: str) -> None:
    """The rule's job (see pipeline.analyses): the token table of one run and its tokenizer."""
    token_categories(inputs.need("token_metrics"), inputs.need("model_dir"), inputs.analyses_dir, translator=translator)


def token_categories(token_dir: Path, model_dir: Path, out_dir: Path, *, translator: str) -> pd.DataFrame:
    """Write token_categories.parquet and .png; returns the table."""
    from transformers import AutoTokenizer

    tokens, _, n_layers, next_ids = read_token_table(token_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = np.unique(next_ids[next_ids >= 0])
    by_id = {int(i): categorise(tok.decode([int(i)])) for i in ids}
    # next_ids come in token_index order; evaluated tokens are a sample of the store, so
    # token_index has gaps: key the categories by it, never by position
    index = np.sort(tokens.loc[tokens.lens == "model", "token_index"].to_numpy())
    cat = pd.Series([by_id.get(int(i), "other") for i in next_ids], index=index, dtype=object)
    df = category_table(tokens, cat, translator)
    df["n_layers"] = n_layers
    write_table_df(df, Path(out_dir) / "token_categories.parquet",
                   {"analysis": "token_categories", "token_dir": str(token_dir), "translator": translator})
    plot_categories(df, Path(out_dir) / "token_categories.png")
    return df


def category_table(tokens: pd.DataFrame, cat: pd.Series, translator: str) -> pd.DataFrame:
    """Per (category, layer): mean KL per lens, gap, top-1 disagreement; positions with a next
    token only. ``cat``: the category of each token's next token, indexed by token_index."""
    def lens_rows(lens, tr):
        g = tokens[(tokens.lens == lens) & (tokens.translator == tr)]
        return g[g.next_token_rank >= 0][["layer", "token_index", "kl", "top1_id"]]

    logit, tuned = lens_rows("logit", "none"), lens_rows("tuned", translator)
    both = logit.merge(tuned, on=["layer", "token_index"], suffixes=("_logit", "_tuned"))
    both["category"] = cat.loc[both.token_index.to_numpy()].to_numpy()
    both["disagree"] = both.top1_id_logit != both.top1_id_tuned
    out = (both.groupby(["category", "layer"]).agg(n=("kl_logit", "size"), kl_logit=("kl_logit", "mean"),
                                                   kl_tuned=("kl_tuned", "mean"), top1_disagree=("disagree", "mean"))
           .reset_index())
    out["kl_gap"] = out.kl_logit - out.kl_tuned
    out["translator"] = translator
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
    axes[1].set(yscale="symlog", xlabel="layer", ylabel="KL(logit lens) - KL(tuned lens) [nats]",
                title="where the tuned lens helps most")
    save(fig, path, axes[1:])


def summary(df: pd.DataFrame) -> str:
    mean = df.groupby("category").agg(gap=("kl_gap", "mean"), dis=("top1_disagree", "mean"), n=("n", "max"))
    top, low = mean.gap.idxmax(), mean.gap.idxmin()
    return (f"averaged over layers, the lenses disagree most on {mean.dis.idxmax()} tokens "
            f"(top-1 differs {mean.dis.max():.0%} of the time) and least on {mean.dis.idxmin()} "
            f"({mean.dis.min():.0%}); the tuned lens's KL advantage is largest for {top} "
            f"({mean.gap[top]:.1f} nats) and smallest for {low} ({mean.gap[low]:.1f} nats).")
