"""The matrix file: every indexed matrix of one model as one memory-mapped 8-bit array beside the index.

SQLite stays the source of truth; the matrix file is a cache that makes scoring a whole
index (``sdltag search``, re-tagging from the index) a few large matrix products instead
of a million decoded rows. One file per model, named ``INDEX.<model key>.matrix``::

    header (4096 bytes): magic, version, M, d, count, capacity, epoch, generation,
                         removals, max_rowid, sha256(model_id), crc32 of all of it
    rowids   int64   [capacity]            (ascending: the SQLite rowid of each matrix)
    scales   float32 [capacity, M]         (each principal vector is ``scale * (row + residual / 254)``)
    vectors  int8    [capacity, M, d]      (rows past ``count`` are unused)
    residual int8    [capacity, M, d]      (what the 8-bit row left out, in 1/254 of its step)

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
release the GIL). ``sdltag search`` scores the 8-bit rows alone (a score within about 1% of a
principal vector's largest value of the exact one; the residuals are never read) and re-scores
its best candidates exactly from the float32 rows in SQLite. Re-tagging (``retag``, ``top_labels``)
adds the residuals: each value is then within 1/508 of its row's step (``scale``), so a score is
within ``max scale / 508 * sum |w|`` of the exact one (``sum |w|`` <= sqrt(d) for a unit label
vector), and an image whose best labels are closer than that to each other is re-scored exactly
from SQLite.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import mmap
import os
import re
import sqlite3
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from sdltag.scoring import calibrate, sdl_scores

T = TypeVar("T")
MAGIC = b"SDLTMTX\x01"
VERSION = 3  # 3: int8 rows and residuals with a scale each (2: without residuals; 1: float16)
HEADER_SIZE = 4096
_HEADER = struct.Struct("<8sIIIqqqqqq32s")  # magic, version, rows M, dim d, count, capacity, epoch, gen, removals,
# max_rowid, sha256(model_id)
_CRC = struct.Struct("<I")
# What makes a CSV cell need care: a separator, quote or line break, a lone surrogate, a formula-like start
_NEEDS_CARE = re.compile(r"""[,"\r\n\ud800-\udfff]|^[=+\-@\t']""")
# the columns of `sdltag tag -f csv` (writers.CSV_HEADER)
RETAG_CSV_HEADER = "path,rank,label,score,kind,path_bytes\n"
# The same anywhere in names joined by NULs (a start is the text's start or just after a NUL)
_NEEDS_CARE_ANYWHERE = re.compile(r"""[,"\r\n\ud800-\udfff]|(?:^|(?<=\0))[=+\-@\t']""")
BLOCK = 1024  # images per block a thread scores
STEP = 256  # images cast and multiplied at once: 7 x 384 float32 = 2.7 MB, in cache (twice as fast as 1024 here)
AHEAD = 32  # blocks scored ahead of the one being written (room for the caller's own work meanwhile)
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


