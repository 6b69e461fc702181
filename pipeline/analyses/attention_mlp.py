"""Attention vs MLP: what each sublayer of every block contributes under the lens.

With the attention lens position (``extract.positions: [block, attention]``: the residual
inside block ``l`` after its attention sublayer, ``pipeline.positions``), the KL drop
across block ``l`` splits in two:

- due to attention: ``KL(block l) - KL(attention l)``;
- due to the MLP: ``KL(attention l) - KL(block l + 1)``, with ``KL(block n_layers) = 0``
  (the output is the model).

Both for the tuned lens (``analyses.translator``) and the logit lens beside it, from the
per-token table, as mean KL over the evaluated tokens, with 95% bootstrap CIs over the
evaluated sequences (tokens of one sequence are correlated: :func:`sequence_bootstrap`,
the one resampling behind every interval here). The table has per (lens, layer, sublayer)
the ``estimate``, ``ci_lo``, ``ci_hi`` and ``n_sequences``, and the sublayer ``attention
- mlp``: which of the two removes more of the lens's KL at that layer. In parallel-attention
families (GPT-J, GPT-NeoX, Falcon, Phi, Cohere) the attention position is the block input
plus the attention output alone, so the split reads "as if the MLP came after it".

A run without attention positions has nothing to split: the tables are empty and the
figure and summary say how to get them (``config/inside-blocks.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import LenspipeError
from ..plots import figure, save
from ..positions import ATTENTION, BLOCK, depth_order
from ..tables import read_token_metrics, write_table_df
from .findings import BOOTSTRAP, LEVEL, Finding, seq_len_of, sequence_of, write_findings

#: The effect this analysis must be able to detect, and the sample size that gives it
#: (the report prints it beside the findings).
POWER = (
    "Power. The question per layer is whether attention or the MLP removes more of the tuned lens's "
    "KL (``attention - mlp``, null 0). Per sequence the two drops of a layer vary by about their own "
    "size, so a CI over n sequences has a half-width of roughly 2 x (the drop's spread) / sqrt(n): "
    "the 16 sequences of the default evaluation (4,096 tokens) resolve a difference of ~0.5 of the "
    "drops' typical size, which SmolLM2's tuned lens shows at the layers where one sublayer does most "
    "of the work (the first blocks and the last), and not at the mid-depth layers whose drops are a "
    "few hundredths of a nat on either side; the overall attention share of the KL removed (null 0.5) "
    "needs fewer. Gemma-3's smaller evaluation (3 sequences, ``config/two-architectures.yaml``) "
    "resolves nothing (fewer than ``findings.MIN_UNITS`` sequences): its estimates and CIs are shown, "
    "not answers."
)


SUBLAYERS = ("attention", "mlp")
DIFFERENCE = "attention - mlp"
COLUMNS = [
    "lens",
    "translator",
    "layer",
    "sublayer",
    "estimate",
    "ci_lo",
    "ci_hi",
    "n_sequences",
    "kl_before",
    "kl_after",
    "n_layers",
]
#: The lenses compared: (lens, translator) -> their label (``translator`` None: the analysed kind).
LENSES = (("tuned", None), ("logit", "none"))


@dataclass
class SequenceKL:
    """One lens's per-token KL summed per evaluated sequence, at every lens position in depth
    order (block 0, attention 0, ..., attention n_layers-1): what every number here is a
    ratio of, so a resample of sequences recomputes all of them."""

    sums: np.ndarray  # (n_seq, 2 n_layers) nats
    tokens: np.ndarray  # (n_seq,) evaluated tokens per sequence
    n_layers: int

    def mean_kl(self, weights: np.ndarray) -> np.ndarray:
        """(k, 2 n_layers) mean KL per token at each lens position, for k weightings of the
        sequences (a row of multiplicities per bootstrap resample; ones: the sample)."""
        return (weights @ self.sums) / (weights @ self.tokens)[:, None]

    def drops(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Per sublayer (and their difference) the (k, n_layers) KL drops."""
        kl = self.mean_kl(weights)
        block, mid = kl[:, 0::2], kl[:, 1::2]  # (k, L) each
        after = np.concatenate([block[:, 1:], np.zeros_like(block[:, :1])], axis=1)  # KL(block n_layers) = 0
        attention, mlp = block - mid, mid - after
        return {"attention": attention, "mlp": mlp, DIFFERENCE: attention - mlp}


