"""Logging and error handling shared by the CLI and the Snakemake stage scripts."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import LenspipeError, disk_full, disk_full_message

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when given, to a Snakemake rule's log file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :class:`LenspipeError` into one clear message and exit status 2."""
    try:
        yield
    except LenspipeError as e:
        _report(str(e), e.exit_code)
    except OSError as e:
        if not disk_full(e):
            raise  # anything else is a bug or an environment problem worth a traceback
        _report(disk_full_message(e, "an output"), 2)


def _report(message: str, code: int) -> None:
    # Once on stderr; the rule's log file (if any) gets it too, but not a second copy
    # through the stderr log handler.
    record = logging.LogRecord("lenspipe", logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"lenspipe: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run_stage(snakemake, fn: Callable[[], object]) -> None:
    """Body of every ``stages/*.py`` script: log to the rule's log, import the config's
    plugins, give torch the rule's threads, report user errors as one message."""
    from .allocator import keep_freed_memory
    from .lens.kinds import load_plugins

    keep_freed_memory()  # before the first large tensor
    setup_logging(snakemake.log[0] if len(snakemake.log) else None)
    # torch would take every core of the node; the rule asked for `threads`. A stage that
    # never imports torch (report, verify) does not pay its ~2-4 s import for this: torch
    # reads OMP_NUM_THREADS when it is first imported.
    os.environ["OMP_NUM_THREADS"] = str(snakemake.threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(snakemake.threads)
    with user_errors():
        load_plugins(snakemake.config.get("plugins"))  # before any param names a kind they add
        fn()
