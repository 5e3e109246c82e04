"""The SQLite index: look-ups by (size, mtime) and by hash, per-model rows, schema versions, corruption, commits."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from sdltag import log
from sdltag.errors import SdltagError
from sdltag.index import MIGRATIONS, SCHEMA_VERSION, ImageIndex


def _matrix(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(3, 8)).astype(np.float32)


def test_put_lookup_and_unchanged_rule(tmp_path: Path) -> None:
    with ImageIndex.open(tmp_path / "i.db") as index:
        index.put(tmp_path / "a.jpg", 100, 5_000, "h1", "model-A", _matrix(0))
        np.testing.assert_array_equal(index.lookup(tmp_path / "a.jpg", 100, 5_000, "model-A"), _matrix(0))
        assert index.lookup(tmp_path / "a.jpg", 101, 5_000, "model-A") is None  # size changed
        assert index.lookup(tmp_path / "a.jpg", 100, 5_001, "model-A") is None  # mtime changed
        assert index.lookup(tmp_path / "a.jpg", 100, 5_000, "model-B") is None  # other model
        np.testing.assert_array_equal(index.vectors_for_hash("h1", "model-A"), _matrix(0))
        assert index.vectors_for_hash("h1", "model-B") is None
        assert index.known_hashes("model-A") == {"h1"}
        index.put(tmp_path / "a.jpg", 100, 5_000, "h1", "model-B", _matrix(1))  # a second model keeps its own row
        assert index.count() == 2 and index.count("model-A") == 1
        row = index.get(tmp_path / "a.jpg", "model-B")
        assert row is not None and row.hash == "h1" and row.vectors.shape == (3, 8)


def test_lookup_many(tmp_path: Path) -> None:
    """The batched look-up of a re-run (one query per 500 paths): each file's own row, if unchanged, in order."""
    with ImageIndex.open(tmp_path / "i.db") as index:
        for i in range(1200):
            index.put(tmp_path / f"{i:04d}.jpg", 100 + i, 5_000 + i, f"h{i}", "model-A", _matrix(i % 7))
        index.put(tmp_path / "0009.jpg", 109, 5_009, "h9", "model-B", _matrix(99))  # another model, same file
        index.commit()
        numbers = list(range(0, 1300, 3))  # past the end too
        asked = [(tmp_path / f"{i:04d}.jpg", 100 + i, 5_000 + i) for i in numbers]
        asked[1] = (asked[1][0], asked[1][1] + 1, asked[1][2])  # size changed
        asked[2] = (asked[2][0], asked[2][1], asked[2][2] + 1)  # mtime changed
        many = index.lookup_many(asked, "model-A")
        assert len(many) == len(asked) and many[1] is None and many[2] is None
        for n, (i, got) in enumerate(zip(numbers, many, strict=True)):
            if n in (1, 2) or i >= 1200:
                assert got is None
            else:
                np.testing.assert_array_equal(got, _matrix(i % 7))  # its own row, not another model's
        assert sum(v is not None for v in many) == 398
        assert index.lookup_many([], "model-A") == []


def test_under_is_a_folder_prefix_not_a_string_prefix(tmp_path: Path) -> None:
    with ImageIndex.open(tmp_path / "i.db") as index:
        for rel in ["p/a.jpg", "p/sub/b.jpg", "p2/c.jpg", "q/d.jpg"]:
            index.put(tmp_path / rel, 1, 1, rel, "m", _matrix(len(rel)))
        names = sorted(r.path.relative_to(tmp_path).as_posix() for r in index.under([tmp_path / "p"], "m"))
        assert names == ["p/a.jpg", "p/sub/b.jpg"]
        assert len(list(index.under([], "m"))) == 4
        assert [r.path.name for r in index.under([tmp_path / "q" / "d.jpg"], "m")] == ["d.jpg"]


def test_non_utf8_path_round_trips(tmp_path: Path) -> None:
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.jpg"))
    with ImageIndex.open(tmp_path / "i.db") as index:
        index.put(odd, 1, 2, "h", "m", _matrix(0))
        (row,) = list(index.under([tmp_path], "m"))
        assert os.fsencode(row.path) == os.fsencode(odd)
        assert index.lookup(odd, 1, 2, "m") is not None


def test_schema_migrations_recorded_and_newer_refused(tmp_path: Path) -> None:
    path = tmp_path / "i.db"
    with ImageIndex.open(path) as index:
        assert index.schema_version == SCHEMA_VERSION
        assert index.migrations() == [(v, n) for v, n, _ in MIGRATIONS]
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'from_the_future', 'x')", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(SdltagError, match="newer sdltag.*Upgrade sdltag"):
        ImageIndex.open(path)
    assert path.exists()  # refused, not replaced


