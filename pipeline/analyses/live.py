"""What the analyses that run the model on text outside the cache share: the model, its
unembedding head and the lenses, loaded once, and the lenses applied to a live forward.

A prompt, an injected instruction or another domain's text is not in the activation
store, so these analyses run the model themselves (``model.residual.residual_stream``: the same
hooks, layer convention and float32 residuals as extraction) and apply the lenses to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Live:
    """A loaded model with its head, the tuned lens analysed and the logit lens."""

    model: torch.nn.Module
    head: torch.nn.Module
    tuned: torch.nn.Module
    logit: torch.nn.Module
    n_layers: int

    @property
    def lenses(self) -> dict[tuple[str, str], torch.nn.Module]:
        """(lens, translator) -> lens, as the per-token table names them."""
        return {("logit", "none"): self.logit, ("tuned", self.tuned.kind): self.tuned}


def load_live(model_dir: Path, lens_dir: Path) -> Live:
    """The float32 model in eval mode, its head (shared with it) and both lenses."""
    from transformers import AutoModelForCausalLM

    from ..lens.tuned import LogitLens, TunedLens
    from ..model.head import unembed_head
    from ..model.parts import find_parts

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    head = unembed_head(model)
    tuned = TunedLens.load(lens_dir, head=head, model_dir=model_dir).eval()  # checks it fits the model
    return Live(model, head, tuned, LogitLens(head), find_parts(model).n_layers)


@torch.no_grad()
def forward(live: Live, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (batch, pos) -> (resid (n_layers + 1, batch, pos, d_model), logits (batch, pos, vocab))."""
    from ..model.residual import residual_stream

    return residual_stream(live.model, ids)


def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def text_ids(tok, text: str, separator: int | None) -> list[int]:
    """Token ids of text outside the cache as the model saw cached text: the corpus's
    separator token first (``corpus.split_separator``), then the text (no other specials)."""
    return ([separator] if separator is not None else []) + tok(text, add_special_tokens=False)["input_ids"]
