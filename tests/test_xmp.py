"""XMP sidecars: what photo tools read, merged without duplicates, other data kept, atomic."""

from __future__ import annotations

import os
import stat
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


# --- re-runs remove only what sdltag added ------------------------------------------------

EXIFTOOL_KEYWORDS = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="Image::ExifTool 12.76">
<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
 <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">
  <dc:subject>
   <rdf:Bag>
    <rdf:li>Food</rdf:li>
    <rdf:li>breakfast</rdf:li>
    <rdf:li>Holiday</rdf:li>
   </rdf:Bag>
  </dc:subject>
 </rdf:Description>
</rdf:RDF>
</x:xmpmeta>
"""


def test_rerun_keeps_the_users_own_flat_keywords(tmp_path: Path) -> None:
    """The user's `Food, breakfast` survive a run that proposed them and a later one that does not."""
    path = tmp_path / "IMG_3.jpg.xmp"
    path.write_text(EXIFTOOL_KEYWORDS, encoding="utf-8")
    write_keywords(path, ["food", "breakfast", "coffee"])
    assert read_keywords(path) == ["Food", "breakfast", "Holiday", "coffee"]
    write_keywords(path, ["Holiday", "espresso"])
    assert read_keywords(path) == ["Food", "breakfast", "Holiday", "espresso"]  # coffee was sdltag's: gone
    write_keywords(path, [])
    assert read_keywords(path) == ["Food", "breakfast", "Holiday"]
    assert "sdltag|" not in _text(path) and "sdltag/" not in _text(path)


def test_added_keywords_are_recorded_in_the_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "e.jpg.xmp"
    path.write_text(EXIFTOOL_KEYWORDS, encoding="utf-8")
    write_keywords(path, ["FOOD", "toast"])
    text = _text(path)
    assert 'xmlns:sdltag="urn:sdltag:xmp:1.0/"' in text
    added = text.split("<sdltag:addedSubject>")[1].split("</sdltag:addedSubject>")[0]
    assert "<rdf:li>toast</rdf:li>" in added and "FOOD" not in added and "Food" not in added
    assert text.count("<rdf:li>Food</rdf:li>") == 1 and "<rdf:li>FOOD</rdf:li>" not in text


def test_keyword_deleted_by_the_user_leaves_the_record(tmp_path: Path) -> None:
    """A keyword sdltag added, then removed by the user and re-added by the user, is the user's."""
    path = tmp_path / "f.jpg.xmp"
    write_keywords(path, ["dog", "ball"])
    text = _text(path).replace("<rdf:li>dog</rdf:li>", "", 1)  # the user deletes it (first: dc:subject)
    path.write_text(text, encoding="utf-8")
    write_keywords(path, ["ball"])
    assert "dog" not in _text(path)
    path.write_text(_text(path).replace("<rdf:li>ball</rdf:li>", "<rdf:li>ball</rdf:li><rdf:li>dog</rdf:li>", 1))
    write_keywords(path, [])
    assert read_keywords(path) == ["dog"]


def test_sidecar_from_an_earlier_version_keeps_its_flat_keywords(tmp_path: Path) -> None:
    """Without the record sdltag cannot prove a flat keyword was its own: it stays; its hierarchy goes."""
    path = tmp_path / "g.jpg.xmp"
    legacy = FOREIGN.replace(
        "<rdf:li>Places|Spain|Beach</rdf:li>", "<rdf:li>Places|Spain|Beach</rdf:li><rdf:li>sdltag|sun</rdf:li>"
    ).replace("<rdf:li>Beach</rdf:li>", "<rdf:li>Beach</rdf:li><rdf:li>sun</rdf:li>")
    path.write_text(legacy, encoding="utf-8")
    write_keywords(path, ["cat"])
    assert read_keywords(path) == ["Holiday", "Beach", "sun", "cat"]
    assert "sdltag|sun" not in _text(path)


def test_keyword_another_tool_files_under_its_hierarchy_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "h.jpg.xmp"
    write_keywords(path, ["beach"])
    text = _text(path).replace(
        "<rdf:li>sdltag|beach</rdf:li>", "<rdf:li>sdltag|beach</rdf:li><rdf:li>Trips|beach</rdf:li>"
    )
    path.write_text(text, encoding="utf-8")
    write_keywords(path, ["cat"])
    write_keywords(path, [])
    assert read_keywords(path) == ["beach"] and "Trips|beach" in _text(path)


# --- rewrites keep what sdltag does not own -------------------------------------------------

ANNOTATED = """<?xml version="1.0" encoding="UTF-8"?>
<!-- exported by a photo tool -->
<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
  <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
    <!-- keywords checked by hand -->
    <rdf:Description rdf:about="" xmlns:d="http://purl.org/dc/elements/1.1/" xmlns:my="http://example.com/my/1.0/">
      <d:title><rdf:Alt><rdf:li xml:lang="x-default">Dawn</rdf:li><rdf:li xml:lang="fr">Aub</rdf:li></rdf:Alt></d:title>
      <d:subject>
        <rdf:Bag>
          <rdf:li>Sea</rdf:li>
          <!-- keep -->
          <rdf:li xml:lang="de">Meer</rdf:li>
        </rdf:Bag>
      </d:subject>
      <my:note>a &lt;b&gt; &amp; "c"</my:note>
      <?app hint="1"?>
    </rdf:Description>
  </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>
"""


