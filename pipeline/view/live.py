"""Trajectories for the explorer: every lens of a run at every layer (and attention position)
of a typed prompt, or of one stored held-out token read back from the store.

A model, its tokenizer and its lenses load once per run and stay loaded between
requests. The per-cell statistics come from ``metrics.fused.logit_stats`` (the evaluation's
exact KL, entropy and ranks), one layer of one lens at a time, so every pass over the
(pos, vocab) logits reads them from the cache; the top-5 tokens and their probabilities
are what a hover shows.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import paths
from ..errors import LenspipeError
from ..positions import ATTENTION, BLOCK

#: Longest prompt the explorer runs, in tokens (the separator token included) and characters.
MAX_PROMPT_TOKENS = 64
MAX_PROMPT_CHARS = 2000
TOP_K = 5


@dataclass
class RunLenses:
    """One run's model, its tokenizer, head and lenses, by name ("logit lens",
    "tuned (affine)", ...), loaded once and kept between requests."""

    model_dir: Path
    tokenizer: Any
    head: torch.nn.Module
    lenses: dict[str, torch.nn.Module]
    n_layers: int
    separator: int | None
    model: torch.nn.Module
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def has_attention(self) -> bool:
        return any(len(getattr(lens, "attention", ())) for lens in self.lenses.values())


def load_run(model_dir: Path, lens_dirs: dict[str, Path], separator: int | None) -> RunLenses:
    """The model's head and tokenizer, and the logit lens plus each trained lens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..lens.tuned import LogitLens, TunedLens
    from ..model.head import unembed_head
    from ..model.parts import find_parts

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    head = unembed_head(model)
    lenses = {"logit lens": LogitLens(head)}
    for kind, lens_dir in lens_dirs.items():
        lenses[f"tuned ({kind})"] = TunedLens.load(lens_dir, head=head, model_dir=model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return RunLenses(Path(model_dir), tok, head, lenses, find_parts(model).n_layers, separator, model)


def rows_of(run: RunLenses, with_attention: bool) -> list[tuple[str, int]]:
    """The heatmap's rows, bottom to top: (position, layer) in the order the residual
    stream passes them (block l's input, then inside block l after its attention)."""
    rows = []
    for layer in range(run.n_layers + 1):
        rows.append((BLOCK.name, layer))
        if with_attention and layer < run.n_layers:
            rows.append((ATTENTION.name, layer))
    return rows


@torch.no_grad()
def lens_grid(
    run: RunLenses, states: dict[tuple[str, int], torch.Tensor], next_ids: torch.Tensor
) -> dict[str, dict[str, Any]]:
    """Per lens, per row of ``states`` ((position, layer) -> (pos, d_model)): the top-1
    token and probability, entropy, KL to the model's output and the rank of the next token
    (``next_ids`` (pos,), -1 where unknown), and the top-5 tokens with their probabilities."""
    from ..metrics.fused import final_stats, logit_stats

    final = final_stats(run.head(states[(BLOCK.name, run.n_layers)]))  # (pos, vocab) model output
    known = next_ids >= 0
    targets = next_ids.clamp(min=0)
    decode = _decoder(run.tokenizer)
    out = {}
    for name, lens in run.lenses.items():
        grid = {"prob": [], "entropy": [], "kl": [], "rank": [], "top": []}
        for (position, layer), h in states.items():
            try:
                z = lens(h, layer, position)  # (pos, vocab)
            except LenspipeError:  # no translator here (an attention row, a layer group)
                for key in grid:
                    grid[key].append(None)
                continue
            s = logit_stats(z, final, targets, 1, with_rank=True)
            top = z.topk(TOP_K, dim=-1)  # (pos, k)
            p_top = (top.values - torch.logsumexp(z, -1, keepdim=True)).exp()
            for key, stat in (("prob", "top1_prob"), ("entropy", "entropy"), ("kl", "kl")):
                grid[key].append(_finite(s[stat]))
            grid["rank"].append(torch.where(known, s["rank"], -1).tolist())
            grid["top"].append(
                [
                    [[decode(i), round(p, 4)] for i, p in zip(ids, ps)]
                    for ids, ps in zip(top.indices.tolist(), p_top.tolist())
                ]
            )
        out[name] = grid
    return out


def _finite(values: torch.Tensor) -> list[float | None]:
    """JSON-safe values: NaN or infinite (a lens gone wrong) as None."""
    return [v if math.isfinite(v) else None for v in values.tolist()]


def _decoder(tokenizer):
    cache: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([i])
        return cache[i]

    return decode


@torch.no_grad()
def prompt_trajectory(run: RunLenses, prompt: str) -> dict[str, Any]:
    """Every lens on a typed prompt (preceded by the corpus's separator token, as every
    cached document is): the model runs once, each lens reads the same residual stream."""
    from ..analyses.live import text_ids
    from ..model.residual import residual_states

    ids = text_ids(run.tokenizer, prompt, run.separator)
    truncated = len(ids) > MAX_PROMPT_TOKENS
    ids = ids[:MAX_PROMPT_TOKENS]
    input_ids = torch.tensor([ids])  # (1, pos)
    positions = (BLOCK.name, ATTENTION.name) if run.has_attention else (BLOCK.name,)
    with run.lock:  # one forward at a time per model: torch already uses every core
        states, _ = residual_states(run.model, input_ids, positions=positions, with_logits=False)
        rows = rows_of(run, run.has_attention)
        by_row = {(pos, layer): states[pos][layer, 0] for pos, layer in rows}  # (pos, d_model) each
        next_ids = torch.tensor([*ids[1:], -1])
        grid = lens_grid(run, by_row, next_ids)
    decode = _decoder(run.tokenizer)
    rows_named = [_row_name(r) for r in rows]
    return {"inputs": [decode(i) for i in ids], "truncated": truncated, "rows": rows_named, "lenses": grid}


@torch.no_grad()
def stored_trajectory(run: RunLenses, store, index: int) -> dict[str, Any]:
    """Every lens on one stored token (its states read back from the store, no model run)."""
    if not 0 <= index < store.n_tokens:
        raise LenspipeError(f"token {index} is not in the store ({store.n_tokens} tokens)")
    with_attention = ATTENTION.name in store.positions and run.has_attention
    rows = rows_of(run, with_attention)
    states = store.states(rows, index, index + 1)  # (rows, 1, d_model)
    by_row = dict(zip(rows, states))
    same_seq = (index + 1) % store.seq_len != 0
    next_id = int(store.tokens(index + 1, index + 2)[0]) if same_seq else -1
    with run.lock:
        grid = lens_grid(run, by_row, torch.tensor([next_id]))
    decode = _decoder(run.tokenizer)
    return {
        "index": index,
        "token": decode(int(store.tokens(index, index + 1)[0])),
        "next": decode(next_id) if next_id >= 0 else None,
        "rows": [_row_name(r) for r in rows],
        "lenses": grid,
    }


def _row_name(row: tuple[str, int]) -> str:
    position, layer = row
    return str(layer) if position == BLOCK.name else f"{layer} attn"


def run_inputs(artifacts) -> tuple[Path, int | None]:
    """A run's model directory and its corpus's separator token (checked to exist)."""
    from ..corpus import split_separator

    model_dir = artifacts.need("model_dir")
    split = Path(artifacts.fill(paths.CORPUS_SPLIT))
    return model_dir, split_separator(split) if split.is_file() else None
