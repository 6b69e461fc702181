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


@torch.no_grad()
def transfer_matrix(lens: TunedLens, hidden: dict[int, torch.Tensor], final_logp: torch.Tensor) -> pd.DataFrame:
    """Rows (lens_layer, hidden_layer, kl) for every translator x every hidden layer given.

    hidden: layer -> (n, d_model) float32; final_logp: (n, vocab) the model's log-probs.
    lens_layer -1 is the logit lens.
    """
    rows = []
    logit = LogitLens(lens.head)
    target = target_stats(final_logp)  # the model's side, once
    with Progress((len(lens.layers) + 1) * len(hidden), "layer transfer", unit="pair") as bar:
        for i in [-1, *lens.layers]:
            for j, h in hidden.items():
                # translator i on the hidden states of layer j (the logit lens for i = -1)
                z = logits_into(logit, h, j) if i < 0 else logits_into(lens, h, i)  # (n, vocab)
                kl = kl_from_logits(z, target).clamp_(min=0.0).mean().item()
                rows.append({"lens_layer": i, "hidden_layer": j, "kl": kl})
                bar.update(1)
    return pd.DataFrame(rows)


def run(inputs, *, translator: str, transfer_tokens: int, transfer_stride: int) -> None:
    """The rule's job (see pipeline.analyses): the evaluated split's store and the analysed lens."""
    layer_transfer(inputs.need("store"), inputs.need("model_dir"), inputs.need("lens", kind=translator),
                   inputs.analyses_dir, transfer_tokens=transfer_tokens, transfer_stride=transfer_stride)


def layer_transfer(store_path: Path, model_dir: Path, lens_dir: Path, out_dir: Path, *,
                   transfer_tokens: int, transfer_stride: int) -> pd.DataFrame:
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
    lens_only = TunedLens(head, {i: lens.translators[str(i)] for i in layers}, kind=lens.kind,
                          d_model=lens.d_model, n_layers=lens.n_layers, model_info=lens.model_info)
    df = transfer_matrix(lens_only, {j: resid[k] for k, j in enumerate(layers)}, final_logp)
    df["sample_tokens"], df["translator"] = n, lens.kind
    write_table_df(df, Path(out_dir) / "layer_transfer.parquet",
                   {"analysis": "layer_transfer", "store": str(store_path), "lens": str(lens_dir),
                    "layer_stride": transfer_stride})
    plot_transfer(df, Path(out_dir) / "layer_transfer.png")
    return df


def plot_transfer(df: pd.DataFrame, path: Path) -> None:
    grid = df.pivot(index="lens_layer", columns="hidden_layer", values="kl")
    fig, axes = figure(1, 1, (8, 6.5))
    im = axes[0].imshow(np.log10(grid.to_numpy() + 1e-3), origin="lower", cmap="viridis_r", aspect="auto")
    axes[0].set_xticks(range(grid.shape[1]), grid.columns, fontsize=7)
    axes[0].set_yticks(range(grid.shape[0]), ["logit" if i < 0 else str(i) for i in grid.index], fontsize=7)
    axes[0].set(xlabel="hidden states of layer j", ylabel="translator of layer i",
                title="layer transfer: log10 KL(model || head(T_i(h_j))) [nats]")
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
    return (f"a layer's own translator is the best of all translators on its hidden states for {own} of "
            f"{len(best)} layers; mean KL on the diagonal {diag.mean():.2f} nats vs {off:.2f} with the "
            f"translator {step} layer(s) away.")