def test_rewrite_keeps_comments_lang_prefixes_and_layout(tmp_path: Path) -> None:
    path = tmp_path / "i.jpg.xmp"
    path.write_text(ANNOTATED, encoding="utf-8")
    write_keywords(path, ["boat", "sea"])
    text = _text(path)
    head = ANNOTATED.split("<x:xmpmeta")[0]
    assert text.startswith(head) and text.endswith('</x:xmpmeta>\n<?xpacket end="w"?>\n')
    for kept in [
        "<!-- keywords checked by hand -->",
        "<!-- keep -->",
        '<rdf:li xml:lang="x-default">Dawn</rdf:li><rdf:li xml:lang="fr">Aub</rdf:li>',
        '<rdf:li xml:lang="de">Meer</rdf:li>',
        '<my:note>a &lt;b&gt; &amp; "c"</my:note>',
        '<?app hint="1"?>',
        "          <rdf:li>Sea</rdf:li>\n",
    ]:
        assert kept in text, kept
    # its own prefix for dc is used for the keywords it adds, laid out like its siblings
    assert '<rdf:li xml:lang="de">Meer</rdf:li>\n          <rdf:li>boat</rdf:li>\n        </rdf:Bag>' in text
    assert "<dc:" not in text and "<d:subject>" in text and "ns0:" not in text and "ns1:" not in text
    write_keywords(path, [])
    assert _text(path).replace("\n", "").count("boat") == 0
    assert read_keywords(path) == ["Sea", "Meer"] and "<!-- keep -->" in _text(path)


ODD_PREFIXES = """<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:DC="http://purl.org/dc/elements/1.1/"
    xmlns:dc="http://example.com/not-dublin-core/" xmlns:lr="http://example.com/not-lightroom/">
   <DC:subject><rdf:Bag><rdf:li>Mine</rdf:li></rdf:Bag></DC:subject>
   <dc:thing>x</dc:thing>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def test_one_odd_sidecar_does_not_change_the_prefixes_of_the_next(tmp_path: Path) -> None:
    odd = tmp_path / "odd.jpg.xmp"
    odd.write_text(ODD_PREFIXES, encoding="utf-8")
    write_keywords(odd, ["cat"])
    text = _text(odd)
    assert read_keywords(odd) == ["Mine", "cat"] and "<DC:subject>" in text and "<dc:thing>x</dc:thing>" in text
    # lr is taken in that document: Lightroom's namespace gets a free prefix there, declared once
    assert 'xmlns:lr1="http://ns.adobe.com/lightroom/1.0/"' in text and "<lr1:hierarchicalSubject>" in text
    fresh = tmp_path / "fresh.jpg.xmp"
    write_keywords(fresh, ["dog"])
    text = _text(fresh)
    assert "<dc:subject>" in text and 'xmlns:dc="http://purl.org/dc/elements/1.1/"' in text
    assert "<lr:hierarchicalSubject>" in text and "DC:" not in text and "lr1" not in text
    assert not any(f"ns{i}:" in text for i in range(4))
    plain = tmp_path / "plain.jpg.xmp"
    plain.write_text(FOREIGN, encoding="utf-8")
    write_keywords(plain, ["dog"])
    assert "<darktable:history>" in _text(plain) and "<dc:subject>" in _text(plain)


def test_symlinked_sidecar_stays_a_link_and_keeps_its_mode(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    target = store / "IMG_9.xmp"
    target.write_text(EXIFTOOL_KEYWORDS, encoding="utf-8")
    target.chmod(0o640)
    link = tmp_path / "IMG_9.jpg.xmp"
    link.symlink_to(target)
    assert write_keywords(link, ["espresso"]) is True
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert read_keywords(target) == ["Food", "breakfast", "Holiday", "espresso"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    write_keywords(link, [])
    assert link.is_symlink() and read_keywords(target) == ["Food", "breakfast", "Holiday"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["IMG_9.jpg.xmp", "store"]
    assert [p.name for p in store.iterdir()] == ["IMG_9.xmp"]


def test_keywords_written_as_a_plain_value_count_as_the_users(tmp_path: Path) -> None:
    """`dc:subject="Sky"` and `<dc:subject>Sea</dc:subject>` (some tools write them) become one list, kept."""
    path = tmp_path / "j.xmp"
    path.write_text(
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" dc:subject="Sky" xmlns:dc="http://purl.org/dc/elements/1.1/">'
        "<dc:subject>Sea</dc:subject></rdf:Description></rdf:RDF></x:xmpmeta>",
        encoding="utf-8",
    )
    assert read_keywords(path) == ["Sea", "Sky"]
    write_keywords(path, ["sea", "sky", "gull"])
    write_keywords(path, [])
    assert read_keywords(path) == ["Sea", "Sky"]
    assert _text(path).count("<dc:subject>") == 1 and 'dc:subject="' not in _text(path)


def test_no_keywords_create_no_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "k.jpg.xmp"
    assert write_keywords(path, []) is False and write_keywords(path, ["  "]) is False
    assert not path.exists()


def test_windows_line_ends_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "w.xmp"
    path.write_bytes(EXIFTOOL_KEYWORDS.replace("\n", "\r\n").encode())
    write_keywords(path, ["toast"])
    data = path.read_bytes()
    assert data.count(b"\n") == data.count(b"\r\n") and b"    <rdf:li>toast</rdf:li>\r\n   </rdf:Bag>" in data
    assert read_keywords(path) == ["Food", "breakfast", "Holiday", "toast"]
