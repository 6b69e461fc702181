"""Damaged shared files: every reader gives one message (a LenspipeError), never a traceback.

A fuzz-style test: an exported zip and an exported HDF5 file are truncated at seeded
offsets and get one byte flipped at seeded offsets; a zarr store loses or garbles a shard,
a zarr.json or a sidecar. ``verify`` must call each case damage; ``info``, ``import`` and a
read through ``open_store`` must end in a LenspipeError or succeed, never in another
exception, and ``import`` must leave nothing behind. Each for a bfloat16 store and for the
8-bit dtypes' stores, whose row scales are damaged too (a shard of them, their zarr.json,
a byte of their chunks in the exports), and for an fp8 store of the attention position too,
whose attention states and their scales are damaged alike.
"""

from __future__ import annotations

import random
import re
import shutil
import struct
import zipfile
from pathlib import Path

import h5py
import pytest
import torch
from test_store import make_data, params

from pipeline.errors import LenspipeError, StoreError
from pipeline.store.export import export_store, import_store
from pipeline.store.info import store_info
from pipeline.store.reader import open_store
from pipeline.store.verify import verify
from pipeline.store.writer import StoreWriter

N = 3 * 64 + 16  # 4 shards, the last one short
SEED = 17
N_TRUNCATIONS = 8  # per file format: 6 at random, one inside a chunk, one in the zip directory / at the end
N_RANDOM_FLIPS = 20  # per file format, plus the targeted ones below

#: Damage to a zarr store directory: name -> what is done to it.
ZARR_DAMAGE = {
    "missing shard": ("resid/c/0/1/0", "delete"),
    "empty shard": ("resid/c/0/2/0", "empty"),
    "truncated shard": ("resid/c/0/0/0", "truncate"),
    "missing token shard": ("tokens/c/1", "delete"),
    "missing zarr.json": ("zarr.json", "delete"),
    "garbled zarr.json": ("zarr.json", "garble"),
    "missing resid/zarr.json": ("resid/zarr.json", "delete"),
    "garbled resid/zarr.json": ("resid/zarr.json", "garble"),
    "garbled tokens/zarr.json": ("tokens/zarr.json", "garble"),
    "garbled SHA256SUMS": ("SHA256SUMS", "garble"),
    "garbled shard record": ("progress/shard-000002.json", "garble"),
    # Without SHA256SUMS (stores from before it existed) the shard checksums must still catch it.
    "missing shard, no SHA256SUMS": ("resid/c/0/1/0", "delete"),
    "empty shard, no SHA256SUMS": ("resid/c/0/2/0", "empty"),
    "truncated shard, no SHA256SUMS": ("resid/c/0/0/0", "truncate"),
}
#: The same for the row scales of an 8-bit store.
SCALE_DAMAGE = {
    "missing scale shard": ("scale/c/0/1", "delete"),
    "empty scale shard": ("scale/c/0/2", "empty"),
    "truncated scale shard": ("scale/c/0/0", "truncate"),
    "garbled scale/zarr.json": ("scale/zarr.json", "garble"),
    "missing scale/zarr.json": ("scale/zarr.json", "delete"),
    "missing scale shard, no SHA256SUMS": ("scale/c/0/1", "delete"),
    "truncated scale shard, no SHA256SUMS": ("scale/c/0/0", "truncate"),
    "garbled scale shard, no SHA256SUMS": ("scale/c/0/3", "garble"),
}
#: The same for the attention position's states and their row scales.
ATTENTION_DAMAGE = {
    "missing attention shard": ("attn/c/0/1/0", "delete"),
    "empty attention shard": ("attn/c/0/2/0", "empty"),
    "truncated attention shard": ("attn/c/0/0/0", "truncate"),
    "garbled attn/zarr.json": ("attn/zarr.json", "garble"),
    "missing attention scale shard": ("attn_scale/c/0/1", "delete"),
    "truncated attention shard, no SHA256SUMS": ("attn/c/0/0/0", "truncate"),
    "garbled attention shard, no SHA256SUMS": ("attn/c/0/3/0", "garble"),
    "garbled attention scale shard, no SHA256SUMS": ("attn_scale/c/0/3", "garble"),
}
#: The stores damaged: bfloat16 (the default) and the 8-bit dtypes, which have row scales,
#: and an fp8 store with the attention position (``-attention``: its own states and scales).
DTYPES = ["bfloat16", "fp8", "int8", "fp8-attention"]
SCALED = ["fp8", "int8", "fp8-attention"]
INSIDE = ["fp8-attention"]
#: Targeted flips, always damage: a byte of a chunk's data, and of a name in the zip's
#: directory; for an 8-bit store also a byte of a row scales' chunk.
N_TARGETED_FLIPS = {"zip": 2, "h5": 1}
N_SCALE_FLIPS = {"zip": 1, "h5": 1}
#: ... and of the attention states' chunks and their scales'.
N_ATTENTION_FLIPS = {"zip": 2, "h5": 2}
#: What every damage message says, in one of these words.
DAMAGE = re.compile(r"damaged|corrupt|does not match|missing|checksum mismatch|cannot be decoded|garbled")
_PER_STORE = 2 * N_TRUNCATIONS + 2 * N_RANDOM_FLIPS + sum(N_TARGETED_FLIPS.values()) + len(ZARR_DAMAGE)
N_FUZZ_CASES = (
    len(DTYPES) * _PER_STORE
    + len(SCALED) * (sum(N_SCALE_FLIPS.values()) + len(SCALE_DAMAGE))
    + len(INSIDE) * (sum(N_ATTENTION_FLIPS.values()) + len(ATTENTION_DAMAGE))
)
ZARR_CASES = [
    (d, case)
    for d in DTYPES
    for case in [*ZARR_DAMAGE, *(SCALE_DAMAGE if d in SCALED else ()), *(ATTENTION_DAMAGE if d in INSIDE else ())]
]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """dtype -> a finished store of it and its zip and HDF5 exports (a few KB each), made once."""
    made = {}

    def make(dtype: str) -> Path:
        if dtype not in made:
            root = made[dtype] = tmp_path_factory.mktemp(f"damage-{dtype}")
            resid, toks = make_data(N)
            inside = dtype in INSIDE
            positions = ["block", "attention"] if inside else ["block"]
            with StoreWriter.open(root / "s.zarr", **params(N, dtype=dtype.split("-")[0], positions=positions)) as w:
                w.write(
                    torch.from_numpy(resid), toks, torch.from_numpy(make_data(N, seed=1)[0][1:]) if inside else None
                )
            export_store(root / "s.zarr", root / "s.zip", "zip")
            export_store(root / "s.zarr", root / "s.h5", "hdf5")
        return made[dtype]

    return make


