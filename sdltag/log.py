"""Library messages: everything in sdltag logs through ``logging.getLogger("sdltag")``.

Library modules write ``logging.getLogger(__name__).warning("...")``; they never print. The CLI
calls ``install_cli_handler()`` once, which prints each record as one stderr line, as sdltag's
messages have always looked::

    sdltag: warning: photos/a.jpg: cannot decode (truncated file), skipped
    sdltag: error: ...
    sdltag: ...              (info; hidden by ``set_quiet(True)``, i.e. a command's -q)

The line goes to ``sys.stderr`` as it is *at emit time* (a test runner may swap it), or to a writer
set with ``redirect`` (a progress bar that must print lines above itself). A program that uses
sdltag as a library configures ``logging`` as it likes (or gathers the messages with ``collect``);
with no configuration at all Python prints warnings and errors bare on stderr.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

LOGGER_NAME = "sdltag"
logger = logging.getLogger(LOGGER_NAME)

_PREFIX = {logging.ERROR: "sdltag: error: ", logging.WARNING: "sdltag: warning: "}


class CliHandler(logging.Handler):
    """One ``sdltag: warning: ...`` line per record on the current stderr (or ``write``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.write: Callable[[str], None] | None = None

    def format(self, record: logging.LogRecord) -> str:
        level = logging.ERROR if record.levelno >= logging.ERROR else record.levelno
        return _PREFIX.get(level, "sdltag: ") + record.getMessage()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self.write is not None:
                self.write(line)
            else:
                print(line, file=sys.stderr, flush=True)
        except Exception:  # logging must never end the run; the standard handlers do the same
            self.handleError(record)


def cli_handler() -> CliHandler | None:
    """The handler ``install_cli_handler`` put on the ``sdltag`` logger, if any."""
    return next((h for h in logger.handlers if isinstance(h, CliHandler)), None)


def install_cli_handler(quiet: bool = False) -> CliHandler:
    """Print sdltag's log records as the CLI's stderr lines (idempotent: one handler at most).

    Records still propagate, so a test's log capture or an embedding program's handlers see them too.
    """
    handler = cli_handler()
    if handler is None:
        handler = CliHandler()
        logger.addHandler(handler)
    set_quiet(quiet)
    return handler


def set_quiet(quiet: bool) -> None:
    """``-q``: info lines are dropped; warnings and errors are always shown."""
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


class _Collector(logging.Handler):
    def __init__(self, messages: list[str], level: int) -> None:
        super().__init__(level)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def collect(level: int = logging.WARNING) -> Iterator[list[str]]:
    """The messages of sdltag's records at ``level`` or above, from any thread, while inside.

    For a program that wants the warnings as data, and for tests::

        with log.collect() as warnings:
            read_labeled_dir(folder)
    """
    messages: list[str] = []
    handler = _Collector(messages, level)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def redirect(write: Callable[[str], None]) -> Iterator[None]:
    """Send the CLI handler's lines to ``write`` for a while (e.g. a progress bar's console)."""
    handler = cli_handler()
    if handler is None:
        yield
        return
    previous, handler.write = handler.write, write
    try:
        yield
    finally:
        handler.write = previous
