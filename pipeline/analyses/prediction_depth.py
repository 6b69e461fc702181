"""Prediction depth and early exit (seed: "Early Exit Strategies", "Computational Efficiency").

Prediction depth of a token: the earliest layer from which a lens's top-1 equals the
model's final top-1 *and stays equal* at every later layer (Belrose et al. 2023, sec. 5).
A token the lens never settles on gets depth ``n_layers`` (only the output has it).

Early exit at confidence ``tau``: a token exits at the first layer where the lens's top-1
probability reaches ``tau`` and takes that layer's top-1 as its prediction; a token that
never does runs the whole model. The curve trades layers saved against agreement with
the full model's prediction.

Both are computed from the per-token table of the evaluate stage (``token_metrics/``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import LenspipeError
from ..plots import figure, save
from ..tables import read_token_metrics, write_table_df
from .findings import Finding, mean_finding, model_token_index, per_sequence, seq_len_of, sequence_of, write_findings

log = logging.getLogger(__name__)

#: Token-frequency buckets by rank of the token id in the training split.
#: The effect this analysis must be able to detect, and the sample size that gives it
#: (the report prints it beside the findings).
POWER = (
    "Power. The question is whether the tuned lens settles on the model's answer earlier than the "
    "logit lens: the paired per-token difference of prediction depths (logit minus tuned), averaged, "
    "with a bootstrap CI over the evaluated sequences (tokens of one sequence are correlated). It "
    "must resolve a difference of 1 layer; on the default run the per-sequence mean difference has an "
    "SD of about 0.8 layers, so 16 sequences (the evaluation's 4,096 tokens) give a half-width of "
    "about 0.4 layers. The same sequences carry the early-exit question (does exiting on the tuned "
    "lens at tau = 0.9 agree with the model more often than on the logit lens?), a difference of "
    "agreement rates that needs a half-width well under the ~0.9 difference it measures."
)


BUCKETS = ((10, "top 10"), (100, "top 11-100"), (1_000, "top 101-1k"), (10_000, "top 1k-10k"))
RARE = "rarer or unseen"


def prediction_depth_of(top1: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """top1 (n_layers, n) lens top-1 ids, final (n,) model top-1 -> depth (n,) in 0..n_layers."""
    agree = top1 == final[None]  # (n_layers, n)
    # suffix_all[l] = agree[l] & agree[l+1] & ... : a contiguous run ending at the last layer
    suffix_all = agree.flip(0).int().cumprod(0).flip(0)  # (n_layers, n)
    return top1.shape[0] - suffix_all.sum(0)


def early_exit_of(top1: torch.Tensor, prob: torch.Tensor, final: torch.Tensor, tau: float):
    """Exit layer (n,) in 0..n_layers (n_layers = no early exit) and agreement (n,) bool."""
    n_layers = top1.shape[0]
    confident = prob >= tau  # (n_layers, n)
    exit_layer = torch.where(confident.any(0), confident.int().argmax(0), n_layers)  # first confident layer
    pred = torch.where(exit_layer < n_layers, top1.gather(0, exit_layer.clamp(max=n_layers - 1)[None])[0], final)
    return exit_layer, pred == final


def frequency_buckets(token_ids: np.ndarray, train_tokens: np.ndarray) -> np.ndarray:
    """Bucket name per token id, by the rank of its count in the training tokens."""
    counts = np.bincount(train_tokens.ravel(), minlength=int(max(token_ids.max(), train_tokens.max())) + 1)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    labels = np.full(len(token_ids), RARE, dtype=object)
    seen = counts[token_ids] > 0
    for limit, name in reversed(BUCKETS):
        labels[seen & (rank[token_ids] < limit)] = name
    return labels


def lens_arrays(tokens: pd.DataFrame, n_layers: int) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(lens, translator) -> (top1 (n_layers, n), prob (n_layers, n)), tokens in token_index order."""
    out = {}
    for (lens, translator), g in tokens[tokens.lens != "model"].groupby(["lens", "translator"], observed=True):
        g = g.sort_values(["layer", "token_index"])
        if sorted(g.layer.unique()) != list(range(n_layers)):
            continue  # a lens trained on a layer group: depth needs every layer
        n = len(g) // n_layers
        out[(str(lens), str(translator))] = (
            torch.from_numpy(g.top1_id.to_numpy().reshape(n_layers, n).copy()),
            torch.from_numpy(g.top1_prob.to_numpy().reshape(n_layers, n).copy()),
        )
    return out


