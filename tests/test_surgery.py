"""Model surgery on tiny random models of many Hugging Face families (no downloads)."""

from __future__ import annotations

import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub

import pytest
import safetensors
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny import FAMILIES, TIED, VOCAB, tiny_model
from torch import nn

from pipeline.errors import LenspipeError, ModelNotAvailable, UnsupportedModel
from pipeline.model.head import UnembedHead, load_unembed_head, unembed_head
from pipeline.model.parts import ModelParts, find_parts
from pipeline.model.residual import LAYER_CONVENTION, check_unembed, residual_stream
from pipeline.model.resume import Resumable


def inputs(batch: int = 2, pos: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, pos), generator=g)  # (batch, pos)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row exercises the attention mask
    return ids, mask


TIGHT = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_reproduces_model_logits(family):
    model = tiny_model(family)
    ids, mask = inputs()
    parts = find_parts(model)
    before = _hook_ids(parts.blocks)
    resid, logits = residual_stream(model, ids, mask)
    assert _hook_ids(parts.blocks) == before  # no hooks left behind
    assert resid.shape == (parts.n_layers + 1, 2, 7, parts.d_model)
    assert resid.dtype == torch.float32 and not resid.is_inference()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits  # (batch, pos, vocab)
        mine = unembed_head(model)(resid[parts.n_layers])
    assert logits.shape == (2, 7, parts.vocab)
    torch.testing.assert_close(logits, ref.float(), **TIGHT)
    torch.testing.assert_close(mine, ref, **TIGHT)
    assert check_unembed(model, resid, logits) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_are_block_inputs(family):
    model = tiny_model(family)
    parts = find_parts(model)
    ids, mask = inputs()
    resid, _ = residual_stream(model, ids, mask)
    # Independent capture: the input of every block, as that block received it.
    seen = {}
    handles = [
        b.register_forward_pre_hook(
            lambda _m, args, kwargs, i=i: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True,
        )
        for i, b in enumerate(parts.blocks)
    ]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    for i in range(parts.n_layers):
        torch.testing.assert_close(resid[i], seen[i], **TIGHT)
        # HF's hidden_states agree before the last block; its last entry is post-norm.
        torch.testing.assert_close(resid[i], out.hidden_states[i].float(), **TIGHT)


@pytest.mark.parametrize("family", FAMILIES)
def test_resuming_from_any_layer_is_the_model_itself(family):
    """From its own residual at index l, the rest of the forward pass gives back the model's
    logits bitwise; resuming at b + 1 from resid[b] is skipping block b, as a hook that
    replaces the block's output with its input does it."""
    model = tiny_model(family)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    r = Resumable(model, ids)
    for layer in range(r.n_layers + 1):
        assert torch.equal(r.logits_from(layer, r.resid[layer]), r.logits)

    def skip(_mod, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = find_parts(model).blocks[0].register_forward_hook(skip, with_kwargs=True)
    try:
        with torch.no_grad():
            skipped = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        handle.remove()
    torch.testing.assert_close(r.logits_from(1, r.resid[0]), skipped, rtol=0, atol=1e-5)
    assert not torch.equal(skipped, r.logits)  # skipping changed something


def test_resid0_includes_pre_block_processing():
    ids, mask = inputs()
    pos = torch.arange(ids.shape[1])
    with torch.no_grad():
        gpt2 = tiny_model("gpt2").transformer
        expect = {"gpt2": gpt2.wte(ids) + gpt2.wpe(pos)}  # positional embeddings added
        for family in ("gemma2", "gemma3"):
            gemma = tiny_model(family).model
            # Embedding scaling by sqrt(d_model) (inside the embedding module in transformers 5).
            expect[family] = nn.functional.embedding(ids, gemma.embed_tokens.weight) * math.sqrt(32)
        llama = tiny_model("llama").model
        expect["llama"] = llama.embed_tokens(ids)
    for family, want in expect.items():
        resid, _ = residual_stream(tiny_model(family), ids)
        torch.testing.assert_close(resid[0], want, **TIGHT)
    # OPT with word_embed_proj_dim != hidden_size: resid[0] is after project_in (width 32, not 16).
    resid, _ = residual_stream(tiny_model("opt_proj"), ids, mask)
    assert resid.shape[-1] == 32


def test_family_specific_parts():
    parts = find_parts(tiny_model("opt_proj"))
    assert parts.final_norm is None and parts.final_norm_name is None
    assert parts.projection_name == "model.decoder.project_out"
    assert parts.head_module_names == ["model.decoder.project_out", "lm_head"]
    assert find_parts(tiny_model("gpt2")).final_norm_name == "transformer.ln_f"
    assert find_parts(tiny_model("gpt_neox")).final_norm_name == "gpt_neox.final_layer_norm"
    assert find_parts(tiny_model("phi")).final_norm_name == "model.final_layernorm"
    assert find_parts(tiny_model("gemma2")).softcap == 2.0
    gemma3 = find_parts(tiny_model("gemma3"))
    assert (gemma3.final_norm_name, gemma3.unembed_name, gemma3.softcap, gemma3.tied) == (
        "model.norm",
        "lm_head",
        2.0,
        True,
    )
    assert find_parts(tiny_model("granite")).logit_scale == 0.25
    assert find_parts(tiny_model("cohere")).logit_scale == 3.0
    llama = find_parts(tiny_model("llama"))
    assert (llama.blocks_name, llama.final_norm_name, llama.unembed_name) == ("model.layers", "model.norm", "lm_head")
    assert (llama.n_layers, llama.d_model, llama.vocab) == (2, 32, VOCAB)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "granite", "cohere"])
