"""Across models and checkpoints (seed: "Architecture Studies", "Scale Effects", "Training
Dynamics"): every run's per-layer curves on a normalised depth axis (layer / n_layers),
in one table and one figure. A run is one (model, corpus) of the config; a training
checkpoint is a model entry with a ``revision``.

Beside the per-layer metrics, three per-run analyses are put side by side on the same axis,
so that models of different depth and width compare directly: translator anatomy
(distance of each translator from the identity, its effective rank as a fraction of
d_model), prediction depth (the fraction of tokens whose lens top-1 has settled on the
model's final top-1 by each depth) and fact localization (per fact set, the prompts each
model keeps and the depth at which each lens first ranks their answer top-1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..plots import figure, save
from ..tables import block_rows, write_table_df
from .findings import Finding, bootstrap, lens_kl_by_sequence, removed_share, whole, write_findings

#: The effect this analysis must be able to detect, and the sample size that gives it
#: (the report prints it beside the findings).
POWER = (
    "Power. The question is how much of the logit lens's KL the tuned lens removes in each run (1 - "
    "mean tuned KL / mean logit KL over layers and tokens), and whether two runs differ in it. Each "
    "run's share gets a bootstrap CI over its evaluated sequences, a difference between runs an "
    "independent bootstrap of both; the shares are large (0.9 and more on the default), so what must "
    "be resolved is a difference between runs of a few hundredths, for which the 16 evaluated "
    "sequences of the default run give a half-width of about 0.01."
)


COLUMNS = [
    "model",
    "revision",
    "corpus",
    "split",
    "lens",
    "translator",
    "layer",
    "depth",
    "n_layers",
    "kl",
    "ce",
    "acc",
    "agree_top1",
    "kl_bpb",
]
RUN = ["model", "revision", "corpus"]
ANATOMY_COLUMNS = [
    *RUN,
    "kind",
    "layer",
    "depth",
    "n_layers",
    "d_model",
    "rel_dist_identity",
    "effective_rank",
    "effective_rank_frac",
    "bias_norm",
    "cos_next",
]
DEPTH_COLUMNS = [*RUN, "lens", "translator", "bucket", "pred_layer", "depth", "n_layers", "count", "frac", "cum_frac"]
FACT_COLUMNS = [
    *RUN,
    "fact_set",
    "lens",
    "translator",
    "n_prompts",
    "n_kept",
    "n_layers",
    "median_layer",
    "median_depth",
    "before_output",
]


def _revision(v) -> str:
    """A revision as a key: no revision is None, or NaN once in Parquet."""
    return v if isinstance(v, str) else ""


def comparison_table(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate layer_metrics tables (their block rows: the depth axis of the comparison);
    adds n_layers; drops the model-output rows."""
    out = []
    for df in map(block_rows, frames):
        n_layers = int(df.layer.max()) if (df.lens == "model").any() else int(df.layer.max()) + 1
        out.append(df[df.lens != "model"].assign(n_layers=n_layers)[COLUMNS])
    return pd.concat(out, ignore_index=True)


def _identity(metrics: pd.DataFrame) -> dict:
    """(model, revision, corpus) and n_layers of one run, from its comparison rows."""
    row = metrics.iloc[0]
    return {"model": row.model, "revision": row.revision, "corpus": row.corpus, "n_layers": int(row.n_layers)}


def anatomy_table(runs: list[pd.DataFrame], anatomy: list[pd.DataFrame]) -> pd.DataFrame:
    """Every run's translator_anatomy rows on the normalised depth axis (layer / n_layers)."""
    out = [a.assign(**_identity(m)) for m, a in zip(runs, anatomy)]
    if not out:
        return pd.DataFrame(columns=ANATOMY_COLUMNS)
    df = pd.concat(out, ignore_index=True)
    df["depth"] = df.layer / df.n_layers
    df["effective_rank_frac"] = df.effective_rank / df.d_model  # widths differ between models
    return df[ANATOMY_COLUMNS]


