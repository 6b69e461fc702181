"""extract: the stored last layer reproduces the model's logits; resume; stale stores."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import VOCAB, save_prepared, tiny_model, write_packed_split

from pipeline.config import ExtractConfig
from pipeline.errors import ConfigError, StoreError
from pipeline.extract import extract
from pipeline.model.head import unembed_head
from pipeline.sampling import select_sequences
from pipeline.store.reader import open_store
from pipeline.store.verify import verify

SMALL = dict(batch_size=2, shard_tokens=32, chunk_tokens=16, max_tokens={"test": None})


@pytest.mark.parametrize(
    "family", ["gpt2", "gpt_neox", "llama", "qwen3", "gemma2", "gemma3", "opt_proj", "phi", "mistral"]
)
def test_stored_last_layer_reproduces_logits(tmp_path, family):
    model = tiny_model(family)
    model_dir = save_prepared(model, tmp_path / family)
    split = write_packed_split(tmp_path / "test.npz", n_seq=6, seq_len=16, vocab=VOCAB)
    summary = extract(model_dir, split, tmp_path / "s.zarr", ExtractConfig(dtype="float32", **SMALL), "test")
    assert summary["logits_max_err"] < 1e-4
    store = open_store(tmp_path / "s.zarr")
    assert store.n_layers == model.config.num_hidden_layers and store.n_tokens == 96
    ids = store.tokens().reshape(6, 16)
    with torch.no_grad():
        expected = model(ids).logits  # (seq, pos, vocab)
        rebuilt = unembed_head(model)(store.layers(store.n_layers).reshape(6, 16, -1))
    torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-5)
    assert store.provenance["model"]["model_type"] == model.config.model_type
    assert "BEFORE" in store.provenance["layer_convention"]
    verify(tmp_path / "s.zarr")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8", "int8"])
def test_the_stored_last_layer_logits_check_reports_what_the_store_holds(tmp_path, dtype):
    """Besides the float32 check (the head's guard), extraction records what the storage
    dtype's rounding costs the logits: max abs error and mean KL(model || head(stored)) on
    the checked positions. They must be those of the last layer as the store returns it."""
    model = tiny_model("llama")
    model_dir = save_prepared(model, tmp_path / "m")
    split = write_packed_split(tmp_path / "test.npz", n_seq=4, seq_len=16, vocab=VOCAB)
    summary = extract(model_dir, split, tmp_path / "s.zarr", ExtractConfig(**(SMALL | {"dtype": dtype})), "test")
    store = open_store(tmp_path / "s.zarr")
    with torch.no_grad():
        logits = model(store.tokens(0, 16)[None]).logits[0].double()  # the first sequence: 16 < CHECK_POS
        stored = unembed_head(model)(store.layers(store.n_layers, 0, 16)).double()
    kl = (logits.softmax(-1) * (logits.log_softmax(-1) - stored.log_softmax(-1))).sum(-1).mean()
    assert summary["stored_logits_max_err"] == pytest.approx((stored - logits).abs().max().item(), rel=1e-3, abs=1e-6)
    assert summary["stored_logits_kl"] == pytest.approx(kl.item(), rel=1e-3, abs=1e-9)
    if dtype == "float32":
        assert summary["stored_logits_max_err"] < 1e-4 and summary["stored_logits_kl"] < 1e-9
    else:
        assert summary["stored_logits_max_err"] > 0 and summary["stored_logits_kl"] > 0


def test_budget_selects_spread_sequences_and_stale_store_is_replaced(tmp_path):
    idx = select_sequences(1000, 10, seed=0)
    assert len(idx) == 10 and (idx == sorted(idx)).all() and idx[-1] > 500
    assert (select_sequences(5, None, 0) == range(5)).all()
    model_dir = save_prepared(tiny_model("llama"), tmp_path / "m")
    split = write_packed_split(tmp_path / "test.npz", n_seq=8, seq_len=16, vocab=VOCAB)
    cfg = ExtractConfig(**(SMALL | {"max_tokens": {"test": 64}}))
    extract(model_dir, split, tmp_path / "s.zarr", cfg, "test")
    assert open_store(tmp_path / "s.zarr").n_tokens == 64
    again = extract(model_dir, split, tmp_path / "s.zarr", cfg, "test")
    assert again["resumed_from"] == 64  # complete: nothing redone
    extract(model_dir, split, tmp_path / "s.zarr", ExtractConfig(**SMALL), "test")  # budget changed
    assert open_store(tmp_path / "s.zarr").n_tokens == 128


SCRIPT = """
import sys, time
from pathlib import Path
import pipeline.extract as ex
from pipeline.config import ExtractConfig
slow = float(sys.argv[4])
real = ex.residual_states
def delayed(*a, **k):
    time.sleep(slow)
    return real(*a, **k)
ex.residual_states = delayed
ex.extract(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]),
           ExtractConfig(batch_size=2, shard_tokens=32, chunk_tokens=16, max_tokens={"test": None},
                         dtype=sys.argv[5], positions=sys.argv[6].split(",")), "test")
