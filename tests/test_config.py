"""Config dataclasses and the Snakemake schema reject bad settings with clear messages."""

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.config import CorpusConfig, ModelConfig, TrainConfig, load_config, parse_config
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _raw():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_config_parses():
    cfg = load_config(REPO / "config" / "config.yaml")
    assert cfg.model("smollm2-135m").source.startswith("embedded:")
    assert "hamlet" in cfg.corpus("shakespeare").test_docs


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r["models"]["smollm2-135m"].update(nope=1), "unknown key models.smollm2-135m.nope; known keys"),
        (lambda r: r["corpora"]["shakespeare"].update(seq_len=1), "seq_len must be >= 2"),
        (lambda r: r["corpora"]["shakespeare"].update(validation_docs=["hamlet"]), "both validation and test"),
        (lambda r: r["corpora"]["shakespeare"].update(test_fraction=0.6, validation_fraction=0.5), "leave"),
        (lambda r: r.update(models={}), "at least one model"),
        (lambda r: r["corpora"]["shakespeare"].update(evaluate_only=True), "every corpus is evaluate_only"),
        (lambda r: r["corpora"]["python-code"].update(evaluate_tokens=0), "evaluate_tokens must be >= 1, got 0"),
        (lambda r: r.update(train={"steps": "many"}), "train.steps: 'many' is not of type 'integer'"),
        (lambda r: r.update(train={"optimizer": "rmsprop"}), "train.optimizer must be one of"),
        (lambda r: r.update(extract={"level": 23}), "extract.level must be <= 22, got 23"),
        (lambda r: r.update(train={"kinds": ["affine", "mystery"]}), "train.kinds.1 must be one of"),
        (lambda r: r.update(evaluate={"token_metrics": "sometimes"}), "evaluate.token_metrics"),
        (lambda r: r.update(base="other.yaml"), "base"),  # layering is a file's business, not a mapping's
    ],
)
def test_bad_config_is_a_config_error(mutate, match):
    raw = copy.deepcopy(_raw())
    mutate(raw)
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_dataclass_checks():
    with pytest.raises(ConfigError, match="revision"):
        ModelConfig(name="m", source="embedded:smollm2-135m-instruct", revision="main")
    with pytest.raises(ConfigError, match="markdown must be one of"):
        CorpusConfig(name="c", source="x.txt", markdown="html")
    with pytest.raises(ConfigError, match="train.lr_scale must be > 0, got 0"):
        TrainConfig(lr_scale=0)
    with pytest.raises(ConfigError, match=r"train.layers must be 'all' or a list of integers, got \['x'\]"):
        TrainConfig(layers=["x"])


def test_two_architectures_config_gives_gemma_its_own_budgets():
    """config/two-architectures.yaml layers itself over the default (``base: config.yaml``):
    SmolLM2 keeps the default settings (a finished `make run` is reused), Gemma gets its own."""
    cfg = load_config(REPO / "config" / "two-architectures.yaml")
    assert list(cfg.models) == ["smollm2-135m", "gemma-3-270m"]
    assert list(cfg.corpora) == ["shakespeare", "python-code"]
    assert cfg.for_model("smollm2-135m") is cfg
    gemma = cfg.for_model("gemma-3-270m")
    assert gemma.extract.max_tokens == {"train": 8192, "validation": 2048, "test": 2048}
    assert gemma.train.batch_tokens < cfg.train.batch_tokens and gemma.evaluate.max_tokens < cfg.evaluate.max_tokens
    # Gemma's KL steps: Adam scaled to the residual stream (plain SGD diverges on it)
    assert (gemma.train.optimizer, gemma.train.step_scale) == ("adam", "residual")
    assert (cfg.train.optimizer, cfg.train.step_scale) == ("adam", "residual")  # the default's recipe (issue 34)
    assert gemma.train.kinds == cfg.train.kinds and gemma.train.momentum == cfg.train.momentum  # the rest is shared
    assert cfg.extract.max_tokens["train"] == 24576  # the global section is left alone


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            {"report": {"prompts": ["x"]}},
            "unknown key models.m.overrides.report; known keys under models.m.overrides: "
            "analyses, evaluate, extract, train",
        ),
        ({"train": {"kinds": ["linear"]}}, r"overrides.train: \['kinds'\] shape the workflow"),
        ({"evaluate": {"split": "validation"}}, "set evaluate.split instead"),
        ({"train": {"stepz": 3}}, "unknown key models.m.overrides.train.stepz"),
        ({"train": {"steps": -1}}, "models.m.overrides.train.steps must be >= 0, got -1"),
        ({"train": {"warmup_steps": 20}}, "models.m.overrides.train: train.warmup_steps must be in"),
        ({"evaluate": {"token_metrics": False}}, "models.m.overrides: the analyses read the per-token table"),
    ],
)
def test_bad_model_overrides_are_named(overrides, match):
    raw = _raw()
    raw["models"] = {"m": {"source": "embedded:smollm2-135m-instruct", "overrides": overrides}}
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_a_model_override_changes_one_split_budget():
    raw = _raw()
    raw["models"]["smollm2-135m"]["overrides"] = {"extract": {"max_tokens": {"test": 512}}}
    cfg = parse_config(raw).for_model("smollm2-135m")
    assert cfg.extract.max_tokens == {"train": 24576, "validation": 4096, "test": 512}  # one split changed