@pytest.fixture
def shared(stores):
    return stores("bfloat16")


# ------------------------------------------------------------------------ where to damage


def _zip_regions(path: Path, member: str = "resid/c/0/1/0") -> tuple[int, int]:
    """(offset of a byte inside ``member``'s data, offset of the central directory)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
        start_dir = z.start_dir
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    data = info.header_offset + 30 + name_len + extra_len
    return data + info.file_size // 2, start_dir


def _h5_chunk_byte(path: Path, dataset: str = "resid") -> int:
    with h5py.File(path) as f:
        chunk = f[dataset].id.get_chunk_info(1)
    return chunk.byte_offset + chunk.size // 2


def truncation_offsets(path: Path, fmt: str) -> list[int]:
    size = path.stat().st_size
    rng = random.Random(SEED)
    offsets = rng.sample(range(1, size), N_TRUNCATIONS - 2)
    if fmt == "zip":
        chunk, start_dir = _zip_regions(path)
        offsets += [chunk, start_dir + rng.randrange(1, size - start_dir)]  # cut inside the directory
    else:
        offsets += [_h5_chunk_byte(path), size - 1]
    return offsets


def flip_offsets(path: Path, fmt: str, scaled: bool, inside: bool = False) -> tuple[list[int], list[int]]:
    """(random offsets, targeted offsets that always matter)."""
    rng = random.Random(SEED + 1)
    randoms = rng.sample(range(path.stat().st_size), N_RANDOM_FLIPS)
    if fmt == "zip":
        chunk, start_dir = _zip_regions(path)
        targeted = [chunk, start_dir + 46]  # 46: the first entry's file name in the directory
        scales = [_zip_regions(path, "scale/c/0/1")[0]] if scaled else []
        mids = [_zip_regions(path, name)[0] for name in ("attn/c/0/1/0", "attn_scale/c/0/2")] if inside else []
    else:
        targeted = [_h5_chunk_byte(path)]
        scales = [_h5_chunk_byte(path, "scale")] if scaled else []
        mids = [_h5_chunk_byte(path, name) for name in ("attn", "attn_scale")] if inside else []
    assert len(targeted) == N_TARGETED_FLIPS[fmt] and len(scales) == N_SCALE_FLIPS[fmt] * scaled
    assert len(mids) == N_ATTENTION_FLIPS[fmt] * inside
    return randoms, targeted + scales + mids


def _content(path: Path, fmt: str):
    """Everything a reader uses from an export: member bytes, or HDF5 attributes and arrays."""
    if fmt == "zip":
        with zipfile.ZipFile(path) as z:
            return {i.filename: z.read(i) for i in z.infolist()}
    with h5py.File(path) as f:
        return ({k: f.attrs[k] for k in f.attrs}, {k: f[k][...].tobytes() for k in f}, dict(f["resid"].attrs))


# ------------------------------------------------------------------------ one damaged file


def _outcome(fn, *args) -> str | None:
    """The LenspipeError message, or None on success; any other exception fails the test."""
    try:
        fn(*args)
    except LenspipeError as e:
        return str(e)
    return None


def _read_everything(path: Path) -> None:
    store = open_store(path)
    store.layers(range(store.n_layers + 1))
    if "attention" in store.positions:
        store.attention(range(store.n_layers))
    store.tokens()


def check_damaged_file(path: Path, fmt: str, must_detect: bool, original) -> str:
    """Run every reader on ``path``; returns verify's message ("" when it passed)."""
    message = _outcome(verify, path)
    if message is None:
        # A flip zip or HDF5 ignores (a timestamp, unused space) leaves every byte a reader
        # uses unchanged: verify passing is then the honest answer, and we check exactly that.
        assert not must_detect, f"{path.name}: damage not detected"
        assert _content(path, fmt) == original, f"{path.name}: verify passed but the content differs"
    else:
        assert str(path) in message and DAMAGE.search(message), message  # names the file and the damage
    if fmt == "zip":
        _outcome(store_info, path)
        _outcome(_read_everything, path)
    dest = path.with_name(path.stem + "-imported.zarr")
    imported = _outcome(import_store, path, dest)
    assert (imported is None) == (message is None), (path.name, message, imported)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{dest.name}")]
    assert dest.exists() == (imported is None)
    shutil.rmtree(dest, ignore_errors=True)
    return message or ""


