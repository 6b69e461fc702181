"""User-facing errors.

A :class:`LenspipeError` is a mistake the user can fix (bad config, missing model,
corrupt store). The CLI and the stage scripts print its message and exit with status 2,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


class LenspipeError(Exception):
    """A problem with the user's input or data, reported as one clear message."""

    exit_code = 2


class ConfigError(LenspipeError):
    """The configuration is invalid or inconsistent."""


class ModelNotAvailable(LenspipeError):
    """A model could not be found (offline, wrong id, missing path)."""


class CorpusError(LenspipeError):
    """The corpus is missing, empty, or too short for the requested packing."""


class StoreError(LenspipeError):
    """An activation store is missing, incomplete, incompatible or corrupt."""


class UnsupportedModel(LenspipeError):
    """Model surgery could not locate a required part of the model."""


class OutputError(LenspipeError):
    """An output cannot be written: an unwritable location or a full disk."""


#: errno values meaning "the disk (or the user's quota) is full".
DISK_FULL_ERRNOS = frozenset({28, 122})  # ENOSPC, EDQUOT (Linux numbering)

#: errno values meaning "nothing can be created at this location": permissions, a read-only
#: filesystem, or a pseudo-filesystem such as /proc that refuses new files (ENOENT there,
#: although the parent exists: callers create missing parents first).
UNWRITABLE_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EFBIG}
)


def disk_full(e: BaseException) -> bool:
    if isinstance(e, (RuntimeError, ValueError)):
        # zarrs (Rust) reports an OS error as "... (os error 28)", TensorStore (a ValueError)
        # as "... [os_error_code='28']"
        text = str(e)
        return any(f"(os error {n})" in text or f"os_error_code='{n}'" in text for n in DISK_FULL_ERRNOS)
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def disk_full_message(e: BaseException, what: str) -> str:
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return (
        f"no space left on the device while writing {what}{where}: free some space or "
        "point data_dir at a larger disk, then re-run; work already completed is kept "
        "and nothing half-written is taken as finished"
    )


@contextlib.contextmanager
def output_errors(dest: str | os.PathLike, what: str) -> Iterator[None]:
    """Report a full disk or an unwritable location while writing ``dest`` as an OutputError.

    Only for code that writes ``dest`` under a temporary name (and reads inputs already
    checked), removing the temporary on failure: other OSErrors keep their traceback.
    A StoreError caused by a full disk (the store writer's) is reworded the same way.
    """
    try:
        yield
    except (OSError, StoreError) as e:
        # e.filename is often our temporary name, which is gone by now: name dest instead.
        if any(disk_full(c) for c in _causes(e)):
            raise OutputError(
                f"no space left on the device while writing {what} {dest}: free some "
                "space, then re-run; nothing half-written was left behind"
            ) from e
        if isinstance(e, StoreError):
            raise
        if e.errno in UNWRITABLE_ERRNOS:
            # os.strerror: h5py's own strerror is a page of HDF5 internals
            raise OutputError(
                f"cannot write {what} {dest} ({os.strerror(e.errno)}); choose a location you can write to"
            ) from e
        raise


def _causes(e: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:  # a cause chain can loop back on itself
        seen.add(id(e))
        yield e
        e = e.__cause__
