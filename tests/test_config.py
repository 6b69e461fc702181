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


def test_the_default_evaluates_the_shakespeare_lens_on_both_corpora():
    cfg = load_config(REPO / "config" / "config.yaml")
    assert cfg.train_corpora == ["shakespeare"]
    assert cfg.evaluations() == [("shakespeare", "shakespeare"), ("shakespeare", "python-code")]
    assert cfg.splits_of("python-code") == ("test",) and len(cfg.splits_of("shakespeare")) == 3
    assert cfg.evaluate_config("python-code").max_tokens == 2048
    assert cfg.evaluate_config("shakespeare") is cfg.evaluate  # within-corpus: as before
