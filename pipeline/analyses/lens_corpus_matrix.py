"""The lens x corpus matrix (seed: "Training Data Dependency", "Validate results on multiple
datasets and domains"): every trained lens on the held-out split of every corpus of its
model, as the tuned/logit KL ratio per layer of each (train corpus -> evaluated corpus)
pair. The ratio is the fraction of the logit lens's KL the tuned lens leaves (1 = no
better than the logit lens); the diagonal pairs are the runs' own evaluations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..plots import figure, save
from ..tables import block_rows, write_table_df
from .findings import Finding, bootstrap, kl_reduction, lens_kl_by_sequence, whole, write_findings

#: The effect this analysis must be able to detect, and the sample size that gives it
#: (the report prints it beside the findings).
POWER = (
    "Power. The question is how much of its in-domain advantage a lens keeps on another corpus: the "
    "mean KL it removes per token there (logit minus tuned, averaged over layers) over the same on "
    "its own corpus's held-out split, with an independent bootstrap over the sequences of both "
    "evaluations; null 1 (all of it kept). On the default (4,096 play tokens, 2,048 tokens of code: "
    "16 and 8 sequences) the kept share is 0.83 [0.80, 0.86], a half-width of 0.03, which resolves "
    "the drop from 1; a kept share within 0.03 of 1 would need more code tokens "
    "(``corpora.<name>.evaluate_tokens``)."
)


KEYS = ["model", "revision", "train_corpus", "corpus", "split", "translator", "layer"]


def run(artifacts, *, translator: str) -> None:
    """The rule's job (see pipeline.analyses): the layer_metrics table of every pair (its
    per-token table beside it)."""
    tables = [artifacts.layer_metrics(m, t, e) for m, t, e in artifacts.evaluations]
    lens_corpus_matrix(tables, artifacts.analyses_dir, translator=translator)


def matrix_table(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """One row per (model, train corpus, evaluated corpus, translator, layer): the tuned
    lens's KL and CI, the logit lens's KL on the same tokens, and their ratio."""
    out = []
    for df in frames:
        logit = df[df.lens == "logit"].set_index("layer")
        tuned = df[df.lens == "tuned"]
        n_layers = int(df.layer.max()) if (df.lens == "model").any() else int(df.layer.max()) + 1
        kl_logit = logit.kl.reindex(tuned.layer).to_numpy()  # same tokens, same layer
        out.append(
            tuned.assign(
                kl_tuned=tuned.kl,
                kl_tuned_lo=tuned.kl_lo,
                kl_tuned_hi=tuned.kl_hi,
                kl_logit=kl_logit,
                kl_ratio=tuned.kl.to_numpy() / kl_logit,
                in_domain=tuned.train_corpus == tuned.corpus,
                n_layers=n_layers,
            )
        )
    cols = KEYS + [
        "depth",
        "n_layers",
        "in_domain",
        "n_tokens",
        "kl_logit",
        "kl_tuned",
        "kl_tuned_lo",
        "kl_tuned_hi",
        "kl_ratio",
    ]
    return pd.concat(out, ignore_index=True)[cols].sort_values(KEYS, ignore_index=True)


def lens_corpus_matrix(layer_metrics: list[Path], out_dir: Path, translator: str = "affine") -> pd.DataFrame:
    """Write lens_corpus_matrix.parquet, its findings and .png from every pair's
    layer_metrics.parquet (and the per-token table beside each, for the findings)."""
    frames = [block_rows(pd.read_parquet(p)) for p in layer_metrics]
    df = matrix_table(frames)
    prov = {"analysis": "lens_corpus_matrix", "inputs": [str(p) for p in layer_metrics], "translator": translator}
    write_table_df(df, Path(out_dir) / "lens_corpus_matrix.parquet", prov)
    write_findings(kept_findings(frames, layer_metrics, translator), out_dir, "lens_corpus_matrix", prov)
    plot_matrix(df, Path(out_dir) / "lens_corpus_matrix.png")
    return df


def kept_findings(frames: list[pd.DataFrame], layer_metrics: list[Path], translator: str) -> list[Finding]:
    """Per cross-corpus pair: its KL reduction over its lens's in-domain one (null 1)."""

    def key(df):
        t = df[df.lens == "tuned"].iloc[0]
        return t.model, t.revision if isinstance(t.revision, str) else "", t.train_corpus, t.corpus

    pairs = {key(df): Path(p).parent / "token_metrics" for df, p in zip(frames, layer_metrics)}
    out = []
    for (model, rev, train, corpus), tokens in pairs.items():
        own = pairs.get((model, rev, train, train))
        if corpus == train or own is None or not (tokens.is_dir() and own.is_dir()):
            continue
        away, home = lens_kl_by_sequence(tokens, translator), lens_kl_by_sequence(own, translator)
        a, h = kl_reduction(away), kl_reduction(home)
        stat = lambda i, j, a=a, h=h: a(i) / h(j)  # noqa: E731
        lo, hi = bootstrap(stat, len(away), len(home))
        out.append(
            Finding(
                f"{model}: share of the in-domain KL reduction kept on {corpus} (lens trained on {train})",
                stat(*whole(len(away), len(home))),
                lo,
                hi,
                1.0,
                len(away),
                f"sequences of {corpus} ({len(home)} of {train})",
            )
        )
    return out


