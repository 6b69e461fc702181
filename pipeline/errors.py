"""User-facing errors.

A :class:`LenspipeError` is a mistake the user can fix (bad config, missing model,
corrupt store). The CLI and the stage scripts print its message and exit with status 2,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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


#: errno values meaning "the disk (or the user's quota) is full".
DISK_FULL_ERRNOS = frozenset({28, 122})  # ENOSPC, EDQUOT (Linux numbering)


def disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def disk_full_message(e: OSError, what: str) -> str:
    where = f" ({e.filename})" if e.filename else ""
    return (f"no space left on the device while writing {what}{where}: free some space or "
            "point data_dir at a larger disk, then re-run; work already completed is kept "
            "and nothing half-written is taken as finished")
