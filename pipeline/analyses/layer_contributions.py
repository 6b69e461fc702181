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

from ..errors import LenspipeError
from ..plots import figure, save
from ..progress import Progress
from ..model.parts import find_parts
from ..sampling import spread_sequences, token_index
from ..tables import read_provenance, write_table_df

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


def _lens_kl(tokens: pd.DataFrame, lens: str, translator: str, n_layers: int) -> np.ndarray:
    """(n_layers,) mean per-token KL of one lens at each layer."""
    g = tokens[(tokens.lens == lens) & (tokens.translator == translator)]
    kl = g.groupby("layer").kl.mean().sort_index()
    if kl.index.tolist() != list(range(n_layers)):
        raise LenspipeError(f"layer contributions need the {translator!r} tuned lens on all {n_layers} layers")
    return kl.to_numpy(np.float64)


def skip_sample(layer_metrics: Path, seq_len: int, skip_tokens: int) -> tuple[list[int], list[int]]:
    """(store, packed-split) indices of the sequences to skip blocks on: whole sequences
    spread over the ones the evaluation used, so KL drops and skip costs share tokens."""
    evaluated = read_provenance(layer_metrics).get("evaluated")
    if not evaluated:
        raise LenspipeError(f"{layer_metrics} does not record which sequences were evaluated (an older "
                            "lenspipe wrote it); re-run the evaluate rule")
    pick = spread_sequences(len(evaluated["sequences"]), max(1, skip_tokens // seq_len), 0)
    return ([evaluated["sequences"][i] for i in pick], [evaluated["split_sequences"][i] for i in pick])


def run(inputs, *, translator: str, skip_tokens: int) -> None:
    """The rule's job (see pipeline.analyses): the evaluation tables, the model, the evaluated split."""
    layer_contributions(inputs.need("layer_metrics"), inputs.need("token_metrics"), inputs.need("model_dir"),
                        inputs.need("split"), inputs.analyses_dir, translator=translator, skip_tokens=skip_tokens)


def layer_contributions(layer_metrics: Path, token_dir: Path, model_dir: Path, split: Path, out_dir: Path, *,
                        translator: str, skip_tokens: int) -> pd.DataFrame:
    """Write layer_contributions.parquet and .png; returns the table.

    KL drops and skip costs are measured on the same ``skip_tokens`` held-out tokens
    (whole evaluated sequences); ``kl_drop_all`` gives the drops over every evaluated token.
    """
    from transformers import AutoModelForCausalLM

    from ..corpus import load_split

    packed = load_split(split)
    store_seqs, split_seqs = skip_sample(layer_metrics, packed.tokens.shape[1], skip_tokens)
    tokens = pd.read_parquet(token_dir, columns=["lens", "translator", "layer", "token_index", "kl"])
    tokens = tokens[tokens.token_index.isin(token_index(store_seqs, packed.tokens.shape[1]))]
    tokens = tokens.astype({"lens": str, "translator": str, "kl": np.float64})
    n_layers = int(tokens.loc[tokens.lens == "model", "layer"].iloc[0])
    kl = {"tuned": _lens_kl(tokens, "tuned", translator, n_layers), "logit": _lens_kl(tokens, "logit", "none", n_layers)}
    lm = pd.read_parquet(layer_metrics)
    kl_all = lm[(lm.lens == "tuned") & (lm.translator == translator)].sort_values("layer").kl.to_numpy()
    ids = torch.from_numpy(packed.tokens[split_seqs]).long()  # (n_seq, seq_len): the same tokens
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base = next_token_loss(model, ids)
    delta = np.zeros(n_layers)
    with Progress(n_layers, "skip blocks", unit="block") as bar:
        for b in range(n_layers):
            delta[b] = next_token_loss(model, ids, skip=b) - base
            bar.update(1)
    df = pd.DataFrame({"block": np.arange(n_layers), "kl_drop": kl_drops(kl["tuned"]),
                       "kl_drop_logit": kl_drops(kl["logit"]), "kl_drop_all": kl_drops(kl_all),
                       "skip_delta_ce": delta, "base_ce": base, "sample_tokens": ids.numel(),
                       "translator": translator})
    df["rank_lens"] = df.kl_drop.rank(method="first").astype(int)  # 1 = smallest drop = first pruning candidate
    df["rank_skip"] = df.skip_delta_ce.rank(method="first").astype(int)
    df.attrs["spearman"] = spearman(df.kl_drop.to_numpy(), delta)
    write_table_df(df, Path(out_dir) / "layer_contributions.parquet",
                   {"analysis": "layer_contributions", "layer_metrics": str(layer_metrics),
                    "token_dir": str(token_dir), "sample_sequences": store_seqs,
                    "sample_split_sequences": split_seqs,
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
