"""Share a store as one file: ``lenspipe export STORE --to zip|hdf5`` and ``lenspipe import``.

zip: the store directory as a stored (uncompressed: the chunks already are) zip archive,
i.e. a zarr ZipStore, written once and then renamed into place. Import unpacks it.

hdf5 (h5py): ``resid`` (n_layers+1, n_tokens, d_model) in the storage dtype (bfloat16 kept
as uint16 bits with an ``encoding`` attribute, as in the zarr store), chunked like the
store's inner chunks; ``tokens``; the store's attributes (provenance, parameters), its
per-shard records and its COMPLETE marker as JSON attributes. Import rebuilds a zarr store
shard by shard through the ordinary writer and then checks that every recomputed shard
checksum equals the exported record: a lossless round trip is verified, not assumed.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from .errors import StoreError
from .progress import Progress
from .provenance import atomic_dir
from .store import BF16_BITS, COMPLETE_NAME, LOCK_NAME, _to_tensor, open_store, record_name, verify

log = logging.getLogger(__name__)

FORMATS = ("zip", "hdf5")


def _tmp_file(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.with_name(f".{dest.name}.partial")


def export_store(src: str | os.PathLike, dest: str | os.PathLike, fmt: str) -> dict:
    """Verify ``src`` end to end, then write it to the single file ``dest``."""
    if fmt not in FORMATS:
        raise StoreError(f"export format {fmt!r} is not one of {FORMATS}")
    summary = verify(src)  # never ship a damaged cache
    dest, tmp = Path(dest), _tmp_file(Path(dest))
    try:
        (_export_zip if fmt == "zip" else _export_hdf5)(Path(src), tmp)
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("exported %s to %s (%s, %.1f MB)", src, dest, fmt, dest.stat().st_size / 1e6)
    return {"source": str(src), "dest": str(dest), "format": fmt, "bytes": dest.stat().st_size,
            "n_tokens": summary.get("n_tokens")}


def _export_zip(root: Path, tmp: Path) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != LOCK_NAME)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for p in files:
            z.write(p, p.relative_to(root).as_posix())


def _export_hdf5(root: Path, tmp: Path) -> None:
    import h5py

    store = open_store(root)
    p = store.params
    raw = store._resid  # (L+1, n, d) in the storage dtype: copied bit for bit
    records = [store.location.read_json(record_name(i)) for i in range(p.n_shards)]
    with h5py.File(tmp, "w") as f:
        f.attrs["lenspipe_attrs"] = json.dumps(store.attrs, default=str)
        f.attrs["lenspipe_records"] = json.dumps(records)
        f.attrs["lenspipe_complete"] = json.dumps(store.location.read_json(COMPLETE_NAME))
        ds = f.create_dataset("resid", shape=raw.shape, dtype=raw.dtype,
                              chunks=(1, min(p.chunk_tokens, p.n_tokens), p.d_model), compression="gzip",
                              compression_opts=1, shuffle=True)
        if store._encoding == BF16_BITS:
            ds.attrs["encoding"] = BF16_BITS  # uint16 holding bfloat16 bits (h5py has no bf16)
        f.create_dataset("tokens", data=store.tokens().numpy().astype(np.int32))
        with Progress(p.n_tokens, "export hdf5", unit="tok") as bar:
            for i in range(p.n_shards):
                s, e = p.shard_span(i)
                ds[:, s:e, :] = raw[:, s:e, :]
                bar.update(e - s)


def import_store(src: str | os.PathLike, dest: str | os.PathLike) -> dict:
    """Rebuild a zarr store at ``dest`` from an exported .zip or .h5/.hdf5 file; verify it."""
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise StoreError(f"no exported store at {src}")
    if dest.exists():
        raise StoreError(f"{dest} already exists; import into a new path")
    if zipfile.is_zipfile(src):
        with atomic_dir(dest) as tmp, zipfile.ZipFile(src) as z:
            z.extractall(tmp)
    else:
        _import_hdf5(src, dest)
    return verify(dest)


def _import_hdf5(src: Path, dest: Path) -> None:
    import h5py

    from .store_writer import StoreWriter

    try:
        f = h5py.File(src, "r")
    except OSError as e:
        raise StoreError(f"{src} is neither a zip nor an HDF5 file exported by lenspipe ({e})") from e
    with f:
        if "lenspipe_attrs" not in f.attrs:
            raise StoreError(f"{src} is an HDF5 file but not a lenspipe export (no lenspipe_attrs)")
        attrs, records = json.loads(f.attrs["lenspipe_attrs"]), json.loads(f.attrs["lenspipe_records"])
        params, encoding = attrs["params"], f["resid"].attrs.get("encoding")
        with StoreWriter.open(dest, **params, provenance=attrs["provenance"]) as w, \
                Progress(params["n_tokens"], "import hdf5", unit="tok") as bar:
            for s in range(0, params["n_tokens"], params["shard_tokens"]):
                e = min(s + params["shard_tokens"], params["n_tokens"])
                w.write(_to_tensor(f["resid"][:, s:e, :], encoding), f["tokens"][s:e])
                bar.update(e - s)
    loc = open_store(dest).location
    mine = [loc.read_json(record_name(i)) for i in range(len(records))]
    keys = [k for k in records[0] if k.endswith("xxh3")] if records else []
    for theirs, ours in zip(records, mine):
        if any(theirs[k] != ours[k] for k in keys):
            raise StoreError(f"imported shard {theirs['shard']} differs from the exported one; "
                             f"{src} is damaged or was not written by this lenspipe")
