"""The apps' logging: library and app messages reach the terminal through the "timm_fslt" logger.

The library only ever calls ``logging.getLogger(__name__)`` (a child of "timm_fslt") and never
configures a handler, so a program that imports it decides where its messages go, or silences
them with ``logging.getLogger("timm_fslt").setLevel(logging.WARNING)``.  The command-line apps
are such programs: while one runs, ``app_logging`` puts one handler on "timm_fslt" that writes to
stderr at INFO (WARNING with ``--quiet``), and takes it off again when the app returns, so calling
``demo.main()`` from Python leaves the caller's logging as it was.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

from tqdm.auto import tqdm

LOGGER_NAME = "timm_fslt"


class _StderrHandler(logging.Handler):
    """One line per record on stderr, through ``tqdm.write`` so it never tears a progress bar.

    ``sys.stderr`` is looked up per record rather than kept, so ``contextlib.redirect_stderr`` and
    pytest's capture see the lines.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: a broken stream must not crash the program
            self.handleError(record)


class _Formatter(logging.Formatter):
    """INFO lines as they are; warnings and errors as ``PROG: warning: ...``, like the apps' errors."""

    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno <= logging.INFO:
            return message
        return f"{self.prog}: {record.levelname.lower()}: {message}"


@contextlib.contextmanager
def app_logging(prog: str, quiet: bool = False) -> Iterator[logging.Logger]:
    """While the block runs, "timm_fslt" messages at INFO (WARNING if ``quiet``) go to stderr."""
    if not isinstance(quiet, bool):
        raise TypeError(f"quiet must be True or False, got {quiet!r}")
    logger = logging.getLogger(LOGGER_NAME)
    level = logging.WARNING if quiet else logging.INFO
    handler = _StderrHandler(level)
    handler.setFormatter(_Formatter(prog))
    before = logger.level
    logger.setLevel(level)  # the logger's own level too: with --quiet no INFO record is even made
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)
