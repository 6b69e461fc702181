"""The attention position (the residual inside each block after its attention sublayer), per
family of tests/tiny.py, against a hand computation from the block's own modules."""

from __future__ import annotations

import inspect
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub

import pytest
import torch
from tiny import FAMILIES, VOCAB, tiny_model

from pipeline.errors import UnsupportedModel
from pipeline.model import sublayers
from pipeline.model.parts import find_parts
from pipeline.model.residual import residual_states, residual_stream
from pipeline.model.sublayers import find_sublayers

#: family -> (the norm before its attention or None, its attention, the norm after its
#: attention output before the add or None): how the block computes A, written out by hand.
HAND = {
    "gpt2": ("ln_1", "attn", None),
    "gptj": ("ln_1", "attn", None),
    "gpt_neox": ("input_layernorm", "attention", None),
    "gpt_neox_seq": ("input_layernorm", "attention", None),
    "falcon": ("input_layernorm", "self_attention", None),
    "falcon_seq": ("input_layernorm", "self_attention", None),
    "falcon_new": ("ln_attn", "self_attention", None),
    "olmo2": (None, "self_attn", "post_attention_layernorm"),
    "gemma2": ("input_layernorm", "self_attn", "post_attention_layernorm"),
    "gemma3": ("input_layernorm", "self_attn", "post_attention_layernorm"),
    "opt": ("self_attn_layer_norm", "self_attn", None),
    **{
        f: ("input_layernorm", "self_attn", None)
        for f in ("llama", "qwen2", "qwen3", "phi", "mistral", "granite", "cohere")
    },
}
#: Sequential families: the module of each block whose input is the mid-block state (the
#: MLP's pre-norm; Olmo-2 has none): the model's own tensor, which the capture must equal bitwise.
READS_MID = {
    "gpt2": "ln_2",
    "gpt_neox_seq": "post_attention_layernorm",
    "falcon_seq": "post_attention_layernorm",
    "llama": "post_attention_layernorm",
    "qwen2": "post_attention_layernorm",
    "qwen3": "post_attention_layernorm",
    "mistral": "post_attention_layernorm",
    "granite": "post_attention_layernorm",
    "gemma2": "pre_feedforward_layernorm",
    "gemma3": "pre_feedforward_layernorm",
    "opt": "final_layer_norm",
    "olmo2": "mlp",
}
PARALLEL = {"gpt_neox", "gptj", "falcon", "falcon_new", "phi", "cohere"}
REFUSED = {"opt_proj"}  # post-norm (do_layer_norm_before=False, as opt-350m)


def test_every_family_is_covered():
    assert set(FAMILIES) == set(HAND) | REFUSED
    assert set(HAND) == set(READS_MID) | PARALLEL


def _ids(batch: int = 2, pos: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(3))


