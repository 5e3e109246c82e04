"""``--exclude GLOB`` (``tag``, ``train``, ``eval``): which found image files to leave out.

A pattern is a shell glob (``*``, ``?``, ``[abc]``; ``*`` also matches ``/``), compared
case-insensitively (as sdltag compares extensions) with, for a file found in an input
folder:

- its path relative to that folder, with ``/`` separators (``2024/exports/a.jpg``),
- the same with a leading ``/`` (``/2024/exports/a.jpg``), so ``/exports/*`` matches only
  at the top of the folder and ``*/exports/*`` at any depth, the top included,
- its file name (``a.thumb.jpg``).

A file named on the command line (or on stdin) is compared with its name and with the
path as given. A file that any pattern matches is not tagged (nor trained or evaluated on).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable

from sdltag.errors import SdltagError


class Excluder:
    """The ``--exclude`` patterns, compiled into one case-insensitive expression."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = [str(p) for p in patterns]
        for pattern in self.patterns:
            if not pattern.strip():
                raise SdltagError("--exclude '': the pattern is empty. Give a glob, e.g. --exclude '*/exports/*'.")
        joined = "|".join(f"(?:{fnmatch.translate(p.replace(os.sep, '/'))})" for p in self.patterns)
        self._regex = re.compile(joined, re.IGNORECASE) if self.patterns else None

    def __bool__(self) -> bool:
        return self._regex is not None

    def excluded(self, path: str, root: str | None = None) -> bool:
        """Whether ``path`` (found under the input folder ``root``, or named directly when None) is left out."""
        if self._regex is None:
            return False
        match = self._regex.match
        if match(os.path.basename(path)):
            return True
        if root is None:
            return bool(match(path.replace(os.sep, "/")))
        rel = relative_to(path, root)
        if rel is None:
            return bool(match(path.replace(os.sep, "/")))
        return bool(match(rel) or match("/" + rel))


def relative_to(path: str, root: str) -> str | None:
    """``path`` relative to the folder ``root`` with ``/`` separators; None when it is not inside it."""
    base = root.rstrip(os.sep) + os.sep
    if not path.startswith(base):
        path, base = os.path.abspath(path), os.path.abspath(root).rstrip(os.sep) + os.sep
        if not path.startswith(base):
            return None
    return path[len(base) :].replace(os.sep, "/")