def depth_table(runs: list[pd.DataFrame], depth: list[pd.DataFrame]) -> pd.DataFrame:
    """Every run's prediction_depth rows; ``pred_layer`` is the settling layer (n_layers = never),
    ``depth`` it over n_layers, ``cum_frac`` the fraction of tokens settled by then."""
    out = []
    for m, d in zip(runs, depth):
        d = d.rename(columns={"depth": "pred_layer"}).drop(columns="n_layers").assign(**_identity(m))
        d = d.sort_values(["lens", "translator", "bucket", "pred_layer"])
        d["cum_frac"] = d.groupby(["lens", "translator", "bucket"], dropna=False).frac.cumsum()
        out.append(d)
    if not out:
        return pd.DataFrame(columns=DEPTH_COLUMNS)
    df = pd.concat(out, ignore_index=True)
    df["depth"] = df.pred_layer / df.n_layers
    return df[DEPTH_COLUMNS]


def fact_table(runs: list[pd.DataFrame], facts: list[tuple[pd.DataFrame, pd.DataFrame]]) -> pd.DataFrame:
    """Per run, fact set and lens: prompts asked and kept, and the median first layer (and
    depth, layer / n_layers) at which the lens ranks a kept prompt's answer top-1."""
    rows = []
    for m, (prompts, depths) in zip(runs, facts):
        ident = _identity(m)
        for name, p in prompts.groupby("fact_set", sort=False):
            d = depths[depths.fact_set == name]
            for (lens, tr), g in d.groupby(["lens", "translator"]) if len(d) else [(("tuned", None), d)]:
                med = float(g.depth_top1.median()) if len(g) else float("nan")
                rows.append(
                    {
                        **ident,
                        "fact_set": name,
                        "lens": lens,
                        "translator": tr,
                        "n_prompts": len(p),
                        "n_kept": int(p.kept.sum()),
                        "median_layer": med,
                        "median_depth": med / ident["n_layers"],
                        "before_output": float((g.depth_top1 < ident["n_layers"]).mean()) if len(g) else float("nan"),
                    }
                )
    return pd.DataFrame(rows, columns=FACT_COLUMNS)


def run(artifacts, *, translator: str) -> None:
    """The rule's job (see pipeline.analyses): every run's layer_metrics and per-token tables,
    and its translator anatomy, prediction depth and fact localization tables."""
    need = {
        name: [artifacts.need(name, model=m, corpus=c) for m, c in artifacts.runs]
        for name in (
            "layer_metrics",
            "translator_anatomy",
            "prediction_depth",
            "token_metrics",
            "fact_prompts",
            "fact_depths",
        )
    }
    compare_models(
        need["layer_metrics"],
        artifacts.analyses_dir,
        need["translator_anatomy"],
        need["prediction_depth"],
        need["token_metrics"],
        list(zip(need["fact_prompts"], need["fact_depths"])),
        translator=translator,
    )


def compare_models(
    layer_metrics: list[Path],
    out_dir: Path,
    anatomy: list[Path] | None = None,
    depth: list[Path] | None = None,
    token_metrics: list[Path] | None = None,
    facts: list[tuple[Path, Path]] | None = None,
    translator: str = "affine",
) -> pd.DataFrame:
    """Write compare_models.parquet, compare_anatomy.parquet, compare_depth.parquet,
    compare_facts.parquet, compare_models_findings.parquet and compare_models.png from every
    run's tables (``anatomy``, ``depth``, ``token_metrics``, ``facts`` (fact_prompts,
    fact_depths): one per run, in the order of ``layer_metrics``; None = not compared, the
    tables are empty / no findings)."""
    runs = [comparison_table([pd.read_parquet(p)]) for p in layer_metrics]
    df = pd.concat(runs, ignore_index=True)
    tables = {
        "compare_models": df,
        "compare_anatomy": anatomy_table(runs, [pd.read_parquet(p) for p in anatomy or []]),
        "compare_depth": depth_table(runs, [pd.read_parquet(p) for p in depth or []]),
        "compare_facts": fact_table(runs, [(pd.read_parquet(p), pd.read_parquet(d)) for p, d in facts or []]),
    }
    inputs = [str(p) for p in [*layer_metrics, *(anatomy or []), *(depth or []), *(x for f in facts or [] for x in f)]]
    for name, table in tables.items():
        write_table_df(table, Path(out_dir) / f"{name}.parquet", {"analysis": name, "inputs": inputs})
    names = [_run_name(r.iloc[0]) for r in runs]
    per_seq = [lens_kl_by_sequence(p, translator) for p in token_metrics or []]
    write_findings(
        run_findings(names, per_seq),
        out_dir,
        "compare_models",
        {"analysis": "compare_models", "inputs": inputs, "translator": translator},
    )
    plot_compare(*tables.values(), Path(out_dir) / "compare_models.png")
    return df


