"""The label-vector cache (real SQLite): hits and misses, two writers at once, corrupt files."""

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
from sdltag.embedding.cache import DB_FILE, LabelVectorCache

EMBEDDER = "demo@sha256:0123456789abcdef"


def _vector(text: str, dim: int = 16) -> np.ndarray:
    """A deterministic unit vector per text, so any process writes the same value for a text."""
    seed = int.from_bytes(text.encode("utf-8")[:8].ljust(8, b"\0"), "little") ^ len(text)
    vector = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def test_miss_then_hit_round_trips_exact_vectors(tmp_path: Path) -> None:
    cache = LabelVectorCache(tmp_path / "c")
    assert cache.get_many(EMBEDDER, ["cat", "dog"]) == {}
    assert cache.put_many(EMBEDDER, [("cat", _vector("cat")), ("dog", _vector("dog"))]) == 2
    cache.close()
    again = LabelVectorCache(tmp_path / "c")  # a later run
    found = again.get_many(EMBEDDER, ["cat", "dog", "bird", "cat"])
    assert set(found) == {"cat", "dog"}
    np.testing.assert_array_equal(found["cat"], _vector("cat"))
    assert found["cat"].dtype == np.float32
    # Keys are exact: other case, other embedder or other dimension is a miss.
    assert again.get_many(EMBEDDER, ["Cat"]) == {}
    assert again.get_many("other@sha256:0", ["cat"]) == {}
    assert again.get_many(EMBEDDER, ["cat"], dim=384) == {}
    stats = again.stats()
    assert stats.entries == 2 and stats.per_embedder == {EMBEDDER: 2} and stats.bytes > 0


def test_many_texts_are_looked_up_in_chunks(tmp_path: Path) -> None:
    cache = LabelVectorCache(tmp_path)
    texts = [f"label {i}" for i in range(1300)]  # more than SQLite's host-parameter limit
    cache.put_many(EMBEDDER, [(t, _vector(t)) for t in texts])
    found = cache.get_many(EMBEDDER, texts)
    assert len(found) == 1300
    np.testing.assert_array_equal(found["label 1299"], _vector("label 1299"))


def test_damaged_rows_are_misses(tmp_path: Path) -> None:
    cache = LabelVectorCache(tmp_path)
    cache.put_many(EMBEDDER, [("good", _vector("good")), ("short", _vector("short")), ("nan", _vector("nan"))])
    conn = sqlite3.connect(cache.path)
    conn.execute("UPDATE vectors SET vector = substr(vector, 1, 8) WHERE text = 'short'")
    conn.execute("UPDATE vectors SET vector = ? WHERE text = 'nan'", (np.full(16, np.nan, "<f4").tobytes(),))
    conn.commit()
    conn.close()
    assert set(cache.get_many(EMBEDDER, ["good", "short", "nan"])) == {"good"}


WRITER = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from test_embedding_cache import _vector
    from sdltag.embedding.cache import LabelVectorCache
    cache = LabelVectorCache(sys.argv[1])
    me = sys.argv[2]
    # Start together: announce readiness, then wait for the parent's "go".
    Path(sys.argv[4], f"ready-{me}").touch()
    while not Path(sys.argv[4], "go").exists():
        time.sleep(0.005)
    # 40 transactions each: 5 texts of our own and 5 shared with the other writer.
    for i in range(40):
        texts = [f"{me}-{i}-{j}" for j in range(5)] + [f"shared-{i}-{j}" for j in range(5)]
        cache.put_many("demo@sha256:0123456789abcdef", [(t, _vector(t)) for t in texts])
        cache.get_many("demo@sha256:0123456789abcdef", texts)
    print("done")
    """
)


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "shared-cache"
    tests_dir = str(Path(__file__).parent)
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(folder), name, tests_dir, str(sync)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    deadline = time.monotonic() + 60
    while not all((sync / f"ready-{n}").exists() for n in ("a", "b")) and time.monotonic() < deadline:
        time.sleep(0.01)
    (sync / "go").touch()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == "done"
        assert "warning" not in err
    cache = LabelVectorCache(folder)
    expected = [f"{me}-{i}-{j}" for me in ("a", "b", "shared") for i in range(40) for j in range(5)]
    found = cache.get_many(EMBEDDER, expected)
    assert len(found) == len(expected) == 600
    for text in ("a-0-0", "b-39-4", "shared-17-3"):
        np.testing.assert_array_equal(found[text], _vector(text))
    conn = sqlite3.connect(cache.path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


OPENER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from test_embedding_cache import _vector
    from sdltag.embedding.cache import LabelVectorCache
    sync, me = Path(sys.argv[2]), sys.argv[4]
    (sync / f"ready-{me}").touch()
    while not (sync / "go").exists():
        time.sleep(0.001)
    LabelVectorCache(sys.argv[1]).put_many("demo@sha256:0123456789abcdef", [(me, _vector(me))])
    print("done")
    """
)


