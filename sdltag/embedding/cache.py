"""The on-disk label-vector cache: one SQLite file keyed by (embedder id, exact text).

Why SQLite in WAL mode: every write is one transaction, so a crash or Ctrl-C leaves
the previous state, never a half-written vector; readers never block the writer and
two sdltag processes writing at once are serialised by SQLite's lock with a busy
timeout instead of overwriting each other (append-only shards renamed into place
would work too, but need their own compaction and lookup index; sqlite3 ships with
Python and the image index already uses it). A file that SQLite cannot read
(truncated, overwritten, not a database) is renamed aside with one warning and a
fresh cache is started: it is a cache, so nothing but time is lost. Rows whose
vector has the wrong length or is not finite count as misses and are re-embedded.

The cache folder also holds the memoised weight hashes of text models (keyed by
path, size and mtime, so the 90 MB safetensors file is hashed once) and the exported
ONNX fast paths under ``text-models/``. A process killed while exporting or optimising
a text model leaves a hidden staging folder of about 90 MB; the next process to open
the cache removes those (``remove_debris``: only folders of exactly sdltag's staging
names and contents, whose process has ended).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from sdltag.errors import SdltagError
from sdltag.paths import cache_dir as resolve_cache_dir
from sdltag.paths import pid_alive
from sdltag.sqlitedb import (
    NewerSchemaError,
    applied_migrations,
    connect,
    looks_corrupt,
    migrate,
    quick_check,
    retry_while_busy,
    set_aside,
)

_T = TypeVar("_T")
logger = logging.getLogger(__name__)

DB_FILE = "labels.sqlite3"
FAST_PATH_DIR = "text-models"
BUSY_TIMEOUT_S = 60.0
_CHUNK = 500  # SQLite's default limit on host parameters is 999 (older builds)
# A rowid table, not WITHOUT ROWID: a 384-d vector is 1.5 KB, more than an index b-tree keeps
# in a page, so a WITHOUT ROWID table would spill every row into overflow pages (3x the size).

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    id INTEGER PRIMARY KEY,
    embedder TEXT NOT NULL,
    text TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    created REAL NOT NULL,
    UNIQUE (embedder, text)
);
CREATE TABLE IF NOT EXISTS weight_hashes (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
"""


def _migration_1(conn: sqlite3.Connection) -> None:
    for statement in _statements(_SCHEMA):
        conn.execute(statement)
    # What sdltag before named steps read as its schema version: it can still use the file.
    conn.execute("PRAGMA user_version = 1")


# Named, ordered schema steps (``sdltag.sqlitedb.migrate``); a step is never edited once released.
# A cache from before named steps has step 1's tables: the step only records itself there.
MIGRATIONS = [(1, "create_vectors_and_weight_hashes", _migration_1)]
SCHEMA_VERSION = MIGRATIONS[-1][0]


@dataclass
class CacheStats:
    """What ``sdltag labels cache`` reports."""

    path: Path
    bytes: int
    entries: int
    per_embedder: dict[str, int]
    fast_paths: list[str]


