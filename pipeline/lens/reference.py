"""The tuned-lens 0.2.x lens format (config.json + params.pt): export and import.

The reference implementation's format (Belrose et al. 2023): one residual ``nn.Linear``
per layer, so only kinds registered as exact affine maps (:mod:`pipeline.lens.kinds`'s
``linear_map``) can be written, and what is read is an "affine" :class:`TunedLens`. It has
no place for lenses inside the blocks: a lens with attention-position translators is
exported with its block translators only, and the export says so (a warning naming them).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LenspipeError
from ..model.head import UnembedHead
from ..provenance import atomic_dir, write_json_atomic
from . import kinds
from .translators import make_translator
from .tuned import TunedLens

log = logging.getLogger(__name__)

REF_CONFIG, REF_PARAMS, REF_LENS_TYPE = "config.json", "params.pt", "linear_tuned_lens"


def export_reference(lens: TunedLens, path: str | Path) -> None:
    """Write ``path/`` in tuned-lens 0.2.x format (config.json + params.pt): one residual
    nn.Linear per layer 0..n_layers-1, so every layer needs an exactly affine translator
    (linear and scaling convert: weight = A - I). No bias is written as a zero bias:
    the reference's constructor cannot build a bias-free translator."""
    if lens.layers != list(range(lens.n_layers)):
        raise LenspipeError(
            f"the tuned-lens format needs translators for all layers 0..{lens.n_layers - 1}; "
            f"this lens has {lens.layers} (merge the layer groups first)"
        )
    if not kinds.get(lens.kind).linear_map:
        raise LenspipeError(f"the tuned-lens format holds affine translators only, not {lens.kind!r}")
    if lens.attention_layers:
        log.warning(
            "%s: the tuned-lens format holds block positions only; the lens's %d translators at the "
            "attention position (layers %s) are not exported",
            path,
            len(lens.attention_layers),
            lens.attention_layers,
        )
    state = {}
    for layer, t in lens.translators.items():  # the reference computes h + (W h + b)
        w, b = t.affine_map(torch.float32)  # (d, d), (d,): "affine"'s own W, so the round trip is bit-exact
        state[f"{layer}.weight"], state[f"{layer}.bias"] = w.cpu(), b.cpu()
    info = lens.model_info
    config = {  # exactly the fields of tuned_lens.nn.lenses.TunedLensConfig (0.2.0)
        "base_model_name_or_path": info.get("source") or info.get("name") or "unknown",
        "d_model": lens.d_model,
        "num_hidden_layers": lens.n_layers,
        "bias": True,
        "base_model_revision": info.get("resolved_commit") or info.get("revision"),
        "unembed_hash": reference_unembed_hash(lens.head),
        "lens_type": REF_LENS_TYPE,
    }
    with atomic_dir(path) as tmp:
        torch.save(state, tmp / REF_PARAMS)  # ModuleList.state_dict() keys: "{i}.weight"
        write_json_atomic(tmp / REF_CONFIG, config)


def import_reference(path: str | Path, head: UnembedHead, model_info: dict) -> TunedLens:
    """Read a tuned-lens 0.2.x directory as an "affine" lens."""
    path = Path(path)
    try:
        config = json.loads((path / REF_CONFIG).read_text())
        state = torch.load(path / REF_PARAMS, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise LenspipeError(f"{path} is not a readable tuned-lens directory: {exc}") from None
    if config.get("lens_type", REF_LENS_TYPE) != REF_LENS_TYPE:
        raise LenspipeError(f"{path}: lens_type {config['lens_type']!r} is not {REF_LENS_TYPE!r}")
    d, n, bias = config["d_model"], config["num_hidden_layers"], config.get("bias", True)
    if config.get("unembed_hash") and config["unembed_hash"] != reference_unembed_hash(head):
        # The reference only warns too: its hash rounds to 1 decimal and is version-fragile.
        log.warning("%s: unembed_hash differs from this head's; the lens may be for another model", path)
    translators = {i: make_translator("affine", d, bias=bias) for i in range(n)}
    try:
        nn.ModuleDict({str(i): t for i, t in translators.items()}).load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise LenspipeError(f"{path / REF_PARAMS} does not fit its config.json: {exc}") from None
    origin = {"format": "tuned-lens", "path": str(path), "config": config}
    return TunedLens(head, translators, kind="affine", d_model=d, n_layers=n, model_info=model_info, origin=origin)


def reference_unembed_hash(head: UnembedHead) -> str:
    """tuned-lens 0.2.0's ``Unembed.unembedding_hash``: sha256 of the printed lm_head weight."""
    w = head.unembed.weight.detach().cpu().float().numpy()
    return hashlib.sha256(np.array_str(w, precision=1).encode()).hexdigest()