def _damaged_copy(src: Path, out: Path, offset: int, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "truncate":
        data = data[:offset]
    else:
        data[offset] ^= 1 << random.Random(offset).randrange(8)
    out.write_bytes(bytes(data))
    return out


# ------------------------------------------------------------------------ the fuzz tests


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["zip", "h5"])
def test_truncated_exports_are_reported_as_damage(stores, tmp_path, fmt, dtype):
    src = stores(dtype) / f"s.{fmt}"
    original = _content(src, fmt)
    offsets = truncation_offsets(src, fmt)
    assert len(offsets) == N_TRUNCATIONS
    for i, offset in enumerate(offsets):
        path = _damaged_copy(src, tmp_path / f"cut{i}-at-{offset}.{fmt}", offset, "truncate")
        assert check_damaged_file(path, fmt, must_detect=True, original=original)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["zip", "h5"])
def test_flipped_bytes_in_exports_are_reported_as_damage(stores, tmp_path, fmt, dtype):
    src = stores(dtype) / f"s.{fmt}"
    original = _content(src, fmt)
    randoms, targeted = flip_offsets(src, fmt, dtype in SCALED, dtype in INSIDE)
    detected = 0
    for i, offset in enumerate(randoms + targeted):
        path = _damaged_copy(src, tmp_path / f"flip{i}-at-{offset}.{fmt}", offset, "flip")
        detected += bool(check_damaged_file(path, fmt, must_detect=offset in targeted, original=original))
    # About 1 flip in 10 (HDF5) or 25 (zip) lands in bytes no reader uses (timestamps,
    # free space): those pass, with identical content (checked above). Most must not.
    assert detected >= len(targeted) + len(randoms) // 2, detected


