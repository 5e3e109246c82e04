"""Extending the official word-vector table from a .vec / GloVe text file of the same space."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zs_sdl_layout as zs
from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.errors import SdltagError
from sdltag.modelfolder import load_model_folder
from sdltag.nn.official import LabelTable, extend_table, label_table, read_word_vectors
from sdltag.safepickle import safe_load

RNG = np.random.default_rng(7)
# Words that are not NUS-WIDE labels (red, car, dog... are: a .vec must agree with the table on those).
NEW = {"spaceship": RNG.normal(size=300), "crimson": RNG.normal(size=300), "scooter": RNG.normal(size=300)}


@pytest.fixture(scope="module")
def table() -> LabelTable:
    zs.require_fixtures()
    return label_table(safe_load(zs.CLASSES), safe_load(zs.WORDVECS), safe_load(zs.UNSEEN))


def _write_vec(path: Path, words: dict[str, np.ndarray], header: bool = True) -> Path:
    lines = [f"{len(words)} 300"] if header else []
    lines += [word + " " + " ".join(f"{v:.6f}" for v in vector) for word, vector in words.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _table_words(table: LabelTable, count: int, scale: float = 3.0) -> dict[str, np.ndarray]:
    """The official vectors of ``count`` table labels, rescaled (a .vec need not be unit length)."""
    names = table.seen + table.unseen
    return {names[i]: table.vectors[i] * scale for i in range(0, len(names), len(names) // count)[:count]}


@pytest.mark.parametrize("header", [True, False])
def test_extend_adds_unseen_labels_from_the_same_space(table: LabelTable, tmp_path: Path, header: bool) -> None:
    vec = _write_vec(tmp_path / "words.vec", {**_table_words(table, 100), **NEW}, header=header)
    labels = [("spaceship", "spaceship"), ("crimson scooter", "crimson scooter"), ("Dog", "Dog")]
    ext = extend_table(table, vec, labels)
    assert ext.added == ["spaceship", "crimson scooter"] and ext.already_known == ["Dog"]  # dog is in the table
    assert ext.shared == 100 and ext.agreeing == 100
    assert ext.table.seen == table.seen and ext.table.unseen == table.unseen + ["spaceship", "crimson scooter"]
    np.testing.assert_array_equal(ext.table.vectors[:1006], table.vectors)
    spaceship = NEW["spaceship"] / np.linalg.norm(NEW["spaceship"])
    np.testing.assert_allclose(ext.table.vectors[1006], spaceship, atol=1e-5)
    mean = (NEW["crimson"] + NEW["scooter"]) / 2
    np.testing.assert_allclose(ext.table.vectors[1007], mean / np.linalg.norm(mean), atol=1e-5)  # multi-word: mean
    assert ext.table.table_id == table.table_id


def test_a_file_of_another_space_is_refused(table: LabelTable, tmp_path: Path) -> None:
    other = {name: RNG.normal(size=300) for name in _table_words(table, 100)}
    vec = _write_vec(tmp_path / "glove.vec", {**other, **NEW})
    with pytest.raises(SdltagError, match=r"glove\.vec: not the space of the official word vectors: 0 of the 100"):
        extend_table(table, vec, [("spaceship", "spaceship")])
    few = _write_vec(tmp_path / "few.vec", {**_table_words(table, 5), **NEW})
    with pytest.raises(SdltagError, match="at least 20"):
        extend_table(table, few, [("spaceship", "spaceship")])


def test_missing_words_and_malformed_files_are_named(table: LabelTable, tmp_path: Path) -> None:
    vec = _write_vec(tmp_path / "words.vec", {**_table_words(table, 50), **NEW})
    with pytest.raises(SdltagError, match=r"no vector for 'truck' \(needed by label 'crimson truck'\)"):
        extend_table(table, vec, [("crimson truck", "crimson truck")])
    bad = tmp_path / "bad.vec"
    bad.write_text("2 300\nspaceship " + " ".join(["0.1"] * 299) + "\n", encoding="utf-8")
    with pytest.raises(SdltagError, match=r"bad\.vec:2: expected a word and 300 numbers"):
        read_word_vectors(bad, {"spaceship"})
    bad.write_text("spaceship " + " ".join(["0.1"] * 299) + " x\n", encoding="utf-8")
    with pytest.raises(SdltagError, match=r"bad\.vec:1: the vector of 'spaceship' has a non-number"):
        read_word_vectors(bad, {"spaceship"})
    bad.write_text("1 50\nspaceship " + " ".join(["0.1"] * 50) + "\n", encoding="utf-8")
    with pytest.raises(SdltagError, match="holds 50-d vectors"):
        read_word_vectors(bad, {"spaceship"})
    with pytest.raises(SdltagError, match="not found"):
        extend_table(table, tmp_path / "nope.vec", [("spaceship", "spaceship")])


def test_import_official_with_added_labels_then_tag(tmp_path: Path) -> None:
    zs.require_fixtures()
    table = label_table(safe_load(zs.CLASSES), safe_load(zs.WORDVECS), safe_load(zs.UNSEEN))
    vec = _write_vec(tmp_path / "words.vec", {**_table_words(table, 200), **NEW})
    labels = tmp_path / "extra.txt"
    labels.write_text("spaceship\ncrimson scooter\nsky\n", encoding="utf-8")
    checkpoint = zs.save_official_checkpoint(tmp_path / "NUS_mtresnet_224.pth")
    out = tmp_path / "model"
    args = ["import-official", str(checkpoint), "--wordvecs", str(zs.WORDVECS), "--classes", str(zs.CLASSES)]
    args += ["--unseen", str(zs.UNSEEN), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--add-labels", str(labels)])
    assert result.exit_code == 2 and "--word-vectors and --add-labels go together" in result.stderr
    result = CliRunner().invoke(app, [*args, "--add-labels", str(labels), "--word-vectors", str(vec)])
    assert result.exit_code == 0, result.output
    assert "added 2 labels" in result.stderr and "already in the table: sky" in result.stderr
    folder = load_model_folder(out)
    assert (
        folder.manifest.unseen_labels[-2:] == ["spaceship", "crimson scooter"]
        and len(folder.manifest.unseen_labels) == 83
    )
    extension = folder.manifest.provenance["extension"]
    assert extension["added_labels"] == 2 and extension["same_space_check"]["agreeing"] == 200
    assert extension["word_vectors"]["file"] == "words.vec"
    photo = tmp_path / "photos" / "grey.png"
    photo.parent.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30), (90, 120, 150)).save(photo)
    tag = ["tag", str(photo), "--model", str(out), "--no-index", "--format", "json", "--no-seen"]
    result = CliRunner().invoke(app, [*tag, "--label", "spaceship"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert [(t["label"], t["kind"]) for t in row["tags"]] == [("spaceship", "unseen")]
