"""Shared CLI plumbing: error reporting to stderr and the exit-code convention.

Exit codes: 0 success, 1 some inputs failed, 2 usage error (bad option or file).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from sdltag.errors import SdltagError

F = TypeVar("F", bound=Callable[..., Any])


def error(message: str) -> None:
    """One line on stderr, prefixed so it stands out in a pipeline's output."""
    print(f"sdltag: error: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"sdltag: warning: {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    print(f"sdltag: {message}", file=sys.stderr, flush=True)


def cli_errors(func: F) -> F:
    """Turn ``SdltagError`` into one stderr line and its exit code; Ctrl-C into exit 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SdltagError as exc:
            error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            error("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