def test_processes_creating_a_new_cache_at_once(tmp_path: Path) -> None:
    """The first use of a cache by several processes at once (where SQLite refuses the switch to
    WAL without waiting while another process reads the new file): every one of them succeeds."""
    tests_dir = str(Path(__file__).parent)
    for trial in range(5):
        folder, sync = tmp_path / f"cache-{trial}", tmp_path / f"sync-{trial}"
        sync.mkdir()
        names = [f"p{i}" for i in range(4)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPENER, str(folder), str(sync), tests_dir, name],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in names
        ]
        while not all((sync / f"ready-{n}").exists() for n in names) and all(p.poll() is None for p in procs):
            time.sleep(0.005)
        (sync / "go").touch()
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0 and out.strip() == "done", err
            assert "warning" not in err
        assert set(LabelVectorCache(folder).get_many(EMBEDDER, names)) == set(names)


def test_retry_while_busy_retries_lock_errors_only() -> None:
    from sdltag.sqlitedb import retry_while_busy

    calls = []

    def locked_twice() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert retry_while_busy(locked_twice) == "ok" and len(calls) == 3

    def damaged() -> None:
        calls.append(1)
        raise sqlite3.OperationalError("database disk image is malformed")

    calls.clear()
    with pytest.raises(sqlite3.OperationalError, match="malformed"):
        retry_while_busy(damaged)
    assert len(calls) == 1  # damage is not retried

    def always_locked() -> None:
        raise sqlite3.OperationalError("database is locked")

    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        retry_while_busy(always_locked, timeout=0.2)
    assert time.monotonic() - started < 2.0


def _filled_cache(folder: Path, count: int = 400) -> LabelVectorCache:
    cache = LabelVectorCache(folder)
    cache.put_many(EMBEDDER, [(f"t{i}", _vector(f"t{i}", 384)) for i in range(count)])
    cache.close()  # the last connection checkpoints the WAL into the main file
    assert not Path(f"{cache.path}-wal").exists() or Path(f"{cache.path}-wal").stat().st_size == 0
    return cache


