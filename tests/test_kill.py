"""kill -9 at random moments of a real `sdltag tag` run: the index stays sound, committed rows survive
unchanged, and the next run tags only what is missing.

A real subprocess, the bundled emoji model and onnxruntime, 400 tiny images; one kill in the default suite,
three in the slow one. The kill moments are seeded: each run is killed a seeded random delay after its first
commit is visible, which lands in decoding, inference, scoring or the middle of the next commit.
"""

from __future__ import annotations

import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

MODEL = Path(__file__).resolve().parents[1] / "models" / "emoji"
IMAGES = 400
KILLS = 3
SEED = 13
CLI = "from sdltag.cli import main; main()"


def _library(folder: Path) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(SEED)
    paths = []
    for i in range(IMAGES):
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, size=(20, 20, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _rows(index: Path) -> dict[bytes, tuple]:
    """Every row, read with a normal connection (which, like the next run, rolls back a hot journal)."""
    conn = sqlite3.connect(index, timeout=30)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {
            bytes(row[0]): tuple(row[1:])
            for row in conn.execute("SELECT path, model_id, size, mtime_ns, hash, vectors, indexed_at FROM images")
        }
    finally:
        conn.close()


def _committed(index: Path) -> int:
    """Rows visible to a reader now (0 before the file exists or while it is being created)."""
    try:
        conn = sqlite3.connect(f"{index.as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def _tag(lib: Path, index: Path, out: Path, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-c", CLI, "tag", str(lib), "--model", str(MODEL), "--index", str(index), "-o", str(out)]
    with open(log, "wb") as err:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)


@pytest.mark.skipif(not (MODEL / "manifest.json").is_file(), reason="the bundled emoji model is not in this checkout")
@pytest.mark.parametrize("kills", [1, pytest.param(KILLS, marks=pytest.mark.slow)])  # ~15 s and ~35 s on 2 busy cores
def test_random_kills_keep_the_index_sound_and_the_work_done(tmp_path: Path, kills: int) -> None:
    rng = random.Random(SEED + kills)
    lib = tmp_path / "lib"
    photos = {p.name: p.read_bytes() for p in _library(lib)}
    index, out, log = tmp_path / "index.sqlite3", tmp_path / "tags.jsonl", tmp_path / "stderr.txt"
    kept: dict[bytes, tuple] = {}
    for round_ in range(kills):
        before = len(kept)
        proc = _tag(lib, index, out, log)
        deadline = time.monotonic() + 120
        while _committed(index) <= before:  # this run's first batch is committed
            assert proc.poll() is None, f"run {round_} ended before it was killed: {log.read_text()}"
            assert time.monotonic() < deadline, "no commit within 120 s"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, log.read_text()
        rows = _rows(index)  # integrity_check ok, hot journal (if any) rolled back
        assert len(rows) > before, "the killed run committed nothing"
        assert all(rows.get(path) == row for path, row in kept.items()), "a committed row was lost or redone"
        assert len(rows) < IMAGES, "the kill came after the last image"
        kept = rows
    proc = _tag(lib, index, out, log)
    assert proc.wait(timeout=300) == 0, log.read_text()
    summary = log.read_text()
    match = re.search(r"(\d+) tagged, (\d+) reused from the index", summary)
    assert match is not None, summary
    assert (int(match.group(1)), int(match.group(2))) == (IMAGES - len(kept), len(kept))  # only the missing ones
    rows = _rows(index)
    assert len(rows) == IMAGES and all(rows[path] == row for path, row in kept.items())
    assert len(out.read_text().splitlines()) == IMAGES
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("index.sqlite3-")]  # no journal left
    assert {p.name: p.read_bytes() for p in lib.iterdir()} == photos  # the photos themselves are never written
