"""Checking an activation store end to end, or an HDF5 export of one in place.

:func:`verify` re-reads every shard and compares it with the checksums the writer recorded
as it went, so a corrupt download or a damaged disk is caught before training on it.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .. import positions as P
from ..errors import StoreError
from ..provenance import sha256_json
from .layout import (
    COMPLETE_NAME,
    H5_META,
    H5_META_SHA256,
    MANIFEST_NAME,
    StoreParams,
    ValueArray,
    array_names,
    checksums_of,
    record_name,
)
from .location import DAMAGED_ADVICE
from .reader import ActivationStore, is_hdf5_file, open_store


def verify(path_or_url: str | os.PathLike) -> dict:
    """Shapes, completeness, per-shard checksums and finiteness of every value (of an 8-bit
    store: also its row scales' checksums, scales finite and > 0, values decoding finite).

    Returns a summary dict; raises StoreError naming the first bad shard (and layer) on a
    missing completion marker, a checksum mismatch, an undecodable chunk or inf/nan.
    An HDF5 export (``lenspipe export --to hdf5``) is checked the same way, in place.
    """
    if _is_hdf5_export(path_or_url):
        return verify_hdf5(path_or_url)
    store = open_store(path_or_url)  # raises StoreError unless complete
    where = store.location.zarr_store
    n_files = check_manifest(store)
    _check_shapes(store)
    records = _load_all_records(store)
    for i, record in enumerate(records):
        _verify_shard(store, i, record)
    return {
        "path": where,
        "complete": True,
        "n_shards": len(records),
        "n_tokens": store.n_tokens,
        "n_layers": store.n_layers,
        "d_model": store.d_model,
        "dtype": store.dtype,
        "positions": list(store.positions),
        "checked_values": _n_values(store.params),
        "checked_files_sha256": n_files,
    }


def _is_hdf5_export(path_or_url: str | os.PathLike) -> bool:
    text = str(path_or_url)
    return "://" not in text and os.path.isfile(text) and (text.endswith((".h5", ".hdf5")) or is_hdf5_file(text))


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
            raise StoreError(
                f"{loc.zarr_store}: {name} is listed in {MANIFEST_NAME} but missing; "
                "the copy is incomplete, download it again"
            )
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(
                f"{loc.zarr_store}: {name}{_shard_of(name)} does not match its sha256 in "
                f"{MANIFEST_NAME}; re-download or re-extract it"
            )
    return len(lines)


def _manifest_lines(data: bytes, where: str) -> list[tuple[str, str]]:
    """(sha256, name) per line of ``sha256sum`` output; a garbled line means a damaged copy."""
    try:
        lines = [tuple(line.split("  ", 1)) for line in data.decode().splitlines() if line.strip()]
    except UnicodeDecodeError:
        lines = [()]
    bad = [line for line in lines if len(line) != 2 or len(line[0]) != 64]
    if bad or not lines:
        raise StoreError(
            f"{where}: {MANIFEST_NAME} is garbled (not sha256sum output); download the store again or re-extract it"
        )
    return lines  # type: ignore[return-value]


def _shard_of(name: str) -> str:
    parts = name.split("/")
    if parts[1:3] == ["c", "0"] and len(parts) in (4, 5):  # <values>/c/0/<shard>/0, <scales>/c/0/<shard>
        return f" (shard {parts[3]})"
    return ""


def _check_shapes(store: ActivationStore) -> None:
    p = store.params
    want = {a.name: a.shape(p) for a in p.value_arrays()} | {"tokens": (p.n_tokens,)}
    got = {name: a.shape for name, a in store.value_arrays.items()} | {"tokens": store._tokens.shape}
    if want != got:
        raise StoreError(f"{store.location.zarr_store}: array shapes {got} do not match the recorded parameters {want}")


def _load_all_records(store: ActivationStore) -> list[dict]:
    """Every shard's record, checked against the digest the completion marker holds."""
    p, loc = store.params, store.location
    records = loc.load_records(p)
    if len(records) != p.n_shards:
        raise StoreError(
            f"{loc.zarr_store}: shard {len(records)} has no valid progress record "
            f"({record_name(len(records))}); the store is damaged, re-extract it"
        )
    marker = loc.read_json(COMPLETE_NAME) or {}
    if marker.get("records_sha256") != sha256_json(records):
        raise StoreError(
            f"{loc.zarr_store}: the shard records do not match the digest in "
            f"{COMPLETE_NAME}; the progress files were altered"
        )
    return records


def _verify_shard(store: ActivationStore, i: int, record: dict) -> None:
    start, stop = record["start"], record["stop"]
    what = f"{store.location.zarr_store}: shard {i} (tokens {start}..{stop})"
    # (rows, n, d) in the storage dtype, (rows, n) float32 scales
    values = {a.name: _read_shard(store, a, start, stop, what) for a in store.params.value_arrays()}
    try:
        tokens = store._tokens[start:stop]  # (n,) int32
    except Exception as e:  # a decode failure is data damage here
        raise StoreError(f"{what}: its token ids cannot be decoded ({e!r}); {DAMAGED_ADVICE}") from e
    mismatch = _checksum_mismatch(checksums_of(values, tokens), record, store.params)
    if mismatch:
        raise StoreError(
            f"{what}, {mismatch}: checksum mismatch (stored data differs "
            "from what was written); re-download or re-extract"
        )
    problem = _value_problem(store.params, values)
    if problem:
        raise StoreError(f"{what}, {problem}")


def _checksum_mismatch(sums: dict, record: dict, p: StoreParams) -> str | None:
    """What of a shard differs from its record: ``layer N``, ``token ids``, ``scales of
    layer N``, ``attention layer N``, ...; None when nothing does."""
    for key, what in [(f"{a.name}_xxh3", a.what) for a in p.value_arrays()]:
        if key in sums or key in record:
            got, want = sums.get(key, []), record.get(key, [])
            bad = [
                layer
                for layer in range(max(len(got), len(want)))
                if layer >= len(got) or layer >= len(want) or got[layer] != want[layer]
            ]
            if bad:
                return f"{what} {bad[0]}"
    return "token ids" if sums["tokens_xxh3"] != record.get("tokens_xxh3") else None


def _value_problem(p: StoreParams, values: dict[str, np.ndarray]) -> str | None:
    """``layer N <what is wrong>`` (``attention layer N ...``) for the first row of a shard
    whose values a writer could not have stored (:meth:`StorageDtype.problem`), else None."""
    for a in p.value_arrays():
        if a.is_scale:
            continue
        pos = P.POSITIONS[a.position]
        scale = values.get(pos.scale_array)
        for layer, rows in enumerate(values[a.name]):
            problem = p.spec.problem(rows, None if scale is None else scale[layer])
            if problem:
                return f"{pos.layer_word} {layer}: {problem}"
    return None


def _read_shard(store: ActivationStore, a: ValueArray, start: int, stop: int, what: str) -> np.ndarray:
    """A whole shard of value array ``a`` in one read; on failure, re-read row by row to
    name the culprit."""
    array = store.value_arrays[a.name]
    try:
        return array[:, start:stop]
    except Exception as whole:  # any decode failure is data damage here
        failed = [layer for layer in range(a.rows) if not _layer_decodes(array, layer, start, stop)]
        if failed and len(failed) < a.rows:
            raise StoreError(f"{what}, {a.what} {failed[0]}: cannot be decoded ({whole!r})") from whole
        # Every layer failing points at what they share: the shard index at the file's end.
        where = "" if a.position == P.BLOCK.name else f"{a.position} "
        its = "" if a.name == P.BLOCK.array else f"its {where}{'scales' if a.is_scale else 'states'} "
        raise StoreError(f"{what}: {its}cannot be decoded, in any layer (damaged shard index?) ({whole!r})") from whole


def _layer_decodes(array, layer: int, start: int, stop: int) -> bool:
    try:
        array[layer, start:stop]
    except Exception:
        return False
    return True


# ---------------------------------------------------------------- verify an HDF5 export


def verify_hdf5(path: str | os.PathLike) -> dict:
    """Check an HDF5 export in place, like :func:`verify` a store:
    its metadata digest, shapes, every shard's recorded checksums, finiteness.

    Any failure of h5py on this file is reported as damage: a truncated or bit-flipped
    file makes the HDF5 library fail in many ways (OSError, KeyError, ValueError, ...).
    """
    import h5py

    path = os.path.abspath(path)
    try:
        f = h5py.File(path, "r")
    except Exception as e:
        raise _h5_damage(path, f"cannot be opened as HDF5 ({e})") from e
    with f:
        params, records = _h5_metadata(f, path)
        for i, record in enumerate(records):
            _h5_check_shard(f, path, params, i, record)
    return {
        "path": path,
        "format": "hdf5",
        "complete": True,
        "n_shards": len(records),
        "n_tokens": params.n_tokens,
        "n_layers": params.n_layers,
        "d_model": params.d_model,
        "dtype": params.dtype,
        "positions": list(params.positions),
        "checked_values": _n_values(params),
    }


def _n_values(p: StoreParams) -> int:
    """The stored activations of a store: every position's states."""
    return sum(a.rows * p.n_tokens * p.d_model for a in p.value_arrays() if not a.is_scale)


def _h5_damage(path: str, what: str) -> StoreError:
    return StoreError(
        f"{path} {what}: the HDF5 export is damaged or its copy incomplete; download "
        "it again, or export it again with lenspipe export STORE --to hdf5"
    )


def _h5_metadata(f, path: str) -> tuple[StoreParams, list[dict]]:
    """Parameters and shard records, each checked against its digest."""
    try:
        if not all(k in f.attrs for k in H5_META):
            raise StoreError(
                f"{path} is an HDF5 file but not a lenspipe export (no {', '.join(H5_META)} "
                "attributes), or its metadata is damaged"
            )
        meta = {k: f.attrs[k] for k in H5_META}
        digest = f.attrs.get(H5_META_SHA256)  # absent from exports made before it existed
        if digest is not None and digest != sha256_json(meta):
            raise _h5_damage(path, "has metadata that does not match its sha256")
        attrs, records, marker = (json.loads(meta[k]) for k in H5_META)
        params = StoreParams(**attrs["params"])
        params.validate()
        shapes = tuple(f[name].shape if name in f else None for name in h5_datasets(params))
        by_name = {a.name: a for a in params.value_arrays()}
        want = tuple(
            (params.n_tokens,) if name == "tokens" else by_name[name].shape(params) for name in h5_datasets(params)
        )
        if shapes != want:
            raise _h5_damage(path, f"holds arrays of shapes {shapes}, not the {want} its parameters record")
        if len(records) != params.n_shards or marker.get("records_sha256") != sha256_json(records):
            raise _h5_damage(path, "has shard records that do not match its completion marker")
        return params, records
    except StoreError:
        raise
    except Exception as e:  # metadata h5py or json cannot read: damage (see verify_hdf5)
        raise _h5_damage(path, f"has unreadable metadata ({e!r})") from e


def h5_datasets(p: StoreParams) -> tuple[str, ...]:
    """The datasets of an HDF5 export: the store's arrays (resid, tokens, and scale for a
    scaled dtype, attn and attn_scale for the attention position)."""
    return array_names(p)


def _h5_check_shard(f, path: str, params: StoreParams, i: int, record: dict) -> None:
    s, e = params.shard_span(i)
    where = f"shard {i} (tokens {s}..{e})"
    try:
        # (rows, n, d) storage dtype, (rows, n) float32 scales; (n,) int32
        values = {a.name: f[a.name][:, s:e] for a in params.value_arrays()}
        tokens = f["tokens"][s:e]
    except Exception as err:  # see verify_hdf5
        raise _h5_damage(path, f"cannot be read at {where} ({err})") from err
    mismatch = _checksum_mismatch(checksums_of(values, tokens), record, params)
    if mismatch:
        raise _h5_damage(path, f"{where}, {mismatch}: checksum mismatch (the data differs from what was written)")
    problem = _value_problem(params, values)
    if problem:
        raise _h5_damage(path, f"{where}, {problem}")
