"""The matrix file: every indexed matrix of one model as one memory-mapped 8-bit array beside the index.

SQLite stays the source of truth; the matrix file is a cache that makes scoring a whole
index (``sdltag search``, re-tagging from the index) a few large matrix products instead
of a million decoded rows. One file per model, named ``INDEX.<model key>.matrix``::

    header (4096 bytes): magic, version, M, d, count, capacity, epoch, generation,
                         removals, max_rowid, sha256(model_id), crc32 of all of it
    rowids   int64   [capacity]            (ascending: the SQLite rowid of each matrix)
    scales   float32 [capacity, M]         (each principal vector is ``scale * its int8 row``)
    vectors  int8    [capacity, M, d]      (rows past ``count`` are unused)

**Never stale.** Every insert, update and delete of a model's rows moves its counters in
``matrix_state`` (SQLite triggers, in the change's own transaction; see ``sdltag.index``).
A reader opens the file, then reads the counters in one SQLite read transaction: the same
epoch and removals mean the file holds a prefix of the model's rows, and the rows added
since (rowid above the header's ``max_rowid``) are read from SQLite in the same
transaction; anything else and the file is not used (it is rebuilt, or the rows are read
from SQLite as before). So a result never misses a committed row nor shows a removed one.

**Never torn.** A rebuild writes a new file and renames it over the old one (readers keep
the file they opened). Appending rows writes them past ``count``, syncs them, then
rewrites the header in place; a reader takes ``count`` from a header whose crc32 checks
(it reads it again if a write was half done), so it never reads a row not yet written.
Writers take an exclusive ``flock`` on ``NAME.lock``.

Scoring runs in blocks on several threads (the int8 -> float32 cast and the matrix product
release the GIL). 8 bits per value (a quarter of SQLite's float32, half of float16, whose
cast costs three times as much here) put a score within about 1% of a principal vector's
largest value of the exact one: ``sdltag search`` re-scores its best candidates exactly from
the float32 rows in SQLite and ranks by that; re-tagging from the index (``retag``) gives
the 8-bit scores.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import sqlite3
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

T = TypeVar("T")
MAGIC = b"SDLTMTX\x01"
VERSION = 2  # 2: int8 rows with a scale each (1 held float16)
HEADER_SIZE = 4096
_HEADER = struct.Struct("<8sIIIqqqqqq32s")  # magic, version, rows M, dim d, count, capacity, epoch, gen, removals,
# max_rowid, sha256(model_id)
_CRC = struct.Struct("<I")
# What makes a CSV cell need care: a separator, quote or line break, a lone surrogate, a formula-like start
_NEEDS_CARE = re.compile(r"""[,"\r\n\ud800-\udfff]|^[=+\-@\t']""")
BLOCK = 1024  # images per block a thread scores
STEP = 256  # images cast and multiplied at once: 7 x 384 float32 = 2.7 MB, in cache (twice as fast as 1024 here)
READ_CHUNK = 2048  # SQLite rows read per query while building


def matrix_path(index_path: Path, model_id: str) -> Path:
    """Where ``model_id``'s matrix file of the index at ``index_path`` lives."""
    key = hashlib.sha256(model_id.encode()).hexdigest()[:16]
    index_path = Path(index_path)
    return index_path.with_name(f"{index_path.name}.{key}.matrix")


@dataclass(frozen=True)
class State:
    """A model's ``matrix_state`` counters (see ``sdltag.index._migration_2``)."""

    epoch: int
    generation: int
    removals: int


@dataclass(frozen=True)
class Header:
    rows: int
    dim: int
    count: int
    capacity: int
    epoch: int
    generation: int
    removals: int
    max_rowid: int
    model_hash: bytes

    def pack(self) -> bytes:
        body = _HEADER.pack(
            MAGIC,
            VERSION,
            self.rows,
            self.dim,
            self.count,
            self.capacity,
            self.epoch,
            self.generation,
            self.removals,
            self.max_rowid,
            self.model_hash,
        )
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def unpack(cls, data: bytes) -> Header | None:
        size = _HEADER.size
        if len(data) < size + _CRC.size or _CRC.unpack_from(data, size)[0] != zlib.crc32(data[:size]):
            return None
        magic, version, *fields = _HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            return None
        return cls(*fields)

    def matches(self, state: State) -> bool:
        """The file holds a prefix of the rows ``state`` describes (rows with a larger rowid may follow)."""
        return self.epoch == state.epoch and self.removals == state.removals and self.generation <= state.generation


