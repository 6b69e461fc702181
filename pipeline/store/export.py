"""Share a store as one file: ``lenspipe export STORE --to zip|hdf5`` and ``lenspipe import``.

zip: the store directory as a stored (uncompressed: the chunks already are) zip archive,
i.e. a zarr ZipStore, written once and then renamed into place. Import unpacks it.

hdf5 (h5py): ``resid`` (n_layers+1, n_tokens, d_model) in the storage dtype (bfloat16 and
fp8 kept as uint16 / uint8 bits with an ``encoding`` attribute, as in the zarr store),
chunked like the store's inner chunks; for fp8 and int8 ``scale`` (n_layers+1, n_tokens)
float32, the row scales; with the attention position ``attn`` (n_layers, n_tokens, d_model)
(and ``attn_scale``) alike; ``tokens``; the store's attributes (provenance, parameters), its
per-shard records and its COMPLETE marker as JSON attributes. Import rebuilds a zarr store
shard by shard through the ordinary writer, from the stored values as they are
(``StoreWriter.write_stored``: no decode and re-encode), and then checks that every
recomputed shard checksum equals the exported record: a lossless round trip is verified,
not assumed.
The HDF5 file also carries a sha256 of its JSON attributes, so ``lenspipe verify`` can
check an HDF5 export in place as thoroughly as a zarr store (:func:`pipeline.store.verify.verify_hdf5`).

Both directions build their output under a temporary name and rename it at the end; an
unwritable destination or a full disk is one message and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from .. import positions as P
from ..errors import StoreError, output_errors
from ..progress import Progress
from ..provenance import atomic_dir, sha256_json
from .layout import COMPLETE_NAME, H5_META_SHA256, LOCK_NAME, StoreParams, record_name
from .reader import is_hdf5_file, open_store
from .verify import verify
from .writer import StoreWriter

log = logging.getLogger(__name__)

FORMATS = ("zip", "hdf5")


def export_store(src: str | os.PathLike, dest: str | os.PathLike, fmt: str) -> dict:
    """Verify ``src`` end to end, then write it to the single file ``dest``."""
    if fmt not in FORMATS:
        raise StoreError(f"export format {fmt!r} is not one of {FORMATS}")
    if fmt == "zip" and not os.path.isdir(src):
        raise StoreError(
            f"export --to zip packs a local store directory, and {src} is none (a zip export can be shared as it is)"
        )
    summary = verify(src)  # never ship a damaged cache
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.partial")
    with output_errors(dest, "the export"):
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            (_export_zip if fmt == "zip" else _export_hdf5)(src, tmp)
            tmp.replace(dest)
        except BaseException:
            with contextlib.suppress(OSError):  # never hide the error that got us here
                tmp.unlink()
            raise
    log.info("exported %s to %s (%s, %.1f MB)", src, dest, fmt, dest.stat().st_size / 1e6)
    card = _write_card(src, dest)
    return {
        "source": str(src),
        "dest": str(dest),
        "format": fmt,
        "bytes": dest.stat().st_size,
        "n_tokens": summary.get("n_tokens"),
        "card": str(card),
    }


def _write_card(src: str | os.PathLike, dest: Path) -> Path:
    """A README.md card beside the export, so that its folder can go to a dataset hub as it
    is (``<name>.README.md`` where a README.md that is not a lenspipe card is there already).
    With it, the per-layer KL of the lenses the workflow evaluated on this store's model and
    corpus, where the store lies where the workflow puts stores."""
    from ..cards import CARD, store_card

    card = dest.parent / CARD
    if card.exists() and "library_name: lenspipe" not in card.read_text()[:200]:
        card = dest.parent / f"{dest.name}.{CARD}"
    from ..paths import LAYER_METRICS, fill

    loc = Path(src).resolve()  # where the workflow puts stores: <data_dir>/stores/<model>/<corpus>/<split>.zarr
    in_layout = len(loc.parents) > 3 and loc.parents[2].name == "stores"
    tables = (
        Path(fill(LAYER_METRICS, data_dir=loc.parents[3], model=loc.parents[1].name, corpus=loc.parents[0].name))
        if in_layout
        else None
    )
    card.write_text(store_card(open_store(src), dest.name, tables))
    return card


def _export_zip(src: str | os.PathLike, tmp: Path) -> None:
    root = Path(src)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != LOCK_NAME)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for p in files:
            z.write(p, p.relative_to(root).as_posix())


def _export_hdf5(src: str | os.PathLike, tmp: Path) -> None:
    import h5py

    store = open_store(src)  # str, not Path: a URL stays a URL
    p = store.params
    records = [store.location.read_json(record_name(i)) for i in range(p.n_shards)]
    meta = {
        "lenspipe_attrs": json.dumps(store.attrs, default=str),
        "lenspipe_records": json.dumps(records),
        "lenspipe_complete": json.dumps(store.location.read_json(COMPLETE_NAME)),
    }
    with _FailSafeFile(tmp) as sink, h5py.File(sink, "w", libver=("v110", "latest")) as f:
        f.attrs.update(meta)
        f.attrs[H5_META_SHA256] = sha256_json(meta)  # the records' checksums cover the data
        chunk = min(p.chunk_tokens, p.n_tokens)
        # every value array in the storage dtype (states) or float32 (scales): copied bit for bit
        datasets = {}
        for a in p.value_arrays():
            src_array = store.value_arrays[a.name]
            ds = f.create_dataset(
                a.name,
                shape=src_array.shape,
                dtype=src_array.dtype,
                chunks=(1, chunk) if a.is_scale else (1, chunk, p.d_model),
                compression="gzip",
                compression_opts=1,
                shuffle=True,
            )
            if not a.is_scale and p.spec.encoding is not None:
                ds.attrs["encoding"] = p.spec.encoding  # the bits of a dtype h5py does not have
            if not a.is_scale and p.spec.scaled:
                ds.attrs["scale"] = P.POSITIONS[a.position].scale_array  # values = float32(q) * scale[..., None]
            datasets[a.name] = (ds, src_array)
        f.create_dataset("tokens", data=store.tokens().numpy().astype(np.int32))
        with Progress(p.n_tokens, "export hdf5", unit="tok") as bar:
            for i in range(p.n_shards):
                sink.check()  # stop at the first failed write (a full disk)
                s, e = p.shard_span(i)
                for ds, src_array in datasets.values():
                    ds[:, s:e] = src_array[:, s:e]
                bar.update(e - s)


class _FailSafeFile(io.RawIOBase):
    """The file h5py writes through (its ``fileobj`` driver), which never fails a write.

    When HDF5 cannot write (a full disk) and then fails to close the file, h5py crashes
    the process at exit (HDF5 retries the flush: a segfault). So the first OSError is kept
    and every later write is discarded, HDF5 closes cleanly, and the kept error is raised
    on leaving the ``with`` block (the caller deletes the useless file).
    """

    def __init__(self, path: Path):
        # unbuffered: seek never flushes (and fails); closed by close(), the writer outlives a with block
        self._f = open(path, "wb+", buffering=0)  # noqa: SIM115
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, b) -> int:
        return self._f.readinto(b)

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += self._f.write(view[done:])
                return done
            except OSError as e:
                self.error = e
        self._f.seek(len(view), os.SEEK_CUR)  # discarded, as if written
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        try:
            return self._f.truncate(size)
        except OSError as e:
            self.error = self.error or e
            return size if size is not None else self.tell()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def __exit__(self, *exc) -> None:
        self._f.close()
        super().__exit__(*exc)
        if exc[0] is None or isinstance(exc[1], Exception):
            self.check()  # the disk's error, rather than what HDF5 made of the lost writes


# ---------------------------------------------------------------- import


def import_store(src: str | os.PathLike, dest: str | os.PathLike) -> dict:
    """Rebuild a zarr store at ``dest`` from an exported .zip or .h5/.hdf5 file; verify it.

    The source is checked first (a damaged file is named, with what to do), the store is
    built under a temporary name, verified, and only then renamed to ``dest``.
    """
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise StoreError(f"no exported store at {src}")
    if dest.exists():
        raise StoreError(f"{dest} already exists; import into a new path")
    is_zip = zipfile.is_zipfile(src) or (src.suffix == ".zip" and not is_hdf5_file(src))
    if not is_zip and not is_hdf5_file(src):
        raise StoreError(
            f"{src} is neither a zip nor an HDF5 file exported by lenspipe (if it was "
            "downloaded as one, the download is damaged: download it again)"
        )
    verify(src)  # a zip is read in place, an HDF5 file by verify_hdf5: damage is named here
    with output_errors(dest, "the imported store"), atomic_dir(dest) as tmp, _named(tmp, dest):
        if is_zip:
            with zipfile.ZipFile(src) as z:
                z.extractall(tmp)
        else:
            _import_hdf5(src, tmp)
        summary = verify(tmp)  # before the rename: a bad copy never appears at dest
    return summary | {"path": str(dest.absolute())}


@contextlib.contextmanager
def _named(tmp: Path, dest: Path):
    """A StoreError about the temporary store names ``dest`` (the path the user gave)."""
    try:
        yield
    except StoreError as e:
        text = str(e).replace(os.path.abspath(tmp), str(dest)).replace(str(tmp), str(dest))
        raise type(e)(text) from e


def _import_hdf5(src: Path, dest: Path) -> None:
    """Rewrite an HDF5 export (already verified) as a zarr store at ``dest``."""
    import h5py

    with h5py.File(src, "r") as f:
        attrs, records = json.loads(f.attrs["lenspipe_attrs"]), json.loads(f.attrs["lenspipe_records"])
        params = attrs["params"]
        names = [a.name for a in StoreParams(**params).value_arrays()]
        with (
            StoreWriter.open(dest, **params, provenance=attrs["provenance"]) as w,
            Progress(params["n_tokens"], "import hdf5", unit="tok") as bar,
        ):
            for s in range(0, params["n_tokens"], params["shard_tokens"]):
                e = min(s + params["shard_tokens"], params["n_tokens"])
                values = {name: f[name][:, s:e] for name in names}
                w.write_stored(values.pop("resid"), f["tokens"][s:e], values.pop("scale", None), **values)
                bar.update(e - s)
    loc = open_store(dest).location
    mine = [loc.read_json(record_name(i)) for i in range(len(records))]
    keys = [k for k in records[0] if k.endswith("xxh3")] if records else []
    for theirs, ours in zip(records, mine):
        if any(theirs[k] != ours[k] for k in keys):
            raise StoreError(
                f"imported shard {theirs['shard']} differs from the exported one; "
                f"{src} is damaged or was not written by this lenspipe"
            )
