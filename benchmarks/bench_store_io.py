"""The store's write and read paths against raw files and against the codec alone.

    python benchmarks/bench_store_io.py [--layers 30 --tokens 16384 --d-model 576]
        [--compressions none,zstd:1,zstd:3,blosc-zstd:1,blosc-lz4:5] [--pipelines zarrs,zarr]
        [--writers tensorstore,zarr] [--rounds 3] [--dir DIR]

The same activations ((layers+1) x tokens x d_model, bf16, float32 at the input as the
model hands them over) are written and read back, side by side in one run:

- **raw**: one file per shard, the shard's (layer, token, feature) block as bytes, written
  with ``write`` + ``fsync`` as the store writes its shard files; read with ``readinto``.
- **store**: :class:`StoreWriter` / :func:`open_store`, for each compression setting, each
  zarr codec pipeline (``zarrs``, the Rust pipeline, or zarr-python's own) and each shard
  writer (``tensorstore``, the default, or ``zarr``: the codec pipeline's own writes).
  A store write includes all its guarantees: the checksums, fsync, the progress records,
  and finalize's SHA256SUMS over every file.
- **codec**: the compressor alone on the same inner chunks, with the same thread count
  (the bound a compressed store cannot beat however good its I/O).

Every store measurement is paired with the raw one it is divided by: ``--rounds`` rounds
alternate raw and store (writes after ``os.sync()``, so neither arm pays for the other's
dirty pages), and each takes its best round; the machine's drift then cancels in the ratio.
Reads: one layer over all tokens (what training a layer group and the analyses do; the
store open, through the store's one-layer reader: TensorStore for a local store), and all
layers in one-shard token batches (what evaluation does; through zarr and the chosen
pipeline). Reads follow the writes, so both arms read from the page cache: this measures
the code path, not the disk.

Ratios printed are store / raw (and, compressed, store / min(raw, codec)). A write has a
second bound, ``vs work``: the work every store write must do, done one after another at
the rates measured here: the raw write (cast, copy, write, fsync), the codec's encode,
and SHA-256 over the stored bytes (finalize's SHA256SUMS; hashed while later shards are
written, so overlap can beat this sum where cores are free). The last line
is ``write_ratio=X read_ratio=Y codec=NAME`` for the default compression, pipeline and
writer, ``read_ratio`` the lower of the two read patterns.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.allocator import keep_freed_memory  # noqa: E402
from pipeline.store import engine  # noqa: E402
from pipeline.store.layout import BF16_BITS  # noqa: E402
from pipeline.store.reader import open_store, to_tensor  # noqa: E402
from pipeline.store.writer import StoreWriter  # noqa: E402

SHARD, CHUNK, BATCH = 4096, 512, 2048


def activations(layers: int, d_model: int, seed: int = 0) -> torch.Tensor:
    """(layers+1, BATCH, d) float32 shaped like a residual stream: per-feature scales
    spanning three decades (a few outlier features), so bf16 compresses as it does on
    real stores (~1.3x with zstd), not as white noise or zeros would."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 2, d_model)[torch.randperm(d_model, generator=g)]  # (d,)
    depth = torch.linspace(1, 8, layers + 1)[:, None, None]  # the stream grows with depth
    return torch.randn(layers + 1, BATCH, d_model, generator=g) * scale * depth  # (L+1, n, d)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(rounds: int, fn) -> float:
    """The shortest of ``rounds`` timings: short reads (~10 ms) are noisy here."""
    return min(timed(fn) for _ in range(rounds))


# ---------------------------------------------------------------- raw files

