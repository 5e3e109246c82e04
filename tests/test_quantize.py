"""sdltag quantize: an 8-bit model folder from a float one (real onnxruntime quantisation and inference)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.images import load_image
from sdltag.modelfolder import load_model_folder
from sdltag.runtime import ImageModel


def _scenes(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)
        pixels[: 10 + i % 20] = rng.integers(0, 255, size=3)  # a band of one colour, of varying height
        path = folder / f"scene_{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def test_quantised_folder_runs_close_to_the_float_model(tmp_path: Path, tiny_model) -> None:
    images = _scenes(tmp_path / "calib", 40)
    (tmp_path / "calib" / "broken.jpg").write_bytes(b"not an image")  # reported, skipped
    out = tmp_path / "tiny-int8"
    result = CliRunner().invoke(
        app, ["quantize", str(tiny_model.path), str(tmp_path / "calib"), "--out", str(out), "--count", "20"]
    )
    assert result.exit_code == 0, result.stderr
    assert "broken.jpg" in result.stderr and "score correlation" in result.stderr
    quantised = load_model_folder(out)
    record = quantised.manifest.provenance["quantization"]
    assert record["source_model"] == tiny_model.model_id and record["calibration_images"] == 20
    assert record["fidelity"]["held_out"] and record["fidelity"]["images"] == 20  # 40 decodable, 20 held out
    assert quantised.model_id != tiny_model.model_id  # its own rows in the index
    assert quantised.all_labels == tiny_model.all_labels
    np.testing.assert_array_equal(quantised.label_vectors, tiny_model.label_vectors)
    # the graph really is 8-bit: integer weights, and it runs with the same shapes
    import onnx

    graph = onnx.load(str(quantised.onnx_path)).graph
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)
    batch = np.stack([load_image(p, tiny_model.manifest.input) for p in images[:6]])
    a = ImageModel(tiny_model, device="cpu").run(batch)
    b = ImageModel(quantised, device="cpu").run(batch)
    assert a.shape == b.shape
    assert float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) > 0.95
    assert record["fidelity"]["score_correlation"] > 0.95
    # and sdltag tag uses it like any model folder
    tagged = CliRunner().invoke(app, ["tag", str(images[0]), "--model", str(out), "--no-index", "-k", "2"])
    assert tagged.exit_code == 0, tagged.stderr
    assert len(json.loads(tagged.stdout)["tags"]) == 2


def test_quantize_refusals(tmp_path: Path, tiny_model) -> None:
    _scenes(tmp_path / "one", 1)
    result = CliRunner().invoke(
        app, ["quantize", str(tiny_model.path), str(tmp_path / "one"), "--out", str(tmp_path / "q")]
    )
    assert result.exit_code == 2 and "at least 2" in result.stderr
    result = CliRunner().invoke(
        app, ["quantize", str(tiny_model.path), str(tmp_path / "one"), "--out", str(tiny_model.path)]
    )
    assert result.exit_code == 2 and "another folder" in result.stderr
    assert not (tmp_path / "q").exists()


def test_an_8bit_model_is_not_quantised_twice(tmp_path: Path, tiny_model) -> None:
    _scenes(tmp_path / "calib", 8)
    first = CliRunner().invoke(
        app, ["quantize", str(tiny_model.path), str(tmp_path / "calib"), "--out", str(tmp_path / "q1")]
    )
    assert first.exit_code == 0, first.stderr
    second = CliRunner().invoke(
        app, ["quantize", str(tmp_path / "q1"), str(tmp_path / "calib"), "--out", str(tmp_path / "q2")]
    )
    assert second.exit_code == 2 and "already quantised" in second.stderr


def _attached_copy(tmp_path: Path, tiny_model) -> tuple[Path, list[Path]]:
    """A copy of the tiny model with its 8-bit graph attached (the real quantiser), and the calibration scenes."""
    import shutil

    images = _scenes(tmp_path / "calib", 30)
    model_dir = tmp_path / "tiny"
    shutil.copytree(tiny_model.path, model_dir)
    (model_dir / "MODEL_CARD.md").write_text("# tiny\n\nA test model.\n")
    result = CliRunner().invoke(app, ["quantize", str(model_dir), str(tmp_path / "calib"), "--attach", "--count", "12"])
    assert result.exit_code == 0, result.stderr
    assert "model.int8.onnx" in result.stderr and "top-10 overlap" in result.stderr
    return model_dir, images


def _index_ids(index_path: Path) -> set[str]:
    import sqlite3

    with sqlite3.connect(index_path) as conn:
        return {row[0] for row in conn.execute("SELECT DISTINCT model_id FROM images")}


def test_attach_puts_the_8bit_graph_beside_the_float_one(tmp_path: Path, tiny_model) -> None:
    model_dir, _ = _attached_copy(tmp_path, tiny_model)
    model = load_model_folder(model_dir)
    assert model.has_int8 and model.precision == "float"
    assert model.model_id == tiny_model.model_id  # the float graph is untouched
    int8 = model.with_precision("int8")
    assert int8.onnx_path == model_dir / "model.int8.onnx" and int8.model_id != model.model_id
    int8.verify_onnx()  # the recorded sha256 is the file's
    entry = model.manifest.onnx_int8
    assert entry["source_model"] == tiny_model.model_id
    assert entry["fidelity"]["held_out"] and entry["fidelity"]["images"] == 18
    batch = np.stack([load_image(p, model.manifest.input) for p in sorted((tmp_path / "calib").glob("*.png"))[:4]])
    a, b = ImageModel(model, device="cpu").run(batch), ImageModel(int8, device="cpu").run(batch)
    assert float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) > 0.95 and not np.array_equal(a, b)
    # attaching again replaces the graph and the model card's section, never duplicates them
    again = CliRunner().invoke(
        app, ["quantize", str(model_dir), str(tmp_path / "calib"), "--attach", "--count", "12", "--seed", "1"]
    )
    assert again.exit_code == 0, again.stderr
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert card.count("## 8-bit graph") == 1 and card.startswith("# tiny\n\nA test model.\n")
    assert sorted(p.name for p in model_dir.iterdir() if p.name.startswith(".")) == []  # no partial files left
    # a separate 8-bit copy of it does not carry the attached graph along
    copy = CliRunner().invoke(
        app, ["quantize", str(model_dir), str(tmp_path / "calib"), "--out", str(tmp_path / "q"), "--count", "12"]
    )
    assert copy.exit_code == 0, copy.stderr
    assert not load_model_folder(tmp_path / "q").has_int8


def test_auto_precision_runs_the_8bit_graph_only_where_the_cpu_has_dot_product(
    tmp_path: Path, tiny_model, monkeypatch
) -> None:
    import sdltag.runtime

    model_dir, images = _attached_copy(tmp_path, tiny_model)
    model = load_model_folder(model_dir)
    float_id, int8_id = model.model_id, model.with_precision("int8").model_id

    def tag(index: Path, *extra: str):
        result = CliRunner().invoke(
            app, ["tag", str(images[0]), "--model", str(model_dir), "--index", str(index), "--device", "cpu", *extra]
        )
        assert result.exit_code == 0, result.stderr
        return result

    monkeypatch.setattr(sdltag.runtime, "int8_dot_product", lambda: "AVX-512 VNNI")
    result = tag(tmp_path / "a.db")
    assert "8-bit graph (AVX-512 VNNI" in result.stderr and _index_ids(tmp_path / "a.db") == {int8_id}
    result = tag(tmp_path / "b.db", "--precision", "float")
    assert "float graph" in result.stderr and _index_ids(tmp_path / "b.db") == {float_id}
    # search finds images tagged with the other graph of the same model
    found = CliRunner().invoke(app, ["search", "cat", "--model", str(model_dir), "--index", str(tmp_path / "b.db")])
    assert found.exit_code == 0, found.stderr
    assert json.loads(found.stdout.splitlines()[0])["path"] == str(images[0])
    monkeypatch.setattr(sdltag.runtime, "int8_dot_product", lambda: None)  # AVX2 only: u8 x s8 may saturate
    result = tag(tmp_path / "c.db")
    assert "no VNNI" in result.stderr and _index_ids(tmp_path / "c.db") == {float_id}
    result = tag(tmp_path / "d.db", "--precision", "int8")  # asked for explicitly: runs anyway
    assert _index_ids(tmp_path / "d.db") == {int8_id}
    # eval measures the float graph unless told otherwise
    from sdltag.runtime import resolve_precision

    assert resolve_precision(model, "float", "cpu")[0].model_id == float_id


def test_precision_refusals_name_the_fix(tmp_path: Path, tiny_model) -> None:
    images = _scenes(tmp_path / "calib", 2)
    base = ["tag", str(images[0]), "--model", str(tiny_model.path), "--no-index"]
    result = CliRunner().invoke(app, [*base, "--precision", "int8"])
    assert result.exit_code == 2 and "no 8-bit graph" in result.stderr and "quantize" in result.stderr
    result = CliRunner().invoke(app, [*base, "--precision", "fast"])
    assert result.exit_code == 2 and "auto, float, int8" in result.stderr
    result = CliRunner().invoke(app, ["quantize", str(tiny_model.path), str(tmp_path / "calib")])
    assert result.exit_code == 2 and "--attach" in result.stderr and "--out" in result.stderr
    result = CliRunner().invoke(
        app, ["quantize", str(tiny_model.path), str(tmp_path / "calib"), "--attach", "--out", str(tmp_path / "q")]
    )
    assert result.exit_code == 2 and not (tmp_path / "q").exists()


def test_a_damaged_8bit_graph_is_refused_by_name(tmp_path: Path, tiny_model, monkeypatch) -> None:
    import sdltag.runtime

    model_dir, images = _attached_copy(tmp_path, tiny_model)
    int8 = model_dir / "model.int8.onnx"
    int8.write_bytes(int8.read_bytes()[:1000])
    monkeypatch.setattr(sdltag.runtime, "int8_dot_product", lambda: "AVX-512 VNNI")
    result = CliRunner().invoke(app, ["tag", str(images[0]), "--model", str(model_dir), "--no-index"])
    assert result.exit_code == 2 and "model.int8.onnx" in result.stderr and "--precision float" in result.stderr
    result = CliRunner().invoke(
        app, ["tag", str(images[0]), "--model", str(model_dir), "--no-index", "--precision", "float"]
    )
    assert result.exit_code == 0, result.stderr


def test_attach_to_a_folder_it_cannot_write_names_the_fix(tmp_path: Path, tiny_model, monkeypatch) -> None:
    import shutil

    import sdltag.modelfolder

    _scenes(tmp_path / "calib", 8)
    model_dir = tmp_path / "tiny"
    shutil.copytree(tiny_model.path, model_dir)
    before = (model_dir / "manifest.json").read_bytes()
    real_copyfile = shutil.copyfile

    def deny(src, dst, *args, **kwargs):
        if Path(dst).parent == model_dir:
            raise PermissionError(13, "Permission denied", str(dst))
        return real_copyfile(src, dst, *args, **kwargs)

    monkeypatch.setattr(sdltag.modelfolder.shutil, "copyfile", deny)
    result = CliRunner().invoke(app, ["quantize", str(model_dir), str(tmp_path / "calib"), "--attach"])
    assert result.exit_code == 2 and "cannot write the 8-bit graph" in result.stderr and "--out" in result.stderr
    assert (model_dir / "manifest.json").read_bytes() == before and not load_model_folder(model_dir).has_int8