def _pages(size: int) -> int:
    return -(-size // 4096) * 4096


def _layout(capacity: int, rows: int, dim: int) -> tuple[int, int, int, int]:
    """(rowids offset, scales offset, vectors offset, file size) for ``capacity`` matrices."""
    scales_at = HEADER_SIZE + _pages(capacity * 8)
    vectors_at = scales_at + _pages(capacity * rows * 4)
    return HEADER_SIZE, scales_at, vectors_at, vectors_at + capacity * rows * dim


def _read_header(fd: int) -> Header | None:
    for _ in range(20):  # an append may be rewriting the header this instant: read it again
        header = Header.unpack(os.pread(fd, HEADER_SIZE, 0))
        if header is not None:
            return header
        time.sleep(0.005)
    return None


class MatrixFile:
    """An open matrix file (read-only mapping); ``rowids`` and ``vectors`` cover its ``count`` matrices."""

    def __init__(self, path: Path, header: Header, mapping: mmap.mmap | None) -> None:
        self.path = path
        self.header = header
        self._mapping = mapping
        n, m, d = header.count, header.rows, header.dim
        rowids_at, scales_at, vectors_at, _ = _layout(header.capacity, m, d)
        if mapping is None:
            self.rowids = np.zeros(0, dtype="<i8")
            self.scales = np.zeros((0, m), dtype="<f4")
            self.vectors = np.zeros((0, m, d), dtype=np.int8)
        else:
            self.rowids = np.frombuffer(mapping, dtype="<i8", count=n, offset=rowids_at)
            self.scales = np.frombuffer(mapping, dtype="<f4", count=n * m, offset=scales_at).reshape(n, m)
            self.vectors = np.frombuffer(mapping, dtype=np.int8, count=n * m * d, offset=vectors_at).reshape(n, m, d)

    def dequantized(self, lo: int, hi: int) -> np.ndarray:
        """(hi - lo, M, d) float32: the stored approximation of those matrices."""
        return self.vectors[lo:hi].astype(np.float32) * self.scales[lo:hi, :, None]

    @classmethod
    def open(cls, path: Path, model_id: str) -> MatrixFile | None:
        """The file at ``path`` when it is a whole matrix file of ``model_id``, else None."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            header = _read_header(fd)
            if header is None or header.model_hash != hashlib.sha256(model_id.encode()).digest():
                return None
            size = _layout(header.capacity, header.rows, header.dim)[3]
            if os.fstat(fd).st_size < size:
                return None
            mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ) if header.count else None
            return cls(Path(path), header, mapping)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def __len__(self) -> int:
        return self.header.count


def read_state(conn: sqlite3.Connection, model_id: str) -> State | None:
    """The model's counters; None for an index without them (an older schema) or without rows of the model."""
    try:
        row = conn.execute(
            "SELECT epoch, generation, removals FROM matrix_state WHERE model_id = ?", (model_id,)
        ).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    return None if row is None else State(int(row[0]), int(row[1]), int(row[2]))


def _snapshot(index, work: Callable[[sqlite3.Connection], T]) -> T | None:
    """``work(conn)`` inside one read transaction of ``index`` (its pending writes committed first)."""
    if index.writable:
        index.commit()

    def run(conn: sqlite3.Connection) -> T:
        if conn.in_transaction:
            conn.commit()
        conn.execute("BEGIN")
        try:
            return work(conn)
        finally:
            conn.rollback()  # a read transaction: nothing to keep

    return index._do(run, lambda: None)


def _decode_rows(rows: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """SQLite (rowid, M, d, blob) rows -> (rowids (n,), float32 (n, M, d)); every row must share M and d."""
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0, 0), dtype=np.float32)
    m, d = int(rows[0][1]), int(rows[0][2])
    if any(int(r[1]) != m or int(r[2]) != d for r in rows):
        raise ValueError("matrices of different shapes")
    ids = np.fromiter((int(r[0]) for r in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(r[3] for r in rows), dtype="<f4").reshape(len(rows), m, d)
    return ids, vectors


def _rows_after(conn: sqlite3.Connection, model_id: str, after: int, limit: int | None = None) -> list[tuple]:
    query = "SELECT rowid, rows, dim, vectors FROM images WHERE model_id = ? AND rowid > ? ORDER BY rowid"
    if limit is not None:
        return conn.execute(query + " LIMIT ?", (model_id, after, limit)).fetchall()
    return conn.execute(query, (model_id, after)).fetchall()


def _quantize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, M, d) float32 -> (int8 (n, M, d), float32 scales (n, M)): each row scaled so its largest value is 127."""
    vectors = np.nan_to_num(np.asarray(vectors, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    peak = np.abs(vectors).max(axis=2) if vectors.size else np.zeros(vectors.shape[:2], dtype=np.float32)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype("<f4")
    return np.rint(vectors / scales[..., None]).astype(np.int8), scales


class _Lock:
    """An exclusive ``flock`` on ``NAME.lock`` (writers only)."""

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".lock")
        self.fd = -1

    def __enter__(self) -> _Lock:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock


def sync(index, model_id: str, *, on_build: Callable[[int], None] | None = None) -> bool:
    """Bring ``model_id``'s matrix file up to date with ``index``: append the new rows, or rebuild it.

    Returns False when it cannot (an older schema, no rows of the model, an unwritable folder,
    matrices of different shapes); the index is then read row by row as before. ``on_build(n)``
    is called before a full rebuild of ``n`` matrices (it takes a while at a million).
    """
    path = matrix_path(index.path, model_id)
    if not index.usable or not os.access(path.parent, os.W_OK):
        return False
    try:
        with _Lock(path):
            state = _snapshot(index, lambda conn: read_state(conn, model_id))
            if state is None:
                return False
            current = MatrixFile.open(path, model_id)
            if current is not None and current.header.matches(state):
                if current.header.generation == state.generation:
                    return True
                return _append(index, model_id, current)
            return _rebuild(index, model_id, path, on_build)
    except (OSError, ValueError):
        return False


def _append(index, model_id: str, current: MatrixFile) -> bool:
    """Write the rows added since ``current`` past its count, then its new header; a new file when full."""
    header = current.header

    def read(conn: sqlite3.Connection) -> tuple[State | None, list[tuple]]:
        return read_state(conn, model_id), _rows_after(conn, model_id, header.max_rowid)

    got = _snapshot(index, read)
    if got is None:
        return False
    state, rows = got
    if state is None or not header.matches(state):
        return _rebuild(index, model_id, current.path, None)
    ids, vectors = _decode_rows(rows)
    if len(ids) and vectors.shape[1:] != (header.rows, header.dim):
        return _rebuild(index, model_id, current.path, None)
    count = header.count + len(ids)
    if count > header.capacity:
        return _write_new(
            current.path, model_id, state, _chunks_of(current, ids, vectors), count, header.rows, header.dim
        )
    fd = os.open(current.path, os.O_RDWR)
    try:
        if len(ids):
            _write_rows(fd, header.capacity, header.rows, header.dim, header.count, ids, vectors)
            os.fsync(fd)
        new = Header(
            header.rows,
            header.dim,
            count,
            header.capacity,
            state.epoch,
            state.generation,
            state.removals,
            int(ids[-1]) if len(ids) else header.max_rowid,
            header.model_hash,
        )
        os.pwrite(fd, new.pack(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _write_rows(fd: int, capacity: int, rows: int, dim: int, at: int, ids: np.ndarray, vectors: Any) -> None:
    """Matrices ``at``, ``at + 1``, ... : float32 ones are quantized, (int8, scales) pairs written as they are."""
    rowids_at, scales_at, vectors_at, _ = _layout(capacity, rows, dim)
    q, scales = vectors if isinstance(vectors, tuple) else _quantize(vectors)
    os.pwrite(fd, np.ascontiguousarray(ids, dtype="<i8").tobytes(), rowids_at + at * 8)
    os.pwrite(fd, np.ascontiguousarray(scales, dtype="<f4").tobytes(), scales_at + at * rows * 4)
    os.pwrite(fd, np.ascontiguousarray(q, dtype=np.int8).tobytes(), vectors_at + at * rows * dim)


def _chunks_of(current: MatrixFile, ids: np.ndarray, vectors: np.ndarray) -> Iterator[tuple[np.ndarray, Any]]:
    for lo in range(0, len(current), 65536):
        yield current.rowids[lo : lo + 65536], (current.vectors[lo : lo + 65536], current.scales[lo : lo + 65536])
    if len(ids):
        yield ids, vectors


def _rebuild(index, model_id: str, path: Path, on_build: Callable[[int], None] | None) -> bool:
    """A new file from every row of the model, read in short transactions (writers are never held up)."""
    first = _snapshot(
        index,
        lambda conn: (
            read_state(conn, model_id),
            int(conn.execute("SELECT COUNT(*) FROM images WHERE model_id = ?", (model_id,)).fetchone()[0]),
            conn.execute("SELECT rows, dim FROM images WHERE model_id = ? LIMIT 1", (model_id,)).fetchone(),
        ),
    )
    if first is None:
        return False
    state, count, shape = first
    if state is None:
        return False
    if on_build is not None:
        on_build(count)
    rows, dim = (int(shape[0]), int(shape[1])) if shape is not None else (0, 0)  # no rows: an empty file

    # The counters read before the first row: rows added meanwhile have larger rowids (the next reader
    # reads them as added rows); a row removed meanwhile moves ``removals``, so the file is never used.
    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        after = -(2**63)
        while True:
            part = index._do(lambda conn, after=after: _rows_after(conn, model_id, after, READ_CHUNK), lambda: None)
            if part is None:
                raise ValueError("the index could not be read to the end")
            if not part:
                return
            ids, vectors = _decode_rows(part)
            if vectors.shape[1:] != (rows, dim):
                raise ValueError("matrices of different shapes")
            after = int(ids[-1])
            yield ids, vectors

    return _write_new(path, model_id, state, chunks(), count, rows, dim)


def _write_new(
    path: Path,
    model_id: str,
    state: State,
    chunks: Iterable[tuple[np.ndarray, Any]],  # (rowids, float32 matrices or (int8 rows, scales))
    expected: int,
    rows: int,
    dim: int,
) -> bool:
    """Write ``chunks`` to a new file beside ``path`` and rename it over ``path`` (room for a quarter more)."""
    capacity = max(1024, expected + expected // 4)
    size = _layout(capacity, rows, dim)[3]
    tmp = path.with_name(f".{path.name}.sdltag-tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)  # sparse: unused room takes no disk
        count, max_rowid = 0, -(2**63)
        for ids, vectors in chunks:
            if count + len(ids) > capacity:  # far more rows added while building: the next sync starts over
                return False
            _write_rows(fd, capacity, rows, dim, count, ids, vectors)
            count += len(ids)
            max_rowid = int(ids[-1])
        header = Header(
            rows,
            dim,
            count,
            capacity,
            state.epoch,
            state.generation,
            state.removals,
            max_rowid,
            hashlib.sha256(model_id.encode()).digest(),
        )
        os.pwrite(fd, header.pack(), 0)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        return True
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- reading: the whole model's matrices -----------------------------------------------------------


@dataclass
class IndexView:
    """Every matrix of one model at one moment: the matrix file's prefix and the rows added since (float32)."""

    file: MatrixFile
    tail_ids: np.ndarray  # (T,)
    tail_vectors: np.ndarray  # (T, M, d) float32
    state: State

    def __len__(self) -> int:
        return len(self.file) + len(self.tail_ids)

    @property
    def rowids(self) -> np.ndarray:
        return np.concatenate([self.file.rowids, self.tail_ids]) if len(self.tail_ids) else self.file.rowids

    def blocks(self, block: int = BLOCK) -> list[tuple[int, int]]:
        n = len(self)
        return [(lo, min(lo + block, n)) for lo in range(0, n, block)]

    def vectors(self, lo: int, hi: int) -> np.ndarray:
        """(hi - lo, M, d) float32 of the images at positions [lo, hi) (the file's, dequantized)."""
        n = len(self.file)
        parts = []
        if lo < n:
            parts.append(self.file.dequantized(lo, min(hi, n)))
        if hi > n:
            parts.append(self.tail_vectors[max(lo - n, 0) : hi - n])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def block_scores(self, lo: int, hi: int, weights: np.ndarray) -> np.ndarray:
        """(hi - lo, L) raw scores of the images at [lo, hi) against ``weights`` (d, L)."""
        n = len(self.file)
        parts = []
        if lo < n:
            top = min(hi, n)
            part = np.empty((top - lo, weights.shape[1]), dtype=np.float32)
            for at in range(lo, top, STEP):  # small steps: the cast rows stay in the CPU cache for the product
                q, scales = self.file.vectors[at : min(at + STEP, top)], self.file.scales[at : min(at + STEP, top)]
                b, m, d = q.shape
                products = q.reshape(-1, d).astype(np.float32) @ weights  # (b * M, L)
                products *= scales.reshape(-1, 1)
                part[at - lo : at - lo + b] = products.reshape(b, m, -1).max(axis=1)
            parts.append(part)
        if hi > n:
            x = self.tail_vectors[max(lo - n, 0) : hi - n]
            b, m, d = x.shape
            parts.append((x.reshape(-1, d) @ weights).reshape(b, m, -1).max(axis=1))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def scores(self, label_vectors: np.ndarray, *, threads: int | None = None) -> np.ndarray:
        """(N, L) raw SDL scores of every image against ``label_vectors`` (L, d), in blocks on threads."""
        weights = np.ascontiguousarray(np.asarray(label_vectors, dtype=np.float32).T)  # (d, L)
        out = np.empty((len(self), weights.shape[1]), dtype=np.float32)

        def score(span: tuple[int, int]) -> None:
            out[span[0] : span[1]] = self.block_scores(*span, weights)

        run_blocks(score, self.blocks(), threads)
        return out