def test_logit_postprocessing_matters(family):
    """Without the softcap / scale the head is wrong, so the tests above really check it."""
    model = tiny_model(family)
    resid, logits = residual_stream(model, inputs()[0])
    p = find_parts(model)
    bare = UnembedHead(p.final_norm, p.projection, p.unembed)
    with torch.no_grad():
        assert (bare(resid[-1]) - logits).abs().max() > 0.1
    with pytest.raises(UnsupportedModel, match="logit"):
        check_unembed(model, resid, logits * 1.5)


def test_gemma3_head_is_final_norm_tied_unembedding_and_softcap():
    """Gemma-3's quirks, spelled out: the head is the (1 + w) RMSNorm, the tied (unscaled)
    embedding matrix and the tanh softcap, and reproduces the model's logits bit for bit;
    the sandwich norms are inside the blocks, so the residual stream is left alone."""
    model = tiny_model("gemma3")
    cfg, inner = model.config, model.model
    assert cfg.model_type == "gemma3_text" and set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    for block in inner.layers:  # every norm weight is non-zero, so every norm counts
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            assert getattr(block, norm).weight.abs().min() > 0
    ids = inputs(2, 9)[0][:1]  # longer than the sliding window (4)
    resid, logits = residual_stream(model, ids)
    with torch.no_grad():
        ref = model(input_ids=ids).logits  # (1, pos, vocab)
        x = resid[-1]  # (1, pos, d_model), before the final norm
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * (1 + inner.norm.weight)
        raw = normed @ inner.embed_tokens.weight.T  # tied: the embedding matrix, without sqrt(d) scaling
        by_hand = torch.tanh(raw / 2.0) * 2.0
    torch.testing.assert_close(by_hand, ref, **TIGHT)
    assert torch.equal(unembed_head(model)(resid[-1]), ref)  # exact: the model's own modules and ops
    assert check_unembed(model, resid, logits) == 0.0
    # the last block's output is not yet normed: HF's last hidden state (post-norm) differs
    with torch.no_grad():
        hf_last = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert (hf_last - resid[-1]).abs().max() > 0.1


