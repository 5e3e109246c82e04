"""Shared CLI plumbing: error reporting to stderr and the exit-code convention.

Exit codes: 0 success, 1 some inputs failed, 2 usage error (bad option or file), 130 interrupted,
141 the reader of stdout went away (a broken pipe).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, ParamSpec, TypeVar

import typer

from sdltag.errors import SdltagError

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def complete_model_dir(incomplete: str) -> list[str]:
    """Shell completion for ``--model``: folders under the typed prefix, model folders first.

    A folder holding a ``manifest.json`` is a model folder; other folders are offered too
    (with a trailing slash) so the user can walk down to one.
    """
    import os

    head, _, tail = incomplete.rpartition("/")
    base = head or ("/" if incomplete.startswith("/") else ".")
    try:
        entries = sorted(
            (e for e in os.scandir(os.path.expanduser(base)) if e.name.startswith(tail)), key=lambda e: e.name
        )
    except OSError:
        return []
    models, folders = [], []
    for entry in entries:
        if entry.name.startswith(".") and not tail.startswith("."):
            continue
        try:
            if not entry.is_dir():
                continue
        except OSError:
            continue
        shown = f"{head}/{entry.name}" if head or incomplete.startswith("/") else entry.name
        if os.path.isfile(os.path.join(entry.path, "manifest.json")):
            models.append(shown)
        else:
            folders.append(shown + "/")
    return models + folders


BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a tool a closed pipe ended
# `--layout` of train and eval: the folder layouts of sdltag.datasets.FORMATS and auto-detection (written out here
# so that starting the CLI does not import the dataset readers; a test checks the two agree)
LAYOUTS = ("auto", "manifest", "sidecar", "folders", "xmp")


def _discard_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush does not fail on the closed pipe."""
    import os

    try:
        fd = sys.stdout.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
    except (AttributeError, OSError, ValueError):
        return
    try:
        os.dup2(null, fd)
    except OSError:
        pass
    finally:
        os.close(null)


def error(message: str) -> None:
    """One line on stderr, prefixed so it stands out in a pipeline's output."""
    print(f"sdltag: error: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"sdltag: warning: {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    print(f"sdltag: {message}", file=sys.stderr, flush=True)


def install_sigterm() -> None:
    """``kill`` ends the run like Ctrl-C: the index keeps every finished batch."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        pass


def read_stdin_paths(null: bool, stream: IO[bytes] | None = None) -> list[Path]:
    """Paths from stdin, newline- (or with ``null`` NUL-) separated; bytes kept exact via ``os.fsdecode``."""
    import os

    data = (stream or sys.stdin.buffer).read()
    paths = []
    for part in data.split(b"\0") if null else data.split(b"\n"):
        if not null:
            part = part.rstrip(b"\r")
        if part:
            paths.append(Path(os.fsdecode(part)))
    return paths


def expand_stdin(paths: list[Path], null: bool) -> list[Path]:
    """``paths`` with each ``-`` replaced by the paths read from stdin."""
    inputs: list[Path] = []
    for path in paths:
        inputs.extend(read_stdin_paths(null) if str(path) == "-" else [path])
    return inputs


def merge_alias(value: T, alias: T | None) -> T:
    """A hidden old spelling of an option merged into the real one: the alias's value when it is given."""
    return value if alias is None else alias


def human_size(size: int) -> str:
    """Bytes as people read them: ``512 B``, ``1.5 KiB``, ``2.0 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def cli_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn ``SdltagError`` into one stderr line and its exit code; Ctrl-C into exit 130."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except SdltagError as exc:
            error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            error("interrupted")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # The reader went away (`| head -1`): stop quietly, like a tool that SIGPIPE ends.
            _discard_stdout()
            raise typer.Exit(BROKEN_PIPE_EXIT) from None

    return wrapper
