"""report: plots (PNG) and one self-contained HTML report (+ Markdown) from the tables.

The plots show what is in the tables (per-layer metrics with bootstrap CI bands, the
calibration table) plus prediction trajectories for a few configurable prompts, for which
the model runs once on the prompt (a prompt is not in the cache).
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: Snakemake jobs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from .tables import read_provenance  # noqa: E402

log = logging.getLogger(__name__)

PANELS = [("kl", "KL(model || lens) [nats]", True), ("ce", "cross-entropy to next token [nats]", True),
          ("acc", "top-1 accuracy (next token)", False), ("agree_top1", "top-1 agreement with the model", False)]
DEFAULT_PROMPTS = ["To be, or not to be, that is the question:", "The capital of France is"]


def _label(row) -> str:
    return "logit lens" if row.lens == "logit" else "model" if row.lens == "model" else f"tuned ({row.translator})"


def plot_layer_metrics(df: pd.DataFrame, path: Path, title: str) -> None:
    """KL, CE, accuracy and agreement per layer, one line per lens, 95% CI bands."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    lenses = df[df.lens != "model"].assign(name=lambda d: d.apply(_label, axis=1))
    model = df[df.lens == "model"]
    for ax, (metric, ylabel, log_y) in zip(axes.flat, PANELS):
        for name, g in lenses.groupby("name", sort=True):
            g = g.sort_values("layer")
            ax.plot(g.layer, g[metric], marker="o", ms=3, label=name)
            if f"{metric}_lo" in g:
                ax.fill_between(g.layer, g[f"{metric}_lo"], g[f"{metric}_hi"], alpha=0.25)
        if metric != "kl" and len(model):
            ax.axhline(float(model[metric].iloc[0]), color="black", ls="--", lw=1, label="model output")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log" if log_y else "linear")
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("layer (0 = embeddings)")
    axes[0, 0].legend()
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)