def run_blocks(work: Callable[[tuple[int, int]], None], spans: list[tuple[int, int]], threads: int | None) -> None:
    """``work`` over ``spans`` on ``threads`` threads (default: one per CPU)."""
    threads = max(1, min(threads or os.cpu_count() or 1, len(spans)))
    if threads == 1:
        for span in spans:
            work(span)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sdltag-matrix") as pool:
        for _ in pool.map(work, spans):
            pass


def load(index, model_id: str, *, update: bool = True, on_build: Callable[[int], None] | None = None):
    """The model's ``IndexView``, or None when there is no usable matrix file (read the rows instead).

    With ``update`` the file is first brought up to date (``sync``) when its folder is writable.
    """
    path = matrix_path(index.path, model_id)
    if update:
        sync(index, model_id, on_build=on_build)
    for _ in range(3):  # a rebuild renamed in between opening the file and reading the counters: again
        current = MatrixFile.open(path, model_id)
        if current is None:
            return None

        def read(conn: sqlite3.Connection, header: Header = current.header):
            state = read_state(conn, model_id)
            if state is None or not header.matches(state):
                return state, None
            return state, (
                _rows_after(conn, model_id, header.max_rowid) if header.generation < state.generation else []
            )

        got = _snapshot(index, read)
        if got is None:
            return None
        state, rows = got
        if state is None:
            return None
        if rows is None:
            continue
        ids, vectors = _decode_rows(rows)
        if len(ids) and vectors.shape[1:] != current.vectors.shape[1:]:
            return None
        if not len(ids):
            vectors = np.zeros((0, *current.vectors.shape[1:]), dtype=np.float32)
        return IndexView(current, ids, np.ascontiguousarray(vectors, dtype=np.float32), state)
    return None


