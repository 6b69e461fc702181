"""The residual stream of a causal LM by the one convention every stage shares
(``LAYER_CONVENTION``), at the block boundaries and, on request, inside each block after its
attention (``model.sublayers``); and the check that the unembedding head reproduces its logits.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModel
from ..positions import ATTENTION, BLOCK, DEFAULT
from .head import unembed_head
from .parts import find_parts, text_config
from .sublayers import MidBlockCapture

LAYER_CONVENTION = (
    "Residual stream index convention: resid has shape (n_layers + 1, batch, pos, d_model) "
    "and is float32, always taken BEFORE the final norm. Index 0 is the input to block 0, "
    "i.e. after everything the model does before its first block (token embedding, "
    "embedding scaling, positional embeddings, project_in, embedding norms). Index i "
    "(1 <= i <= n_layers) is the output hidden state of block i-1, so index n_layers is the "
    "output of the last block; applying the unembedding head (final norm -> projection -> "
    "unembed -> logit post-processing) to index n_layers reproduces the model's logits."
)


def _hidden_from(output) -> Tensor:
    """A block's hidden-state output: some families return a tensor, others a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def residual_stream(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *, with_logits: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Run the model once; return (resid (n_layers+1, batch, pos, d_model) float32, logits).

    See LAYER_CONVENTION. Hooks rather than output_hidden_states, because HF's last hidden
    state is taken after the final norm for most families. ``with_logits=False`` runs only
    the base model (no unembedding: ~20% of SmolLM2's forward FLOPs) and returns None logits;
    the logits stay reproducible from ``resid[n_layers]`` through the UnembedHead.
    """
    states, logits = residual_states(model, input_ids, attention_mask, with_logits=with_logits)
    return states[BLOCK.name], logits


def residual_states(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    positions: tuple[str, ...] | list[str] = DEFAULT,
    with_logits: bool = True,
    verify: bool = False,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """:func:`residual_stream` at every lens position of ``positions`` (``pipeline.positions``):
    {"block": (n_layers+1, batch, pos, d_model), "attention": (n_layers, batch, pos, d_model)},
    float32, and the logits. ``verify``: check that the attention position is what the blocks
    compute (:meth:`sublayers.MidBlockCapture.verify`; once per run, on its first batch)."""
    parts = find_parts(model)
    captured: list[list[Tensor]] = [[] for _ in range(parts.n_layers + 1)]

    def save(i: int, hidden: Tensor) -> None:
        # Copy: the model may later modify its hidden state in place.
        captured[i].append(hidden.detach().to(torch.float32, copy=True))

    def pre_hook(_mod, args, kwargs):
        save(0, args[0] if args else kwargs["hidden_states"])  # (batch, pos, d_model)

    mid = MidBlockCapture(parts.blocks, text_config(model), verify) if ATTENTION.name in positions else None
    handles = [parts.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    for i, block in enumerate(parts.blocks):
        handles.append(block.register_forward_hook(lambda _mod, _args, out, i=i: save(i + 1, _hidden_from(out))))
    try:
        device = parts.embed.weight.device  # where the first computation happens
        mask = attention_mask.to(device) if attention_mask is not None else None
        with torch.inference_mode(), mid or contextlib.nullcontext():
            runner = model if with_logits else getattr(model, "base_model", model)
            out = runner(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if any(len(c) != 1 for c in captured):
        counts = [len(c) for c in captured]
        raise UnsupportedModel(f"blocks did not each run exactly once (calls per index: {counts})")
    # Built outside inference mode so the results are ordinary tensors: inference tensors
    # cannot be saved for backward, which would break training a lens on them directly.
    states = {BLOCK.name: torch.stack([c[0] for c in captured])}  # (n_layers + 1, batch, pos, d_model)
    if mid is not None:
        if verify:
            mid.verify(states[BLOCK.name], type(model).__name__, parts.embed.weight.dtype)
        states[ATTENTION.name] = mid.states()  # (n_layers, batch, pos, d_model)
    if not with_logits:
        return states, None
    logits = out.logits if hasattr(out, "logits") else out[0]  # return_dict=False gives a tuple
    return states, logits.to(torch.float32, copy=True)  # (batch, pos, vocab)


def check_unembed(model: nn.Module, resid: Tensor, logits: Tensor, atol: float = 1e-3) -> float:
    """Verify that the head maps resid[-1] to the model's logits; return the max abs error.

    Guards families whose head does something ``model.parts`` does not know about.
    """
    with torch.inference_mode():
        head = unembed_head(model)
        device = head.unembed.weight.device
        mine = head(resid[-1].to(device)).float()  # (batch, pos, vocab)
    err = (mine - logits.to(device)).abs().max().item()
    if not math.isfinite(err) or err > atol * max(1.0, logits.abs().max().item()):
        raise UnsupportedModel(
            f"the unembedding head does not reproduce {type(model).__name__}'s logits "
            f"(max abs error {err:.3g}); this family applies an unknown logit transform"
        )
    return err
