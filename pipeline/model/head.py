"""The unembedding head: final norm -> (projection) -> unembed -> logit post-processing.

From a loaded model's parts (``unembed_head``: shared, not copied), or from a checkpoint
directory without loading the blocks (``load_unembed_head``: a meta-device skeleton, then
only the head's tensors read from the safetensors files).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ModelNotAvailable, UnsupportedModel
from .parts import ModelParts, find_parts


class UnembedHead(nn.Module):
    """final_norm -> (projection) -> unembed -> (scale, softcap): residual (..., d_model) -> logits."""

    def __init__(
        self,
        final_norm: nn.Module | None,
        projection: nn.Module | None,
        unembed: nn.Module,
        softcap: float | None = None,
        logit_scale: float = 1.0,
    ):
        super().__init__()
        self.final_norm = final_norm if final_norm is not None else nn.Identity()
        self.projection = projection if projection is not None else nn.Identity()
        self.unembed = unembed
        self.softcap = softcap
        self.logit_scale = logit_scale

    @classmethod
    def from_parts(cls, parts: ModelParts) -> UnembedHead:
        return cls(parts.final_norm, parts.projection, parts.unembed, parts.softcap, parts.logit_scale)

    def forward(self, h: Tensor, out: Tensor | None = None) -> Tensor:
        """Logits (..., vocab). ``out``: an (n, vocab) buffer to write them into, for 2-D
        ``h`` without autograd (evaluation reuses one per lens and layer: a fresh 200 MB
        tensor per call was mostly page faults)."""
        # Residuals are cached in float32; run the head in its own dtype, as the model does.
        h = h.to(self.unembed.weight.dtype)  # (..., d_model)
        x = self.projection(self.final_norm(h))
        if out is None or x.ndim != 2 or type(self.unembed) is not nn.Linear:
            logits = self.unembed(x)  # (..., vocab)
            if self.logit_scale != 1.0:
                logits = logits * self.logit_scale
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return logits
        w, b = self.unembed.weight, self.unembed.bias  # the same BLAS call as F.linear
        logits = torch.mm(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)
        if self.logit_scale != 1.0:
            logits.mul_(self.logit_scale)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits


def unembed_head(model: nn.Module) -> UnembedHead:
    """The unembedding head of a loaded model; shares (does not copy) its modules."""
    return UnembedHead.from_parts(find_parts(model))


def _checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it (sharded or single-file checkpoints)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{model_dir} has no *.safetensors files; cannot load the unembedding alone")
    from safetensors import safe_open

    out = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), path))
    return out


def _model_key_map(skeleton: nn.Module, ckpt_keys) -> dict[str, str]:
    """model state-dict key -> checkpoint key, for every checkpoint key.

    transformers >= 5 renames some tensors between checkpoint and module (GPT-NeoX's
    ``embed_out`` is the module ``lm_head``), so map names the way its loader does. Older
    versions only add or strip the base-model prefix (checkpoints saved from the bare
    base model, e.g. original GPT-2's ``ln_f.weight`` for ``transformer.ln_f.weight``).
    """
    meta_state = skeleton.state_dict()  # meta tensors: names only, no memory
    prefix = getattr(skeleton, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(skeleton)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
    except ImportError:
        rename_source_key = None
    out: dict[str, str] = {}
    for key in ckpt_keys:
        if rename_source_key is not None:
            model_key = rename_source_key(key, renamings, converters, prefix, meta_state)[0]
        elif prefix and key not in meta_state and f"{prefix}.{key}" in meta_state:
            model_key = f"{prefix}.{key}"
        elif prefix and key not in meta_state and key.startswith(prefix + "."):
            model_key = key[len(prefix) + 1 :]
        else:
            model_key = key
        out.setdefault(model_key, key)
    return out


def _read_module_state(
    module: nn.Module, name: str, parts: ModelParts, files: dict[str, Path], key_map: dict[str, str], dtype: torch.dtype
) -> dict[str, Tensor]:
    """The state dict of one head module, read tensor by tensor from the checkpoint."""
    from safetensors import safe_open

    state = {}
    for local in module.state_dict(keep_vars=True):  # parameters and persistent buffers
        key = _head_key(module, name, local, parts, key_map)
        with safe_open(str(files[key]), framework="pt") as f:
            state[local] = f.get_tensor(key).to(dtype)
    return state


def _head_key(module: nn.Module, name: str, local: str, parts: ModelParts, key_map: dict[str, str]) -> str:
    key = key_map.get(f"{name}.{local}")
    if key is None and module is parts.unembed and local == "weight" and parts.tied:
        # Tied embeddings: save_pretrained drops lm_head.weight, keeping the input embedding.
        key = key_map.get(f"{parts.embed_name}.weight")
    if key is None:
        raise UnsupportedModel(f"tensor {name}.{local} is missing from the checkpoint")
    return key


def head_checkpoint_tensors(model_dir: str | Path) -> dict[str, Tensor]:
    """The checkpoint tensors (by their checkpoint names) that the unembedding head needs."""
    from safetensors import safe_open

    skeleton, parts, files, key_map = _skeleton(Path(model_dir))
    modules = dict(skeleton.named_modules(remove_duplicate=False))
    out = {}
    for name in parts.head_module_names:
        for local in modules[name].state_dict(keep_vars=True):
            key = _head_key(modules[name], name, local, parts, key_map)
            with safe_open(str(files[key]), framework="pt") as f:
                out[key] = f.get_tensor(key)
    return out


def _skeleton(model_dir: Path):
    """(meta-device model, its parts, checkpoint key -> file, model key -> checkpoint key)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (model_dir / "config.json").is_file():
        raise ModelNotAvailable(f"{model_dir} is not a model directory (no config.json)")
    files = _checkpoint_files(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedModel(f"cannot build a causal-LM skeleton for {model_dir}: {exc}") from exc
    return skeleton, find_parts(skeleton), files, _model_key_map(skeleton, files)


def load_unembed_head(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> UnembedHead:
    """Build the unembedding head from a checkpoint directory without loading the blocks.

    The model skeleton is instantiated on the meta device (no memory), the parts are found
    as for a loaded model, and only the head's tensors are read from the safetensors files.
    """
    model_dir = Path(model_dir)
    skeleton, parts, files, key_map = _skeleton(model_dir)
    modules = dict(skeleton.named_modules(remove_duplicate=False))
    for name in parts.head_module_names:
        module = modules[name]
        state = _read_module_state(module, name, parts, files, key_map, dtype)
        # assign=True swaps the meta tensors for the loaded ones instead of copying into them.
        module.load_state_dict(state, strict=True, assign=True)
    head = UnembedHead.from_parts(parts)
    leftover = [n for n, t in head.state_dict().items() if t.is_meta]
    if leftover:  # a tensor the head needs that lives outside the modules found
        raise UnsupportedModel(f"unembedding head of {model_dir} still has unloaded tensors: {leftover}")
    return head.eval()
