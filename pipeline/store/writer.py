"""The activation store's writer: whole shards only, one writer, resumable.

Zarr 3 writes a shard by reading the existing shard back, merging, and re-encoding all of
it, and concurrent partial writes to one shard silently lose data; so the writer buffers
incoming batches and only ever writes whole shards, one writer per store (an flock), and
records each durably written shard before the next. The layout is in
:mod:`pipeline.store.layout`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from ..errors import StoreError, disk_full, disk_full_message
from ..provenance import acquire_lock, now_utc, package_versions, sha256_file, sha256_json, write_json_atomic
from . import engine
from .layout import (BF16_BITS, COMPLETE_NAME, FORMAT, LOCK_NAME, MANIFEST_NAME, PROGRESS_DIR, SCHEMA_VERSION,
                     STORED_NP, StoreParams, check_schema, record_name, shard_checksums)
from .location import Location


_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: Largest magnitude each storage dtype holds; beyond it the exact (slow) check runs.
_MAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": float("inf")}


def _encode(x: torch.Tensor, dtype: str, first_index: int, seq_len: int) -> np.ndarray:
    """(L+1, n, d) float tensor -> numpy array in the storage dtype; refuse inf/nan.

    The range check is one min/max reduction on the source tensor, on its own device (the
    GPU when extraction runs there), and the cast happens there too, so only the compact
    storage dtype crosses to the host. Only a suspicious batch pays for the exact check
    of the cast copy (bf16 elementwise ops are slow on CPUs).
    """
    lo, hi = torch.aminmax(x)
    peak = max(-float(lo), float(hi))
    cast = x.to(_TORCH[dtype])
    if not peak <= _MAX[dtype]:  # also true for nan
        bad = ~torch.isfinite(cast)
        if bool(bad.any()):
            _raise_nonfinite(x, bad, dtype, first_index, seq_len)
    cast = cast.cpu()
    if dtype == "bfloat16":
        return cast.view(torch.int16).numpy().view(np.uint16)  # the raw bf16 bits
    return cast.numpy()


def _raise_nonfinite(x: torch.Tensor, bad: torch.Tensor, dtype: str, first_index: int,
                     seq_len: int) -> None:
    layer, t, feature = (int(v) for v in bad.nonzero()[0])
    index = first_index + t
    seq, pos = divmod(index, seq_len)
    where = f"layer {layer}, token index {index} (sequence {seq}, position {pos}), feature {feature}"
    value = float(x[layer, t, feature])
    if not np.isfinite(value):
        raise StoreError(f"non-finite activation {value} at {where}: the model itself produced "
                         "inf/nan; run it in bfloat16 or float32 rather than float16")
    raise StoreError(f"activation {value:g} at {where} overflows store dtype {dtype}; "
                     "use store dtype 'bfloat16' or 'float32'")


def _compressors(compression: str, level: int) -> list | None:
    if compression == "zstd":
        # checksum=True: a corrupt chunk fails loudly on every read, not only under verify.
        return [ZstdCodec(level=level, checksum=True)]
    if compression.startswith("blosc-"):
        # Byte shuffle puts the bf16s' sign/exponent bytes (low entropy) apart from their
        # mantissa bytes (noise), which is where all the compression comes from.
        return [BloscCodec(cname=compression.split("-", 1)[1], clevel=level, shuffle="shuffle", typesize=2)]
    return None


#: Fill values no written chunk can equal (values are checked finite before they are stored;
#: token ids are >= 0), so every inner chunk and every shard is a file whatever the codec
#: pipeline: zarrs skips chunks equal to the fill value even when told to write them.
FILL = {"bfloat16": 0x7FC0, "float16": float("nan"), "float32": float("nan")}  # 0x7FC0: bf16 NaN
TOKEN_FILL = -1


def _create_arrays(group: zarr.Group, p: StoreParams) -> None:
    encoding = BF16_BITS if p.dtype == "bfloat16" else None
    group.create_array(
        "resid", shape=(p.n_layers + 1, p.n_tokens, p.d_model), dtype=STORED_NP[p.dtype],
        shards=(p.n_layers + 1, p.shard_tokens, p.d_model), chunks=(1, p.chunk_tokens, p.d_model),
        compressors=_compressors(p.compression, p.level), fill_value=FILL[p.dtype],
        dimension_names=("layer", "token", "feature"),
        attributes={"encoding": encoding, "dtype": p.dtype}, overwrite=True)
    group.create_array(
        "tokens", shape=(p.n_tokens,), dtype="int32", chunks=(p.shard_tokens,),
        compressors=_compressors(p.compression, p.level), fill_value=TOKEN_FILL,
        dimension_names=("token",), overwrite=True)


def _own_fill_values(group: zarr.Group, p: StoreParams) -> bool:
    """Whether the arrays have the fill values above (False: a store begun before them)."""
    resid, tokens = group["resid"].metadata.fill_value, group["tokens"].metadata.fill_value
    want = np.array(FILL[p.dtype], dtype=STORED_NP[p.dtype])
    same = np.array_equal(np.asarray(resid, want.dtype), want, equal_nan=want.dtype.kind == "f")
    return bool(same and int(tokens) == TOKEN_FILL)


def _initial_attrs(p: StoreParams, provenance: dict, fingerprint: str) -> dict:
    return {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "fingerprint": fingerprint,
        "params": dataclasses.asdict(p), "provenance": provenance, "dtype": p.dtype,
        "encoding": BF16_BITS if p.dtype == "bfloat16" else None, "d_model": p.d_model,
        "n_layers": p.n_layers, "n_tokens": p.n_tokens, "seq_len": p.seq_len,
        "package_versions": package_versions(), "created": now_utc(), "finished": None,
        "complete": False,
    }


def _fingerprint(p: StoreParams, provenance: dict) -> str:
    try:
        return sha256_json({"params": dataclasses.asdict(p), "provenance": provenance})
    except TypeError as e:
        raise StoreError(f"store provenance must be JSON-serialisable: {e}") from e


def _check_resumable(root: Path, attrs: dict, p: StoreParams, provenance: dict) -> None:
    check_schema(attrs, str(root))
    if attrs.get("fingerprint") == _fingerprint(p, provenance):
        return
    old = {**attrs.get("params", {}), **{f"provenance.{k}": v for k, v in attrs.get("provenance", {}).items()}}
    new = {**dataclasses.asdict(p), **{f"provenance.{k}": v for k, v in provenance.items()}}
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
             if old.get(k) != new.get(k)]
    raise StoreError(f"the store at {root} was written with different parameters "
                     f"({'; '.join(diffs) or 'fingerprint differs'}); delete the store or "
                     "change the output path")


def _refuse_foreign_dir(root: Path) -> None:
    if (root / "zarr.json").exists() or not root.exists():
        return
    if not root.is_dir():
        raise StoreError(f"{root} exists and is not a directory; choose another store path")
    foreign = sorted(p.name for p in root.iterdir() if p.name != LOCK_NAME)
    if foreign:
        raise StoreError(f"{root} exists and is not a lenspipe activation store (it holds "
                         f"{', '.join(foreign[:5])}); refusing to write into it; choose a new path")


def _acquire_lock(root: Path) -> int:
    return acquire_lock(root / LOCK_NAME, f"the store at {root}", StoreError)


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _consolidate(root: Path) -> None:
    # Consolidated metadata lets a remote open cost one request. Zarr warns that it is not
    # in the v3 spec, and that our sidecar files are not zarr nodes; both are expected.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata is currently", zarr.errors.ZarrUserWarning)
        warnings.filterwarnings("ignore", "Object at .* is not recognized", zarr.errors.ZarrUserWarning)
        zarr.consolidate_metadata(str(root))


# ---------------------------------------------------------------- the writer

class StoreWriter:
    """Writes one store, whole shards only, resumably; see :meth:`open`.

    Use as a context manager: a clean exit finalizes, an exception leaves the store
    incomplete but keeps every durably written shard for a later resume.
    """

    def __init__(self, root: Path, params: StoreParams, group: zarr.Group, lock_fd: int,
                 records: list[dict], already_complete: bool, background: bool):
        self.root, self.params, self._group, self._lock_fd = root, params, group, lock_fd
        cfg = {"write_empty_chunks": True}  # every shard is a file: fsync-able, deletable
        self._resid = group["resid"].with_config(cfg)
        self._resid_shards: Any = None  # engine.shard_writer's handle, opened on first use (False: none)
        self._tokens = group["tokens"].with_config(cfg)
        self._records = records
        self.already_complete = already_complete
        self.resume_token = min(len(records) * params.shard_tokens, params.n_tokens)
        self._pos = self.resume_token  # next token index to receive
        self._buffers: list[tuple[np.ndarray, np.ndarray] | None] = [None, None]
        self._which = 0
        self._pending: Future | None = None
        self._executor = ThreadPoolExecutor(1, "lenspipe-store") if background else None
        # SHA256SUMS digests of the shard files, hashed while later shards are written
        # (finalize hashes only what is missing or changed: see write_manifest)
        self._hasher = ThreadPoolExecutor(1, "lenspipe-sha256") if background else None
        self._digests: dict[Path, Future] = {}
        self._broken = False
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike, *, n_layers: int, d_model: int, n_tokens: int,
             seq_len: int, dtype: str = "bfloat16", shard_tokens: int, chunk_tokens: int,
             compression: str = "zstd", level: int = 3, provenance: dict,
             background: bool = True) -> "StoreWriter":
        """Create the store at ``path``, or resume it if it was interrupted.

        Resuming needs identical parameters and provenance (else StoreError). A store that
        is already complete opens with ``already_complete=True`` and ``resume_token ==
        n_tokens``: nothing to write, finalize() is a no-op, write() raises. A second writer
        on the same store raises StoreError.
        """
        params = StoreParams(n_layers, d_model, n_tokens, seq_len, dtype, shard_tokens,
                             chunk_tokens, compression, level)
        params.validate()
        fingerprint = _fingerprint(params, provenance)
        root = Path(path).absolute()
        _refuse_foreign_dir(root)
        root.mkdir(parents=True, exist_ok=True)
        lock_fd = _acquire_lock(root)
        try:
            with engine.for_location(local_dir=True):
                return cls._open(root, params, provenance, fingerprint, lock_fd, background)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open(cls, root: Path, params: StoreParams, provenance: dict, fingerprint: str, lock_fd: int,
              background: bool) -> "StoreWriter":
        if (root / "zarr.json").exists():
            group = zarr.open_group(str(root), mode="r+", zarr_format=3, use_consolidated=False)
            _check_resumable(root, group.attrs.asdict(), params, provenance)
        else:
            group = zarr.create_group(str(root), attributes=_initial_attrs(params, provenance, fingerprint))
        _ensure_arrays(group, params)
        loc = Location(root)
        complete = loc.read_json(COMPLETE_NAME) is not None and group.attrs.get("complete") is True
        records = loc.load_records(params)
        with engine.for_location(local_dir=True, fill_ok=_own_fill_values(group, params)):
            writer = cls(root, params, group, lock_fd, records, complete, background)
        if not complete:
            writer._discard_unrecorded()
        return writer

    # -- appending ------------------------------------------------------------------

    def write(self, resid: torch.Tensor | np.ndarray, tokens: torch.Tensor | np.ndarray) -> None:
        """Append a batch at the current position: resid (n_layers+1, n, d_model), tokens (n,)."""
        self._check_writable()
        if self._pending is not None and self._pending.done():
            self._collect()  # surface a background failure now, not one shard later
        if isinstance(resid, np.ndarray) and not resid.flags.writeable:
            resid = resid.copy()  # torch warns on read-only numpy memory
        x = torch.as_tensor(resid).detach()  # (L+1, n, d), still on its device
        if not x.is_floating_point():
            x = x.float()
        tokens = torch.as_tensor(tokens).cpu().numpy()  # (n,)
        n = self._check_batch(x, tokens)
        stored = _encode(x, self.params.dtype, self._pos, self.params.seq_len)  # (L+1, n, d)
        toks = tokens.astype(np.int32)  # (n,)
        done = 0
        while done < n:
            done += self._buffer_some(stored[:, done:], toks[done:])

    def _check_writable(self) -> None:
        if self.already_complete:
            raise StoreError(f"the store at {self.root} is already complete; nothing to write")
        if self._closed or self._broken:
            raise StoreError(f"this writer for {self.root} is closed or failed; reopen it to resume")

    def _check_batch(self, x: torch.Tensor, tok: np.ndarray) -> int:
        p = self.params
        if x.ndim != 3 or x.shape[0] != p.n_layers + 1 or x.shape[2] != p.d_model:
            raise StoreError(f"resid batch has shape {tuple(x.shape)}, expected "
                             f"({p.n_layers + 1}, n, {p.d_model})")
        n = x.shape[1]
        if tok.shape != (n,) or not np.issubdtype(tok.dtype, np.integer):
            raise StoreError(f"tokens batch must be ({n},) integers, got {tok.shape} {tok.dtype}")
        if n and (tok.min() < 0 or tok.max() > np.iinfo(np.int32).max):
            raise StoreError("token ids must fit in int32 and be non-negative")
        if self._pos + n > p.n_tokens:
            raise StoreError(f"batch of {n} tokens at position {self._pos} runs past the "
                             f"store's n_tokens={p.n_tokens}")
        return n

    def _buffer_some(self, stored: np.ndarray, toks: np.ndarray) -> int:
        """Copy as much of the batch as fits in the current shard; submit it when full."""
        shard = self._pos // self.params.shard_tokens
        start, stop = self.params.shard_span(shard)
        take = min(stored.shape[1], stop - self._pos)
        buf, tbuf = self._current_buffers()  # (L+1, shard_tokens, d), (shard_tokens,)
        at = self._pos - start
        buf[:, at:at + take] = stored[:, :take]
        tbuf[at:at + take] = toks[:take]
        self._pos += take
        if self._pos == stop:
            self._submit(shard, buf[:, :stop - start], tbuf[:stop - start])
        return take

    def _current_buffers(self) -> tuple[np.ndarray, np.ndarray]:
        # Two shard buffers alternate: one being filled, one being written in the background.
        if self._buffers[self._which] is None:
            p = self.params
            self._buffers[self._which] = (
                np.empty((p.n_layers + 1, p.shard_tokens, p.d_model), STORED_NP[p.dtype]),
                np.empty((p.shard_tokens,), np.int32))
        return self._buffers[self._which]

    def _submit(self, shard: int, buf: np.ndarray, tbuf: np.ndarray) -> None:
        # Waiting for the previous shard first bounds memory at two shards and keeps
        # shards recorded strictly in order.
        self._collect()
        if self._executor is None:
            self._records.append(self._write_shard(shard, buf, tbuf))
            return
        self._pending = self._executor.submit(self._write_shard, shard, buf, tbuf)
        self._which ^= 1

    def _collect(self) -> None:
        """Wait for the in-flight shard; re-raise its exception in the caller's thread."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        try:
            self._records.append(pending.result())
        except BaseException:
            self._broken = True
            raise

    def _write_shard(self, shard: int, buf: np.ndarray, tbuf: np.ndarray) -> dict:
        """Write one whole shard, make it durable, and only then record it as done."""
        start, stop = self.params.shard_span(shard)
        try:
            self._write_resid(start, stop, buf)  # (L+1, n, d): covers the shard, no merge needed
            self._tokens[start:stop] = tbuf
            files = [self.root / arr.basename / arr.metadata.encode_chunk_key(coords)
                     for arr, coords in ((self._resid, (0, shard, 0)), (self._tokens, (shard,)))]
            for path in files:
                _fsync_file(path)
        except (OSError, RuntimeError, ValueError) as e:
            if not disk_full(e):
                raise
            # The shard is not recorded, so the store stays incomplete and a resume rewrites it.
            raise StoreError(disk_full_message(e, f"shard {shard} of the store at {self.root}")) from e
        record = {"shard": shard, "start": start, "stop": stop, **shard_checksums(buf, tbuf),
                  "written": now_utc()}
        write_json_atomic(self.root / record_name(shard), record)
        if self._hasher is not None:
            self._digests.update((path, self._hasher.submit(file_digest, path)) for path in files)
        return record

    def _write_resid(self, start: int, stop: int, buf: np.ndarray) -> None:
        """One whole shard of activations: through TensorStore (:func:`engine.shard_writer`),
        else through zarr."""
        if self._resid_shards is None:
            handle = engine.shard_writer(str(self.root / self._resid.basename))
            self._resid_shards = False if handle is None else handle
        if self._resid_shards is False:
            self._resid[:, start:stop, :] = buf
        else:
            self._resid_shards[:, start:stop, :].write(buf).result()

    def adopt_shard(self, src_root: Path, src_shard: int, record: dict) -> None:
        """Take a finished shard of another store with the same layout as the next shard.

        Its files are hard-linked (copied across file systems) and its record renumbered;
        the checksums stay, so verify re-checks the data against what its writer recorded.
        Used to assemble extraction parts; each shard still had exactly one writer.
        """
        self._check_writable()
        p = self.params
        shard = self._pos // p.shard_tokens
        start, stop = p.shard_span(shard)
        if self._pos != start or record["stop"] - record["start"] != stop - start:
            raise StoreError(f"shard {src_shard} of {src_root} ({record['stop'] - record['start']} tokens) "
                             f"does not fit shard {shard} of {self.root} ({stop - start} tokens)")
        for arr, src_coords, dst_coords in ((self._resid, (0, src_shard, 0), (0, shard, 0)),
                                            (self._tokens, (src_shard,), (shard,))):
            src = Path(src_root) / arr.basename / arr.metadata.encode_chunk_key(src_coords)
            dst = self.root / arr.basename / arr.metadata.encode_chunk_key(dst_coords)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        rec = {**record, "shard": shard, "start": start, "stop": stop, "adopted_from": f"{src_root}#{src_shard}"}
        write_json_atomic(self.root / record_name(shard), rec)
        self._records.append(rec)
        self._pos = stop

    # -- resume / finish --------------------------------------------------------------

    def _discard_unrecorded(self) -> None:
        """Delete leftovers of shards not recorded as done, so they are written from scratch.

        Zarr reads an existing shard back before overwriting it; a stale or torn one would
        cost a read or fail to parse. Temp files of a killed write (zarr's *.partial,
        TensorStore's *.__lock, our .*.tmp) go too.
        """
        for shard in range(len(self._records), self.params.n_shards):
            for arr, coords in ((self._resid, (0, shard, 0)), (self._tokens, (shard,))):
                (self.root / arr.basename / arr.metadata.encode_chunk_key(coords)).unlink(missing_ok=True)
            (self.root / record_name(shard)).unlink(missing_ok=True)
        for sub, pattern in (("resid", "*.partial"), ("resid", "*.__lock"), ("tokens", "*.partial"),
                             (PROGRESS_DIR, ".*.tmp")):
            for leftover in (self.root / sub).rglob(pattern):
                leftover.unlink(missing_ok=True)

    def finalize(self) -> None:
        """Flush, record checksums, mark complete (COMPLETE last), release the lock."""
        if self._closed:
            return
        try:
            if not self.already_complete:
                self._finish()
        except BaseException:
            self.abort()
            raise
        self._release()

    def close(self) -> None:
        self.finalize()

    def _finish(self) -> None:
        p = self.params
        if self._broken:
            raise StoreError(f"an earlier shard write to {self.root} failed; reopen to resume")
        if self._pos != p.n_tokens:
            raise StoreError(f"finalize called after {self._pos} of {p.n_tokens} tokens; the "
                             f"store at {self.root} stays incomplete (resumable)")
        self._collect()
        if [r["shard"] for r in self._records] != list(range(p.n_shards)):
            raise StoreError(f"progress records under {self.root / PROGRESS_DIR} were changed "
                             "while writing; delete the store and extract again")
        finished = now_utc()
        self._group.update_attributes({"complete": True, "finished": finished})
        _consolidate(self.root)
        write_manifest(self.root, self._known_digests())
        write_json_atomic(self.root / COMPLETE_NAME, {
            "n_tokens": p.n_tokens, "n_shards": p.n_shards, "finished": finished,
            "fingerprint": self._group.attrs["fingerprint"],
            "records_sha256": sha256_json(self._records)})

    def _known_digests(self) -> dict[Path, tuple[int, int, str]]:
        """The shard files hashed so far; those still queued are left to write_manifest's
        parallel pass (cancelled here, so the one hashing thread is no tail)."""
        known = {}
        for path, future in self._digests.items():
            if future.cancel():
                continue
            with contextlib.suppress(Exception):  # e.g. the file vanished: hashed again, or missed
                if (digest := future.result()) is not None:
                    known[path] = digest
        return known

    def abort(self) -> None:
        """Stop without marking complete; shards already written stay for a resume."""
        if self._closed:
            return
        try:
            with contextlib.suppress(Exception):
                self._collect()  # let the in-flight shard land: one less to redo
        finally:
            self._release()

    def _release(self) -> None:
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._hasher is not None:
            self._hasher.shutdown(wait=True, cancel_futures=True)
        self._buffers = [None, None]
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    def __del__(self) -> None:
        # A dropped writer (as after a crash) must not keep the lock for the process' life.
        if getattr(self, "_lock_fd", -1) >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def file_digest(path: Path) -> tuple[int, int, str] | None:
    """(size, mtime_ns, sha256) of a file, or None if it changed while it was hashed."""
    before = os.stat(path)
    digest = sha256_file(path)
    after = os.stat(path)
    same = (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)
    return (after.st_size, after.st_mtime_ns, digest) if same else None


