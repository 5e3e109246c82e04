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
