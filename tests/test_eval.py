"""`sdltag eval` on a model and data whose answers are known by construction.

The model's "principal vector" is the image's mean colour (M = 1, d = 3) and the labels'
vectors are the RGB axes, so a red image scores (1, 0, 0) against (red, green, blue).
It runs through the real ONNX export, onnxruntime and image decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sdltag import log
from sdltag.cli import app
from sdltag.evaluation import evaluate, format_table
from sdltag.modelfolder import EmbedderSpec, InputSpec, Manifest, load_model_folder, write_model_folder


class MeanColour(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3)).unsqueeze(1)  # (B, 3) -> (B, 1, 3)


def colour_model(path: Path, calibration: dict | None = None) -> Path:
    from sdltag.nn.export import export_onnx

    spec = InputSpec(8, 8)
    onnx_path = path.parent / "colour.onnx"
    export_onnx(MeanColour(), spec, onnx_path)
    manifest = Manifest(
        name="colour",
        backbone="mean-colour",
        backbone_config={},
        input=spec,
        rows=1,
        dim=3,
        embedder=EmbedderSpec("sentence-transformers", "axes", "axes@sha256:0", 3),
        seen_labels=["red", "green"],
        unseen_labels=["blue"],
        calibration=calibration,
    )
    write_model_folder(path, onnx_path, manifest, np.eye(3, dtype=np.float32))
    return path


# image: (colour, labels). Scores against (red, green, blue) are the colour / 255.
IMAGES = {
    "red.png": ((255, 0, 0), "red"),
    "green.png": ((0, 255, 0), "green"),
    "blue.png": ((0, 0, 255), "blue"),
    "yellow.png": ((255, 255, 0), "red;green"),
    "magenta.png": ((255, 0, 255), "red"),  # blue scores 1 here too: a false positive tied with blue.png
    "grey.png": ((128, 128, 128), "purple"),  # a label the model does not know: ignored, image filtered
}


def colour_data(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    for name, (colour, labels) in IMAGES.items():
        Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(root / name)
        rows.append(f"{name},{labels}")
    (root / "broken.png").write_bytes(b"not an image")
    rows.append("broken.png,red")
    (root / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


# By hand. GZSL keeps 5 images (grey has no ranked label; broken does not decode) with 6 GT labels.
# With 3 labels, the top 3 and top 5 are all labels: TP = 6. P@3 = 6/15, R = 1; P@5 = 6/25.
# AP: red [1,0,0,1,1] vs positives [1,0,0,1,1] = 1; green = 1; blue scores 1 on blue.png (pos)
# and magenta.png (neg), tied -> 1/2. GZSL mAP = (1 + 1 + 0.5) / 3.
# ZSL ranks blue only and keeps blue.png only: P@3 = 1/3, R = 1, AP = 1.
def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r)


def test_eval_known_answers(tmp_path: Path) -> None:
    model = load_model_folder(colour_model(tmp_path / "model"))
    with log.collect() as warnings:
        report = evaluate(model, colour_data(tmp_path / "data"), threads=1)
    assert (report.images_listed, report.images_failed) == (7, 1)
    assert any("broken.png" in w for w in warnings)
    assert report.ignored_labels == ["purple"]
    assert (report.seen_labels, report.unseen_labels) == (2, 1)
    gzsl, zsl = report.results["gzsl"], report.results["zsl"]
    assert (gzsl.images, gzsl.labels) == (5, 3)
    assert gzsl.map == pytest.approx(100 * 2.5 / 3)
    assert gzsl.precision[3] == pytest.approx(100 * 6 / 15)
    assert gzsl.recall[3] == pytest.approx(100.0)
    assert gzsl.f1[3] == pytest.approx(100 * _f1(6 / 15, 1))
    assert gzsl.precision[5] == pytest.approx(100 * 6 / 25)
    assert gzsl.f1[5] == pytest.approx(100 * _f1(6 / 25, 1))
    assert (zsl.images, zsl.labels) == (1, 1)
    assert zsl.map == pytest.approx(100.0)
    assert zsl.precision[3] == pytest.approx(100 / 3)
    assert zsl.f1[3] == pytest.approx(100 * _f1(1 / 3, 1))
    table = format_table(report)
    assert "ZSL" in table and "GZSL" in table and "83.33" in table
    # The official rule changes nothing here (every ranked label has a positive) but is recorded.
    zero = evaluate(model, tmp_path / "data", empty="zero", threads=1)
    assert zero.results["gzsl"].map == pytest.approx(gzsl.map)
    assert "count as 0" in format_table(zero)


def test_eval_reports_calibration_error(tmp_path: Path) -> None:
    calibration = {"method": "platt", "seen": {"a": 10.0, "b": -5.0}, "unseen": {"a": 10.0, "b": -5.0}}
    model = load_model_folder(colour_model(tmp_path / "model", calibration))
    report = evaluate(model, colour_data(tmp_path / "data"), threads=1)
    # Confidences are sigmoid(10 s - 5) of the known scores; ECE recomputed here over every decoded image
    # (grey.png included: calibration concerns all pairs, not only the filtered images).
    scores = {
        "red.png": (1, 0, 0),
        "green.png": (0, 1, 0),
        "blue.png": (0, 0, 1),
        "yellow.png": (1, 1, 0),
        "magenta.png": (1, 0, 1),
        "grey.png": (128 / 255,) * 3,
    }
    targets = {
        "red.png": (1, 0, 0),
        "green.png": (0, 1, 0),
        "blue.png": (0, 0, 1),
        "yellow.png": (1, 1, 0),
        "magenta.png": (1, 0, 0),
        "grey.png": (0, 0, 0),
    }
    s = np.array(list(scores.values()))
    t = np.array(list(targets.values()))
    conf = 1 / (1 + np.exp(-(10 * s - 5)))

    def ece(c: np.ndarray, y: np.ndarray) -> float:
        bins = np.minimum((c * 15).astype(int), 14)
        return sum(abs(y[bins == b].sum() - c[bins == b].sum()) for b in range(15)) / c.size

    assert report.ece["seen"] == pytest.approx(ece(conf[:, :2].ravel(), t[:, :2].ravel()), abs=1e-4)
    assert report.ece["unseen"] == pytest.approx(ece(conf[:, 2], t[:, 2]), abs=1e-4)


def test_eval_command_table_and_json(tmp_path: Path) -> None:
    colour_model(tmp_path / "model")
    colour_data(tmp_path / "data")
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(tmp_path / "model"), str(tmp_path / "data"), "--format", "json", "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["images"] == {"listed": 7, "failed": 1, "evaluated": 6}
    assert data["gzsl"]["map"] == pytest.approx(83.3333, abs=1e-3)
    assert data["zsl"]["f1"]["3"] == pytest.approx(50.0)
    assert data["map_rule"] == "skip"
    table = runner.invoke(app, ["eval", str(tmp_path / "model"), str(tmp_path / "data"), "-q"])
    assert table.exit_code == 0
    assert "GZSL" in table.stdout and "broken.png" in table.stderr
    bad = runner.invoke(app, ["eval", str(tmp_path / "model"), str(tmp_path / "data"), "--format", "xml"])
    assert bad.exit_code == 2 and "'xml' is not one of 'table', 'json'" in bad.stderr  # checked before any work
    missing = runner.invoke(app, ["eval", str(tmp_path / "nope"), str(tmp_path / "data")])
    assert missing.exit_code == 2 and "nope" in missing.stderr


def test_eval_does_not_import_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    colour_model(tmp_path / "model")
    colour_data(tmp_path / "data")
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from sdltag.cli import app\n"
        f"r = CliRunner().invoke(app, ['eval', {str(tmp_path / 'model')!r}, {str(tmp_path / 'data')!r}, '-q'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_eval_layout_and_its_old_spelling(tmp_path: Path) -> None:
    """`--layout` names the folder layout; `--data-format`, its old spelling, still works but is not listed."""
    colour_model(tmp_path / "model")
    colour_data(tmp_path / "data")
    runner = CliRunner()
    base = ["eval", str(tmp_path / "model"), str(tmp_path / "data"), "-f", "json", "-q"]
    for option in ("--layout", "--data-format"):
        good = runner.invoke(app, [*base, option, "manifest"])
        assert good.exit_code == 0, good.output
        assert json.loads(good.stdout)["data_format"] == "manifest"
        # the layout is honoured: as sub-folders per label, this folder has no labeled image
        wrong = runner.invoke(app, [*base, option, "folders"])
        assert wrong.exit_code == 2 and "no labelled image found in the folders layout" in wrong.stderr
    bad = runner.invoke(app, [*base, "--data-format", "flat"])
    assert bad.exit_code == 2 and "--layout flat: choose auto, manifest, sidecar, folders or xmp." in bad.stderr
    shown = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"})
    assert "--layout" in shown.stdout and "--data-format" not in shown.stdout


def test_the_cli_lists_the_layouts_the_reader_knows() -> None:
    from sdltag.commands._common import LAYOUTS
    from sdltag.datasets import FORMATS

    assert LAYOUTS == ("auto", *FORMATS)
