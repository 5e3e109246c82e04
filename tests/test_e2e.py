"""End to end: the installed `sdltag` command in a subprocess, real files, a real model folder, onnxruntime,
SQLite and the bundled text embedder for a zero-shot label."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import build_tiny_model
from PIL import Image


def _sdltag() -> str:
    found = shutil.which("sdltag", path=str(Path(sys.executable).parent)) or shutil.which("sdltag")
    assert found, "the sdltag command is not installed in this environment (pip install -e .)"
    return found


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny image model in the bundled all-MiniLM-L6-v2 label space, and the label cache it was built with."""
    from sdltag.embedding import get_text_embedder

    cache = tmp_path_factory.mktemp("label-cache")
    embedder = get_text_embedder(None, cache)
    labels = ["cat", "dog", "tree", "car", "beach", "boat"]
    vectors = embedder.embed(labels)
    model = build_tiny_model(
        tmp_path_factory.mktemp("models") / "e2e",
        labels,
        vectors,
        embedder=embedder.spec.to_json(),
        calibration={"method": "platt", "seen": {"a": 4.0, "b": -1.0}},
    )
    return model, cache


def _library(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    (folder / "trip").mkdir()
    paths = []
    for i, color in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (220, 220, 60)]):
        rng = np.random.default_rng(i)
        pixels = (np.array(color) * rng.uniform(0.4, 1.0, size=(300, 400, 1))).astype(np.uint8)
        path = folder / ("trip" if i % 2 else "") / f"IMG_{i}.JPG"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    (folder / "trip" / "broken.jpg").write_text("not a jpeg")
    return paths


def _run(args: list[str], env: dict, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([_sdltag(), *args], input=stdin, capture_output=True, env=env, timeout=120)


def test_installed_command_tags_indexes_retags_and_searches(tmp_path: Path, text_model) -> None:
    model, cache = text_model
    library = tmp_path / "Photos \u00e9t\u00e9"
    photos = _library(library)
    env = {**os.environ, "SDLTAG_HOME": str(tmp_path / "home"), "LANG": "C", "LC_ALL": "C"}
    common = ["--model", str(model.path), "--cache-dir", str(cache)]

    sidecars = ["--xmp", "--sidecar-threshold", "0", "--sidecar-max", "7"]  # every printed tag into the sidecar
    first = _run(["tag", str(library), *common, "--label", "red car", "-k", "7", *sidecars], env)
    stderr = first.stderr.decode()
    assert first.returncode == 1, stderr  # the broken file fails, the rest are tagged
    assert "broken.jpg" in stderr and "CPUExecutionProvider" in stderr and "4 tagged" in stderr
    records = [json.loads(line) for line in first.stdout.decode("utf-8").splitlines()]
    assert sorted(r["path"] for r in records) == sorted(str(p) for p in photos)  # Unicode survives LANG=C
    for record in records:
        assert len(record["tags"]) == 7
        assert {t["kind"] for t in record["tags"]} == {"seen", "unseen"}
        assert all(0.0 <= t["score"] <= 1.0 for t in record["tags"])  # calibrated confidences
    sidecar = photos[0].with_name(photos[0].name + ".xmp")
    assert "sdltag|red car" in sidecar.read_text(encoding="utf-8")
    assert (tmp_path / "home" / "data" / "index.sqlite3").is_file()

    # new labels: the image model does not run again, and the stored matrices give the same seen scores
    again = _run(
        ["tag", str(library), *common, "--label", "sunset", "--label", "red car", "-k", "8", "--format", "csv"], env
    )
    assert "0 tagged, 4 reused" in again.stderr.decode() and "ExecutionProvider" not in again.stderr.decode()
    assert again.stdout.decode().startswith("path,rank,label,score,kind,path_bytes\n")
    assert ",sunset," in again.stdout.decode()

    # stdin, NUL-separated, JSON array
    listing = b"\0".join(os.fsencode(p) for p in photos[:2]) + b"\0"
    piped = _run(["tag", "-", "-0", *common, "--format", "json"], env, stdin=listing)
    assert piped.returncode == 0 and [r["path"] for r in json.loads(piped.stdout)] == [str(p) for p in photos[:2]]

    found = _run(["search", "red car", str(library), *common, "--top", "3"], env)
    assert found.returncode == 0, found.stderr.decode()
    hits = [json.loads(line) for line in found.stdout.decode().splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["kind"] == "unseen"
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_cached_tag_run_does_not_import_torch(tmp_path: Path, text_model) -> None:
    model, cache = text_model
    photos = _library(tmp_path / "lib")
    env = {**os.environ, "SDLTAG_HOME": str(tmp_path / "home")}
    common = ["tag", str(photos[0]), "--model", str(model.path), "--cache-dir", str(cache), "--label", "red car"]
    assert _run(common, env).returncode == 0  # embeds "red car" into the cache if it is not there yet
    probe = (
        "import sys\n"
        "from sdltag.cli import app\n"
        f"sys.argv = ['sdltag'] + {common!r}\n"
        "try:\n    app()\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, env=env, timeout=120)
    assert b"NO-TORCH 0" in result.stderr, result.stderr.decode()
