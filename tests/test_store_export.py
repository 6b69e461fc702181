"""Sharing a store as one file: zip (a zarr ZipStore) and HDF5 round trips, reads in place."""

import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest
import torch
from test_store import make_data, params

from pipeline.errors import StoreError
from pipeline.store.export import export_store, import_store
from pipeline.store.reader import open_store
from pipeline.store.verify import verify
from pipeline.store.writer import StoreWriter

N = 3 * 64 + 16  # a short last shard too


@pytest.fixture(params=["bfloat16", "float16", "float32", "fp8", "int8"])
def store(request, tmp_path):
    resid, toks = make_data(N)
    with StoreWriter.open(tmp_path / "s.zarr", **params(N, dtype=request.param)) as w:
        w.write(resid, toks)
    return tmp_path / "s.zarr"


def _same(a, b):
    x, y = open_store(a), open_store(b)
    assert x.params == y.params and x.provenance == y.provenance
    assert torch.equal(x.layers(range(x.n_layers + 1)), y.layers(range(y.n_layers + 1)))
    assert torch.equal(x.tokens(), y.tokens())
    return x.n_tokens * (x.n_layers + 1) * x.d_model


@pytest.mark.parametrize("fmt", ["zip", "hdf5"])
def test_round_trip_is_lossless(store, tmp_path, fmt):
    out = tmp_path / f"s.{fmt}"
    export_store(store, out, fmt)
    assert not list(tmp_path.glob(".*.partial"))
    back = tmp_path / "back.zarr"
    import_store(out, back)
    assert _same(store, back) == N * 3 * 8  # every value compared
    verify(back)


def test_hdf5_layout_keeps_the_stored_bits_scales_and_provenance(store, tmp_path):
    """bf16 and fp8 as their bits with an encoding attribute, int8 as int8, the 8-bit
    dtypes' row scales as a dataset of their own: the stored numbers, not a conversion."""
    export_store(store, tmp_path / "s.h5", "hdf5")
    src = open_store(store)
    with h5py.File(tmp_path / "s.h5") as f:
        ds = f["resid"]
        assert ds.shape == (3, N, 8) and ds.chunks == (1, 32, 8)
        want = {
            "bfloat16": (np.uint16, "bfloat16-bits"),
            "fp8": (np.uint8, "float8_e4m3fn-bits"),
            "int8": (np.int8, None),
        }.get(src.dtype)
        if want:
            assert ds.dtype == want[0] and ds.attrs.get("encoding") == want[1]
            np.testing.assert_array_equal(ds[...], src._resid[...])
        assert ("scale" in f) == (src.dtype in ("fp8", "int8"))
        if "scale" in f:
            assert f["scale"].shape == (3, N) and f["scale"].dtype == np.float32 and ds.attrs["scale"] == "scale"
            np.testing.assert_array_equal(f["scale"][...], src._scale[...])
        assert "provenance" in f.attrs["lenspipe_attrs"]


def test_zip_is_read_in_place(store, tmp_path):
    export_store(store, tmp_path / "s.zip", "zip")
    with zipfile.ZipFile(tmp_path / "s.zip") as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    assert _same(store, tmp_path / "s.zip")
    verify(tmp_path / "s.zip")


def test_bad_exports_and_imports_are_refused(store, tmp_path):
    with pytest.raises(StoreError, match="not one of"):
        export_store(store, tmp_path / "x", "tar")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="neither a zip nor an HDF5"):
        import_store(tmp_path / "junk.h5", tmp_path / "j.zarr")
    export_store(store, tmp_path / "s.h5", "hdf5")
    with h5py.File(tmp_path / "s.h5", "r+") as f:  # one flipped value after export
        f["resid"][1, 70, 3] = f["resid"][1, 70, 3] ^ 1 if f["resid"].dtype.kind in "ui" else f["resid"][1, 70, 3] + 1
    with pytest.raises(StoreError, match=r"s.h5 shard 1 \(tokens 64..128\), layer 1: checksum mismatch"):
        import_store(tmp_path / "s.h5", tmp_path / "bad.zarr")
    if "scale" in h5py.File(tmp_path / "s.h5"):
        export_store(store, tmp_path / "t.h5", "hdf5")
        with h5py.File(tmp_path / "t.h5", "r+") as f:  # one changed row scale
            f["scale"][2, 150] = f["scale"][2, 150] * 2
        with pytest.raises(StoreError, match=r"t.h5 shard 2 \(tokens 128..192\), scales of layer 2: checksum mismatch"):
            import_store(tmp_path / "t.h5", tmp_path / "bad.zarr")
    with pytest.raises(StoreError, match="already exists"):
        import_store(tmp_path / "s.h5", store)


def test_cli_export_import(store, tmp_path):
    cli = [sys.executable, "-m", "pipeline.cli"]
    assert subprocess.run(cli + ["export", str(store), "--to", "zip"], capture_output=True).returncode == 0
    proc = subprocess.run(
        cli + ["import", str(store.with_suffix(".zip")), str(tmp_path / "c.zarr")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    _same(store, tmp_path / "c.zarr")


def test_manifest_names_the_damaged_file(store, tmp_path):
    lines = (store / "SHA256SUMS").read_text().splitlines()
    assert any(line.endswith("  resid/c/0/1/0") for line in lines) and verify(store)["checked_files_sha256"] == len(
        lines
    )
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=store).returncode == 0
    shard = store / "resid" / "c" / "0" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"resid/c/0/2/0 \(shard 2\) does not match its sha256"):
        verify(store)
    shard.unlink()
    with pytest.raises(StoreError, match="listed in SHA256SUMS but missing"):
        verify(store)


def test_an_export_carries_its_card(store, tmp_path):
    import yaml

    from pipeline.store.reader import open_store

    out = export_store(store, tmp_path / "share" / "s.zip", "zip")
    text = (tmp_path / "share" / "README.md").read_text()
    assert out["card"] == str(tmp_path / "share" / "README.md")
    meta = yaml.safe_load(text.split("---\n")[1])["lenspipe"]
    s = open_store(store)
    assert (meta["tokens"], meta["dtype"], meta["fingerprint"]) == (
        s.n_tokens,
        s.attrs["dtype"],
        s.attrs["fingerprint"],
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README.md").write_text("someone else's readme")
    out = export_store(store, tmp_path / "other" / "s.zip", "zip")
    assert out["card"].endswith("s.zip.README.md")  # never over someone else's README
    assert (tmp_path / "other" / "README.md").read_text() == "someone else's readme"
