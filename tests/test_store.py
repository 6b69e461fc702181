"""The activation store: round trips, resume after a crash or SIGKILL, locking, verify."""

from __future__ import annotations

import functools
import gc
import http.server
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.errors import StoreError
from pipeline.store.info import measure_compression
from pipeline.store.layout import record_name
from pipeline.store.reader import open_store
from pipeline.store.verify import verify
from pipeline.store.writer import StoreWriter

# 2 layers (+ embeddings) x 8 features; 4 shards of 64 tokens, inner chunks of 32.
N_LAYERS, D, SEQ, SHARD, CHUNK = 2, 8, 16, 64, 32
PROV = {
    "model": "tiny-test",
    "model_sha256": "0" * 64,
    "corpus": "abc",
    "split": "train",
    "layer_convention": "hidden_states",
}
#: Every storage dtype, and those with a per-row scale array.
ALL_DTYPES = ["bfloat16", "float16", "float32", "fp8", "int8"]
SCALED = ["fp8", "int8"]
QMAX = {"fp8": 448.0, "int8": 127.0}


def make_data(n_tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(L+1, n, d) float32 activations with values that need rounding, and (n,) token ids."""
    rng = np.random.default_rng(seed)
    resid = (rng.standard_normal((N_LAYERS + 1, n_tokens, D)) * 10).astype(np.float32)
    return resid, rng.integers(0, 50_000, n_tokens)


def stored_reference(resid: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """What a ``dtype`` store holds for ``resid`` (L+1, n, d), computed here without
    lenspipe's writer: the stored numbers (bf16 and fp8 as their bits) and the row scales
    (scale = absmax / qmax, 1 for a zero row; q = round-to-nearest(clip(x / scale, +-qmax)),
    fp8 through ml_dtypes' own e4m3fn)."""
    import ml_dtypes

    if dtype not in SCALED:
        cast = torch.from_numpy(resid).to(getattr(torch, dtype))
        return (cast.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else cast.numpy()), None
    qmax = np.float32(QMAX[dtype])
    scale = (np.abs(resid).max(axis=-1) / qmax).astype(np.float32)
    scale[scale == 0] = 1
    y = np.clip(resid / scale[..., None], -qmax, qmax)
    q = y.astype(ml_dtypes.float8_e4m3fn).view(np.uint8) if dtype == "fp8" else np.round(y).astype(np.int8)
    return q, scale


def decoded_reference(resid: np.ndarray, dtype: str) -> torch.Tensor:
    """float32 values a reader of a ``dtype`` store returns for ``resid``: the dtype's own
    rounding (torch's cast; for 8-bit dtypes float32(q) * scale of stored_reference)."""
    import ml_dtypes

    if dtype not in SCALED:
        return torch.from_numpy(resid).to(getattr(torch, dtype)).float()
    q, scale = stored_reference(resid, dtype)
    values = q.view(ml_dtypes.float8_e4m3fn) if dtype == "fp8" else q
    return torch.from_numpy(values.astype(np.float32) * scale[..., None])


def params(n_tokens: int = 4 * SHARD, **over) -> dict:
    return {
        "n_layers": N_LAYERS,
        "d_model": D,
        "n_tokens": n_tokens,
        "seq_len": SEQ,
        "shard_tokens": SHARD,
        "chunk_tokens": CHUNK,
        "provenance": PROV,
        **over,
    }


def write_store(path: Path, resid: np.ndarray, toks: np.ndarray, batch: int = 48, start: int = 0, **over) -> None:
    """Write [start, n) in batches that straddle shard boundaries, then finalize."""
    with StoreWriter.open(path, **params(resid.shape[1], **over)) as w:
        assert w.resume_token == start
        for s in range(start, resid.shape[1], batch):
            w.write(torch.from_numpy(resid[:, s : s + batch]), toks[s : s + batch])


def resume_token(path: Path, kw: dict) -> int:
    w = StoreWriter.open(path, **kw)
    w.abort()
    return w.resume_token


def all_values(path) -> tuple[torch.Tensor, torch.Tensor]:
    store = open_store(path)
    return store.layers(range(N_LAYERS + 1)), store.tokens()


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_round_trip_each_dtype(tmp_path, dtype):
    """Every dtype returns its own rounding of the source, bit for bit; only the 8-bit
    dtypes have a scale array, and only their stores have schema version 2 (a bfloat16 store
    stays version 1, readable by a lenspipe from before the scales)."""
    resid, toks = make_data(4 * SHARD)
    write_store(tmp_path / "s", resid, toks, dtype=dtype)
    store = open_store(tmp_path / "s")
    assert store.is_complete and store.dtype == dtype and store.provenance == PROV
    assert store.attrs["schema_version"] == (2 if dtype in SCALED else 1)
    assert store.attrs["complete"] is True
    assert ((tmp_path / "s" / "scale").is_dir(), (tmp_path / "s" / "scale" / "c" / "0" / "3").is_file()) == (
        dtype in SCALED,
    ) * 2
    got = store.layers([0, 1, 2])
    assert got.dtype == torch.float32 and torch.equal(got, decoded_reference(resid, dtype))
    assert torch.equal(store.tokens(), torch.from_numpy(toks))
    assert store.tokens().dtype == torch.int64


@pytest.mark.parametrize(
    "dtype,compression",
    [
        ("float32", "blosc-zstd"),
        ("float32", "blosc-lz4-bitshuffle"),
        ("float32", "none"),
        ("fp8", "blosc-lz4-bitshuffle"),
        ("int8", "blosc-zstd"),
        ("fp8", "none"),
    ],
)
def test_other_compressions_round_trip(tmp_path, dtype, compression):
    resid, toks = make_data(2 * SHARD)
    write_store(tmp_path / "s", resid, toks, compression=compression, level=5, dtype=dtype)
    assert torch.equal(all_values(tmp_path / "s")[0], decoded_reference(resid, dtype))
    m = measure_compression(tmp_path / "s")
    raw = resid.nbytes if dtype == "float32" else resid.size + resid[..., 0].nbytes  # 8-bit values + float32 scales
    assert m["raw_bytes"] == raw and m["stored_bytes"] > 0 and m["compression"] == compression
    if compression == "none":
        assert m["stored_bytes"] > raw  # + each shard's index


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8", "int8"])
def test_short_last_shard_and_partial_reads(tmp_path, dtype):
    n = 3 * SHARD + 2 * SEQ  # last shard holds 32 of 64 tokens
    resid, toks = make_data(n)
    write_store(tmp_path / "s", resid, toks, batch=80, dtype=dtype)
    store = open_store(tmp_path / "s")
    full = store.layers([0, 1, 2])
    assert full.shape == (N_LAYERS + 1, n, D)
    assert torch.equal(full, decoded_reference(resid, dtype))
    assert torch.equal(store.layers(1, 50, 210), full[1, 50:210])  # one layer = slice
    assert torch.equal(store.layers([2, 0], 10, 20), full[[2, 0], 10:20])
    assert torch.equal(store.layers(-1), full[2])
    assert torch.equal(store.tokens(190, n), torch.from_numpy(toks[190:]))
    view = store.dask()
    assert view.shape == full.shape and view.chunks[1][0] == CHUNK and view.dtype == np.float32
    assert np.array_equal(view[:, 40:200].compute(), full[:, 40:200].numpy())
    assert np.array_equal(view[1, 50:210].compute(), full[1, 50:210].numpy())
    assert verify(tmp_path / "s")["n_shards"] == 4


@pytest.mark.parametrize(
    "dtype,compression",
    [("bfloat16", "zstd"), ("float16", "none"), ("float32", "blosc-zstd"), ("fp8", "zstd"), ("int8", "none")],
)
def test_reads_through_tensorstore_equal_zarr(tmp_path, dtype, compression, monkeypatch):
    """A complete local store is read with TensorStore (engine.read_array): single layers,
    lists of layers and contiguous ranges; the values must be zarr's, bit for bit, for every
    dtype, codec and partial range."""
    from pipeline.store import engine

    resid, toks = make_data(3 * SHARD + 2 * SEQ)  # a short last shard
    write_store(tmp_path / "s", resid, toks, dtype=dtype, compression=compression)
    reads = (
        lambda s: s.layers(1, 50, 210),
        lambda s: s.layers([2, 0], 10, 200),
        lambda s: s.layers(-1),
        lambda s: s.layers(range(N_LAYERS + 1), 30, 3 * SHARD + 2 * SEQ),
        lambda s: s.layers([1, 2], 0, 190),
    )
    fast = open_store(tmp_path / "s")
    got = [read(fast) for read in reads]
    assert fast._ts_handles is not False  # TensorStore read them
    assert len(fast._ts_handles) == (2 if dtype in SCALED else 1)  # values (and scales)
    monkeypatch.setattr(engine, "_tensorstore_reads", False)
    slow = open_store(tmp_path / "s")
    want = [read(slow) for read in reads]
    assert slow._ts_handles is False
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(got[0], decoded_reference(resid, dtype)[1, 50:210])


@pytest.mark.parametrize(
    "dtype,engine_name",
    [
        ("bfloat16", "tensorstore"),
        ("float16", "tensorstore"),
        ("bfloat16", "zarr"),
        ("fp8", "tensorstore"),
        ("int8", "zarr"),
    ],
)
def test_reads_in_token_pieces_equal_one_read(tmp_path, monkeypatch, dtype, engine_name):
    """Reads go in pieces of READ_TOKENS tokens (at multiples of it, straddling inner
    chunks and shards here), each decoded into the output while the next ones are read,
    through TensorStore or zarr; the values must be one read's, and the source's cast to
    the dtype."""
    from pipeline.store import engine, reader

    monkeypatch.setattr(engine, "_tensorstore_reads", engine_name == "tensorstore")
    resid, toks = make_data(3 * SHARD + 2 * SEQ)
    write_store(tmp_path / "s", resid, toks, compression="zstd", dtype=dtype)
    store = open_store(tmp_path / "s")
    want = [store.layers([0, 1, 2]), store.layers([1, 2], 7, 150)]
    monkeypatch.setattr(reader, "READ_TOKENS", 48)  # not a multiple of the 32-token chunks
    got = [
        store.layers([0, 1, 2]),
        store.layers([1, 2], 7, 150),
        store.layers([2, 0], 7, 150),
        store.layers(1, 7, 150),
        store.layers([1], 0, 0),
    ]
    assert (store._ts_handles is not False) == (engine_name == "tensorstore")
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    source = decoded_reference(resid, dtype)
    assert torch.equal(got[0], source)
    assert torch.equal(got[1], source[1:, 7:150])
    assert torch.equal(got[2], source[[2, 0], 7:150])
    assert torch.equal(got[3], source[1, 7:150])
    assert got[4].shape == (1, 0, D)


@pytest.mark.parametrize(
    "compression,dtype,array",
    [
        ("zstd", "bfloat16", "resid"),
        ("blosc-lz4-bitshuffle", "bfloat16", "resid"),
        ("blosc-zstd", "bfloat16", "resid"),
        ("zstd", "fp8", "resid"),
        ("zstd", "int8", "scale"),
        ("blosc-zstd", "fp8", "scale"),
    ],
)
def test_a_flipped_byte_in_a_compressed_chunk_fails_every_read(tmp_path, compression, dtype, array):
    """Every compressed store checks each chunk as it is read (zstd's own checksum, crc32c
    after blosc, which has none): one flipped byte fails one-layer reads (TensorStore) and
    layer ranges (zarr) with the store's message, not with silently wrong values; in the
    values' chunks or in the row scales'."""
    resid, toks = make_data(SHARD)
    write_store(tmp_path / "s", resid, toks, compression=compression, level=5, dtype=dtype)
    shard = tmp_path / "s" / ("resid/c/0/0/0" if array == "resid" else "scale/c/0/0")
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10  # inside a chunk of layer 0 or 1, not the index at the end
    shard.write_bytes(bytes(data))
    store = open_store(tmp_path / "s")
    for read in (lambda: store.layers(range(N_LAYERS + 1)), lambda: [store.layers(i) for i in range(N_LAYERS + 1)]):
        with pytest.raises(StoreError, match="may be corrupt"):
            read()


PLAIN_READ = """
import sys, numpy as np, zarr
group = zarr.open_group(sys.argv[1], mode="r")
np.save(sys.argv[2], group["resid"][...])
np.save(sys.argv[3], group["tokens"][...])
np.save(sys.argv[4], group["scale"][...] if "scale" in group else np.zeros(0))
"""


@pytest.mark.parametrize(
    "compression,dtype",
    [
        ("zstd", "bfloat16"),
        ("blosc-lz4-bitshuffle", "bfloat16"),
        ("none", "bfloat16"),
        ("zstd", "fp8"),
        ("blosc-lz4-bitshuffle", "int8"),
    ],
)
def test_store_is_plain_zarr_that_zarr_python_alone_reads(tmp_path, compression, dtype):
    """Shards written through TensorStore, read by zarr-python with its own codec pipeline
    in a process that never imports lenspipe: the stored bits of the source (bf16, fp8)
    or its int8 values, and the row scales."""
    resid, toks = make_data(2 * SHARD + SEQ)  # a short last shard
    write_store(tmp_path / "s", resid, toks, compression=compression, dtype=dtype)
    out = [tmp_path / "resid.npy", tmp_path / "tokens.npy", tmp_path / "scale.npy"]
    subprocess.run(
        [sys.executable, "-c", PLAIN_READ, str(tmp_path / "s"), *map(str, out)], check=True, cwd=tmp_path, timeout=120
    )
    want, scale = stored_reference(resid, dtype)
    assert np.array_equal(np.load(out[0]), want) and np.load(out[0]).dtype == want.dtype
    assert np.array_equal(np.load(out[1]), toks)
    assert np.array_equal(np.load(out[2]), np.zeros(0) if scale is None else scale)


def test_manifest_takes_a_digest_from_the_write_only_while_the_file_is_unchanged(tmp_path):
    """Shard files are hashed as they are written; finalize's SHA256SUMS reuses a digest
    only while the file keeps its size and mtime, and hashes it again otherwise."""
    from pipeline.provenance import sha256_file
    from pipeline.store.manifest import file_digest, write_manifest

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    known = {a: file_digest(a), b: file_digest(b)}
    assert known[a][2] == sha256_file(a)
    known[a] = (*known[a][:2], "0" * 64)  # what a reused digest would show
    st = os.stat(b)
    b.write_bytes(b"SECOND")  # same size, new content
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    write_manifest(tmp_path, known)
    lines = dict(line.split("  ")[::-1] for line in (tmp_path / "SHA256SUMS").read_text().splitlines())
    assert lines == {"a": "0" * 64, "b": sha256_file(b)}


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8"])
def test_file_url(tmp_path, dtype):
    resid, toks = make_data(SHARD)
    write_store(tmp_path / "s", resid, toks, dtype=dtype)
    store = open_store((tmp_path / "s").as_uri())
    assert torch.equal(store.layers(0), decoded_reference(resid, dtype)[0])
    assert verify((tmp_path / "s").as_uri())["complete"]


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (the stdlib handler ignores Range, which zarr's
    sharded reads need), logging each request."""

    requests: list[str] = []

    def log_message(self, fmt, *args):
        RangeHandler.requests.append(str(args[0]))

    def send_head(self):
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if match is None or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        first, last = match.groups()
        start = len(data) - int(last) if not first else int(first)
        stop = int(last) + 1 if first and last else len(data)
        body = data[max(start, 0) : stop]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {max(start, 0)}-{max(start, 0) + len(body) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_http_url_few_requests(tmp_path, dtype):
    resid, toks = make_data(4 * SHARD)
    write_store(tmp_path / "s", resid, toks, dtype=dtype)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/s"
        RangeHandler.requests.clear()
        store = open_store(url)
        assert len(RangeHandler.requests) <= 3  # zarr.json (consolidated) + COMPLETE
        RangeHandler.requests.clear()
        got = store.layers(1, 0, 2 * SHARD)
        # One layer over 2 shards: each shard's index + that layer's 2 inner chunks, as
        # ranges; of the values, and of the row scales where there are some.
        assert len(RangeHandler.requests) <= 6 * (2 if dtype in SCALED else 1)
        assert torch.equal(got, decoded_reference(resid, dtype)[1, : 2 * SHARD])
        assert verify(url)["n_shards"] == 4
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8", "int8"])
@pytest.mark.parametrize("shard_writes", [True, False], ids=["tensorstore", "zarr"])
def test_resume_after_dropped_writer_matches_uninterrupted(tmp_path, monkeypatch, shard_writes, dtype):
    """Also: a killed TensorStore write's temp file goes, whichever engine resumes (of the
    values, and of the row scales)."""
    from pipeline.store import engine

    monkeypatch.setattr(engine, "_shard_writes", shard_writes)
    resid, toks = make_data(4 * SHARD)
    write_store(tmp_path / "ref", resid, toks, dtype=dtype)
    w = StoreWriter.open(tmp_path / "s", **params(dtype=dtype), background=False)
    for s in range(0, 2 * SHARD + 20, 20):  # 2 whole shards + part of a third
        w.write(resid[:, s : s + 20], toks[s : s + 20])
    del w  # a crash: no finalize, no abort
    gc.collect()  # (reference cycles in zarr/fsspec tracebacks can keep it alive)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "s")
    partial = open_store(tmp_path / "s", allow_incomplete=True)
    assert not partial.is_complete and partial.written_tokens == 2 * SHARD
    torns = [tmp_path / "s" / "resid" / "c" / "0" / "2" / "0.__lock"]  # a killed TensorStore write's temp
    torns += [tmp_path / "s" / "resid" / "c" / "0" / "2" / "0"]  # a torn shard file of a zarr write
    if dtype in SCALED:
        torns += [tmp_path / "s" / "scale" / "c" / "0" / "2.__lock", tmp_path / "s" / "scale" / "c" / "0" / "2"]
    for torn in torns:
        torn.parent.mkdir(parents=True, exist_ok=True)
        torn.write_bytes(b"torn")
    write_store(tmp_path / "s", resid, toks, start=2 * SHARD, dtype=dtype)
    for a, b in zip(all_values(tmp_path / "s"), all_values(tmp_path / "ref")):
        assert torch.equal(a, b)
    verify(tmp_path / "s")
    assert not list((tmp_path / "s").rglob("*.__lock"))
    assert "__lock" not in (tmp_path / "s" / "SHA256SUMS").read_text()


def test_exception_in_context_keeps_written_shards(tmp_path):
    resid, toks = make_data(4 * SHARD)
    with pytest.raises(RuntimeError), StoreWriter.open(tmp_path / "s", **params()) as w:  # background writer
        w.write(resid[:, : 3 * SHARD], toks[: 3 * SHARD])
        raise RuntimeError("model crashed")
    assert not (tmp_path / "s" / "COMPLETE").exists()
    write_store(tmp_path / "s", resid, toks, start=3 * SHARD)
    assert torch.equal(all_values(tmp_path / "s")[0], torch.from_numpy(resid).bfloat16().float())


CHILD = """
import sys, time, numpy as np
from pipeline.store.writer import StoreWriter
rng = np.random.default_rng(0)
resid = (rng.standard_normal((3, 256, 8)) * 10).astype(np.float32)
toks = rng.integers(0, 50_000, 256)
w = StoreWriter.open(sys.argv[1], n_layers=2, d_model=8, n_tokens=256, seq_len=16,
                     shard_tokens=64, chunk_tokens=32, dtype=sys.argv[2], provenance={provenance!r})
for s in range(0, 256, 32):
    w.write(resid[:, s:s + 32], toks[s:s + 32])
    time.sleep(0.4)
w.finalize()
"""


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8", "int8"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, dtype):
    resid, toks = make_data(4 * SHARD)
    assert (N_LAYERS, D, SHARD, CHUNK, SEQ) == (2, 8, 64, 32, 16)  # as in CHILD
    write_store(tmp_path / "ref", resid, toks, dtype=dtype)
    path = tmp_path / "s"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(provenance=PROV), str(path), dtype], cwd=Path(__file__).parents[1]
    )
    try:
        deadline = time.monotonic() + 60
        while not (path / record_name(0)).exists():
            assert child.poll() is None, "writer subprocess exited early"
            assert time.monotonic() < deadline, "no shard record within 60 s"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with StoreWriter.open(path, **params(dtype=dtype)) as w:  # the kernel dropped the dead child's lock
        assert SHARD <= w.resume_token < 4 * SHARD and w.resume_token % SHARD == 0
        for s in range(w.resume_token, 4 * SHARD, 48):
            w.write(resid[:, s : s + 48], toks[s : s + 48])
    for a, b in zip(all_values(path), all_values(tmp_path / "ref")):
        assert torch.equal(a, b)
    verify(path)
    assert not list(path.rglob("*.partial"))


def test_background_failure_reraised_in_caller(tmp_path, monkeypatch):
    resid, toks = make_data(4 * SHARD)
    w = StoreWriter.open(tmp_path / "s", **params())
    real = w._shards._write_shard

    def failing(shard, bufs):
        if shard == 1:
            raise OSError(28, "No space left on device")
        return real(shard, bufs)

    monkeypatch.setattr(w._shards, "_write_shard", failing)
    with pytest.raises(OSError, match="No space left"):
        for s in range(0, 4 * SHARD, 32):
            w.write(resid[:, s : s + 32], toks[s : s + 32])
    with pytest.raises(StoreError, match="failed"):
        w.write(resid[:, :32], toks[:32])
    w.abort()
    assert resume_token(tmp_path / "s", params()) == SHARD


def test_failed_fsync_records_no_later_shard_and_resume_matches(tmp_path, monkeypatch):
    """Shards are made durable (fsync, then their record) on a thread of their own while
    the next shard is written: a failed fsync surfaces in the caller as the store's own
    disk-full message, and neither that shard nor any later one is recorded, even one
    whose write went through; a resume then gives the uninterrupted store."""
    from pipeline.store import shards as shards_module

    resid, toks = make_data(4 * SHARD)
    write_store(tmp_path / "ref", resid, toks)
    real, real_write = shards_module._fsync_file, shards_module.ShardPipeline._write_values
    shard_2_written = threading.Event()

    def write_values(self, start, stop, bufs):
        real_write(self, start, stop, bufs)
        if start == 2 * SHARD:
            shard_2_written.set()

    def failing(path):
        if path.parts[-2:] == ("1", "0"):  # resid/c/0/1/0: shard 1's activations
            assert shard_2_written.wait(30)  # fail only once the next shard is on disk
            raise OSError(28, "No space left on device", str(path))
        real(path)

    monkeypatch.setattr(shards_module.ShardPipeline, "_write_values", write_values)
    monkeypatch.setattr(shards_module, "_fsync_file", failing)
    w = StoreWriter.open(tmp_path / "s", **params())
    with pytest.raises(StoreError, match=r"no space left on the device while writing shard 1 "):
        for s in range(0, 4 * SHARD, 32):
            w.write(resid[:, s : s + 32], toks[s : s + 32])
        w.finalize()
    w.abort()
    assert (tmp_path / "s" / "resid" / "c" / "0" / "2" / "0").exists()  # written, never recorded
    assert [p.name for p in sorted((tmp_path / "s" / "progress").glob("shard-*.json"))] == ["shard-000000.json"]
    assert resume_token(tmp_path / "s", params()) == SHARD
    monkeypatch.setattr(shards_module, "_fsync_file", real)
    write_store(tmp_path / "s", resid, toks, start=SHARD)
    for a, b in zip(all_values(tmp_path / "s"), all_values(tmp_path / "ref")):
        assert torch.equal(a, b)
    verify(tmp_path / "s")


def test_reopening_a_complete_store_has_nothing_to_do(tmp_path):
    resid, toks = make_data(SHARD)
    write_store(tmp_path / "s", resid, toks)
    with StoreWriter.open(tmp_path / "s", **params(SHARD)) as w:
        assert w.already_complete and w.resume_token == SHARD
        with pytest.raises(StoreError, match="already complete"):
            w.write(resid, toks)
    verify(tmp_path / "s")


def test_parameter_mismatch_on_resume_refused(tmp_path):
    resid, toks = make_data(2 * SHARD)
    w = StoreWriter.open(tmp_path / "s", **params(2 * SHARD))
    w.write(resid[:, :SHARD], toks[:SHARD])
    w.abort()
    with pytest.raises(StoreError, match=r"dtype: 'bfloat16' -> 'float16'.*delete the store"):
        StoreWriter.open(tmp_path / "s", **params(2 * SHARD, dtype="float16"))
    with pytest.raises(StoreError, match="provenance.split"):
        StoreWriter.open(tmp_path / "s", **params(2 * SHARD, provenance={**PROV, "split": "val"}))


def test_finalize_before_all_tokens_refused(tmp_path):
    resid, toks = make_data(2 * SHARD)
    w = StoreWriter.open(tmp_path / "s", **params(2 * SHARD))
    w.write(resid[:, :SHARD], toks[:SHARD])
    with pytest.raises(StoreError, match=f"after {SHARD} of {2 * SHARD} tokens"):
        w.finalize()
    assert resume_token(tmp_path / "s", params(2 * SHARD)) == SHARD


# ---------------------------------------------------------------- refusals


def test_second_writer_refused_while_first_holds_lock(tmp_path):
    first = StoreWriter.open(tmp_path / "s", **params())
    with pytest.raises(StoreError, match=f"another process \\(pid {os.getpid()}\\) is writing the store"):
        StoreWriter.open(tmp_path / "s", **params())
    first.abort()
    StoreWriter.open(tmp_path / "s", **params()).abort()  # free again


def test_reader_refuses_incomplete_store(tmp_path):
    w = StoreWriter.open(tmp_path / "s", **params())
    with pytest.raises(StoreError, match="incomplete.*allow_incomplete=True"):
        open_store(tmp_path / "s")
    with pytest.raises(StoreError, match="incomplete"):
        verify(tmp_path / "s")
    partial = open_store(tmp_path / "s", allow_incomplete=True)
    partial.layers(0, 0, 0)
    assert partial._ts_handles is False  # a store being written is read through zarr only
    w.abort()


def test_unknown_schema_version_refused(tmp_path):
    resid, toks = make_data(SHARD)
    write_store(tmp_path / "s", resid, toks)
    zarr.open_group(tmp_path / "s", mode="r+").update_attributes({"schema_version": 4})
    with pytest.raises(StoreError, match="store schema version 4, this lenspipe reads 1, 2, 3; upgrade"):
        open_store(tmp_path / "s")


def test_not_a_store_refused(tmp_path):
    with pytest.raises(StoreError, match="no activation store"):
        open_store(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a lenspipe activation store"):
        open_store(tmp_path / "plain")
    zarr.create_group(str(tmp_path / "other"))
    with pytest.raises(StoreError, match="not a lenspipe activation store"):
        open_store(tmp_path / "other")
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="refusing to write"):
        StoreWriter.open(tmp_path / "plain", **params())


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"shard_tokens": 48}, "shard_tokens=48 must be a multiple of chunk_tokens=32"),
        ({"chunk_tokens": 24, "shard_tokens": 72}, "shard_tokens=72 must be a multiple of seq_len=16"),
        ({"n_tokens": 100}, "n_tokens=100 must be a multiple of seq_len=16"),
        ({"dtype": "int4"}, "dtype 'int4' is not one of .*'fp8', 'int8'"),
        ({"compression": "lz4"}, "compression 'lz4'"),
    ],
)
def test_invalid_parameters_refused(tmp_path, bad, match):
    with pytest.raises(StoreError, match=match):
        StoreWriter.open(tmp_path / "s", **{**params(), **bad})


def test_float16_overflow_names_layer_and_position(tmp_path):
    resid, toks = make_data(2 * SHARD)
    resid[1, SHARD + 2 * SEQ + 5, 3] = 1e5
    w = StoreWriter.open(tmp_path / "s", **params(2 * SHARD, dtype="float16"))
    w.write(resid[:, :SHARD], toks[:SHARD])
    with pytest.raises(
        StoreError,
        match=r"100000 at layer 1, token index 101 \(sequence 6, "
        r"position 5\).*'bfloat16' or 'float32'",
    ):
        w.write(resid[:, SHARD:], toks[SHARD:])
    w.abort()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_nan_input_refused(tmp_path, dtype):
    resid, toks = make_data(SHARD)
    resid[2, 17, 0] = np.nan
    with StoreWriter.open(tmp_path / "s", **params(SHARD, dtype=dtype)) as w:
        with pytest.raises(
            StoreError,
            match=r"non-finite activation nan at layer 2, token index 17 "
            r"\(sequence 1, position 1\)",
        ):
            w.write(resid, toks)
        w.abort()


def test_inf_input_refused_in_every_dtype_and_an_empty_batch_is_nothing(tmp_path):
    """inf is refused whatever the storage dtype (float32 took it once: its largest value
    was taken as inf; an 8-bit dtype, which scales any finite row, must still refuse it),
    and an empty batch writes nothing."""
    resid, toks = make_data(SHARD)
    resid[1, 40, 2] = -np.inf
    for dtype in ALL_DTYPES:
        with StoreWriter.open(tmp_path / dtype, **params(SHARD, dtype=dtype)) as w:
            w.write(resid[:, :0], toks[:0])
            assert w.resume_token == 0
            with pytest.raises(StoreError, match=r"non-finite activation -inf at layer 1, token index 40"):
                w.write(resid, toks)
            w.abort()


@pytest.mark.parametrize("background", [True, False])
def test_an_io_error_in_a_shard_write_is_raised_as_it_is_and_stops_the_writer(tmp_path, monkeypatch, background):
    """An I/O error other than a full disk reaches the caller unchanged (not as its own
    cause: a loop there once hung the error reporting), and no later shard is written,
    with background threads or without."""
    from pipeline.errors import _causes
    from pipeline.store import shards as shards_module

    real = shards_module._fsync_file

    def failing(path):
        if path.parts[-2:] == ("1", "0"):
            raise OSError(5, "Input/output error", str(path))
        real(path)

    monkeypatch.setattr(shards_module, "_fsync_file", failing)
    resid, toks = make_data(4 * SHARD)
    w = StoreWriter.open(tmp_path / "s", **params(), background=background)
    with pytest.raises(OSError, match="Input/output error") as raised:
        for s in range(0, 4 * SHARD, 32):
            w.write(resid[:, s : s + 32], toks[s : s + 32])
        w.finalize()
    assert raised.value.__cause__ is not raised.value and len(list(_causes(raised.value))) < 5
    with pytest.raises(StoreError, match="failed"):
        w.write(resid[:, :32], toks[:32])
    w.abort()
    assert resume_token(tmp_path / "s", params()) == SHARD


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_shard_record_follows_the_fsync_of_its_files_and_of_their_directories(tmp_path, monkeypatch, dtype):
    """A shard's directory is new: its entry must be durable too, before the record that
    says the shard is done (TensorStore writes without fsync; the writer syncs); the row
    scales' shard file too."""
    from pipeline.store import shards as shards_module

    real, synced = shards_module._fsync_file, []

    def recording(path):  # (what is synced, how many shards are recorded at that moment)
        synced.append(
            (path.relative_to(tmp_path / "s").as_posix(), len(list((tmp_path / "s" / "progress").glob("shard-*.json"))))
        )
        real(path)

    monkeypatch.setattr(shards_module, "_fsync_file", recording)
    resid, toks = make_data(2 * SHARD)
    write_store(tmp_path / "s", resid, toks, dtype=dtype)
    for shard in (0, 1):
        paths = [f"resid/c/0/{shard}/0", f"resid/c/0/{shard}", "resid/c/0", f"tokens/c/{shard}", "tokens/c"]
        if dtype in SCALED:
            paths += [f"scale/c/0/{shard}", "scale/c/0"]
        for path in paths:
            assert (path, shard) in synced, (path, synced)


def test_a_cause_chain_that_loops_ends():
    from pipeline.errors import _causes

    e = OSError(5, "Input/output error")
    e.__cause__ = e
    assert list(itertools.islice(_causes(e), 3)) == [e]  # islice: without the fix, no hang


# ---------------------------------------------------------------- verify


@pytest.mark.parametrize(
    "compression,dtype,shard_file",
    [
        ("zstd", "bfloat16", "resid/c/0/2/0"),
        ("none", "bfloat16", "resid/c/0/2/0"),
        ("none", "fp8", "resid/c/0/2/0"),
        ("zstd", "fp8", "scale/c/0/2"),
        ("none", "int8", "scale/c/0/2"),
    ],
)
def test_verify_detects_one_flipped_byte(tmp_path, compression, dtype, shard_file):
    resid, toks = make_data(4 * SHARD)
    write_store(tmp_path / "s", resid, toks, compression=compression, dtype=dtype)
    summary = verify(tmp_path / "s")
    assert summary["n_shards"] == 4 and summary["n_tokens"] == 4 * SHARD
    path = tmp_path / "s" / shard_file
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"{shard_file} \(shard 2\) does not match its sha256"):
        verify(tmp_path / "s")
    (tmp_path / "s" / "SHA256SUMS").unlink()  # without the file manifest, the shard checks name the layer
    what = "layer" if shard_file.startswith("resid") else "scales of layer"
    with pytest.raises(StoreError, match=rf"shard 2 \(tokens 128..192\)(, {what} \d| .*shard index)"):
        verify(tmp_path / "s")


