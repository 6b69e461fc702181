"""Lens positions: where in a block the residual stream is read. One table that the config,
the schema, the store, the lenses, training, evaluation, the tables and the report read
(``extract.positions`` lists names of :data:`POSITIONS`). No torch, no zarr.

- ``block``: the residual stream between blocks (``model.residual.LAYER_CONVENTION``):
  layer ``l`` is the input of block ``l`` (0 = the embeddings), ``n_layers`` the output of
  the last block; ``n_layers + 1`` states per token.
- ``attention``: inside block ``l``, the residual after its attention sublayer's add and
  before its MLP (for parallel-attention families, the block input plus the attention
  output alone, as if the MLP came after it; see ``model.sublayers``); ``n_layers``
  states per token, layers ``0..n_layers-1``.

On the depth axis attention ``l`` sits half-way through block ``l``: block 0, attention 0,
block 1, attention 1, ..., block ``n_layers`` (:func:`depth_order`, :func:`depth`). A lens
position is a key ``(position, layer)``; :func:`label` is its name in saved state and in
JSON (``"12"`` for block 12, as lenses have always named it; ``"attn.12"`` for attention 12).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

Key = tuple[str, int]
"""A lens position: (position name, layer)."""


@dataclass(frozen=True)
class Position:
    name: str
    """The config value (``extract.positions``) and the tables' ``position`` column."""
    array: str
    """The store array holding its states (n_states, n_tokens, d_model)."""
    scale_array: str
    """The store array of its per-row scales in the 8-bit dtypes (n_states, n_tokens)."""
    extra: int
    """States beyond ``n_layers``: 1 for ``block`` (the output), 0 for ``attention``."""
    offset: float
    """Its place on the depth axis, in layers after the block boundary ``layer``."""
    prefix: str
    """What precedes the layer in a key's :func:`label` (saved state, JSON keys)."""
    meaning: str

    def n_states(self, n_layers: int) -> int:
        return n_layers + self.extra

    @property
    def layer_word(self) -> str:
        """How messages name one of its states: ``layer 3``, ``attention layer 3``."""
        return "layer" if self.extra else f"{self.name} layer"


BLOCK = Position(
    "block", "resid", "scale", 1, 0.0, "", "the residual stream between blocks: layer l is the input of block l"
)
ATTENTION = Position(
    "attention",
    "attn",
    "attn_scale",
    0,
    0.5,
    "attn.",
    "inside block l, the residual after its attention sublayer, before its MLP",
)
POSITIONS: dict[str, Position] = {p.name: p for p in (BLOCK, ATTENTION)}
#: What every lenspipe before positions extracted, and the default: block states only.
DEFAULT = ("block",)


def names() -> list[str]:
    return list(POSITIONS)


def check(positions: Iterable[str]) -> tuple[str, ...]:
    """``positions`` in registry order; raises ValueError naming an unknown one, or if
    ``block`` is missing (every lens and the targets of training need the block states)."""
    given = list(positions)
    bad = [p for p in given if p not in POSITIONS]
    if bad:
        raise ValueError(f"unknown position(s) {bad}; positions are {names()}")
    if BLOCK.name not in given:
        raise ValueError(f"positions must include {BLOCK.name!r} (the output every lens is compared with)")
    return tuple(p for p in POSITIONS if p in given)


def depth_order(n_layers: int, positions: Iterable[str] = DEFAULT, layers: Iterable[int] | None = None) -> list[Key]:
    """The keys of ``positions`` at ``layers`` (default every lens layer 0..n_layers-1), in
    depth order: block 0, attention 0, block 1, attention 1, ..."""
    layers = range(n_layers) if layers is None else sorted(set(layers))
    wanted = [POSITIONS[p] for p in check(positions)]
    return [(p.name, layer) for layer in layers for p in wanted if layer < p.n_states(n_layers)]


def as_key(key: Key | int) -> Key:
    """A lens position; a bare layer is that layer's block position (as before positions)."""
    return key if isinstance(key, tuple) else (BLOCK.name, int(key))


def depth_rank(key: Key) -> tuple[int, float]:
    """Sort key of a lens position in depth order."""
    return key[1], POSITIONS[key[0]].offset


def depth(position: str, layer: int, n_layers: int) -> float:
    """(layer + offset) / n_layers: block l at l / n_layers, attention l half a block later."""
    return (layer + POSITIONS[position].offset) / n_layers


def label(key: Key) -> str:
    """A key's name in saved state and JSON: ``"12"`` (block 12), ``"attn.12"`` (attention 12)."""
    return f"{POSITIONS[key[0]].prefix}{key[1]}"


def parse_label(text: str) -> Key:
    """The inverse of :func:`label`."""
    for p in POSITIONS.values():
        if p.prefix and text.startswith(p.prefix):
            return p.name, int(text[len(p.prefix) :])
    return BLOCK.name, int(text)
