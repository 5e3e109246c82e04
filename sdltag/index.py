"""The image index: one SQLite file of principal-vector matrices, so re-tagging never re-runs the model.

Per image and model: the absolute path, size, mtime (ns), a content hash (xxh3-128)
and the (M, d) float32 matrix the model made, with the model's identity
(``ModelFolder.model_id``). A file whose size and mtime are unchanged is skipped; a
renamed or copied file reuses the matrix of any file with the same hash; another
model has its own rows. Paths are stored as bytes (``os.fsencode``) so names that
are not valid UTF-8 round-trip exactly.

The schema is versioned: ``schema_migrations`` records each named step applied; an
index whose newest step is unknown (written by a newer sdltag) is refused. A file
that is not a SQLite database is set aside (renamed ``*.corrupt-<time>``) and a new
index started. Writes are committed in batches, so an interrupted run keeps what it
finished. This module knows sqlite3 and numpy only.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdltag.errors import SdltagError
from sdltag.modelfolder import hash_file
from sdltag.sqlite_retry import retry_while_busy

HASH_NAME = "xxh3-128"
BUSY_TIMEOUT_S = 30.0


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


# Named, ordered schema steps; a step is never edited once released, only appended.
MIGRATIONS: list[tuple[int, str, Callable[[sqlite3.Connection], None]]] = [
    (1, "create_images_table", _migration_1),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def file_hash(path: Path, chunk: int = 1 << 20) -> str:
    """The content hash of an image: ``xxh3-128:`` and the XXH3 128-bit digest of its bytes.

    Used only to recognise a renamed or copied file (never against an adversary), so a
    fast non-cryptographic hash: 0.02 ms for a 1 MB JPEG against 0.54 ms for sha256 here,
    time the decode threads spend on decoding instead. The prefix names the algorithm:
    indexes written before it hold bare sha256 digests, which simply never match (their
    files are still found by path, size and mtime).
    """
    import xxhash

    return f"{HASH_NAME}:{hash_file(path, xxhash.xxh3_128(), chunk).hexdigest()}"


def bytes_hash(data: bytes) -> str:
    """``file_hash`` of a file already read into memory (the tag pipeline decodes from the same bytes)."""
    import xxhash

    return f"{HASH_NAME}:{xxhash.xxh3_128_hexdigest(data)}"


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


class ImageIndex:
    """The SQLite index. Open with ``ImageIndex.open(path)``; use as a context manager."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path, commit_every: int = 64, commit_seconds: float = 5.0
    ) -> None:
        self.conn = conn
        self.path = path
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds
        self._pending = 0
        self._last_commit = time.monotonic()

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, warn: Callable[[str], None] | None = None, commit_every: int = 64) -> ImageIndex:
        """Open (creating and migrating as needed) the index at ``path``.

        A corrupt file is renamed aside with a warning and a fresh index started; an
        index from a newer sdltag raises ``SdltagError``.
        """
        path = Path(path).expanduser().absolute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SdltagError(
                f"{path.parent}: cannot create the index folder ({exc.strerror or exc}). "
                "Pass --index FILE somewhere writable, or --no-index."
            ) from None
        try:
            conn = cls._connect_and_migrate(path)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and not _looks_corrupt(exc):
                raise SdltagError(
                    f"{path}: cannot open the index ({exc}). Pass --index FILE somewhere writable, or --no-index."
                ) from None
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                os.replace(path, aside)
                for suffix in ("-journal", "-wal", "-shm"):
                    extra = path.with_name(path.name + suffix)
                    if extra.exists():
                        os.replace(extra, aside.with_name(aside.name + suffix))
            except OSError as move_exc:
                raise SdltagError(
                    f"{path}: the index is corrupt ({exc}) and cannot be moved aside ({move_exc}). "
                    "Remove it, pass another --index FILE, or --no-index."
                ) from None
            if warn is not None:
                warn(f"{path}: the index was corrupt ({exc}); moved it to {aside.name} and started a new one")
            conn = cls._connect_and_migrate(path)
        return cls(conn, path, commit_every=commit_every)

    @classmethod
    def open_readonly(cls, path: Path) -> ImageIndex:
        """Open an existing index for reading only (``--dry-run``): nothing is created, migrated or moved."""
        path = Path(path).expanduser().absolute()
        try:
            conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30.0)
            applied = [int(v) for (v,) in conn.execute("SELECT version FROM schema_migrations")]
        except sqlite3.DatabaseError as exc:
            raise SdltagError(f"{path}: cannot read the index ({exc})") from None
        if max(applied, default=0) != SCHEMA_VERSION:
            conn.close()
            raise SdltagError(f"{path}: index schema version {max(applied, default=0)} is not {SCHEMA_VERSION}")
        return cls(conn, path)

    @staticmethod
    def _connect_and_migrate(path: Path) -> sqlite3.Connection:
        # isolation_level="IMMEDIATE": every write batch starts with BEGIN IMMEDIATE, taking the
        # write lock before it reads anything, so two tag runs sharing an index queue on the busy
        # timeout instead of deadlocking (SQLite refuses at once a reader that wants to write while
        # another writer commits).
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level="IMMEDIATE")
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            retry_while_busy(
                lambda: conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations "
                    "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
                ),
                BUSY_TIMEOUT_S,
            )
            newest = max(ImageIndex._applied(conn), default=0)
            if newest > SCHEMA_VERSION:
                raise SdltagError(
                    f"{path}: this index was written by a newer sdltag (schema version {newest}, this sdltag "
                    f"knows up to {SCHEMA_VERSION}). Upgrade sdltag (pip install --upgrade sdltag), or pass "
                    "another --index FILE."
                )
            for version, name, step in MIGRATIONS:
                if version not in ImageIndex._applied(conn):
                    retry_while_busy(lambda v=version, n=name, s=step: ImageIndex._apply(conn, v, n, s), BUSY_TIMEOUT_S)
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _applied(conn: sqlite3.Connection) -> dict[int, str]:
        return {int(v): str(n) for v, n in conn.execute("SELECT version, name FROM schema_migrations")}

    @staticmethod
    def _apply(conn: sqlite3.Connection, version: int, name: str, step: Callable[[sqlite3.Connection], None]) -> None:
        """One step in one write transaction, checked again under the lock (another process may have run it)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            if version not in ImageIndex._applied(conn):
                step(conn)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        row = self.conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def migrations(self) -> list[tuple[int, str]]:
        """The applied steps, oldest first."""
        return [
            (int(v), str(n))
            for v, n in self.conn.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        ]

    # -- reading ------------------------------------------------------------------------------

    def lookup(self, path: Path, size: int, mtime_ns: int, model_id: str) -> np.ndarray | None:
        """The stored (M, d) matrix of ``path`` when size and mtime still match, else None."""
        return self.lookup_many([(path, size, mtime_ns)], model_id)[0]

    def lookup_many(self, files: list[tuple[Path, int, int]], model_id: str) -> list[np.ndarray | None]:
        """``lookup`` for many (path, size, mtime_ns) at once: one query per 500 paths, results in order."""
        found: dict[bytes, tuple[int, int, bytes, int, int]] = {}
        keys = [_key(path) for path, _, _ in files]
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            found.update(
                (row[0], row[1:])
                for row in self.conn.execute(
                    "SELECT path, size, mtime_ns, vectors, rows, dim FROM images "
                    f"WHERE model_id = ? AND path IN ({','.join('?' * len(part))})",
                    (model_id, *part),
                )
            )
        out: list[np.ndarray | None] = []
        for key, (_, size, mtime_ns) in zip(keys, files, strict=True):
            row = found.get(key)
            match = row is not None and row[0] == int(size) and row[1] == int(mtime_ns)
            out.append(_decode_vectors(row[2], row[3], row[4]) if match else None)
        return out

    def known_hashes(self, model_id: str) -> set[str]:
        """Content hashes that already have vectors for ``model_id`` (for renamed/copied files)."""
        return {
            str(h) for (h,) in self.conn.execute("SELECT DISTINCT hash FROM images WHERE model_id = ?", (model_id,))
        }

    def vectors_for_hash(self, content_hash: str, model_id: str) -> np.ndarray | None:
        row = self.conn.execute(
            "SELECT rows, dim, vectors FROM images WHERE hash = ? AND model_id = ? LIMIT 1", (content_hash, model_id)
        ).fetchone()
        return None if row is None else _decode_vectors(row[2], row[0], row[1])

    def get(self, path: Path, model_id: str) -> IndexedImage | None:
        row = self.conn.execute(
            "SELECT path, model_id, size, mtime_ns, hash, rows, dim, vectors FROM images "
            "WHERE path = ? AND model_id = ?",
            (_key(path), model_id),
        ).fetchone()
        return None if row is None else _row(row)

    def under(self, folders: Iterable[Path], model_id: str) -> Iterator[IndexedImage]:
        """Every row of ``model_id`` whose path is one of ``folders`` or inside one (all rows if none given)."""
        folders = [Path(os.path.abspath(f)) for f in folders]
        columns = "SELECT path, model_id, size, mtime_ns, hash, rows, dim, vectors FROM images"
        if not folders:
            yield from (_row(r) for r in self.conn.execute(f"{columns} WHERE model_id = ? ORDER BY path", (model_id,)))
            return
        seen: set[bytes] = set()
        for folder in folders:
            exact, prefix, upper = _prefix_range(folder)
            query = f"{columns} WHERE model_id = ? AND (path = ? OR (path >= ? AND path < ?)) ORDER BY path"
            for row in self.conn.execute(query, (model_id, exact, prefix, upper)):
                if row[0] not in seen:
                    seen.add(row[0])
                    yield _row(row)

    def count(self, model_id: str | None = None) -> int:
        if model_id is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        return int(self.conn.execute("SELECT COUNT(*) FROM images WHERE model_id = ?", (model_id,)).fetchone()[0])

    # -- writing ------------------------------------------------------------------------------

    def put(self, path: Path, size: int, mtime_ns: int, content_hash: str, model_id: str, vectors: np.ndarray) -> None:
        """Record ``path``'s (M, d) matrix; committed in batches (``commit_every`` rows or a few seconds)."""
        matrix = np.ascontiguousarray(vectors, dtype="<f4")
        if matrix.ndim != 2:
            raise ValueError(f"vectors must be (M, d), got {matrix.shape}")
        self.conn.execute(
            "INSERT OR REPLACE INTO images (path, model_id, size, mtime_ns, hash, rows, dim, vectors, indexed_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                _key(path),
                model_id,
                int(size),
                int(mtime_ns),
                content_hash,
                matrix.shape[0],
                matrix.shape[1],
                matrix.tobytes(),
                time.time(),
            ),
        )
        self._pending += 1
        if self._pending >= self.commit_every or time.monotonic() - self._last_commit >= self.commit_seconds:
            self.commit()

    def prune_missing(self, folders: Iterable[Path]) -> int:
        """Delete rows under ``folders`` whose file no longer exists; returns how many."""
        gone: set[bytes] = set()
        for folder in folders:
            exact, prefix, upper = _prefix_range(folder)
            for (key,) in self.conn.execute(
                "SELECT DISTINCT path FROM images WHERE path = ? OR (path >= ? AND path < ?)", (exact, prefix, upper)
            ):
                if not os.path.lexists(os.fsdecode(bytes(key))):
                    gone.add(bytes(key))
        if gone:
            self.conn.executemany("DELETE FROM images WHERE path = ?", [(p,) for p in gone])
            self.commit()
        return len(gone)

    def commit(self) -> None:
        self.conn.commit()
        self._pending = 0
        self._last_commit = time.monotonic()

    def close(self) -> None:
        try:
            self.conn.commit()
        finally:
            self.conn.close()

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def _looks_corrupt(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text or "corrupt" in text
