"""The optimiser of a lens's translators: SGD (Nesterov, as the reference) or Adam, weight
decay toward the identity (the logit lens) for every kind, per-layer gradient clipping, and
per-layer step scales from the residual stream's own scale (``train.step_scale``).

Why step scales. A step on an affine translator h' = h + W h + b changes the lens's input
to the final norm by dW h; the norm then divides by the size of h'. So the same gradient
step moves the lens's prediction by about ``(s_l / s_L)^2`` times more at a layer whose
residual is as large as the last layer's (s_l, s_L: the typical per-token RMS of the
residual at layer l and at the output) than at a layer with a small residual. One learning
rate for all layers is then too large for the late layers and too small for the early ones:
on Gemma-3-270M (RMS 1 at the embeddings, ~1,560 at the output, final-norm gains up to 300)
SGD at the reference's rate of 1 lowered the KL of layer 2 by 5% in 8 steps while layer
17's rose 240-fold; on SmolLM2 the last 6 layers never improved on their least-squares start.
``step_scale: residual`` multiplies each layer's weight gradients by ``(s_L / s_l)^2`` and its
bias gradient by ``s_L^2`` (the bias acts on a constant input of size 1 where W acts on one
of size s_l), clipping in between at the square root: a step of one size then moves every
layer's prediction alike, which is SGD (clipping included) on the translator written in
units of the residual's scale. The scales are
medians over the first shard of the training store, recorded in lens.json.
"""

from __future__ import annotations

import torch

from ..config import TrainConfig
from .kinds import get as kind_of
from .tuned import TunedLens


def _identity_centred(lens: TunedLens) -> list[torch.Tensor]:
    """Parameters whose identity value is not zero (``Translator.identity_centred``: the
    weight of a ``linear`` translator, W h, W = I at the identity). Plain weight decay
    would pull it toward the zero map; it is decayed toward I instead
    (``decay_to_identity``), so weight decay means "toward the logit lens" for every kind."""
    return [p for t in lens.translators.values() for p in t.identity_centred()]


def make_optimizer(lens: TunedLens, cfg: TrainConfig):
    """Optimiser and schedule over the lens's translators (the head is frozen)."""
    centred = {id(p) for p in _identity_centred(lens)}
    params = [p for p in lens.translators.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in centred]},
              {"params": [p for p in params if id(p) in centred], "weight_decay": 0.0,
               "decay_to_identity": cfg.weight_decay}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        # PyTorch's momentum scales the step by 1/(1 - momentum); undo it so lr_scale=1 is
        # an effective rate of 1, as the reference does.
        opt = torch.optim.SGD(groups, lr=cfg.lr_scale * (1 - cfg.momentum), momentum=cfg.momentum,
                              nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(groups, lr=cfg.lr_scale * 1e-3, betas=(cfg.momentum, 0.999),
                               amsgrad=True, weight_decay=cfg.weight_decay)

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to zero
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        return max(0.0, 1 - (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


@torch.no_grad()
def decay_to_identity(opt) -> None:
    """grad += wd (W - I) for the identity-centred weights: the same L2 decay the
    optimiser applies to every other parameter (grad += wd * param), centred on I."""
    for group in opt.param_groups:
        wd = group.get("decay_to_identity", 0.0)
        for w in group["params"] if wd else ():
            if w.grad is not None:  # None: a layer that stopped early
                w.grad.add_(w, alpha=wd).diagonal().sub_(wd)


def optimizer_step(lens: TunedLens, layers: list[int], opt, cfg: TrainConfig,
                   multipliers: dict[int, tuple[float, float]] | None = None) -> None:
    """Scale each layer's gradient (``step_multipliers``), clip it on its own, decay, step,
    clear the gradients.

    Per layer, not jointly as the reference does: a joint norm scales every layer's step
    by the others' gradients (on SmolLM2 the joint norm was 4.75, so each step was cut to
    0.21x), which made a lens depend on which layers shared its job. Translators are
    independent problems; clipped one by one, ``train.layer_groups`` changes nothing.
    """
    # With step multipliers m, this is SGD on the translator in units of the residual's scale
    # (weights W sqrt(m)): its gradient is the raw one times sqrt(m), clipped there, and its
    # step, back in the raw units, times sqrt(m) again.
    if multipliers:
        scale_steps(lens, layers, multipliers, 0.5)
    if cfg.clip_grad:
        for layer in layers:
            torch.nn.utils.clip_grad_norm_(lens.translators[str(layer)].parameters(), cfg.clip_grad)
    if multipliers:
        scale_steps(lens, layers, multipliers, 0.5)
    decay_to_identity(opt)
    opt.step()  # parameters without a gradient (stopped layers) are left as they are
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def residual_scales(store, layers: list[int]) -> dict[int, float]:
    """Median per-token RMS of the residual at each of ``layers`` and at the output
    (``store.n_layers``), over the store's first shard."""
    n = min(store.attrs["params"]["shard_tokens"], store.n_tokens)
    x = store.layers([*layers, store.n_layers], 0, n)  # (k+1, n, d)
    rms = x.double().pow(2).mean(-1).sqrt().median(-1).values  # (k+1,)
    return {layer: float(r) for layer, r in zip([*layers, store.n_layers], rms)}


def step_multipliers(lens: TunedLens, scales: dict[int, float] | None) -> dict[int, tuple[float, float]]:
    """Per layer (weight multiplier (s_L / s_l)^2, bias multiplier s_L^2); 1 for a kind that
    is not a linear map (an mlp's hidden layers have no one input scale) or without scales."""
    if not scales:
        return {}
    s_out = scales[lens.n_layers]
    return {layer: ((s_out / max(scales[layer], 1e-12)) ** 2, s_out ** 2) for layer in lens.layers
            if kind_of(lens.kind).linear_map}


@torch.no_grad()
def scale_steps(lens: TunedLens, layers: list[int], multipliers: dict[int, tuple[float, float]],
                power: float = 1.0) -> None:
    """Multiply each layer's gradients by its step multipliers to the ``power`` (biases by
    the second multiplier)."""
    for layer in layers:
        w_mul, b_mul = multipliers.get(layer, (1.0, 1.0))
        for name, p in lens.translators[str(layer)].named_parameters():
            if p.grad is not None:
                p.grad.mul_((b_mul if name.endswith("bias") else w_mul) ** power)
