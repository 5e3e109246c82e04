"""Where sdltag keeps its files: the label-vector cache and the image index.

``SDLTAG_HOME`` (if set) holds both, as ``$SDLTAG_HOME/cache`` and
``$SDLTAG_HOME/data``; otherwise the platform's user cache and data folders
(platformdirs) are used. Command-line options (``--cache-dir``, ``--index``)
override both.
"""

from __future__ import annotations

import errno
import io
import os
import re
import secrets
import stat
import sys
import threading
import time
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


# Temporary files of ``atomic_write``: ``.NAME.sdltag-tmp-PID-XXXXXXXX`` beside NAME. Only names of
# exactly this shape are ever cleaned up (see ``remove_stale_temps``).
TEMP_MARK = ".sdltag-tmp-"
STALE_DEAD_SECONDS = 2.0  # a temp of a process that has ended, older than this, is debris
STALE_ANY_SECONDS = 24 * 3600.0  # any temp this old is debris (its PID may have been reused)
_TEMP_TAIL = re.compile(r"(?P<pid>[0-9]{1,10})-[0-9a-f]{8}")


def temp_name(name: str, pid: int | None = None) -> str:
    """The name of a temporary file ``atomic_write`` creates for the output ``name``."""
    return f".{name}{TEMP_MARK}{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}"


class UnreadableFile(Exception):
    """Why ``read_regular_file`` refused a file: ``kind`` is ``os`` (an OS error, ``reason`` its text),
    ``special`` (not a regular file; ``opened`` says whether it was caught only after opening) or
    ``large`` (over the cap; ``size`` is None when it grew past it while being read)."""

    def __init__(self, kind: str, reason: str = "", *, opened: bool = False, size: int | None = None) -> None:
        super().__init__(kind, reason)
        self.kind, self.reason, self.opened, self.size = kind, reason, opened, size


