"""`sdltag search --like IMAGE`: rank indexed images by likeness of their principal-vector matrices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.images import load_image
from sdltag.index import ImageIndex
from sdltag.runtime import ImageModel
from sdltag.similar import chamfer_similarity


def _by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """The definition, one pair of rows at a time."""

    def cos(x, y):
        return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))

    forward = np.mean([max(cos(x, y) for y in b) for x in a])
    backward = np.mean([max(cos(x, y) for x in a) for y in b])
    return float(0.5 * (forward + backward))


def test_chamfer_similarity_is_the_definition() -> None:
    rng = np.random.default_rng(0)
    query = rng.normal(size=(4, 8)).astype(np.float32)
    batch = rng.normal(size=(5, 4, 8)).astype(np.float32)
    got = chamfer_similarity(query, batch)
    np.testing.assert_allclose(got, [_by_hand(query, m) for m in batch], rtol=1e-5, atol=1e-6)
    assert chamfer_similarity(query, query[None])[0] == pytest.approx(1.0, abs=1e-6)
    # rows are not aligned between images: their order does not matter, nor their length
    shuffled = query[[2, 0, 3, 1]] * np.array([[3.0], [0.5], [1.0], [7.0]], np.float32)
    assert chamfer_similarity(query, shuffled[None])[0] == pytest.approx(1.0, abs=1e-6)
    # symmetric
    assert chamfer_similarity(batch[1], batch[2][None])[0] == pytest.approx(
        chamfer_similarity(batch[2], batch[1][None])[0], abs=1e-6
    )


def _photos(folder: Path, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        base = np.array([(200, 30, 30), (30, 200, 30), (30, 30, 200)][i % 3])
        pixels = (base * rng.uniform(0.4, 1.0, size=(32, 40, 1))).astype(np.uint8)
        out.append(folder / f"p{i}.jpg")
        Image.fromarray(pixels).save(out[-1], quality=90)
    return out


def _search(*args: object):
    return CliRunner().invoke(app, ["search", *map(str, args)])


def test_search_like(tmp_path: Path, tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = tmp_path / "lib"
    photos = _photos(lib, 6) + _photos(lib / "sub", 2, start=6)
    index_file = tmp_path / "i.db"
    tagged = CliRunner().invoke(app, ["tag", str(lib), "--model", str(tiny_model.path), "--index", str(index_file)])
    assert tagged.exit_code == 0, tagged.stderr
    with ImageIndex.open_readonly(index_file) as index:
        stored = {row.path: row.vectors for row in index.under([], tiny_model.model_id)}
    base = ["--model", tiny_model.path, "--index", index_file]

    def expected(query: np.ndarray, skip: Path | None = None, under: Path = lib) -> list[tuple[str, float]]:
        pairs = [(str(p), _by_hand(query, m)) for p, m in stored.items() if p != skip and under in p.parents]
        return sorted(pairs, key=lambda x: (-x[1], x[0]))

    def hits(result) -> list[tuple[str, float]]:
        return [(r["path"], r["score"]) for r in map(json.loads, result.stdout.splitlines())]

    # an indexed query: read from the index, the model never runs; the image itself is left out
    monkeypatch.setattr("sdltag.runtime.ImageModel.run", lambda *a, **k: pytest.fail("the model ran"))
    result = _search("--like", photos[0], *base, "--top", "100")
    assert result.exit_code == 0, result.stderr
    assert "principal vectors from the index" in result.stderr
    want = expected(stored[photos[0]], skip=photos[0])
    assert [p for p, _ in hits(result)] == [p for p, _ in want]
    np.testing.assert_allclose([s for _, s in hits(result)], [s for _, s in want], atol=1e-4)
    assert {r["label"] for r in map(json.loads, result.stdout.splitlines())} == {"p0.jpg"}
    # a copy under another name: found by content hash; QUERY is then the first folder
    copy = tmp_path / "copy.jpg"
    shutil.copyfile(photos[1], copy)
    result = _search("--like", copy, lib / "sub", *base)
    assert result.exit_code == 0 and "from the index (same content)" in result.stderr
    assert [p for p, _ in hits(result)] == [p for p, _ in expected(stored[photos[1]], under=lib / "sub")]
    monkeypatch.undo()
    # a new image: the model runs on it alone
    new = tmp_path / "new.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(new)
    result = _search("--like", new, *base, "--top", "3", "-f", "jsonl")
    assert result.exit_code == 0 and "from the image model" in result.stderr
    query = ImageModel(tiny_model, device="cpu").run(load_image(new, tiny_model.manifest.input)[None])[0]
    assert [p for p, _ in hits(result)] == [p for p, _ in expected(query)][:3]
    # --threshold on the likeness
    ranked = [score for _, score in expected(stored[photos[0]], skip=photos[0])]
    limit = (ranked[2] + ranked[3]) / 2
    result = _search("--like", photos[0], *base, "-t", repr(limit))
    assert len(hits(result)) == 3
    none = _search("--like", photos[0], *base, "-t", "1.5")
    assert none.exit_code == 1 and "is at least 1.5 alike" in none.stderr
    # usage errors
    missing = _search("--like", tmp_path / "nope.jpg", *base)
    assert missing.exit_code == 2 and "nope.jpg: cannot read the --like image" in missing.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    broken = _search("--like", bad, *base)
    assert broken.exit_code == 2 and "bad.jpg: cannot use it as the --like image" in broken.stderr
    nothing = _search(*base)
    assert nothing.exit_code == 2 and "or --like IMAGE" in nothing.stderr
