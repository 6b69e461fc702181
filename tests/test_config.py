"""Config dataclasses and the Snakemake schema reject bad settings with clear messages."""

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.config import CorpusConfig, ModelConfig, load_config, parse_config
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _raw():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_config_parses():
    cfg = load_config(REPO / "config" / "config.yaml")
    assert cfg.model("smollm2-135m").source.startswith("embedded:")
    assert "hamlet" in cfg.corpus("shakespeare").test_docs


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r["models"]["smollm2-135m"].update(nope=1), r"unknown setting\(s\) \['nope'\]"),
    (lambda r: r["corpora"]["shakespeare"].update(seq_len=1), "seq_len must be >= 2"),
    (lambda r: r["corpora"]["shakespeare"].update(validation_docs=["hamlet"]), "both validation and test"),
    (lambda r: r["corpora"]["shakespeare"].update(test_fraction=0.6, validation_fraction=0.5), "leave"),
    (lambda r: r.update(models={}), "at least one model"),
    (lambda r: r["corpora"]["shakespeare"].update(evaluate_only=True), "every corpus is evaluate_only"),
    (lambda r: r["corpora"]["python-code"].update(evaluate_tokens=0), "evaluate_tokens must be positive"),
])
def test_bad_config_is_a_config_error(mutate, match):
    raw = copy.deepcopy(_raw())
    mutate(raw)
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_dataclass_checks():
    with pytest.raises(ConfigError, match="revision"):
        ModelConfig(name="m", source="embedded:smollm2-135m-instruct", revision="main")
    with pytest.raises(ConfigError, match="markdown"):
        CorpusConfig(name="c", markdown="html")


def test_schema_rejects_bad_config():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    raw = _raw()
    validate(copy.deepcopy(raw), str(REPO / "config" / "schema.yaml"))
    raw["corpora"]["shakespeare"]["seq_len"] = "long"
    with pytest.raises(WorkflowError, match="seq_len"):
        validate(raw, str(REPO / "config" / "schema.yaml"))


def test_two_architectures_config_gives_gemma_its_own_budgets():
    """config/two-architectures.yaml merged over the default, as Snakemake's --configfile does:
    SmolLM2 keeps the default settings (a finished `make run` is reused), Gemma gets its own."""
    from snakemake.utils import update_config

    raw = _raw()
    update_config(raw, yaml.safe_load((REPO / "config" / "two-architectures.yaml").read_text()))
    cfg = parse_config(raw)
    assert list(cfg.models) == ["smollm2-135m", "gemma-3-270m"]
    assert cfg.for_model("smollm2-135m") is cfg
    gemma = cfg.for_model("gemma-3-270m")
    assert gemma.extract.max_tokens == {"train": 8192, "validation": 2048, "test": 2048}
    assert gemma.train.batch_tokens < cfg.train.batch_tokens and gemma.evaluate.max_tokens < cfg.evaluate.max_tokens
    # Gemma's KL steps: Adam scaled to the residual stream (plain SGD diverges on it)
    assert (gemma.train.optimizer, gemma.train.step_scale) == ("adam", "residual")
    assert (cfg.train.optimizer, cfg.train.step_scale) == ("adam", "residual")  # the default's recipe (issue 34)
    assert gemma.train.kinds == cfg.train.kinds and gemma.train.momentum == cfg.train.momentum  # the rest is shared
    assert cfg.extract.max_tokens["train"] == 24576  # the global section is left alone


@pytest.mark.parametrize("overrides, match", [
    ({"report": {"prompts": ["x"]}}, r"\['report'\] cannot be set per model"),
    ({"train": {"kinds": ["linear"]}}, r"overrides.train: \['kinds'\] shape the workflow"),
    ({"evaluate": {"split": "validation"}}, "set evaluate.split instead"),
    ({"train": {"stepz": 3}}, r"models.m.overrides.train: .*unknown setting\(s\) \['stepz'\]"),
    ({"train": {"steps": -1}}, "models.m.overrides.train: train.steps must be >= 0"),
    ({"evaluate": {"token_metrics": False}}, "models.m.overrides: the analyses read the per-token table"),
])
def test_bad_model_overrides_are_named(overrides, match):
    raw = _raw()
    raw["models"] = {"m": {"source": "embedded:smollm2-135m-instruct", "overrides": overrides}}
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_schema_checks_model_overrides():
    from pipeline.workflow import check_workflow_config

    raw = _raw()
    raw["models"]["smollm2-135m"]["overrides"] = {"train": {"steps": "many"}}
    with pytest.raises(ConfigError, match="models.smollm2-135m.overrides.train.steps"):
        check_workflow_config(raw, REPO / "config" / "schema.yaml")
    raw["models"]["smollm2-135m"]["overrides"] = {"extract": {"max_tokens": {"test": 512}}}
    cfg = check_workflow_config(raw, REPO / "config" / "schema.yaml").for_model("smollm2-135m")
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
    from snakemake.utils import update_config

    raw = _raw()
    update_config(raw, yaml.safe_load((REPO / "config" / "two-architectures.yaml").read_text()))
    cfg = parse_config(raw)
    assert cfg.evaluate_config("python-code").max_tokens == 2048 < cfg.evaluate.max_tokens
    gemma = cfg.for_model("gemma-3-270m")
    assert gemma.evaluate_config("python-code").max_tokens == gemma.evaluate.max_tokens < 2048
