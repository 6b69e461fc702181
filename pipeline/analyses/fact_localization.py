"""Fact localization (seed: "Knowledge Localization: precisely locate where factual
information becomes accessible").

The project ships two sets of factual prompts with one-token answers (``FACT_SETS``):
``statements`` (``data/facts.tsv``: short statements, "The capital of France is", that an
instruction-tuned model completes) and ``cloze`` (``data/cloze.tsv``: encyclopedic sentence
openings, "Paris is the capital and most populous city of", that a base model completes).
The model runs on each prompt (prompts are not in the cache), preceded by its corpus's
separator token as every cached document is (Gemma-3 without its BOS answers almost
nothing), and only the prompts whose answer the model itself ranks first at its output are
kept: a lens cannot localise a fact the model does not state; the others are counted and
their reason recorded. For each kept prompt and each lens, at every layer: the answer's
rank and probability after the prompt's last token, and the first layer at which the
answer is the lens's top-1 (``depth_top1``) and within its top 5 (``depth_top5``);
``n_layers`` = only at the model's output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import LenspipeError
from ..plots import figure, save
from ..tables import write_table_df
from .findings import Finding, mean_finding, write_findings

#: The effect this analysis must be able to detect, and the sample size that gives it
#: (the report prints it beside the findings).
POWER = (
    "Power. The question is whether the tuned lens finds a fact's answer earlier than the logit lens: "
    "per kept prompt, the first top-1 layer of the logit lens minus that of the tuned lens, averaged, "
    "with a bootstrap CI over prompts (null 0), per fact set. The per-prompt difference has an SD of "
    "about 4 layers on SmolLM2, so 50 kept prompts give a half-width of about 1 layer, enough to "
    "resolve the ~4-layer difference measured; each set has about 100 prompts (99 and 126) so that a "
    "model keeping half of them has about 50 (Gemma-3-270M keeps 5 of the statements without its BOS "
    "token; with it, about half of them and nearly all of the cloze set)."
)


FACTS = Path(__file__).parent / "data" / "facts.tsv"
CLOZE = Path(__file__).parent / "data" / "cloze.tsv"
#: The fact sets every model is asked, by name (the ``fact_set`` column).
FACT_SETS = {"statements": FACTS, "cloze": CLOZE}
TOP_K = 5


def load_fact_sets(sets: dict[str, Path] | None = None) -> pd.DataFrame:
    """(fact_set, fact, category, prompt, answer) rows of every set; ``fact`` numbers the
    prompts of all sets together."""
    df = pd.concat([load_facts(p).assign(fact_set=name) for name, p in (sets or FACT_SETS).items()], ignore_index=True)
    return df.assign(fact=np.arange(len(df)))[["fact_set", "fact", "category", "prompt", "answer"]]


def load_facts(path: Path = FACTS) -> pd.DataFrame:
    """(fact, category, prompt, answer) rows of a ``category<TAB>prompt<TAB>answer`` file."""
    rows = [
        line.rstrip("\n").split("\t")
        for line in Path(path).read_text().splitlines(True)
        if line.strip() and not line.startswith("#")
    ]
    bad = [r for r in rows if len(r) != 3 or not all(r)]
    if bad:
        raise LenspipeError(f"{path}: each line must be category<TAB>prompt<TAB>answer; got {bad[0]}")
    df = pd.DataFrame(rows, columns=["category", "prompt", "answer"])
    return df.assign(fact=np.arange(len(df)))[["fact", "category", "prompt", "answer"]]


def first_layer(rank: np.ndarray, k: int) -> np.ndarray:
    """rank (n_layers, n) 0-based answer ranks at lens layers 0..n_layers-1 -> (n,) the first
    layer where rank < k; n_layers where there is none (the answer only at the output)."""
    hit = rank < k  # (n_layers, n)
    return np.where(hit.any(0), hit.argmax(0), rank.shape[0])


def answer_ids(tok, answers: pd.Series) -> np.ndarray:
    """(n,) the token id of ' answer', or -1 where it is not exactly one token."""
    ids = [tok(" " + a, add_special_tokens=False)["input_ids"] for a in answers]
    return np.array([i[0] if len(i) == 1 else -1 for i in ids], dtype=np.int64)


def prompt_states(live, tok, prompts: list[str], separator: int | None = None):
    """The residual stream after each prompt's last token (n, n_layers + 1, d_model) and the
    model's log-probabilities there (n, vocab); one forward per prompt (no padding), the
    prompt preceded by the corpus's ``separator`` token."""
    import torch

    from ..metrics import log_probs
    from .live import forward, text_ids

    states, logp = [], []
    for p in prompts:
        ids = torch.tensor([text_ids(tok, p, separator)])  # (1, pos)
        resid, logits = forward(live, ids)  # (L + 1, 1, pos, d), (1, pos, vocab)
        states.append(resid[:, 0, -1])
        logp.append(log_probs(logits[0, -1:])[0])
    return torch.stack(states), torch.stack(logp)


