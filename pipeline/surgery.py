"""Generic model surgery for Hugging Face causal language models.

A tuned lens needs three things from a model: the residual stream between blocks, and
the exact map from the last block's output to the logits (final norm, any projection,
the unembedding and any logit post-processing). This module finds those parts by
structure rather than by a closed list of classes, so new families work as long as they
follow the usual layout (a ModuleList of blocks, a final norm, ``get_output_embeddings``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import ModelNotAvailable, UnsupportedModel

LAYER_CONVENTION = (
    "Residual stream index convention: resid has shape (n_layers + 1, batch, pos, d_model) "
    "and is float32, always taken BEFORE the final norm. Index 0 is the input to block 0, "
    "i.e. after everything the model does before its first block (token embedding, "
    "embedding scaling, positional embeddings, project_in, embedding norms). Index i "
    "(1 <= i <= n_layers) is the output hidden state of block i-1, so index n_layers is the "
    "output of the last block; applying the unembedding head (final norm -> projection -> "
    "unembed -> logit post-processing) to index n_layers reproduces the model's logits."
)

#: Attribute names under which families store the norm applied after the last block.
NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm", "layer_norm")
#: Attribute names of a projection between the final norm and the unembedding (OPT).
PROJECTION_NAMES = ("project_out",)
#: Families that rescale logits after lm_head: model_type -> (config attribute, op).
#: The same config name means different things per family (Granite divides by
#: ``logits_scaling``, HyperCLOVA X multiplies by it), hence a table keyed on family.
LOGIT_SCALING = {
    "cohere": ("logit_scale", "mul"), "cohere2": ("logit_scale", "mul"),
    "cohere2_moe": ("logit_scale", "mul"), "cohere_compass": ("logit_scale", "mul"),
    "granite": ("logits_scaling", "div"), "granitemoe": ("logits_scaling", "div"),
    "granitemoeshared": ("logits_scaling", "div"), "granitemoehybrid": ("logits_scaling", "div"),
    "granite_swa": ("logits_scaling", "div"), "granitemoe_swa": ("logits_scaling", "div"),
    "minicpm3": ("logits_scaling", "div"), "hyperclovax": ("logits_scaling", "mul"),
    "falcon_h1": ("lm_head_multiplier", "mul"),
}
_N_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass
class ModelParts:
    """The pieces of a causal LM that lens code needs, plus their dotted module names."""

    embed: nn.Module
    blocks: nn.ModuleList
    final_norm: nn.Module | None
    projection: nn.Module | None  # e.g. OPT's project_out (hidden_size -> word_embed_proj_dim)
    unembed: nn.Module
    softcap: float | None  # Gemma-2 style tanh soft-capping of the logits
    logit_scale: float  # constant factor applied to the logits after unembed
    d_model: int
    n_layers: int
    vocab: int
    embed_name: str
    blocks_name: str
    final_norm_name: str | None
    projection_name: str | None
    unembed_name: str
    tied: bool  # unembed may share the input embedding's weight, so checkpoints may omit it

    @property
    def head_module_names(self) -> list[str]:
        """Dotted names of the modules whose weights the unembedding head needs."""
        names = [self.final_norm_name, self.projection_name, self.unembed_name]
        return [n for n in names if n is not None]


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModel(f"{type(model).__name__} has no `config`; expected a Hugging Face model")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _n_layers(config) -> int:
    for key in _N_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedModel(f"could not find the number of layers in the config (tried {_N_LAYER_KEYS})")


def _find_blocks(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList of length n_layers holding the most parameters.

    Counting parameters (rather than taking the first match) skips coincidental lists of
    the same length, such as per-layer adapters or an MoE's experts inside a block.
    """
    candidates = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers
    ]
    if not candidates:
        raise UnsupportedModel(
            f"could not find the transformer blocks: no nn.ModuleList of length {n_layers} "
            f"(config num_hidden_layers) in {type(model).__name__}"
        )
    return max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))