def write_manifest(root: Path, known: dict[Path, tuple[int, int, str]] | None = None) -> None:
    """``SHA256SUMS`` (the format of ``sha256sum``) over every file of a finished store.

    A downloaded cache can then be checked with standard tools (``sha256sum -c
    SHA256SUMS`` in the store directory) as well as by :func:`pipeline.store.verify.verify`.
    ``known``: digests from :func:`file_digest` taken as the files were written; each is
    used only while the file keeps that size and mtime, else the file is hashed again.
    """
    skip = {MANIFEST_NAME, COMPLETE_NAME, LOCK_NAME}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in skip)
    known = known or {}

    def digest(path: Path) -> str:
        st, seen = os.stat(path), known.get(path)
        return seen[2] if seen and seen[:2] == (st.st_size, st.st_mtime_ns) else sha256_file(path)

    # One file per thread (hashlib releases the GIL): SHA-256 runs at ~1.6 GB/s on one
    # core here, and a serial pass over a large store was most of finalize's time.
    with ThreadPoolExecutor(engine.io_threads(), "lenspipe-sha256") as pool:
        digests = list(pool.map(digest, files))
    lines = [f"{digest}  {p.relative_to(root).as_posix()}\n" for digest, p in zip(digests, files)]
    tmp = root / f".{MANIFEST_NAME}.tmp"
    tmp.write_text("".join(lines))
    tmp.replace(root / MANIFEST_NAME)


def _ensure_arrays(group: zarr.Group, params: StoreParams) -> None:
    """Create the arrays unless present (a crash can fall between group and arrays)."""
    try:
        group["resid"], group["tokens"]
    except KeyError:
        _create_arrays(group, params)
