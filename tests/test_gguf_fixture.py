"""Self-check of tests/gguf_fixture.py: transformers' GGUF loader must rebuild exactly the model
and tokenizer the fixture wrote (same logits, same token ids), from one llama.cpp-style file."""

from __future__ import annotations

import hashlib

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

try:
    from tests.gguf_fixture import SPECIAL_TOKENS, write_tiny_llama_gguf
except ImportError:  # pytest's default rootdir-relative import puts tests/ itself on sys.path
    from gguf_fixture import SPECIAL_TOKENS, write_tiny_llama_gguf

GGUF_NAME = "tiny-llama.gguf"
SENTENCES = [
    "To be, or not to be, that is the question!",
    "  Unseen wörds & numbers 31415 ... <|im_start|>user\nhi there<|im_end|>\n",
]


def _load(directory):
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)
    return model.eval(), tokenizer


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gguf_roundtrip_matches_original(tmp_path, tied):
    original, original_tok = write_tiny_llama_gguf(tmp_path / GGUF_NAME, seed=0, tie_word_embeddings=tied)
    loaded, loaded_tok = _load(tmp_path)

    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in loaded.parameters()) < 1_000_000
    assert loaded.config.tie_word_embeddings is tied
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert getattr(loaded.config, key) == getattr(original.config, key), key
    assert loaded.config.rope_parameters["rope_theta"] == original.config.rope_parameters["rope_theta"]

    # every weight comes back bit-exact (q/k permutation undone), so the logits do too
    original_state, loaded_state = original.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for name, tensor in original_state.items():
        torch.testing.assert_close(loaded_state[name], tensor, rtol=0, atol=0, msg=name)

    batch = original_tok(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = original(**batch).logits
        actual = loaded(**batch).logits
    assert expected.dtype == actual.dtype == torch.float32
    assert expected.abs().mean() > 0.1  # not a degenerate all-zero model
    torch.testing.assert_close(actual, expected)


def test_gguf_tokenizer_roundtrip(tmp_path):
    _, original_tok = write_tiny_llama_gguf(tmp_path / GGUF_NAME)
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=GGUF_NAME)

    assert len(loaded_tok) == len(original_tok)
    assert loaded_tok.get_vocab() == original_tok.get_vocab()
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(loaded_tok, attr) == getattr(original_tok, attr), attr
    assert loaded_tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2]
    assert loaded_tok.chat_template == original_tok.chat_template
    for text in SENTENCES:
        ids = original_tok(text).input_ids
        assert loaded_tok(text).input_ids == ids  # no BOS added, special tokens kept whole
        assert ids.count(1) == text.count("<|im_start|>")
        assert loaded_tok.decode(ids) == text


def test_gguf_file_is_deterministic_and_llamacpp_shaped(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_tiny_llama_gguf(a, seed=0)
    write_tiny_llama_gguf(b, seed=0)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    write_tiny_llama_gguf(c := tmp_path / "c.gguf", seed=1)
    assert a.read_bytes() != c.read_bytes()

    reader = gguf.GGUFReader(a)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.tokens"][:3] == SPECIAL_TOKENS
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert (
        fields["llama.rope.dimension_count"] == fields["llama.embedding_length"] // fields["llama.attention.head_count"]
    )
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    assert "output.weight" not in names  # tied
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