def rowids_under(index, folders: list[Path], model_id: str) -> np.ndarray | None:
    """The rowids of ``model_id``'s rows whose path is one of ``folders`` or inside one (sorted)."""
    from sdltag.index import _prefix_range

    def work(conn: sqlite3.Connection) -> np.ndarray:
        found: list[int] = []
        for folder in folders:
            exact, prefix, upper = _prefix_range(folder)
            found.extend(
                r
                for (r,) in conn.execute(
                    "SELECT rowid FROM images WHERE model_id = ? AND (path = ? OR (path >= ? AND path < ?))",
                    (model_id, exact, prefix, upper),
                )
            )
        return np.unique(np.array(found, dtype=np.int64))

    return index._do(work, lambda: None)


def rows_by_id(index, model_id: str, rowids: Iterable[int], state: State) -> dict[int, tuple[Path, np.ndarray]] | None:
    """``rowid -> (path, float32 (M, d))`` for ``rowids``; None when the model's rows were removed or
    replaced since ``state`` (a rowid might then name another row)."""

    def work(conn: sqlite3.Connection):
        now = read_state(conn, model_id)
        if now is None or now.epoch != state.epoch or now.removals != state.removals:
            return None
        found: dict[int, tuple[Path, np.ndarray]] = {}
        ids = [int(r) for r in rowids]
        for lo in range(0, len(ids), 500):
            part = ids[lo : lo + 500]
            for rowid, path, m, d, blob in conn.execute(
                f"SELECT rowid, path, rows, dim, vectors FROM images WHERE model_id = ? "
                f"AND rowid IN ({','.join('?' * len(part))})",
                (model_id, *part),
            ):
                vectors = np.frombuffer(blob, dtype="<f4").reshape(int(m), int(d))
                found[int(rowid)] = (Path(os.fsdecode(bytes(path))), vectors)
        return found

    return _snapshot(index, work)


