"""The storage dtypes: one registry, the 8-bit quantisation and its decode, what verify
and the writer refuse in 8-bit stores, and the docs' reader without lenspipe."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_store import N_LAYERS, SCALED, SHARD, D, decoded_reference, make_data, params, stored_reference, write_store

from pipeline.errors import StoreError
from pipeline.store.dtypes import DTYPES, FP8_TABLE
from pipeline.store.reader import decode, open_store
from pipeline.store.verify import verify
from pipeline.store.writer import StoreWriter

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- one registry


def test_config_schema_and_store_take_their_dtypes_from_the_registry():
    from pipeline.config import STORE_DTYPES, config_schema

    schema = config_schema()  # generated from the typed config: the registry's names are its choices
    assert schema["properties"]["extract"]["properties"]["dtype"]["enum"] == list(DTYPES) == list(STORE_DTYPES)
    assert {"bfloat16", "float16", "float32", "fp8", "int8"} == set(DTYPES)
    assert [d for d in DTYPES if DTYPES[d].scaled] == SCALED


def _chunk(name: str, ndim: int, shard: int) -> tuple:
    """The chunk index of shard ``shard`` of array ``name`` (tokens: one axis)."""
    return (0, shard, 0)[:ndim] if name != "tokens" else (shard,)


def test_the_shard_files_are_zarr_s_own_chunk_keys(tmp_path):
    from pipeline.store.layout import array_names, shard_files

    write_store(tmp_path / "s", *make_data(2 * SHARD), dtype="fp8")
    p = open_store(tmp_path / "s").params
    group = zarr.open_group(str(tmp_path / "s"), mode="r")
    for shard in range(p.n_shards):
        keys = [
            f"{name}/{group[name].metadata.encode_chunk_key(_chunk(name, group[name].ndim, shard))}"
            for name in array_names(p)
        ]
        assert shard_files(p, shard) == keys and all((tmp_path / "s" / k).is_file() for k in keys)


# ---------------------------------------------------------------- quantisation and decode


def test_fp8_table_and_decode_match_torch_for_every_bit_pattern():
    """The reader's fp8 decode (bit placement, the 2^120 folded into the scale where that
    stays finite, else two multiplies) is float32(q) * scale exactly, for all 256 patterns,
    subnormals and -0 included, for ordinary, subnormal and large scales, strided too."""
    bits = np.arange(256, dtype=np.uint8)
    torch_values = torch.from_numpy(bits).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(FP8_TABLE, torch_values, equal_nan=True)
    valid = bits[(bits & 0x7F) != 0x7F]  # the writer never stores NaN
    assert np.array_equal(FP8_TABLE[valid].view(np.uint32), torch_values[valid].view(np.uint32))  # -0 too
    raw = np.tile(valid, (2, 5, 1))  # (2 layers, 5 rows, 254 values)
    for scales in ([1.0, 0.37, 1e-40, 3e-39, 7.5], [1.0, 0.37, 1e-40, 3e-39, 1e34]):  # 1e34: 2^120 x scale overflows
        scale = np.array([scales, scales[::-1]], np.float32)
        want = FP8_TABLE[raw] * scale[..., None]
        got = decode(raw, DTYPES["fp8"], scale)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
        out = np.full((2, 10, 254), np.nan, np.float32)[:, ::2]  # a strided view
        from pipeline.store.reader import decode_into

        decode_into(raw, out, DTYPES["fp8"], scale)
        assert np.array_equal(out.view(np.uint32), want.view(np.uint32))
        assert np.array_equal(decode(raw[0], DTYPES["fp8"], scale[0]), want[0])  # one layer (n, d)


@pytest.mark.parametrize("dtype", SCALED)
def test_quantisation_edge_rows(tmp_path, dtype):
    """A zero row gets scale 1 and values 0; an attention-sink row (|x| ~ 2e4) does not
    crush its neighbours (each row its own scale); a row's absmax is stored as +-qmax; and
    where float rounding makes x / scale land above qmax (an absmax just above a multiple
    of qmax; a row so small that its scale is a subnormal of 1-2 bits), it is clamped:
    never a NaN (an fp8 cast that does not saturate) or a wrapped int8 in the store."""
    qmax = np.float32(448 if dtype == "fp8" else 127)
    rng = np.random.default_rng(5)
    # absmax values whose absmax / (absmax / qmax) > qmax in float32
    over = [a for a in rng.uniform(1, 1e4, 20000).astype(np.float32) if a / (a / qmax) > qmax][:SHARD]
    assert len(over) == SHARD
    resid, toks = make_data(SHARD)
    resid[0, 3] = 0.0  # a zero row
    # absmax 189 ulps of float32's subnormals: scale 189 / qmax ulps rounds to 1 (int8) or 0 (fp8:
    # then 1), and absmax / scale = 189 > qmax for int8
    resid[0, 4] = np.float32(189 * 2.0**-149) * np.sign(resid[0, 4])
    resid[1, 0] *= 2e3  # an attention sink among ordinary rows
    resid[2, :, 0] = over  # feature 0 is each row's absmax, one that rounds above qmax
    resid[2, :, 1:] = np.clip(resid[2, :, 1:], -1, 1)
    write_store(tmp_path / "s", resid, toks, dtype=dtype)
    store = open_store(tmp_path / "s")
    q, scale = store._resid[...], store._scale[...]
    assert scale[0, 3] == 1 and not q[0, 3].any()
    assert DTYPES[dtype].problem(q, scale) is None and DTYPES[dtype].valid(q)
    top = np.uint8(0x7E) if dtype == "fp8" else np.int8(127)  # 448 / 127
    assert (q[2, :, 0] == top).all()
    got = store.layers([0, 1, 2])
    assert torch.equal(got, decoded_reference(resid, dtype))
    ordinary = np.abs(got[1, 1:].numpy() - resid[1, 1:]) / np.abs(resid[1, 1:]).max(-1, keepdims=True)
    assert ordinary.max() < (0.07 if dtype == "fp8" else 0.005)  # the sink's neighbours keep their precision


def test_the_8_bit_cast_adds_only_a_layer_sized_temporary(monkeypatch):
    """cast_into quantises layer by layer through one (k, d) float32 temporary, into the
    shard buffer itself: no (L+1, k, d) copy of the batch."""
    from pipeline.store import encoding

    created = []
    real_empty = torch.empty

    def empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        created.append(t.numel())
        return t

    monkeypatch.setattr(encoding.torch, "empty", empty)
    x = torch.randn(N_LAYERS + 1, 40, D)
    out, scale = np.empty((N_LAYERS + 1, 40, D), np.uint8), np.empty((N_LAYERS + 1, 40), np.float32)
    encoding.cast_into(out, x, "fp8", scale)
    assert created == [40 * D]
    q, want_scale = stored_reference(x.numpy(), "fp8")
    assert np.array_equal(out, q) and np.array_equal(scale, want_scale)


# ---------------------------------------------------------------- what verify and the writer refuse


def _tamper(store: Path, array: str, index: tuple, value) -> None:
    """Change one stored number as a faulty writer would: the shard's record, the
    completion marker and the manifest then agree with it, so only the value checks can
    catch it."""
    from pipeline.provenance import sha256_json
    from pipeline.store.layout import record_name, shard_checksums

    group = zarr.open_group(str(store), mode="r+")
    group[array][index] = value
    s = open_store(store)
    shard = index[1] // SHARD
    start, stop = s.params.shard_span(shard)
    rec_path = store / record_name(shard)
    rec = json.loads(rec_path.read_text())
    rec.update(shard_checksums(s._resid[:, start:stop], s._tokens[start:stop], s._scale[:, start:stop]))
    rec_path.write_text(json.dumps(rec))
    records = [json.loads((store / record_name(i)).read_text()) for i in range(s.params.n_shards)]
    marker = json.loads((store / "COMPLETE").read_text())
    (store / "COMPLETE").write_text(json.dumps({**marker, "records_sha256": sha256_json(records)}))
    (store / "SHA256SUMS").unlink()


@pytest.mark.parametrize(
    "dtype,array,value,message",
    [
        ("fp8", "scale", np.nan, "scales of layer 1|layer 1: holds scales that are not finite and > 0"),
        ("int8", "scale", 0.0, "layer 1: holds scales that are not finite and > 0"),
        ("fp8", "scale", -2.0, "layer 1: holds scales that are not finite and > 0"),
        ("fp8", "scale", 3e38, r"layer 1: holds values that decode to inf \(value x scale overflows float32\)"),
        ("fp8", "resid", 0x7F, "layer 1: holds inf/nan values"),
        ("int8", "resid", -128, "layer 1: holds values outside -127..127"),
    ],
)
def test_verify_checks_the_values_and_scales_of_an_8_bit_store(tmp_path, dtype, array, value, message):
    write_store(tmp_path / "s", *make_data(2 * SHARD), dtype=dtype)
    verify(tmp_path / "s")
    _tamper(tmp_path / "s", array, (1, SHARD + 5) if array == "scale" else (1, SHARD + 5, 3), value)
    with pytest.raises(StoreError, match=rf"shard 1 \(tokens 64..128\), ({message})"):
        verify(tmp_path / "s")


def test_write_stored_copies_bits_and_refuses_what_no_writer_stores(tmp_path):
    resid, toks = make_data(SHARD)
    q, scale = stored_reference(resid, "fp8")
    with StoreWriter.open(tmp_path / "s", **params(SHARD, dtype="fp8")) as w:
        with pytest.raises(StoreError, match="uint8 with float32 row scales, got uint8$"):
            w.write_stored(q, toks)
        bad = scale.copy()
        bad[0, 0] = 0
        with pytest.raises(StoreError, match="inf/nan .or invalid scales.; the source is damaged"):
            w.write_stored(q, toks, bad)
        w.write_stored(q, toks, scale)
    s = open_store(tmp_path / "s")
    assert np.array_equal(s._resid[...], q) and np.array_equal(s._scale[...], scale)


def test_a_version_1_store_reads_and_an_8_bit_one_is_version_2(tmp_path):
    """Stores of the unscaled dtypes keep schema version 1 and no scale array: what every
    lenspipe before the 8-bit dtypes wrote and reads. An 8-bit store is version 2, so such a
    lenspipe refuses it by its version rather than misreading it."""
    write_store(tmp_path / "b", *make_data(SHARD), dtype="bfloat16")
    write_store(tmp_path / "f", *make_data(SHARD), dtype="fp8")
    old, new = zarr.open_group(str(tmp_path / "b"), mode="r"), zarr.open_group(str(tmp_path / "f"), mode="r")
    assert old.attrs["schema_version"] == 1 and sorted(old.array_keys()) == ["resid", "tokens"]
    assert new.attrs["schema_version"] == 2 and sorted(new.array_keys()) == ["resid", "scale", "tokens"]
    assert new["resid"].attrs["scale"] == "scale" and new["resid"].attrs["encoding"] == "float8_e4m3fn-bits"
    assert verify(tmp_path / "b")["dtype"] == "bfloat16" and verify(tmp_path / "f")["dtype"] == "fp8"


# ---------------------------------------------------------------- the README's reader without lenspipe


def readme_snippet() -> str:
    """The python block of the compact-stores page that follows "a reader without lenspipe"."""
    text = (REPO / "docs" / "explanation" / "compact-stores.md").read_text()
    after = text.split("**A reader without lenspipe**", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


@pytest.mark.parametrize("dtype", SCALED)
def test_the_readme_snippet_rebuilds_the_values_without_lenspipe(tmp_path, dtype):
    """The README's 5 lines, run as they are (zarr + numpy + ml_dtypes, in a process that
    never imports lenspipe) on an extracted store, give lenspipe's reader's values bit for bit."""
    from tiny import VOCAB, save_prepared, tiny_model, write_packed_split

    from pipeline.config import ExtractConfig
    from pipeline.extract import extract

    snippet = readme_snippet()
    assert len(snippet.strip().splitlines()) <= 6, snippet
    model_dir = save_prepared(tiny_model("llama"), tmp_path / "m")
    split = write_packed_split(tmp_path / "test.npz", n_seq=6, seq_len=16, vocab=VOCAB)
    cfg = ExtractConfig(batch_size=2, shard_tokens=32, chunk_tokens=16, max_tokens={"test": None}, dtype=dtype)
    extract(model_dir, split, tmp_path / "test.zarr", cfg, "test")
    program = (
        "import sys\n" + snippet + "\nimport numpy\nassert 'pipeline' not in sys.modules\nnumpy.save(sys.argv[1], x)\n"
    )
    subprocess.run([sys.executable, "-c", program, str(tmp_path / "x.npy")], check=True, cwd=tmp_path, timeout=120)
    got = np.load(tmp_path / "x.npy")
    store = open_store(tmp_path / "test.zarr")
    want = store.layers(range(store.n_layers + 1)).numpy()
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
