"""A store of the attention position: its ``attn`` array (and the 8-bit dtypes' ``attn_scale``)
beside ``resid``, written by the same writer in the same shards, and covered by everything
that covers resid: checksums, SHA256SUMS, verify, info, exports, resume and URL reads."""

from __future__ import annotations

import functools
import http.server
import json
import threading

import numpy as np
import pytest
import torch
from test_store import N_LAYERS, SHARD, RangeHandler, decoded_reference, make_data, params

from pipeline.errors import StoreError
from pipeline.store.export import export_store, import_store
from pipeline.store.info import store_info
from pipeline.store.reader import open_store
from pipeline.store.verify import verify
from pipeline.store.writer import StoreWriter

BOTH = ["block", "attention"]
N = 3 * SHARD + 16  # a short last shard too


def _data(n: int = N):
    resid, toks = make_data(n)
    attn = make_data(n, seed=1)[0][1:] * 3  # (L, n, d): other values than resid's
    return resid, attn, toks


def _write(path, resid, attn, toks, dtype="bfloat16", batch=48, **over):
    with StoreWriter.open(path, **params(resid.shape[1], dtype=dtype, positions=BOTH, **over)) as w:
        for s in range(0, resid.shape[1], batch):
            w.write(
                torch.from_numpy(resid[:, s : s + batch]), toks[s : s + batch], torch.from_numpy(attn[:, s : s + batch])
            )


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "fp8", "int8"])
def test_round_trip_at_both_positions(tmp_path, dtype):
    resid, attn, toks = _data()
    _write(tmp_path / "s", resid, attn, toks, dtype)
    store = open_store(tmp_path / "s")
    assert store.positions == ("block", "attention")
    assert torch.equal(store.layers(range(N_LAYERS + 1)), decoded_reference(resid, dtype))
    assert torch.equal(store.attention(range(N_LAYERS)), decoded_reference(attn, dtype))
    assert torch.equal(
        store.states([("block", 2), ("attention", 0), ("block", 0)], 10, 90),
        torch.stack(
            [decoded_reference(resid, dtype)[2], decoded_reference(attn, dtype)[0], decoded_reference(resid, dtype)[0]]
        )[:, 10:90],
    )
    assert np.array_equal(store.dask("attention").compute(), decoded_reference(attn, dtype).numpy())
    names = sorted(store.value_arrays)
    assert names == (["attn", "attn_scale", "resid", "scale"] if dtype in ("fp8", "int8") else ["attn", "resid"])
    record = json.loads((tmp_path / "s" / "progress" / "shard-000000.json").read_text())
    assert len(record["attn_xxh3"]) == N_LAYERS and len(record["resid_xxh3"]) == N_LAYERS + 1
    assert ("attn_scale_xxh3" in record) == (dtype in ("fp8", "int8"))
    manifest = (tmp_path / "s" / "SHA256SUMS").read_text()
    assert "  attn/c/0/3/0\n" in manifest
    summary = verify(tmp_path / "s")
    assert summary["checked_values"] == (2 * N_LAYERS + 1) * N * 8
    per_token = {"bfloat16": 2 * 8, "float32": 4 * 8, "fp8": 8 + 4, "int8": 8 + 4}[dtype] * (2 * N_LAYERS + 1)
    assert store_info(tmp_path / "s")["raw_bytes_per_token"] == per_token


def test_a_batch_must_hold_every_stored_position(tmp_path):
    resid, attn, toks = _data(SHARD)
    with StoreWriter.open(tmp_path / "s", **params(SHARD, positions=BOTH)) as w:
        with pytest.raises(StoreError, match="holds resid, attn \\(positions \\['block', 'attention'\\]\\); got resid"):
            w.write(resid, toks)
        with pytest.raises(StoreError, match=r"attn batch has shape \(3, 64, 8\), expected \(2, n, 8\)"):
            w.write(resid, toks, resid)
        w.write(resid, toks, attn)
    with StoreWriter.open(tmp_path / "b", **params(SHARD)) as w:
        with pytest.raises(StoreError, match="holds resid \\(positions \\['block'\\]\\); got resid, attn"):
            w.write(resid, toks, attn)
        w.write(resid, toks)


