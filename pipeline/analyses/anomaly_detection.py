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

from ..plots import figure, save
from ..tables import write_table_df

INJECTIONS = Path(__file__).parent / "data" / "injections.txt"
#: Standard-library modules whose source is the other-domain text (read offline).
CODE_MODULES = ("argparse", "json.decoder", "json.encoder", "textwrap", "dataclasses", "fractions",
                "statistics", "heapq", "bisect", "calendar", "difflib", "csv")
TYPES = ("control", "injection", "shuffled", "code")
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
    """(n, length) windows of a packed split (n_seq, seq_len): whole sequences spread over
    the split (sampling.spread_sequences), each cut at a seeded random offset."""
    from ..sampling import spread_sequences

    seqs = spread_sequences(len(tokens), n, seed)
    rng = np.random.default_rng([seed, 1])
    starts = rng.integers(0, tokens.shape[1] - length + 1, len(seqs))
    return np.stack([tokens[s, o:o + length] for s, o in zip(seqs, starts)])


def splice(base: np.ndarray, inserts: list[list[int]], seed: int) -> np.ndarray:
    """Each window with one insert (cycled) spliced in at a seeded position, cut back to its length."""
    rng = np.random.default_rng([seed, 2])
    out = []
    for i, row in enumerate(base):
        ins = inserts[i % len(inserts)][:len(row) - 4]  # keep some of the passage around it
        at = int(rng.integers(min(4, len(row) - len(ins)), len(row) - len(ins) + 1))
        out.append(np.r_[row[:at], ins, row[at:]][:len(row)])
    return np.stack(out)


