"""`sdltag eval --report`: the HTML report's numbers (by hand), its structure (html5lib, strict), escaping.

The model is test_eval's mean-colour model (its principal vector is the image's mean
colour and the labels are the RGB axes), run through the real ONNX export and onnxruntime,
here with hostile label and file names.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import html5lib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.evaluation import evaluate
from sdltag.modelfolder import EmbedderSpec, InputSpec, Manifest, load_model_folder, write_model_folder
from sdltag.report import STYLE, per_label_ap, pr_curve, reliability, render_report, worst_ranked
from tests.test_eval import MeanColour

pytest.importorskip("matplotlib")

NS = "{http://www.w3.org/1999/xhtml}"
HOSTILE = "<img src=x onerror=alert(1)>"
MATH = "$\\frac{1"  # TeX that matplotlib would fail to parse as math
RED, GREEN, BLUE = HOSTILE, MATH + " green", "blue & co"
CALIBRATION = {"method": "platt", "seen": {"a": 10.0, "b": -5.0}, "unseen": {"a": 8.0, "b": -4.0}}


def hostile_model(path: Path, calibration: dict | None = CALIBRATION) -> Path:
    from sdltag.nn.export import export_onnx

    spec = InputSpec(8, 8)
    onnx_path = path.parent / f"{path.name}.onnx"
    export_onnx(MeanColour(), spec, onnx_path)
    manifest = Manifest(
        name="colour",
        backbone="mean-colour",
        backbone_config={},
        input=spec,
        rows=1,
        dim=3,
        embedder=EmbedderSpec("sentence-transformers", "axes", "axes@sha256:0", 3),
        seen_labels=[RED, GREEN],
        unseen_labels=[BLUE],
        calibration=calibration,
    )
    write_model_folder(path, onnx_path, manifest, np.eye(3, dtype=np.float32))
    return path


IMAGES = {  # file: (colour, labels)
    HOSTILE + ".png": ((255, 0, 0), [RED]),
    "green.png": ((0, 255, 0), [GREEN]),
    "blue.png": ((0, 0, 255), [BLUE]),
    "olive.png": ((128, 128, 0), [RED, BLUE]),  # blue ranks last here: the worst-ranked image
    "magenta.png": ((255, 0, 255), [RED]),
}


def hostile_data(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = ['{"path": "broken.png", "labels": ["x"]}']
    import json

    for name, (colour, labels) in IMAGES.items():
        Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(root / name)
        lines.append(json.dumps({"path": name, "labels": labels}))
    (root / "broken.png").write_bytes(b"not an image")
    (root / "labels.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    model = load_model_folder(hostile_model(root / "model"))
    return evaluate(model, hostile_data(root / "data"), device="cpu")


def parse(page: str):
    return html5lib.HTMLParser(strict=True, namespaceHTMLElements=True).parse(page)


def test_pr_curve_by_hand() -> None:
    # Pairs by score: 0.9 (hit), 0.8, 0.7 (hit), 0.1: recall 1/2, 1/2, 1, 1; precision 1, 1/2, 2/3, 1/2.
    recall, precision = pr_curve(np.array([[0.9, 0.1], [0.8, 0.7]]), np.array([[1, 0], [0, 1]]))
    np.testing.assert_allclose(recall, [0.5, 0.5, 1, 1])
    np.testing.assert_allclose(precision, [1, 0.5, 2 / 3, 0.5])
    # Tied scores are one threshold: never an order-dependent point between them.
    recall, precision = pr_curve(np.array([[0.5, 0.5]]), np.array([[0, 1]]))
    np.testing.assert_allclose(recall, [1])
    np.testing.assert_allclose(precision, [0.5])


def test_pr_curve_of_many_pairs_is_thinned_for_the_chart() -> None:
    rng = np.random.default_rng(0)
    scores, targets = rng.random((2000, 100)), rng.random((2000, 100)) < 0.05  # 200,000 distinct scores
    recall, precision = pr_curve(scores, targets, max_points=500)
    full_recall, full_precision = pr_curve(scores, targets, max_points=10**9)
    assert len(full_recall) == 200_000 and len(recall) == 500
    assert recall[0] == full_recall[0] and recall[-1] == full_recall[-1] == 1.0
    assert np.isin(precision, full_precision).all()


def test_reliability_bins_by_hand() -> None:
    conf, rate, count = reliability(np.array([0.05, 0.06, 0.95, 1.0]), np.array([0, 1, 1, 1]), bins=10)
    np.testing.assert_allclose(conf, [0.055, 0.975])
    np.testing.assert_allclose(rate, [0.5, 1.0])
    assert count.tolist() == [2, 2]


def test_numbers_match_the_evaluation(evaluated) -> None:
    rows = {name: (unseen, ap, positives) for name, unseen, ap, positives in per_label_ap(evaluated)}
    # red: scores 1 (hostile), 0 (green), 0 (blue), .5 (olive), 1 (magenta) vs positives 1,0,0,1,1: AP 1.
    # blue: 0, 0, 1, 0, 1 vs 0, 0, 1, 1, 0: blue.png and magenta tie at 1 (1/2 each), olive at 0 ties with
    # hostile and green (3/5): AP (1/2 + 2/5) / 2.
    assert rows == {RED: (False, 100.0, 3), GREEN: (False, 100.0, 1), BLUE: (True, pytest.approx(45.0), 2)}
    assert np.mean([ap for _, ap, _ in rows.values()]) == pytest.approx(evaluated.results["gzsl"].map)
    worst = worst_ranked(evaluated)
    assert worst[0]["path"].name == "olive.png" and worst[0]["truth"] == [(RED, 1, False), (BLUE, 3, True)]
    assert [name for name, *_ in worst[0]["top"]] == [RED, GREEN, BLUE]


def test_report_page_is_valid_complete_and_inert(evaluated) -> None:
    page = render_report(evaluated)
    tree = parse(page)
    assert not list(tree.iter(NS + "script"))
    for element in tree.iter():
        assert not any(name.lower().startswith("on") for name in element.attrib), element.attrib
    assert "<img src=x" not in page
    assert tree.find(f".//{NS}style").text == STYLE
    text = "".join(tree.find(f".//{NS}body").itertext())

    # The paper's table: every protocol, the same figures as `sdltag eval`.
    cells = [[td.text for td in tr.iter(NS + "td")] for tr in tree.find(f".//{NS}table").iter(NS + "tr")][1:]
    for row in cells:
        metrics = evaluated.results[row[0].lower()]
        assert row[1:4] == [str(metrics.images), str(metrics.labels), f"{metrics.map:.2f}"]
        assert row[4] == f"{metrics.precision[3]:.2f}"
    assert [row[0] for row in cells] == ["ZSL", "GZSL", "SEEN"]

    # Best and worst named; every label in the table, as text.
    assert "worst: blue & co (zero-shot, AP 45.0)" in text
    labels = [tr.find(f"{NS}td").text for tr in tree.findall(f".//{NS}details//{NS}tbody/{NS}tr")]
    assert sorted(labels) == sorted([RED, GREEN, BLUE])

    # Charts: per-label AP, PR curves, reliability (the model is calibrated); SVG images from data: URIs.
    charts = [img for img in tree.iter(NS + "img") if img.get("class") == "chart"]
    assert [img.get("alt") for img in charts] == [
        "per-label AP, sorted",
        "precision-recall curves",
        "reliability diagram",
    ]
    for img in charts:
        prefix, payload = img.get("src").split(",", 1)
        assert prefix == "data:image/svg+xml;base64"
        assert b"<svg" in base64.b64decode(payload)

    # Worst-ranked images: each with its (escaped) name, link, ground truth and top tags.
    figures = list(tree.iter(NS + "figure"))
    assert len(figures) == 5
    names = [f.find(f"{NS}div").text for f in figures]
    assert names[0].endswith("/olive.png") and any(n.endswith("/" + HOSTILE + ".png") for n in names)
    hostile = next(f for f in figures if f.find(f"{NS}div").text.endswith(HOSTILE + ".png"))
    assert hostile.find(f"{NS}a").get("href").endswith("/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.png")
    assert hostile.find(f".//{NS}img").get("src").startswith("data:image/jpeg;base64,")
    assert "top 5 tags (calibrated):" in "".join(figures[0].itertext())


def test_no_reliability_diagram_without_calibration(tmp_path: Path) -> None:
    model = load_model_folder(hostile_model(tmp_path / "model", calibration=None))
    report = evaluate(model, hostile_data(tmp_path / "data"), device="cpu")
    tree = parse(render_report(report, thumbnails=False))
    headings = [h.text for h in tree.iter(NS + "h2")]
    assert "Calibration" not in headings and "Precision and recall" in headings
    assert "(raw scores)" in "".join(tree.find(f".//{NS}body").itertext())


def test_cli_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = hostile_model(tmp_path / "model"), hostile_data(tmp_path / "data")
    out = tmp_path / "out" / "report.html"
    result = CliRunner().invoke(app, ["eval", str(model), str(data), "--report", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "GZSL" in result.stdout  # the table is still printed
    parse(out.read_text(encoding="utf-8"))
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temporary file left

    # Without matplotlib: one line naming the install, before any evaluation.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out.unlink()
    result = CliRunner().invoke(app, ["eval", str(model), str(data), "--report", str(out), "-q"])
    assert result.exit_code == 2
    assert "pip install 'sdltag[report]'" in result.output and "GZSL" not in result.output
    assert not out.exists()