def raw_write(root: Path, x: torch.Tensor, n_tokens: int) -> None:
    root.mkdir(parents=True)
    buf = np.empty((x.shape[0], SHARD, x.shape[2]), np.uint16)  # (L+1, shard, d)
    for s in range(0, n_tokens, SHARD):
        for b in range(0, SHARD, BATCH):
            buf[:, b:b + BATCH] = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        fd = os.open(root / f"{s // SHARD}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, memoryview(buf).cast("B"))
            os.fsync(fd)
        finally:
            os.close(fd)


def raw_read_layer(root: Path, shape: tuple[int, int, int], layer: int) -> torch.Tensor:
    L1, n, d = shape
    out = np.empty((n, d), np.uint16)
    span = SHARD * d * 2
    for s in range(0, n, SHARD):
        with open(root / f"{s // SHARD}", "rb", buffering=0) as f:
            f.seek(layer * span)
            f.readinto(memoryview(out[s:s + SHARD]).cast("B"))
    return to_tensor(out, BF16_BITS)  # (n, d) float32, as the store returns


def raw_read_all(root: Path, shape: tuple[int, int, int]) -> None:
    L1, n, d = shape
    buf = np.empty((L1, SHARD, d), np.uint16)
    for s in range(0, n, SHARD):
        with open(root / f"{s // SHARD}", "rb", buffering=0) as f:
            f.readinto(memoryview(buf).cast("B"))
        to_tensor(buf, BF16_BITS)  # (L+1, shard, d) float32


# ---------------------------------------------------------------- the store

def store_write(path: Path, x: torch.Tensor, n_tokens: int, compression: str, chunk_tokens: int = CHUNK) -> None:
    name, level = parse(compression)
    with StoreWriter.open(path, n_layers=x.shape[0] - 1, d_model=x.shape[2], n_tokens=n_tokens,
                          seq_len=256, shard_tokens=SHARD, chunk_tokens=chunk_tokens, compression=name,
                          level=level, provenance={}) as w:
        tokens = torch.arange(1, BATCH + 1)  # never all fill_value
        for _ in range(0, n_tokens, BATCH):
            w.write(x, tokens)


def store_read_all(store) -> None:
    for s in range(0, store.n_tokens, SHARD):
        store.layers(range(store.n_layers + 1), s, s + SHARD)  # (L+1, shard, d)


# ---------------------------------------------------------------- the codec alone

def codec_rates(x: torch.Tensor, compression: str, threads: int) -> tuple[float, float, float]:
    """(encode GB/s, decode GB/s, stored bytes / raw bytes) of the compressor alone."""
    name, level = parse(compression)
    if name == "none":
        return float("inf"), float("inf"), 1.0
    numcodec = _numcodec(name, level)
    bits = x.to(torch.bfloat16).view(torch.int16).numpy()
    chunks = [np.ascontiguousarray(bits[i, c:c + CHUNK]) for i in range(bits.shape[0])
              for c in range(0, bits.shape[1], CHUNK)]
    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        enc = list(pool.map(numcodec.encode, chunks))
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        list(pool.map(numcodec.decode, enc))
        t_dec = time.perf_counter() - t0
    size = bits.nbytes
    return size / t_enc / 1e9, size / t_dec / 1e9, sum(len(e) for e in enc) / size


def _numcodec(name: str, level: int):
    """The numcodecs twin of the store's compressor (same library, same settings)."""
    import numcodecs

    if name == "zstd":
        return numcodecs.Zstd(level=level, checksum=True)
    cname = name.split("-", 1)[1]
    return numcodecs.Blosc(cname=cname, clevel=level, shuffle=numcodecs.Blosc.SHUFFLE, typesize=2)


def parse(compression: str) -> tuple[str, int]:
    """'zstd:3' -> ('zstd', 3); 'none' -> ('none', 0)."""
    name, _, level = compression.partition(":")
    return name, int(level or 0)


def default_compression() -> str:
    from pipeline.config import ExtractConfig

    cfg = ExtractConfig()
    return cfg.compression if cfg.compression == "none" else f"{cfg.compression}:{cfg.level}"


# ---------------------------------------------------------------- one arm

def paired(rounds: int, arms: dict, before=None) -> dict:
    """Best time of each arm over ``rounds`` rounds that run the arms in turn."""
    times: dict = {name: [] for name in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            if before:
                before(name)
            times[name].append(timed(fn))
    return {name: min(t) for name, t in times.items()}


def measure(root: Path, x: torch.Tensor, shape: tuple[int, int, int], compression: str, pipeline: str,
            writer: str, rounds: int) -> dict:
    engine.configure(pipeline, threads=torch.get_num_threads(), shard_writes=writer == "tensorstore")
    n_tokens, mid = shape[1], shape[0] // 2
    raw, path = root / "raw", root / f"{pipeline}-{writer}-{compression.replace(':', '-')}.zarr"

    def fresh(name: str) -> None:
        shutil.rmtree(raw if name == "raw_write" else path, ignore_errors=True)
        os.sync()  # the other arm's dirty pages are on disk before this one starts

    t = paired(rounds, {"raw_write": lambda: raw_write(raw, x, n_tokens),
                        "write": lambda: store_write(path, x, n_tokens, compression)}, fresh)
    store = open_store(path)
    store.layers(0)  # opens the one-layer reader (TensorStore: ~1 s of import, once per process)
    t |= paired(2 * rounds, {"raw_read_layer": lambda: raw_read_layer(raw, shape, mid),
                             "read_layer": lambda: store.layers(mid),
                             "raw_read_all": lambda: raw_read_all(raw, shape),
                             "read_all": lambda: store_read_all(store)})
    t["size"] = sum(p.stat().st_size for p in (path / "resid").rglob("*") if p.is_file())
    shutil.rmtree(path)
    return t


def sha256_rate(x: torch.Tensor, threads: int) -> float:
    """GB/s of SHA-256 over the stored bytes, one buffer per thread (finalize's SHA256SUMS)."""
    import hashlib

    bits = x.to(torch.bfloat16).view(torch.int16).numpy()
    parts = [bits[i].tobytes() for i in range(bits.shape[0])]
    with ThreadPoolExecutor(threads) as pool:
        t = best_of(3, lambda: list(pool.map(lambda b: hashlib.sha256(b).digest(), parts)))
    return bits.nbytes / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--compressions", default="none,zstd:1,zstd:3,blosc-zstd:1,blosc-lz4:5")
    ap.add_argument("--pipelines", default="zarrs,zarr")
    ap.add_argument("--writers", default="tensorstore,zarr")
    ap.add_argument("--rounds", type=int, default=3, help="paired rounds per write (reads: twice as many)")
    ap.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    args = ap.parse_args()
    keep_freed_memory()  # as every stage does: reads into fresh arrays without page faults
    if args.tokens % SHARD:
        ap.error(f"--tokens must be a multiple of {SHARD}")
    threads = torch.get_num_threads()
    default = default_compression()
    x = activations(args.layers, args.d_model)  # (L+1, BATCH, d)
    shape = (args.layers + 1, args.tokens, args.d_model)
    gb = np.prod(shape) * 2 / 1e9  # stored bf16 bytes, uncompressed
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench_store_io-"))
    print(f"{shape[0]} layers x {args.tokens} tokens x {args.d_model} bf16 = {gb:.3f} GB; "
          f"shard {SHARD} tokens, chunk {CHUNK}; {threads} threads; {args.rounds} paired rounds; in {root}")
    sha = sha256_rate(x, threads)
    print(f"sha256 ({threads} threads): {sha:.2f} GB/s")
    print("| pipeline | writer | compression | bytes/value | codec enc/dec GB/s | raw write / read 1 / read all GB/s | "
          "write GB/s | ratio | vs bound | vs work | read 1 layer GB/s | ratio | read all GB/s | ratio | vs bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    last = None
    try:
        for pipeline in args.pipelines.split(","):
            for writer in args.writers.split(","):
                for comp in args.compressions.split(","):
                    enc, dec, frac = codec_rates(x, comp, threads)
                    m = measure(root, x, shape, comp, pipeline, writer, args.rounds)
                    rate = {k: gb / v for k, v in m.items() if k != "size"}
                    for k in ("read_layer", "raw_read_layer"):
                        rate[k] /= shape[0]
                    wr, r1r, rar = (rate[k] / rate[f"raw_{k}"] for k in ("write", "read_layer", "read_all"))
                    wb = rate["write"] / min(rate["raw_write"], enc)
                    work = m["raw_write"] + gb / enc + m["size"] / 1e9 / sha  # s, one after another
                    ww = rate["write"] / (gb / work)
                    rb = min(rate["read_layer"] / min(rate["raw_read_layer"], dec),
                             rate["read_all"] / min(rate["raw_read_all"], dec))
                    print(f"| {pipeline} | {writer} | {comp} | {2 * m['size'] / (gb * 1e9):.3f} | "
                          f"{enc:.2f} / {dec:.2f} | {rate['raw_write']:.2f} / {rate['raw_read_layer']:.2f} / "
                          f"{rate['raw_read_all']:.2f} | {rate['write']:.2f} | {wr:.2f} | {wb:.2f} | {ww:.2f} | "
                          f"{rate['read_layer']:.2f} | {r1r:.2f} | {rate['read_all']:.2f} | {rar:.2f} | {rb:.2f} |",
                          flush=True)
                    if pipeline == engine.DEFAULT and writer == "tensorstore" and comp == default:
                        last = (wr, min(r1r, rar), comp)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if last:
        print(f"write_ratio={last[0]:.2f} read_ratio={last[1]:.2f} codec={last[2]}")


if __name__ == "__main__":
    main()