def test_verify_names_the_damaged_attention_layer(tmp_path):
    resid, attn, toks = _data()
    _write(tmp_path / "s", resid, attn, toks)
    (tmp_path / "s" / "SHA256SUMS").unlink()  # so the shard checksums are what finds it
    record = tmp_path / "s" / "progress" / "shard-000001.json"
    rec = json.loads(record.read_text())
    rec["attn_xxh3"][1] = "0" * 32
    record.write_text(json.dumps(rec))
    marker = json.loads((tmp_path / "s" / "COMPLETE").read_text())
    from pipeline.provenance import sha256_json

    records = [json.loads((tmp_path / "s" / "progress" / f"shard-{i:06d}.json").read_text()) for i in range(4)]
    marker["records_sha256"] = sha256_json(records)
    (tmp_path / "s" / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(StoreError, match=r"shard 1 \(tokens 64..128\), attention layer 1: checksum mismatch"):
        verify(tmp_path / "s")


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("fmt", ["zip", "hdf5"])
def test_exports_round_trip_the_attention_states(tmp_path, dtype, fmt):
    resid, attn, toks = _data()
    _write(tmp_path / "s", resid, attn, toks, dtype)
    out = tmp_path / f"s.{fmt}"
    export_store(tmp_path / "s", out, fmt)
    if fmt == "hdf5":
        import h5py

        with h5py.File(out) as f:
            assert f["attn"].shape == (N_LAYERS, N, 8)
            np.testing.assert_array_equal(f["attn"][...], open_store(tmp_path / "s").value_arrays["attn"][...])
            assert ("attn_scale" in f) == (dtype == "int8")
    back = tmp_path / "back.zarr"
    import_store(out, back)
    a, b = open_store(tmp_path / "s"), open_store(back)
    assert a.params == b.params and b.positions == ("block", "attention")
    assert torch.equal(a.attention(range(N_LAYERS)), b.attention(range(N_LAYERS)))
    assert torch.equal(a.layers(range(N_LAYERS + 1)), b.layers(range(N_LAYERS + 1)))


def test_resume_rewrites_the_attention_shards_too(tmp_path):
    """An interrupted write (a batch that fills shard 1 half, then the writer dropped) resumes
    from the last durable shard; the store is the one of an uninterrupted write."""
    resid, attn, toks = _data()
    _write(tmp_path / "ref", resid, attn, toks)
    w = StoreWriter.open(tmp_path / "s", **params(N, positions=BOTH), background=False)
    w.write(resid[:, :96], toks[:96], attn[:, :96])
    w.abort()
    with StoreWriter.open(tmp_path / "s", **params(N, positions=BOTH)) as w:
        assert w.resume_token == SHARD
        w.write(resid[:, SHARD:], toks[SHARD:], attn[:, SHARD:])
    a, b = open_store(tmp_path / "ref"), open_store(tmp_path / "s")
    assert torch.equal(a.attention(range(N_LAYERS)), b.attention(range(N_LAYERS)))
    verify(tmp_path / "s")
    with pytest.raises(StoreError, match="different parameters.*positions"):
        StoreWriter.open(tmp_path / "s", **params(N))  # another layout: refused, not mixed


def test_attention_states_read_by_url(tmp_path):
    resid, attn, toks = _data(4 * SHARD)
    _write(tmp_path / "s", resid, attn, toks, "int8")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        store = open_store(f"http://127.0.0.1:{server.server_address[1]}/s")
        assert torch.equal(store.attention(1, 0, 2 * SHARD), decoded_reference(attn, "int8")[1, : 2 * SHARD])
        assert verify(f"http://127.0.0.1:{server.server_address[1]}/s")["positions"] == BOTH
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
