"""What the workflow takes from the library: the config, checked at start, and typed params.

The Snakefile parses the config once, here, when it starts (dry runs too): a mistake is
one message before any job runs. Every rule then passes the typed section a stage needs
as a param (:func:`section`), which the stage turns back into its dataclass (:func:`typed`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import config as C

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


def check_workflow_config(files: list[str], given: dict[str, Any]) -> C.PipelineConfig:
    """The workflow's config, checked when it starts (dry runs too): the config ``files``
    given with ``--configfile`` (none: the default experiment, ``config/config.yaml``),
    each with its ``base`` files, and ``given`` (Snakemake's merge of them and of
    ``--config``) over them. Checked as the CLI checks it (:func:`pipeline.config.parse_config`).
    Cheap: no torch, no model, no data."""
    return C.parse_config(C.layered_config(files, given))