def calibration_by_lens(cal: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """The calibration rows of each lens but the model's, keyed by (lens, translator)."""
    translator = cal.translator.fillna("")  # null for the logit lens (NaN or None in pandas)
    return {(lens, tr): g for (lens, tr), g in cal.assign(translator=translator).groupby(["lens", "translator"])
            if lens != "model"}


def plot_calibration(cal: pd.DataFrame, path: Path, n_layers: int, title: str) -> None:
    """Reliability diagram: accuracy vs confidence at a few depths, per lens."""
    layers = sorted({0, n_layers // 4, n_layers // 2, 3 * n_layers // 4, n_layers - 1})
    lenses = calibration_by_lens(cal)
    fig, axes = plt.subplots(1, len(lenses), figsize=(5.5 * len(lenses), 5), squeeze=False)
    model = cal[cal.lens == "model"]
    for ax, ((lens, translator), sub) in zip(axes[0], lenses.items()):
        for layer in layers:
            g = sub[(sub.layer == layer) & (sub["count"] > 0)]
            ax.plot(g.mean_confidence, g.accuracy, marker="o", ms=3, label=f"layer {layer}")
        g = model[model["count"] > 0]
        ax.plot(g.mean_confidence, g.accuracy, color="black", marker="s", ms=3, label="model output")
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
               title="logit lens" if lens == "logit" else f"tuned lens ({translator})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def trajectories(model_dir: Path, lens_dirs: dict[str, Path], prompt: str) -> dict[str, Any]:
    """Top-1 token and its probability per (layer, position) of ``prompt``, per lens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .lenses import LogitLens, TunedLens
    from .surgery import residual_stream, unembed_head

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :24]
    resid, _ = residual_stream(model, ids, with_logits=False)  # (L+1, 1, pos, d_model)
    head = unembed_head(model)
    lenses = {"logit lens": LogitLens(head)} | {f"tuned ({k})": TunedLens.load(p, head=head) for k, p in lens_dirs.items()}
    out = {"inputs": [tok.decode([i]) for i in ids[0]], "lenses": {}}
    for name, lens in lenses.items():
        probs = torch.stack([torch.softmax(lens(resid[i, 0], i), -1) for i in range(resid.shape[0])])  # (L+1, pos, V)
        p, top = probs.max(-1)
        out["lenses"][name] = {"prob": p.numpy(), "tokens": [[tok.decode([t]) for t in row] for row in top.tolist()]}
    return out


def plot_trajectory(traj: dict[str, Any], path: Path, prompt: str) -> None:
    names = list(traj["lenses"])
    n_layers, n_pos = traj["lenses"][names[0]]["prob"].shape
    # one lens per row, so each panel gets the full width and the token labels stay legible
    fig, axes = plt.subplots(len(names), 1, figsize=(max(9, 0.95 * n_pos + 2), (0.3 * n_layers + 1.6) * len(names)),
                             squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        data = traj["lenses"][name]
        im = ax.imshow(data["prob"], aspect="auto", origin="lower", cmap="Blues", vmin=0, vmax=1)
        for (layer, pos), text in np.ndenumerate(np.array(data["tokens"], dtype=object)):
            shade = "white" if data["prob"][layer, pos] > 0.6 else "black"
            ax.text(pos, layer, repr(text)[1:-1][:8], ha="center", va="center", fontsize=7.5, color=shade)
        ax.set_xticks(range(n_pos), [repr(t)[1:-1][:10] for t in traj["inputs"]], rotation=60, fontsize=8)
        ax.set_yticks(range(0, n_layers, 2))
        ax.set(xlabel="input token", ylabel="layer", title=f"{name}: top-1 prediction")
        fig.colorbar(im, ax=ax, fraction=0.03, label="probability")
    fig.suptitle(f"prediction trajectory: {prompt!r}")
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """Per-layer KL of every lens side by side (the summary the main command prints)."""
    d = df[df.lens != "model"].assign(name=lambda x: x.apply(_label, axis=1))
    return d.pivot_table(index="layer", columns="name", values="kl").round(3)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def write_report(run_dirs: list[dict[str, Any]], out_dir: Path, prompts: list[str], compare: Path | None = None) -> Path:
    """Plots for every (model, corpus) run and report.{html,md} in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, body = ["# lenspipe report", ""], ["<h1>lenspipe report</h1>"]
    for run in run_dirs:
        df = pd.read_parquet(run["layer_metrics"])
        cal = pd.read_parquet(run["calibration"])
        prov = read_provenance(Path(run["layer_metrics"]))
        name = f"{run['model']} on {run['corpus']} ({prov['identity']['split']})"
        stem = f"{run['model']}-{run['corpus']}"
        figs = {"layer metrics": out_dir / f"{stem}-layers.png", "calibration": out_dir / f"{stem}-calibration.png"}
        plot_layer_metrics(df, figs["layer metrics"], name)
        plot_calibration(cal, figs["calibration"], int(df.layer.max()), name)
        for i, prompt in enumerate(prompts):
            figs[f"trajectory {i + 1}"] = out_dir / f"{stem}-trajectory-{i + 1}.png"
            plot_trajectory(trajectories(Path(run["model_dir"]), run["lens_dirs"], prompt), figs[f"trajectory {i + 1}"], prompt)
        sections = analysis_sections(Path(run["analyses_dir"])) if run.get("analyses_dir") else []
        figs.update({title: _copy_png(png, out_dir / f"{stem}-{png.name}") for title, _, png in sections})
        table = headline(df)
        md += [f"## {name}", "", _summary_sentence(df), ""] + [f"- **{t}**: {text}" for t, text, _ in sections]
        md += ["", table.to_markdown(), ""]
        md += [f"![{k}]({p.name})" for k, p in figs.items()] + ["", "Provenance:", "", "```json",
                                                                json.dumps(prov, indent=1, default=str)[:4000], "```", ""]
        body += [f"<h2>{html.escape(name)}</h2>", f"<p>{html.escape(_summary_sentence(df))}</p>"]
        body += ["<ul>"] + [f"<li><b>{html.escape(t)}</b>: {html.escape(x)}</li>" for t, x, _ in sections] + ["</ul>"]
        body += [table.to_html()]
        body += [f"<h3>{html.escape(k)}</h3>{_img(p)}" for k, p in figs.items()]
        body += ["<h3>provenance</h3><pre>", html.escape(json.dumps(prov, indent=1, default=str)), "</pre>"]
    if compare:
        from . import compare as C

        cmp_df = pd.read_parquet(compare)
        png = Path(compare).with_suffix(".png")
        md += ["## Across models and checkpoints", "", C.summary(cmp_df), "", f"![compare]({png.name})", ""]
        body += ["<h2>Across models and checkpoints</h2>", f"<p>{html.escape(C.summary(cmp_df))}</p>", _img(png)]
        _copy_png(png, out_dir / png.name)
    (out_dir / "report.md").write_text("\n".join(md))
    (out_dir / "report.html").write_text("<!doctype html><meta charset=utf-8><title>lenspipe report</title>"
                                         "<body style='font-family:sans-serif;max-width:1300px'>" + "\n".join(body))
    return out_dir / "report.html"


def analysis_sections(adir: Path) -> list[tuple[str, str, Path]]:
    """(title, headline sentence, figure) for each analysis written under ``adir``."""
    from . import anatomy, categories, contributions, depth, transfer

    def t(name):
        return pd.read_parquet(adir / f"{name}.parquet")

    makers = [
        ("prediction depth and early exit", "prediction_depth", lambda: depth.summary(t("prediction_depth"), t("early_exit"))),
        ("layer contributions", "layer_contributions", lambda: contributions.summary(t("layer_contributions"))),
        ("translator anatomy", "translator_anatomy", lambda: anatomy.summary(t("translator_anatomy"))),
        ("token categories", "token_categories", lambda: categories.summary(t("token_categories"))),
        ("layer transfer", "layer_transfer", lambda: transfer.summary(t("layer_transfer"))),
    ]
    return [(title, make(), adir / f"{name}.png") for title, name, make in makers if (adir / f"{name}.png").exists()]


def _copy_png(png: Path, dest: Path) -> Path:
    import shutil

    shutil.copy(png, dest)  # report.md links its figures by name, next to it
    return dest


def _summary_sentence(df: pd.DataFrame) -> str:
    d = df[df.lens != "model"]
    logit = d[d.lens == "logit"].kl.mean()
    parts = [f"mean KL over layers: logit lens {logit:.2f} nats"]
    for tr, g in d[d.lens == "tuned"].groupby("translator"):
        parts.append(f"tuned ({tr}) {g.kl.mean():.2f} nats ({g.kl.mean() / logit:.3f}x)")
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
