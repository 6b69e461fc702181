"""report: plots (PNG) and one self-contained HTML report (+ Markdown) from the tables.

The plots show what is in the tables (per-layer metrics with bootstrap CI bands, the
calibration table), a section per analysis (pipeline.analyses.ANALYSES: its title, its
summary sentence and its figure), and prediction trajectories for the configured prompts
(pipeline.trajectory: the model runs once on each prompt, which is not in the cache).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from .analyses import ANALYSES
from .corpus import split_separator
from .lens.stopping import training_table
from .lens.tuned import read_lens_meta
from .paths import Artifacts
from .plots import figure, save
from .positions import BLOCK, POSITIONS
from .tables import block_rows, read_provenance
from .trajectory import plot_trajectory, trajectories

log = logging.getLogger(__name__)

PANELS = [
    ("kl", "KL(model || lens) [nats]", True),
    ("ce", "cross-entropy to next token [nats]", True),
    ("acc", "top-1 accuracy (next token)", False),
    ("agree_top1", "top-1 agreement with the model", False),
]


def _label(row) -> str:
    return "logit lens" if row.lens == "logit" else "model" if row.lens == "model" else f"tuned ({row.translator})"


def depth_x(df: pd.DataFrame) -> pd.Series:
    """Each row's place on the layer axis: the layer, and half a layer later inside the block
    at the attention position (``pipeline.positions``)."""
    if "position" not in df.columns:
        return df.layer.astype(float)
    return df.layer + df.position.map({p.name: p.offset for p in POSITIONS.values()})


def plot_layer_metrics(df: pd.DataFrame, path: Path, title: str) -> None:
    """KL, CE, accuracy and agreement per layer, one line per lens, 95% CI bands; attention
    positions (where evaluated) on the same line at half-steps, as open markers."""
    fig, axes = figure(2, 2, (12, 8), sharex=True)
    lenses = df[df.lens != "model"].assign(name=lambda d: d.apply(_label, axis=1), x=depth_x)
    model = df[df.lens == "model"]
    inside = "position" in lenses.columns and bool((lenses.position != BLOCK.name).any())
    for ax, (metric, ylabel, log_y) in zip(axes, PANELS):
        for name, g in lenses.groupby("name", sort=True):
            g = g.sort_values("x")
            (line,) = ax.plot(g.x, g[metric], marker="o", ms=3, label=name)
            if f"{metric}_lo" in g:
                ax.fill_between(g.x, g[f"{metric}_lo"], g[f"{metric}_hi"], alpha=0.25)
            if inside:
                mid = g[g.position != BLOCK.name]
                ax.plot(mid.x, mid[metric], ls="none", marker="o", ms=4, mfc="white", color=line.get_color())
        if metric != "kl" and len(model):
            ax.axhline(float(model[metric].iloc[0]), color="black", ls="--", lw=1, label="model output")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log" if log_y else "linear")
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel(
            "layer (0 = embeddings)"
            + ("; open markers at l + 0.5: inside block l, after its attention" if inside else "")
        )
    axes[0].legend()
    save(fig, path, title=title)


def calibration_by_lens(cal: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """The calibration rows of each lens but the model's, keyed by (lens, translator)."""
    translator = cal.translator.fillna("")  # null for the logit lens (NaN or None in pandas)
    return {
        (lens, tr): g
        for (lens, tr), g in cal.assign(translator=translator).groupby(["lens", "translator"])
        if lens != "model"
    }


