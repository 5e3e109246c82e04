"""The index with files it did not write and when things go wrong: unreadable folders, files that are not an
index, locks held by other programs, a full disk, read-only files, damaged pages and journals left by kills.

Real SQLite throughout. Permission cases run as an unprivileged user (uid 65534, in a forked child) when the
tests run as root, since root ignores file modes; the full-disk case uses a real tmpfs where mounting is
permitted and SQLite's own page limit (the same "database or disk is full" error) everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import sdltag.index as index_module
from sdltag import log
from sdltag.cli import app
from sdltag.index import APPLICATION_ID, ImageIndex, NotAnIndexError

NOBODY = 65534


def _matrix(seed: int, rows: int = 3, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)


def _cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _photos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
        path = folder / f"photo_{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


@pytest.fixture()
def shared_dir() -> Iterator[Path]:
    """A folder the unprivileged user can use (pytest's own temp folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="sdltag-safety-"))
    os.chmod(folder, 0o777)
    yield folder
    for root, dirs, _files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """The warnings sdltag logs during the test."""
    with log.collect() as messages:
        yield messages


def _as_unprivileged(work: Callable[[], dict]) -> dict:
    """Run ``work`` as a user file modes apply to: a forked child as uid 65534 under root, else here."""
    if os.geteuid() != 0:
        return work()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, run, report, leave without running the parent's cleanup
        status = 0
        try:
            os.close(read)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            payload = json.dumps(work()).encode()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
            status = 1
        with os.fdopen(write, "wb") as out:
            out.write(payload)
        os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as inp:
        payload = inp.read()
    os.waitpid(pid, 0)
    result = json.loads(payload)
    assert "error" not in result, result["error"]
    return result


@pytest.fixture()
def fast_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give up on a lock after 1 s (30 s in real runs), saying so after 0.2 s."""
    monkeypatch.setattr(index_module, "BUSY_TIMEOUT_S", 1.0)
    monkeypatch.setattr(index_module, "LOCK_SLICE_S", 0.2)


# -- prune_missing: only a definite ENOENT removes a row ----------------------------------------------------


def test_prune_keeps_rows_it_cannot_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EACCES, EIO or any other error is not "gone"; only ENOENT is."""
    for sub in ("ok", "locked", "flaky"):
        (tmp_path / sub).mkdir()
        for i in range(3):
            (tmp_path / sub / f"{i}.jpg").write_bytes(b"x")
    with ImageIndex.open(tmp_path / "i.db") as index:
        for n, sub in enumerate(("ok", "locked", "flaky")):
            for i in range(3):
                index.put(tmp_path / sub / f"{i}.jpg", 1, 1, f"{sub}{i}", "m", _matrix(n * 3 + i))
        index.put(tmp_path / "ok" / "gone.jpg", 1, 1, "gone", "m", _matrix(99))
        real_lstat = os.lstat

        def lstat(path, *args, **kwargs):
            if f"{os.sep}locked{os.sep}" in os.fsdecode(path):
                raise PermissionError(errno.EACCES, "Permission denied", path)
            if f"{os.sep}flaky{os.sep}" in os.fsdecode(path):
                raise OSError(errno.EIO, "Input/output error", path)
            return real_lstat(path, *args, **kwargs)

        monkeypatch.setattr(os, "lstat", lstat)
        assert index.prune_missing([tmp_path]) == 1
        monkeypatch.undo()
        assert sorted(r.hash for r in index.under([tmp_path], "m")) == sorted(
            f"{sub}{i}" for sub in ("ok", "locked", "flaky") for i in range(3)
        )


def test_prune_keeps_rows_of_a_folder_without_permissions(shared_dir: Path) -> None:
    """A real chmod 000 folder (as an unprivileged user): its 200 rows stay, the 1 gone file's row goes."""

    def work() -> dict:
        lib = shared_dir / "lib"
        for sub, count in (("open", 100), ("private", 200)):
            (lib / sub).mkdir(parents=True)
            for i in range(count):
                (lib / sub / f"{i}.jpg").write_bytes(b"x")
        with ImageIndex.open(shared_dir / "i.db") as index:
            for sub, count in (("open", 100), ("private", 200)):
                for i in range(count):
                    index.put(lib / sub / f"{i}.jpg", 1, 1, f"{sub}{i}", "m", _matrix(i))
            index.put(lib / "open" / "deleted.jpg", 1, 1, "deleted", "m", _matrix(0))
            os.chmod(lib / "private", 0)
            try:
                removed = index.prune_missing([lib])
            finally:
                os.chmod(lib / "private", 0o755)
            return {"removed": removed, "left": index.count("m")}

    assert _as_unprivileged(work) == {"removed": 1, "left": 300}


# -- --index naming a file that is not an index -------------------------------------------------------------


def _jpeg(path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format="JPEG")


def _csv(path: Path) -> None:
    path.write_text("name,score\nbeach,0.9\n", encoding="utf-8")


def _other_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE contacts (name TEXT, phone TEXT)")
    conn.execute("INSERT INTO contacts VALUES ('Ada', '123')")
    conn.commit()
    conn.close()


def _sqlite_other_app(path: Path) -> None:
    """Another program's database that happens to use the same table names as sdltag."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE images (path BLOB)")
    conn.execute("CREATE TABLE schema_migrations (version INTEGER)")
    conn.execute("PRAGMA application_id = 1234")
    conn.commit()
    conn.close()


def _sqlite_no_tables(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 7")  # writes the header: a database with no tables
    conn.commit()
    conn.close()


FOREIGN = {"jpeg": _jpeg, "csv": _csv, "sqlite": _other_sqlite, "app": _sqlite_other_app, "empty-db": _sqlite_no_tables}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_a_file_that_is_not_an_index_is_refused_untouched(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "notes.dat"
    FOREIGN[kind](path)
    before = path.read_bytes()
    for opener in (ImageIndex.open, ImageIndex.open_readonly):
        with pytest.raises(NotAnIndexError, match="not an sdltag index.*left it untouched") as raised:
            opener(path)
        assert raised.value.exit_code == 2
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.dat"]  # no journal, nothing set aside


@pytest.mark.parametrize("kind", ["jpeg", "sqlite"])
def test_cli_refuses_a_file_that_is_not_an_index(tmp_path: Path, tiny_model, kind: str) -> None:
    """`tag`, `tag --dry-run` and `search` with --index on a photo or another database: exit 2, one line."""
    _photos(tmp_path / "lib", 2)
    path = tmp_path / "IMG_0001.jpg"
    FOREIGN[kind](path)
    before = path.read_bytes()
    base = ["--model", str(tiny_model.path), "--index", str(path)]
    for args in (["tag", str(tmp_path / "lib"), *base], ["tag", str(tmp_path / "lib"), "--dry-run", *base]):
        result = _cli(*args)
        assert result.exit_code == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "not an sdltag index" in result.stderr and str(path) in result.stderr
        assert result.stdout == ""
    result = _cli("search", "cat", *base)
    assert result.exit_code == 2 and "not an sdltag index" in result.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["IMG_0001.jpg", "lib"]


def test_an_index_from_before_the_application_id_is_recognised_by_its_schema(tmp_path: Path) -> None:
    path = tmp_path / "i.db"
    with ImageIndex.open(path) as index:
        index.put(tmp_path / "a.jpg", 1, 1, "h", "m", _matrix(0))
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA application_id = 0")  # as written by earlier versions
    conn.commit()
    conn.close()
    with ImageIndex.open(path) as index:
        assert index.count() == 1
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID  # stamped now
    conn.close()


def test_an_empty_file_becomes_an_index(tmp_path: Path) -> None:
    """0 bytes (what a run killed right after creating the file leaves): nothing to lose, so it is used."""
    path = tmp_path / "i.db"
    path.touch()
    with ImageIndex.open_readonly(path) as index:
        assert index.count() == 0
    with ImageIndex.open(path) as index:
        index.put(tmp_path / "a.jpg", 1, 1, "h", "m", _matrix(0))
    with ImageIndex.open(path) as index:
        assert index.count() == 1


# -- locks held by other programs ----------------------------------------------------------------------------


def test_exclusive_lock_at_open_waits_then_goes_on_without_the_index(
    tmp_path: Path, fast_locks, warnings: list[str]
) -> None:
    path = tmp_path / "i.db"
    with ImageIndex.open(path) as index:
        index.put(tmp_path / "a.jpg", 1, 1, "h", "m", _matrix(0))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with ImageIndex.open(path) as index:
            assert not index.usable and not index.writable
            assert index.lookup(tmp_path / "a.jpg", 1, 1, "m") is None
            index.put(tmp_path / "b.jpg", 1, 1, "h2", "m", _matrix(1))
            assert list(index.under([], "m")) == [] and index.prune_missing([tmp_path]) == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert len(warnings) == 2 and "waiting up to" in warnings[0] and "continuing without it" in warnings[1]
    with ImageIndex.open(path) as index:
        assert index.count() == 1


def test_lock_taken_during_a_run_stops_the_writes_with_one_warning(
    tmp_path: Path, fast_locks, warnings: list[str]
) -> None:
    path = tmp_path / "i.db"
    index = ImageIndex.open(path, commit_every=2)
    for i in range(4):
        index.put(tmp_path / f"{i}.jpg", 1, 1, f"h{i}", "m", _matrix(i))  # committed: 2 batches
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(4, 20):
            index.put(tmp_path / f"{i}.jpg", 1, 1, f"h{i}", "m", _matrix(i))
        index.commit()
        assert not index.writable
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    index.put(tmp_path / "late.jpg", 1, 1, "late", "m", _matrix(0))  # still not written this run
    np.testing.assert_array_equal(index.lookup(tmp_path / "0.jpg", 1, 1, "m"), _matrix(0))  # reads go on
    index.close()
    assert sum("waiting" in w for w in warnings) == 1
    assert sum("still locked" in w for w in warnings) == 1 and len(warnings) == 2
    with ImageIndex.open(path) as index:
        assert index.count() == 4 and _integrity(path) == "ok"


def test_a_long_read_by_another_program_stops_the_writes_not_the_reads(
    tmp_path: Path, fast_locks, warnings: list[str]
) -> None:
    """A database browser holding a read transaction: commits cannot finish, look-ups still work."""
    path = tmp_path / "i.db"
    with ImageIndex.open(path) as index:
        index.put(tmp_path / "a.jpg", 1, 1, "h", "m", _matrix(0))
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM images").fetchone()  # holds its read lock until the end
    try:
        with ImageIndex.open(path) as index:
            index.put(tmp_path / "b.jpg", 1, 1, "h2", "m", _matrix(1))
            index.commit()
            assert not index.writable and index.usable
            np.testing.assert_array_equal(index.lookup(tmp_path / "a.jpg", 1, 1, "m"), _matrix(0))
    finally:
        reader.execute("ROLLBACK")
        reader.close()
    assert len(warnings) == 2 and "still locked" in warnings[1]
    with ImageIndex.open(path) as index:
        assert index.count() == 1


def test_cli_tag_with_a_locked_index_still_tags(tmp_path: Path, tiny_model, fast_locks) -> None:
    files = _photos(tmp_path / "lib", 3)
    path = tmp_path / "i.db"
    with ImageIndex.open(path):
        pass
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = _cli("tag", str(tmp_path / "lib"), "--model", str(tiny_model.path), "--index", str(path))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(files)
    assert "waiting up to" in result.stderr and "continuing without it" in result.stderr
    assert "Traceback" not in result.stderr and "3 tagged" in result.stderr


# -- full disk, read-only file or folder ---------------------------------------------------------------------


def _limit_pages(monkeypatch: pytest.MonkeyPatch, extra_pages: int = 1) -> None:
    """Every index connection may grow its file by ``extra_pages`` pages only: SQLite then fails a write
    with SQLITE_FULL, "database or disk is full", as on a full disk."""
    connect = ImageIndex._connect

    def limited(self):
        conn = connect(self)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {max(pages, 2) + extra_pages}")
        return conn

    monkeypatch.setattr(ImageIndex, "_connect", limited)


def test_disk_full_makes_the_index_read_only_for_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warnings: list[str]
) -> None:
    path = tmp_path / "i.db"
    with ImageIndex.open(path) as index:
        index.put(tmp_path / "a.jpg", 1, 1, "h", "m", _matrix(0))
    _limit_pages(monkeypatch)
    with ImageIndex.open(path, commit_every=4) as index:
        for i in range(200):
            index.put(tmp_path / f"{i}.jpg", 1, 1, f"h{i}", "m", _matrix(i, rows=7, dim=64))
        assert not index.writable
        np.testing.assert_array_equal(index.lookup(tmp_path / "a.jpg", 1, 1, "m"), _matrix(0))
    assert len(warnings) == 1 and "database or disk is full" in warnings[0] and "read-only for this run" in warnings[0]
    assert _integrity(path) == "ok"


def test_cli_tag_on_a_full_disk_still_writes_its_results(
    tmp_path: Path, tiny_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _photos(tmp_path / "lib", 40)
    path = tmp_path / "i.db"
    with ImageIndex.open(path):
        pass
    _limit_pages(monkeypatch)
    out = tmp_path / "out.jsonl"
    result = _cli("tag", str(tmp_path / "lib"), "--model", str(tiny_model.path), "--index", str(path), "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert len(out.read_text().splitlines()) == len(files)
    assert result.stderr.count("database or disk is full") == 1 and "Traceback" not in result.stderr


def test_real_full_disk_on_a_small_tmpfs(tmp_path: Path, warnings: list[str]) -> None:
    """ENOSPC from the kernel, where this machine lets the test mount a 256 KiB tmpfs."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        path = mount / "i.db"
        with ImageIndex.open(path, commit_every=8) as index:
            for i in range(400):  # ~400 KB of vectors: more than fits
                index.put(mount / f"{i}.jpg", 1, 1, f"h{i}", "m", _matrix(i, rows=4, dim=64))
            assert not index.writable
            kept = index.count()
        assert 0 < kept < 400 and len(warnings) == 1 and "read-only for this run" in warnings[0]
        with ImageIndex.open(path) as index:
            assert index.count() == kept
        assert _integrity(path) == "ok"
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("what", ["file", "folder"])
def test_read_only_index_is_used_for_reading(shared_dir: Path, what: str) -> None:
    """A read-only index file, or a writable one in a read-only folder: look-ups work, writes are skipped with
    one warning, the file is unchanged."""
    folder = shared_dir / "data"

    def work() -> dict:
        folder.mkdir()
        path = folder / "i.db"
        with ImageIndex.open(path) as index:
            index.put(folder / "a.jpg", 1, 1, "h", "m", _matrix(0))
        before = path.read_bytes()
        os.chmod(path if what == "file" else folder, 0o555)
        try:
            with log.collect() as warnings, ImageIndex.open(path, commit_every=2) as index:
                found = index.lookup(folder / "a.jpg", 1, 1, "m") is not None
                for i in range(5):
                    index.put(folder / f"{i}.jpg", 1, 1, f"h{i}", "m", _matrix(i))
                count = index.count()
        finally:
            os.chmod(folder, 0o755)
        return {"found": found, "count": count, "warnings": warnings, "same": path.read_bytes() == before}

    result = _as_unprivileged(work)
    assert result["found"] and result["count"] == 1 and result["same"]
    assert len(result["warnings"]) == 1 and "read-only for this run" in result["warnings"][0]


# -- damaged pages -------------------------------------------------------------------------------------------


def _damage_page_holding(path: Path, needle: bytes) -> None:
    """Overwrite, with seeded noise, the whole database page holding ``needle`` (never the header page)."""
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    at = data.find(needle)
    assert at >= page_size, "the row is on the header page"
    start = at // page_size * page_size
    data[start : start + page_size] = np.random.default_rng(0).integers(0, 256, page_size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def test_damaged_page_is_found_set_aside_and_rebuilt(tmp_path: Path, warnings: list[str]) -> None:
    path = tmp_path / "i.db"
    with ImageIndex.open(path) as index:
        for i in range(300):
            index.put(Path(f"/lib/{i:03d}.jpg"), i, i, f"h{i}", "m", _matrix(i, rows=7, dim=384))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 // 4096 * 4096
    data[middle : middle + 3 * 4096] = np.random.default_rng(1).integers(0, 256, 3 * 4096, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    damaged = bytes(data)
    with ImageIndex.open(path) as index:  # the header is fine: opens
        rows = list(index.under([], "m"))  # the scan reaches the damage
        assert len(rows) < 300
        index.put(Path("/lib/new.jpg"), 1, 1, "new", "m", _matrix(0))  # into the new index
    assert len(warnings) == 1 and "was damaged" in warnings[0] and "started a new one" in warnings[0]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("i.db.corrupt-")]
    assert aside.name in warnings[0] and aside.read_bytes() == damaged  # kept whole, for the curious
    assert _integrity(path) == "ok"
    with ImageIndex.open(path) as index:
        assert index.count() == 1


def test_cli_tag_and_search_with_a_damaged_page(tmp_path: Path, tiny_model) -> None:
    files = _photos(tmp_path / "lib", 4)
    path = tmp_path / "i.db"
    with ImageIndex.open(path) as index:
        for i in range(150):  # rows before and after the library's, so its rows sit mid-file
            index.put(Path(f"/other/a{i:03d}.jpg"), 1, 1, f"a{i}", "x", _matrix(i, rows=7, dim=384))
        for file in files:
            st = file.stat()
            index.put(file, st.st_size, st.st_mtime_ns, file.name, tiny_model.model_id, _matrix(1, dim=16))
        for i in range(150):
            index.put(Path(f"/other/b{i:03d}.jpg"), 1, 1, f"b{i}", "x", _matrix(i, rows=7, dim=384))
    _damage_page_holding(path, os.fsencode(files[0]))
    base = ["--model", str(tiny_model.path), "--index", str(path)]
    result = _cli("search", "cat", str(tmp_path / "lib"), *base)  # reads only: reports, moves nothing
    assert result.exit_code == 1 and "damaged" in result.stderr and "Traceback" not in result.stderr
    assert not [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    result = _cli("tag", str(tmp_path / "lib"), *base)
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(files)
    assert result.stderr.count("was damaged") == 1 and "4 tagged" in result.stderr
    assert [p for p in tmp_path.iterdir() if p.name.startswith("i.db.corrupt-")]
    assert _integrity(path) == "ok"
    result = _cli("search", "cat", str(tmp_path / "lib"), *base)
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == len(files)


# -- journals left by a kill ---------------------------------------------------------------------------------

HOT_JOURNAL = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import numpy as np
    from sdltag.index import ImageIndex
    path, model_id, listing = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    index = ImageIndex.open(path, commit_every=10**9)
    for line in listing.read_text().splitlines():  # committed rows: real files, size and mtime
        name, size, mtime = line.split("\\t")
        index.put(Path(name), int(size), int(mtime), name, model_id, np.ones((3, 16), np.float32))
    index.commit()
    index.conn.execute("PRAGMA cache_size = 2")  # a big transaction spills pages into the file
    for i in range(400):
        index.put(Path(f"/pending/{i}.jpg"), 1, 1, f"p{i}", model_id, np.ones((7, 64), np.float32))
    os._exit(9)  # killed in the middle of the write: the journal stays, hot
    """
)


def _killed_mid_write(path: Path, files: list[Path], model_id: str) -> None:
    listing = path.with_name("listing.tsv")
    listing.write_text("".join(f"{f}\t{f.stat().st_size}\t{f.stat().st_mtime_ns}\n" for f in files))
    done = subprocess.run([sys.executable, "-c", HOT_JOURNAL, str(path), model_id, str(listing)], capture_output=True)
    assert done.returncode == 9, done.stderr
    assert path.with_name(path.name + "-journal").stat().st_size > 0


def test_read_only_open_after_a_kill_rolls_the_journal_back(tmp_path: Path) -> None:
    files = _photos(tmp_path / "lib", 3)
    path = tmp_path / "i.db"
    _killed_mid_write(path, files, "m")
    with ImageIndex.open_readonly(path) as index:
        assert index.count() == 3 and index.usable
    assert not path.with_name("i.db-journal").exists() and _integrity(path) == "ok"


def test_cli_search_and_dry_run_after_a_kill_use_the_committed_rows(tmp_path: Path, tiny_model) -> None:
    files = _photos(tmp_path / "lib", 3)
    path = tmp_path / "i.db"
    _killed_mid_write(path, files, tiny_model.model_id)
    base = ["--model", str(tiny_model.path), "--index", str(path)]
    result = _cli("tag", str(tmp_path / "lib"), "--dry-run", *base)
    assert result.exit_code == 0, result.stderr
    assert "readonly" not in result.stderr and "0 tagged, 3 reused" in result.stderr
    _killed_mid_write(path, files, tiny_model.model_id)
    result = _cli("search", "cat", str(tmp_path / "lib"), *base)
    assert result.exit_code == 0, result.stderr
    assert "readonly" not in result.stderr and len(result.stdout.splitlines()) == 3


def test_unfinished_write_in_a_read_only_index_is_reported_not_raised(shared_dir: Path) -> None:
    """A journal left by a kill that this user may not roll back (the index is not theirs to write): one
    warning naming the cause, the run goes on without the index, nothing changes on disk."""
    files = _photos(shared_dir / "lib", 2)
    path = shared_dir / "i.db"
    _killed_mid_write(path, files, "m")
    os.chmod(path, 0o444)
    before = {p.name: p.read_bytes() for p in shared_dir.iterdir() if p.is_file()}

    def work() -> dict:
        seen = {}
        for name, opener in (("open", ImageIndex.open), ("readonly", ImageIndex.open_readonly)):
            with log.collect() as warnings, opener(path) as index:
                seen[name] = [index.usable, index.lookup(files[0], 1, 1, "m") is None, warnings]
        return seen

    seen = _as_unprivileged(work)
    for usable, missed, warnings in seen.values():
        assert not usable and missed
        assert len(warnings) == 1 and "interrupted write" in warnings[0] and "needs write access" in warnings[0]
    assert {p.name: p.read_bytes() for p in shared_dir.iterdir() if p.is_file()} == before