def _pair(r) -> str:
    rev = f"@{r.revision}" if isinstance(r.revision, str) and r.revision else ""
    return f"{r.model}{rev}: {r.train_corpus} -> {r.corpus} ({r.translator})"


def plot_matrix(df: pd.DataFrame, path: Path) -> None:
    """Left: the ratio per layer, one line per pair (solid: in domain). Right: its mean
    over layers as a matrix, one per model and translator (rows: trained on)."""
    grids = list(df.groupby(["model", "revision", "translator"], dropna=False))
    fig, axes = figure(1, 1 + len(grids), (7 + 4.5 * len(grids), 4.8))
    df = df.assign(pair=df.apply(_pair, axis=1))
    for i, (pair, g) in enumerate(df.groupby("pair", sort=True)):
        g = g.sort_values("layer")
        axes[0].plot(
            g.layer, g.kl_ratio, "-" if g.in_domain.iloc[0] else "--", marker="o", ms=2.5, color=f"C{i}", label=pair
        )
    axes[0].axhline(1.0, color="grey", lw=1, ls=":")
    axes[0].set(
        yscale="log",
        xlabel="layer (0 = embeddings)",
        ylabel="KL tuned / KL logit lens",
        title="tuned/logit KL ratio per layer (dashed: another corpus)",
    )
    for ax, ((model, rev, tr), g) in zip(axes[1:], grids):
        mean = g.pivot_table(index="train_corpus", columns="corpus", values="kl_ratio", aggfunc="mean")
        im = ax.imshow(mean.to_numpy(), cmap="viridis_r", vmin=0, vmax=max(1.0, float(np.nanmax(mean.to_numpy()))))
        ax.set(
            xticks=range(len(mean.columns)),
            xticklabels=mean.columns,
            yticks=range(len(mean.index)),
            yticklabels=mean.index,
            xlabel="evaluated on",
            ylabel="trained on",
            title=f"{model}{'@' + rev if isinstance(rev, str) and rev else ''} ({tr}): mean ratio",
        )
        for (r, c), v in np.ndenumerate(mean.to_numpy()):
            ax.text(c, r, f"{v:.3f}", ha="center", va="center", color="white" if v < 0.5 else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
    save(fig, path, axes[:1])


def summary(df: pd.DataFrame) -> str:
    """Per pair the mean ratio; per cross-corpus pair the share of the in-domain KL
    reduction it keeps, and the layers where it keeps the least."""
    parts = []
    for (model, _rev, tr, train, corpus), g in df.groupby(
        ["model", "revision", "translator", "train_corpus", "corpus"], dropna=False, sort=False
    ):
        text = f"{model} {tr} lens trained on {train}, on {corpus}: mean KL ratio {g.kl_ratio.mean():.3f}"
        own = df[(df.model == model) & (df.translator == tr) & (df.train_corpus == train) & (df.corpus == train)]
        if train != corpus and len(own):
            kept = (1 - g.set_index("layer").kl_ratio) / (1 - own.set_index("layer").kl_ratio)
            worst = kept.nsmallest(3)
            text += (
                f", keeping {kept.median():.0%} of the in-domain KL reduction (median over layers; least "
                f"at layers {', '.join(f'{k} ({v:.0%})' for k, v in worst.items())})"
            )
        parts.append(text)
    return "; ".join(parts) + "."
