"""Model folders never destroy a user's files, and a replaced graph never reaches the index.

``--out`` (quantize, export, train, import-official) replaces only a folder sdltag wrote; a
``model.onnx`` whose bytes differ from the manifest's sha256 is refused before its vectors
are stored, and the check is cached per file identity.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdltag import modelfolder
from sdltag.cli import app
from sdltag.errors import SdltagError
from sdltag.modelfolder import check_output_folder, load_model_folder

sys.path.insert(0, str(Path(__file__).parent))
from conftest import build_tiny_model  # noqa: E402
from test_train import make_scenes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EMOJI = ROOT / "models" / "emoji"


def _webapp(root: Path, manifest: str = '{"name": "webapp", "version": "1.0.0"}') -> Path:
    """A user's project folder that happens to hold a manifest.json."""
    webapp = root / "webapp"
    (webapp / "src").mkdir(parents=True)
    (webapp / "manifest.json").write_text(manifest, encoding="utf-8")
    (webapp / "src" / "app.js").write_text("console.log('hi')\n", encoding="utf-8")
    (webapp / "thesis.tex").write_text("\\documentclass{article}\n", encoding="utf-8")
    return webapp


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error(result, folder: Path) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("sdltag: error:")]
    assert len(errors) == 1 and str(folder) in errors[0], result.output
    assert "Traceback" not in result.output
    return errors[0]


