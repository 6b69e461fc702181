"""The rest of a forward pass from any residual index: what an intervention at a layer costs.

An analysis that changes the residual stream at index ``l`` (skipping a block, ablating a
direction) only needs blocks ``l..n_layers-1`` and the head to run again: the blocks before
``l`` see nothing of it. ``Resumable`` runs the model once on a batch, keeping the
residual stream and, for every block, the inputs it got besides the hidden state (position
embeddings, attention masks, the cache position: whatever the family passes); ``logits_from``
then replays blocks ``l..`` with those same inputs on a new hidden state. This is the
model's own computation (the same modules, the same arguments), so from an unchanged
state it gives back the model's logits exactly (tested for every family of the unit
tests); it costs ``(n_layers - l)`` blocks and the head instead of the whole model, which
halves the block skipping of ``layer_contributions`` and the ablations of
``causal_fidelity`` on average.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModel
from .head import unembed_head
from .parts import find_parts
from .residual import _hidden_from, residual_stream


class Resumable:
    """One batch of a model, run once, that can be resumed from any residual index."""

    def __init__(self, model: nn.Module, input_ids: Tensor):
        self.parts = find_parts(model)
        self.head = unembed_head(model)
        self.calls: list[tuple[tuple, dict]] = []

        def capture(_mod, args, kwargs):
            self.calls.append((args[1:], dict(kwargs)))  # everything but the hidden state

        handles = [b.register_forward_pre_hook(capture, with_kwargs=True) for b in self.parts.blocks]
        try:
            self.resid, self.logits = residual_stream(model, input_ids)  # (L+1, B, T, d), (B, T, vocab)
        finally:
            for h in handles:
                h.remove()
        if len(self.calls) != self.parts.n_layers:
            raise UnsupportedModel(f"blocks were called {len(self.calls)} times for {self.parts.n_layers} blocks")
        for _args, kwargs in self.calls:
            if "hidden_states" in kwargs:  # a family that passes the state by keyword
                raise UnsupportedModel("a block took its hidden state by keyword; cannot resume it")

    @property
    def n_layers(self) -> int:
        return self.parts.n_layers

    @torch.no_grad()
    def hidden_from(self, layer: int, h: Tensor) -> Tensor:
        """The last block's output (B, T, d) when the residual at index ``layer`` is ``h``
        (B, T, d) (``layer`` = n_layers: h itself)."""
        if not 0 <= layer <= self.n_layers:
            raise ValueError(f"residual index {layer} is not in 0..{self.n_layers}")
        dtype = self.parts.embed.weight.dtype
        h = h.to(dtype)
        for i in range(layer, self.n_layers):
            args, kwargs = self.calls[i]
            h = _hidden_from(self.parts.blocks[i](h, *args, **kwargs))
        return h

    @torch.no_grad()
    def logits_from(self, layer: int, h: Tensor) -> Tensor:
        """(B, T, vocab) float32 logits of the model whose residual at ``layer`` is ``h``."""
        return self.head(self.hidden_from(layer, h)).float()