def plot_calibration(cal: pd.DataFrame, path: Path, n_layers: int, title: str) -> None:
    """Reliability diagram: accuracy vs confidence at a few depths, per lens."""
    layers = sorted({0, n_layers // 4, n_layers // 2, 3 * n_layers // 4, n_layers - 1})
    cal = block_rows(cal)
    lenses = calibration_by_lens(cal)
    fig, axes = figure(1, len(lenses), (5.5 * len(lenses), 5))
    model = cal[cal.lens == "model"]
    for ax, ((lens, translator), sub) in zip(axes, lenses.items()):
        for layer in layers:
            g = sub[(sub.layer == layer) & (sub["count"] > 0)]
            ax.plot(g.mean_confidence, g.accuracy, marker="o", ms=3, label=f"layer {layer}")
        g = model[model["count"] > 0]
        ax.plot(g.mean_confidence, g.accuracy, color="black", marker="s", ms=3, label="model output")
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="confidence (top-1 probability)",
            ylabel="accuracy",
            title="logit lens" if lens == "logit" else f"tuned lens ({translator})",
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    save(fig, path, title=title)


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """Per-layer KL of every lens side by side (the summary the main command prints); at the
    attention position, where evaluated, a column more per lens (``... @ attention``)."""
    d = df[df.lens != "model"].assign(name=lambda x: x.apply(_label, axis=1))
    table = block_rows(d).pivot_table(index="layer", columns="name", values="kl")
    for position in sorted(set(d.position) - {BLOCK.name}) if "position" in d.columns else []:
        at = d[d.position == position].pivot_table(index="layer", columns="name", values="kl")
        table = table.join(at.rename(columns=lambda c, position=position: f"{c} @ {position}"))
    return table.round(3)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def report(
    runs: list[Artifacts], kinds: list[str], out_dir: Path, prompts: list[str], with_analyses: bool = True
) -> Path:
    """Plots for every (model, corpus) run and report.{html,md} in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, body = ["# lenspipe report", ""], ["<h1>lenspipe report</h1>"]
    per_run = [a for a in ANALYSES if a.per_run] if with_analyses else []
    for run in runs:
        df = pd.read_parquet(run.need("layer_metrics"))
        cal = pd.read_parquet(run.need("calibration"))
        prov = read_provenance(run.need("layer_metrics"))
        name = f"{run.model} on {run.corpus} ({prov['identity']['split']})"
        stem = f"{run.model}-{run.corpus}"
        figs = {"layer metrics": out_dir / f"{stem}-layers.png", "calibration": out_dir / f"{stem}-calibration.png"}
        plot_layer_metrics(df, figs["layer metrics"], name)
        plot_calibration(cal, figs["calibration"], int(df.layer.max()), name)
        lens_dirs = {k: run.need("lens", kind=k) for k in kinds}
        separator = split_separator(run.need("split"))  # the prompts start as cached documents do
        for i, prompt in enumerate(prompts):
            figs[f"trajectory {i + 1}"] = out_dir / f"{stem}-trajectory-{i + 1}.png"
            plot_trajectory(
                trajectories(run.need("model_dir"), lens_dirs, prompt, separator), figs[f"trajectory {i + 1}"], prompt
            )
        sections = [
            (a.title, a.summary(run.analyses_dir), run.analyses_dir / f"{a.rule}.png")
            for a in per_run
            if _written(a, run)
        ]
        sections += _other_corpora(run, out_dir, stem, figs)
        figs.update({title: _copy_png(png, out_dir / f"{stem}-{png.name}") for title, _, png in sections if png})
        table = headline(df)
        training = training_table(df, prov, {k: read_lens_meta(d) for k, d in lens_dirs.items()})
        md += [f"## {name}", "", _summary_sentence(df), ""] + [f"- **{t}**: {text}" for t, text, _ in sections]
        md += [
            "",
            table.to_markdown(),
            "",
            "### Lens training: how each layer stopped",
            "",
            training.to_markdown(index=False),
            "",
        ]
        answers = [(a, a.findings(run.analyses_dir)) for a in per_run if _written(a, run)]
        md += _findings_md(answers)
        md += [f"![{k}]({p.name})" for k, p in figs.items()] + [
            "",
            "Provenance:",
            "",
            "```json",
            json.dumps(prov, indent=1, default=str)[:4000],
            "```",
            "",
        ]
        body += [f"<h2>{html.escape(name)}</h2>", f"<p>{html.escape(_summary_sentence(df))}</p>"]
        body += ["<ul>"] + [f"<li><b>{html.escape(t)}</b>: {html.escape(x)}</li>" for t, x, _ in sections] + ["</ul>"]
        body += [table.to_html(), "<h3>lens training: how each layer stopped</h3>", training.to_html(index=False)]
        body += _findings_html(answers)
        body += [f"<h3>{html.escape(k)}</h3>{_img(p)}" for k, p in figs.items()]
        body += ["<h3>provenance</h3><pre>", html.escape(json.dumps(prov, indent=1, default=str)), "</pre>"]
    across = Artifacts(runs[0].data_dir)  # the analyses of all runs together
    for a in [a for a in ANALYSES if not a.per_run and _written(a, across)] if with_analyses else []:
        png = _copy_png(across.analyses_dir / f"{a.rule}.png", out_dir / f"{a.rule}.png")
        text, answers = a.summary(across.analyses_dir), [(a, a.findings(across.analyses_dir))]
        md += [f"## {a.title}", "", text, ""] + _findings_md(answers) + [f"![{a.rule}]({png.name})", ""]
        body += [f"<h2>{html.escape(a.title)}</h2>", f"<p>{html.escape(text)}</p>"] + _findings_html(answers)
        body += [_img(png)]
    (out_dir / "report.md").write_text("\n".join(md))
    (out_dir / "report.html").write_text(
        "<!doctype html><meta charset=utf-8><title>lenspipe report</title>"
        "<body style='font-family:sans-serif;max-width:1300px'>" + "\n".join(body)
    )
    return out_dir / "report.html"


FINDING_COLUMNS = ["question", "estimate [95% CI]", "sample size", "verdict"]


def findings_rows(findings: pd.DataFrame) -> pd.DataFrame:
    """An analysis's findings as the report shows them: the estimate with its CI, the sample
    size with its unit, and the verdict ("not resolved at this sample size" where the CI
    does not settle the question)."""
    from .analyses.findings import format_finding

    null = findings.apply(
        lambda f: (
            f" (null {f.null:g})"
            if f.test in ("differs", "includes")
            else f" (threshold {f.null:g})"
            if f.test == "at_least"
            else ""
        ),
        axis=1,
    )
    return pd.DataFrame(
        {
            "question": findings.question,
            "estimate [95% CI]": findings.apply(format_finding, axis=1) + null,
            "sample size": findings.n.astype(int).astype(str) + " " + findings.unit,
            "verdict": findings.verdict,
        },
        columns=FINDING_COLUMNS,
    )


def _findings_md(answers) -> list[str]:
    out = ["### Answers and their sample sizes", ""]
    for a, f in answers:
        out += [
            f"**{a.title}.** {a.power()}",
            "",
            findings_rows(f).to_markdown(index=False) if len(f) else "(no findings)",
            "",
        ]
    return out


def _findings_html(answers) -> list[str]:
    out = ["<h3>Answers and their sample sizes</h3>"]
    for a, f in answers:
        out += [
            f"<p><b>{html.escape(a.title)}.</b> {html.escape(a.power())}</p>",
            findings_rows(f).to_html(index=False) if len(f) else "<p>(no findings)</p>",
        ]
    return out


def _other_corpora(run: Artifacts, out_dir: Path, stem: str, figs: dict) -> list[tuple[str, str, None]]:
    """The run's lenses on the held-out split of every other corpus (evaluate_across): a
    sentence and a layer-metrics figure each."""
    out = []
    for model, train, corpus in run.evaluations:
        if model == run.model and train == run.corpus and corpus != train:
            df = pd.read_parquet(run.layer_metrics(model, train, corpus))
            figs[f"layer metrics on {corpus}"] = out_dir / f"{stem}-on-{corpus}-layers.png"
            plot_layer_metrics(df, figs[f"layer metrics on {corpus}"], f"{model}: {train} lenses on {corpus}")
            out.append((f"on {corpus} (another corpus)", _summary_sentence(df), None))
    return out


def _written(analysis, artifacts: Artifacts) -> bool:
    """Whether an analysis has written its outputs (the workflow's report always has them;
    ``lenspipe report`` leaves out, and names, those not run yet)."""
    missing = [p for p in analysis.outputs(artifacts.analyses_dir) if not Path(p).exists()]
    if missing:
        log.warning("the report leaves out %s: no %s (run `lenspipe %s`)", analysis.title, missing[0], analysis.command)
    return not missing


def _copy_png(png: Path, dest: Path) -> Path:
    shutil.copy(png, dest)  # report.md links its figures by name, next to it
    return dest


def _summary_sentence(df: pd.DataFrame) -> str:
    d = df[df.lens != "model"]
    blocks = block_rows(d)
    logit = blocks[blocks.lens == "logit"].kl.mean()
    parts = [f"mean KL over layers: logit lens {logit:.2f} nats"]
    for tr, g in blocks[blocks.lens == "tuned"].groupby("translator"):
        parts.append(f"tuned ({tr}) {g.kl.mean():.2f} nats ({g.kl.mean() / logit:.3f}x)")
    for position, g in d[d.position != BLOCK.name].groupby("position") if "position" in d.columns else []:
        kls = [f"logit lens {g[g.lens == 'logit'].kl.mean():.2f}"] + [
            f"tuned ({tr}) {t.kl.mean():.2f}" for tr, t in g[g.lens == "tuned"].groupby("translator")
        ]
        parts.append(f"at the {position} position {', '.join(kls)} nats")
    docs = d.documents.iloc[0] if "documents" in d and d.documents.notna().any() else None
    where = f" ({docs.replace('=', ': ')} tokens)" if docs else ""
    return "; ".join(parts) + f" on {int(d.n_tokens.max())} held-out tokens{where}."


def print_summary(layer_metrics: list[str], report_dir: str) -> None:
    """What the main command prints at the end: where things are, per-layer KL."""
    print("\nlenspipe: done.")
    layer_metrics = [p for p in layer_metrics if Path(p).is_file()]  # a run may target less than all
    if not layer_metrics:
        return
    for path in layer_metrics:
        df = pd.read_parquet(path)
        print(f"\n{path}\n{_summary_sentence(df)}")
        print(headline(df).to_string())
    print(f"\ntables: {', '.join(str(Path(p).parent) for p in layer_metrics)}")
    print(f"report: {report_dir}/report.html (and report.md)\n")
