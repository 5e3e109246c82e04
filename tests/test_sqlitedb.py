"""sdltag.sqlitedb: the plumbing under the image index and the label cache, on real SQLite files."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from sdltag import sqlitedb
from sdltag.embedding.cache import DB_FILE, LabelVectorCache
from sdltag.index import ImageIndex

STEPS = [
    (1, "create_things", lambda conn: conn.execute("CREATE TABLE things (x INTEGER)")),
    (2, "add_colour", lambda conn: conn.execute("ALTER TABLE things ADD COLUMN colour TEXT")),
]


def test_migrate_applies_named_steps_once_and_stamps_the_application_id(tmp_path: Path) -> None:
    conn = sqlitedb.connect(tmp_path / "a.db", timeout=1.0, isolation_level=None)
    sqlitedb.migrate(conn, STEPS[:1], application_id=0x1234)
    assert sqlitedb.applied_migrations(conn) == {1: "create_things"}
    sqlitedb.migrate(conn, STEPS, application_id=0x1234)  # only step 2 runs: step 1 would fail again
    sqlitedb.migrate(conn, STEPS, application_id=0x1234)
    assert sqlitedb.applied_migrations(conn) == {1: "create_things", 2: "add_colour"}
    assert conn.execute("PRAGMA application_id").fetchone()[0] == 0x1234
    conn.execute("INSERT INTO things (x, colour) VALUES (1, 'red')")
    conn.close()


def test_a_newer_file_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    conn = sqlitedb.connect(path, timeout=1.0, isolation_level=None)
    sqlitedb.migrate(conn, STEPS)
    conn.close()
    before = path.read_bytes()
    conn = sqlitedb.connect(path, timeout=1.0, isolation_level=None)
    with pytest.raises(sqlitedb.NewerSchemaError) as info:
        sqlitedb.migrate(conn, STEPS[:1], application_id=7)
    conn.close()
    assert (info.value.newest, info.value.known) == (2, 1)
    assert path.read_bytes() == before


def test_a_failing_step_rolls_every_step_back(tmp_path: Path) -> None:
    def broken(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("no such thing")

    conn = sqlitedb.connect(tmp_path / "a.db", timeout=1.0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError):
        sqlitedb.migrate(conn, [STEPS[0], (2, "broken", broken)])
    assert sqlitedb.applied_migrations(conn) == {}
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'things'").fetchone() is None
    conn.close()


def test_readonly_connect_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError):
        sqlitedb.connect(tmp_path / "none.db", timeout=0.1, readonly=True).execute("SELECT 1 FROM sqlite_master")
    assert not (tmp_path / "none.db").exists()


def test_retry_while_busy_says_it_waits_then_gives_up() -> None:
    waits: list[float] = []

    def locked() -> None:
        raise sqlite3.OperationalError("database is locked")

    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sqlitedb.retry_while_busy(locked, 0.3, on_wait=waits.append)
    assert time.monotonic() - started < 2.0
    assert waits and waits == sorted(waits) and waits[-1] < 0.3


def test_corruption_is_told_from_locks_and_permissions() -> None:
    assert sqlitedb.looks_corrupt(sqlite3.DatabaseError("file is not a database"))
    assert sqlitedb.looks_corrupt(sqlite3.DatabaseError("database disk image is malformed"))
    assert not sqlitedb.looks_corrupt(sqlite3.OperationalError("database is locked"))
    assert not sqlitedb.looks_corrupt(sqlite3.OperationalError("attempt to write a readonly database"))
    assert not sqlitedb.looks_corrupt(sqlite3.IntegrityError("UNIQUE constraint failed: vectors.text"))


def test_quick_check_names_damage(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x BLOB)")
    conn.executemany("INSERT INTO t VALUES (?)", [(os.urandom(900),) for _ in range(200)])
    conn.commit()
    assert sqlitedb.quick_check(conn) == "ok"
    conn.close()
    data = bytearray(path.read_bytes())
    data[4096 * 3 : 4096 * 6] = b"\xff" * (4096 * 3)
    path.write_bytes(bytes(data))
    conn = sqlite3.connect(path)
    assert sqlitedb.quick_check(conn) != "ok"
    conn.close()


def test_set_aside_moves_the_file_and_its_journals_and_keeps_both_on_a_clash(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    for suffix, body in (("", b"main"), ("-wal", b"wal"), ("-journal", b"journal")):
        Path(f"{path}{suffix}").write_bytes(body)
    first = sqlitedb.set_aside(path)
    assert first is not None and first.read_bytes() == b"main"
    assert Path(f"{first}-wal").read_bytes() == b"wal" and Path(f"{first}-journal").read_bytes() == b"journal"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [first.name, f"{first.name}-wal", f"{first.name}-journal"]
    )
    path.write_bytes(b"second")
    second = sqlitedb.set_aside(path)
    assert second is not None and second != first and second.read_bytes() == b"second" and first.read_bytes() == b"main"
    assert sqlitedb.set_aside(path) is None  # gone: another process moved it first


def test_both_stores_record_their_steps_in_the_same_table(tmp_path: Path) -> None:
    with ImageIndex.open(tmp_path / "i.db") as index:
        assert [name for _, name in index.migrations()][0] == "create_images_table"
    cache = LabelVectorCache(tmp_path / "cache")
    cache.get_many("e", ["x"])
    cache.close()
    conn = sqlite3.connect(tmp_path / "cache" / DB_FILE)
    assert sqlitedb.applied_migrations(conn) == {1: "create_vectors_and_weight_hashes"}
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1  # what older sdltag reads
    conn.close()


def test_a_label_cache_from_before_named_steps_is_kept(tmp_path: Path) -> None:
    """A cache written with only ``PRAGMA user_version = 1``: its vectors are read, the step is recorded."""
    folder = tmp_path / "cache"
    folder.mkdir()
    conn = sqlite3.connect(folder / DB_FILE)
    conn.executescript(
        "CREATE TABLE vectors (id INTEGER PRIMARY KEY, embedder TEXT NOT NULL, text TEXT NOT NULL, "
        "dim INTEGER NOT NULL, vector BLOB NOT NULL, created REAL NOT NULL, UNIQUE (embedder, text));"
        "CREATE TABLE weight_hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, "
        "sha256 TEXT NOT NULL); PRAGMA user_version = 1;"
    )
    conn.execute("INSERT INTO weight_hashes VALUES ('/m', 1, 2, 'abc')")
    conn.commit()
    conn.close()
    cache = LabelVectorCache(folder)
    assert cache.get_file_hash(Path("/m"), 1, 2) == "abc"
    cache.close()
    conn = sqlite3.connect(folder / DB_FILE)
    assert sqlitedb.applied_migrations(conn) == {1: "create_vectors_and_weight_hashes"}
    conn.close()
    assert not list(folder.glob(f"{DB_FILE}.corrupt-*"))


def test_a_label_cache_from_a_newer_sdltag_is_used_in_memory(tmp_path: Path) -> None:
    from sdltag import log
    from sdltag.embedding.cache import MIGRATIONS

    folder = tmp_path / "cache"
    LabelVectorCache(folder).get_many("e", ["x"])
    conn = sqlitedb.connect(folder / DB_FILE, timeout=1.0, isolation_level=None)
    sqlitedb.migrate(conn, [*MIGRATIONS, (99, "future", lambda c: None)])
    conn.close()
    with log.collect() as warnings:
        cache = LabelVectorCache(folder)
        cache.get_many("e", ["x"])
    assert not cache.persistent
    assert len(warnings) == 1 and "newer sdltag (schema 99)" in warnings[0]
