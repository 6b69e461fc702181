"""Where a store lives: a local directory, an exported .zip read in place, or an fsspec URL.

:class:`Location` reads the store's sidecar files (progress records, markers, the
manifest) wherever it is, and turns a failed or stalled read into one StoreError.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec

from ..errors import StoreError
from .layout import StoreParams, record_name, shard_files

#: Seconds a remote store may stay silent (connect or read) before the read fails.
URL_TIMEOUT_ENV = "LENSPIPE_URL_TIMEOUT"
DEFAULT_URL_TIMEOUT = 60.0


def url_timeout() -> float:
    return float(os.environ.get(URL_TIMEOUT_ENV, DEFAULT_URL_TIMEOUT))


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options bounding how long a silent server can stall a read.

    fsspec's defaults wait minutes (HTTP) or retry for long (S3); a stalled read should
    fail with a message instead of hanging a Snakemake job until its runtime limit.
    """
    protocol = url.split("://", 1)[0]
    t = url_timeout()
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": t, "read_timeout": t, "retries": {"max_attempts": 2}}}
    return {}


def _timed_out(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, TimeoutError):
            return True
        e = e.__cause__ or e.__context__
    return False


#: What to do about a damaged store or export (every reader's damage message ends with it).
DAMAGED_ADVICE = (
    "the store may be corrupt or its copy incomplete (lenspipe verify checks it): download it again or re-extract it"
)


def read_failure(where: str, e: BaseException, what: str) -> StoreError:
    """A read failure as one message: a timeout says so, else the data may be damaged."""
    if _timed_out(e):
        return StoreError(
            f"reading {where} timed out (no answer within {url_timeout():g} s); check "
            f"the network or the server, or raise {URL_TIMEOUT_ENV} (seconds)"
        )
    return StoreError(f"{what} {where}: {e!r}; {DAMAGED_ADVICE}")


class Location:
    """Where a store lives: a local path or an fsspec URL, for zarr and for sidecar JSON."""

    def __init__(self, path_or_url: str | os.PathLike):
        text = str(path_or_url)
        self.is_url = "://" in text
        self.zarr_store = text if self.is_url else os.path.abspath(text)
        self.options = storage_options(text) if self.is_url else {}
        self.is_zip = not self.is_url and text.endswith(".zip") and os.path.isfile(text)
        self._sizes: dict[str, int] | None = None  # a zip's member sizes, once needed
        if self.is_zip:  # a store exported with `lenspipe export --to zip`, read in place
            self.fs, self.root = _zip_fs(self.zarr_store), ""
        else:
            self.fs, self.root = fsspec.core.url_to_fs(self.zarr_store, **self.options)

    def zarr_target(self):
        """What zarr.open_group gets: a ZipStore for a .zip, else the path or URL."""
        import zarr

        return zarr.storage.ZipStore(self.zarr_store, mode="r") if self.is_zip else self.zarr_store

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}" if self.root else name

    def read_bytes(self, name: str) -> bytes | None:
        """A file of the store, or None if it does not exist."""
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None
        except Exception as e:  # a bad CRC in a zip, a network failure: the data's problem, not a bug
            raise read_failure(f"{self.zarr_store}/{name}", e, "cannot read") from e

    def read_json(self, name: str) -> Any | None:
        data = self.read_bytes(name)
        if data is None:
            return None
        try:
            value = json.loads(data)
        except ValueError as e:
            raise StoreError(f"{self.zarr_store}/{name} is not valid JSON ({e}); {DAMAGED_ADVICE}") from e
        if not isinstance(value, dict):  # every sidecar is an object: anything else is damage
            raise StoreError(f"{self.zarr_store}/{name} is not a JSON object; {DAMAGED_ADVICE}")
        return value

    def load_records(self, params: StoreParams) -> list[dict]:
        """The contiguous prefix of shard records whose spans match the layout."""
        records = []
        for i in range(params.n_shards):
            rec = self.read_json(record_name(i))
            if rec is None or (rec.get("start"), rec.get("stop")) != params.shard_span(i):
                break
            records.append(rec)
        return records

    def missing_shard(self, params: StoreParams, start: int, stop: int) -> str | None:
        """The first shard file of tokens [start, stop) absent (or empty) in a local or zip store.

        zarr reads a missing or empty shard as zeros, silently: a copy cut short must fail
        instead. One stat per shard read (a dict lookup in a zip); remote stores are left
        to verify, which checks every file.
        """
        if self.is_url:
            return None
        if self.is_zip and self._sizes is None:
            self._sizes = {i.filename: i.file_size for i in self.fs.zip.infolist()}
        for i in range(start // params.shard_tokens, -(-stop // params.shard_tokens)):
            for name in shard_files(params, i):
                if not (self._sizes.get(name) if self.is_zip else _file_size(self.path(name))):
                    return name
        return None


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _zip_fs(path: str):
    """fsspec's view of a zip; a file that is no zip (truncated, damaged) is a StoreError."""
    import zipfile

    try:
        # skip_instance_cache: a re-downloaded file under the same name must be read anew.
        fs = fsspec.filesystem("zip", fo=path, skip_instance_cache=True)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise StoreError(
            f"{path} is not a readable zip archive ({e}): the download or copy is "
            "truncated or damaged; download it again, or export it again with "
            "lenspipe export STORE --to zip"
        ) from e
    return fs
