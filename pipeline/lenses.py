"""Logit and tuned lenses (Belrose et al. 2023, arXiv:2303.08112): residual state -> logits.

Layer ``i`` is residual index ``i`` of ``surgery.LAYER_CONVENTION`` (the input of block
``i``); index ``n_layers`` is the model's own output and needs no translator. Also: the
tuned-lens 0.2.x file format, and a closed-form (least-squares) initialiser. No training loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from . import translators
from .errors import LenspipeError
from .model import read_model_info
from .provenance import atomic_dir, now_utc, package_versions, sha256_file, write_json_atomic
from .surgery import LAYER_CONVENTION, UnembedHead, load_unembed_head

log = logging.getLogger(__name__)

FORMAT_NAME = "lenspipe-tuned-lens"
FORMAT_VERSION = 1
WEIGHTS_FILE, META_FILE = "translators.safetensors", "lens.json"
REF_CONFIG, REF_PARAMS, REF_LENS_TYPE = "config.json", "params.pt", "linear_tuned_lens"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
#: model_info keys copied into a saved lens as the identity of the model it was trained on.
IDENTITY_KEYS = ("name", "source", "revision", "resolved_commit", "model_type", "n_layers",
                 "d_model", "vocab", "weights_sha256", "tokenizer_sha256")


# --------------------------------------------------------------------------- translators

class Translator(nn.Module):
    """h (..., d_model) -> h' (..., d_model). ``make_translator(t.kind, d, **t.opts)`` rebuilds t.

    A kind is registered in :mod:`pipeline.translators`; what a subclass says about itself
    there (``linear_map``, ``lstsq``) it implements here (``affine_map``, ``set_affine_map``).
    """

    kind: str
    opts: dict[str, Any]  # a property of each kind: the options that rebuild it

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model

    def affine_map(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(W (d, d), b (d,)) with translator(h) = h + W h + b exactly, for kinds that are
        affine maps (translator anatomy, the tuned-lens export); detached, in ``dtype``."""
        raise LenspipeError(f"a {self.kind!r} translator is no affine map h + W h + b")

    def set_affine_map(self, W: Tensor, b: Tensor) -> None:
        """Set the translator to h -> W h + b (the least-squares start), for kinds that can."""
        lstsq = [k.name for k in translators.KINDS.values() if k.lstsq]
        raise LenspipeError(f"least-squares initialisation is for {'/'.join(lstsq)} translators, not {self.kind!r}")

    def identity_centred(self) -> list[nn.Parameter]:
        """Parameters whose value at the identity (the logit lens) is not zero: weight decay
        pulls them toward that value rather than toward 0 (see pipeline.train)."""
        return []


