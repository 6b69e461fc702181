"""Tiny models and tokenizers built from configs: no download, a few hundred KB at most."""

from __future__ import annotations

from pathlib import Path

import torch

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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXT.splitlines() * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                   pad_token="<|im_end|>")


def make_llama(vocab_size: int = 300, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
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