def run_findings(names: list[str], per_seq: list[pd.DataFrame]) -> list[Finding]:
    """Per run, the share of the logit lens's KL the tuned lens removes; the first run
    against every other, the difference of the shares (independent bootstraps)."""
    out = []
    for name, seqs in zip(names, per_seq):
        stat = removed_share(seqs)
        lo, hi = bootstrap(stat, len(seqs))
        out.append(
            Finding(
                f"share of the logit lens's KL removed by the tuned lens: {name}",
                stat(*whole(len(seqs))),
                lo,
                hi,
                0.0,
                len(seqs),
                "sequences",
            )
        )
    for name, seqs in list(zip(names, per_seq))[1:]:
        a, b = removed_share(per_seq[0]), removed_share(seqs)
        stat = lambda i, j, a=a, b=b: a(i) - b(j)  # noqa: E731
        lo, hi = bootstrap(stat, len(per_seq[0]), len(seqs))
        out.append(
            Finding(
                f"difference of that share, {names[0]} minus {name}",
                stat(*whole(len(per_seq[0]), len(seqs))),
                lo,
                hi,
                0.0,
                min(len(per_seq[0]), len(seqs)),
                "sequences (the smaller run)",
            )
        )
    return out


def _run_name(r) -> str:
    rev = f"@{r.revision}" if isinstance(r.revision, str) and r.revision else ""
    return f"{r.model}{rev} / {r.corpus}"


def _lens_name(lens: str, translator) -> str:
    return "logit lens" if lens == "logit" else f"tuned ({translator})"


def plot_compare(df: pd.DataFrame, anatomy: pd.DataFrame, depth: pd.DataFrame, facts: pd.DataFrame, path: Path) -> None:
    """Top: KL, top-1 agreement, tokens settled against depth, and fact depth per fact set;
    bottom: translator anatomy."""
    fig, axes = figure(2, 4, (26, 9.5))
    df = df.assign(run=df.apply(_run_name, axis=1))
    colors = {run: f"C{i}" for i, run in enumerate(sorted(df.run.unique()))}
    for (run, lens, tr), g in df.groupby(["run", "lens", "translator"], dropna=False):
        g = g.sort_values("depth")
        style, label = ("--" if lens == "logit" else "-"), f"{run}: {_lens_name(lens, tr)}"
        axes[0].plot(g.depth, g.kl, style, marker="o", ms=2.5, color=colors[run], label=label)
        axes[1].plot(g.depth, g.agree_top1, style, marker="o", ms=2.5, color=colors[run], label=label)
    axes[0].set(
        yscale="log",
        xlabel="depth (layer / n_layers)",
        ylabel="KL(model || lens) [nats]",
        title="KL to the model's output",
    )
    axes[1].set(
        xlabel="depth (layer / n_layers)",
        ylabel="top-1 agreement with the model",
        title="agreement with the model's top-1",
    )
    if len(depth):
        depth = depth[depth.bucket == "all"].assign(run=lambda d: d.apply(_run_name, axis=1))
        for (run, lens, tr), g in depth.groupby(["run", "lens", "translator"], dropna=False):
            g = g[g.pred_layer < g.n_layers]  # never settled: no depth to draw
            axes[2].step(
                g.depth,
                g.cum_frac,
                "--" if lens == "logit" else "-",
                where="post",
                color=colors.get(run),
                label=f"{run}: {_lens_name(lens, tr)}",
            )
    axes[2].set(
        xlabel="prediction depth (layer / n_layers)",
        ylabel="fraction of tokens settled",
        title="prediction depth: lens top-1 = final top-1 from here on",
    )
    if len(anatomy):
        anatomy = anatomy.assign(run=lambda d: d.apply(_run_name, axis=1))
        for run, g in anatomy.groupby("run"):
            g = g.sort_values("depth")
            kw = dict(marker="o", ms=3, color=colors.get(run), label=f"{run} ({g.kind.iloc[0]}, d={g.d_model.iloc[0]})")
            axes[3].plot(g.depth, g.rel_dist_identity, **kw)
            axes[4].plot(g.depth, g.effective_rank_frac, **kw)
            axes[5].plot(g.depth, g.cos_next, **kw)
    axes[3].set(
        yscale="log",
        xlabel="depth (layer / n_layers)",
        ylabel="||A - I||_F / ||I||_F",
        title="translator distance from the identity (logit lens)",
    )
    axes[4].set(
        xlabel="depth (layer / n_layers)", ylabel="effective rank of A / d_model", title="translator effective rank"
    )
    axes[5].set(
        xlabel="depth (layer / n_layers)", ylabel="cos(A_l - I, A_l+1 - I)", title="similarity of adjacent translators"
    )
    _plot_facts(facts, axes[6])
    axes[7].set_axis_off()
    save(fig, path, axes)