class AffineTranslator(Translator):
    """residual=True ("affine"): h + W h + b, W = b = 0 at init, as in the reference (weight
    decay then pulls towards the identity, i.e. the logit lens). residual=False ("linear"):
    W h + b with W = I, b = 0 at init, so it too starts as the logit lens."""

    def __init__(self, d_model: int, *, residual: bool = True, bias: bool = True):
        super().__init__(d_model)
        self.residual = residual
        eye = torch.zeros(d_model, d_model) if residual else torch.eye(d_model)
        self.weight = nn.Parameter(eye)  # (d_out, d_in)
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None  # (d,)

    kind = property(lambda self: "affine" if self.residual else "linear")  # type: ignore[assignment]

    @property
    def opts(self) -> dict[str, Any]:
        return {"bias": self.bias is not None}

    def forward(self, h: Tensor) -> Tensor:
        out = F.linear(h, self.weight, self.bias)  # (..., d)
        return h + out if self.residual else out

    def affine_map(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        w = self.weight.detach().to(dtype or self.weight.dtype)  # (d, d)
        if not self.residual:  # W h + b = h + (W - I) h + b
            w = w - torch.eye(self.d_model, dtype=w.dtype, device=w.device)
        return w, _bias(self.bias, w)

    @torch.no_grad()
    def set_affine_map(self, W: Tensor, b: Tensor) -> None:
        d, weight, bias = self.d_model, self.weight, self.bias
        if tuple(W.shape) != (d, d) or tuple(b.shape) != (d,):
            raise LenspipeError(f"least-squares solution has shapes {tuple(W.shape)}, {tuple(b.shape)}, "
                                f"not ({d}, {d}), ({d},)")
        if bias is None and b.abs().max().item() > 1e-6 * max(1.0, W.abs().max().item()):
            raise LenspipeError("least-squares solution has a nonzero intercept but the translator has no bias")
        # residual: h + W' h = W h  <=>  W' = W - I
        weight.copy_(W.to(weight) - torch.eye(d).to(weight) if self.residual else W)
        if bias is not None:
            bias.copy_(b)

    def identity_centred(self) -> list[nn.Parameter]:
        return [] if self.residual else [self.weight]  # W h + b is the identity at W = I


class LinearTranslator(AffineTranslator):
    """W h + b, W = I and b = 0 at init (the non-residual AffineTranslator)."""

    def __init__(self, d_model: int, *, bias: bool = True):
        super().__init__(d_model, residual=False, bias=bias)


class MLPTranslator(Translator):
    """h + W2 act(W1 h + b1) + b2, ``depth`` hidden layers of width ``hidden``; the output
    layer is zero-initialised so it starts as the identity. residual=False drops the ``h +``
    and keeps PyTorch's default init everywhere: it does NOT start as the logit lens (an MLP
    cannot be the identity exactly; a zero output layer would start it as the constant 0)."""

    kind = "mlp"

    def __init__(self, d_model: int, *, hidden: int | None = None, depth: int = 1,
                 activation: str = "gelu", residual: bool = True, bias: bool = True):
        super().__init__(d_model)
        if depth not in (1, 2):
            raise LenspipeError(f"mlp translator: depth must be 1 or 2, not {depth!r}")
        if activation not in ACTIVATIONS:
            raise LenspipeError(f"mlp translator: activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.hidden, self.depth, self.activation, self.residual = hidden or d_model, depth, activation, residual
        widths = [d_model] + [self.hidden] * depth
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out, bias=bias), ACTIVATIONS[activation]()]
        self.net = nn.Sequential(*layers)
        self.out = nn.Linear(self.hidden, d_model, bias=bias)
        if residual:
            nn.init.zeros_(self.out.weight)
            if bias:
                nn.init.zeros_(self.out.bias)

    @property
    def opts(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "depth": self.depth, "activation": self.activation,
                "residual": self.residual, "bias": self.out.bias is not None}

    def forward(self, h: Tensor) -> Tensor:
        out = self.out(self.net(h))  # (..., d)
        return h + out if self.residual else out


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

    def affine_map(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        w = torch.diag(self.scale.detach().to(dtype or self.scale.dtype))  # (d, d)
        return w, _bias(self.bias, w)


def _bias(bias: nn.Parameter | None, like: Tensor) -> Tensor:
    """A translator's bias as a detached (d,) tensor like ``like``; zeros when it has none."""
    if bias is None:
        return torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)
    return bias.detach().to(like.dtype)


def make_translator(kind: str, d_model: int, **opts) -> Translator:
    """A fresh translator of a registered ``kind`` (pipeline.translators), starting as the identity."""
    cls = translators.get(kind).translator_class()
    try:
        return cls(d_model, **opts)
    except TypeError as exc:  # an option this kind does not have
        raise LenspipeError(f"bad options {sorted(opts)} for translator kind {kind!r}: {exc}") from None


# --------------------------------------------------------------------------- lenses

def _check_head(head: UnembedHead, d_model: int) -> None:
    """Run the head on one zero row: a head of another width fails here, not mid-training."""
    try:
        with torch.no_grad():
            head(torch.zeros(1, d_model, device=head.unembed.weight.device))
    except RuntimeError as exc:
        raise LenspipeError(f"the unembedding head does not accept d_model={d_model} inputs: {exc}") from None


class LogitLens(nn.Module):
    """logits = head(h) at every layer (nostalgebraist 2020): the tuned lens at init."""

    def __init__(self, head: UnembedHead):
        super().__init__()
        self.head = head

    def translate(self, h: Tensor, layer: int) -> Tensor:
        return h

    def forward(self, h: Tensor, layer: int) -> Tensor:
        return self.head(h)  # (..., vocab)


