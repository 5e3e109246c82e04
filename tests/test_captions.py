"""`sdltag tag --txt`: IMG.txt caption sidecars, merged so that sdltag never removes words it did not write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdltag.captions import merge_caption, record_path, write_caption
from sdltag.cli import app
from sdltag.datasets import read_labeled_dir


@pytest.mark.parametrize(
    ("text", "recorded", "keywords", "expected", "ours"),
    [
        ("", [], ["cat", "red, car"], "cat, red car", ["cat", "red car"]),  # a comma in a label becomes a space
        ("my words, dog\n", [], ["dog", "Cat"], "my words, dog, Cat\n", ["Cat"]),  # dog was there: not ours
        ("a, cat, b", ["cat"], [], "a, b", []),
        ("cat, a", ["cat"], ["tree"], "a, tree", ["tree"]),
        ("a, cat", ["cat", "gone"], ["CAT"], "a, cat", ["CAT"]),  # kept, any case; a word no longer there forgotten
        ("line one\nline two\n", [], ["cat"], "line one\nline two, cat\n", ["cat"]),  # line breaks kept
        ("a,b,\tcat ,c", ["cat"], [], "a,b,c", []),
        ("a, b", ["a"], ["a"], "a, b", ["a"]),
        ("mine, cat, dog\n", ["cat", "dog"], [], "mine\n", []),  # the final line break stays
        ("a\ncat\nb", ["cat"], [], "a\nb", []),
    ],
)
def test_merge_caption(text: str, recorded: list[str], keywords: list[str], expected: str, ours: list[str]) -> None:
    assert merge_caption(text, recorded, keywords) == (expected, ours)


def _photos(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        out.append(folder / f"p{i}.jpg")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(out[-1])
    return out


def _tag(folder: Path, model, *extra: str, code: int = 0):
    args = ["tag", str(folder), "--model", str(model.path), "--index", str(folder.parent / "i.db"), "--txt", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.stderr
    return result


def _tags(result) -> dict[str, list[str]]:
    return {Path(r["path"]).stem: [t["label"] for t in r["tags"]] for r in map(json.loads, result.stdout.splitlines())}


def test_tag_txt_writes_merges_and_removes_only_its_own(tmp_path: Path, tiny_model) -> None:
    lib = tmp_path / "lib"
    photos = _photos(lib)
    (lib / "p1.txt").write_text("my own words, portrait\n", encoding="utf-8")
    first = _tag(lib, tiny_model, "-k", "3")
    tags = _tags(first)
    assert "3 captions updated" in first.stderr
    assert (lib / "p0.txt").read_text(encoding="utf-8") == ", ".join(tags["p0"])  # the WD14/kohya form
    assert (lib / "p1.txt").read_text(encoding="utf-8") == f"my own words, portrait, {', '.join(tags['p1'])}\n"
    assert json.loads(record_path(lib / "p0.txt").read_text(encoding="utf-8"))["added"] == tags["p0"]
    assert record_path(lib / "p0.txt").name == ".p0.txt.sdltag"
    # the user adds a word that sdltag also proposes later: it is theirs, never removed
    (lib / "p2.txt").write_text(f"{tags['p2'][0]}, sunset, {tags['p2'][1]}", encoding="utf-8")
    record = json.loads(record_path(lib / "p2.txt").read_text(encoding="utf-8"))
    record_path(lib / "p2.txt").write_text(json.dumps({**record, "added": [tags["p2"][1]]}), encoding="utf-8")
    before = {p: (lib / f"{p}.txt").stat().st_mtime_ns for p in ("p0", "p1")}
    again = _tag(lib, tiny_model, "-k", "3")
    assert "1 caption updated" in again.stderr  # p2 only (its third tag); the others are not rewritten
    assert (lib / "p2.txt").read_text(encoding="utf-8") == f"{tags['p2'][0]}, sunset, {', '.join(tags['p2'][1:])}"
    assert {p: (lib / f"{p}.txt").stat().st_mtime_ns for p in ("p0", "p1")} == before
    fewer = _tag(lib, tiny_model, "-k", "1")
    one = _tags(fewer)
    assert (lib / "p0.txt").read_text(encoding="utf-8") == one["p0"][0]
    assert (lib / "p1.txt").read_text(encoding="utf-8") == f"my own words, portrait, {one['p1'][0]}\n"
    # p2: its first word was the user's (kept), the recorded second one went, sunset stays
    assert (lib / "p2.txt").read_text(encoding="utf-8") == f"{tags['p2'][0]}, sunset"
    # a lost record: sdltag's words stay for good
    record_path(lib / "p0.txt").unlink()
    _tag(lib, tiny_model, "-k", "2")
    assert (lib / "p0.txt").read_text(encoding="utf-8").split(", ")[0] == one["p0"][0]
    # `sdltag train` reads the captions back (sidecar layout)
    dataset = read_labeled_dir(lib, "sidecar")
    assert {item.path for item in dataset.items} == set(photos)


def test_txt_naming_dry_run_and_bad_captions(tmp_path: Path, tiny_model) -> None:
    lib = tmp_path / "lib"
    _photos(lib)
    (lib / "p0.jpg.txt").write_text("kept", encoding="utf-8")  # the other naming: used when it exists
    os.mkfifo(lib / "p1.txt")  # would block a reader: refused, never opened
    (lib / "p2.txt").write_bytes(b"caf\xe9")  # not UTF-8: refused, untouched
    dry = _tag(lib, tiny_model, "--dry-run", code=1)
    assert "would update" in dry.stderr and (lib / "p0.jpg.txt").read_text(encoding="utf-8") == "kept"
    assert not (lib / "p0.txt").exists() and not record_path(lib / "p0.jpg.txt").exists()
    result = _tag(lib, tiny_model, "-k", "2", code=1)
    assert f"{lib / 'p1.txt'}: the caption file is not a regular file" in result.stderr
    assert f"{lib / 'p2.txt'}: the caption file is not UTF-8 (byte 0xe9)" in result.stderr
    assert (lib / "p2.txt").read_bytes() == b"caf\xe9"
    assert (lib / "p0.jpg.txt").read_text(encoding="utf-8").startswith("kept, ") and not (lib / "p0.txt").exists()
    assert "1 caption updated" in result.stderr


def test_shared_caption_and_symlink(tmp_path: Path, tiny_model) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(lib / "a.jpg")
    Image.new("RGB", (16, 16), (10, 200, 10)).save(lib / "a.png")
    result = _tag(lib, tiny_model, "-k", "1")
    assert "would share the caption file a.txt; writing it for a.jpg only" in result.stderr
    target = tmp_path / "elsewhere.txt"
    target.write_text("linked", encoding="utf-8")
    (lib / "a.txt").unlink()
    (lib / "a.txt").symlink_to(target)
    _tag(lib, tiny_model, "-k", "1")
    assert (lib / "a.txt").is_symlink() and target.read_text(encoding="utf-8").startswith("linked, ")


def test_write_caption_keeps_a_record_it_did_not_write(tmp_path: Path) -> None:
    caption = tmp_path / "x.txt"
    caption.write_text("a", encoding="utf-8")
    record_path(caption).write_text("not json", encoding="utf-8")  # unreadable record: nothing is ours
    assert write_caption(caption, []) is False and caption.read_text(encoding="utf-8") == "a"
    assert record_path(caption).read_text(encoding="utf-8") == "not json"
