"""prepare_model: local directories, GGUF files, and clear errors for unavailable models."""

import json
import subprocess
import sys

import pytest
import torch
from gguf_fixture import write_tiny_llama_gguf
from tiny import save_tiny_model_dir

from pipeline.config import ModelConfig
from pipeline.errors import ModelNotAvailable
from pipeline.model import MARKER, prepare_model, read_model_info


def _logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_prepare_from_local_dir(tmp_path, tiny_model_dir):
    info = read_model_info(tiny_model_dir)
    assert info["n_layers"] == 2 and info["d_model"] == 32 and info["model_type"] == "llama"
    assert len(info["weights_sha256"]) == 64 and info["versions"]["torch"]
    src = save_tiny_model_dir(tmp_path / "again")  # same seed: same weights, same hash
    info2 = prepare_model(ModelConfig(name="t", source=str(src)), tmp_path / "out", tmp_path / "c")
    assert info2["weights_sha256"] == info["weights_sha256"]
    ids = torch.randint(0, 300, (2, 7))
    torch.testing.assert_close(_logits(src, ids), _logits(tmp_path / "out", ids))


def test_prepare_from_gguf_reproduces_logits(tmp_path):
    original, tok = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    info = prepare_model(ModelConfig(name="g", source=str(tmp_path / "tiny.gguf")), tmp_path / "out", tmp_path / "c")
    assert info["load"]["kind"] == "gguf" and len(info["load"]["gguf_sha256"]) == 64
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    ids = torch.randint(0, len(tok), (2, 9))
    with torch.no_grad():
        expected = original(ids).logits
    torch.testing.assert_close(_logits(tmp_path / "out", ids), expected)


def test_unknown_hub_model_offline_is_clear(tmp_path):
    with pytest.raises(ModelNotAvailable, match="HF_HUB_OFFLINE is set"):
        prepare_model(ModelConfig(name="x", source="nobody/no-such-model"), tmp_path / "out", tmp_path / "c")
    assert not (tmp_path / "out").exists()


def test_missing_local_path_and_non_causal_dir(tmp_path):
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        prepare_model(ModelConfig(name="x", source=str(tmp_path / "nope.gguf")), tmp_path / "o", tmp_path / "c")
    with pytest.raises(ModelNotAvailable, match="not a model directory"):
        prepare_model(ModelConfig(name="x", source=str(tmp_path)), tmp_path / "o", tmp_path / "c")
    from transformers import ViTConfig

    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "vit")
    with pytest.raises(ModelNotAvailable, match="not a causal language model"):
        prepare_model(ModelConfig(name="x", source=str(tmp_path / "vit")), tmp_path / "o", tmp_path / "c")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ModelNotAvailable, match=f"no {MARKER}"):
        read_model_info(tmp_path)


def test_cli_reports_user_error_without_traceback(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"data_dir: {tmp_path}/data\nmodels:\n  m:\n    source: nobody/nothing\n"
                   "corpora:\n  c:\n    source: embedded:shakespeare\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "prepare-model", "--config", str(cfg),
                           "--model", "m"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "lenspipe: error: model 'm': could not load 'nobody/nothing'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_embedded_default_answers_paris(tmp_path, wheel_cache):
    info = prepare_model(ModelConfig(name="smollm2-135m"), tmp_path / "smollm2", wheel_cache)
    assert info["smoke_test"]["completion"].startswith(" Paris")
    assert (info["n_layers"], info["d_model"], info["vocab"]) == (30, 576, 49152)
    assert info["tie_word_embeddings"] and info["load"]["kind"] == "embedded"