_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of ``shape`` that this thread reuses (contents undefined)."""
    size = int(np.prod(shape))
    buffer = getattr(_SCRATCH, name, None)
    if buffer is None or buffer.size < size:
        buffer = np.empty(max(size, 1), dtype=np.float32)
        setattr(_SCRATCH, name, buffer)
    return buffer[:size].reshape(shape)


def _pages(size: int) -> int:
    return -(-size // 4096) * 4096


def _layout(capacity: int, rows: int, dim: int) -> tuple[int, int, int, int, int]:
    """(rowids, scales, vectors, residuals offsets, file size) for ``capacity`` matrices."""
    scales_at = HEADER_SIZE + _pages(capacity * 8)
    vectors_at = scales_at + _pages(capacity * rows * 4)
    residuals_at = vectors_at + _pages(capacity * rows * dim)
    return HEADER_SIZE, scales_at, vectors_at, residuals_at, residuals_at + capacity * rows * dim


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
        rowids_at, scales_at, vectors_at, residuals_at, _ = _layout(header.capacity, m, d)
        if mapping is None:
            self.rowids = np.zeros(0, dtype="<i8")
            self.scales = np.zeros((0, m), dtype="<f4")
            self.vectors = np.zeros((0, m, d), dtype=np.int8)
            self.residuals = np.zeros((0, m, d), dtype=np.int8)
        else:
            self.rowids = np.frombuffer(mapping, dtype="<i8", count=n, offset=rowids_at)
            self.scales = np.frombuffer(mapping, dtype="<f4", count=n * m, offset=scales_at).reshape(n, m)
            self.vectors = np.frombuffer(mapping, dtype=np.int8, count=n * m * d, offset=vectors_at).reshape(n, m, d)
            self.residuals = np.frombuffer(mapping, dtype=np.int8, count=n * m * d, offset=residuals_at).reshape(
                n, m, d
            )

    def rows(self, lo: int, hi: int, *, fine: bool, scratch: bool = False) -> np.ndarray:
        """(hi - lo, M, d) float32 in units of each row's scale: the 8-bit rows, plus the residuals when ``fine``.

        With ``scratch`` the result lives in this thread's scratch buffer (valid until its next call): fresh
        arrays of a few MB each step cost more here than the cast itself (new pages every time).
        """
        shape = (hi - lo, self.header.rows, self.header.dim)
        x = _scratch("rows", shape) if scratch else np.empty(shape, dtype=np.float32)
        np.copyto(x, self.vectors[lo:hi], casting="unsafe")
        if fine:
            r = _scratch("residuals", shape)
            np.copyto(r, self.residuals[lo:hi], casting="unsafe")
            r *= np.float32(1 / 254)
            x += r
        return x

    def dequantized(self, lo: int, hi: int) -> np.ndarray:
        """(hi - lo, M, d) float32: the stored approximation of those matrices (8-bit rows and residuals)."""
        return self.rows(lo, hi, fine=True) * self.scales[lo:hi, :, None]

    def release(self, lo: int, hi: int) -> None:
        """Let the pages of matrices [lo, hi) leave this process's memory (they stay in the file cache)."""
        if self._mapping is None or not hasattr(self._mapping, "madvise") or hi <= lo:
            return
        m, d = self.header.rows, self.header.dim
        for start in _layout(self.header.capacity, m, d)[2:4]:
            first = (start + lo * m * d) // mmap.PAGESIZE * mmap.PAGESIZE
            last = (start + hi * m * d) // mmap.PAGESIZE * mmap.PAGESIZE  # the page holding row hi stays
            if last > first:
                self._mapping.madvise(mmap.MADV_DONTNEED, first, last - first)

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
            size = _layout(header.capacity, header.rows, header.dim)[4]
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


