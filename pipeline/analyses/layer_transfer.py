"""Layer-transfer matrix: the translator of layer i applied to the hidden states of layer j.

Entry (i, j) is the mean KL(model || head(T_i(h_j))) over a sample of held-out tokens;
the diagonal is the tuned lens itself. Off-diagonal entries show how far each
translator generalises to other depths (the reference library's "transfer" evaluation):
a translator that does well on a band of layers suggests the residual basis stays the
same across that band. The logit lens (identity translator) is kept as row ``-1``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import LenspipeError
from ..lens.tuned import LogitLens, TunedLens, logits_into
from ..metrics import kl_from_logits, log_probs, target_stats
from ..model.head import load_unembed_head
from ..plots import figure, save
from ..progress import Progress
from ..store.reader import open_store
from ..tables import write_table_df
from .findings import Finding, bootstrap, sequence_of, whole, write_findings

#: The effect this analysis must be able to detect, and the sample size that gives it
#: (the report prints it beside the findings).
POWER = (
    "Power. The question is whether each layer's own translator is the best one for its hidden "
    "states: per sampled hidden layer, the KL of the best other translator minus that of its own, "
    "averaged over layers and tokens, with a bootstrap CI over the store sequences the tokens come "
    "from. It must resolve a difference of 0.1 nats; the default 256 tokens, spread evenly over the "
    "32 sequences of the test store, give a half-width of a few hundredths (every 3rd layer: 10 of "
    "SmolLM2's 30)."
)


@torch.no_grad()
def transfer_matrix(
    lens: TunedLens, hidden: dict[int, torch.Tensor], final_logp: torch.Tensor
) -> tuple[pd.DataFrame, dict[tuple[int, int], np.ndarray]]:
    """Rows (lens_layer, hidden_layer, kl) for every translator x every hidden layer given,
    and each entry's per-token KL (n,).

    hidden: layer -> (n, d_model) float32; final_logp: (n, vocab) the model's log-probs.
    lens_layer -1 is the logit lens.
    """
    rows, per_token = [], {}
    logit = LogitLens(lens.head)
    target = target_stats(final_logp)  # the model's side, once
    with Progress((len(lens.layers) + 1) * len(hidden), "layer transfer", unit="pair") as bar:
        for i in [-1, *lens.layers]:
            for j, h in hidden.items():
                # translator i on the hidden states of layer j (the logit lens for i = -1)
                z = logits_into(logit, h, j) if i < 0 else logits_into(lens, h, i)  # (n, vocab)
                kl = kl_from_logits(z, target).clamp_(min=0.0)  # (n,) float64
                per_token[(i, j)] = kl.numpy()
                rows.append({"lens_layer": i, "hidden_layer": j, "kl": kl.mean().item()})
                bar.update(1)
    return pd.DataFrame(rows), per_token


def own_translator_finding(df: pd.DataFrame, per_token: dict, sequences: np.ndarray) -> Finding:
    """KL(best other translator) - KL(own translator) per token, averaged over hidden layers;
    the best other is chosen on the whole sample; bootstrap over sequences."""
    t = df[df.lens_layer >= 0]
    diffs = []
    for j, g in t.groupby("hidden_layer"):
        others = g[g.lens_layer != j]
        best = int(others.loc[others.kl.idxmin(), "lens_layer"])
        diffs.append(per_token[(best, j)] - per_token[(j, j)])
    per_tok = np.mean(diffs, axis=0)  # (n,)
    ids, inverse = np.unique(sequences, return_inverse=True)
    sums, counts = np.bincount(inverse, per_tok), np.bincount(inverse).astype(float)
    stat = lambda idx: sums[idx].sum() / counts[idx].sum()  # noqa: E731
    lo, hi = bootstrap(stat, len(ids))
    return Finding(
        "KL of the best other translator minus the layer's own [nats], mean over layers",
        stat(*whole(len(ids))),
        lo,
        hi,
        0.0,
        len(ids),
        "sequences",
    )


def run(artifacts, *, translator: str, transfer_tokens: int, transfer_stride: int) -> None:
    """The rule's job (see pipeline.analyses): the evaluated split's store and the analysed lens."""
    layer_transfer(
        artifacts.need("store"),
        artifacts.need("model_dir"),
        artifacts.need("lens", kind=translator),
        artifacts.analyses_dir,
        transfer_tokens=transfer_tokens,
        transfer_stride=transfer_stride,
    )


def layer_transfer(
    store_path: Path, model_dir: Path, lens_dir: Path, out_dir: Path, *, transfer_tokens: int, transfer_stride: int
) -> pd.DataFrame:
    """Write layer_transfer.parquet and .png; returns the table: ``transfer_tokens`` tokens
    spread over the store, every ``transfer_stride``-th translator and hidden layer."""
    store = open_store(store_path)
    head = load_unembed_head(model_dir)
    lens = TunedLens.load(lens_dir, head=head, model_dir=model_dir).eval()
    layers = [layer for layer in lens.layers[::transfer_stride]]
    if not layers:
        raise LenspipeError(f"the lens at {lens_dir} has no translators")
    n = min(transfer_tokens, store.n_tokens)
    # evenly spaced tokens across the store (whole-store reads would cost more than this needs)
    idx = np.linspace(0, store.n_tokens - 1, n).astype(int)
    start, stop = int(idx[0]), int(idx[-1]) + 1
    keep = torch.from_numpy(idx - start)
    resid = store.layers([*layers, store.n_layers], start, stop)[:, keep]  # (k+1, n, d_model)
    final_logp = log_probs(head(resid[-1]))  # (n, vocab)
    lens_only = TunedLens(
        head,
        {i: lens.translators[str(i)] for i in layers},
        kind=lens.kind,
        d_model=lens.d_model,
        n_layers=lens.n_layers,
        model_info=lens.model_info,
    )
    df, per_token = transfer_matrix(lens_only, {j: resid[k] for k, j in enumerate(layers)}, final_logp)
    df["sample_tokens"], df["translator"] = n, lens.kind
    prov = {
        "analysis": "layer_transfer",
        "store": str(store_path),
        "lens": str(lens_dir),
        "layer_stride": transfer_stride,
    }
    write_table_df(df, Path(out_dir) / "layer_transfer.parquet", prov)
    findings = [own_translator_finding(df, per_token, sequence_of(idx, store.seq_len))] if len(layers) > 1 else []
    write_findings(findings, out_dir, "layer_transfer", prov)
    plot_transfer(df, Path(out_dir) / "layer_transfer.png")
    return df


def plot_transfer(df: pd.DataFrame, path: Path) -> None:
    grid = df.pivot(index="lens_layer", columns="hidden_layer", values="kl")
    fig, axes = figure(1, 1, (8, 6.5))
    im = axes[0].imshow(np.log10(grid.to_numpy() + 1e-3), origin="lower", cmap="viridis_r", aspect="auto")
    axes[0].set_xticks(range(grid.shape[1]), grid.columns, fontsize=7)
    axes[0].set_yticks(range(grid.shape[0]), ["logit" if i < 0 else str(i) for i in grid.index], fontsize=7)
    axes[0].set(
        xlabel="hidden states of layer j",
        ylabel="translator of layer i",
        title="layer transfer: log10 KL(model || head(T_i(h_j))) [nats]",
    )
    fig.colorbar(im, ax=axes[0], fraction=0.04)
    save(fig, path)


def summary(df: pd.DataFrame) -> str:
    t = df[df.lens_layer >= 0]
    diag = t[t.lens_layer == t.hidden_layer].set_index("hidden_layer").kl
    best = t.loc[t.groupby("hidden_layer").kl.idxmin()].set_index("hidden_layer").lens_layer
    own = int((best.index == best.to_numpy()).sum())
    layers = sorted(diag.index)
    step = min(np.diff(layers)) if len(layers) > 1 else 1
    off = t[(t.lens_layer - t.hidden_layer).abs() == step].kl.mean()
    return (
        f"a layer's own translator is the best of all translators on its hidden states for {own} of "
        f"{len(best)} layers; mean KL on the diagonal {diag.mean():.2f} nats vs {off:.2f} with the "
        f"translator {step} layer(s) away."
    )
