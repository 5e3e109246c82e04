"""The image index: one SQLite file of principal-vector matrices, so re-tagging never re-runs the model.

Per image and model: the absolute path, size, mtime (ns), a content hash (xxh3-128)
and the (M, d) float32 matrix the model made, with the model's identity
(``ModelFolder.model_id``). A file whose size and mtime are unchanged is skipped; a
renamed or copied file reuses the matrix of any file with the same hash; another
model has its own rows. Paths are stored as bytes (``os.fsencode``) so names that
are not valid UTF-8 round-trip exactly.

The schema is versioned: ``schema_migrations`` records each named step applied; an
index whose newest step is unknown (written by a newer sdltag) is refused. Writes are
committed in batches, so an interrupted run keeps what it finished.

What the index does with files it did not write, and when things go wrong:

- **Whose file.** sdltag stamps its indexes with an application id in the SQLite
  header (``APPLICATION_ID``); an older index is recognised by its schema. An existing
  file that is neither (a photo, a CSV, another program's database) is refused with
  ``NotAnIndexError`` and never opened by SQLite, moved or written.
- **Damage.** An index of sdltag's that SQLite finds damaged (when opening it, or when
  a query answers "malformed", confirmed by ``PRAGMA quick_check``) is renamed aside
  as ``NAME.corrupt-<time>`` and a new one started, with one warning. A damaged file
  that is not provably sdltag's (no application id, unreadable schema, not in
  sdltag's own data folder) is left alone and refused.
- **Locks.** Another program holding a lock past ``LOCK_SLICE_S`` gets one "waiting"
  line; after ``BUSY_TIMEOUT_S`` the run goes on without writing the index (or
  without reading it, when even reads are locked out), with one warning.
- **Full disk, read-only file or folder.** The first failed write turns the index
  read-only for the rest of the run (one warning); what is stored is still used.
- **Interrupted writes.** A journal left by a killed run is rolled back by SQLite on
  the next open; ``open_readonly`` (``search``, ``tag --dry-run``) does that roll-back
  too, through a short read-write open, instead of failing with "attempt to write a
  readonly database". Rolling back restores the last committed state, it adds nothing.

This module knows sqlite3 and numpy only.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sdltag.errors import SdltagError
from sdltag.hashing import file_hash
from sdltag.sqlitedb import (
    SIDE_FILES,
    NewerSchemaError,
    applied_migrations,
    connect,
    is_busy,
    looks_corrupt,
    migrate,
    quick_check,
    retry_while_busy,
    set_aside,
)

T = TypeVar("T")
logger = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0  # how long a run waits for another program's lock before going on without the index
LOCK_SLICE_S = 2.0  # SQLite's own busy wait per attempt; past it, the run says that it is waiting
APPLICATION_ID = 0x53444C54  # "SDLT": PRAGMA application_id of every index sdltag creates
SQLITE_MAGIC = b"SQLite format 3\x00"
# The objects of sdltag's schema steps: a file without the application id is an sdltag index
# (written before the id existed) only if it holds these and nothing else.
_LEGACY_OBJECTS = frozenset(
    {"schema_migrations", "images", "images_by_hash", "sqlite_autoindex_images_1"}
    | {"matrix_state", "sqlite_autoindex_matrix_state_1"}
    | {f"images_matrix_{event}" for event in ("insert", "replace", "delete", "update")}
)


class NotAnIndexError(SdltagError):
    """``--index`` names an existing file that is not an sdltag index; it was left untouched."""


def _migration_1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE images (
            path       BLOB    NOT NULL,   -- absolute path, os.fsencode
            model_id   TEXT    NOT NULL,   -- ModelFolder.model_id of the model that made the vectors
            size       INTEGER NOT NULL,
            mtime_ns   INTEGER NOT NULL,
            hash       TEXT    NOT NULL,   -- content hash of the file's bytes (see file_hash)
            rows       INTEGER NOT NULL,   -- M
            dim        INTEGER NOT NULL,   -- d
            vectors    BLOB    NOT NULL,   -- (M, d) little-endian float32
            indexed_at REAL    NOT NULL,
            PRIMARY KEY (path, model_id)
        )
        """
    )
    conn.execute("CREATE INDEX images_by_hash ON images (hash, model_id)")