def _quantize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, M, d) float32 -> (int8 rows, int8 residuals (n, M, d), float32 scales (n, M)).

    Each row is scaled so its largest value is 127; ``scale * (row + residual / 254)`` is within
    ``scale / 508`` of each value (the 8-bit row is within ``scale / 2``).
    """
    vectors = np.nan_to_num(np.asarray(vectors, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    peak = np.abs(vectors).max(axis=2) if vectors.size else np.zeros(vectors.shape[:2], dtype=np.float32)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype("<f4")
    scaled = vectors / scales[..., None]  # float32: rounding moves a value by 0.2% of its 1/508 at most
    q = np.clip(np.rint(scaled), -127, 127)
    scaled -= q
    scaled *= 254
    residuals = np.clip(np.rint(scaled, out=scaled), -127, 127, out=scaled)
    return q.astype(np.int8), residuals.astype(np.int8), scales


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
    """Matrices ``at``, ``at + 1``, ... : float32 ones are quantized, (rows, residuals, scales) written as they are."""
    rowids_at, scales_at, vectors_at, residuals_at, _ = _layout(capacity, rows, dim)
    q, residuals, scales = vectors if isinstance(vectors, tuple) else _quantize(vectors)
    os.pwrite(fd, np.ascontiguousarray(ids, dtype="<i8").tobytes(), rowids_at + at * 8)
    os.pwrite(fd, np.ascontiguousarray(scales, dtype="<f4").tobytes(), scales_at + at * rows * 4)
    os.pwrite(fd, np.ascontiguousarray(q, dtype=np.int8).tobytes(), vectors_at + at * rows * dim)
    os.pwrite(fd, np.ascontiguousarray(residuals, dtype=np.int8).tobytes(), residuals_at + at * rows * dim)


def _chunks_of(current: MatrixFile, ids: np.ndarray, vectors: np.ndarray) -> Iterator[tuple[np.ndarray, Any]]:
    for lo in range(0, len(current), 65536):
        part = slice(lo, lo + 65536)
        yield current.rowids[part], (current.vectors[part], current.residuals[part], current.scales[part])
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


def _remove_debris(path: Path) -> None:
    """Remove the half-written files of rebuilds whose process was killed (gigabytes at a million photos)."""
    from sdltag.paths import pid_alive

    prefix = f".{path.name}.sdltag-tmp-"
    for leftover in path.parent.glob(glob_escape(prefix) + "*"):
        pid = leftover.name[len(prefix) :]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _write_new(
    path: Path,
    model_id: str,
    state: State,
    chunks: Iterable[tuple[np.ndarray, Any]],  # (rowids, float32 matrices or (int8 rows, residuals, scales))
    expected: int,
    rows: int,
    dim: int,
) -> bool:
    """Write ``chunks`` to a new file beside ``path`` and rename it over ``path`` (room for a quarter more)."""
    capacity = max(1024, expected + expected // 4)
    size = _layout(capacity, rows, dim)[4]
    _remove_debris(path)
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

    def rowids_at(self, lo: int, hi: int) -> np.ndarray:
        """The rowids of the images at positions [lo, hi)."""
        n = len(self.file)
        if hi <= n:
            return self.file.rowids[lo:hi]
        return np.concatenate([self.file.rowids[lo:n], self.tail_ids[max(lo - n, 0) : hi - n]])

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

    def block_scores(self, lo: int, hi: int, weights: np.ndarray, *, fine: bool = False) -> np.ndarray:
        """(hi - lo, L) raw scores of the images at [lo, hi) against ``weights`` (d, L): from the 8-bit rows,
        or with ``fine`` from the rows and their residuals (within ``scale / 508`` per value)."""
        n = len(self.file)
        parts = []
        if lo < n:
            top = min(hi, n)
            part = np.empty((top - lo, weights.shape[1]), dtype=np.float32)
            for at in range(lo, top, STEP):  # small steps: the cast rows stay in the CPU cache for the product
                end = min(at + STEP, top)
                x = self.file.rows(at, end, fine=fine, scratch=True)
                b, m, d = x.shape
                products = np.matmul(x.reshape(-1, d), weights, out=_scratch("products", (b * m, weights.shape[1])))
                products *= self.file.scales[at:end].reshape(-1, 1)
                part[at - lo : at - lo + b] = products.reshape(b, m, -1).max(axis=1)
            parts.append(part)
        if hi > n:
            x = self.tail_vectors[max(lo - n, 0) : hi - n]
            b, m, d = x.shape
            parts.append((x.reshape(-1, d) @ weights).reshape(b, m, -1).max(axis=1))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def error_bound(self, lo: int, hi: int, weights: np.ndarray) -> np.ndarray:
        """(hi - lo,) how far a ``fine`` raw score of each image can be from the exact one (the tail's are exact)."""
        l1 = float(np.abs(weights).sum(axis=0).max()) if weights.size else 0.0
        bound = np.zeros(hi - lo, dtype=np.float64)
        n = len(self.file)
        if lo < n and self.file.scales.size:
            bound[: min(hi, n) - lo] = self.file.scales[lo : min(hi, n)].max(axis=1) * (l1 / 508)
        return bound

    def scores(self, label_vectors: np.ndarray, *, threads: int | None = None) -> np.ndarray:
        """(N, L) raw SDL scores of every image against ``label_vectors`` (L, d), in blocks on threads."""
        weights = np.ascontiguousarray(np.asarray(label_vectors, dtype=np.float32).T)  # (d, L)
        out = np.empty((len(self), weights.shape[1]), dtype=np.float32)

        def score(span: tuple[int, int]) -> None:
            out[span[0] : span[1]] = self.block_scores(*span, weights)  # pages kept: releasing them costs 20% here

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


def paths_by_id(index, model_id: str) -> tuple[np.ndarray, list[str]]:
    """(rowids, paths as text) of every row of the model, sorted by rowid (one scan of the path index)."""

    def work(conn: sqlite3.Connection) -> tuple[np.ndarray, list[str]]:
        rows = conn.execute("SELECT rowid, path FROM images WHERE model_id = ?", (model_id,)).fetchall()
        ids = np.fromiter((r for r, _ in rows), dtype=np.int64, count=len(rows))
        if not rows:
            return ids, []
        # one decode of all the names (they hold no NUL), not a million
        paths = b"\0".join(p for _, p in rows).decode("utf-8", "surrogateescape").split("\0")
        order = np.argsort(ids, kind="stable")
        return ids[order], [paths[i] for i in order.tolist()]

    return index._do(work, lambda: (np.zeros(0, dtype=np.int64), []))


def vectors_by_id(index, model_id: str, rowids: np.ndarray, state: State) -> np.ndarray | None:
    """(len(rowids), M, d) float32 rows of ``rowids`` from SQLite; None when one is gone or the model's rows
    were removed or replaced since ``state``."""
    wanted = [int(r) for r in rowids]

    def work(conn: sqlite3.Connection) -> dict[int, tuple[int, int, bytes]] | None:
        now = read_state(conn, model_id)
        if now is None or now.epoch != state.epoch or now.removals != state.removals:
            return None
        found: dict[int, tuple[int, int, bytes]] = {}
        for lo in range(0, len(wanted), 500):
            part = wanted[lo : lo + 500]
            query = f"SELECT rowid, rows, dim, vectors FROM images WHERE rowid IN ({','.join('?' * len(part))})"
            found.update((r, (m, d, v)) for r, m, d, v in conn.execute(query + " AND model_id = ?", (*part, model_id)))
        return found

    found = _snapshot(index, work)
    if found is None or any(r not in found for r in wanted):
        return None
    return _decode_rows([(r, *found[r]) for r in wanted])[1]


# -- search and re-tagging ----------------------------------------------------------------------


def rank(index, model, label_space, folders: list[Path], top: int, *, raw_scores: bool, threshold: float | None):
    """``sdltag search`` from the matrix file: the ``top`` hits, or None when there is no usable file.

    Every matrix is scored from the 8-bit file; the best candidates (at least ``2 * top + 64``)
    are re-scored exactly from their float32 rows in SQLite and ranked by that (ties by path), and
    only the files about to be shown are checked for existence.
    """
    from sdltag.results import SearchHit

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


@dataclass
class BestLabels:
    """The ``k`` best labels of some images, best first (ties by label index)."""

    rowids: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n, k) label indexes
    scores: np.ndarray  # (n, k) float32 (confidences unless raw)
    exact: np.ndarray  # (n,) bool: re-scored from the float32 rows (the others are within the bound)


