"""Find the parts of any Hugging Face causal language model that lens code needs.

A tuned lens needs three things from a model: the residual stream between blocks, and
the exact map from the last block's output to the logits (final norm, any projection,
the unembedding and any logit post-processing). This module finds those parts by
structure rather than by a closed list of classes, so new families work as long as they
follow the usual layout (a ModuleList of blocks, a final norm, ``get_output_embeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedModel

#: Attribute names under which families store the norm applied after the last block.
NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm", "layer_norm")
#: Attribute names of a projection between the final norm and the unembedding (OPT).
PROJECTION_NAMES = ("project_out",)
#: Families that rescale logits after lm_head: model_type -> (config attribute, op).
#: The same config name means different things per family (Granite divides by
#: ``logits_scaling``, HyperCLOVA X multiplies by it), hence a table keyed on family.
LOGIT_SCALING = {
    "cohere": ("logit_scale", "mul"),
    "cohere2": ("logit_scale", "mul"),
    "cohere2_moe": ("logit_scale", "mul"),
    "cohere_compass": ("logit_scale", "mul"),
    "granite": ("logits_scaling", "div"),
    "granitemoe": ("logits_scaling", "div"),
    "granitemoeshared": ("logits_scaling", "div"),
    "granitemoehybrid": ("logits_scaling", "div"),
    "granite_swa": ("logits_scaling", "div"),
    "granitemoe_swa": ("logits_scaling", "div"),
    "minicpm3": ("logits_scaling", "div"),
    "hyperclovax": ("logits_scaling", "mul"),
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


def text_config(model: nn.Module):
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
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == n_layers
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
        mod
        for name, mod in model.named_modules()
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
    config = text_config(model)
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
        embed=embed,
        blocks=blocks,
        final_norm=final_norm,
        projection=projection,
        unembed=unembed,
        softcap=softcap,
        logit_scale=scale,
        d_model=d_model,
        n_layers=n_layers,
        vocab=int(unembed.weight.shape[0]),
        embed_name=names[id(embed)],
        blocks_name=blocks_name,
        final_norm_name=names[id(final_norm)] if final_norm is not None else None,
        projection_name=names[id(projection)] if projection is not None else None,
        unembed_name=names[id(unembed)],
        tied=unembed.weight is getattr(embed, "weight", None) or bool(getattr(config, "tie_word_embeddings", False)),
    )