def _containers(model: nn.Module) -> list[nn.Module]:
    """Modules that may own the final norm: the decoder, the base model, the model itself."""
    out = []
    if hasattr(model, "get_decoder"):
        try:
            out.append(model.get_decoder())
        except (AttributeError, NotImplementedError, ValueError):
            pass  # some wrappers raise for lack of a bespoke rule; fall back to the rest
    out += [getattr(model, "base_model", model), model]
    return [m for m in out if isinstance(m, nn.Module)]


def _find_attr(model: nn.Module, names: tuple[str, ...]) -> tuple[bool, nn.Module | None]:
    """(present, module) for the first container attribute in ``names``; None is a valid value.

    An attribute that exists but is None (OPT with do_layer_norm_before=False) means the
    model deliberately has no such module, which differs from "not found".
    """
    for container in _containers(model):
        for name in names:
            if name in container._modules:
                return True, container._modules[name]
            if hasattr(container, name) and getattr(container, name) is None:
                return True, None
    return False, None


def _find_final_norm(model: nn.Module, blocks_name: str) -> nn.Module | None:
    present, norm = _find_attr(model, NORM_NAMES)
    if present:
        return norm
    # Fallback: a single norm-named module outside the blocks.
    hits = [
        mod for name, mod in model.named_modules()
        if name.rsplit(".", 1)[-1] in NORM_NAMES and not name.startswith(blocks_name + ".")
    ]
    if len(hits) == 1:
        return hits[0]
    raise UnsupportedModel(
        f"could not find the final norm of {type(model).__name__}: no module named one of "
        f"{NORM_NAMES} on the decoder/base model ({len(hits)} candidates elsewhere)"
    )


def _logit_postprocessing(config) -> tuple[float | None, float]:
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = 1.0
    attr_op = LOGIT_SCALING.get(getattr(config, "model_type", ""))
    if attr_op is not None and getattr(config, attr_op[0], None) is not None:
        value = float(getattr(config, attr_op[0]))
        scale = value if attr_op[1] == "mul" else 1.0 / value
    return (float(softcap) if softcap else None), scale


def find_parts(model: nn.Module) -> ModelParts:
    """Locate embedding, blocks, final norm, projection and unembedding of a causal LM."""
    config = _text_config(model)
    n_layers = _n_layers(config)
    blocks_name, blocks = _find_blocks(model, n_layers)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None:
        raise UnsupportedModel(f"could not find the input embedding of {type(model).__name__}")
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed is None or getattr(unembed, "weight", None) is None:
        raise UnsupportedModel(
            f"could not find the output embedding (lm_head) of {type(model).__name__}: "
            "get_output_embeddings() returned nothing usable"
        )
    final_norm = _find_final_norm(model, blocks_name)
    projection = _find_attr(model, PROJECTION_NAMES)[1]
    d_model = getattr(config, "hidden_size", None)
    if not isinstance(d_model, int):
        raise UnsupportedModel(f"could not find the model width (hidden_size) in {type(config).__name__}")
    head_in = unembed.weight.shape[1]  # (vocab, d_in)
    proj_out = projection.weight.shape[0] if projection is not None else d_model
    if head_in != proj_out:
        raise UnsupportedModel(
            f"could not find the projection from d_model={d_model} to the unembedding's "
            f"input width {head_in} in {type(model).__name__} (looked for {PROJECTION_NAMES})"
        )
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)  # a module reachable twice keeps its first path
    softcap, scale = _logit_postprocessing(config)
    return ModelParts(
        embed=embed, blocks=blocks, final_norm=final_norm, projection=projection,
        unembed=unembed, softcap=softcap, logit_scale=scale, d_model=d_model,
        n_layers=n_layers, vocab=int(unembed.weight.shape[0]),
        embed_name=names[id(embed)], blocks_name=blocks_name,
        final_norm_name=names[id(final_norm)] if final_norm is not None else None,
        projection_name=names[id(projection)] if projection is not None else None,
        unembed_name=names[id(unembed)],
        tied=unembed.weight is getattr(embed, "weight", None)
        or bool(getattr(config, "tie_word_embeddings", False)),
    )


