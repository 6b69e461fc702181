"""The JSON schema of a config, generated from the typed definitions (``pipeline.config.fields``).

Nothing here is written by hand twice: each section's schema is its dataclass's, the
translator kinds, store dtypes and lens positions come from their registries. Every way in
(the workflow, the CLI, library calls) checks a config mapping with :func:`validate` in
:func:`pipeline.config.parse_config`; ``snakemake`` prints the same one-line message.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .fields import SIGNS, schema_of
from .sources import NAME, OVERRIDABLE, CorpusConfig, ModelConfig
from .stages import AnalysesConfig, EvaluateConfig, ExtractConfig, ReportConfig, TrainConfig

#: The config sections that are one dataclass each, by their key in the config.
SECTIONS = {
    "extract": ExtractConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "analyses": AnalysesConfig,
    "report": ReportConfig,
}


def _named(cls: type, description: str) -> dict[str, Any]:
    """``models`` / ``corpora``: a mapping of names to one source's settings each."""
    return {
        "type": "object",
        "minProperties": 1,
        "propertyNames": {"pattern": f"^{NAME}$"},
        "additionalProperties": schema_of(cls, exclude=("name",)),
        "description": description,
    }


def config_schema() -> dict[str, Any]:
    """The JSON schema of a whole config file."""
    model = _named(ModelConfig, "Models, by a short name used in output paths.")
    model["additionalProperties"]["properties"]["overrides"] |= {
        "properties": {k: {"$ref": f"#/properties/{k}"} for k in OVERRIDABLE},
        "additionalProperties": False,
    }
    top = {
        "base": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
            "description": "Config files (relative to this one) this one is layered over.",
        },
        "data_dir": {
            "type": "string",
            "description": "Root of all inputs and outputs; outputs under it are git-ignored.",
        },
        "plugins": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "description": "Python modules or .py files imported first; they may register translator kinds.",
        },
        "models": model,
        "corpora": _named(CorpusConfig, "Corpora, by a short name; each is tokenized with each model's tokenizer."),
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "description": "lenspipe experiment configuration",
        "type": "object",
        "required": ["models", "corpora"],
        "additionalProperties": False,
        "properties": top | {k: schema_of(cls) for k, cls in SECTIONS.items()},
    }


def validate(raw: dict[str, Any]) -> None:
    """Check a config mapping against :func:`config_schema`: one message naming the key."""
    import jsonschema

    schema = config_schema()
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(raw))
    if error is not None:
        raise ConfigError(_message(error))


def _message(error) -> str:
    key = ".".join(str(p) for p in error.absolute_path)
    known = sorted(error.schema.get("properties", {})) if isinstance(error.schema, dict) else []
    if error.validator == "additionalProperties" and isinstance(error.instance, dict) and known:
        unknown = sorted(set(error.instance) - set(known))
        where = f"under {key}" if key else "at the top level"
        return f"unknown key {'.'.join(filter(None, [key, str(unknown[0])]))}; known keys {where}: {', '.join(known)}"
    if error.validator in SIGNS:  # the same words as the dataclasses' own checks (fields.check)
        return f"{key} must be {SIGNS[error.validator]} {error.validator_value}, got {error.instance!r}"
    if error.validator == "enum":
        return f"{key} must be one of {error.validator_value}, got {error.instance!r}"
    if error.validator == "minProperties":
        return f"{key} must name at least one entry: the config must define at least one model and one corpus"
    if error.validator == "required":
        return f"{key or 'the config'}: {error.message} (see config/config.yaml)"
    return f"{key or 'the config'}: {error.message}"