def lens_ranks(live, states, answers) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(lens, translator) -> (rank, prob), each (n_layers, n): the answer at every lens layer."""
    import torch

    from ..metrics import log_probs, rank_of

    missing = sorted(set(range(live.n_layers)) - set(live.tuned.layers))
    if missing:
        raise LenspipeError(f"fact localization needs the tuned lens on every layer; it lacks {missing}")
    ans = torch.tensor(np.asarray(answers, dtype=np.int64))  # (n,) a copy: pandas arrays are read-only
    out = {}
    with torch.no_grad():
        for key, lens in live.lenses.items():
            rank, prob = [], []
            for layer in range(live.n_layers):
                logp = log_probs(lens(states[:, layer], layer))  # (n, vocab)
                rank.append(rank_of(logp, ans).numpy())
                prob.append(logp.gather(-1, ans[:, None])[:, 0].exp().numpy())
            out[key] = (np.stack(rank), np.stack(prob))
    return out


def run(artifacts, *, translator: str) -> None:
    """The rule's job (see pipeline.analyses): the model, the analysed lens and the evaluated
    split (for its separator token)."""
    fact_localization(
        artifacts.need("model_dir"),
        artifacts.need("lens", kind=translator),
        artifacts.need("split"),
        artifacts.analyses_dir,
    )


def fact_localization(
    model_dir: Path, lens_dir: Path, split: Path | None, out_dir: Path, sets: dict[str, Path] | None = None
) -> dict[str, pd.DataFrame]:
    """Write fact_prompts, fact_layers, fact_depths, fact_localization_findings (.parquet)
    and fact_localization.png; prompts get the separator token of ``split``'s corpus."""
    import torch

    from ..corpus import split_separator
    from .live import load_live, tokenizer

    live, tok, df = load_live(model_dir, lens_dir), tokenizer(model_dir), load_fact_sets(sets)
    separator = split_separator(split) if split is not None else None
    df["answer_id"] = answer_ids(tok, df.answer)
    states, logp = prompt_states(live, tok, df.prompt.tolist(), separator)
    top = logp.argmax(-1).numpy()
    df["model_top1"] = [tok.decode([int(t)]) for t in top]
    df["kept"] = (df.answer_id >= 0) & (top == df.answer_id.to_numpy())
    df["dropped"] = np.where(
        df.answer_id < 0, "answer is not one token", np.where(df.kept, "", "not the model's top-1")
    )
    kept = df[df.kept]
    layer_rows, depth_rows = [], []
    if len(kept):
        ranks = lens_ranks(live, states[torch.tensor(kept.index.to_list())], kept.answer_id.to_list())
        for (lens, tr), (rank, prob) in ranks.items():
            ident = {
                "fact_set": kept.fact_set.to_numpy(),
                "fact": kept.fact.to_numpy(),
                "category": kept.category.to_numpy(),
                "lens": lens,
                "translator": tr,
            }
            for layer in range(live.n_layers):
                layer_rows.append(pd.DataFrame(ident | {"layer": layer, "rank": rank[layer], "prob": prob[layer]}))
            depth_rows.append(
                pd.DataFrame(
                    ident | {"depth_top1": first_layer(rank, 1), f"depth_top{TOP_K}": first_layer(rank, TOP_K)}
                )
            )
    ident_types = {"fact_set": str, "fact": "int64", "category": str, "lens": str, "translator": str}
    layers = _concat(layer_rows, ident_types | {"layer": "int64", "rank": "int64", "prob": "float64"})
    depths = _concat(depth_rows, ident_types | {"depth_top1": "int64", f"depth_top{TOP_K}": "int64"})
    tables = {
        "fact_prompts": df.assign(n_layers=live.n_layers),
        "fact_layers": layers.assign(n_layers=live.n_layers),
        "fact_depths": depths.assign(n_layers=live.n_layers),
    }
    prov = {
        "analysis": "fact_localization",
        "model_dir": str(model_dir),
        "lens": str(lens_dir),
        "fact_sets": {k: str(v) for k, v in (sets or FACT_SETS).items()},
        "separator_id": separator,
        "n_prompts": len(df),
        "n_kept": int(df.kept.sum()),
        "dropped": df.dropped[~df.kept].value_counts().to_dict(),
    }
    for name, t in tables.items():
        write_table_df(t, Path(out_dir) / f"{name}.parquet", prov)
    write_findings(fact_findings(df, depths), out_dir, "fact_localization", prov)
    plot_facts(*tables.values(), Path(out_dir) / "fact_localization.png")
    return tables


