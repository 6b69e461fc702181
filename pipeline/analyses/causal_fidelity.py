"""Causal fidelity of the tuned lens (seed: "Intervention Experiments"; Belrose et al. 2023,
sec. 4: do the lens and the model "use the same features"?).

At a few layers (``causal_layers``, spread over the depth), directions of the residual
stream that most change the tuned lens's output are extracted, then each is ablated in
the model's own forward pass and the two effects are compared over directions.

- **Ablation** (as in the paper): resampling along a direction. The component of each
  token's residual along ``v`` is replaced by that of another token of the sample
  (a fixed derangement), ``h + ((h_other - h) . v) v``; for a set of orthonormal
  directions ``V`` it is ``h + (h_other - h) V V^T``, so zero directions change nothing.
- **Directions**: causal basis extraction (CBE) with its objective, the expected KL of
  the lens under that ablation, replaced by its second-order expansion, which needs one
  lens backward instead of an optimisation loop: ``KL ~ 1/2 a^2 v^T F v`` with ``a`` the
  resampled displacement along ``v`` and ``F`` the lens's Fisher information in residual
  space. With ``g_i`` the score of one label sampled from the lens at token ``i``
  (``E[g g^T] = F_i``) and ``c_i`` the centred residual, the objective is
  ``f(v) = 1/2 mean_i (g_i . v)^2 (v^T S v + (c_i . v)^2)`` (``S`` the covariance). Each
  direction maximises ``f`` orthogonally to the previous ones, by a shifted power
  iteration (``f`` is a quartic form; its gradient is ``2 A(v) v`` with ``A(v)`` positive
  semi-definite). Directions are fitted on held-out tokens other than those measured.
- **Effects**, on ``causal_tokens`` held-out tokens (whole store sequences, spread): the
  lens effect ``KL(lens_l(h) || lens_l(h'))`` at the ablated layer, and the model effect
  ``KL(model(x) || model(x with layer l ablated))`` at its output, both means over tokens.
  A baseline of ``causal_random`` random orthonormal directions gets the same measurements.
- **Cost**: an ablation at layer ``l`` changes nothing before it, so the model runs once
  on the measured tokens and every ablation resumes at block ``l`` from the ablated
  residual (``pipeline.model.resume``): ``n_layers - l`` blocks and the head per direction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..plots import figure, save
from ..progress import Progress
from ..tables import write_table_df
from .findings import Finding, bootstrap, spearman, whole, write_findings

#: The effect this analysis must be able to detect, and the sample size that gives it
#: (the report prints it beside the findings).
POWER = (
    "Power. Two questions per layer. Does the lens rank directions as the model does: the Spearman "
    "correlation, over the extracted directions, between their effect on the lens and on the model's "
    "output, with a bootstrap CI over directions (null 0). It must exclude 0 when the true "
    "correlation is 0.5 or more; the Fisher approximation of a Spearman's standard error, 1.03 / "
    "sqrt(k - 3), makes that k >= 18 directions, and the default 32 give a CI of about +-0.3 around "
    "0.5 (the 6 directions used before gave +-0.8: no answer at all). And do the lens's directions "
    "matter more to the model than random ones: the ratio of their mean model effects (null 1), from "
    "8 random directions by default (the fewest a finding resolves on). On SmolLM2 that resolved the "
    "ratio at layer 8 (13x [2.6, 35]) but not at 15 or 22 (5x [0.3, 15], 3x [0.9, 7]): random "
    "directions' effects are heavy-tailed, so the baseline's mean needs more of them there than the "
    "default run's 15 minutes afford (``analyses.causal_random``; each costs as much as an extracted "
    "direction). The effects are means over ``causal_tokens`` held-out tokens; what limits the "
    "Spearman is the number of directions, not of tokens."
)


SETS = ("causal", "random", "all")


def resample_ablate(h, other, basis):
    """h, other (n, d); basis (d, k) orthonormal columns, k >= 0 -> h with its component in
    span(basis) replaced by other's: h + (other - h) V V^T (k = 0: h unchanged)."""
    return h + ((other - h) @ basis) @ basis.T  # (n, d)


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation of range(n) without fixed points (one cycle; n >= 2): the donor of each token."""
    order = np.random.default_rng([seed, n]).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def lens_scores(lens, layer: int, h, seed: int):
    """(g (n, d) float64 scores of one label sampled from the lens per token, c (n, d) centred h)."""
    import torch

    h = h.detach().clone().requires_grad_(True)  # (n, d_model)
    with torch.enable_grad():
        logq = torch.log_softmax(lens(h, layer).float(), -1)  # (n, vocab)
        y = torch.multinomial(logq.detach().exp(), 1, generator=torch.Generator().manual_seed(seed))  # (n, 1)
        # each token's residual affects only its own row, so one backward gives every token's score
        (g,) = torch.autograd.grad(logq.gather(-1, y).sum(), h)
    hd = h.detach().double()
    return g.double(), hd - hd.mean(0)


def objective(v, g, c, S):
    """f(v) = 1/2 mean_i (g_i . v)^2 (v^T S v + (c_i . v)^2): the second-order lens KL."""
    return 0.5 * ((g @ v) ** 2 * (v @ S @ v + (c @ v) ** 2)).mean()


def causal_basis(g, c, k: int, iters: int = 100):
    """(d, k) orthonormal directions, each maximising ``objective`` orthogonally to the previous."""
    import torch

    n, d = g.shape
    S = c.T @ c / max(n - 1, 1)  # (d, d) covariance
    # rescale so both factors are O(1): f only changes by a constant factor
    g, c, S = g / g.norm(dim=1).mean(), c / S.trace().sqrt(), S / S.trace()
    V = torch.zeros(d, 0, dtype=torch.float64)
    for _ in range(k):
        P = torch.eye(d, dtype=torch.float64) - V @ V.T
        v = torch.linalg.eigh(P @ (g.T @ g / n + S) @ P).eigenvectors[:, -1]
        best, best_f = v, objective(v, g, c, S)
        for _ in range(iters):
            gv, cv = g @ v, c @ v  # (n,)
            Av = (g.T @ ((v @ S @ v + cv**2) * gv) + (gv**2).mean() * n * (S @ v) + c.T @ (gv**2 * cv)) / n
            w = P @ (Av + 2 * best_f * v)  # shift keeps the step ascending
            v = w / w.norm()
            f = objective(v, g, c, S)
            if f > best_f:
                best, best_f = v, f
        V = torch.cat([V, best[:, None]], 1)
    return V


def random_basis(d: int, k: int, seed: int):
    """(d, k) random orthonormal directions."""
    import torch

    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def cosine(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) if a.any() and b.any() else float("nan")


def run(
    artifacts, *, translator: str, causal_layers: int, causal_directions: int, causal_random: int, causal_tokens: int
) -> None:
    """The rule's job (see pipeline.analyses): the evaluated split's store, the model, the lens."""
    causal_fidelity(
        artifacts.need("store"),
        artifacts.need("model_dir"),
        artifacts.need("lens", kind=translator),
        artifacts.analyses_dir,
        causal_layers=causal_layers,
        causal_directions=causal_directions,
        causal_random=causal_random,
        causal_tokens=causal_tokens,
    )


def pick_layers(n_layers: int, k: int, available: list[int]) -> list[int]:
    """k layers spread over the depth (fractions 1/(k+1) .. k/(k+1)), among the lens's layers."""
    want = [round(n_layers * (i + 1) / (k + 1)) for i in range(k)]
    return sorted({min(available, key=lambda a: abs(a - w)) for w in want})