def read_regular_file(path: Path, max_bytes: int) -> bytes | None:
    """The bytes of ``path``, None when it does not exist; raises ``UnreadableFile`` otherwise.

    Only regular files are read: a FIFO, device or folder is refused before it is opened (opening
    a FIFO blocks until a writer comes), and the descriptor is opened non-blocking and checked
    again, for a file swapped in between. More than ``max_bytes`` is refused, also when the file
    grows while it is read.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnreadableFile("os", str(exc.strerror or exc)) from None
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableFile("special")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnreadableFile("os", str(exc.strerror or exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile("special", opened=True)
        if info.st_size > max_bytes:
            raise UnreadableFile("large", size=info.st_size)
        chunks = []
        total = 0
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except OSError as exc:
                raise UnreadableFile("os", str(exc.strerror or exc)) from None
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise UnreadableFile("large")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still run (a leftover file of a live process is not debris)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or we cannot tell: keep its file)
    return True


def _temp_candidates(folder: Path) -> dict[str, list[str]]:
    """Names in ``folder`` shaped like our temporary files, by the output name they belong to."""
    found: dict[str, list[str]] = {}
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                mark = name.rfind(TEMP_MARK)
                if name.startswith(".") and mark > 1 and _TEMP_TAIL.fullmatch(name[mark + len(TEMP_MARK) :]):
                    found.setdefault(name[1:mark], []).append(name)
    except OSError:
        pass
    return found


# Folders already listed by this process: a folder of 10,000 photos is listed once, not once per sidecar.
_LISTED: dict[str, dict[str, list[str]]] = {}
_LISTED_LOCK = threading.Lock()


def remove_stale_temps(path: Path, now: float | None = None, *, listed_once: bool = False) -> list[Path]:
    """Remove temporary files an interrupted ``atomic_write`` of ``path`` left behind; returns them.

    Only regular files named ``.NAME.sdltag-tmp-PID-XXXXXXXX`` (NAME being ``path``'s own name)
    are candidates, and of those only the ones whose process is no longer running and that are
    older than a few seconds, or that are older than a day (a PID reused since). With
    ``listed_once``, the folder is listed once per process and remembered.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if listed_once:
        key = os.path.abspath(folder)
        with _LISTED_LOCK:
            if key not in _LISTED:
                _LISTED[key] = _temp_candidates(folder)
            names = _LISTED[key].pop(path.name, [])
    else:
        names = _temp_candidates(folder).get(path.name, [])
    now = time.time() if now is None else now
    removed: list[Path] = []
    for name in names:
        match = _TEMP_TAIL.fullmatch(name[len(path.name) + 1 + len(TEMP_MARK) :])
        if match is None:
            continue
        candidate = folder / name
        try:
            st = os.lstat(candidate)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        age = now - st.st_mtime
        if not ((age > STALE_DEAD_SECONDS and not pid_alive(int(match.group("pid")))) or age > STALE_ANY_SECONDS):
            continue
        try:
            os.unlink(candidate)
        except OSError:
            continue
        removed.append(candidate)
    return removed


_UMASK: int | None = None


def _umask_from_proc() -> int | None:
    """The umask Linux reports in /proc/self/status; None where it does not."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def _umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = _umask_from_proc()
        if _UMASK is None:
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def _keep_owner_and_mode(fd: int, original: os.stat_result | None) -> None:
    """Give the new file the original's owner and group (where permitted) and permission bits."""
    if original is None:
        os.fchmod(fd, 0o666 & ~_umask())
        return
    current = os.fstat(fd)
    if hasattr(os, "fchown") and (current.st_uid, current.st_gid) != (original.st_uid, original.st_gid):
        try:
            os.fchown(fd, original.st_uid, original.st_gid)
        except OSError:
            try:  # an owner may still hand the file to one of their own groups
                os.fchown(fd, -1, original.st_gid)
            except OSError:
                pass
    os.fchmod(fd, stat.S_IMODE(original.st_mode) & 0o777)


def _text(raw: IO[bytes], mode: str, encoding: str | None) -> IO:
    if "b" in mode:
        return raw
    return io.TextIOWrapper(raw, encoding=encoding or "utf-8", newline="")


@contextmanager
def _direct(handle: IO[bytes], mode: str, encoding: str | None, close: bool) -> Iterator[IO]:
    stream = _text(handle, mode, encoding)
    try:
        yield stream
        stream.flush()
    finally:
        if isinstance(stream, io.TextIOWrapper):
            stream.detach()
        if close:
            handle.close()


@contextmanager
def atomic_write(path: Path | str, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write ``path`` so that a reader sees the old content or the whole new one, never a partial write.

    A regular file is written through a temporary file in the same folder (named
    ``.NAME.sdltag-tmp-PID-XXXXXXXX``), flushed to disk and renamed over it; the new file keeps
    the old one's permission bits and, where permitted, its owner and group (a new file gets
    0o666 less the umask). On an exception the temporary file is removed and ``path`` is left
    as it was. Temporary files an earlier, killed run left for the same ``path`` are removed.

    - ``"-"`` writes to standard output.
    - A symbolic link is written through: its target gets the new content, the link stays.
    - A FIFO, character or block device (``/dev/null``, a terminal, a pipe) is written
      directly, never replaced.
    - A file with more than one hard link is written in place, so every link still shows
      the same file: the content is first written whole to a temporary file (a full disk
      or a failure while rendering leaves the original untouched), the space it needs is
      reserved, and only then copied over the original. This is the one case that is not
      atomic: a crash during that copy can leave a partial file.
    """
    if str(path) == "-":
        sys.stdout.flush()
        with _direct(sys.stdout.buffer, mode, encoding, close=False) as stream:
            yield stream
        return
    path = Path(path)
    if path.is_symlink():
        target = Path(os.path.realpath(path))
    else:
        target = path
        target.parent.mkdir(parents=True, exist_ok=True)
    try:
        original: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        original = None
    if original is not None:
        if stat.S_ISDIR(original.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(original.st_mode):
            with _direct(open(target, "wb"), mode, encoding, close=True) as stream:  # noqa: SIM115
                yield stream
            return
    remove_stale_temps(target, listed_once=True)
    tmp = target.parent / temp_name(target.name)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with os.fdopen(fd, "w+b") as raw:
            with _direct(raw, mode, encoding, close=False) as stream:
                yield stream
            raw.flush()
            if original is not None and original.st_nlink > 1:
                _copy_in_place(raw, target)
            else:
                os.fsync(raw.fileno())
                _keep_owner_and_mode(raw.fileno(), original)
        if original is not None and original.st_nlink > 1:
            os.unlink(tmp)
        else:
            # No fsync of the folder: after a power cut the old file or the new one is there, both whole.
            os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _copy_in_place(source: IO[bytes], target: Path) -> None:
    """Copy ``source`` (the whole new content) over ``target``, keeping its inode (and so its hard links)."""
    size = source.seek(0, os.SEEK_END)
    source.seek(0)
    fd = os.open(target, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        old_size = os.fstat(fd).st_size
        if size > old_size and hasattr(os, "posix_fallocate"):
            try:  # reserve the space first: a full disk is found before any byte changes
                os.posix_fallocate(fd, old_size, size - old_size)
            except OSError as exc:
                os.ftruncate(fd, old_size)
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
                    raise
        while chunk := source.read(1 << 20):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