def fact_findings(prompts: pd.DataFrame, depths: pd.DataFrame) -> list[Finding]:
    """Per fact set: the first top-1 layer, logit minus tuned lens, mean over kept prompts."""
    out = []
    for name in prompts.fact_set.unique():
        d = depths[depths.fact_set == name]
        wide = d.pivot_table(index="fact", columns="lens", values="depth_top1")
        if not {"logit", "tuned"} <= set(wide.columns):
            out.append(
                Finding(
                    f"{name}: first top-1 layer, logit lens minus tuned lens [layers]",
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    0.0,
                    0,
                    "kept prompts",
                )
            )
            continue
        n = int((prompts.fact_set == name).sum())
        out.append(
            mean_finding(
                f"{name}: first top-1 layer, logit lens minus tuned lens [layers]",
                (wide.logit - wide.tuned).to_numpy(),
                f"kept prompts (of {n})",
            )
        )
    return out


def _concat(parts: list[pd.DataFrame], dtypes: dict) -> pd.DataFrame:
    """The parts, or an empty table of the same columns (no prompt kept: tiny test models)."""
    return (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame({c: pd.Series(dtype=t) for c, t in dtypes.items()})
    )


def _name(lens: str, translator: str) -> str:
    return "logit lens" if lens == "logit" else f"tuned ({translator})"


def plot_facts(prompts: pd.DataFrame, layers: pd.DataFrame, depths: pd.DataFrame, path: Path) -> None:
    """One row of panels per fact set: first top-1/top-k layers, answer rank, answer probability."""
    n_layers = int(prompts.n_layers.iloc[0])
    sets = list(dict.fromkeys(prompts.fact_set))
    fig, axes = figure(len(sets), 3, (17, 4.8 * len(sets)))
    bins = np.arange(n_layers + 2) - 0.5
    for row, name in enumerate(sets):
        ax = axes[3 * row : 3 * row + 3]
        p, d, lay = (t[t.fact_set == name] for t in (prompts, depths, layers))
        for (lens, tr), g in d.groupby(["lens", "translator"]):
            ax[0].hist(g.depth_top1, bins=bins, alpha=0.5, label=f"{_name(lens, tr)}: top-1")
            ax[0].hist(
                g[f"depth_top{TOP_K}"], bins=bins, histtype="step", lw=2, label=f"{_name(lens, tr)}: top-{TOP_K}"
            )
        ax[0].set(
            xlabel=f"first layer with the answer at top-1 / top-{TOP_K} ({n_layers} = only the output)",
            ylabel="prompts",
            title=f"{name}: fact depth ({int(p.kept.sum())} of {len(p)} prompts kept)",
        )
        for (lens, tr), g in lay.groupby(["lens", "translator"]):
            q = g.groupby("layer")["rank"].quantile([0.25, 0.5, 0.75]).unstack()
            ax[1].plot(q.index, q[0.5] + 1, marker="o", ms=3, label=_name(lens, tr))
            ax[1].fill_between(q.index, q[0.25] + 1, q[0.75] + 1, alpha=0.2)
            m = g.groupby("layer").prob.mean()
            ax[2].plot(m.index, m, marker="o", ms=3, label=_name(lens, tr))
        ax[1].set(
            yscale="log", xlabel="layer", ylabel="answer rank (1 = top-1; median, IQR)", title=f"{name}: answer rank"
        )
        ax[2].set(xlabel="layer", ylabel="mean answer probability", title=f"{name}: answer probability")
        if not len(d):
            ax[0].text(0.5, 0.5, "no prompt's answer is the model's top-1", ha="center", transform=ax[0].transAxes)
    save(fig, path, axes)


def summary(prompts: pd.DataFrame, layers: pd.DataFrame, depths: pd.DataFrame) -> str:
    n_layers = int(prompts.n_layers.iloc[0])
    parts = []
    for name in dict.fromkeys(prompts.fact_set):
        p, d = prompts[prompts.fact_set == name], depths[depths.fact_set == name]
        kept, drops = int(p.kept.sum()), p.dropped[~p.kept].value_counts()
        text = (
            f"{name}: {kept} of {len(p)} prompts kept (the model's top-1 is the answer; dropped: "
            + (", ".join(f"{c} {r}" for r, c in drops.items()) or "none")
            + ")"
        )
        for (lens, tr), g in d.groupby(["lens", "translator"]):
            text += (
                f"; {_name(lens, tr)} median first top-1 layer {g.depth_top1.median():g}, top-{TOP_K} "
                f"{g[f'depth_top{TOP_K}'].median():g} of {n_layers} "
                f"({(g.depth_top1 < n_layers).mean():.0%} top-1 before the output)"
            )
        wide = d.pivot_table(index="fact", columns="lens", values="depth_top1")
        if {"logit", "tuned"} <= set(wide.columns):
            text += (
                f"; the tuned lens finds the answer earlier than the logit lens for "
                f"{int((wide.tuned < wide.logit).sum())} prompts, later for {int((wide.tuned > wide.logit).sum())}"
            )
        parts.append(text)
    return "; ".join(parts) + "."
