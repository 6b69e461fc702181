"""What the workflow takes from the library: the config, checked at start, and typed params.

The Snakefile parses the config once, here, when it starts (dry runs too): a mistake is
one message before any job runs. Every rule then passes the typed section a stage needs
as a param (:func:`section`), which the stage turns back into its dataclass (:func:`typed`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from . import config as C
from .errors import ConfigError
from .lens import kinds

#: The dataclasses a param may carry, by class name.
_TYPES = {cls.__name__: cls for cls in (*C.SECTIONS.values(), C.ModelConfig, C.CorpusConfig)}


def section(cfg: Any, without: tuple[str, ...] = (), **changes) -> dict[str, Any]:
    """A config section as a Snakemake param: a plain dict, because Snakemake compares
    plain values between runs (a changed setting re-runs the rule) but ignores objects.
    ``changes`` narrow it to what one job's output depends on (e.g. one split's budget);
    ``without`` leaves out fields it does not depend on (the stage sees their defaults)."""
    fields = dataclasses.asdict(dataclasses.replace(cfg, **changes))
    return {"section": type(cfg).__name__, **{k: v for k, v in fields.items() if k not in without}}


#: What preparing a corpus does not depend on: whether and how much of it is evaluated.
CORPUS_EVALUATION_FIELDS = ("evaluate_only", "evaluate_tokens")


def typed(param: dict[str, Any]):
    """The dataclass a :func:`section` param was made from, checked again."""
    fields = dict(param)
    return _TYPES[fields.pop("section")](**fields)


def check_workflow_config(raw: dict[str, Any], schema_path: str | Path) -> PipelineConfig:
    """Everything a config can get wrong, checked when the workflow starts (dry runs too).

    First the JSON schema (types, unknown keys), with a one-line message naming the key
    rather than Snakemake's dump of the schema; then the dataclasses' cross-field checks
    and the embedded sources. Cheap: no torch, no model, no data.
    """
    import jsonschema

    kinds.load_plugins(C.plugins_of(raw))  # before the schema: they may add translator kinds
    schema = workflow_schema(schema_path)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(raw))
    if error is not None:
        raise ConfigError(_schema_message(error))
    return C.parse_config(raw)


def workflow_schema(schema_path: str | Path) -> dict[str, Any]:
    """The JSON schema, with the registered translator kinds, the storage dtypes and the lens
    positions as the allowed values."""
    from . import positions
    from .store.dtypes import DTYPES

    schema = yaml.safe_load(Path(schema_path).read_text())
    defs = schema["$defs"]
    defs["translator_kind"]["enum"] = kinds.names()
    defs["translator_kind_or_null"]["enum"] = [*kinds.names(), None]
    defs["store_dtype"]["enum"] = list(DTYPES)
    defs["lens_position"]["enum"] = positions.names()
    return schema


def _schema_message(error) -> str:
    key = ".".join(str(p) for p in error.absolute_path)
    known = sorted(error.schema.get("properties", {})) if isinstance(error.schema, dict) else []
    if error.validator == "additionalProperties" and isinstance(error.instance, dict) and known:
        unknown = sorted(set(error.instance) - set(known))
        where = f"under {key}" if key else "at the top level"
        return (f"unknown key {'.'.join(filter(None, [key, str(unknown[0])]))}; known keys {where}: "
                f"{', '.join(known)}")
    return f"{key or 'the config'}: {error.message}"
