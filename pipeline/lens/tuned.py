"""Logit and tuned lenses (Belrose et al. 2023, arXiv:2303.08112): residual state -> logits.

Layer ``i`` is residual index ``i`` of ``model.residual.LAYER_CONVENTION`` (the input of
block ``i``); index ``n_layers`` is the model's own output and needs no translator. A lens
may also have translators at the ``attention`` position (``pipeline.positions``: inside
block ``i``, after its attention sublayer): separate translators of the same kind, saved in
the same file under ``attn.{layer}.*``. Every method takes a ``position`` (default
``block``); a lens position is the key (position, layer). Also:
lenspipe's own lens format (``translators.safetensors`` + ``lens.json``). The tuned-lens
0.2.x format is :mod:`pipeline.lens.reference`; the closed-form start :mod:`pipeline.lens.lstsq`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import positions as P
from ..cards import CARD, corpus_of, lens_card
from ..errors import LenspipeError
from ..model.head import UnembedHead, load_unembed_head
from ..model.prepare import read_model_info
from ..model.residual import LAYER_CONVENTION
from ..provenance import atomic_dir, now_utc, package_versions, sha256_file, write_json_atomic
from .translators import Translator, make_translator

FORMAT_NAME = "lenspipe-tuned-lens"
FORMAT_VERSION = 1
WEIGHTS_FILE, META_FILE = "translators.safetensors", "lens.json"
#: model_info keys copied into a saved lens as the identity of the model it was trained on.
IDENTITY_KEYS = (
    "name",
    "source",
    "revision",
    "resolved_commit",
    "model_type",
    "n_layers",
    "d_model",
    "vocab",
    "weights_sha256",
    "tokenizer_sha256",
)


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

    def translate(self, h: Tensor, layer: int, position: str = "block") -> Tensor:
        return h

    def forward(self, h: Tensor, layer: int, position: str = "block") -> Tensor:
        return self.head(h)  # (..., vocab)


class TunedLens(nn.Module):
    """logits = head(translator_layer(h)) for each layer's translator; only the translators are trainable.

    The head is shared, not copied (an unembedding can be GBs), and frozen in place: if it
    came from ``unembed_head(model)`` this also freezes those modules of ``model``.
    """

    def __init__(
        self,
        head: UnembedHead,
        translators: dict[int, Translator] | nn.ModuleDict,
        *,
        kind: str,
        d_model: int,
        n_layers: int,
        model_info: dict,
        origin: dict | None = None,
        attention: dict[int, Translator] | nn.ModuleDict | None = None,
    ):
        super().__init__()
        items = {int(k): t for k, t in translators.items()}
        mids = {int(k): t for k, t in (attention or {}).items()}
        if not items:
            raise LenspipeError("a tuned lens needs at least one translator")
        bad = [i for i in items if not 0 <= i < n_layers]
        if bad:
            raise LenspipeError(
                f"translators for layers {bad}: layers are 0..{n_layers - 1} "
                f"(layer {n_layers} is the model's output and needs none)"
            )
        bad = [i for i in mids if not 0 <= i < n_layers]
        if bad:
            raise LenspipeError(f"attention translators for layers {bad}: blocks are 0..{n_layers - 1}")
        every = [*items.values(), *mids.values()]
        if any(t.kind != kind or t.d_model != d_model for t in every):
            raise LenspipeError(f"all translators must be {kind!r} with d_model={d_model}")
        opts = {json.dumps(t.opts, sort_keys=True) for t in every}
        if len(opts) > 1:
            raise LenspipeError(f"translators of one lens must share their options, got {sorted(opts)}")
        for key, want in (("d_model", d_model), ("n_layers", n_layers)):
            if model_info.get(key) not in (None, want):
                raise LenspipeError(f"lens {key}={want} but the model has {key}={model_info[key]}")
        _check_head(head, d_model)
        self.head = head.requires_grad_(False)
        self.translators = nn.ModuleDict({str(k): items[k] for k in sorted(items)})
        """The block position's translators, by layer."""
        self.attention = nn.ModuleDict({str(k): mids[k] for k in sorted(mids)})
        """The attention position's translators, by layer (often none)."""
        self.kind, self.d_model, self.n_layers = kind, d_model, n_layers
        self.model_info, self.origin = dict(model_info), origin
        self.opts = json.loads(opts.pop())

    @classmethod
    def create(
        cls,
        head: UnembedHead,
        kind: str,
        *,
        d_model: int,
        n_layers: int,
        model_info: dict,
        layers: list[int] | None = None,
        attention_layers: list[int] | None = None,
        seed: int | None = None,
        **opts,
    ) -> TunedLens:
        """A fresh lens (= the logit lens) with a ``kind`` translator per layer (default all),
        and one per layer of ``attention_layers`` at the attention position (default none).
        ``seed``: a kind's random init (an mlp's branch) is drawn per lens position from
        (seed, position, layer), so a layer's translator does not depend on the others."""
        layers = list(range(n_layers)) if layers is None else layers

        def fresh(position: int, layer: int):
            if seed is None:
                return make_translator(kind, d_model, **opts)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + position * 10_007 + layer)
                return make_translator(kind, d_model, **opts)

        translators = {i: fresh(0, i) for i in layers}
        attention = {i: fresh(1, i) for i in attention_layers or []}
        return cls(
            head, translators, kind=kind, d_model=d_model, n_layers=n_layers, model_info=model_info, attention=attention
        )

    @property
    def layers(self) -> list[int]:
        """The block layers with a translator."""
        return [int(k) for k in self.translators]

    @property
    def attention_layers(self) -> list[int]:
        """The layers with a translator at the attention position."""
        return [int(k) for k in self.attention]

    @property
    def positions(self) -> tuple[str, ...]:
        return P.DEFAULT + ((P.ATTENTION.name,) if len(self.attention) else ())

    def keys(self) -> list[P.Key]:
        """Every lens position with a translator, in depth order (block 0, attention 0, ...)."""
        return sorted(
            [(P.BLOCK.name, i) for i in self.layers] + [(P.ATTENTION.name, i) for i in self.attention_layers],
            key=P.depth_rank,
        )

    def _dict(self, position: str) -> nn.ModuleDict:
        if position not in P.POSITIONS:
            raise LenspipeError(f"unknown lens position {position!r}; positions are {P.names()}")
        return self.translators if position == P.BLOCK.name else self.attention

    def translator(self, key: P.Key) -> Translator:
        """The translator of lens position ``key`` = (position, layer)."""
        position, layer = key
        translators = self._dict(position)
        if str(layer) not in translators:
            where = "" if position == P.BLOCK.name else f" at the {position} position"
            have = self.layers if position == P.BLOCK.name else self.attention_layers
            raise LenspipeError(f"this lens has no translator for layer {layer}{where} (it has {have})")
        return translators[str(layer)]

    def translate(self, h: Tensor, layer: int, position: str = "block") -> Tensor:
        if layer == self.n_layers and position == P.BLOCK.name:
            return h  # the last block's output: the head alone gives the model's logits
        return self.translator((position, layer))(h)  # (..., d_model)

    def forward(self, h: Tensor, layer: int, position: str = "block") -> Tensor:
        return self.head(self.translate(h, layer, position))  # (..., vocab)

    def merge(self, other: TunedLens) -> TunedLens:
        """The union of two lenses trained on disjoint layer groups (translators shared)."""
        mine, theirs = self._signature(), other._signature()
        if mine != theirs:
            raise LenspipeError(f"cannot merge lenses of different models or kinds: {mine} vs {theirs}")
        overlap = set(self.keys()) & set(other.keys())
        if overlap:
            where = [
                f"{pos.layer_word}s {sorted(layer for p, layer in overlap if p == pos.name)}"
                for pos in P.POSITIONS.values()
                if any(p == pos.name for p, _ in overlap)
            ]
            raise LenspipeError(f"cannot merge lenses: both have translators for {' and '.join(where)}")
        both = {**dict(self.translators.items()), **dict(other.translators.items())}
        mids = {**dict(self.attention.items()), **dict(other.attention.items())}
        return TunedLens(
            self.head,
            both,
            kind=self.kind,
            d_model=self.d_model,
            n_layers=self.n_layers,
            model_info=self.model_info,
            origin=self.origin,
            attention=mids,
        )

    def _signature(self) -> dict[str, Any]:
        return {
            "weights_sha256": self.model_info.get("weights_sha256"),
            "kind": self.kind,
            "opts": self.opts,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
        }

    def translator_state(self) -> dict[str, Tensor]:
        """Every translator's parameters: ``{layer}.{param}`` at the block position (as lenses
        have always saved them), ``attn.{layer}.{param}`` at the attention position."""
        state = dict(self.translators.state_dict())
        state.update({f"{P.ATTENTION.prefix}{k}": v for k, v in self.attention.state_dict().items()})
        return state

    def load_translator_state(self, state: dict[str, Tensor]) -> None:
        """The inverse of :meth:`translator_state` (strict: every key, nothing else)."""
        prefix = P.ATTENTION.prefix
        self.translators.load_state_dict({k: v for k, v in state.items() if not k.startswith(prefix)}, strict=True)
        self.attention.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True
        )

    # ----------------------------------------------------------------------- own format

    def save(self, path: str | Path, *, training_config: dict | None = None, metrics: dict | None = None) -> None:
        """Write ``path/`` = translators.safetensors + lens.json, atomically."""
        state = {
            k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.translator_state().items()
        }  # "{layer}.{param}", "attn.{layer}.{param}"
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "translator_opts": self.opts,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "layers": self.layers,
            "layer_convention": LAYER_CONVENTION,
            # only where there are any: a block-only lens.json is that of a lens from before positions
            **(
                {"attention_layers": self.attention_layers, "attention_position": P.ATTENTION.meaning}
                if len(self.attention)
                else {}
            ),
            "model": {k: self.model_info[k] for k in IDENTITY_KEYS if k in self.model_info},
            "origin": self.origin,
            "training_config": training_config,
            "metrics": metrics,
            "versions": package_versions(),
            "created": now_utc(),
        }
        with atomic_dir(path) as tmp:
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
            meta["translators_sha256"] = sha256_file(tmp / WEIGHTS_FILE)
            write_json_atomic(tmp / META_FILE, meta)
            # a README.md card, so the directory can be shared on a hub as it is
            (tmp / CARD).write_text(lens_card(meta, corpus_of(Path(path))))

    @classmethod
    def load(cls, path: str | Path, head: UnembedHead | None = None, model_dir: str | Path | None = None) -> TunedLens:
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
        if meta["kind"] == "linear" and "bias" in meta["translator_opts"]:
            raise LenspipeError(
                f"{path} is a 'linear' lens of an older lenspipe, whose linear translators (W h + b) "
                "had a bias and so were the function class of 'affine'; 'linear' is now W h without "
                "one: retrain it (or train 'affine')"
            )
        opts = dict(meta["translator_opts"])
        if meta["kind"] == "mlp":
            opts.setdefault("affine", False)  # an mlp lens from before the affine path

        def fresh(layers):
            return {i: make_translator(meta["kind"], meta["d_model"], **opts) for i in layers}

        lens = cls(
            head,
            fresh(meta["layers"]),
            kind=meta["kind"],
            d_model=meta["d_model"],
            n_layers=meta["n_layers"],
            model_info=meta["model"],
            origin=meta.get("origin"),
            attention=fresh(meta.get("attention_layers", [])),
        )
        try:
            lens.load_translator_state(load_file(str(path / WEIGHTS_FILE)))
        except RuntimeError as exc:
            raise LenspipeError(f"{path / WEIGHTS_FILE} does not fit its {META_FILE}: {exc}") from None
        return lens


@torch.no_grad()
def logits_into(lens: LogitLens | TunedLens, h: Tensor, layer: int, position: str = "block") -> Tensor:
    """(n, vocab) logits of ``lens`` at ``layer`` (of ``position``) for h (n, d_model), no gradient, written
    into this thread's reused buffer (``metrics.workspace``): evaluation and validation run
    every lens at every layer, and a fresh (n, vocab) tensor per call was mostly page faults.
    The result is overwritten by the next call in this thread."""
    from ..metrics import workspace

    h = lens.translate(h, layer, position)  # (n, d_model)
    w = lens.head.unembed.weight
    vocab = getattr(lens.head.unembed, "out_features", None)  # None: a head without a buffer path
    out = None if vocab is None else workspace().take("logits", (h.shape[0], vocab), w.dtype, w.device)
    return lens.head(h, out=out)


def read_lens_meta(path: Path) -> dict[str, Any]:
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise LenspipeError(f"{path} is not a saved lens (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_NAME or meta.get("format_version", 0) > FORMAT_VERSION:
        raise LenspipeError(
            f"{meta_path}: format {meta.get('format')!r} v{meta.get('format_version')} "
            f"is not {FORMAT_NAME!r} v<={FORMAT_VERSION}"
        )
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