class TunedLens(nn.Module):
    """logits = head(translator[layer](h)); only the translators are trainable.

    The head is shared, not copied (an unembedding can be GBs), and frozen in place: if it
    came from ``unembed_head(model)`` this also freezes those modules of ``model``.
    """

    def __init__(self, head: UnembedHead, translators: dict[int, Translator] | nn.ModuleDict, *,
                 kind: str, d_model: int, n_layers: int, model_info: dict, origin: dict | None = None):
        super().__init__()
        items = {int(k): t for k, t in translators.items()}
        if not items:
            raise LenspipeError("a tuned lens needs at least one translator")
        bad = [i for i in items if not 0 <= i < n_layers]
        if bad:
            raise LenspipeError(f"translators for layers {bad}: layers are 0..{n_layers - 1} "
                                f"(layer {n_layers} is the model's output and needs none)")
        if any(t.kind != kind or t.d_model != d_model for t in items.values()):
            raise LenspipeError(f"all translators must be {kind!r} with d_model={d_model}")
        opts = {json.dumps(t.opts, sort_keys=True) for t in items.values()}
        if len(opts) > 1:
            raise LenspipeError(f"translators of one lens must share their options, got {sorted(opts)}")
        for key, want in (("d_model", d_model), ("n_layers", n_layers)):
            if model_info.get(key) not in (None, want):
                raise LenspipeError(f"lens {key}={want} but the model has {key}={model_info[key]}")
        _check_head(head, d_model)
        self.head = head.requires_grad_(False)
        self.translators = nn.ModuleDict({str(k): items[k] for k in sorted(items)})
        self.kind, self.d_model, self.n_layers = kind, d_model, n_layers
        self.model_info, self.origin = dict(model_info), origin
        self.opts = json.loads(opts.pop())

    @classmethod
    def create(cls, head: UnembedHead, kind: str, *, d_model: int, n_layers: int, model_info: dict,
               layers: list[int] | None = None, **opts) -> TunedLens:
        """A fresh lens (= the logit lens) with a ``kind`` translator per layer (default all)."""
        layers = list(range(n_layers)) if layers is None else layers
        translators = {i: make_translator(kind, d_model, **opts) for i in layers}
        kind = translators[layers[0]].kind if layers else kind  # affine + residual=False is "linear"
        return cls(head, translators, kind=kind, d_model=d_model, n_layers=n_layers, model_info=model_info)

    @property
    def layers(self) -> list[int]:
        return [int(k) for k in self.translators]

    def translate(self, h: Tensor, layer: int) -> Tensor:
        if layer == self.n_layers:
            return h  # the last block's output: the head alone gives the model's logits
        if str(layer) not in self.translators:
            raise LenspipeError(f"this lens has no translator for layer {layer} (it has {self.layers})")
        return self.translators[str(layer)](h)  # (..., d_model)

    def forward(self, h: Tensor, layer: int) -> Tensor:
        return self.head(self.translate(h, layer))  # (..., vocab)

    def merge(self, other: TunedLens) -> TunedLens:
        """The union of two lenses trained on disjoint layer groups (translators shared)."""
        mine, theirs = self._signature(), other._signature()
        if mine != theirs:
            raise LenspipeError(f"cannot merge lenses of different models or kinds: {mine} vs {theirs}")
        overlap = sorted(set(self.layers) & set(other.layers))
        if overlap:
            raise LenspipeError(f"cannot merge lenses: both have translators for layers {overlap}")
        both = {**dict(self.translators.items()), **dict(other.translators.items())}
        return TunedLens(self.head, both, kind=self.kind, d_model=self.d_model,
                         n_layers=self.n_layers, model_info=self.model_info, origin=self.origin)

    def _signature(self) -> dict[str, Any]:
        return {"weights_sha256": self.model_info.get("weights_sha256"), "kind": self.kind,
                "opts": self.opts, "d_model": self.d_model, "n_layers": self.n_layers}

    # ----------------------------------------------------------------------- own format

    def save(self, path: str | Path, *, training_config: dict | None = None,
             metrics: dict | None = None) -> None:
        """Write ``path/`` = translators.safetensors + lens.json, atomically."""
        state = {k: v.detach().to("cpu", torch.float32).contiguous()
                 for k, v in self.translators.state_dict().items()}  # "{layer}.{param}"
        meta = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": self.kind,
            "translator_opts": self.opts, "d_model": self.d_model, "n_layers": self.n_layers,
            "layers": self.layers, "layer_convention": LAYER_CONVENTION,
            "model": {k: self.model_info[k] for k in IDENTITY_KEYS if k in self.model_info},
            "origin": self.origin, "training_config": training_config, "metrics": metrics,
            "versions": package_versions(), "created": now_utc(),
        }
        with atomic_dir(path) as tmp:
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
            meta["translators_sha256"] = sha256_file(tmp / WEIGHTS_FILE)
            write_json_atomic(tmp / META_FILE, meta)

    @classmethod
    def load(cls, path: str | Path, head: UnembedHead | None = None,
             model_dir: str | Path | None = None) -> TunedLens:
        """Read a saved lens; with ``model_dir``, check it was trained on that model."""
        path = Path(path)
        meta = read_lens_meta(path)
        if model_dir is not None:
            _check_same_model(meta, Path(model_dir))
        if head is None:
            if model_dir is None:
                raise LenspipeError("TunedLens.load needs the unembedding head or the model_dir")
            head = load_unembed_head(model_dir)
        if sha256_file(path / WEIGHTS_FILE) != meta.get("translators_sha256"):
            raise LenspipeError(f"{path / WEIGHTS_FILE} does not match the hash in its {META_FILE}: corrupt lens")
        translators = nn.ModuleDict({str(i): make_translator(meta["kind"], meta["d_model"], **meta["translator_opts"])
                                     for i in meta["layers"]})
        try:
            translators.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
        except RuntimeError as exc:
            raise LenspipeError(f"{path / WEIGHTS_FILE} does not fit its {META_FILE}: {exc}") from None
        return cls(head, translators, kind=meta["kind"], d_model=meta["d_model"], n_layers=meta["n_layers"],
                   model_info=meta["model"], origin=meta.get("origin"))

    # ----------------------------------------------------------------------- tuned-lens 0.2.x

    def export_reference(self, path: str | Path) -> None:
        """Write ``path/`` in tuned-lens 0.2.x format (config.json + params.pt): one residual
        nn.Linear per layer 0..n_layers-1, so every layer needs an exactly affine translator
        (linear and scaling convert: weight = A - I). No bias is written as a zero bias:
        the reference's constructor cannot build a bias-free translator."""
        if self.layers != list(range(self.n_layers)):
            raise LenspipeError(f"the tuned-lens format needs translators for all layers 0..{self.n_layers - 1}; "
                                f"this lens has {self.layers} (merge the layer groups first)")
        if not translators.get(self.kind).linear_map:
            raise LenspipeError(f"the tuned-lens format holds affine translators only, not {self.kind!r}")
        state = {}
        for layer, t in self.translators.items():  # the reference computes h + (W h + b)
            w, b = t.affine_map(torch.float32)  # (d, d), (d,): "affine"'s own W, so the round trip is bit-exact
            state[f"{layer}.weight"], state[f"{layer}.bias"] = w.cpu(), b.cpu()
        info = self.model_info
        config = {  # exactly the fields of tuned_lens.nn.lenses.TunedLensConfig (0.2.0)
            "base_model_name_or_path": info.get("source") or info.get("name") or "unknown",
            "d_model": self.d_model, "num_hidden_layers": self.n_layers, "bias": True,
            "base_model_revision": info.get("resolved_commit") or info.get("revision"),
            "unembed_hash": reference_unembed_hash(self.head), "lens_type": REF_LENS_TYPE,
        }
        with atomic_dir(path) as tmp:
            torch.save(state, tmp / REF_PARAMS)  # ModuleList.state_dict() keys: "{i}.weight"
            write_json_atomic(tmp / REF_CONFIG, config)

    @classmethod
    def import_reference(cls, path: str | Path, head: UnembedHead, model_info: dict) -> TunedLens:
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
        return cls(head, translators, kind="affine", d_model=d, n_layers=n, model_info=model_info, origin=origin)


