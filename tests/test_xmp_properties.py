"""Property-based tests of XMP sidecar merging (hypothesis, seeded and bounded).

- Whatever sequence of runs sdltag makes with whatever labels, and whatever the user's own
  tool does to the keywords in between, every keyword sdltag did not add survives, exactly
  as written; sdltag's current labels are there; nothing else is; a last run with no labels
  gives back exactly the user's keywords. Every file written is well-formed XML whose
  ``dc:subject`` is one ``rdf:Bag`` of ``rdf:li`` (what exiftool reads).
- Random and broken sidecar bytes raise nothing but ``XmpError``, and leave the file as it was.
"""

from __future__ import annotations

import codecs
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdltag.xmp import MAX_DEPTH, XmpError, read_keywords, write_keywords

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC = "http://purl.org/dc/elements/1.1/"
SUBJECT, BAG, LI = f"{{{DC}}}subject", f"{{{RDF}}}Bag", f"{{{RDF}}}li"
HIERARCHICAL = "{http://ns.adobe.com/lightroom/1.0/}hierarchicalSubject"
SETTINGS = settings(
    max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

USER_SIDECAR = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="Image::ExifTool 12.76">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <!-- {comment} -->
  <rdf:Description rdf:about="" xmlns:{dc}="http://purl.org/dc/elements/1.1/" xmlns:my="http://example.com/my/">
   <{dc}:title><rdf:Alt><rdf:li xml:lang="x-default">{title}</rdf:li></rdf:Alt></{dc}:title>
   <{dc}:subject>
    <rdf:Bag>{items}
    </rdf:Bag>
   </{dc}:subject>
   <my:rating>3</my:rating>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>
"""


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# keywords as photographers type them: any letters, digits, punctuation, symbols, spaces
keyword = st.text(st.characters(categories=("L", "N", "P", "S", "Zs"), exclude_characters="\ufffe\uffff"), max_size=12)
label = keyword.filter(lambda k: k.strip() != "")


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sdltag-xmp-props-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


_names = count()


def _fresh(workdir: Path) -> Path:
    return workdir / f"IMG_{next(_names)}.jpg.xmp"


def _subject_items(path: Path) -> list[str]:
    """dc:subject the way exiftool reads it, checking its shape: one rdf:Bag of rdf:li."""
    root = ET.fromstring(path.read_bytes())  # well-formed, or this raises
    subjects = list(root.iter(SUBJECT))
    assert len(subjects) <= 1
    if not subjects:
        return []
    containers = [child for child in subjects[0] if isinstance(child.tag, str)]
    assert [c.tag for c in containers] == [BAG]
    items = [child for child in containers[0] if isinstance(child.tag, str)]
    assert all(item.tag == LI and len(item) == 0 for item in items)
    return [item.text or "" for item in items]


def _recorded(path: Path) -> set[str]:
    root = ET.fromstring(path.read_bytes())
    return {
        (li.text or "").strip().casefold() for e in root.iter("{urn:sdltag:xmp:1.0/}addedSubject") for li in e.iter(LI)
    }


def _user_edit(path: Path, add: str | None = None, remove: str | None = None) -> None:
    """What another tool does: add a keyword (when absent) or remove one; it rewrites the whole file."""
    root = ET.fromstring(path.read_bytes())
    description = next(root.iter(f"{{{RDF}}}Description"))
    subject = description.find(SUBJECT)
    if subject is None:
        subject = ET.SubElement(description, SUBJECT)
        ET.SubElement(subject, BAG)
    bag = subject.find(BAG)
    assert bag is not None
    if add is not None:
        ET.SubElement(bag, LI).text = add
    if remove is not None:
        for li in [li for li in bag if (li.text or "").strip().casefold() == remove.strip().casefold()]:
            bag.remove(li)
    path.write_bytes(ET.tostring(root, encoding="utf-8"))


step = st.one_of(
    st.tuples(st.just("run"), st.lists(st.integers(0, 30), max_size=6)),
    st.tuples(st.just("add"), st.integers(0, 30)),
    st.tuples(st.just("remove"), st.integers(0, 30)),
)


@SETTINGS
@given(
    user=st.lists(keyword, max_size=6),
    fresh_words=st.lists(label, min_size=1, max_size=8),
    steps=st.lists(step, min_size=1, max_size=6),
    dc_prefix=st.sampled_from(["dc", "d", "DC"]),
    start_empty=st.booleans(),
)
def test_keywords_sdltag_did_not_add_survive_any_runs(
    workdir: Path, user: list[str], fresh_words: list[str], steps: list, dc_prefix: str, start_empty: bool
) -> None:
    path = _fresh(workdir)
    owned: list[str] = []  # the user's keywords, exactly as written, in order
    if not start_empty:
        owned = list(user)
        items = "".join(f"\n     <rdf:li>{_escape(k)}</rdf:li>" for k in owned)
        path.write_text(
            USER_SIDECAR.format(dc=dc_prefix, items=items, comment="mine", title=_escape("Dawn <&>")), encoding="utf-8"
        )
    # labels sdltag proposes: fresh words, the user's words and case variants of them
    pool = fresh_words + [k.strip() for k in user if k.strip()] + [k.upper() for k in user if k.strip()]
    for kind, arg in steps:
        if kind == "run":
            labels = [pool[i % len(pool)] for i in arg]
            write_keywords(path, labels)
            if not path.exists():  # no labels for a photo without a sidecar: none is created
                assert not labels
                continue
            values = _subject_items(path)
            for k in owned:
                assert k in values, (k, values)
            want = {k.strip().casefold() for k in owned if k.strip()} | {k.strip().casefold() for k in labels}
            assert {v.strip().casefold() for v in values if v.strip()} == want
            hierarchy = {(li.text or "") for e in ET.parse(path).getroot().iter(HIERARCHICAL) for li in e.iter(LI)}
            assert {h.casefold() for h in hierarchy} == {
                f"sdltag|{k.strip().replace('|', '-')}".casefold() for k in labels
            }
        elif path.exists():
            values = _subject_items(path)
            if kind == "add":
                word = pool[arg % len(pool)]
                present = {v.strip().casefold() for v in values}
                # a keyword typed back in while sdltag still records it as its own cannot be told apart
                if word.strip().casefold() not in present | _recorded(path):
                    _user_edit(path, add=word)
                    owned.append(word)
            elif values:
                word = values[arg % len(values)]
                _user_edit(path, remove=word)
                owned = [k for k in owned if k.strip().casefold() != word.strip().casefold()]
    if not path.exists():
        return
    write_keywords(path, [])
    assert _subject_items(path) == owned
    text = path.read_text(encoding="utf-8")
    assert "sdltag|" not in text and "sdltag/" not in text and "addedSubject" not in text
    if not start_empty and "rating" in text and "ns0:" not in text:  # never rewritten by the other tool
        assert "<!-- mine -->" in text and '<rdf:li xml:lang="x-default">Dawn &lt;&amp;&gt;</rdf:li>' in text
        assert "<my:rating>3</my:rating>" in text
        if owned:  # (a keyword list sdltag emptied goes: an empty list is the same as none)
            assert f"<{dc_prefix}:subject>" in text
    assert read_keywords(path) == [k.strip() for k in _dedupe_casefold(owned) if k.strip()]


def _dedupe_casefold(values: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for value in values:
        if value.strip().casefold() not in seen:
            seen.add(value.strip().casefold())
            out.append(value)
    return out


# --- fuzzing: broken and random sidecars -------------------------------------------------

VALID = USER_SIDECAR.format(dc="dc", items="\n     <rdf:li>Sea</rdf:li>", comment="c", title="t").encode("utf-8")
ENCODINGS = ["UTF-8", "utf-16", "UTF-32", "ISO-8859-1", "Shift_JIS", "bogus", "EBCDIC", "utf-7", "cp1252", "x" * 60]
BOMS = [b"", codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE]


@st.composite
def broken_sidecar(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "mutated", "declared", "nested", "truncated", "variant", "variant"]))
    if kind == "variant":  # well-formed, with what real sidecars hold around the keywords
        prefix = draw(st.sampled_from(["dc", "d", "ns0", "DC", "x1"]))
        rdf = draw(st.sampled_from(["rdf", "r", "RDF"]))
        items = "".join(
            draw(
                st.sampled_from(
                    [
                        "<{r}:li>{k}</{r}:li>",
                        "<{r}:li xml:lang='en'>{k}</{r}:li>",
                        "<!--{c}-->",
                        "<{r}:li><![CDATA[{k}]]></{r}:li>",
                        "<?pi {c}?>",
                        "<{r}:li/>",
                        "\n  ",
                    ]
                )
            ).format(r=rdf, k=_escape(draw(keyword)), c=draw(st.sampled_from(["", "note", "a-b", "ü"])))
            for _ in range(draw(st.integers(0, 6)))
        )
        subject = draw(
            st.sampled_from(
                [
                    "<{p}:subject><{r}:Bag>{i}</{r}:Bag></{p}:subject>",
                    "<{p}:subject><{r}:Seq>{i}</{r}:Seq></{p}:subject>",
                    "<{p}:subject>{i}</{p}:subject>",
                    "",
                ]
            )
        )
        declaration = draw(st.sampled_from(["", '<?xml version="1.0"?>', "<!DOCTYPE x:xmpmeta>", "<!-- c -->"]))
        description = (
            "<{r}:Description {r}:about='' xmlns:{p}='" + DC + "' xmlns:lr='http://other/'>{s}</{r}:Description>"
        )
        text = (
            declaration
            + "<x:xmpmeta xmlns:x='adobe:ns:meta/'><{r}:RDF xmlns:{r}='"
            + RDF
            + "'>"
            + description * draw(st.integers(0, 2))
            + "</{r}:RDF></x:xmpmeta>"
            + draw(st.sampled_from(["", "\n", "<!--e-->"]))
        )
        return text.format(r=rdf, p=prefix, s=subject.format(p=prefix, r=rdf, i=items)).encode("utf-8")
    if kind == "random":
        return draw(st.binary(max_size=400))
    if kind == "truncated":
        return VALID[: draw(st.integers(0, len(VALID)))]
    if kind == "declared":
        body = VALID.decode("utf-8")
        encoding = draw(st.sampled_from(ENCODINGS))
        text = f'<?xml version="1.0" encoding="{encoding}"?>\n' + body
        as_codec = draw(st.sampled_from(["utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "latin-1"]))
        return draw(st.sampled_from(BOMS)) + text.encode(as_codec, "replace")
    if kind == "nested":
        depth = draw(st.integers(0, MAX_DEPTH + 50))
        inner = draw(st.sampled_from(["<rdf:Bag>", "<x:y>", "<a>"]))
        close = inner.replace("<", "</")
        return VALID.replace(b"<my:rating>", (inner * depth + close * depth).encode() + b"<my:rating>")
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(
                st.sampled_from([b"<", b">", b"&", b"]]>", b"<!--", b"&#xFFFE;", b"\x00", b"\xff", b'"'])
            )
        else:
            del data[at : at + draw(st.integers(1, 20))]
    return bytes(data)


def _decoded(data: bytes) -> str:
    """The text of a sidecar sdltag wrote, decoded independently of sdltag: BOM, first bytes, declaration."""
    for start, codec in (
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
        (b"<\x00\x00\x00", "utf-32-le"),
        (b"<\x00?\x00", "utf-16-le"),
        (b"\x00<\x00?", "utf-16-be"),
    ):
        if data.startswith(start):
            return data.decode(codec)
    declared = re.match(rb"""<\?xml[^>]*?encoding\s*=\s*["']([^"']+)["']""", data)
    return data.decode(declared.group(1).decode() if declared else "utf-8")


@SETTINGS
@given(data=broken_sidecar(), labels=st.lists(label, max_size=3))
def test_broken_sidecars_raise_only_xmp_error(workdir: Path, data: bytes, labels: list[str]) -> None:
    path = _fresh(workdir)
    path.write_bytes(data)
    try:
        read_keywords(path)
    except XmpError:
        pass
    try:
        write_keywords(path, labels)
    except XmpError as exc:
        assert str(path) in str(exc)
        assert path.read_bytes() == data
        assert [p for p in workdir.iterdir() if ".sdltag-tmp-" in p.name or p.name.endswith(".tmp")] == []
        return
    written = path.read_bytes()
    root = ET.fromstring(_decoded(written))  # well-formed
    for description in root.iter(f"{{{RDF}}}Description"):  # one keyword list per description, as XMP has it
        assert len(description.findall(SUBJECT)) + (SUBJECT in description.attrib) <= 1
    values = {(li.text or "").strip().casefold() for e in root.iter(SUBJECT) for li in e.iter(LI)}
    assert {k.strip().casefold() for k in labels} <= values
    assert {k.casefold() for k in read_keywords(path)} >= {k.strip().casefold() for k in labels}
