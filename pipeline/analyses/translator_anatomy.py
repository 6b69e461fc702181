"""Translator anatomy (seed: "Feature Analysis", "Transformation Interpretability").

Each translator of a kind registered as a linear map (pipeline.lens.kinds: affine,
linear, scaling) is an affine map h -> A h + b, A = I + W with W from its ``affine_map``
(an "mlp" translator has no single matrix and is not analysed). Per layer: the relative distance of A from the identity
``||A - I||_F / ||I||_F`` (0 = the logit lens), A's singular values and effective rank
(exp of the entropy of the normalised singular values; d_model for an orthogonal map),
the bias norm, and the cosine similarity between adjacent layers' *deviations* A - I (the
cosine of the A's themselves would be ~1 everywhere, dominated by the shared identity).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import LenspipeError
from ..lens import kinds
from ..lens.translators import Translator
from ..lens.tuned import TunedLens
from ..plots import figure, save
from ..tables import write_table_df
from .findings import Finding, write_findings

#: The effect this analysis must be able to detect, and the sample size that gives it
#: (the report prints it beside the findings).
POWER = (
    "Power. Nothing here is sampled: every number is computed exactly from the trained lens's "
    'weights, so there is no confidence interval and nothing to resolve (the findings say "no '
    'sampling"). What this does not measure is how much the translators would change with another '
    "training sample of the same size; the training set (tokens, lens.json) is the sample size that "
    "matters, and the lens's validation KL per layer its quality."
)


def linear_map(t: Translator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (d, d), b (d,)) with t(h) = A h + b, in float64."""
    if not kinds.get(t.kind).linear_map:
        linear = ", ".join(k.name for k in kinds.KINDS.values() if k.linear_map)
        raise LenspipeError(f"translator anatomy needs a linear translator ({linear}), not {t.kind!r}")
    w, bias = t.affine_map(torch.float64)  # t(h) = h + W h + b
    return torch.eye(t.d_model, dtype=torch.float64) + w, bias


def effective_rank(s: torch.Tensor) -> float:
    """exp(entropy of s / sum(s)) (Roy & Vetterli 2007): between 1 and len(s)."""
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def anatomy_tables(translators: dict[int, Translator]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-layer table, singular-value table) for translators keyed by layer."""
    rows, spectra, devs = [], [], {}
    for layer in sorted(translators):
        a, b = linear_map(translators[layer])
        d = a.shape[0]
        dev = a - torch.eye(d, dtype=torch.float64)
        devs[layer] = dev.flatten()
        s = torch.linalg.svdvals(a)  # descending
        rows.append(
            {
                "layer": layer,
                "rel_dist_identity": float(dev.norm() / d**0.5),
                "effective_rank": effective_rank(s),
                "sv_max": float(s[0]),
                "sv_min": float(s[-1]),
                "condition": float(s[0] / s[-1]) if s[-1] > 0 else float("inf"),
                "bias_norm": float(b.norm()),
                "d_model": d,
                "kind": translators[layer].kind,
            }
        )
        spectra += [{"layer": layer, "index": i, "singular_value": float(v)} for i, v in enumerate(s)]
    df = pd.DataFrame(rows)
    cos = []
    for layer in df.layer:
        nxt = devs.get(layer + 1)
        cur = devs[layer]
        denom = float(cur.norm() * nxt.norm()) if nxt is not None else 0.0
        cos.append(float(cur @ nxt) / denom if denom > 0 else float("nan"))
    df["cos_next"] = cos  # cosine(A_l - I, A_{l+1} - I); NaN at the last layer or for an identity map
    return df, pd.DataFrame(spectra)


def run(artifacts, *, translator: str) -> None:
    """The rule's job (see pipeline.analyses): the analysed lens of one run."""
    translator_anatomy(artifacts.need("lens", kind=translator), artifacts.need("model_dir"), artifacts.analyses_dir)


def translator_anatomy(lens_dir: Path, model_dir: Path, out_dir: Path) -> pd.DataFrame:
    """Write translator_anatomy.parquet, translator_spectra.parquet and translator_anatomy.png."""
    lens = TunedLens.load(lens_dir, model_dir=model_dir)
    df, spectra = anatomy_tables({int(k): t for k, t in lens.translators.items()})
    prov = {"analysis": "translator_anatomy", "lens": str(lens_dir)}
    write_table_df(df, Path(out_dir) / "translator_anatomy.parquet", prov)
    write_table_df(spectra, Path(out_dir) / "translator_spectra.parquet", prov)
    write_findings(anatomy_findings(df), out_dir, "translator_anatomy", prov)
    plot_anatomy(df, spectra, Path(out_dir) / "translator_anatomy.png")
    return df


def anatomy_findings(df: pd.DataFrame) -> list[Finding]:
    """Medians over layers, exact (no sampling, no CI)."""
    nan, n = float("nan"), len(df)
    return [
        Finding(
            "median relative distance of A from the identity over layers",
            float(df.rel_dist_identity.median()),
            nan,
            nan,
            nan,
            n,
            "layers (exact, no sampling)",
            "none",
        ),
        Finding(
            "median cosine of adjacent layers' A - I",
            float(df.cos_next.median()),
            nan,
            nan,
            nan,
            n,
            "layers (exact, no sampling)",
            "none",
        ),
    ]


def plot_anatomy(df: pd.DataFrame, spectra: pd.DataFrame, path: Path) -> None:
    fig, axes = figure(1, 4, (20, 4.5))
    axes[0].plot(df.layer, df.rel_dist_identity, marker="o", ms=3)
    axes[0].set(xlabel="layer", ylabel="||A - I||_F / ||I||_F", title="distance from the identity (logit lens)")
    axes[1].plot(df.layer, df.effective_rank, marker="o", ms=3)
    axes[1].set(
        xlabel="layer", ylabel="effective rank of A", title=f"effective rank (d_model = {int(df.d_model.iloc[0])})"
    )
    axes[2].plot(df.layer, df.bias_norm, marker="o", ms=3, label="bias norm")
    axes[2].plot(df.layer, df.cos_next, marker="s", ms=3, label="cos(A_l - I, A_l+1 - I)")
    axes[2].set(xlabel="layer", title="bias norm and adjacent-layer similarity")
    layers = sorted(df.layer)
    cmap = __import__("matplotlib").colormaps["viridis"]
    for layer in layers[:: max(1, len(layers) // 6)]:
        s = spectra[spectra.layer == layer].singular_value.to_numpy()
        axes[3].plot(np.arange(1, len(s) + 1), s, color=cmap(layer / max(layers[-1], 1)), label=f"layer {layer}")
    axes[3].set(xscale="log", yscale="log", xlabel="index", ylabel="singular value", title="singular value spectra")
    save(fig, path, axes)


def summary(df: pd.DataFrame, spectra: pd.DataFrame) -> str:
    """One sentence from the per-layer table (it holds each layer's extreme singular values,
    so the full spectra add nothing to it)."""
    far = df.loc[df.rel_dist_identity.idxmax()]
    return (
        f"translators move furthest from the identity at layer {int(far.layer)} "
        f"(relative distance {far.rel_dist_identity:.2f}) and least at layer "
        f"{int(df.loc[df.rel_dist_identity.idxmin()].layer)} ({df.rel_dist_identity.min():.2f}); "
        f"effective rank {df.effective_rank.min():.0f}-{df.effective_rank.max():.0f} of {int(df.d_model.iloc[0])}; "
        f"median adjacent-layer cosine {df.cos_next.median():.2f}."
    )