@torch.no_grad()
def logits_into(lens: LogitLens | TunedLens, h: Tensor, layer: int) -> Tensor:
    """(n, vocab) logits of ``lens`` at ``layer`` for h (n, d_model), no gradient, written
    into this thread's reused buffer (``metrics.workspace``): evaluation and validation run
    every lens at every layer, and a fresh (n, vocab) tensor per call was mostly page faults.
    The result is overwritten by the next call in this thread."""
    from .metrics import workspace

    h = lens.translate(h, layer)  # (n, d_model)
    w = lens.head.unembed.weight
    vocab = getattr(lens.head.unembed, "out_features", None)  # None: a head without a buffer path
    out = None if vocab is None else workspace().take("logits", (h.shape[0], vocab), w.dtype, w.device)
    return lens.head(h, out=out)


def reference_unembed_hash(head: UnembedHead) -> str:
    """tuned-lens 0.2.0's ``Unembed.unembedding_hash``: sha256 of the printed lm_head weight."""
    w = head.unembed.weight.detach().cpu().float().numpy()
    return hashlib.sha256(np.array_str(w, precision=1).encode()).hexdigest()


def read_lens_meta(path: Path) -> dict[str, Any]:
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise LenspipeError(f"{path} is not a saved lens (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_NAME or meta.get("format_version", 0) > FORMAT_VERSION:
        raise LenspipeError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('format_version')} "
                            f"is not {FORMAT_NAME!r} v<={FORMAT_VERSION}")
    return meta


