"""Across models and checkpoints (seed: "Architecture Studies", "Scale Effects", "Training
Dynamics"): every run's per-layer curves on a normalised depth axis (layer / n_layers),
in one table and one figure. A run is one (model, corpus) of the config; a training
checkpoint is a model entry with a ``revision``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..plots import figure, save
from ..tables import write_table_df

COLUMNS = ["model", "revision", "corpus", "split", "lens", "translator", "layer", "depth", "n_layers",
           "kl", "ce", "acc", "agree_top1", "kl_bpb"]


def comparison_table(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate layer_metrics tables; adds n_layers; drops the model-output rows."""
    out = []
    for df in frames:
        n_layers = int(df.layer.max()) if (df.lens == "model").any() else int(df.layer.max()) + 1
        out.append(df[df.lens != "model"].assign(n_layers=n_layers)[COLUMNS])
    return pd.concat(out, ignore_index=True)


def run(inputs) -> None:
    """The rule's job (see pipeline.analyses): every run's layer_metrics table."""
    compare_models([inputs.need("layer_metrics", model=m, corpus=c) for m, c in inputs.runs], inputs.analyses_dir)


def compare_models(layer_metrics: list[Path], out_dir: Path) -> pd.DataFrame:
    """Write compare_models.parquet and .png from every run's layer_metrics.parquet."""
    df = comparison_table([pd.read_parquet(p) for p in layer_metrics])
    write_table_df(df, Path(out_dir) / "compare_models.parquet",
                   {"analysis": "compare_models", "inputs": [str(p) for p in layer_metrics]})
    plot_compare(df, Path(out_dir) / "compare_models.png")
    return df


def _run_name(r) -> str:
    rev = f"@{r.revision}" if isinstance(r.revision, str) and r.revision else ""
    return f"{r.model}{rev} / {r.corpus}"


def plot_compare(df: pd.DataFrame, path: Path) -> None:
    fig, axes = figure(1, 2, (14, 4.8))
    df = df.assign(run=df.apply(_run_name, axis=1))
    colors = {run: f"C{i}" for i, run in enumerate(sorted(df.run.unique()))}
    for (run, lens, tr), g in df.groupby(["run", "lens", "translator"], dropna=False):
        g = g.sort_values("depth")
        style = "--" if lens == "logit" else "-"
        label = f"{run}: {'logit lens' if lens == 'logit' else f'tuned ({tr})'}"
        axes[0].plot(g.depth, g.kl, style, marker="o", ms=2.5, color=colors[run], label=label)
        axes[1].plot(g.depth, g.agree_top1, style, marker="o", ms=2.5, color=colors[run], label=label)
    axes[0].set(yscale="log", xlabel="depth (layer / n_layers)", ylabel="KL(model || lens) [nats]",
                title="KL to the model's output")
    axes[1].set(xlabel="depth (layer / n_layers)", ylabel="top-1 agreement with the model",
                title="agreement with the model's top-1")
    save(fig, path, axes)


def summary(df: pd.DataFrame) -> str:
    parts = []
    for (model, rev, corpus), g in df.groupby(["model", "revision", "corpus"], dropna=False):
        t, lg = g[g.lens == "tuned"], g[g.lens == "logit"]
        name = f"{model}{'@' + rev if isinstance(rev, str) and rev else ''}/{corpus}"
        half = t[t.depth >= 0.5].kl.mean() if len(t) else float("nan")
        parts.append(f"{name} ({int(g.n_layers.iloc[0])} layers): mean KL tuned {t.kl.mean():.2f} vs logit "
                     f"{lg.kl.mean():.2f} nats, tuned {half:.2f} over the second half of the depth")
    return "; ".join(parts) + "."