def paths_by_id(index, model_id: str) -> dict[int, str]:
    """``rowid -> path`` (as text) of every row of the model (one scan of the path index, no vectors)."""

    def work(conn: sqlite3.Connection) -> dict[int, str]:
        return {
            int(r): os.fsdecode(bytes(p))
            for r, p in conn.execute("SELECT rowid, path FROM images WHERE model_id = ?", (model_id,))
        }

    return index._do(work, dict)


# -- search and re-tagging ----------------------------------------------------------------------


def rank(index, model, label_space, folders: list[Path], top: int, *, raw_scores: bool, threshold: float | None):
    """``sdltag search`` from the matrix file: the ``top`` hits, or None when there is no usable file.

    Every matrix is scored from the 8-bit file; the best candidates (at least ``2 * top + 64``)
    are re-scored exactly from their float32 rows in SQLite and ranked by that (ties by path), and
    only the files about to be shown are checked for existence.
    """
    from sdltag.scoring import calibrate, sdl_scores
    from sdltag.writers import SearchHit

    view = load(index, model.model_id)
    if view is None:
        return None
    calibration = None if raw_scores else model.manifest.calibration
    mask = label_space.unseen_mask

    def confidence(raw: np.ndarray) -> np.ndarray:
        return calibrate(raw.reshape(-1, 1), mask, calibration)[:, 0]

    approx = confidence(view.scores(label_space.vectors)[:, 0])
    rowids = view.rowids
    if folders:
        wanted = rowids_under(index, folders, model.model_id)
        if wanted is None:
            return None
        keep = np.isin(rowids, wanted)
        approx, rowids = approx[keep], rowids[keep]
    kind = "unseen" if bool(mask[0]) else "seen"
    want = 2 * top + 64
    while True:
        want = min(want, len(rowids))
        if want == 0:
            return []
        picked = np.argpartition(-approx, want - 1)[:want] if want < len(rowids) else np.arange(len(rowids))
        found = rows_by_id(index, model.model_id, rowids[picked], view.state)
        if found is None:
            return None  # rows removed meanwhile: the caller reads them row by row
        ids = [int(r) for r in rowids[picked] if int(r) in found]
        if ids:
            exact = confidence(sdl_scores(np.stack([found[r][1] for r in ids]), label_space.vectors)[:, 0])
        else:
            exact = np.zeros(0, dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: (-float(exact[i]), os.fsencode(found[ids[i]][0])))
        hits: list[SearchHit] = []
        for i in order:
            if threshold is not None and exact[i] < threshold:
                return hits  # the rest of the candidates score lower, and those not taken lower still
            path = found[ids[i]][0]
            if not path.exists():
                continue
            hits.append(SearchHit(len(hits) + 1, path, float(exact[i]), label_space.names[0], kind))
            if len(hits) >= top:
                return hits
        if want >= len(rowids):
            return hits
        want *= 4  # too many of the best have gone: look further down