def test_reopening_applies_no_step_twice(tmp_path: Path) -> None:
    path = tmp_path / "i.db"
    with ImageIndex.open(path) as index:
        index.put(tmp_path / "a.jpg", 1, 1, "h", "m", _matrix(0))
    with ImageIndex.open(path) as index:
        assert index.count() == 1 and len(index.migrations()) == len(MIGRATIONS)


def test_corrupt_index_is_set_aside_and_rebuilt(tmp_path: Path) -> None:
    """A file in sdltag's own data folder is sdltag's: unreadable, it is set aside and a new index started."""
    from sdltag.paths import default_index_path

    path = default_index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a sqlite database at all" * 100)
    with log.collect() as warnings, ImageIndex.open(path) as index:
        index.put(tmp_path / "a.jpg", 1, 1, "h", "m", _matrix(0))
        assert index.count() == 1
    assert len(warnings) == 1 and "damaged" in warnings[0]
    aside = [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")


def test_readonly_open_does_not_create_or_write(tmp_path: Path) -> None:
    with pytest.raises(SdltagError):
        ImageIndex.open_readonly(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()
    with ImageIndex.open(tmp_path / "i.db") as index:
        index.put(tmp_path / "a.jpg", 1, 1, "h", "m", _matrix(0))
    before = (tmp_path / "i.db").read_bytes()
    with ImageIndex.open_readonly(tmp_path / "i.db") as index:
        assert index.count() == 1 and not index.writable
        index.put(tmp_path / "b.jpg", 1, 1, "h", "m", _matrix(0))  # ignored: read-only
        index.commit()
        assert index.count() == 1
    assert (tmp_path / "i.db").read_bytes() == before


def test_prune_missing(tmp_path: Path) -> None:
    (tmp_path / "here.jpg").write_bytes(b"x")
    with ImageIndex.open(tmp_path / "i.db") as index:
        index.put(tmp_path / "here.jpg", 1, 1, "a", "m", _matrix(0))
        index.put(tmp_path / "gone.jpg", 1, 1, "b", "m", _matrix(1))
        assert index.prune_missing([tmp_path]) == 1
        assert [r.path.name for r in index.under([tmp_path], "m")] == ["here.jpg"]


def test_killed_writer_keeps_committed_batches(tmp_path: Path) -> None:
    """Rows are committed every ``commit_every`` puts: a process killed mid-run keeps the finished batches."""
    path = tmp_path / "i.db"
    script = textwrap.dedent(f"""
        import os, numpy as np
        from pathlib import Path
        from sdltag.index import ImageIndex
        index = ImageIndex.open(Path({str(path)!r}), commit_every=10)
        for i in range(25):
            index.put(Path("/photos/%d.jpg" % i), 1, 1, "h%d" % i, "m", np.zeros((2, 4), np.float32))
        os._exit(9)  # no close, no commit: like kill -9
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    with ImageIndex.open(path) as index:
        assert index.count() == 20


def test_unwritable_index_location_names_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SdltagError, match="--index FILE.*--no-index"):
        ImageIndex.open(blocker / "sub" / "i.db")


INDEX_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from sdltag.index import ImageIndex
    index_path, me, sync = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    (sync / f"ready-{me}").touch()
    while not (sync / "go").exists():
        time.sleep(0.002)
    index = ImageIndex.open(index_path, commit_every=4)
    for i in range(120):
        path = Path(f"/photos/{me}/{i}.jpg")
        index.lookup(path, i, i, "m")  # a read inside the open write batch, as tag does
        index.put(path, i, i, f"{me}-{i}", "m", np.full((2, 3), i, np.float32))
        index.known_hashes("m")
    index.close()
    print("done")
    """
)


def test_two_tag_runs_share_one_index(tmp_path: Path) -> None:
    """Two processes creating and writing one index at once: no "database is locked", nothing lost."""
    index_path = tmp_path / "shared" / "index.sqlite3"
    sync = tmp_path / "sync"
    sync.mkdir()
    names = ("a", "b", "c")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", INDEX_WRITER, str(index_path), name, str(sync)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    while not all((sync / f"ready-{n}").exists() for n in names):
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.005)
    (sync / "go").touch()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == "done"
    with ImageIndex.open(index_path) as index:
        assert index.count("m") == 3 * 120
        assert index.known_hashes("m") == {f"{n}-{i}" for n in names for i in range(120)}
