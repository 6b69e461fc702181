"""The translators: h (..., d_model) -> h' (..., d_model), one per layer of a tuned lens.

Each class is a kind of :mod:`pipeline.lens.kinds`; ``make_translator`` builds a fresh one
(starting as the identity, i.e. the logit lens) from the kind's name and options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import LenspipeError
from . import kinds

if TYPE_CHECKING:
    from .lstsq import LeastSquaresAccumulator

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Translator(nn.Module):
    """h (..., d_model) -> h' (..., d_model). ``make_translator(t.kind, d, **t.opts)`` rebuilds t.

    A kind is registered in :mod:`pipeline.lens.kinds`; what a subclass says about itself
    there (``linear_map``, ``lstsq``) it implements here (``affine_map``, ``set_affine_map``).
    """

    kind: str
    opts: dict[str, Any]  # a property of each kind: the options that rebuild it
    intercept: bool = True
    """Whether its least-squares start is fitted with an intercept (a translator with no
    bias is fitted without one: ``LeastSquaresAccumulator.solve(intercept=False)``)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model

    def affine_map(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(W (d, d), b (d,)) with translator(h) = h + W h + b exactly, for kinds that are
        affine maps (translator anatomy, the tuned-lens export); detached, in ``dtype``."""
        raise LenspipeError(f"a {self.kind!r} translator is no affine map h + W h + b")

    def set_affine_map(self, W: Tensor, b: Tensor) -> None:
        """Set the translator to h -> W h + b (the least-squares start), for kinds that can."""
        lstsq = [k.name for k in kinds.KINDS.values() if k.lstsq]
        raise LenspipeError(f"least-squares initialisation is for {'/'.join(lstsq)} translators, not {self.kind!r}")

    def fit_closed_form(self, stats: LeastSquaresAccumulator, ridge: float) -> None:
        """Set the translator to its best closed-form map from the streamed statistics of its
        inputs and the last layer (kinds registered with ``lstsq``). By default the full
        least-squares map (``set_affine_map``); a kind whose function class is narrower
        overrides this with its own fit (``scaling``: the per-dimension one)."""
        self.set_affine_map(*stats.solve(ridge, intercept=self.intercept))

    def identity_centred(self) -> list[nn.Parameter]:
        """Parameters whose value at the identity (the logit lens) is not zero: weight decay
        pulls them toward that value rather than toward 0 (see pipeline.train)."""
        return []

    def branch(self) -> list[nn.Parameter]:
        """Parameters of a branch added to a closed-form map (an mlp's hidden layers): they
        step at ``train.branch_lr`` times the rate of the rest (see pipeline.lens.optim)."""
        return []


class AffineTranslator(Translator):
    """ "affine": h + W h + b, W = b = 0 at init, as in the reference (weight decay then pulls
    towards the identity, i.e. the logit lens). ``bias=False`` gives h + W h (the
    reference's ``bias: false``)."""

    kind = "affine"

    def __init__(self, d_model: int, *, bias: bool = True):
        super().__init__(d_model)
        self.weight = nn.Parameter(torch.zeros(d_model, d_model))  # (d_out, d_in)
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None  # (d,)

    @property
    def opts(self) -> dict[str, Any]:
        return {"bias": self.bias is not None}

    @property
    def intercept(self) -> bool:
        return self.bias is not None

    def forward(self, h: Tensor) -> Tensor:
        return h + F.linear(h, self.weight, self.bias)  # (..., d)

    def affine_map(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        w = self.weight.detach().to(dtype or self.weight.dtype)  # (d, d)
        return w, _bias(self.bias, w)

    @torch.no_grad()
    def set_affine_map(self, W: Tensor, b: Tensor) -> None:
        _check_fit(self, W, b)
        # h + W' h = W h  <=>  W' = W - I
        self.weight.copy_(W.to(self.weight) - torch.eye(self.d_model).to(self.weight))
        if self.bias is not None:
            self.bias.copy_(b)


class LinearTranslator(Translator):
    """ "linear": W h, no bias at all, W = I at init so it starts as the logit lens. A
    linear map sends 0 to 0, so unlike "affine" it cannot add a constant vector: what the
    affine bias does here (the residual stream's large constant component) W must do from
    the input's own mean. Its weight decay is centred on I (``identity_centred``)."""

    kind = "linear"
    intercept = False

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.weight = nn.Parameter(torch.eye(d_model))  # (d_out, d_in)

    @property
    def opts(self) -> dict[str, Any]:
        return {}

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight)  # (..., d)

    def affine_map(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        w = self.weight.detach().to(dtype or self.weight.dtype)  # W h = h + (W - I) h + 0
        w = w - torch.eye(self.d_model, dtype=w.dtype, device=w.device)
        return w, _bias(None, w)

    @torch.no_grad()
    def set_affine_map(self, W: Tensor, b: Tensor) -> None:
        _check_fit(self, W, b)
        self.weight.copy_(W)

    def identity_centred(self) -> list[nn.Parameter]:
        return [self.weight]  # W h is the identity at W = I


def _check_fit(t: Translator, W: Tensor, b: Tensor) -> None:
    """A least-squares solution (W (d, d), b (d,)) fits translator t: shapes, and no
    intercept for a translator without a bias (its fit must be solved without one)."""
    d = t.d_model
    if tuple(W.shape) != (d, d) or tuple(b.shape) != (d,):
        raise LenspipeError(
            f"least-squares solution has shapes {tuple(W.shape)}, {tuple(b.shape)}, not ({d}, {d}), ({d},)"
        )
    if not t.intercept and b.abs().max().item() > 1e-6 * max(1.0, W.abs().max().item()):
        raise LenspipeError(f"least-squares solution has a nonzero intercept but the {t.kind!r} translator has no bias")


class MLPTranslator(Translator):
    """h + (A h + b) + W2 act(W1 h + b1): the affine translator plus an MLP branch of ``depth``
    hidden layers of width ``hidden``. The affine part starts from least squares and the
    branch's output layer at zero, so at step 0 an mlp lens *is* the affine least-squares
    lens and its KL steps can only add to it. (An MLP alone, h + W2 act(W1 h), contains no
    affine path: it cannot express the least-squares map, and from the identity it read 6-7x
    worse than affine after the default steps, an artefact of its start.)

    ``affine=False`` is the parametrisation of lenspipe before the affine path (h + W2
    act(W1 h + b1) + b2), kept so that older mlp lenses still load. ``residual=False`` drops
    the ``h +``."""

    kind = "mlp"

    def __init__(
        self,
        d_model: int,
        *,
        hidden: int | None = None,
        depth: int = 1,
        activation: str = "gelu",
        residual: bool = True,
        bias: bool = True,
        affine: bool = True,
    ):
        super().__init__(d_model)
        if depth not in (1, 2):
            raise LenspipeError(f"mlp translator: depth must be 1 or 2, not {depth!r}")
        if activation not in ACTIVATIONS:
            raise LenspipeError(f"mlp translator: activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.hidden, self.depth, self.activation, self.residual = hidden or d_model, depth, activation, residual
        self.bias = bias
        widths = [d_model] + [self.hidden] * depth
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out, bias=bias), ACTIVATIONS[activation]()]
        self.net = nn.Sequential(*layers)
        # the affine part's bias is the branch's output bias too: one constant, not two
        self.affine = nn.Linear(d_model, d_model, bias=bias) if affine else None
        self.out = nn.Linear(self.hidden, d_model, bias=bias and not affine)
        if self.affine is not None:
            nn.init.zeros_(self.affine.weight)
            if bias:
                nn.init.zeros_(self.affine.bias)
        if residual or affine:
            nn.init.zeros_(self.out.weight)
            if self.out.bias is not None:
                nn.init.zeros_(self.out.bias)

    @property
    def opts(self) -> dict[str, Any]:
        return {
            "hidden": self.hidden,
            "depth": self.depth,
            "activation": self.activation,
            "residual": self.residual,
            "bias": self.bias,
            "affine": self.affine is not None,
        }

    @property
    def intercept(self) -> bool:
        return self.bias

    def branch(self) -> list[nn.Parameter]:
        # only beside an affine path: without one the branch is the whole translator
        return [*self.net.parameters(), *self.out.parameters()] if self.affine is not None else []

    def forward(self, h: Tensor) -> Tensor:
        out = self.out(self.net(h))  # (..., d)
        if self.affine is not None:
            out = out + self.affine(h)
        return h + out if self.residual else out

    @torch.no_grad()
    def set_affine_map(self, W: Tensor, b: Tensor) -> None:
        if self.affine is None:
            super().set_affine_map(W, b)
        _check_fit(self, W, b)
        eye = torch.eye(self.d_model).to(self.affine.weight) if self.residual else 0
        self.affine.weight.copy_(W.to(self.affine.weight) - eye)
        if self.affine.bias is not None:
            self.affine.bias.copy_(b)
        self.out.weight.zero_()  # the branch adds nothing: the map is exactly W h + b


class ScalingTranslator(Translator):
    """h + (s * h + b), per-dimension s and b, both zero at init (effective scale 1 + s):
    residual rather than h * s' + b (s' = 1) so that, as for "affine", weight decay pulls
    towards the identity rather than towards 0."""

    kind = "scaling"

    def __init__(self, d_model: int, *, bias: bool = True):
        super().__init__(d_model)
        self.scale = nn.Parameter(torch.zeros(d_model))  # (d,)
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None  # (d,)

    @property
    def opts(self) -> dict[str, Any]:
        return {"bias": self.bias is not None}

    def forward(self, h: Tensor) -> Tensor:
        out = h + h * self.scale  # (..., d)
        return out + self.bias if self.bias is not None else out

    @property
    def intercept(self) -> bool:
        return self.bias is not None

    def affine_map(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        w = torch.diag(self.scale.detach().to(dtype or self.scale.dtype))  # (d, d)
        return w, _bias(self.bias, w)

    @torch.no_grad()
    def fit_closed_form(self, stats: LeastSquaresAccumulator, ridge: float) -> None:
        """The per-dimension least-squares fit y_i ~ s_i x_i + c_i (its own function class:
        the diagonal of the full fit is not the best diagonal map)."""
        s, c = stats.solve_diagonal(ridge, intercept=self.intercept)  # (d,), (d,)
        self.scale.copy_(s - 1)  # h + h * scale: total scale 1 + scale
        if self.bias is not None:
            self.bias.copy_(c)


def _bias(bias: nn.Parameter | None, like: Tensor) -> Tensor:
    """A translator's bias as a detached (d,) tensor like ``like``; zeros when it has none."""
    if bias is None:
        return torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)
    return bias.detach().to(like.dtype)


def make_translator(kind: str, d_model: int, **opts) -> Translator:
    """A fresh translator of a registered ``kind`` (pipeline.lens.kinds), starting as the identity."""
    cls = kinds.get(kind).translator_class()
    try:
        return cls(d_model, **opts)
    except TypeError as exc:  # an option this kind does not have
        raise LenspipeError(f"bad options {sorted(opts)} for translator kind {kind!r}: {exc}") from None