def _record_reads(monkeypatch) -> list[str]:
    """Patch safetensors.safe_open to record every tensor name read."""
    reads, real = [], safetensors.safe_open

    class Recording:
        def __init__(self, *a, **kw):
            self._f = real(*a, **kw)

        def __enter__(self):
            self._inner = self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_tensor(self, key):
            reads.append(key)
            return self._inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    return reads


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_load_unembed_head_matches(family, sharded, tmp_path, monkeypatch):
    model = tiny_model(family)
    model.save_pretrained(tmp_path, max_shard_size="50KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    if family in ("gpt2", "llama"):  # make sure both tied and untied checkpoints occur
        names = _checkpoint_names(tmp_path)
        assert ("lm_head.weight" in names) == (family not in TIED)
    reads = _record_reads(monkeypatch)
    head = load_unembed_head(tmp_path)
    # Only the head's tensors were read: never any block weight.
    blocks_name = find_parts(model).blocks_name
    assert reads and not any(".layers." in k or ".h." in k or blocks_name in k for k in reads)
    assert all(not t.is_meta and t.dtype == torch.float32 for t in head.state_dict().values())
    resid, _ = residual_stream(model, inputs()[0])
    with torch.no_grad():
        torch.testing.assert_close(head(resid[-1]), unembed_head(model)(resid[-1]), rtol=0, atol=0)


def _checkpoint_names(model_dir) -> set[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    return set(load_file(model_dir / "model.safetensors"))


def test_load_unembed_head_renamed_keys(tmp_path):
    """Checkpoint names that differ from module names are mapped as transformers loads them."""
    # A GPT-2 checkpoint saved from the bare base model (like the original hub one): no
    # "transformer." prefix and, tied, no lm_head.weight at all.
    model = tiny_model("gpt2")
    model.transformer.save_pretrained(tmp_path / "gpt2")
    assert "ln_f.weight" in _checkpoint_names(tmp_path / "gpt2")
    # GPT-NeoX checkpoints call the unembedding embed_out; the module is lm_head.
    tiny_model("gpt_neox").save_pretrained(tmp_path / "neox")
    assert "embed_out.weight" in _checkpoint_names(tmp_path / "neox")
    resid, _ = residual_stream(model, inputs()[0])
    with torch.no_grad():
        torch.testing.assert_close(
            load_unembed_head(tmp_path / "gpt2")(resid[-1]), unembed_head(model)(resid[-1]), rtol=0, atol=0
        )
    assert load_unembed_head(tmp_path / "neox").unembed.weight.shape == (VOCAB, 32)


def test_load_unembed_head_prefix_fallback(tmp_path, monkeypatch):
    """Without transformers' renaming machinery (transformers 4.x) the base prefix still resolves."""
    import sys

    model = tiny_model("gpt2")
    model.transformer.save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers.conversion_mapping", None)  # import fails
    resid, _ = residual_stream(model, inputs()[0])
    with torch.no_grad():
        torch.testing.assert_close(
            load_unembed_head(tmp_path)(resid[-1]), unembed_head(model)(resid[-1]), rtol=0, atol=0
        )


def test_load_unembed_head_dtype(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    head = load_unembed_head(tmp_path, dtype=torch.bfloat16)
    assert {t.dtype for t in head.state_dict().values()} == {torch.bfloat16}
    # Float32 residuals are accepted and cast to the head's dtype.
    assert head(torch.randn(3, 32)).shape == (3, VOCAB)


def test_load_unembed_head_errors(tmp_path):
    with pytest.raises(ModelNotAvailable):
        load_unembed_head(tmp_path / "nowhere")
    tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match="no \\*.safetensors"):
        load_unembed_head(tmp_path)
    tiny_model("llama").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModel, match="model.norm.weight is missing"):
        load_unembed_head(tmp_path)
    assert issubclass(UnsupportedModel, LenspipeError)


class _Config(transformers.PretrainedConfig):
    model_type = "toy"


class Toy(nn.Module):
    """A model lacking some of the parts surgery needs."""

    def __init__(self, blocks=True, norm=True, head=True):
        super().__init__()
        self.config = _Config(num_hidden_layers=2, hidden_size=8)
        self.wte = nn.Embedding(10, 8)
        if blocks:
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        if norm:
            self.ln_f = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10) if head else None

    def get_input_embeddings(self):
        return self.wte

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize(
    ("kwargs", "missing"),
    [
        (dict(blocks=False), "transformer blocks"),
        (dict(norm=False), "final norm"),
        (dict(head=False), "output embedding"),
    ],
)
def test_unsupported_model_names_missing_part(kwargs, missing):
    with pytest.raises(UnsupportedModel, match=missing):
        find_parts(Toy(**kwargs))
    with pytest.raises(UnsupportedModel, match="config"):
        find_parts(nn.Sequential(nn.Linear(2, 2)))


def test_toy_model_parts_found():
    parts = find_parts(Toy())
    assert isinstance(parts, ModelParts)
    assert (parts.blocks_name, parts.final_norm_name, parts.unembed_name) == ("layers", "ln_f", "head")


def _hook_ids(blocks) -> list[set]:
    # transformers installs its own permanent hooks once output_hidden_states is used,
    # so compare the hook sets rather than expect none.
    return [set(b._forward_hooks) | set(b._forward_pre_hooks) for b in blocks]


def test_hooks_removed_on_exception():
    model = tiny_model("llama")
    before = _hook_ids(find_parts(model).blocks)
    with pytest.raises(IndexError):
        residual_stream(model, torch.tensor([[VOCAB + 5]]))  # out-of-vocab id fails in the embedding
    assert _hook_ids(find_parts(model).blocks) == before


def test_layer_convention_text():
    assert isinstance(LAYER_CONVENTION, str)
    assert "BEFORE the final norm" in LAYER_CONVENTION and "n_layers + 1" in LAYER_CONVENTION
