"""Provenance helpers: content hashes, package versions, timestamps, atomic writes."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import LenspipeError

#: Packages whose versions are recorded in every artifact's provenance.
TRACKED_PACKAGES = (
    "lenspipe",
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "zarr",
    "numcodecs",
    "numpy",
    "dask",
    "pyarrow",
    "safetensors",
    "gguf",
    "snakemake",
)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object in canonical form (sorted keys)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def now_utc() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name next to ``final``; rename on success.

    On any error the partial directory is removed, so a later run (or Snakemake) never
    mistakes half-written output for a finished one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        for p in tmp.rglob("*"):
            if p.is_file():
                os.chmod(p, 0o644)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def acquire_lock(path: str | os.PathLike, what: str, error: type[LenspipeError] = LenspipeError) -> int:
    """Exclusive non-blocking flock on ``path``; returns the fd (closing it releases the lock).

    The kernel drops the lock when the process dies, even by SIGKILL, so a crash never
    leaves a stale lock behind. A second writer gets ``error`` naming the holder's pid.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise error(f"another process (pid {holder}) is writing {what}; wait for it to finish or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def exclusive_output(final: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold a lock file next to ``final`` (``.<name>.lock``) while producing it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd = acquire_lock(final.parent / f".{final.name}.lock", f"{what} {final}")
    try:
        yield
    finally:
        os.close(fd)