def _safe_name(embedder_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", embedder_id)


# Staging folders a killed process can leave (``sdltag.embedding.st.export_fast_path`` and
# ``sdltag.embedding.onnx_text.OnnxTextEncoder``): ".<fast path>.<pid>.<8 mkdtemp characters>" (before
# the pid was part of the name: without it) in text-models/, and ".optimise.<pid>.<thread>" in a fast path.
_EXPORT_STAGING = re.compile(r"\.[A-Za-z0-9._-]+_sha256_[0-9a-f]{16}\.(?:(?P<pid>[0-9]{1,10})\.)?[a-z0-9_]{8}")
_EXPORT_FILES = frozenset({"text_model.onnx", "tokenizer.json", "meta.json"})
_OPTIMISE_STAGING = re.compile(r"\.optimise\.(?P<pid>[0-9]{1,10})\.[0-9]{1,24}")
_OPTIMISED_FILE = re.compile(r"text_model\.optimized-ort[0-9A-Za-z.+-]*\.onnx(?:\.data)?")
DEBRIS_DEAD_SECONDS = 2.0  # staging of a process that has ended, older than this, is debris
DEBRIS_NO_PID_SECONDS = 3600.0  # staging without a pid in its name: an export takes well under an hour
DEBRIS_ANY_SECONDS = 24 * 3600.0  # any staging this old is debris (its pid may have been reused)


def _is_debris(entry: os.DirEntry, pattern: re.Pattern, allowed: Callable[[str], bool], now: float) -> bool:
    """``entry`` is a real folder named by ``pattern``, holding only files ``allowed`` names, whose
    process has ended (or which is too old to belong to a running one)."""
    match = pattern.fullmatch(entry.name)
    if match is None:
        return False
    try:
        if not entry.is_dir(follow_symlinks=False):
            return False
        age = now - entry.stat(follow_symlinks=False).st_mtime
        with os.scandir(entry.path) as inside:
            for item in inside:
                if not item.is_file(follow_symlinks=False) or not allowed(item.name):
                    return False
    except OSError:
        return False
    pid = match.group("pid")
    if age > DEBRIS_ANY_SECONDS:
        return True
    if pid is None:
        return age > DEBRIS_NO_PID_SECONDS
    return age > DEBRIS_DEAD_SECONDS and int(pid) != os.getpid() and not pid_alive(int(pid))


def _optimise_debris(fast_path: str, now: float) -> list[Path]:
    """The staging folders of killed optimisations inside one fast-path folder."""
    try:
        with os.scandir(fast_path) as inside:
            return [
                Path(e.path)
                for e in inside
                if _is_debris(e, _OPTIMISE_STAGING, lambda n: _OPTIMISED_FILE.fullmatch(n) is not None, now)
            ]
    except OSError:
        return []


def remove_debris(directory: Path, now: float | None = None) -> list[Path]:
    """Remove the staging folders killed exports and optimisations left in ``directory``/text-models.

    Only folders whose name and contents are exactly those sdltag's staging has are looked
    at, and only those of processes that have ended are removed. Returns what was removed.
    """
    now = time.time() if now is None else now
    root = Path(directory) / FAST_PATH_DIR
    found: list[Path] = []
    try:
        with os.scandir(root) as entries:
            top = list(entries)
    except OSError:
        return found
    for entry in top:
        if _is_debris(entry, _EXPORT_STAGING, _EXPORT_FILES.__contains__, now):
            found.append(Path(entry.path))
        elif not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
            found.extend(_optimise_debris(entry.path, now))
    removed = []
    for folder in found:
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed


class LabelVectorCache:
    """Vectors by (embedder id, text). Opened on first use; safe to share between processes."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = resolve_cache_dir(directory)
        self.path = self.directory / DB_FILE
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()  # one connection, shared by the threads of one process
        self.persistent = True

    # -- connection, schema, corruption ---------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        remove_debris(self.directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._conn = retry_while_busy(self._open_checked)
        except sqlite3.DatabaseError as exc:
            if looks_corrupt(exc):
                self._set_aside(str(exc))
                self._conn = retry_while_busy(self._open_checked)
            elif _is_access_problem(exc):
                return self._in_memory(f"cannot write the label cache {self.path} ({exc})")
            else:
                raise _busy_error(self.path, exc) from None
        except OSError as exc:
            return self._in_memory(f"cannot use the label cache folder {self.directory} ({exc.strerror or exc})")
        return self._conn

    def _open_checked(self) -> sqlite3.Connection:
        conn = connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, shared=True)
        try:
            applied = applied_migrations(conn)  # raises on a file that is not a database
            if not applied and conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                # Before the first table exists: 16 KiB pages hold ~10 vectors of 384-d each
                # (4 KiB pages would hold 2 and waste half of every page).
                conn.execute("PRAGMA page_size = 16384")
            # WAL is a property of the file: only its creator switches it (the switch needs an
            # exclusive lock that SQLite refuses at once, busy timeout or not, while another
            # process reads the new file, hence also the retry in ``_connect``, see ``sdltag.sqlitedb``).
            if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            result = quick_check(conn, 1)
            if result != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {result}")
            migrate(conn, MIGRATIONS)
        except NewerSchemaError as exc:
            conn.close()
            return self._in_memory(
                f"the label cache {self.path} was written by a newer sdltag (schema {exc.newest}); "
                "upgrade sdltag or pass --cache-dir to use another folder"
            )
        except BaseException:
            conn.close()
            raise
        return conn

    def _in_memory(self, reason: str) -> sqlite3.Connection:
        logger.warning(f"{reason}; label vectors are kept in memory for this run only")
        self.persistent = False
        conn = connect(":memory:", timeout=BUSY_TIMEOUT_S, isolation_level=None, shared=True)
        migrate(conn, MIGRATIONS)
        self._conn = conn
        return conn

    def _set_aside(self, reason: str) -> None:
        """Rename a corrupt database (and its WAL files) aside, with one warning."""
        self.close()
        aside = set_aside(self.path)
        if aside is None:
            return  # another process already set it aside
        logger.warning(
            f"the label cache {self.path} is corrupt ({reason}); moved it to {aside.name} and started a new one "
            "(labels will be embedded again)"
        )

    def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` on the connection; a corruption found mid-run sets the file aside and retries once."""
        with self._lock:
            conn = self._connect()
            try:
                return retry_while_busy(lambda: work(conn))
            except sqlite3.DatabaseError as exc:
                if not looks_corrupt(exc) or not self.persistent:
                    raise _busy_error(self.path, exc) from None
                self._set_aside(str(exc))
                return work(self._connect())

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    # -- vectors ------------------------------------------------------------------------------

    def get_many(self, embedder_id: str, texts: Sequence[str], dim: int | None = None) -> dict[str, np.ndarray]:
        """The cached vectors among ``texts`` (missing or damaged entries are simply absent)."""
        unique = list(dict.fromkeys(texts))

        def work(conn: sqlite3.Connection) -> dict[str, np.ndarray]:
            found: dict[str, np.ndarray] = {}
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT text, dim, vector FROM vectors WHERE embedder = ? AND text IN ({marks})",
                    [embedder_id, *chunk],
                )
                for text, row_dim, blob in rows:
                    vector = _decode(blob, row_dim, dim)
                    if vector is not None:
                        found[text] = vector
            return found

        return self._run(work)

    def put_many(self, embedder_id: str, items: Iterable[tuple[str, np.ndarray]]) -> int:
        """Store vectors in one transaction (an existing entry is replaced). Returns how many."""
        now = time.time()
        rows = []
        for text, vector in items:
            vector = np.ascontiguousarray(vector, dtype="<f4").reshape(-1)
            rows.append((embedder_id, text, int(vector.size), vector.tobytes(), now))
        if not rows:
            return 0

        def work(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT OR REPLACE INTO vectors (embedder, text, dim, vector, created) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return len(rows)

        return self._run(work)

    # -- weight hashes --------------------------------------------------------------------------

    def get_file_hash(self, path: Path, size: int, mtime_ns: int) -> str | None:
        def work(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT sha256 FROM weight_hashes WHERE path = ? AND size = ? AND mtime_ns = ?",
                (str(path), size, mtime_ns),
            ).fetchone()
            return str(row[0]) if row else None

        return self._run(work)

    def put_file_hash(self, path: Path, size: int, mtime_ns: int, sha256: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO weight_hashes (path, size, mtime_ns, sha256) VALUES (?, ?, ?, ?)",
                (str(path), size, mtime_ns, sha256),
            )

        self._run(work)

    # -- fast paths, stats, clearing ------------------------------------------------------------

    def fast_path_dir(self, embedder_id: str) -> Path:
        """Where the ONNX export of ``embedder_id`` lives."""
        return self.directory / FAST_PATH_DIR / _safe_name(embedder_id)

    def stats(self) -> CacheStats:
        """Location, size on disk (database, WAL and fast paths) and entry counts; creates nothing."""
        per_embedder: dict[str, int] = {}
        if self.path.exists():
            rows = self._run(
                lambda conn: conn.execute("SELECT embedder, COUNT(*) FROM vectors GROUP BY embedder").fetchall()
            )
            per_embedder = {str(e): int(n) for e, n in rows}
        size = 0
        if self.directory.is_dir():
            for root, _dirs, files in os.walk(self.directory):
                for name in files:
                    try:
                        size += os.path.getsize(os.path.join(root, name))
                    except OSError:
                        pass
        fast_root = self.directory / FAST_PATH_DIR
        fast_paths = (
            sorted(p.name for p in fast_root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if fast_root.is_dir()
            else []
        )
        return CacheStats(self.path, size, sum(per_embedder.values()), per_embedder, fast_paths)

    def clear(self) -> int:
        """Delete every cached vector, memoised hash and fast path. Returns the number of vectors removed."""
        entries = self.stats().entries
        self.close()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass
        shutil.rmtree(self.directory / FAST_PATH_DIR, ignore_errors=True)
        return entries


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _decode(blob: bytes, row_dim: int, dim: int | None) -> np.ndarray | None:
    if not isinstance(blob, bytes) or len(blob) != 4 * row_dim or (dim is not None and row_dim != dim):
        return None
    vector = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(vector)) or abs(float(np.linalg.norm(vector)) - 1.0) > 1e-3:
        return None
    return vector


def _busy_error(path: Path, exc: sqlite3.DatabaseError) -> SdltagError:
    return SdltagError(
        f"{path}: the label cache cannot be used ({exc}). If another sdltag is busy with it, retry; "
        "otherwise pass --cache-dir to use another folder.",
        exit_code=1,
    )


def _is_access_problem(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("readonly", "read-only", "unable to open", "permission", "access"))
