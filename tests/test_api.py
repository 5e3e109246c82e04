"""The library entry point: ``sdltag.Tagger`` (tag, search, the lazy session, the index) and the README example."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sdltag
from sdltag import log
from sdltag.api import SidecarOptions, Tagger
from sdltag.errors import SdltagError
from sdltag.index import ImageIndex
from sdltag.tagger import TagOptions

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "tests" / "data" / "photos"


def _photos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        path = folder / f"p{i}.jpg"
        Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_readme_example_runs_against_the_bundled_model(tmp_path: Path, monkeypatch) -> None:
    """The README's Python API example, as written, on a copy of four test photos."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the Python API section has no example"
    shutil.copytree(PHOTOS, tmp_path / "examples" / "photos", ignore=shutil.ignore_patterns("*.md", "COPYRIGHT*"))
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.group(1), "README.md", "exec"), {})  # noqa: S102 - our own README
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines[:4]] == sorted(p.name for p in PHOTOS.glob("*.jpg"))
    assert lines[4].startswith("4 tagged, 0 reused from the index, 0 skipped")
    assert [line.split()[0] for line in lines[5:]] == ["1", "2", "3"]
    assert (tmp_path / "photos.sdltag").is_file()


def test_tag_yields_results_in_order_then_reuses_the_index_without_the_model(tmp_path: Path, tiny_model) -> None:
    files = _photos(tmp_path / "lib", 5)
    options = TagOptions(top_k=3, batch_size=2)
    with Tagger(tiny_model.path, index=tmp_path / "i.db", options=options) as tagger:
        run = tagger.tag([tmp_path / "lib"])
        assert run.files == files
        results = list(run)
        assert tagger._image_model is not None  # created for the first decoded image
    assert [r.path for r in results] == files and all(len(r.tags) == 3 for r in results)
    assert run.summary.tagged == 5 and run.summary.failures == 0
    with Tagger(tiny_model.path, index=tmp_path / "i.db", options=options) as again:
        second = list(again.tag(files))
        assert again._image_model is None  # every matrix came from the index: no session was started
    assert [[(t.label, t.score) for t in r.tags] for r in second] == [
        [(t.label, t.score) for t in r.tags] for r in results
    ]


def test_problems_are_logged_counted_and_handed_to_the_callback(tmp_path: Path, tiny_model) -> None:
    files = _photos(tmp_path / "lib", 2)
    (tmp_path / "lib" / "broken.jpg").write_text("not a jpeg")
    seen: list[str] = []
    with Tagger(tiny_model.path) as tagger, log.collect(logging.ERROR) as errors:
        run = tagger.tag([tmp_path / "lib", tmp_path / "missing.jpg"])
        results = list(run.results(on_problem=lambda p: seen.append(Path(p.path).name)))
    assert [r.path for r in results] == files
    assert seen == ["broken.jpg"] and [Path(p.path).name for p in run.problems] == ["missing.jpg"]
    assert any("broken.jpg" in e for e in errors) and any("missing.jpg" in e for e in errors)
    assert run.summary.failures == 2 and "1 missing or unreadable inputs" in run.summary.line()


def test_leaving_a_run_early_keeps_the_finished_batches_in_the_index(tmp_path: Path, tiny_model) -> None:
    _photos(tmp_path / "lib", 6)
    with Tagger(tiny_model.path, index=tmp_path / "i.db", options=TagOptions(batch_size=1)) as tagger:
        results = tagger.tag([tmp_path / "lib"]).results()
        next(results)  # the reader stops after one result (and still holds the iterator, as a traceback would)
        assert any(t.name.startswith("sdltag-decode") for t in threading.enumerate())
    # close() ended the run: the decode pool is shut down and the finished batches committed
    assert not any(t.name.startswith("sdltag-decode") for t in threading.enumerate())
    assert results is not None
    with ImageIndex.open_readonly(tmp_path / "i.db") as index:
        assert index.count(tiny_model.model_id) >= 1


def test_dry_run_and_sidecars(tmp_path: Path, tiny_model) -> None:
    files = _photos(tmp_path / "lib", 2)
    sidecars = SidecarOptions(xmp=True, txt=True, threshold=0.0, max_keywords=2)
    with Tagger(tiny_model.path, index=tmp_path / "i.db", dry_run=True, sidecars=sidecars) as tagger:
        run = tagger.tag(files)
        list(run)
    assert run.summary.xmp_changed == 2 and run.summary.txt_changed == 2
    assert "2 sidecars to update; 2 captions to update" in run.summary.line()
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == ["p0.jpg", "p1.jpg"]  # nothing written
    assert not (tmp_path / "i.db").exists()
    with Tagger(tiny_model.path, sidecars=sidecars) as tagger:
        list(tagger.tag(files))
    assert (tmp_path / "lib" / "p0.jpg.xmp").is_file() and (tmp_path / "lib" / "p0.txt").is_file()


def test_search_by_label_and_like(tmp_path: Path, tiny_model) -> None:
    files = _photos(tmp_path / "lib", 4)
    with Tagger(tiny_model.path, index=tmp_path / "i.db") as tagger:
        list(tagger.tag(files))
        hits = tagger.search("Cat", top_k=3)
        alike = tagger.search(like=files[0], folders=[tmp_path / "lib"], top_k=10)
    assert [h.rank for h in hits] == [1, 2, 3] and {h.label for h in hits} == {"cat"}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert files[0] not in [h.path for h in alike] and len(alike) == 3 and {h.kind for h in alike} == {"like"}
    with pytest.raises(SdltagError, match="no index yet"):
        Tagger(tiny_model.path, index=tmp_path / "none.db").search("cat")


def test_labels_as_a_ready_label_set(tmp_path: Path, tiny_model) -> None:
    own = sdltag.LabelSet.from_model(tiny_model)
    files = _photos(tmp_path / "lib", 1)
    with Tagger(tiny_model.path, own.rows(0, 2)) as tagger:
        (result,) = list(tagger.tag(files))
    assert {t.label for t in result.tags} == {"cat", "dog"}
    with Tagger(tiny_model.path, "Tree", include_seen=False) as tagger:  # one label and one path, as strings
        (result,) = list(tagger.tag(str(files[0])))
    assert [t.label for t in result.tags] == ["tree"]


def test_import_sdltag_stays_cheap() -> None:
    """``import sdltag`` loads neither numpy nor the pipeline; ``sdltag.Tagger`` does, on first use."""
    probe = "import sys, sdltag; print(sorted(m for m in ('numpy', 'sdltag.api', 'onnxruntime') if m in sys.modules))"
    cold = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert cold.stdout.strip() == "[]"
    warm = subprocess.run(
        [sys.executable, "-c", probe.replace("import sys, sdltag;", "import sys, sdltag; sdltag.Tagger;")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert warm.stdout.strip() == "['numpy', 'sdltag.api']"
