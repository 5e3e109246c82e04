"""`sdltag tag --from-index`: re-scoring indexed photos with new labels from the index alone, with the bundled
model, the real onnxruntime (for the first tagging) and SQLite."""

from __future__ import annotations

import base64
import csv
import io
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdltag.cli import app

PHOTOS = Path(__file__).parent / "data" / "photos"
LABELS = ["red fruit", "monkey", "flying insect", "rodent", "blue sky", "green leaves"]


def _sdltag(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def library(tmp_path: Path) -> tuple[Path, Path]:
    """Four photos in two folders, tagged into a fresh index: (library folder, index file)."""
    root = tmp_path / "library"
    for folder, names in {"a": ["apple.jpg", "baboon.jpg"], "b": ["butterfly.jpg", "squirrel_cls.jpg"]}.items():
        (root / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(PHOTOS / name, root / folder / name)
    index = tmp_path / "index.db"
    result = _sdltag("tag", root, "--index", index, "-f", "jsonl", "-q")
    assert result.exit_code == 0, result.stderr
    return root, index


def _tags(text: str) -> dict[str, list[tuple[str, float, str]]]:
    found: dict[str, list[tuple[str, float, str]]] = {}
    rows = list(csv.DictReader(io.StringIO(text)))
    for row in rows:
        found.setdefault(row["path"], []).append((row["label"], float(row["score"]), row["kind"]))
        assert int(row["rank"]) == len(found[row["path"]])
    return found


def _labels_args() -> list[str]:
    return [arg for label in LABELS for arg in ("--label", label)]


@pytest.mark.parametrize(
    "options",
    [["-k", "3"], ["-k", "4", "--no-seen"], ["-k", "5", "--raw-scores"], ["-k", "10", "--no-seen", "-t", "0.001"]],
)
def test_from_index_gives_the_labels_of_a_normal_retag(library: tuple[Path, Path], options: list[str]) -> None:
    root, index = library
    normal = _sdltag("tag", root, "--index", index, "-f", "csv", *_labels_args(), *options, "-q")
    assert normal.exit_code == 0, normal.stderr
    fast = _sdltag("tag", root, "--index", index, "--from-index", *_labels_args(), *options)
    assert fast.exit_code == 0, fast.stderr
    assert fast.stdout.splitlines()[0] == "path,rank,label,score,kind,path_bytes"  # tag -f csv's columns
    expected, got = _tags(normal.stdout), _tags(fast.stdout)
    assert sorted(got) == sorted(expected) and len(got) == 4
    for path, tags in expected.items():
        assert [(label, kind) for label, _, kind in got[path]] == [(label, kind) for label, _, kind in tags], path
        for (_, score, _), (_, want, _) in zip(got[path], tags, strict=True):
            assert abs(score - want) <= 2e-4 + 5e-5, (path, score, want)  # plus the 4 decimals' rounding
    if "-t" in options:
        assert sum(len(t) for t in got.values()) < len(LABELS) * 4  # the threshold left tags out
    assert "re-scored 4 indexed photos against" in fast.stderr


def test_from_index_only_the_given_folders_and_to_a_file(library: tuple[Path, Path], tmp_path: Path) -> None:
    root, index = library
    out = tmp_path / "retag.csv"
    result = _sdltag("tag", root / "b", "--index", index, "--from-index", *_labels_args(), "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert sorted(_tags(out.read_text())) == [str(root / "b" / "butterfly.jpg"), str(root / "b" / "squirrel_cls.jpg")]
    assert "re-scored 2 indexed photos" in result.stderr and str(out) in result.stderr
    assert list(tmp_path.glob("retag.csv?*")) == [] and list(tmp_path.glob(".retag.csv*")) == []  # no leftovers
    elsewhere = _sdltag("tag", tmp_path / "nothing-here", "--index", index, "--from-index", "-q")
    assert elsewhere.exit_code == 0
    assert elsewhere.stdout == "path,rank,label,score,kind,path_bytes\n"
    assert "holds no photos of this model under" in elsewhere.stderr


def test_from_index_never_opens_the_photos_nor_runs_the_model(
    library: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, index = library
    shutil.rmtree(root / "a")  # gone since they were indexed: the index still holds them

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the image model was started")

    monkeypatch.setattr("sdltag.runtime.ImageModel", no_model)
    result = _sdltag("tag", root, "--index", index, "--from-index", *_labels_args(), "-k", "2")
    assert result.exit_code == 0, result.stderr
    assert len(_tags(result.stdout)) == 4
    assert str(root / "a" / "apple.jpg") in _tags(result.stdout)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--xmp"], "--xmp"),
        (["--txt"], "--txt"),
        (["--dry-run"], "--dry-run"),
        (["-f", "json"], "--format json"),
        (["-o", "tags.jsonl"], "--output tags.jsonl"),
        (["--no-index"], "--no-index"),
        (["--exclude", "*.jpg"], "--exclude"),
        (["--threshold-seen", "0.2"], "--threshold-seen"),
    ],
)
def test_from_index_refuses_what_it_cannot_do(tmp_path: Path, extra: list[str], named: str) -> None:
    index = tmp_path / "index.db"
    result = _sdltag("tag", PHOTOS, "--index", index, "--from-index", *extra)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdltag: error: --from-index cannot be combined with " + named)
    assert result.stdout == "" and not index.exists() and not (PHOTOS / "apple.jpg.xmp").exists()


def test_from_index_without_an_index_says_to_tag_first(tmp_path: Path) -> None:
    result = _sdltag("tag", PHOTOS, "--index", tmp_path / "none.db", "--from-index")
    assert result.exit_code == 2
    assert "no index yet. Run `sdltag tag FOLDER` first" in result.stderr


def test_from_index_keeps_names_that_are_not_utf8_exactly(tmp_path: Path) -> None:
    """A name with bytes that are not UTF-8: the same `path` (U+FFFD) and `path_bytes` (base64) cells as `tag -f csv`;
    the other names' `path_bytes` stay empty."""
    root = tmp_path / "library"
    root.mkdir()
    odd = os.fsdecode(b"caf\xe9 apple.jpg")  # Latin-1 bytes, as an old camera or a Windows copy leaves them
    shutil.copy(PHOTOS / "apple.jpg", root / odd)
    shutil.copy(PHOTOS / "baboon.jpg", root / "baboon.jpg")
    index = tmp_path / "index.db"
    assert _sdltag("tag", root, "--index", index, "-f", "jsonl", "-q").exit_code == 0
    normal = _sdltag("tag", root, "--index", index, "-f", "csv", "-k", "2", *_labels_args(), "-q")
    fast = _sdltag("tag", root, "--index", index, "--from-index", "-k", "2", *_labels_args(), "-q")
    assert normal.exit_code == 0 and fast.exit_code == 0, (normal.stderr, fast.stderr)
    assert fast.stdout.splitlines()[0] == normal.stdout.splitlines()[0]

    def cells(text: str) -> set[tuple[str, str, str]]:
        return {(r["path"], r["label"], r["path_bytes"]) for r in csv.DictReader(io.StringIO(text))}

    got = cells(fast.stdout)
    assert got == cells(normal.stdout)
    raw = {base64.b64decode(b) for _, _, b in got if b}
    assert raw == {os.fsencode(root / odd)}
    assert {b for p, _, b in got if p.endswith("baboon.jpg")} == {""}