def _damage_zarr(src: Path, out: Path, name: str, how: str, keep_manifest: bool) -> Path:
    shutil.copytree(src, out)
    target = out / name
    if how == "delete":
        target.unlink()
    elif how == "empty":
        target.write_bytes(b"")
    elif how == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:  # garble: overwrite bytes in the middle, as a bad sector or a broken copy would
        data = bytearray(target.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 8] = b"\x00\xff#%garb"
        target.write_bytes(bytes(data))
    if not keep_manifest:
        (out / "SHA256SUMS").unlink()
    return out


@pytest.mark.parametrize("dtype,case", ZARR_CASES)
def test_damaged_zarr_store_is_reported_as_damage(stores, tmp_path, dtype, case):
    name, how = {**ZARR_DAMAGE, **SCALE_DAMAGE, **ATTENTION_DAMAGE}[case]
    store = _damage_zarr(stores(dtype) / "s.zarr", tmp_path / "s.zarr", name, how, "no SHA256SUMS" not in case)
    message = _outcome(verify, store)
    assert message and str(store) in message and DAMAGE.search(message), message
    _outcome(store_info, store)  # info reads metadata only: a message or a summary, no traceback
    read = _outcome(_read_everything, store)
    if name.startswith(("resid/c/", "tokens/c/", "scale/c/", "attn/c/", "attn_scale/c/")):  # never zeros
        assert read and "the store may be corrupt" in read, read


def test_a_damaged_store_read_for_training_is_one_message(shared, tmp_path):
    """train/evaluate read through open_store + layers(): the damage is named, no zeros."""
    store = _damage_zarr(shared / "s.zarr", tmp_path / "s.zarr", "resid/c/0/1/0", "delete", True)
    s = open_store(store)
    s.layers(0, 0, 64)  # shard 0 is intact
    with pytest.raises(StoreError, match=r"shard file resid/c/0/1/0 is missing or empty; the store may be corrupt"):
        s.layers(range(3), 0, 128)  # zarr alone would return zeros for shard 1
    chunk, _ = _zip_regions(shared / "s.zip")
    bad = _damaged_copy(shared / "s.zip", tmp_path / "bad.zip", chunk, "flip")
    s = open_store(bad)  # the metadata is intact
    with pytest.raises(StoreError, match=r"cannot read .*bad\.zip.*Bad CRC-32.*\(lenspipe verify checks it\)"):
        s.layers(1)
    with pytest.raises(StoreError, match=r"is an HDF5 export; .*lenspipe import"):
        open_store(shared / "s.h5")


@pytest.mark.parametrize("command", ["verify", "info", "import"])
def test_cli_on_random_bytes_is_one_message(tmp_path, capsys, command):
    from pipeline.cli import main

    junk = tmp_path / "junk.zip"
    junk.write_bytes(random.Random(SEED).randbytes(5000))
    argv = [command, str(junk)] + ([str(tmp_path / "j.zarr")] if command == "import" else [])
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert f"lenspipe: error: {junk} is not a readable zip archive (File is not a zip file)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.zip"]  # nothing half-written


def test_hdf5_export_verifies_in_place_and_its_metadata_is_covered(shared, tmp_path):
    assert verify(shared / "s.h5")["n_shards"] == 4
    copy = tmp_path / "s.h5"
    shutil.copy(shared / "s.h5", copy)
    with h5py.File(copy, "r+") as f:  # a changed attribute the shard checksums do not cover
        f.attrs["lenspipe_attrs"] = f.attrs["lenspipe_attrs"].replace("tiny-test", "tiny-tesT")
    with pytest.raises(StoreError, match="metadata that does not match its sha256"):
        verify(copy)


def test_store_metadata_missing_its_parameters_is_damage(shared, tmp_path):
    import json

    store = tmp_path / "s.zarr"
    shutil.copytree(shared / "s.zarr", store)
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["params"]  # valid JSON, valid zarr, but not what lenspipe wrote
    meta.get("consolidated_metadata", {}).pop("params", None)
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"the metadata of the store at .* is damaged \(KeyError\('params'\)\)"):
        verify(store)