def _check_same_model(meta: dict, model_dir: Path) -> None:
    info = read_model_info(model_dir)
    d_model = info.get("d_model")
    if d_model is None:  # older markers lack it: read the width from the config
        from transformers import AutoConfig

        d_model = AutoConfig.from_pretrained(model_dir).get_text_config().hidden_size
    lens_model = meta["model"]
    if lens_model.get("weights_sha256") != info.get("weights_sha256") or d_model != meta["d_model"]:
        raise LenspipeError(
            f"this lens was trained on model {lens_model.get('name')!r} (weights sha256 "
            f"{lens_model.get('weights_sha256')}, d_model {meta['d_model']}), not on the model in "
            f"{model_dir} ({info.get('name')!r}, weights sha256 {info.get('weights_sha256')}, d_model {d_model})"
        )


# --------------------------------------------------------------------------- least squares

class LeastSquaresAccumulator:
    """Streams the statistics of an affine fit Y ~ X A^T + c, in float64, O(N d^2).

    Keeps means and *centred* co-moments, merged per batch with Chan et al.'s update,
    instead of raw X^T X: residual streams have large mean components, and subtracting
    n * mean mean^T from raw sums at the end would cancel catastrophically.
    """

    def __init__(self, d_model: int, n_out: int | None = None, device: str | torch.device = "cpu"):
        d_out = n_out or d_model
        kw = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.mean_x, self.mean_y = torch.zeros(d_model, **kw), torch.zeros(d_out, **kw)  # (d_in,), (d_out,)
        self.cxx = torch.zeros(d_model, d_model, **kw)  # sum (x - mx)(x - mx)^T: (d_in, d_in)
        self.cxy = torch.zeros(d_model, d_out, **kw)  # sum (x - mx)(y - my)^T: (d_in, d_out)

    def update(self, x: Tensor, y: Tensor) -> None:
        x = x.detach().reshape(-1, self.cxx.shape[0]).to(self.cxx)  # (n, d_in)
        y = y.detach().reshape(-1, self.cxy.shape[1]).to(self.cxy)  # (n, d_out)
        if x.shape[0] != y.shape[0]:
            raise LenspipeError(f"least squares: {x.shape[0]} inputs but {y.shape[0]} targets")
        nb, n = x.shape[0], self.n + x.shape[0]
        if nb == 0:
            return
        mx, my = x.mean(0), y.mean(0)  # (d_in,), (d_out,)
        dx, dy = mx - self.mean_x, my - self.mean_y  # between-group mean differences
        self.cxx += (x - mx).T @ (x - mx) + (self.n * nb / n) * torch.outer(dx, dx)
        self.cxy += (x - mx).T @ (y - my) + (self.n * nb / n) * torch.outer(dx, dy)
        self.mean_x += dx * (nb / n)
        self.mean_y += dy * (nb / n)
        self.n = n

    def solve(self, ridge: float = 1e-6) -> tuple[Tensor, Tensor]:
        """(W (d_out, d_in), b (d_out,)) float32 minimising |Y - X W^T - b|^2 + lam |W|^2.

        lam = ridge * trace(Cxx) / d_in: relative to the average variance, so the same
        ``ridge`` suits any activation scale; it keeps rank-deficient X solvable.
        """
        if self.n < 2:
            raise LenspipeError(f"least squares needs at least 2 samples, got {self.n}")
        d_in = self.cxx.shape[0]
        lam = ridge * max(self.cxx.trace().item() / d_in, torch.finfo(torch.float64).tiny)
        reg = self.cxx + lam * torch.eye(d_in, dtype=self.cxx.dtype, device=self.cxx.device)
        w = torch.linalg.solve(reg, self.cxy).T  # (d_out, d_in)
        b = self.mean_y - w @ self.mean_x  # (d_out,)
        return w.float(), b.float()


def init_translator_lstsq(translator: Translator, W: Tensor, b: Tensor) -> None:
    """Set a translator so that translator(h) == W h + b (kinds registered with ``lstsq``)."""
    translator.set_affine_map(W, b)
