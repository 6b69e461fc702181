"""Inside a block: the residual stream after its attention sublayer (the ``attention`` lens
position, :mod:`pipeline.positions`), captured during the model's own forward pass.

Block ``l`` computes ``h_{l+1} = h_l + A(h_l) + M(...)``: its attention sublayer adds ``A``
to the residual, its MLP sublayer adds ``M``. The mid-block state is ``h_l + A(h_l)``, where
``A`` is what the block adds to the residual for its attention:

- the attention module's output (``self_attn``, ``attn``, ``attention``, ``self_attention``:
  :data:`ATTENTION_NAMES`), for pre-norm blocks (GPT-2, Llama, Qwen, Mistral, OPT-125m, ...);
- that output after the norm a sandwich-norm block applies to it before the add
  (``post_attention_layernorm`` in a block that also has a ``pre_feedforward_layernorm`` or
  ``post_feedforward_layernorm``: Gemma-2/3, Olmo-2), where in other families that name is
  the norm *before* the MLP, applied to the mid-block state itself (Llama);
- times the block's ``residual_multiplier`` where the config has one (Granite).

Sequential blocks compute this state themselves (the MLP reads it), and ``h + A`` here is
the same addition of the same operands, so it is bitwise the model's own. Parallel blocks
(GPT-J, GPT-NeoX with ``use_parallel_residual``, Falcon with ``parallel_attn`` or
``new_decoder_architecture``, Phi, Cohere) feed both sublayers the block input and add both
outputs at once: there ``h + A`` is the residual plus the attention output alone, as if the
MLP came after it, a state the model never holds.

The capture is found from the block's structure, not from a list of classes, and guarded at
run time the way ``residual.check_unembed`` guards the head: on the first batch every
block's output must equal the mid-block state plus the block's MLP contribution (the
``mlp``/``feed_forward``/``ffn``/``fc2`` output, after a ``post_feedforward_layernorm``, times the
residual multiplier) to float tolerance (:meth:`MidBlockCapture.verify`). A block with a
norm after its residual adds (OPT with ``do_layer_norm_before=False``, i.e. opt-350m) has no
such state and is refused, as is any block the guard does not confirm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModel

#: Names under which blocks hold their attention sublayer.
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
#: The norm of a sandwich-norm block applied to the attention output before the add ...
ATTENTION_OUT_NORMS = ("post_attention_layernorm",)
#: ... which is one only in a block that also has one of these (in Llama the same name is
#: the norm applied to the mid-block state before the MLP).
SANDWICH_MARKERS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
#: Names of the MLP sublayer (``fc2``: OPT's MLP is inline in the block, fc2 its last layer),
#: and of the norm a sandwich block applies to its output; for the run-time guard only.
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "fc2")
MLP_OUT_NORMS = ("post_feedforward_layernorm",)


@dataclass(frozen=True)
class Sublayers:
    """The modules of one block whose outputs are its two contributions to the residual."""

    attention: str
    """Dotted name (in the block) of the module whose output is the attention's contribution."""
    mlp: str | None
    """Dotted name of the module whose output is the MLP's contribution (None: not found)."""
    multiplier: float | None
    """The block's residual multiplier (Granite), applied to both outputs before the add."""


def _child(block: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(block, n, None), nn.Module)), None)


def find_sublayers(block: nn.Module, config) -> Sublayers:
    """The attention (and MLP) contributions of a block, found by structure."""
    if getattr(config, "do_layer_norm_before", True) is False:
        raise UnsupportedModel(
            f"{type(block).__name__} is a post-norm block (do_layer_norm_before=False, as opt-350m): a norm "
            "follows each residual add, so there is no residual state between attention and MLP that the "
            "next sublayer adds to; extract this model with extract.positions [block]"
        )
    attention = _child(block, ATTENTION_NAMES)
    if attention is None:
        raise UnsupportedModel(
            f"{type(block).__name__} has no attention sublayer lenspipe recognises (looked for "
            f"{', '.join(ATTENTION_NAMES)}); extract this model with extract.positions [block]"
        )
    sandwich = _child(block, SANDWICH_MARKERS) is not None
    out_norm = _child(block, ATTENTION_OUT_NORMS) if sandwich else None
    mlp = _child(block, MLP_OUT_NORMS) if sandwich else None
    mlp = mlp or _child(block, MLP_NAMES)
    multiplier = getattr(config, "residual_multiplier", None)
    return Sublayers(out_norm or attention, mlp, None if multiplier in (None, 1, 1.0) else float(multiplier))