def _block_calls(model, ids) -> list[tuple[tuple, dict]]:
    """Every block's (args, kwargs) of one forward pass: position embeddings, masks, ..."""
    calls = []
    blocks = find_parts(model).blocks
    handles = [
        b.register_forward_pre_hook(lambda _m, a, k: calls.append((a, dict(k))), with_kwargs=True) for b in blocks
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls


def _out(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _named(block, args: tuple, kwargs: dict) -> dict:
    """A block call's arguments by name, but the hidden state (GPT-2 passes its mask by position)."""
    sig = inspect.signature(block.forward)
    bound = sig.bind(*args, **kwargs).arguments
    first = next(iter(sig.parameters))
    extra = {k: v for k, v in bound.items() if sig.parameters[k].kind == inspect.Parameter.VAR_KEYWORD}
    named = {k: v for k, v in bound.items() if k != first and k not in extra}
    return named | next(iter(extra.values()), {})


@torch.no_grad()
def hand_mid(model, family: str, ids: torch.Tensor) -> torch.Tensor:
    """(n_layers, batch, pos, d) h + A for every block, calling its modules by hand."""
    in_norm, attn, out_norm = HAND[family]
    resid, _ = residual_stream(model, ids)  # (L+1, B, T, d)
    mids = []
    for i, (block, (args, kwargs)) in enumerate(zip(find_parts(model).blocks, _block_calls(model, ids))):
        h = resid[i]
        x = getattr(block, in_norm)(h) if in_norm else h
        a = _out(getattr(block, attn)(x, **_named(block, args, kwargs)))
        if out_norm:
            a = getattr(block, out_norm)(a)
        if family == "granite":
            a = a * block.residual_multiplier
        mids.append(h + a)
    return torch.stack(mids)


@pytest.mark.parametrize("family", sorted(HAND))
def test_attention_position_is_the_blocks_own_computation(family):
    model = tiny_model(family)
    ids = _ids()
    states, _ = residual_states(model, ids, positions=("block", "attention"), verify=True)
    parts = find_parts(model)
    assert states["attention"].shape == (parts.n_layers, 2, 7, parts.d_model)
    assert states["attention"].dtype == torch.float32 and not states["attention"].is_inference()
    # the same modules on the same inputs: the same bits
    assert torch.equal(states["attention"], hand_mid(model, family, ids))
    # block states as before
    assert torch.equal(states["block"], residual_stream(model, ids)[0])
    # and the attention position moves the state: neither the block's input nor its output
    assert not torch.equal(states["attention"], states["block"][:-1])
    assert not torch.equal(states["attention"], states["block"][1:])


@pytest.mark.parametrize("family", sorted(READS_MID))
def test_sequential_blocks_hold_that_state_themselves(family):
    """In a sequential block the MLP reads the mid-block state: the capture is that tensor."""
    model = tiny_model(family)
    ids = _ids()
    seen = []
    blocks = find_parts(model).blocks
    handles = [
        b.get_submodule(READS_MID[family]).register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].detach().clone())
        )
        for b in blocks
    ]
    try:
        states, _ = residual_states(model, ids, positions=("block", "attention"))
    finally:
        for h in handles:
            h.remove()
    mine = states["attention"].reshape(len(blocks), -1, states["attention"].shape[-1])
    assert all(torch.equal(m, s.reshape(m.shape)) for m, s in zip(mine, seen))  # OPT flattens (B*T, d)


@pytest.mark.parametrize("family", sorted(PARALLEL))
def test_parallel_blocks_add_the_mlp_to_it(family):
    """In a parallel block the state is the input plus the attention alone: the output is it
    plus the MLP, which read the block's input, not this state."""
    model = tiny_model(family)
    states, _ = residual_states(model, _ids(), positions=("block", "attention"), verify=True)
    assert find_sublayers(find_parts(model).blocks[0], model.config).mlp is not None


def test_post_norm_blocks_are_refused():
    model = tiny_model("opt_proj")
    with pytest.raises(UnsupportedModel, match="post-norm block.*opt-350m.*positions \\[block\\]"):
        residual_states(model, _ids(), positions=("block", "attention"))
    residual_states(model, _ids())  # block states only: as before


def test_guard_refuses_a_block_that_does_more_than_its_two_adds(monkeypatch):
    """An unknown family whose block scales its output after the adds: the first batch's
    check (output == mid + MLP) refuses it, naming the block; without the check the
    capture would have stored a state the block never meant."""
    model = tiny_model("llama")
    block = find_parts(model).blocks[1]
    forward = type(block).forward

    def scaled(self, *args, **kwargs):
        return forward(self, *args, **kwargs) * 1.01

    monkeypatch.setattr(block, "forward", scaled.__get__(block))
    with pytest.raises(
        UnsupportedModel,
        match="block 1 of LlamaForCausalLM: its output is not the residual after its attention plus its MLP",
    ):
        residual_states(model, _ids(), positions=("block", "attention"), verify=True)
    residual_states(model, _ids(), positions=("block", "attention"))  # unchecked: no error


def test_guard_refuses_a_block_without_an_mlp_it_can_find(monkeypatch):
    """A family whose MLP has a name lenspipe does not know cannot be checked: refused."""
    monkeypatch.setattr(sublayers, "MLP_NAMES", ("feedforward_unknown",))
    with pytest.raises(UnsupportedModel, match="MLP sublayer was not found"):
        residual_states(tiny_model("llama"), _ids(), positions=("block", "attention"), verify=True)
