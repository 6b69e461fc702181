"""extract with positions [block, attention]: the attention array beside resid, what it costs,
its provenance, and a store of other positions re-extracted rather than mixed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import VOCAB, save_prepared, tiny_model, write_packed_split

from pipeline.config import ExtractConfig
from pipeline.errors import ConfigError, UnsupportedModel
from pipeline.extract import extract, load_model
from pipeline.model.residual import residual_states
from pipeline.store.reader import open_store
from pipeline.store.verify import verify

SMALL = dict(batch_size=2, shard_tokens=32, chunk_tokens=16, max_tokens={"test": None})
BOTH = ["block", "attention"]


@pytest.mark.parametrize("family", ["llama", "gemma3", "falcon_new", "granite"])
def test_the_attention_array_holds_the_blocks_mid_states(tmp_path, family):
    model = tiny_model(family)
    model_dir = save_prepared(model, tmp_path / family)
    split = write_packed_split(tmp_path / "test.npz", n_seq=6, seq_len=16, vocab=VOCAB)
    extract(model_dir, split, tmp_path / "b.zarr", ExtractConfig(dtype="float32", **SMALL), "test")
    extract(model_dir, split, tmp_path / "s.zarr", ExtractConfig(dtype="float32", positions=BOTH, **SMALL), "test")
    store, blocks = open_store(tmp_path / "s.zarr"), open_store(tmp_path / "b.zarr")
    assert store.positions == ("block", "attention") and blocks.positions == ("block",)
    ids = store.tokens().reshape(6, 16)
    n = store.n_layers
    # the model's own states (loaded as extraction loads it), in its batches of 2 sequences: the same bits
    loaded = load_model(model_dir, torch.device("cpu"), torch.float32)
    mid = torch.cat([residual_states(loaded, ids[i : i + 2], positions=BOTH)[0]["attention"] for i in (0, 2, 4)], 1)
    assert torch.equal(store.attention(range(n)), mid.reshape(n, 96, -1))
    # the block states are those of a block-only store, bit for bit
    assert torch.equal(store.layers(range(n + 1)), blocks.layers(range(n + 1)))
    assert store.attrs["schema_version"] == 3 and blocks.attrs["schema_version"] == 1
    assert store.attrs["params"]["positions"] == BOTH and "positions" not in blocks.attrs["params"]
    prov = store.provenance
    assert prov["extract_config"]["positions"] == BOTH and "positions" not in blocks.provenance["extract_config"]
    assert prov["attention_position"]["sublayers"]["attention_output"] == (
        "post_attention_layernorm"
        if family == "gemma3"
        else "self_attention"
        if family == "falcon_new"
        else "self_attn"
    )
    assert verify(tmp_path / "s.zarr")["positions"] == BOTH


def test_a_store_of_other_positions_is_extracted_anew(tmp_path):
    model_dir = save_prepared(tiny_model("llama"), tmp_path / "m")
    split = write_packed_split(tmp_path / "test.npz", n_seq=4, seq_len=16, vocab=VOCAB)
    path = tmp_path / "s.zarr"
    extract(model_dir, split, path, ExtractConfig(**SMALL), "test")
    first = open_store(path).attrs["fingerprint"]
    assert extract(model_dir, split, path, ExtractConfig(**SMALL), "test")["resumed_from"] == 64  # up to date
    extract(model_dir, split, path, ExtractConfig(positions=BOTH, **SMALL), "test")
    store = open_store(path)
    assert store.positions == ("block", "attention") and store.attrs["fingerprint"] != first
    extract(model_dir, split, path, ExtractConfig(**SMALL), "test")  # and back
    assert open_store(path).positions == ("block",) and open_store(path).attrs["fingerprint"] == first


def test_block_only_reads_refuse_the_attention_position(tmp_path):
    model_dir = save_prepared(tiny_model("llama"), tmp_path / "m")
    split = write_packed_split(tmp_path / "test.npz", n_seq=4, seq_len=16, vocab=VOCAB)
    extract(model_dir, split, tmp_path / "s.zarr", ExtractConfig(**SMALL), "test")
    with pytest.raises(Exception, match="holds positions \\['block'\\], not 'attention'.*extract.positions"):
        open_store(tmp_path / "s.zarr").attention(0)
    extract(model_dir, split, tmp_path / "a.zarr", ExtractConfig(positions=BOTH, **SMALL), "test")
    with pytest.raises(Exception, match="layer 2 out of range: the store holds layers 0..1 at the attention position"):
        open_store(tmp_path / "a.zarr").attention(2)


def test_post_norm_families_are_refused_before_anything_is_written(tmp_path):
    model_dir = save_prepared(tiny_model("opt_proj"), tmp_path / "m")
    split = write_packed_split(tmp_path / "test.npz", n_seq=4, seq_len=16, vocab=VOCAB)
    with pytest.raises(UnsupportedModel, match="post-norm block"):
        extract(model_dir, split, tmp_path / "s.zarr", ExtractConfig(positions=BOTH, **SMALL), "test")
    assert not (tmp_path / "s.zarr").exists()


def test_positions_in_the_config():
    assert ExtractConfig(positions=["attention", "block"]).positions == BOTH  # depth order
    with pytest.raises(ConfigError, match=r"extract.positions must be one of \['block', 'attention'\], got 'mlp'"):
        ExtractConfig(positions=["block", "mlp"])
    with pytest.raises(ConfigError, match="must include 'block'"):
        ExtractConfig(positions=["attention"])


@pytest.mark.parametrize("dtype,per_token", [("bfloat16", (3 + 2) * 32 * 2), ("fp8", (3 + 2) * (32 + 4))])
def test_info_counts_the_attention_states(tmp_path, dtype, per_token):
    model_dir = save_prepared(tiny_model("llama"), tmp_path / "m")
    split = write_packed_split(tmp_path / "test.npz", n_seq=4, seq_len=16, vocab=VOCAB)
    extract(model_dir, split, tmp_path / "s.zarr", ExtractConfig(dtype=dtype, positions=BOTH, **SMALL), "test")
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "info", "--json", str(tmp_path / "s.zarr")],
        capture_output=True,
        text=True,
    )
    info = json.loads(out.stdout)
    assert info["raw_bytes_per_token"] == per_token and info["positions"] == BOTH
    assert info["states_per_token"] == 5
    store = open_store(tmp_path / "s.zarr")
    on_disk = sum(
        f.stat().st_size
        for name in store.value_arrays
        for f in (tmp_path / "s.zarr" / name).rglob("*")
        if f.is_file() and f.name != "zarr.json"
    )
    assert info["stored_bytes"] == on_disk
    if dtype == "fp8":  # the attention states have row scales of their own
        assert np.all(store.value_arrays["attn_scale"][...] > 0)