class UnembedHead(nn.Module):
    """final_norm -> (projection) -> unembed -> (scale, softcap): residual (..., d_model) -> logits."""

    def __init__(self, final_norm: nn.Module | None, projection: nn.Module | None,
                 unembed: nn.Module, softcap: float | None = None, logit_scale: float = 1.0):
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
            model_key = key[len(prefix) + 1:]
        else:
            model_key = key
        out.setdefault(model_key, key)
    return out


def _read_module_state(module: nn.Module, name: str, parts: ModelParts, files: dict[str, Path],
                       key_map: dict[str, str], dtype: torch.dtype) -> dict[str, Tensor]:
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


def _hidden_from(output) -> Tensor:
    """A block's hidden-state output: some families return a tensor, others a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def residual_stream(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                    *, with_logits: bool = True) -> tuple[Tensor, Tensor | None]:
    """Run the model once; return (resid (n_layers+1, batch, pos, d_model) float32, logits).

    See LAYER_CONVENTION. Hooks rather than output_hidden_states, because HF's last hidden
    state is taken after the final norm for most families. ``with_logits=False`` runs only
    the base model (no unembedding: ~20% of SmolLM2's forward FLOPs) and returns None logits;
    the logits stay reproducible from ``resid[n_layers]`` through the UnembedHead.
    """
    parts = find_parts(model)
    captured: list[list[Tensor]] = [[] for _ in range(parts.n_layers + 1)]

    def save(i: int, hidden: Tensor) -> None:
        # Copy: the model may later modify its hidden state in place.
        captured[i].append(hidden.detach().to(torch.float32, copy=True))

    def pre_hook(_mod, args, kwargs):
        save(0, args[0] if args else kwargs["hidden_states"])  # (batch, pos, d_model)

    handles = [parts.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    for i, block in enumerate(parts.blocks):
        handles.append(block.register_forward_hook(
            lambda _mod, _args, out, i=i: save(i + 1, _hidden_from(out))))
    try:
        device = parts.embed.weight.device  # where the first computation happens
        mask = attention_mask.to(device) if attention_mask is not None else None
        with torch.inference_mode():
            runner = model if with_logits else getattr(model, "base_model", model)
            out = runner(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if any(len(c) != 1 for c in captured):
        counts = [len(c) for c in captured]
        raise UnsupportedModel(f"blocks did not each run exactly once (calls per index: {counts})")
    # Built outside inference mode so the results are ordinary tensors: inference tensors
    # cannot be saved for backward, which would break training a lens on them directly.
    resid = torch.stack([c[0] for c in captured])  # (n_layers + 1, batch, pos, d_model)
    if not with_logits:
        return resid, None
    logits = out.logits if hasattr(out, "logits") else out[0]  # return_dict=False gives a tuple
    return resid, logits.to(torch.float32, copy=True)  # (batch, pos, vocab)


def check_unembed(model: nn.Module, resid: Tensor, logits: Tensor, atol: float = 1e-3) -> float:
    """Verify that the head maps resid[-1] to the model's logits; return the max abs error.

    Guards families whose head does something this module does not know about.
    """
    with torch.inference_mode():
        head = unembed_head(model)
        device = head.unembed.weight.device
        mine = head(resid[-1].to(device)).float()  # (batch, pos, vocab)
    err = (mine - logits.to(device)).abs().max().item()
    if not math.isfinite(err) or err > atol * max(1.0, logits.abs().max().item()):
        raise UnsupportedModel(
            f"the unembedding head does not reproduce {type(model).__name__}'s logits "
            f"(max abs error {err:.3g}); this family applies an unknown logit transform"
        )
    return err