def test_verify_detects_missing_marker_and_altered_records(tmp_path):
    resid, toks = make_data(2 * SHARD)
    write_store(tmp_path / "s", resid, toks)
    rec_path = tmp_path / "s" / record_name(1)
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(json.dumps({**rec, "written": "yesterday"}))
    with pytest.raises(StoreError, match="shard-000001.json does not match its sha256"):
        verify(tmp_path / "s")
    (tmp_path / "s" / "SHA256SUMS").unlink()  # the records' own digest still catches it
    with pytest.raises(StoreError, match="do not match the digest"):
        verify(tmp_path / "s")
    (tmp_path / "s" / "COMPLETE").unlink()
    with pytest.raises(StoreError, match="incomplete"):
        verify(tmp_path / "s")


def test_a_store_begun_with_fill_value_zero_resumes_with_every_shard_a_file(tmp_path, monkeypatch):
    """Stores begun before the NaN / -1 fill values have fill 0. zarrs writes no file for a
    chunk equal to the fill value, so resuming one through zarrs would lose an all-zero
    token shard: such a store is written through zarr-python's pipeline."""
    import dataclasses

    from pipeline.store import arrays, layout

    path, n = tmp_path / "old.zarr", 2 * SHARD
    resid, _ = make_data(n)
    toks = np.zeros(n, np.int64)  # token id 0 everywhere: equal to the old fill value
    with monkeypatch.context() as m:  # begin it as before: fill values 0
        m.setattr(layout, "DTYPES", {k: dataclasses.replace(v, fill=0) for k, v in layout.DTYPES.items()})
        m.setattr(arrays, "TOKEN_FILL", 0)
        StoreWriter.open(path, **params(n)).abort()
    assert zarr.open_group(str(path), mode="r")["tokens"].metadata.fill_value == 0
    write_store(path, resid, toks)
    store = open_store(path)
    assert (store.tokens().numpy() == 0).all()
    verify(path)  # raises on a missing shard file