def test_the_default_evaluates_the_shakespeare_lens_on_both_corpora():
    cfg = load_config(REPO / "config" / "config.yaml")
    assert cfg.train_corpora == ["shakespeare"]
    assert cfg.evaluations() == [("shakespeare", "shakespeare"), ("shakespeare", "python-code")]
    assert cfg.splits_of("python-code") == ("test",) and len(cfg.splits_of("shakespeare")) == 3
    assert cfg.evaluate_config("python-code").max_tokens == 2048
    assert cfg.evaluate_config("shakespeare") is cfg.evaluate  # within-corpus: as before


def test_a_corpus_evaluate_tokens_caps_a_model_budget_without_raising_it():
    """python-code caps evaluation at 2,048 tokens; Gemma's own 1,024 (its overrides) stays 1,024."""
    cfg = load_config(REPO / "config" / "two-architectures.yaml")
    assert cfg.evaluate_config("python-code").max_tokens == 2048 < cfg.evaluate.max_tokens
    gemma = cfg.for_model("gemma-3-270m")
    assert gemma.evaluate_config("python-code").max_tokens == gemma.evaluate.max_tokens < 2048


# ----------------------------------------------------------------------------- one definition


def test_a_config_file_stands_alone_and_layers_only_through_base(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("models: {m: {source: some/dir}}\ncorpora: {c: {source: '*.txt'}}\ntrain: {steps: 3}\n")
    cfg = load_config(mine)
    assert list(cfg.models) == ["m"] and list(cfg.corpora) == ["c"]  # nothing of the default experiment
    assert cfg.train.steps == 3 and cfg.train.optimizer == TrainConfig().optimizer  # the rest: defaults
    # explicit layering: base files (relative to the file), later keys over earlier ones
    (tmp_path / "more.yaml").write_text(
        "base: mine.yaml\nmodels: {n: {source: other/dir}}\ntrain: {batch_tokens: 64}\n"
    )
    cfg = load_config(tmp_path / "more.yaml")
    assert list(cfg.models) == ["m", "n"] and (cfg.train.steps, cfg.train.batch_tokens) == (3, 64)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="include itself"):
        load_config(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="nowhere.yaml does not exist"):
        load_config(tmp_path / "nowhere.yaml")


def test_the_default_config_names_only_the_experiment():
    """config/config.yaml holds models and corpora, and no setting at its default value:
    every default is written once, in the typed definitions."""
    from pipeline.config import SECTIONS
    from pipeline.config.fields import defaults

    raw = _raw()
    assert set(raw) <= {"models", "corpora"}
    for kind, cls in (("models", ModelConfig), ("corpora", CorpusConfig)):
        for name, settings in raw[kind].items():
            restated = {k for k, v in settings.items() if defaults(cls).get(k, object()) == v}
            assert not restated, f"{kind}.{name} restates defaults {restated}"
    for name in ("two-architectures.yaml", "two-models.yaml", "inside-blocks.yaml"):
        layer = yaml.safe_load((REPO / "config" / name).read_text())
        assert layer["base"] == "config.yaml"
        sections = [(key, layer.get(key)) for key in SECTIONS]
        sections += [
            (key, v) for m in (layer.get("models") or {}).values() for key, v in m.get("overrides", {}).items()
        ]
        for key, given in sections:
            same = {k for k, v in (given or {}).items() if defaults(SECTIONS[key]).get(k, object()) == v}
            assert not same, f"{name}: {key} restates defaults {same}"


def test_the_schema_is_generated_from_the_definitions():
    """Every setting's type, default range and description come from its dataclass field: the
    schema has exactly the fields, a field's bounds are the ones the dataclass enforces, and
    the registries' names are its choices."""
    import dataclasses

    from pipeline.config import SECTIONS, config_schema
    from pipeline.config.fields import docstrings
    from pipeline.lens import kinds

    schema = config_schema()
    for key, cls in SECTIONS.items():
        props = schema["properties"][key]["properties"]
        assert set(props) == {f.name for f in dataclasses.fields(cls)}
        docs = docstrings(cls)
        assert all(props[name]["description"] == docs[name] for name in props), key
    train = schema["properties"]["train"]["properties"]
    assert train["steps"] == {"type": "integer", "minimum": 0, "description": docstrings(SECTIONS["train"])["steps"]}
    assert train["kinds"]["items"]["enum"] == kinds.names()
    assert schema["properties"]["models"]["additionalProperties"]["required"] == ["source"]
    with pytest.raises(ConfigError, match="train.steps must be >= 0"):  # the dataclass enforces the same bound
        TrainConfig(steps=-1)
