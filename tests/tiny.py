"""Tiny models and tokenizers built from configs: no download, a few hundred KB at most."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers
from torch import nn

TEXT = """From fairest creatures we desire increase,
That thereby beauty's rose might never die,
But as the riper should by time decease,
His tender heir might bear his memory:
But thou, contracted to thine own bright eyes,
Feed'st thy light's flame with self-substantial fuel,
Making a famine where abundance lies,
Thyself thy foe, to thy sweet self too cruel.
Shall I compare thee to a summer's day? Thou art more lovely and more temperate.
"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MAX_PARAMS = 1_000_000


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few lines (like GPT-2's, but tiny)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT.splitlines() * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )


def make_llama(vocab_size: int = 300, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(LlamaConfig(**(kw | overrides))).eval()
    assert_tiny(model)
    return model


def assert_tiny(model) -> None:
    n = sum(p.numel() for p in model.parameters())
    assert n < MAX_PARAMS, f"test model has {n} parameters; unit tests must stay tiny"


def save_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """A saved tiny Llama + tokenizer, as a user's local model directory."""
    tok = make_tokenizer()
    model = make_llama(vocab_size=len(tok), seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# --------------------------------------------------------------------- many families

VOCAB = 199
BASE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
GQA = dict(BASE, num_key_value_heads=2)
FALCON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=VOCAB,
    alibi=False,
    new_decoder_architecture=False,
    bos_token_id=0,
    eos_token_id=0,
)

#: family -> (config class, kwargs). Each must build a causal LM with < 1M parameters.
FAMILIES = {
    "gpt2": (
        "GPT2Config",
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0),
    ),
    "gpt_neox": ("GPTNeoXConfig", dict(BASE)),  # use_parallel_residual=True (the default): parallel
    "gpt_neox_seq": ("GPTNeoXConfig", dict(BASE, use_parallel_residual=False)),
    # Parallel attention and MLP, both on one ln_1 of the block input.
    "gptj": (
        "GPTJConfig",
        dict(
            n_embd=32,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            rotary_dim=4,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    # Falcon three ways: parallel attention (one input norm), sequential, and the new decoder
    # architecture (parallel, separate ln_attn / ln_mlp, grouped kv heads).
    "falcon": ("FalconConfig", dict(FALCON, parallel_attn=True)),
    "falcon_seq": ("FalconConfig", dict(FALCON, parallel_attn=False)),
    "falcon_new": ("FalconConfig", dict(FALCON, new_decoder_architecture=True, num_kv_heads=2)),
    # Olmo-2: norms after attention and after the MLP (before each add), none before them.
    "olmo2": ("Olmo2Config", dict(GQA, bos_token_id=1, eos_token_id=2, pad_token_id=2)),
    "llama": ("LlamaConfig", dict(GQA)),
    "qwen2": ("Qwen2Config", dict(GQA, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(GQA, head_dim=8)),
    # A large init and a small cap so the tanh soft-capping changes the logits visibly.
    "gemma2": (
        "Gemma2Config",
        dict(
            GQA, num_hidden_layers=3, head_dim=8, sliding_window=4, final_logit_softcapping=2.0, initializer_range=0.5
        ),
    ),
    # Gemma-3 (text): sqrt(d_model)-scaled embeddings, sandwich norms (pre/post attention,
    # pre/post feed-forward) and q/k norms, all (1 + w) RMSNorms, a final norm, sliding and
    # full attention layers, and (not in the 270M checkpoint, but the config has it) a softcap.
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            GQA,
            num_hidden_layers=3,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=8,
            final_logit_softcapping=2.0,
            initializer_range=0.5,
        ),
    ),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
    ),
    # Like opt-350m: project_in/project_out around the blocks, and no final layer norm.
    "opt_proj": (
        "OPTConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
            do_layer_norm_before=False,
        ),
    ),
    "phi": ("PhiConfig", dict(BASE)),
    "mistral": ("MistralConfig", dict(GQA, sliding_window=4)),
    # divides the logits; scales what each sublayer adds to the residual
    "granite": ("GraniteConfig", dict(GQA, logits_scaling=4.0, residual_multiplier=0.7)),
    "cohere": ("CohereConfig", dict(GQA, logit_scale=3.0)),  # multiplies the logits
}
TIED = {"gpt2", "qwen2", "gemma2", "gemma3", "opt", "opt_proj", "cohere", "falcon", "falcon_seq", "falcon_new"}


@functools.cache
def tiny_model(family: str) -> nn.Module:
    cls_name, kwargs = FAMILIES[family]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    if family == "gemma3":
        # Gemma initialises its (1 + w) norm weights w at 0, i.e. plain RMSNorms; random w
        # makes every norm (final norm included) count, so a head that skipped one would fail.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0.0, 0.5)
    assert_tiny(model)
    return model.eval()


def save_prepared(model, path: Path) -> Path:
    """Save ``model`` as a prepared model dir (weights + lenspipe_model.json, no tokenizer)."""
    from pipeline.model.prepare import MARKER, weights_hash
    from pipeline.provenance import write_json_atomic

    model.save_pretrained(path)
    from pipeline.model.parts import find_parts

    parts = find_parts(model)
    write_json_atomic(
        path / MARKER,
        {
            "name": path.name,
            "source": "test",
            "model_type": model.config.model_type,
            "weights_sha256": weights_hash(path),
            "tokenizer_sha256": "none",
            "d_model": parts.d_model,
            "n_layers": parts.n_layers,
            "vocab": parts.vocab,
        },
    )
    return path


def write_packed_split(
    path: Path, n_seq: int, seq_len: int, vocab: int, seed: int = 0, *, n_docs: int = 1, varied_bytes: bool = False
) -> Path:
    """A packed split in prepare_corpus's format, with random tokens: ``n_docs`` documents
    of consecutive sequences (doc0, doc1, ...), each token 1 byte or (``varied_bytes``) 1-4."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (n_seq, seq_len), dtype=np.int32)
    ones = np.ones_like(tokens)
    nbytes = rng.integers(1, 5, tokens.shape, dtype=np.int32) if varied_bytes else ones
    doc_index = (np.arange(n_seq)[:, None] * n_docs // n_seq + 0 * ones).astype(np.int32)
    doc_ids = ["r"] if n_docs == 1 else [f"doc{i}" for i in range(n_docs)]
    meta = {
        "split": "test",
        "fingerprint": f"random-{seed}-{n_seq}-{seq_len}-{n_docs}-{varied_bytes}",
        "seq_len": seq_len,
        "n_seq": n_seq,
        "n_tokens": n_seq * seq_len,
        "n_bytes": int(nbytes.sum()),
        "doc_ids": doc_ids,
    }
    np.savez(
        path,
        tokens=tokens,
        token_bytes=nbytes,
        doc_index=doc_index,
        doc_pos=np.cumsum(ones, 1) - 1,
        meta=json.dumps(meta),
    )
    return path