def make_texts(tok, val: np.ndarray, test: np.ndarray, n: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """group -> (k, length) token windows: fit (2n, validation), normal and one per type (n, test)."""
    test_w = windows(test, 4 * n, length, seed)  # disjoint test windows for normal and three bases
    normal, control, inj_base, shuf_base = (test_w[i::4] for i in range(4))
    rng = np.random.default_rng([seed, 3])
    code = np.asarray(tok(code_text(), add_special_tokens=False)["input_ids"])
    starts = np.linspace(0, len(code) - length, n).astype(int)
    inserts = [tok("\n" + s + "\n", add_special_tokens=False)["input_ids"] for s in load_injections()]
    return {"fit": windows(val, 2 * n, length, seed), "normal": normal, "control": control,
            "injection": splice(inj_base, inserts, seed),
            "shuffled": np.stack([rng.permutation(r) for r in shuf_base]),
            "code": np.stack([code[s:s + length] for s in starts])}


def sequence_features(live, ids: np.ndarray, layers: list[int], batch: int = 16) -> pd.DataFrame:
    """One row of features per window of ids (k, length)."""
    import torch

    from ..metrics import final_stats, logit_stats
    from .live import forward

    rows = []
    for b in range(0, len(ids), batch):
        x = torch.from_numpy(ids[b:b + batch]).long()  # (B, T)
        resid, logits = forward(live, x)  # (L + 1, B, T, d), (B, T, vocab)
        B, T = x.shape
        z = logits.flatten(0, 1)  # (B * T, vocab)
        nxt = torch.cat([x[:, 1:], x[:, :1]], 1).flatten()  # the last position's target is unused
        final = final_stats(z)
        own = logit_stats(z, final, nxt, k=1)
        feats = {"final_entropy": own["entropy"].view(B, T), "final_top1_prob": own["top1_prob"].view(B, T),
                 "final_surprisal": own["ce"].view(B, T)[:, :-1]}
        top1 = []
        with torch.no_grad():
            for layer in layers:
                s = logit_stats(live.tuned(resid[layer].flatten(0, 1), layer), final, nxt, k=1)
                feats |= {f"kl_{layer}": s["kl"].view(B, T), f"entropy_{layer}": s["entropy"].view(B, T),
                          f"agree_{layer}": s["agree_top1"].view(B, T).double()}
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
    return pd.DataFrame(rows)


def feature_columns(cols, which: str) -> list[str]:
    final = [c for c in cols if c.startswith("final_")]
    return {"final": final, "trajectory": [c for c in cols if c not in final], "trajectory+final": list(cols)}[which]


def run(inputs, *, translator: str, anomaly_sequences: int, anomaly_tokens: int, anomaly_stride: int) -> None:
    """The rule's job (see pipeline.analyses): the model, the lens, the validation and test splits."""
    anomaly_detection(inputs.need("model_dir"), inputs.need("lens", kind=translator),
                      inputs.need("split", split="validation"), inputs.need("split"), inputs.analyses_dir,
                      anomaly_sequences=anomaly_sequences, anomaly_tokens=anomaly_tokens, anomaly_stride=anomaly_stride)


def anomaly_detection(model_dir: Path, lens_dir: Path, fit_split: Path, test_split: Path, out_dir: Path, *,
                      anomaly_sequences: int, anomaly_tokens: int, anomaly_stride: int,
                      seed: int = 0) -> dict[str, pd.DataFrame]:
    """Write anomaly_detection.parquet (AUROC per type and feature set), anomaly_scores.parquet
    (per window) and anomaly_detection.png."""
    from ..corpus import load_split
    from .live import load_live, tokenizer

    live, tok = load_live(model_dir, lens_dir), tokenizer(model_dir)
    val, test = load_split(fit_split).tokens, load_split(test_split).tokens
    length = min(anomaly_tokens, val.shape[1], test.shape[1])
    texts = make_texts(tok, val, test, anomaly_sequences, length, seed)
    layers = [layer for layer in live.tuned.layers[::anomaly_stride]]
    feats = {g: sequence_features(live, ids, layers) for g, ids in texts.items()}
    rows, scores = [], []
    for which in FEATURE_SETS:
        cols = feature_columns(feats["fit"].columns, which)
        s = {g: detector_scores(feats["fit"][cols].to_numpy(), f[cols].to_numpy(), seed) for g, f in feats.items()}
        for g, v in s.items():
            scores.append(pd.DataFrame({"group": g, "features": which, "sequence": np.arange(len(v)), "score": v}))
        for t in TYPES:
            auc, lo, hi = auroc_ci(s["normal"], s[t], seed=seed)
            rows.append({"anomaly": t, "features": which, "auroc": auc, "auroc_lo": lo, "auroc_hi": hi,
                         "n_normal": len(s["normal"]), "n_anomalous": len(s[t]), "n_fit": len(s["fit"]),
                         "n_features": len(cols), "window_tokens": length, "translator": live.tuned.kind})
    long = pd.concat([f.assign(group=g, sequence=np.arange(len(f))) for g, f in feats.items()], ignore_index=True)
    tables = {"anomaly_detection": pd.DataFrame(rows), "anomaly_scores": pd.concat(scores, ignore_index=True)}
    prov = {"analysis": "anomaly_detection", "model_dir": str(model_dir), "lens": str(lens_dir),
            "fit_split": str(fit_split), "test_split": str(test_split), "layers": layers, "seed": seed,
            "code_modules": list(CODE_MODULES), "injections": str(INJECTIONS), "detector": "IsolationForest(200)"}
    for name, t in tables.items():
        write_table_df(t, Path(out_dir) / f"{name}.parquet", prov)
    plot_anomalies(tables["anomaly_detection"], long, layers, Path(out_dir) / "anomaly_detection.png")
    return tables


def plot_anomalies(df: pd.DataFrame, feats: pd.DataFrame, layers: list[int], path: Path) -> None:
    fig, axes = figure(1, 2, (15, 4.8))
    width = 0.8 / len(FEATURE_SETS)
    for i, which in enumerate(FEATURE_SETS):
        g = df[df.features == which].set_index("anomaly").reindex(list(TYPES))
        x = np.arange(len(TYPES)) + i * width
        axes[0].bar(x, g.auroc, width=width, label=which,
                    yerr=[g.auroc - g.auroc_lo, g.auroc_hi - g.auroc], capsize=3)
    axes[0].axhline(0.5, color="grey", ls=":", lw=1)
    axes[0].set_xticks(np.arange(len(TYPES)) + width, TYPES)
    axes[0].set(ylim=(0, 1.02), ylabel="AUROC vs normal test windows (95% CI)",
                title="IsolationForest on each feature set")
    for g, f in feats.groupby("group", sort=False):
        if g != "fit":
            axes[1].plot(layers, [f[f"kl_{layer}_mean"].mean() for layer in layers], marker="o", ms=3, label=g)
    axes[1].set(yscale="log", xlabel="layer", ylabel="mean tuned-lens KL to the final layer [nats]",
                title="trajectories by kind of text")
    save(fig, path, axes)


def summary(df: pd.DataFrame, scores: pd.DataFrame) -> str:
    parts = []
    for t in TYPES:
        g = df[df.anomaly == t].set_index("features")
        parts.append(f"{t} " + ", ".join(f"{w} {g.auroc[w]:.2f} [{g.auroc_lo[w]:.2f}, {g.auroc_hi[w]:.2f}]"
                                        for w in FEATURE_SETS))
    r = df.iloc[0]
    return (f"AUROC (95% CI) of an IsolationForest fitted on {r.n_fit} normal windows of {r.window_tokens} tokens, "
            f"{r.n_normal} normal vs {r.n_anomalous} anomalous test windows: " + "; ".join(parts) + ".")