def sequence_kl(tokens: pd.DataFrame, lens: str, translator: str, seq_len: int) -> SequenceKL:
    """:class:`SequenceKL` of one lens from the per-token table (every position's rows)."""
    n_layers = int(tokens.loc[tokens.lens == "model", "layer"].iloc[0])
    g = tokens[(tokens.lens == lens) & (tokens.translator == translator)]
    keys = depth_order(n_layers, (BLOCK.name, ATTENTION.name))
    have = set(zip(g.position, g.layer))
    missing = [k for k in keys if k not in have]
    if missing:
        raise LenspipeError(
            f"the attention/MLP split needs the {lens} lens ({translator}) at every layer of both "
            f"positions; the per-token table lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}"
        )
    g = g.assign(sequence=sequence_of(g.token_index.to_numpy(), seq_len))
    sums = g.pivot_table(index="sequence", columns=["layer", "position"], values="kl", aggfunc="sum")
    sums = sums[[(layer, position) for position, layer in keys]].sort_index()
    model = tokens[tokens.lens == "model"]
    counts = model.groupby(sequence_of(model.token_index.to_numpy(), seq_len)).size().reindex(sums.index)
    return SequenceKL(sums.to_numpy(np.float64), counts.to_numpy(np.float64), n_layers)


def sequence_bootstrap(n_seq: int, n_boot: int = BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """(n_boot, n_seq) multiplicities of the evaluated sequences in each bootstrap resample
    (sequences drawn with replacement): every interval of this analysis comes from these."""
    rng = np.random.default_rng([seed, n_seq])
    draws = rng.integers(0, n_seq, (n_boot, n_seq))
    return np.stack([np.bincount(d, minlength=n_seq) for d in draws]).astype(np.float64)


def drop_table(kl: SequenceKL, lens: str, translator: str) -> pd.DataFrame:
    """Per layer and sublayer: the KL drop, its 95% CI over sequences, and the KL on each side."""
    n_seq = len(kl.tokens)
    point = {k: v[0] for k, v in kl.drops(np.ones((1, n_seq))).items()}
    boot = kl.drops(sequence_bootstrap(n_seq)) if n_seq > 1 else None
    mean = kl.mean_kl(np.ones((1, n_seq)))[0]
    block, mid = mean[0::2], mean[1::2]
    after = np.append(block[1:], 0.0)
    sides = {"attention": (block, mid), "mlp": (mid, after), DIFFERENCE: (np.full_like(mid, np.nan),) * 2}
    alpha = 100 * (1 - LEVEL) / 2
    rows = []
    for sublayer, est in point.items():
        lo, hi = (
            np.percentile(boot[sublayer], [alpha, 100 - alpha], axis=0)
            if boot is not None
            else np.full((2, kl.n_layers), np.nan)
        )
        rows += [
            {
                "lens": lens,
                "translator": translator,
                "layer": layer,
                "sublayer": sublayer,
                "estimate": est[layer],
                "ci_lo": lo[layer],
                "ci_hi": hi[layer],
                "n_sequences": n_seq,
                "kl_before": sides[sublayer][0][layer],
                "kl_after": sides[sublayer][1][layer],
                "n_layers": kl.n_layers,
            }
            for layer in range(kl.n_layers)
        ]
    return pd.DataFrame(rows, columns=COLUMNS)


def attention_share(kl: SequenceKL, what: str) -> Finding:
    """The share of all the KL the lens removes (over every block) that attention removes."""
    n_seq = len(kl.tokens)

    def share(weights: np.ndarray) -> np.ndarray:
        d = kl.drops(weights)
        return d["attention"].sum(1) / (d["attention"].sum(1) + d["mlp"].sum(1))

    est = float(share(np.ones((1, n_seq)))[0])
    lo, hi = np.percentile(share(sequence_bootstrap(n_seq)), [2.5, 97.5]) if n_seq > 1 else (np.nan, np.nan)
    return Finding(
        f"{what}: share of the KL removed over all blocks that attention removes",
        est,
        float(lo),
        float(hi),
        0.5,
        n_seq,
        "sequences",
    )


def drop_findings(df: pd.DataFrame, shares: list[Finding]) -> list[Finding]:
    """Per layer of the tuned lens: attention minus MLP KL drop (null 0); and the shares."""
    diff = df[(df.lens == "tuned") & (df.sublayer == DIFFERENCE)]
    out = [
        Finding(
            f"layer {int(r.layer)}: tuned-lens KL drop of attention minus MLP [nats]",
            r.estimate,
            r.ci_lo,
            r.ci_hi,
            0.0,
            int(r.n_sequences),
            "sequences",
        )
        for r in diff.itertuples()
    ]
    return shares + out


def run(artifacts, *, translator: str) -> None:
    """The rule's job (see pipeline.analyses): the per-token table of one run."""
    attention_mlp(artifacts.need("token_metrics"), artifacts.analyses_dir, translator=translator)


def attention_mlp(token_dir: Path, out_dir: Path, *, translator: str) -> pd.DataFrame:
    """Write attention_mlp.parquet, its findings and .png; returns the table."""
    cols = ["lens", "translator", "layer", "position", "token_index", "kl"]
    tokens = read_token_metrics(token_dir, cols, positions=None).astype({"lens": str, "translator": str})
    prov = {"analysis": "attention_mlp", "token_dir": str(token_dir), "translator": translator}
    if ATTENTION.name not in set(tokens.position):
        df = pd.DataFrame(columns=COLUMNS)
        write_table_df(df, Path(out_dir) / "attention_mlp.parquet", prov | {"positions": [BLOCK.name]})
        write_findings([], out_dir, "attention_mlp", prov)
        plot_drops(df, Path(out_dir) / "attention_mlp.png")
        return df
    seq_len = seq_len_of(
        read_token_metrics(token_dir, ["lens", "token_index", "next_token_rank"]).astype({"lens": str})
    )
    frames, shares = [], []
    for lens, tr in LENSES:
        kl = sequence_kl(tokens, lens, tr or translator, seq_len)
        frames.append(drop_table(kl, lens, tr or translator))
        shares.append(attention_share(kl, f"{lens} lens" + (f" ({translator})" if lens == "tuned" else "")))
    df = pd.concat(frames, ignore_index=True)
    write_table_df(df, Path(out_dir) / "attention_mlp.parquet", prov | {"seq_len": seq_len})
    write_findings(drop_findings(df, shares), out_dir, "attention_mlp", prov)
    plot_drops(df, Path(out_dir) / "attention_mlp.png")
    return df


def plot_drops(df: pd.DataFrame, path: Path) -> None:
    """Per layer, the attention and MLP KL drops with their CIs: the tuned lens, the logit lens."""
    fig, axes = figure(2, 1, (max(8.0, 0.45 * (df.layer.max() + 1 if len(df) else 0)), 8))
    if not len(df):
        for ax in axes:
            ax.text(
                0.5,
                0.5,
                "no attention position in this run: extract with positions [block, attention]\n"
                "(snakemake --configfile config/inside-blocks.yaml)",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        save(fig, path, title="attention vs MLP: not measured")
        return
    for ax, (lens, g) in zip(axes, sorted(df.groupby("lens"), key=lambda kv: kv[0] != "tuned")):
        for shift, sublayer, color in ((-0.2, "attention", "tab:blue"), (0.2, "mlp", "tab:orange")):
            s = g[g.sublayer == sublayer].sort_values("layer")
            err = np.abs(np.stack([s.estimate - s.ci_lo, s.ci_hi - s.estimate])) if s.ci_lo.notna().any() else None
            ax.bar(s.layer + shift, s.estimate, width=0.4, yerr=err, capsize=2, color=color, label=sublayer)
        ax.axhline(0, color="black", lw=0.8)
        ax.set(
            xlabel="block (layer)",
            ylabel="KL drop across the sublayer [nats]",
            title=f"{lens} lens{' (' + g.translator.iloc[0] + ')' if lens == 'tuned' else ''}: "
            f"95% CIs over {int(g.n_sequences.iloc[0])} sequences",
        )
        if lens == "logit":
            ax.set_yscale("symlog", linthresh=0.1)
    save(fig, path, axes, title="what attention and the MLP of each block remove of the lens's KL")


def summary(df: pd.DataFrame) -> str:
    if not len(df):
        return (
            "not measured: this run stores no attention position (extract.positions [block]); "
            "config/inside-blocks.yaml turns it on."
        )
    parts = []
    for lens, g in sorted(df.groupby("lens"), key=lambda kv: kv[0] != "tuned"):
        att, mlp = (g[g.sublayer == s].estimate.sum() for s in SUBLAYERS)
        diff = g[g.sublayer == DIFFERENCE]
        more_att = diff[diff.ci_lo > 0].layer.astype(int).tolist()
        more_mlp = diff[diff.ci_hi < 0].layer.astype(int).tolist()
        parts.append(
            f"{lens} lens: attention removes {att:.2f} and the MLPs {mlp:.2f} nats of KL over all "
            f"blocks ({att / (att + mlp):.0%} attention); attention removes more at layers "
            f"{_layers(more_att)}, the MLP at {_layers(more_mlp)}, neither resolved at "
            f"{len(diff) - len(more_att) - len(more_mlp)} layers"
        )
    return "; ".join(parts) + f" (95% CIs over {int(df.n_sequences.iloc[0])} sequences)."


def _layers(layers: list[int]) -> str:
    return ", ".join(map(str, layers)) if layers else "none"
