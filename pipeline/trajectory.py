"""Prediction trajectories: a lens's top-1 token at every layer and position of a prompt.

The model runs once on the prompt (a prompt is not in the cache); every lens then reads the
same residual stream. Used by the report (a figure per prompt) and by ``lenspipe
trajectory`` (a text table of the next-token prediction per layer, and the figure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: Prompt tokens shown (a figure wider than this is unreadable).
MAX_TOKENS = 24


def trajectories(
    model_dir: Path, lens_dirs: dict[str, Path], prompt: str, separator: int | None = None
) -> dict[str, Any]:
    """Top-1 token and its probability per (layer, position) of ``prompt``, per lens:
    ``{"inputs": [token text], "lenses": {name: {"prob": (L+1, pos), "tokens": [[text]]}}}``.
    The prompt is preceded by ``separator`` (the corpus's, as every cached document is)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .lens.tuned import LogitLens, TunedLens
    from .model.head import unembed_head
    from .model.residual import residual_stream

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    from .analyses.live import text_ids

    ids = torch.tensor([text_ids(tok, prompt, separator)[:MAX_TOKENS]])  # (1, pos)
    head = unembed_head(model)
    lenses = {"logit lens": LogitLens(head)} | {
        f"tuned ({k})": TunedLens.load(p, head=head, model_dir=model_dir) for k, p in lens_dirs.items()
    }  # load checks the lens fits the model
    out = {"inputs": [tok.decode([i]) for i in ids[0]], "lenses": {}}
    with torch.no_grad():
        resid, _ = residual_stream(model, ids, with_logits=False)  # (L+1, 1, pos, d_model)
        for name, lens in lenses.items():
            probs = torch.stack(
                [torch.softmax(lens(resid[i, 0], i), -1) for i in range(resid.shape[0])]
            )  # (L+1, pos, V)
            p, top = probs.max(-1)  # (L+1, pos)
            out["lenses"][name] = {
                "prob": p.numpy(),
                "tokens": [[tok.decode([t]) for t in row] for row in top.tolist()],
            }
    return out


def plot_trajectory(traj: dict[str, Any], path: Path, prompt: str) -> None:
    from .plots import figure, save

    names = list(traj["lenses"])
    n_layers, n_pos = traj["lenses"][names[0]]["prob"].shape
    # one lens per row, so each panel gets the full width and the token labels stay legible
    fig, axes = figure(len(names), 1, (max(9, 0.95 * n_pos + 2), (0.3 * n_layers + 1.6) * len(names)))
    for ax, name in zip(axes, names):
        data = traj["lenses"][name]
        im = ax.imshow(data["prob"], aspect="auto", origin="lower", cmap="Blues", vmin=0, vmax=1)
        for (layer, pos), text in np.ndenumerate(np.array(data["tokens"], dtype=object)):
            shade = "white" if data["prob"][layer, pos] > 0.6 else "black"
            ax.text(pos, layer, repr(text)[1:-1][:8], ha="center", va="center", fontsize=7.5, color=shade)
        ax.set_xticks(range(n_pos), [repr(t)[1:-1][:10] for t in traj["inputs"]], rotation=60, fontsize=8)
        ax.set_yticks(range(0, n_layers, 2))
        ax.set(xlabel="input token", ylabel="layer", title=f"{name}: top-1 prediction")
        fig.colorbar(im, ax=ax, fraction=0.03, label="probability")
    save(fig, path, title=f"prediction trajectory: {prompt!r}")


def format_table(traj: dict[str, Any]) -> str:
    """The next-token prediction (top-1 after the prompt's last token) at each layer, per lens."""
    names = list(traj["lenses"])
    cells = {
        n: [(repr(row[-1]), float(p[-1])) for row, p in zip(d["tokens"], d["prob"])] for n, d in traj["lenses"].items()
    }
    width = {n: max(len(n), *(len(t) for t, _ in cells[n])) for n in names}
    n_rows = len(cells[names[0]])
    lines = [
        f"top-1 next token after {traj['inputs'][-1]!r} at each layer (probability); "
        f"layer {n_rows - 1} is the model's output",
        "layer  " + "  ".join(f"{n:<{width[n]}}      " for n in names),
    ]
    for layer in range(n_rows):
        lines.append(
            f"{layer:>5}  " + "  ".join(f"{cells[n][layer][0]:<{width[n]}} {cells[n][layer][1]:5.2f}" for n in names)
        )
    return "\n".join(line.rstrip() for line in lines)


def trajectory(
    model_dir: Path, lens_dirs: dict[str, Path], prompt: str, out: Path, separator: int | None = None
) -> str:
    """Write the figure of ``prompt`` to ``out``; return the text table."""
    traj = trajectories(model_dir, lens_dirs, prompt, separator)
    plot_trajectory(traj, out, prompt)
    return format_table(traj)
