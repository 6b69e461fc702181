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
units of the residual's scale. Adam's step is invariant to its gradient's scale, so with Adam
the second square root multiplies the step itself (``scale_updates``). The scales are
medians over the first shard of the training store, recorded in lens.json.
"""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..positions import BLOCK, Key, as_key
from .tuned import TunedLens


def _translators(lens: TunedLens) -> list[torch.nn.Module]:
    """Every translator of the lens: the block position's, then the attention position's
    (so a block-only lens's parameters keep their order in the optimiser)."""
    return [*lens.translators.values(), *lens.attention.values()]


def _identity_centred(lens: TunedLens) -> list[torch.Tensor]:
    """Parameters whose identity value is not zero (``Translator.identity_centred``: the
    weight of a ``linear`` translator, W h, W = I at the identity). Plain weight decay
    would pull it toward the zero map; it is decayed toward I instead
    (``decay_to_identity``), so weight decay means "toward the logit lens" for every kind."""
    return [p for t in _translators(lens) for p in t.identity_centred()]


def make_optimizer(lens: TunedLens, cfg: TrainConfig):
    """Optimiser and schedule over the lens's translators (the head is frozen)."""
    centred = {id(p) for p in _identity_centred(lens)}
    branch = {id(p) for t in _translators(lens) for p in t.branch()}
    params = [p for t in _translators(lens) for p in t.parameters() if p.requires_grad]
    base = cfg.lr_scale * (1 - cfg.momentum) if cfg.optimizer == "sgd" else cfg.lr_scale * 1e-3
    groups = [
        {"params": [p for p in params if id(p) not in centred | branch]},
        {"params": [p for p in params if id(p) in centred], "weight_decay": 0.0, "decay_to_identity": cfg.weight_decay},
        # an mlp's branch starts at zero beside the least-squares map: at the affine
        # part's rate, Adam's first steps move all its (hidden x d_model) weights at
        # once and the lens falls behind the affine one in a short schedule
        {"params": [p for p in params if id(p) in branch], "lr": base * cfg.branch_lr},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        # PyTorch's momentum scales the step by 1/(1 - momentum); undo it so lr_scale=1 is
        # an effective rate of 1, as the reference does.
        opt = torch.optim.SGD(
            groups, lr=base, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.Adam(
            groups, lr=base, betas=(cfg.momentum, 0.999), amsgrad=True, weight_decay=cfg.weight_decay
        )

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


def optimizer_step(
    lens: TunedLens, keys: list[Key], opt, cfg: TrainConfig, multipliers: dict[Key, tuple[float, float]] | None = None
) -> None:
    """Scale each lens position's gradient (``step_multipliers``), clip it on its own, decay,
    step, clear the gradients. ``keys``: the (position, layer) of the translators stepped.

    Per layer, not jointly as the reference does: a joint norm scales every layer's step
    by the others' gradients (on SmolLM2 the joint norm was 4.75, so each step was cut to
    0.21x), which made a lens depend on which layers shared its job. Translators are
    independent problems; clipped one by one, ``train.layer_groups`` changes nothing.
    """
    keys = [as_key(k) for k in keys]
    # With step multipliers m, this is SGD on the translator in units of the residual's scale
    # (weights W sqrt(m)): its gradient is the raw one times sqrt(m), clipped there, and its
    # step, back in the raw units, times sqrt(m) again.
    if multipliers:
        scale_steps(lens, keys, multipliers, 0.5)
    if cfg.clip_grad:
        for key in keys:
            torch.nn.utils.clip_grad_norm_(lens.translator(key).parameters(), cfg.clip_grad)
    adam = cfg.optimizer == "adam"
    if multipliers and not adam:
        scale_steps(lens, keys, multipliers, 0.5)
    decay_to_identity(opt)
    before = _parameters(lens, keys) if multipliers and adam else None
    opt.step()  # parameters without a gradient (stopped layers) are left as they are
    if before is not None:
        # Adam's step does not grow with its gradient, so the second sqrt(m) goes on the
        # step itself: Adam on the translator in units of the residual's scale.
        scale_updates(lens, keys, multipliers, before)
    opt.zero_grad(set_to_none=True)


def _scaled(lens: TunedLens, keys: list[Key], multipliers: dict[Key, tuple[float, float]]):
    """(parameter, its multiplier) of every translator of ``keys``: a bias gets the lens
    position's second multiplier, every other parameter its first."""
    for key in keys:
        w_mul, b_mul = multipliers.get(key, (1.0, 1.0))
        for name, p in lens.translator(key).named_parameters():
            yield p, (b_mul if name.endswith("bias") else w_mul)


@torch.no_grad()
def _parameters(lens: TunedLens, keys: list[Key]) -> list[torch.Tensor]:
    """Copies of the parameters of ``keys``, in ``_scaled``'s order (scale_updates zips them)."""
    return [p.detach().clone() for p, _ in _scaled(lens, keys, {})]


@torch.no_grad()
def scale_updates(
    lens: TunedLens, keys: list[Key], multipliers: dict[Key, tuple[float, float]], before: list[torch.Tensor]
) -> None:
    """Multiply the step just taken (parameter minus ``before``, in ``_parameters`` order) by
    the square root of each lens position's multipliers (biases by the second)."""
    for (p, m), b in zip(_scaled(lens, keys, multipliers), before, strict=True):
        p.copy_(b + (p - b) * m**0.5)


@torch.no_grad()
def residual_scales(store, keys: list[Key]) -> dict[Key, float]:
    """Median per-token RMS of the residual at each lens position of ``keys`` and at the
    output (block ``store.n_layers``), over the store's first shard."""
    n = min(store.attrs["params"]["shard_tokens"], store.n_tokens)
    out = {}
    for position in dict.fromkeys([p for p, _ in keys] + [BLOCK.name]):
        layers = [layer for p, layer in keys if p == position] + ([store.n_layers] if position == BLOCK.name else [])
        x = store.layers(layers, 0, n, position=position)  # (k, n, d)
        rms = x.double().pow(2).mean(-1).sqrt().median(-1).values  # (k,)
        out.update({(position, layer): float(r) for layer, r in zip(layers, rms)})
    return out


def step_multipliers(lens: TunedLens, scales: dict[Key, float] | None) -> dict[Key, tuple[float, float]]:
    """Per lens position (weight multiplier (s_L / s_l)^2, bias multiplier s_L^2); {} without
    scales. Every kind: an mlp's weights get the multipliers of its affine part (its branch
    starts at zero and its first layer reads the same residual), so that an mlp lens and an
    affine one trained with the same settings take steps of the same size."""
    if not scales:
        return {}
    s_out = scales[(BLOCK.name, lens.n_layers)]
    return {key: ((s_out / max(scales[key], 1e-12)) ** 2, s_out**2) for key in lens.keys()}


@torch.no_grad()
def scale_steps(
    lens: TunedLens, keys: list[Key], multipliers: dict[Key, tuple[float, float]], power: float = 1.0
) -> None:
    """Multiply each lens position's gradients by its step multipliers to the ``power``
    (biases by the second multiplier)."""
    for p, m in _scaled(lens, keys, multipliers):
        if p.grad is not None:
            p.grad.mul_(m**power)
