"""The matrix file: the index's matrices as 8-bit rows and residuals, never used stale, never read torn."""

from __future__ import annotations

import csv
import io
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdltag import matrixfile
from sdltag.index import ImageIndex
from sdltag.label_space import LabelSet
from sdltag.scoring import sdl_scores
from sdltag.search import rank_indexed

M, D = 3, 8


def _matrix(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(size=(M, D)).astype(np.float32)


def _fill(index: ImageIndex, folder: Path, numbers: range, model: str = "m") -> None:
    for i in numbers:
        index.put(folder / f"{i}.jpg", 1, 1, f"h{i}", model, _matrix(i))
    index.commit()


def _state(path: Path, model: str = "m") -> matrixfile.State | None:
    conn = sqlite3.connect(path)
    try:
        return matrixfile.read_state(conn, model)
    finally:
        conn.close()


def _values(view: matrixfile.IndexView) -> np.ndarray:
    return view.vectors(0, len(view))


def test_counters_move_with_every_change_in_its_transaction(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    with ImageIndex.open(db) as index:
        _fill(index, tmp_path, range(3))
        first = _state(db)
        assert first is not None and first.generation == 3 and first.removals == 0
        index.put(tmp_path / "0.jpg", 2, 2, "h0", "m", _matrix(9))  # a replaced row
        index.commit()
        assert _state(db).removals == 1 and _state(db).generation == 4
        index.put(tmp_path / "new.jpg", 1, 1, "x", "m", _matrix(5))  # not committed: counters unchanged outside
        assert _state(db).generation == 4
        index.commit()
        assert _state(db).generation == 5 and _state(db).epoch == first.epoch
        assert index.prune_missing([tmp_path]) == 4  # none of the files exist; rowcount counts rows only
        assert _state(db).removals == 5
        _fill(index, tmp_path, range(2), model="other")
        assert _state(db, "other").epoch != first.epoch and _state(db).generation == 9


def test_an_older_index_gets_its_counters(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT)")
    from sdltag.index import _migration_1

    _migration_1(conn)
    conn.execute("INSERT INTO schema_migrations VALUES (1, 'create_images_table', 'x')")
    conn.execute("INSERT INTO images VALUES (?, 'm', 1, 1, 'h', ?, ?, ?, 0)", (b"/x.jpg", M, D, _matrix(0).tobytes()))
    conn.commit()
    conn.close()
    with ImageIndex.open_readonly(db) as index:  # not migrated: still searchable, no matrix file
        assert matrixfile.load(index, "m") is None and index.count() == 1
    with ImageIndex.open(db) as index:
        assert _state(db) is not None
        view = matrixfile.load(index, "m")
        assert view is not None and len(view) == 1


def test_built_appended_rebuilt_and_never_stale(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    path = matrixfile.matrix_path(db, "m")
    with ImageIndex.open(db) as index:
        _fill(index, tmp_path, range(10))
        view = matrixfile.load(index, "m")
        assert len(view) == 10 and len(view.tail_ids) == 0 and path.is_file()
        np.testing.assert_allclose(_values(view), np.stack([_matrix(i) for i in range(10)]), atol=0.03)  # 8 bits
        inode = os.stat(path).st_ino
        _fill(index, tmp_path, range(10, 15))
        stale = matrixfile.load(index, "m", update=False)  # the file is older: the new rows come from SQLite
        assert len(stale.file) == 10 and len(stale.tail_ids) == 5
        view = matrixfile.load(index, "m")  # appended in place
        assert len(view.file) == 15 and len(view.tail_ids) == 0 and os.stat(path).st_ino == inode
        np.testing.assert_array_equal(view.rowids, np.sort(view.rowids))
        index.put(tmp_path / "3.jpg", 5, 5, "new", "m", _matrix(99))  # replaced: the file is stale
        index.commit()
        assert matrixfile.load(index, "m", update=False) is None
        view = matrixfile.load(index, "m")  # rebuilt, renamed over
        assert len(view) == 15 and os.stat(path).st_ino != inode
        assert np.isclose(_values(view), _matrix(99), atol=0.03).all(axis=(1, 2)).sum() == 1
        index.clear_model(["m"])
        assert matrixfile.load(index, "m", update=False) is None
        assert len(matrixfile.load(index, "m")) == 0


def test_a_file_of_another_index_or_damaged_is_not_used(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    with ImageIndex.open(db) as index:
        _fill(index, tmp_path, range(4))
        assert matrixfile.sync(index, "m")
    saved = matrixfile.matrix_path(db, "m").read_bytes()
    db.unlink()
    with ImageIndex.open(db) as index:  # a new index with as many rows: same counters but another epoch
        _fill(index, tmp_path, range(4, 8))
        assert matrixfile.MatrixFile.open(matrixfile.matrix_path(db, "m"), "m") is not None
        assert matrixfile.load(index, "m", update=False) is None
        view = matrixfile.load(index, "m")
        np.testing.assert_allclose(_values(view)[0], _matrix(4), atol=0.03)
        path = matrixfile.matrix_path(db, "m")
        assert matrixfile.MatrixFile.open(path, "another model") is None
        torn = bytearray(saved)
        torn[40] ^= 0xFF  # a header whose crc does not check
        path.write_bytes(bytes(torn))
        assert matrixfile.MatrixFile.open(path, "m") is None
        path.write_bytes(saved[:5000])  # cut short
        assert matrixfile.MatrixFile.open(path, "m") is None
        assert len(matrixfile.load(index, "m")) == 4  # rebuilt


def test_rank_matches_the_row_by_row_search_and_checks_only_shown_files(
    tmp_path: Path, tiny_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, d = tiny_model.manifest.rows, tiny_model.manifest.dim
    rng = np.random.default_rng(3)
    matrices = {}
    with ImageIndex.open(tmp_path / "i.db") as index:
        for i in range(300):
            path = tmp_path / ("a" if i % 2 else "b") / f"{i}.jpg"
            if i < 40:
                path.parent.mkdir(exist_ok=True)
                Image.new("RGB", (4, 4)).save(path)
            matrices[path] = rng.normal(size=(m, d)).astype(np.float32)
            index.put(path, 1, 1, str(i), tiny_model.model_id, matrices[path])
    own = LabelSet.from_model(tiny_model)
    label = LabelSet(own.names[:1], own.vectors[:1], own.unseen_mask[:1])
    real_exists = Path.exists
    checked: list[Path] = []

    def counting_exists(self: Path, **kwargs) -> bool:
        checked.append(self)
        return real_exists(self, **kwargs)

    with ImageIndex.open_readonly(tmp_path / "i.db") as index:
        monkeypatch.setattr(Path, "exists", counting_exists)
        hits = rank_indexed(index, tiny_model, label, [tmp_path / "a"], top=5, raw_scores=True)
        monkeypatch.undo()
        assert matrixfile.matrix_path(index.path, tiny_model.model_id).is_file()
    present = [p for p in matrices if p.parent.name == "a" and p.exists()]
    expected = sorted(present, key=lambda p: -float(sdl_scores(matrices[p][None], label.vectors)[0, 0]))[:5]
    assert [h.path for h in hits] == expected
    exact = [float(sdl_scores(matrices[p][None], label.vectors)[0, 0]) for p in expected]
    assert [h.score for h in hits] == pytest.approx(exact, rel=1e-6)  # the float32 rows, not the float16 file
    assert len(checked) < 40  # the shown ones and those gone above them, not 150 candidates


def test_retag_writes_each_images_best_labels(tmp_path: Path, tiny_model) -> None:
    m, d = tiny_model.manifest.rows, tiny_model.manifest.dim
    rng = np.random.default_rng(4)
    matrices = {}
    with ImageIndex.open(tmp_path / "i.db") as index:
        for i in range(50):
            path = tmp_path / (f"{i}.jpg" if i else 'a, "quoted" name.jpg')  # CSV quoting
            matrices[str(path)] = rng.normal(size=(m, d)).astype(np.float32)
            index.put(path, 1, 1, str(i), tiny_model.model_id, matrices[str(path)])
        labels = LabelSet.from_model(tiny_model)
        out = io.StringIO()
        assert matrixfile.retag(index, tiny_model, labels, out, top_k=3, raw_scores=True) == 50
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 150
    agree = 0
    for path, matrix in matrices.items():
        scores = sdl_scores(matrix[None], labels.vectors)[0]
        mine = [r for r in rows if r["path"] == path]
        assert [r["rank"] for r in mine] == ["1", "2", "3"]
        listed = [float(r["score"]) for r in mine]
        assert listed == sorted(listed, reverse=True)
        exact = {labels.names[i]: float(s) for i, s in enumerate(scores)}
        np.testing.assert_allclose(listed, [exact[r["label"]] for r in mine], atol=2e-4)  # 8-bit rows + residuals
        best = [labels.names[i] for i in np.argsort(-scores, kind="stable")[:3]]
        assert {r["label"] for r in mine} == set(best)  # the exact three, always
        agree += [r["label"] for r in mine] == best
    assert agree >= 48  # in the exact order but where two are within the error bound


def _near_ties(tmp_path: Path, n: int) -> tuple[dict[int, np.ndarray], LabelSet]:
    """``n`` images and labels in pairs 1e-6 apart: every image's best two are closer than any 8-bit error."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(4, D)).astype(np.float32)
    twins = base + rng.normal(size=(4, D)).astype(np.float32) * 1e-6
    vectors = np.concatenate([base, twins])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    space = LabelSet([f"l{i}" for i in range(8)], vectors, np.ones(8, dtype=bool))
    matrices = {}
    with ImageIndex.open(tmp_path / "i.db") as index:
        for i in range(n):
            matrices[i] = rng.normal(size=(M, D)).astype(np.float32)
            index.put(tmp_path / f"{i}.jpg", 1, 1, f"h{i}", "m", matrices[i])
    return matrices, space


def test_top_labels_are_the_exact_ones_even_when_nearly_tied(tmp_path: Path) -> None:
    matrices, space = _near_ties(tmp_path, 300)

    class Model:
        model_id = "m"
        manifest = type("Manifest", (), {"calibration": None})()

    with ImageIndex.open(tmp_path / "i.db") as index:
        ranked = matrixfile.top_labels(index, Model(), space, top_k=1, raw_scores=True, threads=2, block=64)
        blocks = list(ranked)
        view = matrixfile.load(index, "m")
        weights = np.ascontiguousarray(space.vectors.T)
        fine = view.block_scores(0, len(view), weights, fine=True)
        bound = view.error_bound(0, len(view), weights)
    exact = sdl_scores(np.stack([matrices[i] for i in range(300)]), space.vectors)
    assert np.all(np.abs(fine - exact) <= bound[:, None] * 1.01)  # the stated bound holds
    assert np.all(bound < 1e-3) and np.all(bound > 0)
    labels = np.concatenate([b.labels[:, 0] for b in blocks])
    resolved = np.concatenate([b.exact for b in blocks])
    assert len(labels) == 300 and labels.tolist() == np.argmax(exact, axis=1).tolist()  # every one exact
    assert resolved.mean() > 0.5  # the twins tie within the bound: those images were re-scored from SQLite
    scores = np.concatenate([b.scores[:, 0] for b in blocks])
    np.testing.assert_allclose(scores, exact.max(axis=1), atol=1e-6)


def test_retag_csv_cells_of_awkward_names(tmp_path: Path, tiny_model) -> None:
    names = ["plain.jpg", "a,b.jpg", 'q"uote.jpg', "line\nbreak.jpg", "ünï.jpg", "cr\rx.jpg"]
    with ImageIndex.open(tmp_path / "i.db") as index:
        m, d = tiny_model.manifest.rows, tiny_model.manifest.dim
        for i, name in enumerate(names):
            index.put(tmp_path / name, 1, 1, str(i), tiny_model.model_id, np.full((m, d), 0.1 * i, dtype=np.float32))
        out = io.StringIO()
        assert matrixfile.retag(index, tiny_model, LabelSet.from_model(tiny_model), out, top_k=1) == len(names)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["path"] for r in rows] == [str(tmp_path / n) for n in names]  # the cells quoted where needed
    assert all(r["rank"] == "1" and r["kind"] == "seen" for r in rows)


def test_a_killed_rebuilds_half_written_file_is_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    db = tmp_path / "i.db"
    path = matrixfile.matrix_path(db, "m")
    leftover = path.with_name(f".{path.name}.sdltag-tmp-{dead}")
    live = path.with_name(f".{path.name}.sdltag-tmp-{os.getppid()}")  # a running rebuild's file stays
    leftover.write_bytes(b"x" * 100)
    live.write_bytes(b"x")
    with ImageIndex.open(db) as index:
        _fill(index, tmp_path, range(3))
        assert matrixfile.sync(index, "m")
    assert not leftover.exists() and live.exists()
