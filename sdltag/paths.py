"""Where sdltag keeps its files: the label-vector cache and the image index.

``SDLTAG_HOME`` (if set) holds both, as ``$SDLTAG_HOME/cache`` and
``$SDLTAG_HOME/data``; otherwise the platform's user cache and data folders
(platformdirs) are used. Command-line options (``--cache-dir``, ``--index``)
override both.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

APP_NAME = "sdltag"


def _home() -> Path | None:
    home = os.environ.get("SDLTAG_HOME")
    return Path(home).expanduser() if home else None


def cache_dir(override: Path | None = None) -> Path:
    """The label-embedding cache folder (not created here)."""
    if override is not None:
        return Path(override).expanduser()
    home = _home()
    if home is not None:
        return home / "cache"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir(APP_NAME))


def data_dir() -> Path:
    """The folder holding the default image index (not created here)."""
    home = _home()
    if home is not None:
        return home / "data"
    from platformdirs import user_data_dir

    return Path(user_data_dir(APP_NAME))


def default_index_path() -> Path:
    return data_dir() / "index.sqlite3"


@contextmanager
def atomic_write(path: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write ``path`` through a temporary file in the same folder, then rename over it.

    Readers see the old file or the whole new one, never a partial write; on an
    exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = "b" in mode
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else "") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            try:
                os.chmod(tmp, path.stat().st_mode & 0o777)
            except OSError:
                pass
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
