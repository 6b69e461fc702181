"""The whole config: ``PipelineConfig``, built from a YAML file or a mapping."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..lens import kinds
from .schema import SECTIONS, validate
from .sources import CorpusConfig, ModelConfig
from .stages import SPLITS, AnalysesConfig, EvaluateConfig, ExtractConfig, ReportConfig, TrainConfig


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


def _deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, recursively for mappings (one split's budget of
    ``max_tokens`` changes only that split)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
    (``pipeline.lens.kinds.translator_kind``)."""
    config_file: str | None = None
    """The YAML file this config was loaded from, for messages (None: given as a mapping)."""

    def __post_init__(self) -> None:
        if self.corpora and not self.train_corpora:
            raise ConfigError(
                "every corpus is evaluate_only: at least one corpus must train the lenses the others are evaluated with"
            )
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
            raise ConfigError(
                "the analyses read the per-token table: set evaluate.token_metrics to auto "
                "or true, or analyses.enabled to false"
            )
        if self.analyses.translator is None:
            self.analyses.translator = self.train.kinds[0]
        elif self.analyses.translator not in self.train.kinds:
            raise ConfigError(
                f"analyses.translator {self.analyses.translator!r} is not trained (train.kinds is {self.train.kinds})"
            )
        if self.analyses.enabled and not kinds.get(self.analyses.translator).linear_map:
            linear = [k for k in self.train.kinds if kinds.get(k).linear_map]
            raise ConfigError(
                f"analyses.translator is {self.analyses.translator!r}, which is no linear map, and "
                "translator anatomy needs one: set analyses.translator to "
                f"{' or '.join(linear) or 'a linear kind you train (affine, linear, scaling)'}, "
                "or analyses.enabled to false"
            )

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
            raise ConfigError(
                f"no model {name!r} in {self.config_file or 'the config'}; known: {', '.join(sorted(self.models))}"
            )
        return self.models[name]

    def corpus(self, name: str) -> CorpusConfig:
        if name not in self.corpora:
            raise ConfigError(
                f"no corpus {name!r} in {self.config_file or 'the config'}; known: {', '.join(sorted(self.corpora))}"
            )
        return self.corpora[name]


def parse_config(raw: dict[str, Any]) -> PipelineConfig:
    """Typed view of a config mapping (as loaded from YAML or given by Snakemake).

    Only the keys the mapping has are passed on: every default is the dataclass field's.
    """
    if "base" in raw:
        raise ConfigError("base: only a config file names base files (read_config, or --configfile)")
    plugins = plugins_of(raw)
    kinds.load_plugins(plugins)  # first: they may register the kinds the sections name
    validate(raw)
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


#: The config ``make run`` and a bare ``snakemake`` run: the embedded default experiment.
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.yaml"


def read_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The settings of one YAML config file as a mapping, its ``base`` files merged under it.

    A config stands alone: it runs the models, corpora and settings it names, every other
    setting at its default. ``base: other.yaml`` (or a list, paths relative to this file)
    layers it explicitly over other configs, e.g. ``base: config.yaml`` adds a model to the
    default experiment. Mappings merge key by key; anything else (a list) is replaced.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path}: its base files include itself")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw or {}, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(raw).__name__}")
    raw = dict(raw or {})
    given = raw.pop("base", None) or []
    bases = [given] if isinstance(given, str) else given
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config file {path}: base must be a file name or a list of them, not {given!r}")
    out: dict[str, Any] = {}
    for base in bases:
        out = _deep_merge(out, read_config(path.parent / base, (*_seen, path.resolve())))
    return _deep_merge(out, raw)


def layered_config(files: list[str | Path], given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The mapping of config ``files`` (each with its bases, later files over earlier ones;
    none: the default experiment), ``given`` merged over it (Snakemake's own merge of the
    files and of ``--config``)."""
    out: dict[str, Any] = {}
    for f in files or [DEFAULT_CONFIG]:
        out = _deep_merge(out, read_config(f))
    return _deep_merge(out, {k: v for k, v in (given or {}).items() if k != "base"})


def load_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    raw = read_config(path)
    try:
        cfg = parse_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg.config_file = str(path)
    return cfg
