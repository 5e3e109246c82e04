"""`sdltag index stats|prune|clear|move` through the real command, on indexes the real `sdltag tag` wrote."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.index import ImageIndex

COLORS = [(220, 20, 20), (20, 220, 20), (20, 20, 220), (230, 230, 30)]


def _photos(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        pixels = (np.array(COLORS[i % len(COLORS)]) * rng.uniform(0.5, 1.0, size=(40, 48, 1))).astype(np.uint8)
        path = folder / f"photo_{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def _sdltag(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _tag(folder: Path, model, index: Path):
    result = _sdltag("tag", folder, "--model", model.path, "--index", index, "-f", "jsonl")
    assert result.exit_code == 0, result.stderr
    return result


def _rows(index: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(index) as conn:
        return sorted((os.fsdecode(bytes(p)), m) for p, m in conn.execute("SELECT path, model_id FROM images"))


def test_stats_counts_photos_per_model(tmp_path: Path, tiny_model) -> None:
    index = tmp_path / "i.db"
    _photos(tmp_path / "lib")
    _tag(tmp_path / "lib", tiny_model, index)
    with ImageIndex.open(index) as db:  # a second model's rows (made up)
        db.put(tmp_path / "lib" / "photo_0.jpg", 1, 1, "h", "f" * 64, np.zeros((2, 4), np.float32))
    result = _sdltag("index", "stats", "--index", index, "--model", tiny_model.path, "--json")
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["photos"] == 3 and stats["bytes"] == index.stat().st_size and stats["schema_version"] >= 1
    by_id = {m["model_id"]: m for m in stats["models"]}
    ours = by_id[tiny_model.model_id]
    assert ours["photos"] == 3 and ours["name"] == (tiny_model.manifest.name or tiny_model.path.name)
    assert ours["vector_bytes"] == 3 * tiny_model.manifest.rows * tiny_model.manifest.dim * 4
    assert ours["oldest"] <= ours["newest"] <= time.time()
    assert by_id["f" * 64]["photos"] == 1 and by_id["f" * 64]["name"] is None
    table = _sdltag("index", "stats", "--index", index).stdout
    assert "photos: 3" in table and f"model {tiny_model.model_id[:16]}" in table and "oldest:" in table
    missing = _sdltag("index", "stats", "--index", tmp_path / "none.db")
    assert missing.exit_code == 2 and "no index there" in missing.stderr


def test_prune_removes_only_rows_of_files_that_are_gone(
    tmp_path: Path, tiny_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = tmp_path / "i.db"
    files = _photos(tmp_path / "lib", 4)
    _tag(tmp_path / "lib", tiny_model, index)
    files[0].unlink()
    files[1].unlink()
    before = _rows(index)
    dry = _sdltag("index", "prune", "--index", index, "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert dry.stdout.splitlines() == [str(files[0]), str(files[1])] and "would be removed" in dry.stderr
    assert _rows(index) == before  # --dry-run changes nothing
    real_lstat = os.lstat

    def lstat(path, *args, **kwargs):  # a file that cannot be checked (e.g. a stale mount) is not gone
        if os.fsdecode(path) == str(files[1]):
            raise PermissionError(13, "Permission denied", path)
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", lstat)
    result = _sdltag("index", "prune", "--index", index)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [str(files[0])] and "removed 1 row" in result.stderr
    assert "1 file could not be checked" in result.stderr
    assert [p for p, _ in _rows(index)] == [str(f) for f in files[1:]]


def test_prune_keeps_a_row_written_after_its_check(tmp_path: Path) -> None:
    """A tag run that re-creates a file and indexes it while prune runs keeps its row."""
    photo = tmp_path / "a.jpg"
    with ImageIndex.open(tmp_path / "i.db") as index:
        index.put(photo, 1, 1, "h", "m", np.zeros((2, 4), np.float32))
        index.commit()
        scan = index._gone

        def gone_then_retagged(folders):
            found = scan(folders)
            time.sleep(0.01)
            index.put(photo, 2, 2, "h2", "m", np.ones((2, 4), np.float32))  # a concurrent run's new row
            index.commit()
            return found

        index._gone = gone_then_retagged
        paths, removed, _ = index.prune(None)
        assert paths == [photo] and removed == 0 and index.count("m") == 1


def test_clear_one_model_by_folder_or_id(tmp_path: Path, tiny_model) -> None:
    index = tmp_path / "i.db"
    _photos(tmp_path / "lib", 2)
    _tag(tmp_path / "lib", tiny_model, index)
    with ImageIndex.open(index) as db:
        db.put(tmp_path / "x.jpg", 1, 1, "h", "ab" * 32, np.zeros((2, 4), np.float32))
    dry = _sdltag("index", "clear", "--model", tiny_model.path, "--index", index, "--dry-run")
    assert dry.exit_code == 0 and "2 rows would be removed" in dry.stderr and len(_rows(index)) == 3
    result = _sdltag("index", "clear", "--model", tiny_model.path, "--index", index)
    assert result.exit_code == 0, result.stderr
    assert "removed 2 rows" in result.stderr and _rows(index) == [(str(tmp_path / "x.jpg"), "ab" * 32)]
    assert _sdltag("index", "clear", "-m", "AB" * 8, "--index", index).exit_code == 0  # an id prefix, any case
    assert _rows(index) == []
    bad = _sdltag("index", "clear", "-m", "nonsense", "--index", index)
    assert bad.exit_code == 2 and "neither a model folder nor a model id" in bad.stderr
    unknown = _sdltag("index", "clear", "-m", "0" * 16, "--index", index)
    assert unknown.exit_code == 2 and "no rows of such a model" in unknown.stderr
    # the next tag run embeds the cleared photos again
    again = _tag(tmp_path / "lib", tiny_model, index)
    assert "2 tagged" in again.stderr


def test_move_keeps_every_row_reusable(tmp_path: Path, tiny_model) -> None:
    index = tmp_path / "i.db"
    old, new = tmp_path / "old-disk" / "Photos", tmp_path / "new-disk" / "Photos"
    files = _photos(old / "2024", 3)
    _tag(old, tiny_model, index)
    new.parent.mkdir()
    shutil.move(old, new)  # a rename: times kept
    copied = new / "2024" / files[2].name
    data = copied.read_bytes()
    copied.unlink()
    copied.write_bytes(data)  # a copy that did not keep the time: verified by the content hash
    os.utime(copied, ns=(1_000_000_000, 1_000_000_000))
    dry = _sdltag("index", "move", old, new, "--index", index, "--dry-run")
    assert dry.exit_code == 0 and "would move 3 rows" in dry.stderr
    assert all(p.startswith(str(old)) for p, _ in _rows(index))
    result = _sdltag("index", "move", old, new, "--index", index)
    assert result.exit_code == 0, result.stderr
    assert "moved 3 rows" in result.stderr and "1 verified by content hash" in result.stderr
    assert [p for p, _ in _rows(index)] == [str(new / "2024" / f.name) for f in files]
    rerun = _tag(new, tiny_model, index)
    assert "0 tagged, 3 reused from the index (3 unchanged, 0 by content hash)" in rerun.stderr


def test_move_keeps_rows_whose_new_file_differs(tmp_path: Path, tiny_model) -> None:
    index = tmp_path / "i.db"
    old, new = tmp_path / "a", tmp_path / "b"
    files = _photos(old, 3)
    _tag(old, tiny_model, index)
    shutil.copytree(old, new)  # copy2: times kept
    (new / files[0].name).write_bytes(b"not the same photo")  # another size
    (new / files[1].name).unlink()  # not there
    result = _sdltag("index", "move", old, new, "--index", index, "--hash")
    assert result.exit_code == 1
    assert "moved 1 row " in result.stderr and "1 verified by content hash" in result.stderr
    assert f"{files[0]}: kept its row" in result.stderr and "a different size" in result.stderr
    assert f"{files[1]}: kept its row" in result.stderr
    assert [p for p, _ in _rows(index)] == [str(files[0]), str(files[1]), str(new / files[2].name)]
    same = _sdltag("index", "move", old, old, "--index", index)
    assert same.exit_code == 2 and "the same place" in same.stderr


def test_index_commands_wait_for_a_concurrent_writer(tmp_path: Path, tiny_model) -> None:
    """A tag run holding the write lock is waited for, then the change is made."""
    index = tmp_path / "i.db"
    _photos(tmp_path / "lib", 2)
    _tag(tmp_path / "lib", tiny_model, index)
    writer = sqlite3.connect(index, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE images SET indexed_at = indexed_at")
    holder = threading.Timer(1.0, lambda: writer.execute("COMMIT"))
    holder.start()
    try:
        start = time.monotonic()
        result = _sdltag("index", "clear", "--model", tiny_model.path, "--index", index)
        waited = time.monotonic() - start
    finally:
        holder.join()
        writer.close()
    assert result.exit_code == 0, result.stderr
    assert "removed 2 rows" in result.stderr and waited >= 0.9 and _rows(index) == []