def _best(conf: np.ndarray, take: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``take`` largest of ``conf`` (n, L) as (label indexes, values), best first, ties by index."""
    n, size = conf.shape
    if take < size:
        picked = np.argpartition(-conf, take - 1, axis=1)[:, :take]
    else:
        picked = np.broadcast_to(np.arange(size), (n, size))
    values = np.take_along_axis(conf, picked, axis=1)
    order = np.lexsort((picked, -values), axis=1)
    return np.take_along_axis(picked, order, axis=1), np.take_along_axis(values, order, axis=1)


def _slope(calibration: dict | None, unseen_mask: np.ndarray) -> float:
    """The largest slope of the calibration (a Platt sigmoid changes by at most ``|a| / 4`` per raw unit)."""
    if not calibration:
        return 1.0
    seen = calibration["seen"]
    slopes = [abs(float((calibration.get("unseen") or seen)["a"]))] if np.any(unseen_mask) else []
    if not np.all(unseen_mask):
        slopes.append(abs(float(seen["a"])))
    return max(slopes) / 4


class _Ranker:
    """Scores blocks of an ``IndexView`` (8-bit rows and residuals), keeps each image's ``k`` best labels, and
    marks the images whose set of ``k`` best labels the error bound could change."""

    def __init__(self, view: IndexView, label_space, calibration: dict | None, k: int) -> None:
        self.view = view
        self.mask = np.asarray(label_space.unseen_mask, dtype=bool)
        self.vectors = np.asarray(label_space.vectors, dtype=np.float32)
        self.weights = np.ascontiguousarray(self.vectors.T)
        self.calibration = calibration
        self.k = k
        self.take = min(k + 1, self.weights.shape[1])  # one more: the cut after the k-th is checked too
        self.slope = _slope(calibration, self.mask)

    def block(self, span: tuple[int, int]) -> tuple[BestLabels, np.ndarray]:
        lo, hi = span
        raw = self.view.block_scores(lo, hi, self.weights, fine=True)
        self.view.file.release(lo, min(hi, len(self.view.file)))
        bound = self.view.error_bound(lo, hi, self.weights) * self.slope * 1.01  # 1%: float32 rounding
        labels, values = _best(calibrate(raw, self.mask, self.calibration), self.take)
        if self.take > self.k:  # which labels are the k best is settled; their order, within the bound
            unsure = values[:, self.k - 1] - values[:, self.k] <= 2 * bound
        else:
            unsure = np.zeros(len(values), dtype=bool)
        best = BestLabels(self.view.rowids_at(lo, hi), labels[:, : self.k], values[:, : self.k], bound == 0)
        return best, unsure

    def settle(self, best: BestLabels, unsure: np.ndarray, index, model_id: str) -> BestLabels:
        """The unsure images re-scored from their float32 rows in SQLite (left as they are if rows changed)."""
        if not unsure.any():
            return best
        rows = vectors_by_id(index, model_id, best.rowids[unsure], self.view.state)
        if rows is None:
            return best
        raw = sdl_scores(rows, self.vectors)
        labels, values = _best(calibrate(raw, self.mask, self.calibration), self.k)
        best.labels[unsure], best.scores[unsure], best.exact[unsure] = labels, values, True
        return best


def top_labels(
    index,
    model,
    label_space,
    *,
    top_k: int = 10,
    raw_scores: bool = False,
    threads: int | None = None,
    block: int = 4 * BLOCK,
    rowids: np.ndarray | None = None,
) -> Iterator[BestLabels] | None:
    """Every indexed image of ``model`` scored against ``label_space`` from the matrix file (the image model
    never runs): the ``top_k`` labels of each, in blocks in rowid order; None when there is no usable file.

    The labels and their order are those of the exact float32 scores: scores come from the 8-bit rows and
    their residuals (within ``MatrixFile.error_bound``), and an image whose best labels are within twice
    that of each other (or of the next label) is re-scored from its float32 row in SQLite. With ``rowids``
    (sorted), only the blocks holding one of them are scored (they may hold other images too).
    """
    view = load(index, model.model_id)
    if view is None:
        return None
    k = max(0, min(top_k, len(label_space.names)))
    calibration = None if raw_scores else model.manifest.calibration
    ranker = _Ranker(view, label_space, calibration, k)
    spans = view.blocks(block)
    if rowids is not None:
        held = np.isin(view.rowids, rowids, assume_unique=True)
        spans = [(lo, hi) for lo, hi in spans if held[lo:hi].any()]
    return _ranked(ranker, spans, index, model.model_id, threads) if k else iter(())


def _ranked(ranker: _Ranker, spans: list[tuple[int, int]], index, model_id: str, threads: int | None):
    threads = max(1, min(threads or os.cpu_count() or 1, len(spans) or 1))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sdltag-matrix") as pool:
        pending: deque = deque()
        try:
            for span in spans:
                pending.append(pool.submit(ranker.block, span))
                if len(pending) > AHEAD:  # blocks ahead (half a MB each), not the whole index in memory
                    best, unsure = pending.popleft().result()
                    yield ranker.settle(best, unsure, index, model_id)
            while pending:
                best, unsure = pending.popleft().result()
                yield ranker.settle(best, unsure, index, model_id)
        finally:
            for future in pending:
                future.cancel()


class _CsvText:
    """CSV lines ``path,rank,label,score,kind,path_bytes`` of many images at once (the columns of ``sdltag tag -f
    csv``): each line is three ready-made pieces (the path cell, the rank and label cells, the score and kind
    cells with an empty ``path_bytes``) joined, so the work per line is a few table look-ups rather than
    formatting. Only when some name is not valid UTF-8 does a fourth piece per line carry ``path_bytes``."""

    def __init__(
        self,
        index,
        model_id: str,
        label_space,
        k: int,
        wanted: np.ndarray | None = None,
        threshold: float | None = None,
    ) -> None:
        names = [_csv_cell(n) for n in label_space.names]
        self.unseen = np.asarray(label_space.unseen_mask, dtype=np.int64)
        self.ranks = np.arange(k) * len(names)
        self.rank_label = np.array([f"{r},{n}," for r in range(1, k + 1) for n in names], dtype=object)
        self.low, self.score_kind = 0, np.zeros(0, dtype=object)
        ids, cells, ends = _path_cells(index, model_id)
        if wanted is not None:  # the other images have no path here, so no lines
            keep = np.isin(ids, wanted, assume_unique=True)
            ids, cells = ids[keep], cells[keep]
            ends = None if ends is None else ends[keep]
        self.ids, self.cells, self.threshold = ids, cells, threshold
        self.ends = ends  # per image: "<path_bytes>\n", or None when every name is UTF-8 (the line ends ",\n")

    def _scores_table(self, low: int, high: int) -> None:
        """``score_kind[2 * (fixed - low) + unseen]`` = ``"0.1234,seen\\n"`` for ``fixed`` (score * 10^4) in range."""
        if self.score_kind.size and self.low <= low and high < self.low + self.score_kind.size // 2:
            return
        if self.score_kind.size:  # twice the room each time: a few tables at most
            old_low, old_high = self.low, self.low + self.score_kind.size // 2 - 1
            low, high = min(low, 2 * old_low - old_high), max(high, 2 * old_high - old_low)
        low, high = min(low, -10_000), max(high, 20_000)  # at least [-1, 2]
        texts = []
        for fixed in range(low, high + 1):
            size = abs(fixed)
            text = f"{'-' if fixed < 0 else ''}{size // 10_000}.{size % 10_000:04d}"
            end = "," if self.ends is not None else ",\n"  # path_bytes: the fourth piece, or empty
            texts += [f"{text},seen{end}", f"{text},unseen{end}"]
        self.low, self.score_kind = low, np.array(texts, dtype=object)

    def lines(self, best: BestLabels) -> tuple[str, int]:
        """The CSV text of ``best``'s images and how many there were (rows without a path are left out)."""
        at = np.searchsorted(self.ids, best.rowids)
        keep = at < len(self.ids)
        keep[keep] = self.ids[at[keep]] == best.rowids[keep]
        labels, scores = best.labels[keep], best.scores[keep]
        n, k = labels.shape
        if n == 0 or k == 0:
            return "", n
        fixed = np.rint(scores.astype(np.float64) * 10_000).astype(np.int64)  # 4 decimals
        self._scores_table(int(fixed.min()), int(fixed.max()))
        pieces = np.empty((n, k, 3 if self.ends is None else 4), dtype=object)
        pieces[:, :, 0] = self.cells[at[keep]][:, None]
        pieces[:, :, 1] = self.rank_label[self.ranks + labels]
        pieces[:, :, 2] = self.score_kind[2 * (fixed - self.low) + self.unseen[labels]]
        if self.ends is not None:
            pieces[:, :, 3] = self.ends[at[keep]][:, None]
        if self.threshold is not None:  # best first: the tags left out are each image's last ones
            return "".join(pieces[scores >= self.threshold].ravel().tolist()), n
        return "".join(pieces.ravel().tolist()), n


def _may_need_care(text: str) -> bool:
    """Whether any of the NUL-joined names might need CSV care: a few C-speed scans instead of a regex (2 s at a
    million names), which then runs only when one of them finds something."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: undecodable bytes in a name
            return True
    return text.startswith(tuple("=+-@\t'")) or any(
        c in text for c in (",", '"', "\r", "\n", *("\0" + c for c in "=+-@\t'"))
    )


def _path_cells(index, model_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(sorted rowids, their ``path,`` CSV cells as objects, and their ``path_bytes\n`` line ends when some name
    is not valid UTF-8, else None) of every row of the model."""
    ids, paths = paths_by_id(index, model_id)
    text = "\0".join(paths)
    hits = [m.start() for m in _NEEDS_CARE_ANYWHERE.finditer(text)] if _may_need_care(text) else []
    sizes = np.fromiter((len(p) + 1 for p in paths), dtype=np.int64, count=len(paths)) if hits else np.zeros(0, int)
    starts = np.cumsum(sizes)
    ends = None
    for i in set(np.searchsorted(starts, hits, side="right").tolist()):
        raw = paths[i].encode("utf-8", "surrogateescape")  # os.fsencode: the name's bytes
        if raw.decode("utf-8", "replace") != paths[i]:  # undecodable bytes: kept exactly, as `tag -f csv` does
            if ends is None:
                ends = np.full(len(paths), "\n", dtype=object)
            ends[i] = base64.b64encode(raw).decode("ascii") + "\n"
        paths[i] = _csv_cell(paths[i])
    cells = np.array(",\0".join(paths).split("\0"), dtype=object) if paths else np.zeros(0, dtype=object)
    if len(cells):
        cells[-1] += ","
    return ids, cells, ends


def retag(
    index,
    model,
    label_space,
    stream: IO[str],
    *,
    top_k: int = 10,
    raw_scores: bool = False,
    threads: int | None = None,
    folders: list[Path] | None = None,
    threshold: float | None = None,
) -> int | None:
    """Score every indexed image of ``model`` against ``label_space`` from the matrix file (the image model
    never runs) and write the ``top_k`` labels of each as CSV ``path,rank,label,score,kind,path_bytes`` (see
    ``top_labels``: the exact labels in the exact order; scores within ``MatrixFile.error_bound``).
    ``folders``: only the images in or under these (``rowids_under``); ``threshold``: no tag scoring below it.

    Returns how many images were written, or None when there is no usable matrix file.
    """
    k = max(0, min(top_k, len(label_space.names)))
    wanted = None if folders is None else rowids_under(index, folders, model.model_id)
    if folders is not None and wanted is None:
        return None
    ranked = top_labels(index, model, label_space, top_k=k, raw_scores=raw_scores, threads=threads, rowids=wanted)
    if ranked is None:
        return None
    stream.write(RETAG_CSV_HEADER)
    if k == 0:
        return 0
    first = next(ranked, None)  # the threads start scoring ...
    text = _CsvText(index, model.model_id, label_space, k, wanted, threshold)  # ... while the paths are read
    written = 0
    for best in itertools.chain([first] if first is not None else [], ranked):
        chunk, images = text.lines(best)
        stream.write(chunk)
        written += images
    return written


def _csv_cell(value: str) -> str:
    """One CSV cell: a spreadsheet formula start defused (``cells.csv_escape``), quoted when it must be."""
    if not _NEEDS_CARE.search(value):
        return value  # the common case, a million times over: nothing to do
    from sdltag.cells import clean_text, csv_escape

    value = csv_escape(clean_text(value))
    if any(c in value for c in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value