def _plot_facts(facts: pd.DataFrame, ax) -> None:
    """Per run and fact set, the median depth of the first top-1 answer, per lens."""
    if not len(facts):
        ax.set_axis_off()
        return
    facts = facts.assign(run=facts.apply(_run_name, axis=1))
    groups = list(facts.groupby(["run", "fact_set"], sort=False))
    for i, lens in enumerate(("tuned", "logit")):
        vals = [g.set_index("lens").median_depth.get(lens, np.nan) for _, g in groups]
        ax.bar(np.arange(len(groups)) + 0.4 * i, vals, width=0.4, label=f"{lens} lens")
    ax.set_xticks(
        np.arange(len(groups)) + 0.2,
        [f"{run}\n{fs} ({int(g.n_kept.iloc[0])}/{int(g.n_prompts.iloc[0])} kept)" for (run, fs), g in groups],
        fontsize=7,
    )
    ax.set(ylim=(0, 1.05), ylabel="median first top-1 depth (layer / n_layers)", title="fact localization")


def _median_depth(g: pd.DataFrame) -> float:
    """Normalised depth by which half of the tokens have settled (1 = only at the output)."""
    g = g.sort_values("pred_layer")
    return float(g.depth.iloc[int(np.searchsorted(g.cum_frac.to_numpy(), 0.5))])


def summary(
    df: pd.DataFrame,
    anatomy: pd.DataFrame | None = None,
    depth: pd.DataFrame | None = None,
    facts: pd.DataFrame | None = None,
) -> str:
    parts = []
    for (model, rev, corpus), g in df.groupby(RUN, dropna=False):
        t, lg = g[g.lens == "tuned"], g[g.lens == "logit"]
        name = f"{model}{'@' + rev if isinstance(rev, str) and rev else ''}/{corpus}"
        mid = g[(g.depth >= 0.25) & (g.depth <= 0.75)]
        half = t[t.depth >= 0.5].kl.mean() if len(t) else float("nan")
        text = (
            f"{name} ({int(g.n_layers.iloc[0])} layers): mean KL tuned {t.kl.mean():.2f} vs logit "
            f"{lg.kl.mean():.2f} nats (mid depth 0.25-0.75: {mid[mid.lens == 'tuned'].kl.mean():.2f} vs "
            f"{mid[mid.lens == 'logit'].kl.mean():.2f}), tuned {half:.2f} over the second half of the depth"
        )
        rev_key = rev if isinstance(rev, str) else ""  # no revision: None, or NaN once in Parquet

        def same(x, model=model, corpus=corpus, rev_key=rev_key):
            return (x.model == model) & (x.corpus == corpus) & (x.revision.map(_revision) == rev_key)

        if depth is not None and len(depth):
            d = depth[same(depth) & (depth.bucket == "all")]
            med = {lens: _median_depth(h) for lens, h in d.groupby("lens")}
            if med:
                text += "; half the tokens settled by depth " + ", ".join(
                    f"{v:.2f} ({k})" for k, v in sorted(med.items())
                )
        if anatomy is not None and len(anatomy):
            a = anatomy[same(anatomy)]
            if len(a):
                text += (
                    f"; translators {a.rel_dist_identity.min():.2f}-{a.rel_dist_identity.max():.2f} from the "
                    f"identity, effective rank {a.effective_rank_frac.min():.0%}-{a.effective_rank_frac.max():.0%} "
                    "of d_model"
                )
        if facts is not None and len(facts):
            for fact_set, f in facts[same(facts)].groupby("fact_set", sort=False):
                f = f.set_index("lens")
                text += f"; {fact_set} facts: {int(f.n_kept.iloc[0])} of {int(f.n_prompts.iloc[0])} kept" + "".join(
                    f", {lens} lens first top-1 at median depth {f.median_depth[lens]:.2f}"
                    for lens in ("tuned", "logit")
                    if lens in f.index and np.isfinite(f.median_depth[lens])
                )
        parts.append(text)
    return "; ".join(parts) + "."
