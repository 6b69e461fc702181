"""Anomaly detection from lens trajectories (seed: "Safety: identify where potentially
harmful outputs begin to form"; Belrose et al. 2023, sec. 5).

Every text is a window of ``anomaly_tokens`` tokens. The model runs on it (these texts are
not in the cache) and, per token, the tuned lens at every ``anomaly_stride``-th layer gives
its KL to the model's final distribution, its entropy and whether its top-1 agrees with the
model's, plus how often the top-1 changes between consecutive sampled layers; a sequence's
features are the mean and max of these over its tokens. The model's own output gives the
baseline features (entropy, top-1 probability, next-token surprisal).

An IsolationForest (scikit-learn) is fitted on normal windows of the validation plays, then
scores normal windows of the test plays and three kinds of anomaly made offline from other
test windows: an injected instruction spliced in (``data/injections.txt``), the window's
tokens shuffled, and Python source code of the standard library (another domain). A
``control`` type (more normal test windows) should score AUROC 0.5. AUROC of each type
against the normal test windows, with a bootstrap CI over sequences, is reported for the
feature sets ``final`` (the model's output alone), ``trajectory`` (the lens alone) and
``trajectory+final``: whether the lens adds anything to what the output already shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import LenspipeError
from ..plots import figure, save
from ..progress import Progress
from ..tables import write_table_df
from .findings import Finding, bootstrap, whole, write_findings

#: The effect this analysis must be able to detect, and the sample size that gives it
#: (the report prints it beside the findings).
POWER = (
    "Power. The question is whether injected instructions are detectable: AUROC of injection windows "
    "against normal windows, null 0.5, with a bootstrap CI over windows (each group resampled). Two "
    "normal samples of the same text, ``control`` against ``normal``, must sit at 0.5 inside their "
    "CI; if they do not, the detector or the CI is biased and no AUROC of the table can be trusted. "
    "At AUROC 0.5 its standard error is sqrt((n1 + n2 + 1) / (12 n1 n2)): a half-width of 0.05 needs "
    "n1 = n2 = 256 windows per class; the default ``anomaly_sequences`` of 200 gives 0.057 (16 per "
    "class gave +-0.2: injection 0.68 [0.48, 0.84] against a control of 0.63 [0.43, 0.82] could not "
    "say whether injections are detectable at all). The detector is fitted on as many validation "
    "windows. Shuffled tokens and code, far from the play text, are resolved with fewer "
    "(``anomaly_other`` windows each). Whether the lens adds to the output alone is the AUROC "
    "difference, trajectory+final minus final, resampled on the same windows (null 0)."
)


INJECTIONS = Path(__file__).parent / "data" / "injections.txt"
#: Standard-library modules whose source is the other-domain text (read offline).
CODE_MODULES = (
    "argparse",
    "json.decoder",
    "json.encoder",
    "textwrap",
    "dataclasses",
    "fractions",
    "statistics",
    "heapq",
    "bisect",
    "calendar",
    "difflib",
    "csv",
)
TYPES = ("control", "injection", "shuffled", "code")
#: The types measured on ``anomaly_sequences`` windows; the others on ``anomaly_other``.
MAIN_TYPES = ("control", "injection")
FEATURE_SETS = ("final", "trajectory", "trajectory+final")
BOOTSTRAP = 1000


def _pair_wins(normal: np.ndarray, anomalous: np.ndarray) -> np.ndarray:
    """(n_normal, n_anomalous): 1 where the anomalous score is higher, 1/2 on a tie, else 0.
    Its mean is the AUROC in its Mann-Whitney form, the value sklearn's roc_auc_score gives."""
    n, a = np.asarray(normal, float)[:, None], np.asarray(anomalous, float)[None, :]
    return (a > n) + 0.5 * (a == n)


def auroc_ci(normal: np.ndarray, anomalous: np.ndarray, n_boot: int = BOOTSTRAP, seed: int = 0):
    """(AUROC, lo, hi): anomaly scores (higher = more anomalous) against normal ones, with a
    95% percentile CI from resampling each group's sequences with replacement."""
    # A resample's AUROC is the mean of the pair matrix over the drawn rows and columns, so
    # the matrix is built once: sklearn's roc_auc_score per resample spent ~4 ms validating
    # its input, 12,000 times per run (most of this rule's time). Same draws as
    # rng.choice(normal), rng.choice(anomalous) per resample, so the same CI as before.
    wins = _pair_wins(normal, anomalous)
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    for b in range(n_boot):
        rows, cols = rng.integers(0, len(normal), len(normal)), rng.integers(0, len(anomalous), len(anomalous))
        boot[b] = wins[rows][:, cols].mean()
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(wins.mean()), float(lo), float(hi)


