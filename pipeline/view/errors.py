"""The explorer's answers to a bad request: a status code and one message, never a traceback."""

from __future__ import annotations

from ..errors import LenspipeError


class ViewError(LenspipeError):
    """A request the explorer cannot answer; ``status`` is its HTTP status code."""

    status = 400


class BadRequest(ViewError):
    """Malformed input: a missing field, a value out of range, a prompt too long."""


class NotFound(ViewError):
    """No such run, token or file (or a file outside the data directory)."""

    status = 404
