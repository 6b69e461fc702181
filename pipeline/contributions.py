"""Layer contributions and pruning candidates (seed: "Layer Pruning", "Performance Bottlenecks").

Under the tuned lens, block ``b`` (which maps residual ``b`` to ``b + 1``) contributes the
KL drop ``kl[b] - kl[b + 1]`` (``kl[n_layers] = 0``: the output is the model). Blocks with
the smallest drop are the pruning candidates. To check what that ranking is worth, each
block is then actually skipped (its output replaced by its input) on a small sample of
held-out tokens, and the change in next-token loss is measured; the table holds both, and
the summary their rank correlation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from .errors import LenspipeError
from .plots import figure, save
from .progress import Progress
from .surgery import find_parts
from .tables import write_table_df

log = logging.getLogger(__name__)


def kl_drops(kl: np.ndarray) -> np.ndarray:
    """Per-layer KL (n_layers,) for layers 0..n_layers-1 -> drop of each block (n_layers,)."""
    return kl - np.append(kl[1:], 0.0)


def _skip_hook(_mod, args, kwargs, out):
    """Replace a block's output hidden state with its input: the block is skipped."""
    h = args[0] if args else kwargs["hidden_states"]
    return (h, *out[1:]) if isinstance(out, tuple) else h


@torch.no_grad()
def next_token_loss(model, ids: torch.Tensor, skip: int | None = None) -> float:
    """Mean next-token cross-entropy of ``model`` on ids (batch, pos), optionally without block ``skip``."""
    handle = find_parts(model).blocks[skip].register_forward_hook(_skip_hook, with_kwargs=True) if skip is not None else None
    try:
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (batch, pos, vocab)
    finally:
        if handle is not None:
            handle.remove()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = (pd.Series(x).rank().to_numpy() for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def layer_contributions(layer_metrics: Path, model_dir: Path, split: Path, out_dir: Path, *,
                        translator: str = "affine", sample_tokens: int = 512) -> pd.DataFrame:
    """Write layer_contributions.parquet and .png; returns the table."""
    from transformers import AutoModelForCausalLM

    from .corpus import load_split

    lm = pd.read_parquet(layer_metrics)
    kl = {}
    for name, rows in (("tuned", lm[(lm.lens == "tuned") & (lm.translator == translator)]), ("logit", lm[lm.lens == "logit"])):
        kl[name] = rows.sort_values("layer").kl.to_numpy()
    n_layers = len(kl["logit"])
    if len(kl["tuned"]) != n_layers:
        raise LenspipeError(f"layer contributions need the {translator!r} tuned lens on all {n_layers} layers "
                            f"in {layer_metrics}")
    packed = load_split(split)
    n_seq = max(1, min(len(packed.tokens), sample_tokens // packed.tokens.shape[1]))
    ids = torch.from_numpy(packed.tokens[:n_seq]).long()  # (n_seq, seq_len): the first held-out sequences
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base = next_token_loss(model, ids)
    delta = np.zeros(n_layers)
    with Progress(n_layers, "skip blocks", unit="block") as bar:
        for b in range(n_layers):
            delta[b] = next_token_loss(model, ids, skip=b) - base
            bar.update(1)
    df = pd.DataFrame({"block": np.arange(n_layers), "kl_drop": kl_drops(kl["tuned"]),
                       "kl_drop_logit": kl_drops(kl["logit"]), "skip_delta_ce": delta,
                       "base_ce": base, "sample_tokens": ids.numel(), "translator": translator})
    df["rank_lens"] = df.kl_drop.rank(method="first").astype(int)  # 1 = smallest drop = first pruning candidate
    df["rank_skip"] = df.skip_delta_ce.rank(method="first").astype(int)
    df.attrs["spearman"] = spearman(df.kl_drop.to_numpy(), delta)
    write_table_df(df, Path(out_dir) / "layer_contributions.parquet",
                   {"analysis": "layer_contributions", "layer_metrics": str(layer_metrics),
                    "spearman_kl_drop_vs_skip_delta_ce": df.attrs["spearman"]})
    plot_contributions(df, Path(out_dir) / "layer_contributions.png")
    return df


def plot_contributions(df: pd.DataFrame, path: Path) -> None:
    fig, axes = figure(1, 2, (14, 4.8))
    axes[0].bar(df.block - 0.2, df.kl_drop, width=0.4, label="tuned-lens KL drop [nats]")
    ax2 = axes[0].twinx()
    ax2.bar(df.block + 0.2, df.skip_delta_ce, width=0.4, color="tab:red", alpha=0.7, label="loss increase when skipped")
    ax2.set_ylabel("next-token loss increase when skipped [nats]", color="tab:red")
    axes[0].set(xlabel="block", ylabel="KL drop across the block [nats]", title="what each block contributes")
    axes[1].scatter(df.kl_drop, df.skip_delta_ce)
    for _, r in df.iterrows():
        axes[1].annotate(str(int(r.block)), (r.kl_drop, r.skip_delta_ce), fontsize=7)
    axes[1].set(yscale="symlog", xlabel="tuned-lens KL drop [nats]",
                ylabel="loss increase when skipped [nats]",
                title=f"lens ranking vs real removal cost (Spearman {spearman(df.kl_drop.to_numpy(), df.skip_delta_ce.to_numpy()):.2f})")
    save(fig, path, axes)


def summary(df: pd.DataFrame) -> str:
    cand = df.sort_values("rank_lens").head(3)
    return (f"smallest tuned-lens contributions (pruning candidates): blocks {', '.join(map(str, cand.block))}, "
            f"whose removal costs {', '.join(f'{x:+.3f}' for x in cand.skip_delta_ce)} nats of next-token loss "
            f"(base {df.base_ce.iloc[0]:.3f}); the costliest removal is block {int(df.skip_delta_ce.idxmax())} "
            f"({df.skip_delta_ce.max():+.3f}); Spearman(lens drop, removal cost) = "
            f"{spearman(df.kl_drop.to_numpy(), df.skip_delta_ce.to_numpy()):.2f} over {len(df)} blocks.")
