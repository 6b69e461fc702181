"""extract: run the model once over a packed split, store every layer's residual stream.

The store is the product's cache: training and evaluation read it and never re-run the
model. Extraction is resumable (whole shards are the unit of progress, see
:mod:`pipeline.store`), checks that the model's own logits are reproducible from the last
layer it stores (exactly in float32: the guard of the head; and what the storage dtype's
rounding costs, measured, never failing the run), and records full provenance in the
store's attributes.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ExtractConfig
from .corpus import load_split
from .devices import resolve_device
from .errors import ConfigError, StoreError
from .model.head import unembed_head
from .model.parts import find_parts, text_config
from .model.prepare import read_model_info
from .model.residual import LAYER_CONVENTION, check_unembed, residual_states
from .model.sublayers import MidBlockCapture
from .positions import ATTENTION, BLOCK
from .progress import Progress
from .sampling import select_sequences
from .store.decode import decode
from .store.dtypes import DTYPES
from .store.encoding import cast_into
from .store.layout import StoreParams
from .store.reader import open_store
from .store.writer import StoreWriter

log = logging.getLogger(__name__)

#: The model's logits must be reproduced from the stored last layer to this accuracy
#: (float32 compute; the check runs before the storage cast).
LOGITS_ATOL = 1e-3
CHECK_POS = 64


def resolve_compute(cfg: ExtractConfig) -> tuple[torch.device, torch.dtype]:
    """Device and forward-pass dtype: float32 on CPU, bfloat16 on CUDA unless configured."""
    device = resolve_device(cfg.device, "extract.device")
    if cfg.compute_dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, cfg.compute_dtype)


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()


def _provenance(
    model_dir: Path, split_meta: dict, seq_index: np.ndarray, n_total: int, cfg: ExtractConfig, split: str, model
) -> dict[str, Any]:
    info = read_model_info(model_dir)
    out = {
        "model": {
            k: info.get(k)
            for k in (
                "name",
                "source",
                "revision",
                "resolved_commit",
                "model_type",
                "weights_sha256",
                "tokenizer_sha256",
            )
        },
        "corpus": {
            "split": split,
            "fingerprint": split_meta["fingerprint"],
            "n_seq_in_split": n_total,
            "seq_len": split_meta["seq_len"],
        },
        "seq_index": "all" if len(seq_index) == n_total else seq_index.tolist(),
        "layer_convention": LAYER_CONVENTION,
        # only what shapes this split's store: not the device, not other splits' budgets
        "extract_config": cfg.store_settings() | {"max_tokens": cfg.max_tokens.get(split)},
    }
    if ATTENTION.name in cfg.positions:
        # which modules of each block give the state (model.sublayers); refuses a post-norm family here
        sub = MidBlockCapture(find_parts(model).blocks, text_config(model)).describe()
        out["attention_position"] = {"meaning": ATTENTION.meaning, "sublayers": sub}
    return out


def _check_logits(model, ids: torch.Tensor, resid: torch.Tensor, dtype: str) -> dict[str, float]:
    """The logits checks on ids (1, pos): max |logits - head(resid[n_layers])| (raises if the
    head does not reproduce the model), and what head(the stored last layer, rounded to
    ``dtype`` and decoded as a reader gets it) costs: its max abs logit error and its mean
    KL(model || head(stored)) in nats over the positions (recorded, never raising)."""
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (1, pos, vocab)
        err = check_unembed(model, resid, logits, atol=LOGITS_ATOL)
        head = unembed_head(model)
        device = head.unembed.weight.device
        stored = stored_values(resid[-1], dtype).to(device=device, dtype=resid.dtype)  # (1, pos, d)
        mine = head(stored).float()  # (1, pos, vocab)
        logits = logits.to(device)
        logp, logq = torch.log_softmax(logits.double(), -1), torch.log_softmax(mine.double(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    return {
        "logits_max_err": err,
        "stored_logits_max_err": (mine - logits).abs().max().item(),
        "stored_logits_kl": kl.item(),
    }


def stored_values(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """``x`` (..., d) as a reader of a ``dtype`` store gets it back (float32, on the CPU):
    the writer's own cast (or quantisation) and the reader's own decode."""
    spec = DTYPES[dtype]
    rows = x.reshape(1, -1, x.shape[-1])  # (1, n, d): one "layer" of n rows
    raw = np.empty(rows.shape, spec.stored)
    scale = np.empty(rows.shape[:2], np.float32) if spec.scaled else None
    cast_into(raw, rows, dtype, scale)
    return torch.from_numpy(decode(raw, spec, scale)).reshape(x.shape)


def _reset_if_stale(store_path: Path, provenance: dict, params: dict) -> None:
    """Delete an existing store made with other settings (the rule's output is stale)."""
    if not store_path.exists():
        return
    try:
        store = open_store(store_path, allow_incomplete=True)
        same = store.provenance == provenance and store.params == StoreParams(**params)
    except StoreError:
        same = False
    if not same:
        log.warning("%s was made with other settings; deleting it and extracting anew", store_path)
        shutil.rmtree(store_path)


def part_range(n_seq: int, seq_per_shard: int, part: int, parts: int) -> tuple[int, int]:
    """Sequences [first, stop) of extraction part ``part`` of ``parts``: whole shards each,
    so every shard of the assembled store is written by exactly one job."""
    n_shards = -(-n_seq // seq_per_shard)
    if parts > n_shards:
        raise ConfigError(
            f"extract.parts={parts} exceeds this split's {n_shards} shards; use fewer parts or smaller shard_tokens"
        )
    size, extra = divmod(n_shards, parts)
    first = part * size + min(part, extra)
    return first * seq_per_shard, min((first + size + (part < extra)) * seq_per_shard, n_seq)


def extract_part(
    model_dir: Path, split_path: Path, store_path: Path, cfg: ExtractConfig, split: str, part: int
) -> dict[str, Any]:
    """Part ``part`` of ``cfg.parts`` of the split's store (assembled by pipeline.parts)."""
    return extract(model_dir, split_path, store_path, cfg, split, part=(part, cfg.parts))


def extract(
    model_dir: Path,
    split_path: Path,
    store_path: Path,
    cfg: ExtractConfig,
    split: str,
    part: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Extract ``split`` into ``store_path``; resumes an interrupted run. Returns a summary."""
    packed = load_split(split_path)
    seq_len = packed.meta["seq_len"]
    if cfg.shard_tokens % seq_len:
        raise ConfigError(
            f"extract.shard_tokens ({cfg.shard_tokens}) must be a multiple of the corpus seq_len ({seq_len})"
        )
    seq_index = select_sequences(len(packed.tokens), cfg.budget(split, seq_len), cfg.seed)
    tokens = torch.from_numpy(packed.tokens[seq_index]).long()  # (n_seq, seq_len)
    device, dtype = resolve_compute(cfg)
    model = load_model(model_dir, device, dtype)
    parts = find_parts(model)
    provenance = _provenance(model_dir, packed.meta, seq_index, len(packed.tokens), cfg, split, model)
    if part is not None:
        lo, hi = part_range(len(tokens), cfg.shard_tokens // seq_len, *part)
        tokens = tokens[lo:hi]
        provenance["part"] = {"index": part[0], "of": part[1], "sequences": [lo, hi]}
    params = dict(
        n_layers=parts.n_layers,
        d_model=parts.d_model,
        n_tokens=tokens.numel(),
        seq_len=seq_len,
        dtype=cfg.dtype,
        shard_tokens=cfg.shard_tokens,
        chunk_tokens=cfg.chunk_tokens,
        compression=cfg.compression,
        level=cfg.level,
        positions=tuple(cfg.positions),
    )
    _reset_if_stale(Path(store_path), provenance, params)
    t0 = time.monotonic()
    with StoreWriter.open(store_path, **params, provenance=provenance) as writer:
        if writer.already_complete:
            log.info("%s is already complete", store_path)
            return {"store": str(store_path), "n_tokens": tokens.numel(), "resumed_from": tokens.numel()}
        first = writer.resume_token // seq_len
        if first:
            log.info("resuming at sequence %d of %d", first, len(tokens))
        checks = _run(model, tokens, first, cfg.batch_size, writer, device, split, cfg.dtype, tuple(cfg.positions))
    seconds = time.monotonic() - t0
    n_new = (len(tokens) - first) * seq_len
    log.info("extracted %d tokens in %.1f s (%.0f tokens/s)", n_new, seconds, n_new / max(seconds, 1e-9))
    return {
        "store": str(store_path),
        "n_tokens": tokens.numel(),
        "resumed_from": first * seq_len,
        "seconds": seconds,
        "tokens_per_s": n_new / max(seconds, 1e-9),
        **checks,
    }


def _run(
    model,
    tokens: torch.Tensor,
    first: int,
    batch_size: int,
    writer: StoreWriter,
    device: torch.device,
    split: str,
    dtype: str,
    positions: tuple[str, ...],
) -> dict[str, float]:
    """Forward batches from sequence ``first`` on and hand each to the (background) writer;
    returns the logits checks of the first batch (:func:`_check_logits`). The first batch
    also checks the attention position, where it is stored (``model.sublayers``)."""
    seq_len = tokens.shape[1]
    checks: dict[str, float] = {}
    with Progress(tokens.numel(), f"extract {split}", initial=first * seq_len) as bar:
        for start in range(first, len(tokens), batch_size):
            ids = tokens[start : start + batch_size].to(device)  # (batch, pos)
            states, _ = residual_states(model, ids, positions=positions, with_logits=False, verify=not checks)
            resid = states[BLOCK.name]  # (L+1, batch, pos, d)
            if not checks:  # once per run: the cache must reproduce the model exactly.
                # A causal model's first CHECK_POS positions do not depend on later ones, so
                # a short prefix suffices and costs ~1/40 of a batch.
                checks = _check_logits(model, ids[:1, :CHECK_POS], resid[:, :1, :CHECK_POS], dtype)
                log.info(
                    "logits check on %d positions: float32 last layer max abs error %.3g; stored "
                    "(%s) last layer max abs error %.3g, mean KL(model || stored) %.3g nats",
                    ids[:1, :CHECK_POS].numel(),
                    checks["logits_max_err"],
                    dtype,
                    checks["stored_logits_max_err"],
                    checks["stored_logits_kl"],
                )
            n_layers1, b, t, d = resid.shape
            attn = states.get(ATTENTION.name)  # (L, batch, pos, d) or None
            # the writer casts and range-checks on this device; only storage bytes cross to host
            writer.write(
                resid.reshape(n_layers1, b * t, d),
                ids.reshape(-1).cpu(),
                None if attn is None else attn.reshape(n_layers1 - 1, b * t, d),
            )
            bar.update(b * t)
    return checks or dict.fromkeys(("logits_max_err", "stored_logits_max_err", "stored_logits_kl"))
