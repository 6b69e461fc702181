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