def measure(live, resumable, layer: int, bases: dict, final_logp, seed: int) -> list[dict]:
    """One row per direction: its lens and model effects at ``layer`` on the resumable batch."""
    import torch

    from ..metrics import kl_div, log_probs

    h = resumable.resid[layer]  # (B, T, d)
    flat = h.flatten(0, 1)  # (n, d)
    donor = torch.from_numpy(derangement(flat.shape[0], seed))
    lens_logp = log_probs(live.tuned(flat, layer))  # (n, vocab)
    rows = []
    with Progress(sum(V.shape[1] for V in bases.values()), f"ablate at layer {layer}", unit="dir") as bar:
        for kind, V in bases.items():
            for i in range(V.shape[1]):
                v = V[:, i : i + 1].float()  # (d, 1)
                with torch.no_grad():
                    ablated = resample_ablate(flat, flat[donor], v)  # (n, d)
                    lens_kl = kl_div(lens_logp, log_probs(live.tuned(ablated, layer)))
                    z = resumable.logits_from(layer, ablated.view_as(h)).flatten(0, 1)  # (n, vocab)
                model_kl = kl_div(final_logp, log_probs(z))
                rows.append(
                    {
                        "layer": layer,
                        "directions": kind,
                        "direction": i,
                        "lens_kl": lens_kl.double().mean().item(),
                        "model_kl": model_kl.double().mean().item(),
                    }
                )
                bar.update(1)
    return rows


