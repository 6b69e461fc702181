"""The registry of translator kinds: the one list of kinds every part of lenspipe reads.

A kind is a name (in ``train.kinds``, the workflow's ``{kind}`` wildcard, ``lens.json``),
the class that builds its translators (a :class:`pipeline.lens.translators.Translator`),
the options that class takes from the training config, and what the config checks must
know before any model is touched:

- ``linear_map``: its translators are exactly h -> h + W h + b (``Translator.affine_map``),
  so translator anatomy and the tuned-lens 0.2.x export apply;
- ``lstsq``: it starts from a closed-form fit to the last layer (``init: auto`` uses it;
  ``Translator.fit_closed_form``: the least-squares map by default, through
  ``set_affine_map``; a kind with another function class fits its own, as ``scaling`` does).

Config validation, the JSON schema's list of kinds, the workflow's wildcard constraint,
training's options and initialisation, anatomy and the export all derive from here. The
built-in classes are named as ``"module:Class"``, so reading the registry imports no torch
(the workflow reads it when it starts). A new kind is its class plus one :func:`register`
call here, or, without touching lenspipe, the :func:`translator_kind` decorator on the class
in a module the config lists under ``plugins`` (see :func:`load_plugins`); and its test.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LenspipeError


@dataclass(frozen=True)
class TranslatorKind:
    name: str
    """The kind's name: a config value, a path component and a wildcard value."""
    cls: str | type
    """The Translator subclass, or ``"module:Class"`` naming it (imported on first use)."""
    linear_map: bool = False
    """Translators are h -> h + W h + b exactly; the class implements ``affine_map``."""
    lstsq: bool = False
    """It has a closed-form start: the class implements ``fit_closed_form`` (by default the
    least-squares map through ``set_affine_map``)."""
    options: dict[str, str] = field(default_factory=dict)
    """Constructor option -> the ``train`` config field that sets it (e.g. mlp's hidden width)."""

    def translator_class(self) -> type:
        if isinstance(self.cls, str):
            module, _, name = self.cls.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.cls

    def options_from(self, train_cfg: Any) -> dict[str, Any]:
        """The constructor options a training config (``TrainConfig``) sets for this kind."""
        return {option: getattr(train_cfg, setting) for option, setting in self.options.items()}


KINDS: dict[str, TranslatorKind] = {}


def register(kind: TranslatorKind) -> TranslatorKind:
    """Add a kind; registering the same name twice is an error unless it is the same kind."""
    if not kind.name.replace("_", "").replace("-", "").isalnum():
        raise LenspipeError(f"translator kind {kind.name!r}: a name is letters, digits, '-' and '_'")
    old = KINDS.get(kind.name)
    if old is not None and old != kind:
        raise LenspipeError(f"translator kind {kind.name!r} is registered twice ({old.cls} and {kind.cls})")
    KINDS[kind.name] = kind
    return kind


def translator_kind(name: str, **facts) -> Callable[[type], type]:
    """Class decorator: ``@translator_kind("lowrank", linear_map=True)`` registers the class."""

    def decorate(cls: type) -> type:
        register(TranslatorKind(name, cls, **facts))
        cls.kind = name
        return cls

    return decorate


def names() -> list[str]:
    return list(KINDS)


def get(name: str) -> TranslatorKind:
    if name not in KINDS:
        raise LenspipeError(f"unknown translator kind {name!r}; choose one of {', '.join(KINDS)}")
    return KINDS[name]


def load_plugins(plugins: list[str] | None) -> None:
    """Import each plugin (a module name, or a ``.py`` file relative to the working
    directory) once: importing it registers the kinds it defines."""
    for plugin in plugins or ():
        if not isinstance(plugin, str) or not plugin:
            raise ConfigError(f"plugins: {plugin!r} is not a module name or a .py file")
        if plugin.endswith(".py"):
            _import_file(Path(plugin))
            continue
        try:
            importlib.import_module(plugin)
        except ImportError as e:
            raise ConfigError(
                f"plugins: cannot import {plugin!r} ({e}); give a module on the Python path or a .py file"
            ) from None


def _import_file(path: Path) -> None:
    name = f"lenspipe_plugin_{path.stem}"
    if name in sys.modules:
        return
    if not path.is_file():
        raise ConfigError(f"plugins: no file {path} (relative to {Path.cwd()})")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


for _kind in (
    TranslatorKind("affine", "pipeline.lens.translators:AffineTranslator", linear_map=True, lstsq=True),
    TranslatorKind("linear", "pipeline.lens.translators:LinearTranslator", linear_map=True, lstsq=True),
    TranslatorKind(
        "mlp",
        "pipeline.lens.translators:MLPTranslator",
        lstsq=True,
        options={"hidden": "mlp_hidden", "depth": "mlp_depth"},
    ),
    TranslatorKind("scaling", "pipeline.lens.translators:ScalingTranslator", linear_map=True, lstsq=True),
):
    register(_kind)