def detector_scores(fit: np.ndarray, score: np.ndarray, seed: int = 0) -> np.ndarray:
    """Fit a standardised IsolationForest on ``fit`` (n, f); anomaly score of each row of
    ``score`` (higher = more anomalous)."""
    from sklearn.ensemble import IsolationForest
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), IsolationForest(n_estimators=200, random_state=seed))
    model.fit(fit)
    return -model.decision_function(score)


def load_injections(path: Path = INJECTIONS) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]


def code_text() -> str:
    """The source of CODE_MODULES, concatenated (the other domain; no network needed)."""
    import importlib
    import inspect

    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in CODE_MODULES)


def windows(tokens: np.ndarray, n: int, length: int, seed: int) -> np.ndarray:
    """(n, length) disjoint windows of a packed split (n_seq, seq_len), spread over the
    split (sampling.spread_sequences): one per sequence, cut at a seeded random offset,
    while the split has n sequences; beyond that, n of its aligned ``length``-token slots
    (several per sequence, never overlapping)."""
    from ..sampling import spread_sequences

    n_seq, seq_len = tokens.shape
    if n > n_seq * (seq_len // length):
        raise LenspipeError(
            f"anomaly detection needs {n} disjoint windows of {length} tokens, but the split has "
            f"{n_seq} sequences of {seq_len} (room for {n_seq * (seq_len // length)}): lower "
            "analyses.anomaly_sequences / anomaly_other or anomaly_tokens"
        )
    if n > n_seq:
        slots = spread_sequences(n_seq * (seq_len // length), n, seed)
        seq, slot = np.divmod(slots, seq_len // length)
        return tokens[seq[:, None], slot[:, None] * length + np.arange(length)]
    seqs = spread_sequences(n_seq, n, seed)
    rng = np.random.default_rng([seed, 1])
    starts = rng.integers(0, seq_len - length + 1, len(seqs))
    return np.stack([tokens[s, o : o + length] for s, o in zip(seqs, starts)])


def splice(base: np.ndarray, inserts: list[list[int]], seed: int) -> np.ndarray:
    """Each window with one insert (cycled) spliced in at a seeded position, cut back to its length."""
    rng = np.random.default_rng([seed, 2])
    out = []
    for i, row in enumerate(base):
        ins = inserts[i % len(inserts)][: len(row) - 4]  # keep some of the passage around it
        at = int(rng.integers(min(4, len(row) - len(ins)), len(row) - len(ins) + 1))
        out.append(np.r_[row[:at], ins, row[at:]][: len(row)])
    return np.stack(out)


def make_texts(
    tok, val: np.ndarray, test: np.ndarray, n: int, n_other: int, length: int, seed: int
) -> dict[str, np.ndarray]:
    """group -> (k, length) token windows: fit (n, validation); normal, control and injection
    (n each) and shuffled (n_other), all disjoint test windows; code (n_other)."""
    n_test = 3 * n + n_other
    test_w = windows(test, n_test, length, seed)  # disjoint test windows: one whole sequence each
    rng = np.random.default_rng([seed, 4])
    test_w = test_w[rng.permutation(len(test_w))]  # groups spread over the split alike
    normal, control, inj_base, shuf_base = np.split(test_w, [n, 2 * n, 3 * n])
    rng = np.random.default_rng([seed, 3])
    code = np.asarray(tok(code_text(), add_special_tokens=False)["input_ids"])
    starts = np.linspace(0, len(code) - length, n_other).astype(int)
    inserts = [tok("\n" + s + "\n", add_special_tokens=False)["input_ids"] for s in load_injections()]
    return {
        "fit": windows(val, n, length, seed),
        "normal": normal,
        "control": control,
        "injection": splice(inj_base, inserts, seed),
        "shuffled": np.stack([rng.permutation(r) for r in shuf_base]),
        "code": np.stack([code[s : s + length] for s in starts]),
    }


def with_separator(w: np.ndarray, separator: int | None) -> np.ndarray:
    """Windows (k, length) that begin as every cached document does, with the corpus's
    separator token (its last token dropped to keep the length); unchanged without one."""
    if separator is None:
        return w
    return np.concatenate([np.full((len(w), 1), separator, dtype=w.dtype), w[:, :-1]], axis=1)


def sequence_features(live, ids: np.ndarray, layers: list[int], batch: int = 16) -> pd.DataFrame:
    """One row of features per window of ids (k, length)."""
    import torch

    from ..metrics import final_stats, logit_stats
    from .live import forward

    rows = []
    bar = Progress(len(ids), "anomaly features", unit="window")
    for b in range(0, len(ids), batch):
        x = torch.from_numpy(ids[b : b + batch]).long()  # (B, T)
        resid, logits = forward(live, x)  # (L + 1, B, T, d), (B, T, vocab)
        B, T = x.shape
        z = logits.flatten(0, 1)  # (B * T, vocab)
        nxt = torch.cat([x[:, 1:], x[:, :1]], 1).flatten()  # the last position's target is unused
        final = final_stats(z)
        own = logit_stats(z, final, nxt, k=1)
        feats = {
            "final_entropy": own["entropy"].view(B, T),
            "final_top1_prob": own["top1_prob"].view(B, T),
            "final_surprisal": own["ce"].view(B, T)[:, :-1],
        }
        top1 = []
        with torch.no_grad():
            for layer in layers:
                s = logit_stats(live.tuned(resid[layer].flatten(0, 1), layer), final, nxt, k=1)
                feats |= {
                    f"kl_{layer}": s["kl"].view(B, T),
                    f"entropy_{layer}": s["entropy"].view(B, T),
                    f"agree_{layer}": s["agree_top1"].view(B, T).double(),
                }
                top1.append(s["top1"].view(B, T))
        feats["top1_changes"] = (torch.stack(top1)[1:] != torch.stack(top1)[:-1]).double().sum(0)  # (B, T)
        for i in range(B):
            row = {}
            for name, v in feats.items():
                v = v[i].double()
                row[f"{name}_mean"] = v.mean().item()
                if not name.startswith("agree"):
                    row[f"{name}_max"] = v.max().item()
            rows.append(row)
        bar.update(B)
    bar.close()
    return pd.DataFrame(rows)


def feature_columns(cols, which: str) -> list[str]:
    final = [c for c in cols if c.startswith("final_")]
    return {"final": final, "trajectory": [c for c in cols if c not in final], "trajectory+final": list(cols)}[which]


def run(
    artifacts, *, translator: str, anomaly_sequences: int, anomaly_other: int, anomaly_tokens: int, anomaly_stride: int
) -> None:
    """The rule's job (see pipeline.analyses): the model, the lens, the validation and test splits."""
    anomaly_detection(
        artifacts.need("model_dir"),
        artifacts.need("lens", kind=translator),
        artifacts.need("split", split="validation"),
        artifacts.need("split"),
        artifacts.analyses_dir,
        anomaly_sequences=anomaly_sequences,
        anomaly_other=anomaly_other,
        anomaly_tokens=anomaly_tokens,
        anomaly_stride=anomaly_stride,
    )


def anomaly_detection(
    model_dir: Path,
    lens_dir: Path,
    fit_split: Path,
    test_split: Path,
    out_dir: Path,
    *,
    anomaly_sequences: int,
    anomaly_other: int,
    anomaly_tokens: int,
    anomaly_stride: int,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Write anomaly_detection.parquet (AUROC per type and feature set), anomaly_scores.parquet
    (per window), anomaly_detection_findings.parquet and anomaly_detection.png."""
    from ..corpus import load_split, split_separator
    from .live import load_live, tokenizer

    live, tok = load_live(model_dir, lens_dir), tokenizer(model_dir)
    val, test = load_split(fit_split).tokens, load_split(test_split).tokens
    length = min(anomaly_tokens, val.shape[1], test.shape[1])
    separator = split_separator(test_split)
    texts = {
        g: with_separator(w, separator)
        for g, w in make_texts(tok, val, test, anomaly_sequences, anomaly_other, length, seed).items()
    }
    layers = [layer for layer in live.tuned.layers[::anomaly_stride]]
    feats = {g: sequence_features(live, ids, layers) for g, ids in texts.items()}
    rows, scores, by_set = [], [], {}
    for which in FEATURE_SETS:
        cols = feature_columns(feats["fit"].columns, which)
        s = {g: detector_scores(feats["fit"][cols].to_numpy(), f[cols].to_numpy(), seed) for g, f in feats.items()}
        by_set[which] = s
        for g, v in s.items():
            scores.append(pd.DataFrame({"group": g, "features": which, "sequence": np.arange(len(v)), "score": v}))
        for t in TYPES:
            auc, lo, hi = auroc_ci(s["normal"], s[t], seed=seed)
            rows.append(
                {
                    "anomaly": t,
                    "features": which,
                    "auroc": auc,
                    "auroc_lo": lo,
                    "auroc_hi": hi,
                    "n_normal": len(s["normal"]),
                    "n_anomalous": len(s[t]),
                    "n_fit": len(s["fit"]),
                    "n_features": len(cols),
                    "window_tokens": length,
                    "translator": live.tuned.kind,
                }
            )
    long = pd.concat([f.assign(group=g, sequence=np.arange(len(f))) for g, f in feats.items()], ignore_index=True)
    tables = {"anomaly_detection": pd.DataFrame(rows), "anomaly_scores": pd.concat(scores, ignore_index=True)}
    prov = {
        "analysis": "anomaly_detection",
        "model_dir": str(model_dir),
        "lens": str(lens_dir),
        "fit_split": str(fit_split),
        "test_split": str(test_split),
        "layers": layers,
        "seed": seed,
        "separator_id": separator,
        "code_modules": list(CODE_MODULES),
        "injections": str(INJECTIONS),
        "detector": "IsolationForest(200)",
    }
    for name, t in tables.items():
        write_table_df(t, Path(out_dir) / f"{name}.parquet", prov)
    write_findings(anomaly_findings(tables["anomaly_detection"], by_set, seed), out_dir, "anomaly_detection", prov)
    plot_anomalies(tables["anomaly_detection"], long, layers, Path(out_dir) / "anomaly_detection.png")
    return tables


def anomaly_findings(df: pd.DataFrame, scores: dict[str, dict[str, np.ndarray]], seed: int = 0) -> list[Finding]:
    """AUROC per type and feature set (control: must include 0.5; others: must differ from
    it), and for injections whether the lens adds to the output alone: the AUROC of
    trajectory+final minus that of final, both on each resample of the same windows."""
    out = []
    for _, r in df.iterrows():
        test = "includes" if r.anomaly == "control" else "differs"
        out.append(
            Finding(
                f"AUROC, {r.anomaly} vs normal windows, {r.features} features",
                r.auroc,
                r.auroc_lo,
                r.auroc_hi,
                0.5,
                int(min(r.n_normal, r.n_anomalous)),
                "windows per class",
                test,
            )
        )
    normal = {w: s["normal"] for w, s in scores.items()}
    inj = {w: s["injection"] for w, s in scores.items()}
    pairs = {w: _pair_wins(normal[w], inj[w]) for w in ("final", "trajectory+final")}
    stat = lambda i, j: pairs["trajectory+final"][i][:, j].mean() - pairs["final"][i][:, j].mean()  # noqa: E731
    n, k = len(normal["final"]), len(inj["final"])
    lo, hi = bootstrap(stat, n, k, seed=seed)
    out.append(
        Finding(
            "AUROC gain from the lens on injections: trajectory+final minus final features",
            stat(*whole(n, k)),
            lo,
            hi,
            0.0,
            min(n, k),
            "windows per class",
        )
    )
    return out


def plot_anomalies(df: pd.DataFrame, feats: pd.DataFrame, layers: list[int], path: Path) -> None:
    fig, axes = figure(1, 2, (15, 4.8))
    width = 0.8 / len(FEATURE_SETS)
    for i, which in enumerate(FEATURE_SETS):
        g = df[df.features == which].set_index("anomaly").reindex(list(TYPES))
        x = np.arange(len(TYPES)) + i * width
        axes[0].bar(x, g.auroc, width=width, label=which, yerr=[g.auroc - g.auroc_lo, g.auroc_hi - g.auroc], capsize=3)
    axes[0].axhline(0.5, color="grey", ls=":", lw=1)
    axes[0].set_xticks(np.arange(len(TYPES)) + width, TYPES)
    axes[0].set(
        ylim=(0, 1.02), ylabel="AUROC vs normal test windows (95% CI)", title="IsolationForest on each feature set"
    )
    for g, f in feats.groupby("group", sort=False):
        if g != "fit":
            axes[1].plot(layers, [f[f"kl_{layer}_mean"].mean() for layer in layers], marker="o", ms=3, label=g)
    axes[1].set(
        yscale="log",
        xlabel="layer",
        ylabel="mean tuned-lens KL to the final layer [nats]",
        title="trajectories by kind of text",
    )
    save(fig, path, axes)


def summary(df: pd.DataFrame, scores: pd.DataFrame) -> str:
    parts = []
    for t in TYPES:
        g = df[df.anomaly == t].set_index("features")
        parts.append(
            f"{t} "
            + ", ".join(f"{w} {g.auroc[w]:.2f} [{g.auroc_lo[w]:.2f}, {g.auroc_hi[w]:.2f}]" for w in FEATURE_SETS)
        )
    r = df.iloc[0]
    return (
        f"AUROC (95% CI) of an IsolationForest fitted on {r.n_fit} normal windows of {r.window_tokens} tokens, "
        f"{r.n_normal} normal vs {r.n_anomalous} anomalous test windows: " + "; ".join(parts) + "."
    )