def causal_fidelity(
    store_path: Path,
    model_dir: Path,
    lens_dir: Path,
    out_dir: Path,
    *,
    causal_layers: int,
    causal_directions: int,
    causal_random: int,
    causal_tokens: int,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Write causal_fidelity.parquet (one row per direction), causal_agreement.parquet (per
    layer and direction set), causal_fidelity_findings.parquet and causal_fidelity.png."""
    from ..metrics import log_probs
    from ..model.resume import Resumable
    from ..sampling import read_sequence_tokens, read_sequences, spread_sequences
    from ..store.reader import open_store
    from .live import load_live

    store, live = open_store(store_path), load_live(model_dir, lens_dir)
    m = max(1, causal_tokens // store.seq_len)
    picked = spread_sequences(store.n_tokens // store.seq_len, 2 * m, seed)
    measured, fitted = picked[0::2].tolist(), picked[1::2].tolist()  # disjoint: no selection bias
    ids = read_sequence_tokens(store, measured).view(len(measured), store.seq_len)  # (B, T)
    resumable = Resumable(live.model, ids)  # the model's residual stream, resumable from any layer
    final_logp = log_probs(resumable.logits.flatten(0, 1))  # (n, vocab)
    layers = pick_layers(live.n_layers, causal_layers, live.tuned.layers)
    rows = []
    for layer in layers:
        fit_h = read_sequences(store, [layer], fitted or measured)[0]  # (n_fit, d)
        g, c = lens_scores(live.tuned, layer, fit_h, seed + layer)
        bases = {
            "causal": causal_basis(g, c, causal_directions),
            "random": random_basis(g.shape[1], causal_random, seed + layer),
        }
        S = c.T @ c / max(len(c) - 1, 1)
        new = measure(live, resumable, layer, bases, final_logp, seed + layer)
        for r in new:
            v = bases[r["directions"]][:, r["direction"]]
            r["predicted_lens_kl"] = objective(v, g, c, S).item()
        rows += new
    df = pd.DataFrame(rows).assign(sample_tokens=ids.numel(), translator=live.tuned.kind)
    tables = {"causal_fidelity": df, "causal_agreement": agreement(df)}
    findings = fidelity_findings(df)
    prov = {
        "analysis": "causal_fidelity",
        "store": str(store_path),
        "lens": str(lens_dir),
        "layers": layers,
        "measured_sequences": measured,
        "fit_sequences": fitted,
        "seed": seed,
        "ablation": "resample along each direction from a fixed derangement of the measured tokens",
        "directions": "second-order causal basis extraction (see pipeline/analyses/causal_fidelity.py)",
    }
    for name, t in tables.items():
        write_table_df(t, Path(out_dir) / f"{name}.parquet", prov)
    write_findings(findings, out_dir, "causal_fidelity", prov)
    plot_fidelity(df, tables["causal_agreement"], Path(out_dir) / "causal_fidelity.png")
    return tables


def fidelity_findings(df: pd.DataFrame) -> list[Finding]:
    """Per layer: the Spearman over the extracted directions (bootstrap over directions,
    null 0), and the ratio of the mean model effect of extracted to random directions
    (independent bootstraps of both sets, null 1)."""
    out = []
    for layer, g in df.groupby("layer"):
        c, r = g[g.directions == "causal"], g[g.directions == "random"]
        lens, model, rand = c.lens_kl.to_numpy(), c.model_kl.to_numpy(), r.model_kl.to_numpy()
        stat = lambda i, lens=lens, model=model: spearman(lens[i], model[i])  # noqa: E731
        lo, hi = bootstrap(stat, len(c))
        out.append(
            Finding(
                f"layer {layer}: Spearman(lens effect, model effect) over the lens's directions",
                stat(*whole(len(c))),
                lo,
                hi,
                0.0,
                len(c),
                "directions",
            )
        )
        if len(r):
            ratio = lambda i, j, model=model, rand=rand: model[i].mean() / rand[j].mean()  # noqa: E731
            lo, hi = bootstrap(ratio, len(c), len(r))
            out.append(
                Finding(
                    f"layer {layer}: model effect of the lens's directions over random ones (ratio of means)",
                    ratio(*whole(len(c), len(r))),
                    lo,
                    hi,
                    1.0,
                    min(len(c), len(r)),
                    f"directions ({len(c)} lens, {len(r)} random)",
                )
            )
    return out


def agreement(df: pd.DataFrame) -> pd.DataFrame:
    """Per layer and direction set (causal, random, all): how well the lens effect of a
    direction predicts its model effect."""
    rows = []
    for layer, g in df.groupby("layer"):
        for which in SETS:
            s = g if which == "all" else g[g.directions == which]
            rows.append(
                {
                    "layer": layer,
                    "directions": which,
                    "n": len(s),
                    "spearman": spearman(s.lens_kl, s.model_kl),
                    "cosine": cosine(s.lens_kl, s.model_kl),
                    "mean_lens_kl": s.lens_kl.mean(),
                    "mean_model_kl": s.model_kl.mean(),
                    "spearman_predicted": spearman(s.predicted_lens_kl, s.lens_kl),
                }
            )
    return pd.DataFrame(rows)


def plot_fidelity(df: pd.DataFrame, agree: pd.DataFrame, path: Path) -> None:
    layers = sorted(df.layer.unique())
    fig, axes = figure(1, len(layers) + 1, (4.6 * (len(layers) + 1), 4.4))
    for ax, layer in zip(axes, layers):
        for kind, marker in (("causal", "o"), ("random", "x")):
            g = df[(df.layer == layer) & (df.directions == kind)]
            ax.scatter(
                g.lens_kl.clip(lower=1e-9), g.model_kl.clip(lower=1e-9), marker=marker, label=f"{kind} directions"
            )
        rho = agree[(agree.layer == layer) & (agree.directions == "all")].spearman.iloc[0]
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="lens effect: KL at the layer [nats]",
            ylabel="model effect: KL at the output [nats]",
            title=f"layer {layer} (Spearman, all: {rho:.2f})",
        )
    for which in SETS:
        g = agree[agree.directions == which]
        axes[-1].plot(g.layer, g.spearman, marker="o", label=which)
    axes[-1].set(
        ylim=(-1.05, 1.05),
        xlabel="layer",
        ylabel="Spearman(lens effect, model effect)",
        title="agreement over directions",
    )
    save(fig, path, axes)


def summary(df: pd.DataFrame, agree: pd.DataFrame) -> str:
    parts = []
    for layer, g in agree.groupby("layer"):
        g = g.set_index("directions")
        ratio = g.mean_model_kl["causal"] / g.mean_model_kl["random"] if g.mean_model_kl["random"] > 0 else float("inf")
        parts.append(
            f"layer {layer}: Spearman {g.spearman['causal']:.2f} over the lens's directions, "
            f"{g.spearman['random']:.2f} over random ones, {g.spearman['all']:.2f} over both; "
            f"ablating a lens direction moves the model's output {ratio:.0f}x more than a random one "
            f"({g.mean_model_kl['causal']:.3g} vs {g.mean_model_kl['random']:.3g} nats)"
        )
    n = df.groupby("directions").size() // df.layer.nunique()
    return (
        f"{n.get('causal', 0)} extracted and {n.get('random', 0)} random directions per layer, resample-ablated "
        f"on {int(df.sample_tokens.iloc[0])} "
        "held-out tokens: " + "; ".join(parts) + "."
    )
