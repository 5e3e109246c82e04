"""The SQLite plumbing both of sdltag's stores share: the image index and the label cache.

- ``connect``: a connection with SQLite's own busy wait set.
- ``retry_while_busy``: SQLite's busy timeout covers ordinary lock waits, but where waiting
  could deadlock SQLite answers SQLITE_BUSY at once, without calling the busy handler (a
  connection that holds a read lock and needs a write lock: switching a new file to WAL,
  upgrading a read transaction while another process commits). Both stores are shared by
  every sdltag process of a user, so such a step is backed off and started again. Each step
  passed here is one whole transaction (or an idempotent open), so a retry repeats nothing
  half done.
- ``migrate``: named, ordered schema steps recorded in ``schema_migrations`` (version, name,
  time), applied in one write transaction; a file whose newest step is unknown (written by a
  newer sdltag) raises ``NewerSchemaError``.
- ``looks_corrupt`` / ``quick_check``: damage as opposed to a lock or a permission problem.
- ``set_aside``: a damaged file and its journal files renamed to ``NAME.corrupt-<time>``.

This module knows sqlite3 only.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

T = TypeVar("T")
IsolationLevel = Literal["DEFERRED", "EXCLUSIVE", "IMMEDIATE"] | None

Migration = tuple[int, str, Callable[[sqlite3.Connection], None]]  # (version, name, step)
SIDE_FILES = ("-journal", "-wal", "-shm")


def connect(
    path: Path | str,
    *,
    timeout: float,
    isolation_level: IsolationLevel = "DEFERRED",
    readonly: bool = False,
    shared: bool = False,
) -> sqlite3.Connection:
    """A connection to ``path`` waiting up to ``timeout`` s on another program's lock.

    ``readonly``: opened ``mode=ro`` (nothing is created); ``shared``: usable from several threads
    (the caller serialises them); ``isolation_level`` as ``sqlite3.connect`` takes it (None: autocommit;
    the others begin a transaction before a data-changing statement, the default one ``DEFERRED``).
    """
    target, uri = (f"{Path(path).absolute().as_uri()}?mode=ro", True) if readonly else (str(path), False)
    return sqlite3.connect(
        target, uri=uri, timeout=timeout, isolation_level=isolation_level, check_same_thread=not shared
    )


def is_busy(exc: BaseException) -> bool:
    """True for SQLite's "database is locked" / "database is busy" (not damage, not permissions)."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def retry_while_busy(
    step: Callable[[], T],
    timeout: float = 60.0,
    *,
    first_delay: float = 0.005,
    on_wait: Callable[[float], None] | None = None,
) -> T:
    """Run ``step``; while it fails with a lock error, back off (jittered, up to 0.25 s) and run it again.

    Past ``timeout`` seconds the lock error is raised. ``on_wait(seconds waited)`` is called before each
    new attempt (to say once that the run is waiting).
    """
    start = time.monotonic()
    delay = first_delay
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            waited = time.monotonic() - start
            if not is_busy(exc) or waited + delay > timeout:
                raise
            if on_wait is not None:
                on_wait(waited)
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.25)


# -- schema steps ---------------------------------------------------------------------------------


class NewerSchemaError(Exception):
    """The file holds a schema step this sdltag does not know: it was written by a newer one."""

    def __init__(self, newest: int, known: int) -> None:
        super().__init__(f"schema version {newest}, this sdltag knows up to {known}")
        self.newest, self.known = newest, known


def applied_migrations(conn: sqlite3.Connection) -> dict[int, str]:
    """The schema steps recorded in the file: version -> name (empty for a new file)."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'")
    if exists.fetchone() is None:
        return {}
    return {int(v): str(n) for v, n in conn.execute("SELECT version, name FROM schema_migrations")}


def _refuse_newer(applied: dict[int, str], migrations: Sequence[Migration]) -> None:
    known = migrations[-1][0]
    newest = max(applied, default=0)
    if newest > known:
        raise NewerSchemaError(newest, known)


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration], *, application_id: int | None = None) -> None:
    """Apply the steps the file lacks (and stamp ``application_id``) in one write transaction, if any.

    Steps are never edited once released, only appended. Another process may migrate at the same
    time: what is applied is read again under the write lock.
    """
    applied = applied_migrations(conn)
    _refuse_newer(applied, migrations)
    missing = [step for step in migrations if step[0] not in applied]
    stamped = application_id is None or conn.execute("PRAGMA application_id").fetchone()[0] == application_id
    if not missing and stamped:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        applied = applied_migrations(conn)
        _refuse_newer(applied, migrations)
        for version, name, step in migrations:
            if version not in applied:
                step(conn)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                )
        if application_id is not None:
            conn.execute(f"PRAGMA application_id = {int(application_id)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# -- damage ---------------------------------------------------------------------------------------


def looks_corrupt(exc: sqlite3.Error) -> bool:
    """Damage ("file is not a database", "database disk image is malformed"), not a lock or permission problem."""
    text = str(exc).lower()
    return any(word in text for word in ("not a database", "malformed", "corrupt", "integrity check failed"))


def quick_check(conn: sqlite3.Connection, limit: int = 5) -> str:
    """``"ok"``, or what ``PRAGMA quick_check`` (or the attempt to run it) found wrong, in one line."""
    try:
        rows = conn.execute(f"PRAGMA quick_check({int(limit)})").fetchall()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    found = [str(r[0]) for r in rows]
    return "ok" if found == ["ok"] else "; ".join(found)


def set_aside(path: Path) -> Path | None:
    """Rename a damaged ``path`` and its journal files to ``NAME.corrupt-<time>[-<pid>]``; returns the new name.

    None when ``path`` is gone (another process set it aside first). Nothing is deleted: the file is
    kept whole for whoever wants to look at it.
    """
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    if aside.exists():
        aside = aside.with_name(f"{aside.name}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    for suffix in SIDE_FILES:  # a journal beside a new file would be applied to it
        try:
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
        except FileNotFoundError:
            pass
    return aside
