"""Checking an activation store end to end, and measuring its compression.

:func:`verify` re-reads every shard and compares it with the checksums the writer recorded
as it went, so a corrupt download or a damaged disk is caught before training on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.errors import StoreError
from pipeline.provenance import sha256_json
from pipeline.store import (BF16_BITS, COMPLETE_NAME, DAMAGED_ADVICE, LOCK_NAME, ActivationStore,
                            is_hdf5_file, open_store, record_name, shard_checksums)

#: Per-file sha256 of a finished store, in ``sha256sum`` format.
MANIFEST_NAME = "SHA256SUMS"


def verify(path_or_url: str | os.PathLike) -> dict:
    """Shapes, completeness, per-shard checksums and finiteness of every value.

    Returns a summary dict; raises StoreError naming the first bad shard (and layer) on a
    missing completion marker, a checksum mismatch, an undecodable chunk or inf/nan.
    An HDF5 export (``lenspipe export --to hdf5``) is checked the same way, in place.
    """
    if _is_hdf5_export(path_or_url):
        from pipeline.store_export import verify_hdf5  # late: store_export imports this module

        return verify_hdf5(path_or_url)
    store = open_store(path_or_url)  # raises StoreError unless complete
    where = store.location.zarr_store
    n_files = check_manifest(store)
    _check_shapes(store)
    records = _load_all_records(store)
    for i, record in enumerate(records):
        _verify_shard(store, i, record)
    return {"path": where, "complete": True, "n_shards": len(records),
            "n_tokens": store.n_tokens, "n_layers": store.n_layers, "d_model": store.d_model,
            "dtype": store.dtype, "checked_values": (store.n_layers + 1) * store.n_tokens * store.d_model,
            "checked_files_sha256": n_files}


def _is_hdf5_export(path_or_url: str | os.PathLike) -> bool:
    text = str(path_or_url)
    return ("://" not in text and os.path.isfile(text)
            and (text.endswith((".h5", ".hdf5")) or is_hdf5_file(text)))


def write_manifest(root: Path) -> None:
    """``SHA256SUMS`` (the format of ``sha256sum``) over every file of a finished store.

    A downloaded cache can then be checked with standard tools (``sha256sum -c
    SHA256SUMS`` in the store directory) as well as by :func:`verify`.
    """
    from pipeline.provenance import sha256_file

    skip = {MANIFEST_NAME, COMPLETE_NAME, LOCK_NAME}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in skip)
    lines = [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files]
    tmp = root / f".{MANIFEST_NAME}.tmp"
    tmp.write_text("".join(lines))
    tmp.replace(root / MANIFEST_NAME)


def check_manifest(store: ActivationStore) -> int:
    """Check every file listed in the store's SHA256SUMS; name the first damaged one."""
    import hashlib

    loc = store.location
    text = loc.read_bytes(MANIFEST_NAME)
    if text is None:
        return 0  # stores written before the manifest existed: the shard checksums still run
    lines = _manifest_lines(text, loc.zarr_store)
    for digest, name in lines:
        data = loc.read_bytes(name)  # a read failure (bad CRC in a zip, ...) is a StoreError
        if data is None:
            raise StoreError(f"{loc.zarr_store}: {name} is listed in {MANIFEST_NAME} but missing; "
                             "the copy is incomplete, download it again")
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(f"{loc.zarr_store}: {name}{_shard_of(name)} does not match its sha256 in "
                             f"{MANIFEST_NAME}; re-download or re-extract it")
    return len(lines)


def _manifest_lines(data: bytes, where: str) -> list[tuple[str, str]]:
    """(sha256, name) per line of ``sha256sum`` output; a garbled line means a damaged copy."""
    try:
        lines = [tuple(line.split("  ", 1)) for line in data.decode().splitlines() if line.strip()]
    except UnicodeDecodeError:
        lines = [()]
    bad = [line for line in lines if len(line) != 2 or len(line[0]) != 64]
    if bad or not lines:
        raise StoreError(f"{where}: {MANIFEST_NAME} is garbled (not sha256sum output); "
                         "download the store again or re-extract it")
    return lines  # type: ignore[return-value]


def _shard_of(name: str) -> str:
    parts = name.split("/")
    return f" (shard {parts[3]})" if parts[:2] == ["resid", "c"] and len(parts) == 5 else ""