def retag(
    index,
    model,
    label_space,
    stream: IO[str],
    *,
    top_k: int = 10,
    raw_scores: bool = False,
    threads: int | None = None,
) -> int | None:
    """Score every indexed image of ``model`` against ``label_space`` from the matrix file (the image model
    never runs) and write the ``top_k`` labels of each as CSV ``path,rank,label,score,kind``.

    Scores come from the 8-bit file (within about 1% of the largest value of a principal vector).
    Returns how many images were written, or None when there is no usable matrix file.
    """
    from numpy.dtypes import StringDType

    from sdltag.scoring import calibrate

    view = load(index, model.model_id)
    if view is None:
        return None
    cells = {rowid: _csv_cell(path) + "," for rowid, path in paths_by_id(index, model.model_id).items()}
    calibration = None if raw_scores else model.manifest.calibration
    text = StringDType()
    kinds = ["unseen" if u else "seen" for u in label_space.unseen_mask]
    labels = np.array([f"{_csv_cell(n)}," for n in label_space.names], dtype=text)
    tails = np.array([f",{kind}\n" for kind in kinds], dtype=text)
    k = max(0, min(top_k, len(kinds)))
    if k == 0:
        return 0
    ranks = np.array([f"{r}," for r in range(1, k + 1)], dtype=text)
    rowids = view.rowids
    stream.write("path,rank,label,score,kind\n")
    weights = np.ascontiguousarray(label_space.vectors.T, dtype=np.float32)

    def block(span: tuple[int, int]) -> tuple[str, int]:
        """The CSV text of the images at [lo, hi) (built with numpy's string functions, not row by row)."""
        lo, hi = span
        conf = calibrate(view.block_scores(lo, hi, weights), label_space.unseen_mask, calibration)
        if k < conf.shape[1]:
            best = np.argpartition(-conf, k - 1, axis=1)[:, :k]
        else:
            best = np.tile(np.arange(k), (hi - lo, 1))
        best_scores = np.take_along_axis(conf, best, axis=1)
        order = np.lexsort((best, -best_scores), axis=1)
        best, best_scores = np.take_along_axis(best, order, axis=1), np.take_along_axis(best_scores, order, axis=1)
        found = [cells.get(r) for r in rowids[lo:hi].tolist()]
        keep = np.array([c is not None for c in found], dtype=bool)
        paths = np.array([c for c in found if c is not None], dtype=text)
        best, best_scores = best[keep], best_scores[keep]
        fixed = np.rint(best_scores.astype(np.float64) * 10_000).astype(np.int64)  # 4 decimals
        size = np.abs(fixed)
        digits = np.strings.zfill((size % 10_000).astype(text), 4)
        score = np.where(fixed < 0, "-", "").astype(text) + (size // 10_000).astype(text) + "." + digits
        lines = np.repeat(paths, k).reshape(-1, k) + ranks[None, :] + labels[best] + score + tails[best]
        return "".join(lines.ravel().tolist()), len(paths)

    written = 0
    threads = max(1, threads or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sdltag-matrix") as pool:
        for chunk, images in pool.map(block, view.blocks(4 * BLOCK)):
            stream.write(chunk)
            written += images
    return written


def _csv_cell(value: str) -> str:
    """One CSV cell: a spreadsheet formula start defused (``writers.csv_escape``), quoted when it must be."""
    if not _NEEDS_CARE.search(value):
        return value  # the common case, a million times over: nothing to do
    from sdltag.writers import clean_text, csv_escape

    value = csv_escape(clean_text(value))
    if any(c in value for c in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value