def _output(out) -> Tensor:
    """A module's hidden-state output: some return a tensor, others a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


class MidBlockCapture:
    """Hooks on every block that capture its mid-block state during one forward pass.

    Use as a context manager around the forward pass; then :meth:`states` gives
    (n_layers, batch, pos, d_model) float32. With ``verify``, the MLP contributions are
    captured too, for :meth:`verify` (the first batch of a run: one batch of extra memory).
    """

    def __init__(self, blocks: nn.ModuleList, config, verify: bool = False):
        self.blocks = blocks
        self.sublayers = [find_sublayers(b, config) for b in blocks]
        self.verifying = verify
        self._inputs: list[Tensor | None] = [None] * len(blocks)
        self._mid: list[list[Tensor]] = [[] for _ in blocks]
        self._mlp: list[list[Tensor]] = [[] for _ in blocks]
        self._handles: list = []

    def describe(self) -> dict[str, object]:
        """Which modules give the contributions (the store's provenance)."""
        s = self.sublayers[0]
        return {"attention_output": s.attention, "mlp_output": s.mlp, "residual_multiplier": s.multiplier}

    def _scaled(self, i: int, out) -> Tensor:
        a = _output(out)  # (batch, pos, d_model)
        m = self.sublayers[i].multiplier
        return a if m is None else a * m  # the block's own `hidden_states * self.residual_multiplier`

    def __enter__(self) -> MidBlockCapture:
        for i, (block, sub) in enumerate(zip(self.blocks, self.sublayers)):
            self._handles.append(block.register_forward_pre_hook(self._block_input(i), with_kwargs=True))
            self._handles.append(block.get_submodule(sub.attention).register_forward_hook(self._attention_done(i)))
            if self.verifying and sub.mlp is not None:
                self._handles.append(block.get_submodule(sub.mlp).register_forward_hook(self._mlp_done(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _block_input(self, i: int):
        def hook(_mod, args, kwargs):
            self._inputs[i] = args[0] if args else kwargs["hidden_states"]  # (batch, pos, d_model)

        return hook

    def _attention_done(self, i: int):
        def hook(_mod, _args, out):
            # h + A in the model's own dtype, as the block adds them; copied to float32 at
            # once (Falcon adds the attention output into the MLP's in place afterwards)
            mid = self._inputs[i] + self._scaled(i, out)  # (batch, pos, d_model)
            self._mid[i].append(mid.detach().to(torch.float32, copy=True))

        return hook

    def _mlp_done(self, i: int):
        def hook(_mod, _args, out):
            self._mlp[i].append(self._scaled(i, out).detach().to(torch.float32, copy=True))

        return hook

    def states(self) -> Tensor:
        """(n_layers, batch, pos, d_model) float32: each block's mid-block state."""
        calls = [len(m) for m in self._mid]
        if any(c != 1 for c in calls):
            raise UnsupportedModel(
                f"the attention sublayers did not each run exactly once per block "
                f"(calls per block: {calls}); the attention position is not defined here"
            )
        return torch.stack([m[0] for m in self._mid])

    def verify(self, resid: Tensor, model_name: str, dtype: torch.dtype) -> float:
        """Check every block: output == mid-block state + MLP contribution, to the rounding
        of ``dtype``, relative to the largest |output| of the block; returns the largest
        relative error. ``resid`` (n_layers + 1, batch, pos, d_model) float32, the block states."""
        mid = self.states()  # (L, B, T, d)
        if any(len(m) != 1 for m in self._mlp):
            raise UnsupportedModel(
                f"cannot check the attention position of {model_name}: its blocks' MLP sublayer was not found "
                f"or did not run once (looked for {', '.join(MLP_NAMES)}); extract it with extract.positions [block]"
            )
        # (h + A) + M against the model's own sum: a few roundings of the output's magnitude
        tol = 64 * torch.finfo(dtype).eps
        worst = 0.0
        for i, m in enumerate(self._mlp):
            out = resid[i + 1]  # (B, T, d)
            mlp = m[0].reshape(out.shape)  # OPT's inline MLP runs on (B * T, d) rows
            err = (out - (mid[i] + mlp)).abs().max().item() / max(out.abs().max().item(), 1e-30)
            worst = max(worst, err)
            if not err <= tol:
                raise UnsupportedModel(
                    f"block {i} of {model_name}: its output is not the residual after its attention plus its "
                    f"MLP's output (relative error {err:.3g} > {tol:.3g}): the block does something after its "
                    "residual adds (a post-norm, a scaling) or has a sublayer lenspipe did not find, so the "
                    "attention position is not defined for it; extract it with extract.positions [block]"
                )
        return worst