def _photos(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(count):
        path = folder / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# -- --out replaces only what sdltag wrote ---------------------------------------------------


def test_quantize_out_onto_a_project_folder_with_a_manifest_is_refused(tmp_path: Path) -> None:
    webapp = _webapp(tmp_path)
    before = _snapshot(webapp)
    photos = tmp_path / "photos"
    photos.mkdir()  # empty: refusing the folder must come before the calibration images are looked at
    result = CliRunner().invoke(app, ["quantize", str(EMOJI), str(photos), "--out", str(webapp)])
    assert result.exit_code == 2
    line = _one_error(result, webapp)
    assert "not a model folder" in line and "src/" in line and "thesis.tex" in line
    assert _snapshot(webapp) == before


@pytest.mark.parametrize(
    "case",
    ["sdltag manifest and a user's file", "model files only, manifest unparseable", "no manifest", "sub-folder"],
)
def test_out_folders_that_are_not_only_a_model_are_refused(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("model.onnx", "label_embeddings.npy"):
        (folder / name).write_bytes(b"x")
    manifest = (EMOJI / "manifest.json").read_text(encoding="utf-8")
    if case == "sdltag manifest and a user's file":
        (folder / "manifest.json").write_text(manifest, encoding="utf-8")
        (folder / "notes.txt").write_text("mine", encoding="utf-8")
    elif case == "model files only, manifest unparseable":
        (folder / "manifest.json").write_text(manifest[:100], encoding="utf-8")
    elif case == "sub-folder":
        (folder / "manifest.json").write_text(manifest, encoding="utf-8")
        (folder / "checkpoint.pt").mkdir()
    before = _snapshot(folder)
    with pytest.raises(SdltagError, match=rf"^{folder}: exists and"):
        check_output_folder(folder)
    assert _snapshot(folder) == before


def test_a_symlinked_out_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(SdltagError, match="symbolic link"):
        check_output_folder(tmp_path / "link")


def test_an_empty_folder_and_a_complete_model_folder_may_be_replaced(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty") == (tmp_path / "empty").absolute()
    model = tmp_path / "model"
    shutil.copytree(EMOJI, model)
    for name in ("checkpoint.pt", ".manifest.json.sdltag-tmp-123-abcdefgh", ".model.int8.onnx.partial-77"):
        (model / name).write_bytes(b"")  # what train writes, and what an interrupted write leaves
    assert check_output_folder(model) == model.absolute()


def test_export_replaces_a_model_folder_but_not_a_project(tmp_path: Path, tiny_model) -> None:
    from sdltag.nn.export import export_model
    from sdltag.nn.model import ModelConfig, SDLModel

    vectors = tiny_model.label_vectors
    config = ModelConfig(backbone="smallcnn", backbone_config={"width": 8}, rows=3, dim=vectors.shape[1])
    arguments = {
        "input_spec": tiny_model.manifest.input,
        "embedder": tiny_model.manifest.embedder,
        "seen_labels": tiny_model.all_labels,
        "unseen_labels": [],
        "label_vectors": vectors,
    }
    target = tmp_path / "again"
    shutil.copytree(tiny_model.path, target)
    export_model(SDLModel(config), target, **arguments)  # a model folder: replaced
    assert load_model_folder(target).manifest.name == "again"
    webapp = _webapp(tmp_path, manifest=(target / "manifest.json").read_text(encoding="utf-8"))
    before = _snapshot(webapp)
    with pytest.raises(SdltagError, match="not a model folder"):
        export_model(SDLModel(config), webapp, **arguments)
    assert _snapshot(webapp) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_train_out_onto_a_project_folder_is_refused_before_training(tmp_path: Path) -> None:
    data = make_scenes(tmp_path / "data", 8)
    webapp = _webapp(tmp_path)
    before = _snapshot(webapp)
    started = time.perf_counter()
    result = CliRunner().invoke(
        app, ["train", str(data), "--out", str(webapp), "--epochs", "50", "--workers", "0", "--width", "8"]
    )
    assert result.exit_code == 2
    assert time.perf_counter() - started < 20  # no text model loaded, no epoch run
    _one_error(result, webapp)
    assert "epoch" not in result.output
    assert _snapshot(webapp) == before and not (tmp_path / "webapp.train").exists()


def test_import_official_out_onto_a_project_folder_is_refused(tmp_path: Path) -> None:
    import zs_sdl_layout as zs

    webapp = _webapp(tmp_path)
    before = _snapshot(webapp)
    args = ["import-official", str(tmp_path / "missing.pth"), "--wordvecs", str(zs.WORDVECS)]
    result = CliRunner().invoke(app, [*args, "--classes", str(zs.CLASSES), "--out", str(webapp)])
    assert result.exit_code == 2
    _one_error(result, webapp)
    assert _snapshot(webapp) == before


# -- the graph's hash before its vectors enter the index ----------------------------------------


@pytest.fixture()
def model_copy(tmp_path: Path, tiny_model) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_model.path, target)
    return target


def _other_graph(tmp_path: Path, tiny_model) -> bytes:
    """A different model's graph with exactly the size of ``tiny_model``'s (other weights)."""
    other = build_tiny_model(tmp_path / "other", tiny_model.all_labels, tiny_model.label_vectors, seed=1)
    data = other.onnx_path.read_bytes()
    assert len(data) == tiny_model.onnx_path.stat().st_size and data != tiny_model.onnx_path.read_bytes()
    return data


def _indexed_model_ids(index: Path) -> list[str]:
    with sqlite3.connect(index) as conn:
        return [str(m) for (m,) in conn.execute("SELECT model_id FROM images")]


def test_a_swapped_graph_of_the_same_size_is_refused_and_nothing_is_indexed(
    tmp_path: Path, tiny_model, model_copy: Path
) -> None:
    photos = _photos(tmp_path / "photos")
    index = tmp_path / "index.db"
    onnx_file = model_copy / "model.onnx"
    original = onnx_file.read_bytes()
    stat = onnx_file.stat()
    onnx_file.write_bytes(_other_graph(tmp_path, tiny_model))
    os.utime(onnx_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old size and mtime
    args = ["tag", str(tmp_path / "photos"), "--model", str(model_copy), "--index", str(index)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    line = _one_error(result, onnx_file)
    assert "does not match the sha256" in line
    assert not index.exists() or _indexed_model_ids(index) == []
    onnx_file.write_bytes(original)  # restored: tags again, under the model's own identity
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    model_id = load_model_folder(model_copy).model_id
    assert _indexed_model_ids(index) == [model_id] * len(photos)


def test_the_verification_is_cached_per_file_identity(
    model_copy: Path, monkeypatch: pytest.MonkeyPatch, sdltag_home: Path
) -> None:
    calls: list[Path] = []
    real = modelfolder.file_sha256

    def counting(path: Path, chunk: int = 1 << 20) -> str:
        calls.append(Path(path))
        return real(path, chunk)

    monkeypatch.setattr(modelfolder, "file_sha256", counting)
    folder = load_model_folder(model_copy)
    folder.verify_onnx()
    folder.verify_onnx()
    load_model_folder(model_copy).verify_onnx()
    assert len(calls) == 1  # hashed once, then remembered
    assert (sdltag_home / "cache" / modelfolder.VERIFIED_GRAPHS).is_file()
    onnx_file = model_copy / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes())  # same bytes, a new write: hashed again, still valid
    folder.verify_onnx()
    assert len(calls) == 2
    (sdltag_home / "cache" / modelfolder.VERIFIED_GRAPHS).write_text("{not json", encoding="utf-8")
    folder.verify_onnx()  # a damaged record is only a cache miss
    assert len(calls) == 3


def test_a_manifest_without_a_hash_gets_one_recorded(model_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = model_copy / "manifest.json"
    data = json.loads(manifest.read_text(encoding="utf-8"))
    expected = data["onnx"].pop("sha256")
    data["onnx"].pop("bytes")
    data["weights"] = {"source": "somewhere", "licence": "Apache-2.0"}  # an entry this version does not know
    manifest.write_text(json.dumps(data), encoding="utf-8")
    folder = load_model_folder(model_copy)
    assert folder.model_id == expected
    recorded = json.loads(manifest.read_text(encoding="utf-8"))
    assert recorded["onnx"]["sha256"] == expected and recorded["weights"] == data["weights"]

    # A folder that cannot be written: the hash is computed for the run, the manifest left as it was.
    manifest.write_text(json.dumps(data), encoding="utf-8")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(modelfolder, "atomic_write", read_only)
    folder = load_model_folder(model_copy)
    assert folder.model_id == expected
    assert "sha256" not in json.loads(manifest.read_text(encoding="utf-8"))["onnx"]
    folder.verify_onnx()
    (model_copy / "model.onnx").write_bytes(b"\0" * folder.onnx_path.stat().st_size)
    with pytest.raises(SdltagError, match="does not match"):
        folder.verify_onnx()  # checked against the hash this run started with