def read_token_table(token_dir: Path) -> tuple[pd.DataFrame, torch.Tensor, int, np.ndarray]:
    """The per-token table, the model's final top-1 (n,), n_layers and the next-token ids
    (all in token_index order; ``model_token_index`` gives that order)."""
    if not Path(token_dir).is_dir():
        raise LenspipeError(
            f"no per-token table at {token_dir}: set evaluate.token_metrics to true "
            "(or keep auto with at most 65,536 evaluated tokens) to run this analysis"
        )
    tokens = read_token_metrics(token_dir)  # the block depth axis
    model = tokens[tokens.lens == "model"].sort_values("token_index")
    n_layers = int(model.layer.iloc[0])
    return tokens, torch.from_numpy(model.top1_id.to_numpy().copy()), n_layers, model.next_token_id.to_numpy()


def run(artifacts, *, taus: list[float]) -> None:
    """The rule's job (see pipeline.analyses): the token table and the train split of one run."""
    prediction_depth(
        artifacts.need("token_metrics"), artifacts.need("split", split="train"), artifacts.analyses_dir, taus=taus
    )


def prediction_depth(
    token_dir: Path, train_split: Path, out_dir: Path, *, taus: list[float]
) -> dict[str, pd.DataFrame]:
    """Write prediction_depth.parquet, early_exit.parquet, prediction_depth_findings.parquet
    and prediction_depth.png."""
    from ..corpus import load_split

    train_tokens = load_split(train_split).tokens  # (n_seq, seq_len)
    tokens, final, n_layers, _ = read_token_table(token_dir)
    buckets = frequency_buckets(final.numpy(), train_tokens)
    depth_rows, exit_rows, per_token = [], [], {}
    for (lens, translator), (top1, prob) in lens_arrays(tokens, n_layers).items():
        depth = prediction_depth_of(top1, final).numpy()
        per_token[lens] = {"depth": depth}
        for bucket in [*dict(BUCKETS).values(), RARE, "all"]:
            mask = np.ones(len(depth), bool) if bucket == "all" else buckets == bucket
            counts = np.bincount(depth[mask], minlength=n_layers + 1)
            depth_rows += [
                {
                    "lens": lens,
                    "translator": translator,
                    "bucket": bucket,
                    "depth": d,
                    "count": int(c),
                    "frac": c / max(mask.sum(), 1),
                    "n_layers": n_layers,
                }
                for d, c in enumerate(counts)
            ]
        for tau in taus:
            exit_layer, agree = early_exit_of(top1, prob, final, tau)
            per_token[lens][tau] = agree.numpy()
            by_layer = np.bincount(exit_layer.numpy(), minlength=n_layers + 1) / len(final)
            for layer, frac in enumerate(by_layer):
                exit_rows.append(
                    {
                        "lens": lens,
                        "translator": translator,
                        "tau": tau,
                        "exit_layer": layer,
                        "exit_frac": frac,
                        "cum_exit_frac": by_layer[: layer + 1].sum(),
                        "agreement": agree.double().mean().item(),
                        "layers_saved_frac": (n_layers - exit_layer).double().mean().item() / n_layers,
                        "n_layers": n_layers,
                    }
                )
    if not depth_rows:
        raise LenspipeError("prediction depth needs a lens on every layer; none found in the token table")
    tables = {"prediction_depth": pd.DataFrame(depth_rows), "early_exit": pd.DataFrame(exit_rows)}
    for name, df in tables.items():
        write_table_df(df, Path(out_dir) / f"{name}.parquet", {"analysis": name, "token_dir": str(token_dir)})
    seqs = sequence_of(model_token_index(tokens), seq_len_of(tokens))
    write_findings(
        depth_findings(per_token, seqs, taus),
        out_dir,
        "prediction_depth",
        {"analysis": "prediction_depth", "token_dir": str(token_dir)},
    )
    plot_depth(tables["prediction_depth"], tables["early_exit"], Path(out_dir) / "prediction_depth.png")
    return tables