def _check_shapes(store: ActivationStore) -> None:
    p = store.params
    want = {"resid": (p.n_layers + 1, p.n_tokens, p.d_model), "tokens": (p.n_tokens,)}
    got = {"resid": store._resid.shape, "tokens": store._tokens.shape}
    if want != got:
        raise StoreError(f"{store.location.zarr_store}: array shapes {got} do not match the "
                         f"recorded parameters {want}")


def _load_all_records(store: ActivationStore) -> list[dict]:
    """Every shard's record, checked against the digest the completion marker holds."""
    p, loc = store.params, store.location
    records = loc.load_records(p)
    if len(records) != p.n_shards:
        raise StoreError(f"{loc.zarr_store}: shard {len(records)} has no valid progress record "
                         f"({record_name(len(records))}); the store is damaged, re-extract it")
    marker = loc.read_json(COMPLETE_NAME) or {}
    if marker.get("records_sha256") != sha256_json(records):
        raise StoreError(f"{loc.zarr_store}: the shard records do not match the digest in "
                         f"{COMPLETE_NAME}; the progress files were altered")
    return records


def _verify_shard(store: ActivationStore, i: int, record: dict) -> None:
    start, stop = record["start"], record["stop"]
    what = f"{store.location.zarr_store}: shard {i} (tokens {start}..{stop})"
    raw = _read_shard(store, start, stop, what)  # (L+1, n, d) storage dtype
    try:
        tokens = store._tokens[start:stop]  # (n,) int32
    except Exception as e:  # a decode failure is data damage here
        raise StoreError(f"{what}: its token ids cannot be decoded ({e!r}); {DAMAGED_ADVICE}") from e
    sums = shard_checksums(raw, tokens)
    for layer, (got, want) in enumerate(zip(sums["resid_xxh3"], record["resid_xxh3"])):
        if got != want:
            raise StoreError(f"{what}, layer {layer}: checksum mismatch (stored data differs "
                             "from what was written); re-download or re-extract")
    if sums["tokens_xxh3"] != record["tokens_xxh3"]:
        raise StoreError(f"{what}: token ids checksum mismatch; re-download or re-extract")
    for layer, values in enumerate(raw):
        if not _all_finite(values, store._encoding):
            raise StoreError(f"{what}, layer {layer}: holds inf/nan values")


def _read_shard(store: ActivationStore, start: int, stop: int, what: str) -> np.ndarray:
    """The whole shard in one read; on failure, re-read layer by layer to name the culprit."""
    try:
        return store._resid[:, start:stop, :]
    except Exception as whole:  # any decode failure is data damage here
        failed = [layer for layer in range(store.n_layers + 1) if not _layer_decodes(store, layer, start, stop)]
        if failed and len(failed) <= store.n_layers:
            raise StoreError(f"{what}, layer {failed[0]}: cannot be decoded ({whole!r})") from whole
        # Every layer failing points at what they share: the shard index at the file's end.
        raise StoreError(f"{what}: cannot be decoded, in any layer (damaged shard index?) "
                         f"({whole!r})") from whole


def _layer_decodes(store: ActivationStore, layer: int, start: int, stop: int) -> bool:
    try:
        store._resid[layer, start:stop, :]
    except Exception:
        return False
    return True


def _all_finite(values: np.ndarray, encoding: str | None) -> bool:
    if encoding == BF16_BITS:
        # A bf16 is inf/nan exactly when its 8 exponent bits are all ones.
        return not np.any((values & 0x7F80) == 0x7F80)
    return bool(np.isfinite(values).all())


def measure_compression(path: str | os.PathLike) -> dict:
    """Bytes stored on disk for ``resid`` vs its uncompressed size (local stores and zips)."""
    store = open_store(path, allow_incomplete=True)
    stored = _stored_resid_bytes(store)
    raw = int(np.prod(store._resid.shape)) * store._resid.dtype.itemsize
    return {"stored_bytes": stored, "raw_bytes": raw, "ratio": raw / stored if stored else float("nan"),
            "dtype": store.dtype, "compression": store.params.compression, "level": store.params.level}


def _stored_resid_bytes(store: ActivationStore) -> int:
    loc = store.location
    if loc.is_url:
        raise ValueError(f"sizes on disk are unknown for a remote store ({loc.zarr_store})")
    if loc.is_zip:
        return sum(i.compress_size for i in loc.fs.zip.infolist()
                   if i.filename.startswith("resid/") and not i.filename.endswith("zarr.json"))
    resid_dir = Path(loc.root) / "resid"
    return sum(f.stat().st_size for f in resid_dir.rglob("*") if f.is_file() and f.name != "zarr.json")