def _migration_2(conn: sqlite3.Connection) -> None:
    """Per model, counters that every change of its rows moves, in the change's own transaction (triggers).

    ``generation`` grows with every insert, update and delete; ``removals`` with every delete,
    update and replacement of an existing row; ``epoch`` is drawn once per model (a new index gets
    new ones). ``sdltag.matrixfile`` compares them with its file's header: the same three values
    mean the file holds exactly the model's rows; only a larger generation means rows were added
    since (those with a larger rowid); anything else means the file is stale.
    """
    conn.execute(
        "CREATE TABLE matrix_state (model_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, "
        "generation INTEGER NOT NULL, removals INTEGER NOT NULL)"
    )
    conn.execute("INSERT INTO matrix_state SELECT DISTINCT model_id, random(), 1, 0 FROM images")
    conn.execute(
        "CREATE TRIGGER images_matrix_replace BEFORE INSERT ON images "
        "WHEN EXISTS (SELECT 1 FROM images WHERE path = NEW.path AND model_id = NEW.model_id) BEGIN "
        "UPDATE matrix_state SET removals = removals + 1 WHERE model_id = NEW.model_id; END"
    )
    conn.execute(
        "CREATE TRIGGER images_matrix_insert AFTER INSERT ON images BEGIN "
        "INSERT INTO matrix_state (model_id, epoch, generation, removals) VALUES (NEW.model_id, random(), 1, 0) "
        "ON CONFLICT (model_id) DO UPDATE SET generation = generation + 1; END"
    )
    conn.execute(
        "CREATE TRIGGER images_matrix_delete AFTER DELETE ON images BEGIN "
        "UPDATE matrix_state SET generation = generation + 1, removals = removals + 1 "
        "WHERE model_id = OLD.model_id; END"
    )
    conn.execute(
        "CREATE TRIGGER images_matrix_update AFTER UPDATE ON images BEGIN "
        "UPDATE matrix_state SET generation = generation + 1, removals = removals + 1 "
        "WHERE model_id IN (OLD.model_id, NEW.model_id); END"
    )


