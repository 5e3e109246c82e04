"""Which tags go into sidecars: the cut-off and count policy, through the library and the real command."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.sidecars import DEFAULT_MAX, DEFAULT_THRESHOLD, sidecar_policy
from sdltag.xmp import read_keywords

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class T:
    label: str
    score: float


TAGS = [T("a", 0.9), T("b", 0.05), T("c", 0.4), T("d", 0.2), T("e", 0.6), T("f", 0.01), T("g", 0.3)]


def test_the_models_advice_wins_over_the_defaults() -> None:
    policy = sidecar_policy({"threshold": 0.25, "max_keywords": 2}, calibrated=True, raw_scores=False)
    assert policy.keywords(TAGS) == ["a", "e"]
    assert sidecar_policy({"threshold": 0.25, "max_keywords": 9}, calibrated=True, raw_scores=False).keywords(TAGS) == [
        "a",
        "e",
        "c",
        "g",
    ]


def test_calibrated_models_without_advice_get_the_default_cut_off() -> None:
    policy = sidecar_policy(None, calibrated=True, raw_scores=False)
    assert (policy.threshold, policy.max_keywords) == (DEFAULT_THRESHOLD, DEFAULT_MAX)
    assert policy.keywords(TAGS) == ["a", "e"]


def test_uncalibrated_models_and_raw_scores_get_only_the_count() -> None:
    for policy in (
        sidecar_policy(None, calibrated=False, raw_scores=False),
        sidecar_policy({"threshold": 0.25, "max_keywords": 5}, calibrated=True, raw_scores=True),
    ):
        assert policy.threshold is None
        assert policy.keywords(TAGS) == ["a", "e", "c", "g", "d"]
    assert "--raw-scores" in sidecar_policy(None, calibrated=True, raw_scores=True).describe()


def test_options_win_over_everything() -> None:
    policy = sidecar_policy(
        {"threshold": 0.25, "max_keywords": 2}, calibrated=True, raw_scores=True, threshold=0.02, max_keywords=4
    )
    assert policy.keywords(TAGS) == ["a", "e", "c", "g"]
    assert sidecar_policy(None, calibrated=False, raw_scores=False, threshold=0.5).keywords(TAGS) == ["a", "e"]


def _photos(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        path = folder / f"p{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        out.append(path)
    return out


def _run(args: list[str]):
    result = CliRunner().invoke(app, ["tag", *args, "--format", "jsonl", "--no-index"])
    return result


def test_tag_xmp_writes_only_what_the_policy_keeps(tiny_model, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos")
    # No calibration: every tag of the top 6 is printed, the sidecar gets the default count.
    result = _run([str(tmp_path / "photos"), "--model", str(tiny_model.path), "-k", "6", "--xmp"])
    assert result.exit_code == 0, result.output
    printed = {Path(r["path"]).name: r["tags"] for r in map(json.loads, result.stdout.splitlines())}
    for photo in photos:
        assert len(printed[photo.name]) == 6
        written = read_keywords(photo.with_name(photo.name + ".xmp"))
        flat = [k for k in written if "|" not in k]
        assert flat == [t["label"] for t in printed[photo.name]][:DEFAULT_MAX]
    assert "sidecars get at most 5 keywords at any score" in result.stderr


def test_the_models_advice_and_the_options_reach_the_sidecars(tiny_model, tmp_path: Path) -> None:
    model = tmp_path / "advised"
    shutil.copytree(tiny_model.path, model)
    manifest = json.loads((model / "manifest.json").read_text())
    # A calibration that maps raw scores onto (0, 1) and the advice to keep 2 keywords above 0.5.
    manifest["calibration"] = {"method": "platt", "seen": {"a": 40.0, "b": 0.0}}
    manifest["sidecar"] = {"threshold": 0.5, "max_keywords": 2}
    (model / "manifest.json").write_text(json.dumps(manifest))
    photos = _photos(tmp_path / "photos")
    result = _run([str(tmp_path / "photos"), "--model", str(model), "-k", "6", "--xmp"])
    assert result.exit_code == 0, result.output
    assert "the model's advice" in result.stderr
    printed = {Path(r["path"]).name: r["tags"] for r in map(json.loads, result.stdout.splitlines())}
    some_dropped = False
    for photo in photos:
        expected = [t["label"] for t in printed[photo.name] if t["score"] >= 0.5][:2]
        some_dropped |= len(expected) < len(printed[photo.name])
        flat = [k for k in read_keywords(photo.with_name(photo.name + ".xmp")) if "|" not in k] if expected else []
        assert flat == expected
    assert some_dropped
    # --sidecar-max and --sidecar-threshold override the advice.
    shutil.rmtree(tmp_path / "photos")
    photos = _photos(tmp_path / "photos")
    result = _run(
        [str(tmp_path / "photos"), "--model", str(model), "-k", "6", "--xmp"]
        + ["--sidecar-threshold", "0", "--sidecar-max", "4"]
    )
    assert result.exit_code == 0, result.output
    for photo in photos:
        assert len([k for k in read_keywords(photo.with_name(photo.name + ".xmp")) if "|" not in k]) == 4


def test_a_bad_sidecar_advice_in_a_manifest_is_named(tiny_model, tmp_path: Path) -> None:
    from sdltag.errors import SdltagError
    from sdltag.modelfolder import load_model_folder

    model = tmp_path / "bad"
    shutil.copytree(tiny_model.path, model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["sidecar"] = {"threshold": 3, "max_keywords": 2}
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SdltagError, match="sidecar.threshold"):
        load_model_folder(model)


def test_the_bundled_photo_model_writes_few_confident_keywords(tmp_path: Path, monkeypatch) -> None:
    """The default model (real onnxruntime) on a demo photo: at most its advised count, each above its cut-off."""
    monkeypatch.delenv("SDLTAG_MODEL", raising=False)
    photo = tmp_path / "anemone.jpg"
    shutil.copy(ROOT / "examples" / "photos" / "tuxpaint-anemone-red.jpg", photo)
    result = _run([str(photo), "-k", "10", "--xmp"])
    assert result.exit_code == 0, result.output
    (record,) = map(json.loads, result.stdout.splitlines())
    advice = json.loads((ROOT / "models" / "photo-lite0" / "manifest.json").read_text())["sidecar"]
    flat = [k for k in read_keywords(tmp_path / "anemone.jpg.xmp") if "|" not in k]
    assert 1 <= len(flat) <= advice["max_keywords"] < len(record["tags"])
    scores = {t["label"]: t["score"] for t in record["tags"]}
    assert all(scores[k] >= advice["threshold"] for k in flat)
    assert "flower" in flat


# -- naming: one place for the tagging side (writes) and the training side (reads) ---------------------------


def test_sidecar_names_are_defined_once_for_writing_and_reading() -> None:
    from sdltag import captions, sidecars, xmp

    image = Path("/photos/IMG_1.CR2")
    assert xmp.sidecar_path is sidecars.sidecar_path and captions.caption_path is sidecars.caption_path
    assert sidecars.sidecar_path(image).name == "IMG_1.CR2.xmp"
    assert sidecars.sidecar_path(image, "adobe").name == "IMG_1.xmp"
    assert [p.name for p in sidecars.xmp_candidates(image)] == ["IMG_1.CR2.xmp", "IMG_1.xmp", "IMG_1.XMP"]
    assert [p.name for p in sidecars.caption_candidates(image)] == ["IMG_1.CR2.txt", "IMG_1.txt"]
    with pytest.raises(Exception, match="--xmp-naming 'darktable'"):
        sidecars.sidecar_path(image, "darktable")


@pytest.mark.parametrize("naming", ["ext", "adobe"])
def test_training_reads_the_sidecars_tagging_writes(tmp_path: Path, naming: str) -> None:
    """An XMP sidecar and a caption file written under tagging's names are the ones training reads."""
    from sdltag.captions import caption_path
    from sdltag.datasets import read_labeled_dir
    from sdltag.sidecars import sidecar_path
    from sdltag.xmp import write_keywords

    for name, word in (("a.jpg", "beach"), ("b.jpg", "forest")):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
        write_keywords(sidecar_path(tmp_path / name, naming), [word])
    dataset = read_labeled_dir(tmp_path, "xmp", machine_keywords=True)  # sdltag's own keywords count here
    assert {item.path.name: item.labels for item in dataset.items} == {"a.jpg": ("beach",), "b.jpg": ("forest",)}
    for name, word in (("a.jpg", "sand"), ("b.jpg", "tree")):
        caption_path(tmp_path / name).write_text(word, encoding="utf-8")
    dataset = read_labeled_dir(tmp_path, "sidecar")
    assert {item.path.name: item.labels for item in dataset.items} == {"a.jpg": ("sand",), "b.jpg": ("tree",)}