def depth_findings(per_token: dict[str, dict], seqs: np.ndarray, taus: list[float]) -> list[Finding]:
    """Paired per-token differences, logit lens minus tuned lens, averaged per sequence and
    bootstrapped over sequences: prediction depth, and early-exit agreement at tau 0.9."""
    if not {"logit", "tuned"} <= set(per_token):
        return []
    out = []
    diff = per_token["logit"]["depth"] - per_token["tuned"]["depth"]  # (n,) layers
    _, sums, counts = per_sequence(diff, seqs)
    out.append(
        mean_finding(
            "mean prediction depth, logit lens minus tuned lens [layers]", sums / counts, "sequences", weights=counts
        )
    )
    tau = min(taus, key=lambda t: abs(t - 0.9))
    agree = per_token["tuned"][tau].astype(float) - per_token["logit"][tau].astype(float)
    _, sums, counts = per_sequence(agree, seqs)
    out.append(
        mean_finding(
            f"early exit at tau={tau:g}: agreement with the model, tuned minus logit lens",
            sums / counts,
            "sequences",
            weights=counts,
        )
    )
    return out


def _name(lens: str, translator: str) -> str:
    return "logit lens" if lens == "logit" else f"tuned ({translator})"


def plot_depth(depth: pd.DataFrame, exits: pd.DataFrame, path: Path) -> None:
    fig, axes = figure(1, 3, (17, 4.8))
    for (lens, tr), g in depth[depth.bucket == "all"].groupby(["lens", "translator"]):
        axes[0].plot(g.depth, g.frac, marker="o", ms=3, label=_name(lens, tr))
    axes[0].set(
        xlabel="prediction depth (layer; n_layers = never settles)",
        ylabel="fraction of tokens",
        title="prediction depth",
    )
    mean = (
        depth.assign(w=depth.depth * depth["count"])
        .groupby(["lens", "translator", "bucket"])[["w", "count"]]
        .sum()
        .assign(mean=lambda d: d.w / d["count"].clip(lower=1))
        .reset_index()
    )
    order = [*dict(BUCKETS).values(), RARE]
    for i, ((lens, tr), g) in enumerate(mean[mean.bucket != "all"].groupby(["lens", "translator"])):
        g = g.set_index("bucket").reindex(order)
        axes[1].bar(np.arange(len(order)) + 0.4 * i, g["mean"], width=0.4, label=_name(lens, tr))
    axes[1].set_xticks(np.arange(len(order)) + 0.2, order, rotation=20)
    axes[1].set(ylabel="mean prediction depth", title="by frequency of the predicted token (train split)")
    summary = exits.drop_duplicates(["lens", "translator", "tau"])
    for (lens, tr), g in summary.groupby(["lens", "translator"]):
        axes[2].plot(g.layers_saved_frac, g.agreement, marker="o", label=_name(lens, tr))
        for _, r in g.iterrows():
            axes[2].annotate(f"{r.tau:g}", (r.layers_saved_frac, r.agreement), fontsize=7)
    axes[2].set(
        xlabel="fraction of layers saved",
        ylabel="agreement with the model's top-1",
        title="early exit at confidence tau",
    )
    save(fig, path, axes)


def summary(depth: pd.DataFrame, exits: pd.DataFrame) -> str:
    """One sentence: median depth per lens and the early-exit point at tau = 0.9."""
    parts = []
    for (lens, tr), g in depth[depth.bucket == "all"].groupby(["lens", "translator"]):
        cdf = g.sort_values("depth")["frac"].cumsum().to_numpy()
        median = int(np.searchsorted(cdf, 0.5))
        e = exits[(exits.lens == lens) & (exits.translator == tr) & np.isclose(exits.tau, 0.9)]
        extra = (
            f", early exit at tau=0.9 saves {e.layers_saved_frac.iloc[0]:.0%} of layers at "
            f"{e.agreement.iloc[0]:.1%} agreement"
            if len(e)
            else ""
        )
        parts.append(f"{_name(lens, tr)}: median prediction depth {median} of {int(g.n_layers.iloc[0])}{extra}")
    return "; ".join(parts) + "."
