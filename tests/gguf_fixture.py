"""A tiny Llama + byte-level BPE tokenizer written as ONE GGUF file, laid out like llama.cpp's
``convert_hf_to_gguf.py`` output for SmolLM2 (the embedded default model), so unit tests can drive
``from_pretrained(dir, gguf_file=name)`` without the real 93 MB checkpoint.

Usage::

    model, tokenizer = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)

The file is deterministic for a given ``seed`` (same bytes every time), about 0.4 MB, and takes well
under a second to build.

What the file holds, mirroring the real SmolLM2 GGUF key for key (only sizes and values differ):

* ``general.*``: architecture ``llama``, type ``model``, name, file_type 0 (ALL_F32),
  quantization_version 2.
* ``llama.*``: block_count, context_length, embedding_length, feed_forward_length,
  attention.head_count, attention.head_count_kv, rope.freq_base,
  attention.layer_norm_rms_epsilon, vocab_size, rope.dimension_count (= head_dim).
* ``tokenizer.ggml.*``: model ``gpt2``, pre ``smollm``, tokens, token_type (3 = CONTROL for the
  special tokens, 1 = NORMAL otherwise), merges (``"a b"`` strings in the byte-level alphabet),
  bos/eos/unknown/padding ids, add_bos_token False, add_space_prefix False;
  ``tokenizer.chat_template`` (ChatML).
* tensors, all F32, under llama.cpp's names (``token_embd.weight``, ``blk.N.attn_norm.weight``,
  ``blk.N.attn_q.weight``, ..., ``output_norm.weight``; ``output.weight`` only when untied), with
  ``attn_q``/``attn_k`` rows permuted the way llama.cpp does (transformers undoes it on load).
"""

from __future__ import annotations

import json
import pathlib

import gguf
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "TINY_LLAMA_KWARGS", "write_tiny_llama_gguf"]

# Same special tokens, ids and roles as SmolLM2-Instruct: unk=0, bos=1, eos=pad=2.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 2

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Shape of the tiny model. Floats are float32-exact, because the GGUF stores them as float32 and
# the loaded config would otherwise differ from the original in the last digits.
TINY_LLAMA_KWARGS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=float(np.float32(1e-5)),
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    hidden_act="silu",
)

_VOCAB_SIZE = 320  # 3 special + 256 byte symbols + 61 merges

_CORPUS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die: to sleep;",
    "All the world's a stage, and all the men and women merely players;",
    "They have their exits and their entrances; and one man in his time plays many parts.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
]


def _train_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE shaped like GPT-2's/SmolLM2's (ByteLevel pre-tokenizer with the GPT-2 regex,
    no prefix space, ByteLevel decoder, no BOS added), which is exactly what transformers rebuilds
    from a ``tokenizer.ggml.model = gpt2`` GGUF with a pre-tokenizer it has no special regex for."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=SPECIAL_TOKENS[UNK_ID],
        bos_token=SPECIAL_TOKENS[BOS_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        pad_token=SPECIAL_TOKENS[PAD_ID],
        chat_template=CHAT_TEMPLATE,
    )


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: HF stores each head's rotary dims as two halves
    ``[x0..x(d/2-1), y0..y(d/2-1)]``, GGML's rope wants them interleaved ``[x0, y0, x1, y1, ...]``.
    ``n_head`` is the number of heads the rows are split into (kv heads for ``attn_k``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _randomize_(model: transformers.LlamaForCausalLM, seed: int) -> None:
    """Weights from a private generator (global RNG untouched), large enough that a wrong q/k
    permutation or a mixed-up tensor changes the logits visibly; norm weights around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied lm_head appears once, as embed_tokens
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.2 * noise)


def write_tiny_llama_gguf(
    path: pathlib.Path, *, seed: int = 0, tie_word_embeddings: bool = True
) -> tuple[transformers.LlamaForCausalLM, transformers.PreTrainedTokenizerFast]:
    """Write a tiny random Llama and its byte-level BPE tokenizer into one GGUF file at ``path``,
    laid out as llama.cpp's converter would, and return the original model (float32, eval mode)
    and tokenizer, for comparing against what transformers' GGUF loader rebuilds.

    Model: hidden 64, 2 layers, 4 heads / 2 kv heads (head_dim 16), ffn 128, vocab 320,
    tied embeddings by default (~95k parameters). Tokenizer: byte-level BPE trained on a few lines,
    with ``<|endoftext|>`` (0, unk), ``<|im_start|>`` (1, bos), ``<|im_end|>`` (2, eos and pad).
    """
    path = pathlib.Path(path)
    tokenizer = _train_tokenizer()
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = backend["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "token ids must be dense"
    assert tokens[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    special = set(SPECIAL_TOKENS)
    token_types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]

    config = transformers.LlamaConfig(
        vocab_size=len(tokens),
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        **TINY_LLAMA_KWARGS,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    _randomize_(model, seed)
    model.eval()

    n_head = config.num_attention_heads
    n_head_kv = config.num_key_value_heads
    head_dim = config.hidden_size // n_head
    n_layer = config.num_hidden_layers

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    # general.* (GGUFWriter.__init__ already wrote general.architecture)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("Tiny Llama Fixture")
    writer.add_size_label("95K")
    # llama.* (the order llama.cpp's TextModel/LlamaModel.set_gguf_parameters emits them)
    writer.add_block_count(n_layer)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    # tokenizer.* (LlamaModel._set_vocab_gpt2 + SpecialVocab.add_to_gguf)
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(False)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # tensors: HF name -> llama.cpp name through gguf-py's own table, as the converter does
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    state = model.state_dict()
    if tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp writes no output.weight for tied models
    for hf_name, tensor in state.items():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise RuntimeError(f"no llama.cpp name for {hf_name}")
        data = tensor.detach().to(torch.float32).numpy().copy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = _llamacpp_permute(data, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = _llamacpp_permute(data, n_head_kv)
        writer.add_tensor(gguf_name, np.ascontiguousarray(data), raw_dtype=gguf.GGMLQuantizationType.F32)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokenizer
