"""A setting written once: its type (the annotation), default, allowed values and docstring.

``setting(default, ge=1)`` declares a config field with its constraints; ``check`` applies
them when the dataclass is built (the CLI, library calls and the workflow all build it), and
``schema_of`` turns the same declarations into the JSON schema Snakemake's config is checked
against (``pipeline.workflow.workflow_schema``). The docstring under a field is its
description in the schema and in the docs' settings reference (``docstrings``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import operator
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, field
from typing import Any

from ..errors import ConfigError

#: JSON schema keywords a setting may declare, by their ``setting()`` argument.
BOUNDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
#: Each bound's comparison and its sign in messages (the schema's messages use the same signs).
CHECKS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}
#: The sign of each JSON schema bound keyword.
SIGNS = {BOUNDS[k]: sign for k, (_, sign) in CHECKS.items()}


def setting(
    default: Any = MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    choices: Iterable | Callable[[], Iterable] | None = None,
    keys: Iterable[str] | None = None,
    pattern: str | None = None,
    **bounds: float,
) -> Any:
    """A dataclass field with its constraints: ``ge``/``gt``/``le``/``lt`` bounds (on a
    number, or on every item of a list or mapping), ``choices`` (a collection, or a function
    returning one when the choices come from a registry), the allowed ``keys`` of a mapping,
    a regular-expression ``pattern`` for a string."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"setting(): unknown constraint(s) {sorted(unknown)}")
    meta = {"bounds": bounds, "choices": choices, "keys": tuple(keys) if keys else None, "pattern": pattern}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _choices(f: dataclasses.Field) -> list | None:
    c = f.metadata.get("choices")
    return None if c is None else list(c() if callable(c) else c)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def docstrings(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls``, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    out = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            out[node.target.id] = inspect.cleandoc(after.value.value)
    return out


def defaults(cls: type) -> dict[str, Any]:
    """Every field's default value (factories called)."""
    return {
        f.name: f.default if f.default is not MISSING else f.default_factory()
        for f in dataclasses.fields(cls)
        if f.default is not MISSING or f.default_factory is not MISSING
    }


# ----------------------------------------------------------------------------- checking

_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    type(None): "null",
    list: "a list",
    dict: "a mapping",
}


def _fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` (as YAML gives it) has type ``tp`` (the field's annotation)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if origin is typing.Literal:
        return " or ".join(map(repr, args))
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _numbers(value: Any) -> list:
    """The numbers a bound applies to: the value, or the items of a list or mapping."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    return [v for v in items if isinstance(v, int | float) and not isinstance(v, bool)]


def check(obj: Any, section: str) -> None:
    """Check every field of dataclass instance ``obj`` against its annotation and its
    ``setting()`` constraints; a mistake is a ``ConfigError`` naming ``section.field``."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{section}.{f.name}"
        if not _fits(value, hints[f.name]):
            raise ConfigError(f"{name} must be {_describe(hints[f.name])}, got {value!r}")
        choices = _choices(f)
        if choices is not None:
            bad = [v for v in (value if isinstance(value, list) else [value]) if v is not None and v not in choices]
            if bad:
                raise ConfigError(f"{name} must be one of {choices}, got {bad[0]!r}")
        keys = f.metadata.get("keys")
        if keys and isinstance(value, dict) and set(value) - set(keys):
            raise ConfigError(f"{name}: unknown key(s) {sorted(set(value) - set(keys))}; keys are {list(keys)}")
        pattern = f.metadata.get("pattern")
        if pattern and isinstance(value, str) and not re.fullmatch(pattern, value):
            raise ConfigError(f"{name} must match {pattern}, got {value!r}")
        for bound, limit in (f.metadata.get("bounds") or {}).items():
            ok, sign = CHECKS[bound]
            bad = [v for v in _numbers(value) if not ok(v, limit)]
            if bad:
                raise ConfigError(f"{name} must be {sign} {limit}, got {bad[0]!r}")


# ----------------------------------------------------------------------------- schema


def _type_schema(tp: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_schema(a) for a in args]
        if all(set(p) == {"type"} for p in parts):
            return {"type": [p["type"] for p in parts]}
        return {"anyOf": parts}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1])}
    if tp is Any:
        return {}
    if dataclasses.is_dataclass(tp):
        return schema_of(tp)
    return {"type": {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}[tp]}


def _constrain(schema: dict[str, Any], f: dataclasses.Field) -> dict[str, Any]:
    """The field's constraints applied where they act: on the value, or on its items."""
    meta = f.metadata
    target = schema
    if schema.get("type") == "array" or schema.get("type") == "object":
        target = schema["items" if schema["type"] == "array" else "additionalProperties"]
    elif "anyOf" in schema:
        target = next((p for p in schema["anyOf"] if p.get("type") in ("array", "object")), schema)
        target = target.get("items", target.get("additionalProperties", target))
    for bound, limit in (meta.get("bounds") or {}).items():
        target[BOUNDS[bound]] = limit
    if (choices := _choices(f)) is not None:
        target["enum"] = [*choices, *([None] if "null" in str(target.get("type")) else [])]
        target.pop("type", None)
    if meta.get("pattern"):
        target["pattern"] = meta["pattern"]
    if meta.get("keys") and schema.get("type") == "object":
        item = schema.pop("additionalProperties")
        schema["properties"] = {k: dict(item) for k in meta["keys"]}
        schema["additionalProperties"] = False
    return schema


def schema_of(cls: type, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON schema of dataclass ``cls``'s settings (no unknown keys; each field's type,
    constraints and docstring)."""
    hints, docs = _hints(cls), docstrings(cls)
    props = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        props[f.name] = _constrain(_type_schema(hints[f.name]), f)
        if f.name in docs:
            props[f.name]["description"] = docs[f.name]
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name in props and f.default is MISSING and f.default_factory is MISSING
    ]
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        **({"required": required} if required else {}),
    }