@pytest.mark.parametrize("damage", ["truncate", "garbage", "zero-header"])
def test_corrupt_cache_is_set_aside_with_one_warning_and_rebuilt(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "c"
    path = _filled_cache(folder).path
    data = path.read_bytes()
    assert len(data) > 100_000
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a database at all\n" * 100)
    else:
        path.write_bytes(b"\0" * 100 + data[100:])
    with log.collect() as warnings:
        cache = LabelVectorCache(folder)
        found = cache.get_many(EMBEDDER, ["t0", "t1"])
    assert found == {} or all(np.allclose(found[t], _vector(t, 384)) for t in found)
    assert len(warnings) == 1 and "corrupt" in warnings[0] and str(path) in warnings[0]
    aside = sorted(folder.glob(f"{DB_FILE}.corrupt-*"))
    assert len(aside) == 1 and aside[0].name in warnings[0]
    # The rebuilt cache works and keeps what is written to it.
    with log.collect() as later:
        cache.put_many(EMBEDDER, [("new", _vector("new"))])
        assert set(LabelVectorCache(folder).get_many(EMBEDDER, ["new"])) == {"new"}
    assert later == []


def test_unwritable_cache_folder_falls_back_to_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with log.collect() as warnings:
        cache = LabelVectorCache(blocker / "cache")
        cache.put_many(EMBEDDER, [("cat", _vector("cat"))])
    assert set(cache.get_many(EMBEDDER, ["cat"])) == {"cat"}
    assert len(warnings) == 1 and "in memory" in warnings[0]


def test_weight_hash_memo_is_keyed_by_size_and_mtime(tmp_path: Path) -> None:
    cache = LabelVectorCache(tmp_path)
    cache.put_file_hash(Path("/x/model.safetensors"), 10, 111, "ab" * 32)
    assert cache.get_file_hash(Path("/x/model.safetensors"), 10, 111) == "ab" * 32
    assert cache.get_file_hash(Path("/x/model.safetensors"), 10, 112) is None
    assert cache.get_file_hash(Path("/x/model.safetensors"), 11, 111) is None


def test_clear_removes_vectors_and_fast_paths(tmp_path: Path) -> None:
    cache = LabelVectorCache(tmp_path)
    cache.put_many(EMBEDDER, [("cat", _vector("cat"))])
    fast = cache.fast_path_dir(EMBEDDER)
    fast.mkdir(parents=True)
    (fast / "meta.json").write_text("{}")
    assert cache.stats().fast_paths == [fast.name]
    assert cache.clear() == 1
    assert not fast.exists() and not cache.path.exists()
    assert LabelVectorCache(tmp_path).stats().entries == 0


# -- what a kill leaves behind -------------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _folder(path: Path, files: dict[str, bytes], age: float = 60.0) -> Path:
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    old = time.time() - age
    os.utime(path, (old, old))
    return path


def test_staging_folders_of_killed_exports_are_removed(tmp_path: Path) -> None:
    """Only folders with sdltag's staging names and files, whose process has ended, go; all else stays."""
    fast = LabelVectorCache(tmp_path).fast_path_dir(EMBEDDER)  # text-models/demo_sha256_0123456789abcdef
    models = fast.parent
    export = {"text_model.onnx": b"\0" * 4096, "tokenizer.json": b"{}"}
    dead, alive = _dead_pid(), os.getpid()
    debris = [
        _folder(models / f".{fast.name}.{dead}.k2j4_x9a", export),  # killed during the export
        _folder(models / f".{fast.name}.ab12cd34", export, age=2 * 3600),  # from before names had a pid
        _folder(fast / f".optimise.{dead}.140234", {"text_model.optimized-ort1.20.0.onnx.data": b"\0" * 4096}),
    ]
    (fast / "meta.json").write_text("{}")
    kept = [
        _folder(models / f".{fast.name}.{alive}.q7w8e9r0", export),  # an export still running
        _folder(models / f".{fast.name}.zz99yy88", export),  # no pid, recent: may be running
        _folder(models / f".{fast.name}.{dead}.m3n4b5v6", {**export, "thesis.tex": b"mine"}),  # not only ours
        _folder(models / f".notes.{dead}.abcdefgh", export),  # not a fast path's name
        _folder(fast / f".optimise.{dead}.7", {"holiday.jpg": b"mine"}),
    ]
    (models / f".{fast.name}.{dead}.l1nk0000").symlink_to(kept[2], target_is_directory=True)
    LabelVectorCache(tmp_path).get_many(EMBEDDER, ["cat"])  # any use of the cache cleans up
    assert not any(p.exists() for p in debris)
    assert all(p.is_dir() for p in kept) and (fast / "meta.json").is_file()
    assert (kept[2] / "thesis.tex").read_bytes() == b"mine"
    assert (models / f".{fast.name}.{dead}.l1nk0000").is_symlink()


KILLED_EMBED = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from sdltag.embedding import get_text_embedder
    from sdltag.embedding.embedder import CachedTextEmbedder
    cache, labels = Path(sys.argv[1]), Path(sys.argv[2]).read_text(encoding="utf-8").splitlines()
    embedder = get_text_embedder(None, cache, backend="sentence-transformers")
    compute, computed = CachedTextEmbedder._compute, []

    def killed_after_150(self, texts):
        vectors = compute(self, texts)
        computed.extend(texts)
        if len(computed) >= 150:
            os.kill(os.getpid(), signal.SIGKILL)
        return vectors

    CachedTextEmbedder._compute = killed_after_150
    embedder.embed(labels)
    """
)


@pytest.mark.slow  # loads sentence-transformers (torch) twice, ~20 s
def test_kill_during_embedding_keeps_the_stored_batches(tmp_path: Path) -> None:
    """kill -9 part-way through embedding 300 labels: every finished batch of 64 is kept, the rerun
    embeds only the rest."""
    from sdltag.embedding import clear_embedder_memo, get_text_embedder
    from sdltag.embedding.embedder import STORE_EVERY

    lines = (Path(__file__).parent / "data" / "cldr_labels.txt").read_text(encoding="utf-8").splitlines()
    labels = [line for line in lines if line and not line.startswith("#")][:300]
    (tmp_path / "labels.txt").write_text("\n".join(labels), encoding="utf-8")
    cache = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-c", KILLED_EMBED, str(cache), str(tmp_path / "labels.txt")])
    assert done.returncode == -9
    conn = sqlite3.connect(cache / DB_FILE)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = [t for (t,) in conn.execute("SELECT text FROM vectors")]
    conn.close()
    assert len(stored) == 2 * STORE_EVERY and set(stored) <= set(labels)  # the third batch died unstored
    clear_embedder_memo()
    embedder = get_text_embedder(None, cache, backend="sentence-transformers")
    assert embedder.embed(labels).shape[0] == len(labels)
    assert embedder.last_new == len(set(labels)) - 2 * STORE_EVERY
    clear_embedder_memo()
