"""XMP sidecars: what photo tools read, merged without duplicates, other data kept, atomic."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdltag.xmp import XmpError, read_keywords, sidecar_path, write_keywords

FOREIGN = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/" xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:darktable="http://darktable.sf.net/" xmp:Rating="4" darktable:xmp_version="5">
   <dc:subject><rdf:Bag><rdf:li>Holiday</rdf:li><rdf:li>Beach</rdf:li></rdf:Bag></dc:subject>
   <lr:hierarchicalSubject><rdf:Bag><rdf:li>Places|Spain|Beach</rdf:li></rdf:Bag></lr:hierarchicalSubject>
   <darktable:history><rdf:Seq><rdf:li darktable:operation="exposure"/></rdf:Seq></darktable:history>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>
"""


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_new_sidecar_has_all_three_forms(tmp_path: Path) -> None:
    path = tmp_path / "IMG_1.jpg.xmp"
    assert write_keywords(path, ["sea", "red car"]) is True
    text = _text(path)
    assert "<rdf:li>sea</rdf:li>" in text and "<rdf:li>sdltag|red car</rdf:li>" in text
    assert "<rdf:li>sdltag/sea</rdf:li>" in text and "digiKam:TagsList" in text
    assert read_keywords(path) == ["sea", "red car"]


def test_merge_keeps_foreign_keywords_and_namespaces(tmp_path: Path) -> None:
    path = tmp_path / "IMG_2.CR2.xmp"
    path.write_text(FOREIGN, encoding="utf-8")
    assert write_keywords(path, ["beach", "Sun"]) is True
    text = _text(path)
    # case-insensitive union: "beach" is already there as "Beach"
    keywords = read_keywords(path)
    assert [k.lower() for k in keywords].count("beach") == 1
    assert {"Holiday", "Beach", "Sun"} <= set(keywords)
    assert "Places|Spain|Beach" in text and "sdltag|beach" in text and "sdltag|Sun" in text
    assert 'xmp:Rating="4"' in text and 'darktable:operation="exposure"' in text
    assert "xmlns:darktable=" in text and "ns0:" not in text


def test_rerun_is_idempotent_and_replaces_only_our_entries(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg.xmp"
    path.write_text(FOREIGN, encoding="utf-8")
    write_keywords(path, ["sun", "dog"])
    before = _text(path)
    assert write_keywords(path, ["dog", "sun"]) is False  # same set: nothing to change
    assert write_keywords(path, ["Sun", "DOG"]) is False
    assert _text(path) == before
    write_keywords(path, ["cat"])
    text = _text(path)
    keywords = read_keywords(path)
    assert "sdltag|sun" not in text and "sdltag|dog" not in text and "sdltag|cat" in text
    assert "sun" not in keywords and "dog" not in keywords and "cat" in keywords
    assert {"Holiday", "Beach"} <= set(keywords) and "Places|Spain|Beach" in text
    assert text.count("sdltag|cat") == 1


def test_corrupt_sidecar_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "b.jpg.xmp"
    path.write_text("<x:xmpmeta <<< broken", encoding="utf-8")
    with pytest.raises(XmpError, match="not valid XML"):
        write_keywords(path, ["x"])
    assert _text(path) == "<x:xmpmeta <<< broken"
    with pytest.raises(XmpError):
        read_keywords(path)


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.jpg.xmp"
    assert write_keywords(path, ["x"], dry_run=True) is True
    assert not path.exists()


def test_sidecar_naming(tmp_path: Path) -> None:
    image = tmp_path / "IMG_1.CR2"
    assert sidecar_path(image).name == "IMG_1.CR2.xmp"
    assert sidecar_path(image, "adobe").name == "IMG_1.xmp"


def test_read_keywords_hierarchical_leaves(tmp_path: Path) -> None:
    path = tmp_path / "d.xmp"
    path.write_text(FOREIGN, encoding="utf-8")
    assert read_keywords(path) == ["Holiday", "Beach"]
