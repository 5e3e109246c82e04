"""Labeled directories: every layout, auto-detection, normalisation and what gets skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdltag import log
from sdltag.datasets import detect_format, read_labeled_dir
from sdltag.errors import SdltagError

LIGHTROOM_XMP = """<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/">
   <dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def _image(path: Path, colour: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(path)
    return path


def _labels(dataset) -> dict[str, tuple[str, ...]]:
    return {item.path.relative_to(dataset.root).as_posix(): item.labels for item in dataset.items}


def test_manifest_csv(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    _image(tmp_path / "sub" / "b.png")
    _image(tmp_path / "c.png")
    (tmp_path / "labels.csv").write_text(
        "path,labels\na.png,  red  panda ;Dog;dog\nsub/b.png,cat\nc.png,\nmissing.png,cat\nsub/b.png,sofa\n",
        encoding="utf-8",
    )
    with log.collect() as warnings:
        dataset = read_labeled_dir(tmp_path)
    assert dataset.format == "manifest"
    # Whitespace collapsed as in labels files; case-insensitive duplicates collapsed (first spelling kept).
    assert _labels(dataset) == {"a.png": ("red panda", "Dog"), "sub/b.png": ("cat", "sofa")}
    assert any("missing.png" in w and "not found" in w for w in warnings)
    assert any("c.png" in w and "no label" in w for w in warnings)
    assert {reason for _, reason in dataset.skipped} == {"not found", "no label"}
    assert dataset.labels == ["Dog", "cat", "red panda", "sofa"]


def test_manifest_csv_needs_its_header(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("file,tags\na.png,cat\n", encoding="utf-8")
    with pytest.raises(SdltagError, match="path,labels"):
        read_labeled_dir(tmp_path)


def test_manifest_jsonl_with_a_bad_line(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    lines = [
        json.dumps({"path": "a.png", "labels": ["cat", "sofa"]}),
        "{not json",
        json.dumps({"path": "b.png", "labels": "dog;ball"}),
        json.dumps({"labels": ["x"]}),
    ]
    (tmp_path / "labels.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with log.collect() as warnings:
        dataset = read_labeled_dir(tmp_path)
    assert _labels(dataset) == {"a.png": ("cat", "sofa"), "b.png": ("dog", "ball")}
    assert any(":2:" in w and "JSON" in w for w in warnings)
    assert any(":4:" in w for w in warnings)


def test_sidecar_text_both_namings(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.png")
    _image(tmp_path / "nested" / "c.png")
    _image(tmp_path / "unlabelled.png")
    (tmp_path / "a.jpg.txt").write_text("beach, sunset\nsea\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("dog", encoding="utf-8")
    (tmp_path / "nested" / "c.png.txt").write_text("\n\n cat ,, \n", encoding="utf-8")
    with log.collect() as warnings:
        dataset = read_labeled_dir(tmp_path)
    assert dataset.format == "sidecar"
    assert _labels(dataset) == {"a.jpg": ("beach", "sunset", "sea"), "b.png": ("dog",), "nested/c.png": ("cat",)}
    assert warnings == [f"{tmp_path / 'unlabelled.png'}: no label, skipped"]


def test_one_folder_per_label(tmp_path: Path) -> None:
    _image(tmp_path / "dog" / "1.png")
    _image(tmp_path / "dog" / "deeper" / "2.png")
    _image(tmp_path / "hot  air balloon" / "3.png")
    _image(tmp_path / "loose.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with log.collect() as warnings:
        dataset = read_labeled_dir(tmp_path, format="folders")
    assert _labels(dataset) == {
        "dog/1.png": ("dog",),
        "dog/deeper/2.png": ("dog",),
        "hot  air balloon/3.png": ("hot air balloon",),
    }
    assert any("loose.png" in w for w in warnings)


def test_folders_are_detected_when_nothing_else_matches(tmp_path: Path) -> None:
    _image(tmp_path / "cat" / "1.png")
    assert detect_format(tmp_path) == "folders"


def test_xmp_sidecars_both_namings(tmp_path: Path) -> None:
    from sdltag.xmp import write_keywords

    _image(tmp_path / "IMG_1.jpg")
    _image(tmp_path / "IMG_2.png")
    _image(tmp_path / "IMG_3.png")
    _image(tmp_path / "IMG_4.png")
    items = "".join(f"<rdf:li>{k}</rdf:li>" for k in ("Mountain", "snow", " lake "))
    (tmp_path / "IMG_1.xmp").write_text(LIGHTROOM_XMP.format(items=items), encoding="utf-8")  # Lightroom naming
    write_keywords(tmp_path / "IMG_2.png.xmp", ["forest", "fog"])  # darktable naming, written by sdltag
    (tmp_path / "IMG_3.xmp").write_text("<x:xmpmeta", encoding="utf-8")  # broken
    with log.collect() as warnings:
        dataset = read_labeled_dir(tmp_path)
    assert dataset.format == "xmp"
    assert _labels(dataset) == {"IMG_1.jpg": ("Mountain", "snow", "lake")}  # sdltag's own keywords are no labels
    assert any("IMG_3" in w for w in warnings)
    assert any("IMG_4.png" in w and "no label" in w for w in warnings)
    assert any("IMG_2.png" in w and "no label" in w for w in warnings)
    with_ours = read_labeled_dir(tmp_path, machine_keywords=True)
    assert _labels(with_ours) == {"IMG_1.jpg": ("Mountain", "snow", "lake"), "IMG_2.png": ("forest", "fog")}


def test_format_can_be_forced(tmp_path: Path) -> None:
    _image(tmp_path / "cat" / "1.png")
    (tmp_path / "cat" / "1.png.txt").write_text("tabby")
    assert read_labeled_dir(tmp_path).format == "sidecar"
    assert _labels(read_labeled_dir(tmp_path, format="folders")) == {"cat/1.png": ("cat",)}
    with pytest.raises(SdltagError, match="--layout"):
        read_labeled_dir(tmp_path, format="exif")


def test_refusals_name_the_folder_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(SdltagError, match="not a folder"):
        read_labeled_dir(tmp_path / "nope")
    _image(tmp_path / "a.png")
    with pytest.raises(SdltagError, match="cannot tell"):
        read_labeled_dir(tmp_path)
    (tmp_path / "labels.csv").write_text("path,labels\na.png,\nb.png,cat\n", encoding="utf-8")
    with pytest.raises(SdltagError, match="no labelled image"):
        read_labeled_dir(tmp_path)


def _remove_deep_tree(top: Path) -> None:
    """Remove a tree deeper than ``shutil.rmtree`` (recursive before Python 3.12) can."""
    stack, order = [os.fspath(top)], []
    while stack:
        current = stack.pop()
        order.append(current)
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    os.unlink(entry.path)
    for folder in reversed(order):
        os.rmdir(folder)


def test_label_folders_of_any_depth(tmp_path: Path) -> None:
    _image(tmp_path / "cat" / "1.png")
    bottom = os.fspath(tmp_path / "dog")
    os.mkdir(bottom)
    for _ in range(1100):  # deeper than Python's recursion limit
        bottom += "/d"
        os.mkdir(bottom)
    try:
        _image(Path(bottom) / "2.png")
        dataset = read_labeled_dir(tmp_path)
        assert dataset.format == "folders"
        assert sorted(item.labels[0] for item in dataset.items) == ["cat", "dog"]
    finally:
        _remove_deep_tree(tmp_path / "dog")


def test_links_and_appledouble_files_in_a_labelled_folder(tmp_path: Path) -> None:
    _image(tmp_path / "cat" / "1.png")
    (tmp_path / "cat" / "1.png.txt").write_text("tabby")
    (tmp_path / "cat" / "._1.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)  # macOS resource fork
    (tmp_path / "cat" / "._1.png.txt").write_text("junk")
    os.symlink(tmp_path, tmp_path / "cat" / "up")  # a link to an ancestor
    os.symlink("loop-b", tmp_path / "cat" / "loop-a")  # a link loop
    os.symlink("loop-a", tmp_path / "cat" / "loop-b")
    with log.collect() as warnings:
        dataset = read_labeled_dir(tmp_path)
    assert _labels(dataset) == {"cat/1.png": ("tabby",)} and warnings == []


def test_a_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    odd = os.fsencode(tmp_path) + b"/\xff.png"
    _image(tmp_path / "src.png").rename(os.fsdecode(odd))
    with open(odd + b".txt", "wb") as handle:
        handle.write(b"beach\n")
    dataset = read_labeled_dir(tmp_path)
    assert [(os.fsencode(item.path), item.labels) for item in dataset.items] == [(odd, ("beach",))]


DARKTABLE_XMP = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:darktable="http://darktable.sf.net/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
   darktable:xmp_version="5">
   <dc:subject><rdf:Seq>{subject}</rdf:Seq></dc:subject>
   <lr:hierarchicalSubject><rdf:Seq>{hierarchical}</rdf:Seq></lr:hierarchicalSubject>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def _items(values: list[str]) -> str:
    return "".join(f"<rdf:li>{value}</rdf:li>" for value in values)


def test_xmp_keywords_programs_wrote_are_not_labels(tmp_path: Path) -> None:
    from sdltag.xmp import write_keywords

    # darktable: the person's tags, plus its automatic darktable|... hierarchy
    _image(tmp_path / "IMG_1.CR2.jpg")
    (tmp_path / "IMG_1.CR2.jpg.xmp").write_text(
        DARKTABLE_XMP.format(
            subject=_items(["places", "Paris"]),
            hierarchical=_items(["places|Paris", "darktable|format|jpg", "darktable|changed", "Darktable|exported"]),
        ),
        encoding="utf-8",
    )
    # a sidecar sdltag tagged: the person's "Food" and "breakfast" were there first; sdltag added "espresso"
    # and also proposed "Food" (then it stays the person's)
    _image(tmp_path / "IMG_2.jpg")
    (tmp_path / "IMG_2.xmp").write_text(LIGHTROOM_XMP.format(items=_items(["Food", "breakfast"])), encoding="utf-8")
    write_keywords(tmp_path / "IMG_2.xmp", ["Food", "espresso"])
    # digiKam's internal bookkeeping, and a person's own "Color Label" hierarchy
    _image(tmp_path / "IMG_3.jpg")
    (tmp_path / "IMG_3.jpg.xmp").write_text(
        DARKTABLE_XMP.format(
            subject=_items(["dog"]),
            hierarchical=_items(["_Digikam_Internal_Tags_|Scanned for Faces", "Color Label|Red", "animals|dog"]),
        ),
        encoding="utf-8",
    )
    # only machine keywords: no label left
    _image(tmp_path / "IMG_4.jpg")
    (tmp_path / "IMG_4.jpg.xmp").write_text(
        DARKTABLE_XMP.format(subject="", hierarchical=_items(["darktable|format|jpg"])), encoding="utf-8"
    )
    with log.collect() as warnings:
        dataset = read_labeled_dir(tmp_path)
    assert dataset.format == "xmp"
    assert _labels(dataset) == {
        "IMG_1.CR2.jpg": ("places", "Paris"),
        "IMG_2.jpg": ("Food", "breakfast"),
        "IMG_3.jpg": ("dog", "Red"),
    }
    assert any("IMG_4.jpg" in w and "no label" in w for w in warnings)
    everything = read_labeled_dir(tmp_path, machine_keywords=True)
    assert _labels(everything) == {
        "IMG_1.CR2.jpg": ("places", "Paris", "jpg", "changed", "exported"),
        "IMG_2.jpg": ("Food", "breakfast", "espresso"),
        "IMG_3.jpg": ("dog", "Scanned for Faces", "Red"),
        "IMG_4.jpg": ("jpg",),
    }


def test_labels_that_are_not_utf8_are_reported_per_file(tmp_path: Path) -> None:
    _image(tmp_path / "cat" / "1.png")
    _image(tmp_path / "dog" / "2.png")
    odd = os.fsencode(tmp_path) + b"/gr\xfcn"
    os.mkdir(odd)
    for name in (b"/3.png", b"/4.png"):
        _image(tmp_path / "cat" / "1.png").rename(os.fsdecode(odd + name))
        _image(tmp_path / "cat" / "1.png")
    with log.collect() as warnings:
        dataset = read_labeled_dir(tmp_path, format="folders")
    assert sorted(item.labels[0] for item in dataset.items) == ["cat", "dog"]
    assert len(warnings) == 2 and all("not valid UTF-8" in w and "skipped" in w for w in warnings)
    assert {reason for _, reason in dataset.skipped} == {"label not UTF-8"}