# Named, ordered schema steps; a step is never edited once released, only appended.
MIGRATIONS: list[tuple[int, str, Callable[[sqlite3.Connection], None]]] = [
    (1, "create_images_table", _migration_1),
    (2, "matrix_state_counters", _migration_2),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def _key(path: Path | str) -> bytes:
    return os.fsencode(os.path.abspath(path))


def _decode_vectors(blob: bytes, rows: int, dim: int) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").reshape(rows, dim).astype(np.float32)  # (M, d)


@dataclass(frozen=True)
class IndexedImage:
    """One index row."""

    path: Path
    model_id: str
    size: int
    mtime_ns: int
    hash: str
    vectors: np.ndarray  # (M, d) float32


# -- whose file is it ---------------------------------------------------------------------------


def _is_default_location(path: Path) -> bool:
    """The index in sdltag's own data folder: whatever lies there was put there by sdltag."""
    try:
        from sdltag.paths import default_index_path

        return os.path.abspath(default_index_path()) == os.path.abspath(path)
    except Exception:  # noqa: BLE001 - an unusable data folder only means "not provably ours"
        return False


def inspect_file(path: Path) -> tuple[str, str]:
    """What an existing ``--index`` file is, read without SQLite ever writing to it.

    Returns ``(verdict, reason)``; verdict is ``"missing"``, ``"empty"`` (0 bytes: nothing to
    lose), ``"ours"`` (application id, or the first schema step's tables and nothing else),
    ``"damaged"`` (provably sdltag's, but not readable as a database) or ``"foreign"``.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing", ""
    except OSError as exc:
        raise SdltagError(
            f"{path}: cannot read the index ({exc.strerror or exc}). Pass another --index FILE."
        ) from None
    if stat.S_ISDIR(st.st_mode):
        return "foreign", "it is a folder"
    if not stat.S_ISREG(st.st_mode):
        return "foreign", "it is not a regular file"
    if st.st_size == 0:
        return "empty", ""
    try:
        with open(path, "rb") as handle:
            header = handle.read(100)
    except OSError as exc:
        raise SdltagError(
            f"{path}: cannot read the index ({exc.strerror or exc}). Pass another --index FILE."
        ) from None
    own_place = _is_default_location(path)
    if not header.startswith(SQLITE_MAGIC) or len(header) < 100:
        if own_place:
            return "damaged", "not a SQLite database"
        return "foreign", "it is not a SQLite database"
    application_id = int.from_bytes(header[68:72], "big")
    if application_id == APPLICATION_ID:
        return "ours", ""
    if application_id != 0 and not own_place:
        return "foreign", f"it is another program's SQLite database (application id {application_id:#x})"
    # No application id: an index written before sdltag stamped one has the first step's objects only.
    # immutable=1: no lock, no journal roll-back, nothing written, whatever state the file is in.
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            names = {str(n) for (n,) in conn.execute("SELECT name FROM sqlite_master")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if own_place:
            return "damaged", str(exc)
        return "foreign", f"a SQLite database sdltag cannot read ({exc})"
    if "schema_migrations" in names and names <= _LEGACY_OBJECTS:
        return "ours", ""
    if own_place:
        return "damaged", "not an sdltag schema"
    what = f"tables {', '.join(sorted(names))}" if names else "no tables"
    return "foreign", f"it is a SQLite database without sdltag's schema ({what})"


def _not_an_index(path: Path, reason: str) -> NotAnIndexError:
    return NotAnIndexError(
        f"{path}: not an sdltag index ({reason}); left it untouched. Pass --index with a new file name "
        "or an existing index, or --no-index."
    )


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# -- the index ----------------------------------------------------------------------------------


class ImageIndex:
    """The SQLite index. Open with ``ImageIndex.open(path)``; use as a context manager.

    Every method survives the failures listed in the module docstring: a lock held too
    long, a full disk or a read-only file make it read-only (or unused) for the rest of the
    run with one warning (logged to ``sdltag.index``); damage sets the file aside and starts a new one.
    ``writable`` and ``usable`` say where it stands; ``problems`` holds the warnings given.
    """

    def __init__(
        self,
        conn: sqlite3.Connection | None,
        path: Path,
        commit_every: int = 64,
        commit_seconds: float = 5.0,
        *,
        readonly: bool = False,
    ) -> None:
        self.conn = conn
        self.path = Path(path)
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds
        self.readonly = readonly
        self.problems: list[str] = []
        self._pending = 0
        self._last_commit = time.monotonic()
        self._can_write = not readonly
        self._usable = conn is not None
        self._impatient = False  # once a lock wait ran out, later ones do not wait again
        self._said_waiting = False
        self._identity = _identity(self.path)

    @property
    def writable(self) -> bool:
        """False for a read-only open and once a write failed (lock, full disk, read-only file)."""
        return self._can_write and self._usable

    @property
    def usable(self) -> bool:
        """False once the index could not be read at all this run (every look-up then misses)."""
        return self._usable

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, commit_every: int = 64) -> ImageIndex:
        """Open (creating and migrating as needed) the index at ``path``.

        An existing file that is not an sdltag index raises ``NotAnIndexError`` (exit 2) and
        stays untouched; a damaged index of sdltag's is renamed aside with a warning and a
        fresh one started; an index from a newer sdltag raises ``SdltagError``.
        """
        path = Path(path).expanduser().absolute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SdltagError(
                f"{path.parent}: cannot create the index folder ({exc.strerror or exc}). "
                "Pass --index FILE somewhere writable, or --no-index."
            ) from None
        verdict, reason = inspect_file(path)
        if verdict == "foreign":
            raise _not_an_index(path, reason)
        index = cls(None, path, commit_every=commit_every)
        if verdict == "damaged":
            index._replace_damaged(reason, fatal=True)
        index._start()
        return index

    @classmethod
    def open_readonly(cls, path: Path) -> ImageIndex:
        """Open an existing index for reading only (``search``, ``--dry-run``): nothing is created,
        migrated or moved. A journal left by a killed run is rolled back first (a short read-write
        open), so the committed rows are read. Damage or a lock held too long leave an index that
        finds nothing, with one warning; a file that is not an index raises ``NotAnIndexError``."""
        path = Path(path).expanduser().absolute()
        verdict, reason = inspect_file(path)
        if verdict == "missing":
            raise SdltagError(f"{path}: no index there. Run `sdltag tag FOLDER` first, or pass --index FILE.")
        if verdict == "foreign":
            raise _not_an_index(path, reason)
        index = cls(None, path, readonly=True)
        if verdict == "empty":
            return index  # created and killed before its first commit: nothing to read
        if verdict == "damaged":
            index._give_up(f"the index {path} is damaged ({reason}); continuing without it. {_REBUILD_HINT}")
            return index
        try:
            index.conn = index._patiently(lambda _: index._connect_readonly())
            applied = index._patiently(applied_migrations)
        except sqlite3.DatabaseError as exc:
            index._opening_failed(exc)
            return index
        newest = max(applied, default=0)
        if not 1 <= newest <= SCHEMA_VERSION:  # an older schema reads the same (its matrix files are not used)
            index.close()
            raise SdltagError(f"{path}: index schema version {newest} is not {SCHEMA_VERSION}")
        index._usable = True
        return index

    def _connect_readonly(self) -> sqlite3.Connection:
        conn = connect(self.path, timeout=LOCK_SLICE_S, readonly=True)
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as exc:
            conn.close()
            if not _needs_roll_back(self.path, exc):
                raise
        # A journal left by a killed writer: only a read-write connection may roll it back.
        try:
            recover = connect(self.path, timeout=LOCK_SLICE_S)
            try:
                recover.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            finally:
                recover.close()
        except sqlite3.DatabaseError as exc:
            raise sqlite3.OperationalError(f"attempt to write a readonly database ({exc})") from None
        return connect(self.path, timeout=LOCK_SLICE_S, readonly=True)

    def _start(self) -> None:
        """Connect and migrate; a damaged file is replaced once, a lock or a read-only file degrade."""
        for attempt in range(2):
            try:
                self.conn = self._patiently(lambda _: self._connect())
                self._patiently(self._migrate)
            except sqlite3.DatabaseError as exc:
                self._close_connection()
                if looks_corrupt(exc) and attempt == 0:
                    self._replace_damaged(str(exc), fatal=True)
                    continue
                if is_busy(exc):
                    self._opening_failed(exc)
                    return
                if _looks_unwritable(exc) and self._open_for_reading():
                    self._stop_writing(
                        f"cannot write the index {self.path} ({exc}); using it read-only for this run "
                        "(results are still written; new ones are not stored)"
                    )
                    return
                if inspect_file(self.path)[0] == "ours":  # there, but neither writable nor readable now
                    self._opening_failed(exc)
                    return
                raise SdltagError(
                    f"{self.path}: cannot open the index ({exc}). Pass --index FILE somewhere writable, or --no-index."
                ) from None
            self._usable = True
            self._identity = _identity(self.path)
            return

    def _open_for_reading(self) -> bool:
        """An up-to-date index that cannot be written (read-only file or folder): open it for reading."""
        try:
            self.conn = self._connect_readonly()
            if not 1 <= max(applied_migrations(self.conn), default=0) <= SCHEMA_VERSION:
                raise sqlite3.OperationalError("schema not up to date")
        except sqlite3.DatabaseError:
            self._close_connection()
            return False
        self._usable = True
        return True

    def _close_connection(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except sqlite3.Error:
                pass
            self.conn = None

    def _opening_failed(self, exc: sqlite3.DatabaseError) -> None:
        self._close_connection()
        if is_busy(exc):
            self._give_up(
                f"the index {self.path} is locked by another program ({exc}) for more than {BUSY_TIMEOUT_S:g} s; "
                "continuing without it for this run"
            )
        elif looks_corrupt(exc):
            self._give_up(f"the index {self.path} is damaged ({exc}); continuing without it. {_REBUILD_HINT}")
        elif _needs_roll_back(self.path, exc):
            self._give_up(
                f"cannot read the index {self.path} (an interrupted write left {self.path.name}-journal, and undoing "
                f"it needs write access: {exc}); continuing without it for this run. A run allowed to write the "
                "index restores it."
            )
        else:
            self._give_up(f"cannot read the index {self.path} ({exc}); continuing without it for this run")

    def _connect(self) -> sqlite3.Connection:
        # isolation_level="IMMEDIATE": every write batch starts with BEGIN IMMEDIATE, taking the
        # write lock before it reads anything, so two tag runs sharing an index queue on the busy
        # timeout instead of deadlocking (SQLite refuses at once a reader that wants to write while
        # another writer commits).
        conn = connect(self.path, timeout=LOCK_SLICE_S, isolation_level="IMMEDIATE")
        try:
            conn.execute("PRAGMA synchronous=NORMAL")  # reads the schema: may meet a lock
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the schema up to date and stamp the application id, in one write transaction (if any needed)."""
        try:
            migrate(conn, MIGRATIONS, application_id=APPLICATION_ID)
        except NewerSchemaError as exc:
            raise SdltagError(
                f"{self.path}: this index was written by a newer sdltag (schema version {exc.newest}, this sdltag "
                f"knows up to {exc.known}). Upgrade sdltag (pip install --upgrade sdltag), or pass "
                "another --index FILE."
            ) from None

    @property
    def schema_version(self) -> int:
        return max(self._do(applied_migrations, lambda: {}), default=0)

    def migrations(self) -> list[tuple[int, str]]:
        """The applied steps, oldest first."""
        return sorted(self._do(applied_migrations, lambda: {}).items())

    # -- failures -----------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        self.problems.append(message)
        logger.warning(message)

    def _give_up(self, message: str) -> None:
        """Stop using the index for this run (every look-up misses, nothing is written)."""
        if self._usable or not self.problems:
            self._say(message)
        self._usable = False
        self._can_write = False

    def _stop_writing(self, message: str) -> None:
        if self._can_write:
            self._say(message)
        self._can_write = False

    def _rollback(self) -> None:
        try:
            if self.conn is not None and self.conn.in_transaction:
                self.conn.rollback()
        except sqlite3.Error:
            pass
        self._pending = 0

    def _patiently(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work(conn)``, retried while another program holds a lock, up to ``BUSY_TIMEOUT_S`` in all.

        SQLite waits ``LOCK_SLICE_S`` per attempt; past the first slice one line says the run is
        waiting. Each ``work`` is one statement, one transaction or a read, so a retry repeats
        nothing half done.
        """
        if self._impatient:
            return work(self.conn)  # type: ignore[arg-type]  # None only for the steps that connect
        return retry_while_busy(
            lambda: work(self.conn),  # type: ignore[arg-type]
            BUSY_TIMEOUT_S,
            first_delay=0.01,
            on_wait=self._waiting,
        )

    def _waiting(self, waited: float) -> None:
        if waited >= LOCK_SLICE_S and not self._said_waiting:
            self._said_waiting = True
            logger.warning(f"the index {self.path} is locked by another program; waiting up to {BUSY_TIMEOUT_S:g} s")

    def _do(self, work: Callable[[sqlite3.Connection], T], fallback: Callable[[], T], *, write: bool = False) -> T:
        """Run ``work`` on the connection; any SQLite failure ends in ``fallback()`` after the right remedy."""
        if not self._usable or (write and not self._can_write):
            return fallback()
        try:
            return self._patiently(work)
        except sqlite3.DatabaseError as exc:
            if not self._recover(exc, write):
                return fallback()
        try:  # a new index replaced a damaged one: once more, on it
            return self._patiently(work)
        except sqlite3.DatabaseError as exc:
            self._rollback()
            self._give_up(f"cannot use the index {self.path} ({exc}); continuing without it for this run")
            return fallback()

    def _recover(self, exc: sqlite3.DatabaseError, write: bool) -> bool:
        """The remedy for ``exc``; True when a fresh index replaced a damaged one (retry the work)."""
        self._rollback()
        if is_busy(exc):
            self._impatient = True
            if write:
                self._stop_writing(
                    f"the index {self.path} is still locked by another program after {BUSY_TIMEOUT_S:g} s; "
                    "continuing without writing to it (this run's new results are not stored)"
                )
            else:
                self._give_up(
                    f"the index {self.path} is locked by another program ({exc}) for more than "
                    f"{BUSY_TIMEOUT_S:g} s; continuing without it for this run"
                )
            return False
        if looks_corrupt(exc):
            return self._damaged(exc)
        if write and _looks_unwritable(exc):
            self._stop_writing(
                f"cannot write the index {self.path} ({exc}); using it read-only for this run "
                "(results are still written; new ones are not stored)"
            )
            return False
        self._give_up(f"cannot read the index {self.path} ({exc}); continuing without it for this run")
        return False

    def _damaged(self, exc: sqlite3.DatabaseError) -> bool:
        """A query said "malformed": confirm with quick_check, then set the file aside and start anew."""
        assert self.conn is not None  # run after a query on the open connection failed
        detail = quick_check(self.conn, 5)
        if detail == "ok":
            self._give_up(f"the index {self.path} answered {exc!s}; continuing without it for this run")
            return False
        if self.readonly:
            self._give_up(f"the index {self.path} is damaged ({detail}); continuing without it. {_REBUILD_HINT}")
            return False
        return self._replace_damaged(detail, fatal=False)

    def _replace_damaged(self, detail: str, *, fatal: bool) -> bool:
        """Rename the damaged index aside (unless another run already did) and open a new one."""
        self._rollback()
        self._close_connection()
        moved = None  # stays None when another sdltag run set it aside first
        try:
            if self._identity is None or _identity(self.path) == self._identity:
                moved = set_aside(self.path)
        except OSError as exc:
            message = (
                f"{self.path}: the index is damaged ({detail}) and cannot be moved aside "
                f"({exc.strerror or exc}). Remove it, pass another --index FILE, or --no-index."
            )
            if fatal:
                raise SdltagError(message) from None
            self._give_up(message)
            return False
        if moved is not None:
            self._say(
                f"the index {self.path} was damaged ({detail}); moved it to {moved.name} and started a new one "
                "(its images will be tagged again)"
            )
        if fatal:
            self._identity = None
            return True
        try:
            self.conn = self._patiently(lambda _: self._connect())
            self._patiently(self._migrate)
        except sqlite3.DatabaseError as exc:
            self._give_up(f"cannot start a new index at {self.path} ({exc}); continuing without it for this run")
            return False
        self._identity = _identity(self.path)
        self._pending = 0
        return True

    # -- reading ------------------------------------------------------------------------------

    def lookup(self, path: Path, size: int, mtime_ns: int, model_id: str) -> np.ndarray | None:
        """The stored (M, d) matrix of ``path`` when size and mtime still match, else None."""
        return self.lookup_many([(path, size, mtime_ns)], model_id)[0]

    def lookup_many(self, files: list[tuple[Path, int, int]], model_id: str) -> list[np.ndarray | None]:
        """``lookup`` for many (path, size, mtime_ns) at once: one query per 500 paths, results in order."""
        keys = [_key(path) for path, _, _ in files]

        def work(conn: sqlite3.Connection) -> dict[bytes, tuple[Any, ...]]:
            found: dict[bytes, tuple[Any, ...]] = {}
            for start in range(0, len(keys), 500):
                part = keys[start : start + 500]
                found.update(
                    (row[0], row[1:])
                    for row in conn.execute(
                        "SELECT path, size, mtime_ns, vectors, rows, dim FROM images "
                        f"WHERE model_id = ? AND path IN ({','.join('?' * len(part))})",
                        (model_id, *part),
                    )
                )
            return found

        found = self._do(work, lambda: {}) if keys else {}
        out: list[np.ndarray | None] = []
        for key, (_, size, mtime_ns) in zip(keys, files, strict=True):
            row = found.get(key)
            if row is not None and row[0] == int(size) and row[1] == int(mtime_ns):
                out.append(_decode_vectors(row[2], row[3], row[4]))
            else:
                out.append(None)
        return out

    def known_hashes(self, model_id: str) -> set[str]:
        """Content hashes that already have vectors for ``model_id`` (for renamed/copied files)."""
        return self._do(
            lambda conn: {
                str(h) for (h,) in conn.execute("SELECT DISTINCT hash FROM images WHERE model_id = ?", (model_id,))
            },
            set,
        )

    def vectors_for_hash(self, content_hash: str, model_id: str) -> np.ndarray | None:
        row = self._do(
            lambda conn: conn.execute(
                "SELECT rows, dim, vectors FROM images WHERE hash = ? AND model_id = ? LIMIT 1",
                (content_hash, model_id),
            ).fetchone(),
            lambda: None,
        )
        return None if row is None else _decode_vectors(row[2], row[0], row[1])

    def get(self, path: Path, model_id: str) -> IndexedImage | None:
        row = self._do(
            lambda conn: conn.execute(
                "SELECT path, model_id, size, mtime_ns, hash, rows, dim, vectors FROM images "
                "WHERE path = ? AND model_id = ?",
                (_key(path), model_id),
            ).fetchone(),
            lambda: None,
        )
        return None if row is None else _row(row)

    def _rows(self, query: str, params: tuple) -> Iterator[tuple]:
        """The rows of one query, streamed; a failure part-way ends the stream (after its remedy)."""
        if not self._usable:
            return
        try:
            cursor = self._patiently(lambda conn: conn.execute(query, params))
            yield from cursor
        except sqlite3.DatabaseError as exc:
            self._recover(exc, write=False)

    def under(self, folders: Iterable[Path], model_id: str) -> Iterator[IndexedImage]:
        """Every row of ``model_id`` whose path is one of ``folders`` or inside one (all rows if none given)."""
        folders = [Path(os.path.abspath(f)) for f in folders]
        columns = "SELECT path, model_id, size, mtime_ns, hash, rows, dim, vectors FROM images"
        if not folders:
            yield from (_row(r) for r in self._rows(f"{columns} WHERE model_id = ? ORDER BY path", (model_id,)))
            return
        seen: set[bytes] = set()
        for folder in folders:
            exact, prefix, upper = _prefix_range(folder)
            query = f"{columns} WHERE model_id = ? AND (path = ? OR (path >= ? AND path < ?)) ORDER BY path"
            for row in self._rows(query, (model_id, exact, prefix, upper)):
                if row[0] not in seen:
                    seen.add(row[0])
                    yield _row(row)

    def count(self, model_id: str | None = None) -> int:
        if model_id is None:
            return self._do(lambda conn: int(conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]), int)
        return self._do(
            lambda conn: int(conn.execute("SELECT COUNT(*) FROM images WHERE model_id = ?", (model_id,)).fetchone()[0]),
            int,
        )

    # -- writing ------------------------------------------------------------------------------

    def put(self, path: Path, size: int, mtime_ns: int, content_hash: str, model_id: str, vectors: np.ndarray) -> None:
        """Record ``path``'s (M, d) matrix; committed in batches (``commit_every`` rows or a few seconds).

        A no-op once the index is read-only for this run (see ``writable``).
        """
        matrix = np.ascontiguousarray(vectors, dtype="<f4")
        if matrix.ndim != 2:
            raise ValueError(f"vectors must be (M, d), got {matrix.shape}")
        row = (
            _key(path),
            model_id,
            int(size),
            int(mtime_ns),
            content_hash,
            matrix.shape[0],
            matrix.shape[1],
            matrix.tobytes(),
            time.time(),
        )

        def work(conn: sqlite3.Connection) -> bool:
            conn.execute(
                "INSERT OR REPLACE INTO images (path, model_id, size, mtime_ns, hash, rows, dim, vectors, indexed_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return True

        if not self._do(work, lambda: False, write=True):
            return
        self._pending += 1
        if self._pending >= self.commit_every or time.monotonic() - self._last_commit >= self.commit_seconds:
            self.commit()

    def _gone(self, folders: Iterable[Path] | None) -> tuple[set[bytes], int]:
        if folders is None:
            scans: list[tuple[str, tuple]] = [("SELECT DISTINCT path FROM images", ())]
        else:
            query = "SELECT DISTINCT path FROM images WHERE path = ? OR (path >= ? AND path < ?)"
            scans = [(query, _prefix_range(folder)) for folder in folders]
        gone: set[bytes] = set()
        unsure = 0
        for query, params in scans:
            for (key,) in self._rows(query, params):
                try:
                    os.lstat(os.fsdecode(bytes(key)))
                except FileNotFoundError:
                    gone.add(bytes(key))
                except OSError:
                    unsure += 1  # unreadable, not gone
        return gone, unsure

    def prune_missing(self, folders: Iterable[Path] | None) -> int:
        """Delete rows under ``folders`` (the whole index when None) whose file is definitely gone; returns how many.

        Only a path that the system answers ENOENT for counts as gone: a file that cannot be
        checked (a folder without read or search permission, an I/O error, a stale mount)
        keeps its row. A row another run wrote after the check began is kept too.
        """
        return self.prune(folders)[1]

    def prune(self, folders: Iterable[Path] | None, *, dry_run: bool = False) -> tuple[list[Path], int, int]:
        """``prune_missing``, saying more: ``(gone paths sorted, rows removed, paths that could not be checked)``.

        With ``dry_run`` nothing is removed (rows removed is then 0).
        """
        started = time.time()
        gone, unsure = self._gone(folders)
        paths = [Path(os.fsdecode(key)) for key in sorted(gone)]
        if not gone or dry_run:
            return paths, 0, unsure

        def work(conn: sqlite3.Connection) -> int:
            # rowcount: this statement's rows only (total_changes would add the matrix_state triggers' updates)
            return conn.executemany(
                "DELETE FROM images WHERE path = ? AND indexed_at <= ?", [(p, started) for p in gone]
            ).rowcount

        self.commit()  # this run's own pending rows first: they are older than the check
        return paths, self._do(_in_transaction(work), int, write=True), unsure

    # -- managing (``sdltag index``) ----------------------------------------------------------

    def stats(self) -> list[ModelStats]:
        """Per model: photos, bytes of vectors, oldest and newest ``indexed_at`` (model ids in order)."""
        rows = self._do(
            lambda conn: conn.execute(
                "SELECT model_id, COUNT(*), SUM(LENGTH(vectors)), MIN(indexed_at), MAX(indexed_at) "
                "FROM images GROUP BY model_id ORDER BY model_id"
            ).fetchall(),
            list,
        )
        return [ModelStats(str(m), int(n), int(b or 0), float(lo), float(hi)) for m, n, b, lo, hi in rows]

    def distinct_paths(self) -> int:
        return self._do(lambda conn: int(conn.execute("SELECT COUNT(DISTINCT path) FROM images").fetchone()[0]), int)

    def clear_model(self, model_ids: Iterable[str]) -> int:
        """Delete every row of ``model_ids`` in one transaction; returns how many."""
        ids = list(model_ids)

        def work(conn: sqlite3.Connection) -> int:
            return conn.executemany("DELETE FROM images WHERE model_id = ?", [(m,) for m in ids]).rowcount

        self.commit()
        return self._do(_in_transaction(work), int, write=True)

    def plan_move(self, old: Path, new: Path, *, always_hash: bool = False) -> MovePlan:
        """What ``move(old, new)`` would do: each row under ``old`` (a folder or file) re-pointed under ``new``.

        A row moves only when the file at its new path is verifiably the one indexed: the same size
        and mtime, or (when the mtime differs, or with ``always_hash``) the same content hash; its
        mtime is then updated, so the next `sdltag tag` reuses it without reading the file.
        """
        old_key, prefix, upper = _prefix_range(old)
        new_key = _key(new)
        query = "SELECT path, model_id, size, mtime_ns, hash FROM images WHERE path = ? OR (path >= ? AND path < ?)"
        plan = MovePlan()
        hashes: dict[bytes, str | None] = {}
        for key, model_id, size, mtime_ns, content_hash in self._rows(query, (old_key, prefix, upper)):
            key = bytes(key)
            target = new_key + key[len(old_key) :]
            target_path = os.fsdecode(target)
            try:
                st = os.stat(target_path)
            except OSError as exc:
                plan.unverified.append((Path(os.fsdecode(key)), Path(target_path), exc.strerror or str(exc)))
                continue
            if st.st_size != int(size):
                plan.unverified.append((Path(os.fsdecode(key)), Path(target_path), "a different size"))
                continue
            if always_hash or st.st_mtime_ns != int(mtime_ns):
                if target not in hashes:
                    try:
                        hashes[target] = file_hash(Path(target_path))
                    except OSError:
                        hashes[target] = None
                if hashes[target] != str(content_hash):
                    plan.unverified.append((Path(os.fsdecode(key)), Path(target_path), "different content"))
                    continue
                plan.by_hash += 1
            plan.moves.append((key, str(model_id), int(size), int(mtime_ns), target, st.st_mtime_ns))
        return plan

    def move(self, plan: MovePlan) -> int:
        """Apply ``plan_move``'s plan, 500 rows per transaction; returns how many rows moved.

        A row changed since the plan (another run re-indexed it) is left as it is; a row already at
        the new path (the new place was tagged too) is replaced by the moved one (the same content).
        """
        moved = 0
        for start in range(0, len(plan.moves), 500):
            part = plan.moves[start : start + 500]

            def work(conn: sqlite3.Connection, part: list = part) -> int:
                return conn.executemany(
                    "UPDATE OR REPLACE images SET path = ?, mtime_ns = ? "
                    "WHERE path = ? AND model_id = ? AND size = ? AND mtime_ns = ?",
                    [
                        (target, mtime, key, model_id, size, old_mtime)
                        for key, model_id, size, old_mtime, target, mtime in part
                    ],
                ).rowcount

            if start == 0:
                self.commit()
            moved += self._do(_in_transaction(work), int, write=True)
        return moved

    def commit(self) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.commit()

        self._do(work, lambda: None, write=True)
        self._pending = 0
        self._last_commit = time.monotonic()

    def close(self) -> None:
        if self.conn is None:
            return
        try:
            self.commit()
            self._rollback()
        finally:
            self.conn.close()
            self.conn = None

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_REBUILD_HINT = "The next `sdltag tag` moves it aside and builds a new one."


@dataclass(frozen=True)
class ModelStats:
    """One model's share of the index (``ImageIndex.stats``)."""

    model_id: str
    photos: int
    vector_bytes: int
    oldest: float  # indexed_at, seconds since the epoch
    newest: float


@dataclass
class MovePlan:
    """``ImageIndex.plan_move``: rows to re-point, and those whose new file could not be verified."""

    moves: list[tuple[bytes, str, int, int, bytes, int]] = field(default_factory=list)
    unverified: list[tuple[Path, Path, str]] = field(default_factory=list)  # (old, new, why)
    by_hash: int = 0  # verified by content hash (the mtime differed)


def _in_transaction(work: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    """``work`` then COMMIT, as one transaction: a failure (a lock) rolls it all back, so a retry starts clean."""

    def run(conn: sqlite3.Connection) -> T:
        try:
            result = work(conn)
            conn.commit()
            return result
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise

    return run


def file_size_on_disk(path: Path) -> int:
    """The index file's bytes with its journal files (what deleting it would free)."""
    total = 0
    for suffix in ("", *SIDE_FILES):
        try:
            total += os.stat(f"{path}{suffix}").st_size
        except OSError:
            pass
    return total


def _prefix_range(folder: Path) -> tuple[bytes, bytes, bytes]:
    """(the folder's key, its children's prefix, the first key after them) for a range scan."""
    exact = _key(folder)
    prefix = exact.rstrip(os.sep.encode()) + os.sep.encode()
    return exact, prefix, prefix[:-1] + bytes([prefix[-1] + 1])


def _row(row: tuple) -> IndexedImage:
    path, model_id, size, mtime_ns, content_hash, rows, dim, blob = row
    return IndexedImage(
        Path(os.fsdecode(bytes(path))),
        str(model_id),
        int(size),
        int(mtime_ns),
        str(content_hash),
        _decode_vectors(blob, int(rows), int(dim)),
    )


def _looks_unwritable(exc: sqlite3.DatabaseError) -> bool:
    """A full disk, a read-only file or folder, or a failing write (not damage, not a lock)."""
    text = str(exc).lower()
    words = ("full", "readonly", "read-only", "disk i/o", "unable to open", "permission", "access", "no space")
    return any(word in text for word in words)


def _needs_roll_back(path: Path, exc: sqlite3.Error) -> bool:
    """A read-only open refused because a killed writer left a journal that must be rolled back first."""
    text = str(exc).lower()
    side = any(os.path.exists(f"{path}{suffix}") for suffix in ("-journal", "-wal"))
    return side and ("readonly" in text or "read-only" in text or "unable to open" in text)