"""


def _run(args, slow, dtype, positions="block"):
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *map(str, args), str(slow), dtype, positions],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "seed,dtype,positions",
    [
        (0, "bfloat16", "block"),
        (1, "bfloat16", "block"),
        (0, "fp8", "block"),
        (1, "int8", "block"),
        (0, "bfloat16", "block,attention"),
        (1, "fp8", "block,attention"),
    ],
)
def test_sigkill_mid_extract_then_resume_gives_identical_store(tmp_path, seed, dtype, positions):
    model_dir = save_prepared(tiny_model("llama"), tmp_path / "m")
    split = write_packed_split(tmp_path / "test.npz", n_seq=16, seq_len=16, vocab=VOCAB)
    ref = tmp_path / "ref.zarr"
    assert _run([model_dir, split, ref], 0, dtype, positions).wait() == 0
    store = tmp_path / "s.zarr"
    proc = _run([model_dir, split, store], 0.3, dtype, positions)
    progress = store / "progress"
    deadline = time.monotonic() + 60
    want = 1 + seed  # kill after the first (or second) durable shard
    while time.monotonic() < deadline and len(list(progress.glob("*.json")) if progress.exists() else []) < want:
        time.sleep(0.05)
    with pytest.raises(StoreError, match="incomplete"):  # a reader during the write
        open_store(store)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (store / "COMPLETE").exists()
    assert _run([model_dir, split, store], 0, dtype, positions).wait() == 0
    a, b = open_store(ref), open_store(store)
    assert b.dtype == dtype and b.positions == tuple(positions.split(","))
    assert torch.equal(a.layers(range(a.n_layers + 1)), b.layers(range(b.n_layers + 1)))
    if "attention" in positions:
        assert torch.equal(a.attention(range(a.n_layers)), b.attention(range(b.n_layers)))
    assert torch.equal(a.tokens(), b.tokens())
    verify(store)


def test_verify_cli_fails_on_corruption(tmp_path):
    model_dir = save_prepared(tiny_model("llama"), tmp_path / "m")
    split = write_packed_split(tmp_path / "test.npz", n_seq=4, seq_len=16, vocab=VOCAB)
    extract(model_dir, split, tmp_path / "s.zarr", ExtractConfig(**SMALL), "test")
    cli = [sys.executable, "-m", "pipeline.cli", "verify", str(tmp_path / "s.zarr")]
    assert subprocess.run(cli, capture_output=True).returncode == 0
    shard = next(p for p in Path(tmp_path / "s.zarr" / "resid").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = subprocess.run(cli, capture_output=True, text=True)
    assert proc.returncode == 2 and "lenspipe: error:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("dtype,per_value", [("bfloat16", "2.000"), ("fp8", "1.125")])
def test_info_cli_summarises_complete_and_incomplete_stores(tmp_path, dtype, per_value):
    """Also the bytes per value and per token: an 8-bit store's include its row scales
    (d_model 32: (32 + 4) / 32 = 1.125 bytes per value)."""
    model_dir = save_prepared(tiny_model("llama"), tmp_path / "m")
    split = write_packed_split(tmp_path / "test.npz", n_seq=4, seq_len=16, vocab=VOCAB)
    extract(model_dir, split, tmp_path / "s.zarr", ExtractConfig(**(SMALL | {"dtype": dtype})), "test")
    cli = [sys.executable, "-m", "pipeline.cli", "info"]
    out = subprocess.run(cli + [str(tmp_path / "s.zarr")], capture_output=True, text=True)
    assert out.returncode == 0 and "(complete)" in out.stdout and "64 (4 sequences of 16)" in out.stdout
    assert f"3 x d_model 32, {dtype}" in out.stdout and "compression" in out.stdout
    per_token = 3 * 32 * 2 if dtype == "bfloat16" else 3 * (32 + 4)
    assert f"bytes:        {per_value} per value, {per_token} per token uncompressed; " in out.stdout
    # an interrupted store (no COMPLETE marker) is reported as such
    (tmp_path / "s.zarr" / "COMPLETE").unlink()
    out = subprocess.run(cli + ["--json", str(tmp_path / "s.zarr")], capture_output=True, text=True)
    import json

    assert out.returncode == 0 and json.loads(out.stdout)["complete"] is False


@pytest.mark.parametrize(
    "dtype,positions", [("bfloat16", ["block"]), ("int8", ["block"]), ("int8", ["block", "attention"])]
)
def test_parts_assemble_into_the_single_job_store(tmp_path, dtype, positions):
    """Also an 8-bit store's: its row scales' shard files are linked in with the values'
    (and the attention position's, with its scales)."""
    from pipeline.extract import extract_part, part_range
    from pipeline.store.parts import assemble_store

    assert [part_range(13, 4, p, 3) for p in range(3)] == [(0, 8), (8, 12), (12, 13)]  # 4 shards: 2 + 1 + 1
    model_dir = save_prepared(tiny_model("llama"), tmp_path / "m")
    split = write_packed_split(tmp_path / "test.npz", n_seq=13, seq_len=16, vocab=VOCAB)
    small = SMALL | {"shard_tokens": 64, "dtype": dtype, "positions": positions}  # 4 sequences per shard
    cfg = ExtractConfig(**(small | {"parts": 3}))
    ref = tmp_path / "ref.zarr"
    extract(model_dir, split, ref, ExtractConfig(**small), "test")
    parts = [tmp_path / f"p{i}.zarr" for i in range(3)]
    for i, p in enumerate(parts):
        extract_part(model_dir, split, p, cfg, "test", i)
    dest = tmp_path / "s.zarr"
    assemble_store(parts, dest)
    a, b = open_store(ref), open_store(dest)
    assert torch.equal(a.layers(range(a.n_layers + 1)), b.layers(range(b.n_layers + 1)))
    assert torch.equal(a.tokens(), b.tokens()) and a.params == b.params
    if "attention" in positions:
        assert torch.equal(a.attention(range(a.n_layers)), b.attention(range(b.n_layers)))
    assert verify(dest)["n_shards"] == 4 and b.provenance["assembled_from"]["parts"] == 3
    assert {k: v for k, v in b.provenance.items() if k not in ("assembled_from", "extract_config")} == {
        k: v for k, v in a.provenance.items() if k != "extract_config"
    }
    with pytest.raises(StoreError, match="not the parts"):
        assemble_store(parts[::-1], tmp_path / "x.zarr")
    with pytest.raises(ConfigError, match="exceeds this split's 4 shards"):
        extract_part(model_dir, split, tmp_path / "y.zarr", ExtractConfig(**(small | {"parts": 5})), "test", 0)
