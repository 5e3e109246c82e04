"""Keywords in XMP sidecars: read them (training data) and merge sdltag's tags into them.

What photo tools read (see docs/PHOTO-TOOLS.md): ``dc:subject`` (an ``rdf:Bag`` of flat
keywords), ``lr:hierarchicalSubject`` (``root|leaf``, Lightroom, darktable) and
``digiKam:TagsList`` (``root/leaf``). sdltag writes all three with its entries under
one root (``sdltag`` by default) and merges with what is there (case-insensitive union).

What a re-run may remove is only what sdltag provably added: its own root's hierarchical
entries, and the flat ``dc:subject`` keywords listed in the sidecar's ``sdltag:addedSubject``
bag, where each write records the flat keywords it added. A keyword that was in the sidecar
when sdltag first saw it is never recorded, so never removed.

A rewrite edits the parsed document in place: comments, processing instructions, ``xml:lang``
and other attributes, every namespace prefix and declaration, the text before and after the
root element and the file's encoding stay as they were; only the ``rdf:li`` items sdltag adds
or removes change. Prefixes are chosen per document (no process-wide registry). The file is
replaced atomically through ``sdltag.paths.atomic_write``.

A sidecar sdltag cannot read safely (not a regular file, not well-formed, an encoding Python
cannot decode, entity declarations, nesting deeper than ``MAX_DEPTH``, larger than
``MAX_BYTES``) raises ``XmpError`` naming the file and is left untouched.
"""

from __future__ import annotations

import codecs
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

from sdltag.errors import SdltagError
from sdltag.paths import UnreadableFile, atomic_write, read_regular_file
from sdltag.sidecars import NAMINGS as NAMINGS  # the sidecar naming lives in sdltag.sidecars
from sdltag.sidecars import sidecar_path as sidecar_path

X_NS = "adobe:ns:meta/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC_NS = "http://purl.org/dc/elements/1.1/"
LR_NS = "http://ns.adobe.com/lightroom/1.0/"
DIGIKAM_NS = "http://www.digikam.org/ns/1.0/"
SDLTAG_NS = "urn:sdltag:xmp:1.0/"
XML_NS = "http://www.w3.org/XML/1998/namespace"
_PREFIXES = {"x": X_NS, "rdf": RDF_NS, "dc": DC_NS, "lr": LR_NS, "digiKam": DIGIKAM_NS, "sdltag": SDLTAG_NS}
_PREFERRED = {uri: prefix for prefix, uri in _PREFIXES.items()}

SUBJECT = f"{{{DC_NS}}}subject"
HIERARCHICAL = f"{{{LR_NS}}}hierarchicalSubject"
TAGS_LIST = f"{{{DIGIKAM_NS}}}TagsList"
ADDED_SUBJECT = f"{{{SDLTAG_NS}}}addedSubject"
RDF = f"{{{RDF_NS}}}RDF"
DESCRIPTION = f"{{{RDF_NS}}}Description"
LI = f"{{{RDF_NS}}}li"
CONTAINERS = (f"{{{RDF_NS}}}Bag", f"{{{RDF_NS}}}Seq", f"{{{RDF_NS}}}Alt")
XPACKET_BEGIN = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
XPACKET_END = '\n<?xpacket end="w"?>\n'
MAX_DEPTH = 200  # real sidecars nest about 10 deep; deeper is refused, never recursed into
MAX_BYTES = 64 * 1024 * 1024
_INDENT = " "

# Characters XML 1.0 can hold (a keyword with any other cannot be written).
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_DECLARED_ENCODING = re.compile(r"""^<\?xml[^>]*?\sencoding\s*=\s*["']([^"']*)["']""")
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
# Without a byte order mark, how "<?" starts in UTF-16/32 (XML 1.0, appendix F).
_UNMARKED = (
    (b"\x00\x00\x00<", "utf-32-be"),
    (b"<\x00\x00\x00", "utf-32-le"),
    (b"\x00<\x00?", "utf-16-be"),
    (b"<\x00?\x00", "utf-16-le"),
)
# Codecs that are transforms rather than character encodings of a document.
_NOT_DOCUMENT_CODECS = {"unicode-escape", "raw-unicode-escape", "idna", "punycode", "utf-7", "undefined"}


class XmpError(SdltagError):
    """A sidecar that exists but cannot be read or written safely; it is never overwritten."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}", exit_code=1)
        self.path = path
        self.reason = reason


class _Refused(Exception):
    """Raised inside the parser's callbacks to stop on something sdltag will not read."""


# --- reading the file -------------------------------------------------------------------


def _read_regular(path: Path) -> bytes | None:
    """The bytes of ``path``; None when it does not exist. Only regular files are opened.

    A FIFO, device or socket is refused before it is opened (opening a FIFO blocks until a
    writer comes); the descriptor is opened non-blocking and checked again, for a file
    swapped in between.
    """
    try:
        return read_regular_file(path, MAX_BYTES)
    except UnreadableFile as exc:
        if exc.kind == "os":
            raise XmpError(path, f"cannot read sidecar ({exc.reason}); left untouched") from None
        if exc.kind == "special":
            what = "a FIFO or device" if exc.opened else "a folder, FIFO or device"
            raise XmpError(path, f"is not a regular file ({what}); left untouched, remove or rename it") from None
        if exc.size is not None:
            raise XmpError(
                path, f"is {exc.size / 2**20:.0f} MB, more than a sidecar sdltag reads ({MAX_BYTES // 2**20} MB)"
            ) from None
        raise XmpError(path, f"is more than a sidecar sdltag reads ({MAX_BYTES // 2**20} MB)") from None


def _decode(path: Path, data: bytes) -> tuple[str, str, bytes]:
    """(text, codec, byte order mark): the sidecar decoded the way its bytes and declaration say."""
    detected = next(((bom, codec) for bom, codec in _BOMS if data.startswith(bom)), None)
    if detected is None:
        detected = next(((b"", codec) for start, codec in _UNMARKED if data.startswith(start)), None)
    if detected is not None:  # Unicode told by its first bytes; a declaration must agree
        bom, codec = detected
        try:
            text = data[len(bom) :].decode(codec)
        except UnicodeDecodeError as exc:
            raise XmpError(path, f"is not valid {codec.upper()} ({exc.reason}); left untouched") from None
        declared = _DECLARED_ENCODING.match(text)
        if declared is not None:
            name = declared.group(1)
            try:
                agrees = codecs.lookup(name).name.startswith(codec[:6])
            except LookupError:
                agrees = False
            if not agrees:
                raise XmpError(
                    path, f"declares the encoding {name!r} but is written in {codec.upper()}; left untouched, fix it"
                )
        return text, codec, bom
    codec = "utf-8"
    declared = _DECLARED_ENCODING.match(data.decode("latin-1"))
    if declared is not None:
        name = declared.group(1)
        try:
            codec = codecs.lookup(name).name
            if codec in _NOT_DOCUMENT_CODECS:
                raise LookupError(name)
            compatible = "<?xml".encode(codec) == b"<?xml"
        except (LookupError, UnicodeError, ValueError):
            raise XmpError(
                path, f"declares the encoding {name!r}, which sdltag cannot read; left untouched, save it as UTF-8"
            ) from None
        if not compatible:
            raise XmpError(path, f"declares the encoding {name!r} but is not written in it; left untouched, fix it")
    try:
        return data.decode(codec), codec, b""
    except (UnicodeDecodeError, LookupError) as exc:
        reason = exc.reason if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise XmpError(path, f"is not valid {codec.upper()} ({reason}); left untouched, fix or remove it") from None


@dataclass
class _Document:
    """A parsed sidecar: the root element plus what a rewrite must give back unchanged."""

    root: ET.Element
    prolog: str = ""  # the text before the root element (XML declaration, xpacket, comments)
    epilog: str = ""
    codec: str = "utf-8"
    bom: bytes = b""
    crlf: bool = False  # every line ends in CR LF (the parser reads them as LF; a rewrite gives them back)
    # id(element) -> its namespace declarations in source order ("" = the default namespace)
    declarations: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    prefixes: dict[int, str] = field(default_factory=dict)  # id(element) -> the prefix its tag was written with
    # id(element) -> its parent, built on the first edit; removed elements are kept alive so that
    # no new element reuses their id (and with it their declarations)
    _parents: dict[int, ET.Element] | None = None
    _removed: list[ET.Element] = field(default_factory=list)

    @property
    def parents(self) -> dict[int, ET.Element]:
        if self._parents is None:
            self._parents = {id(child): parent for parent in self.root.iter() for child in parent}
        return self._parents


def _clark(name: str) -> tuple[str, str | None]:
    """expat's ``uri\\x01local\\x01prefix`` -> (``{uri}local``, prefix or None)."""
    parts = name.split("\x01")
    if len(parts) == 1:
        return parts[0], None
    return f"{{{parts[0]}}}{parts[1]}", (parts[2] if len(parts) > 2 else "")


class _TreeBuilder:
    """expat's callbacks building one ElementTree, with what a rewrite needs (prefixes, declarations, span)."""

    def __init__(self, parser: Any, data: bytes) -> None:
        self.parser, self.data = parser, data
        self.stack: list[ET.Element] = []
        self.pending: list[tuple[str, str]] = []
        self.declarations: dict[int, list[tuple[str, str]]] = {}
        self.prefixes: dict[int, str] = {}
        self.root: ET.Element | None = None
        self.begin = self.finish = 0  # byte offsets of the root element's start and end
        parser.StartNamespaceDeclHandler = self.start_namespace
        parser.StartElementHandler = self.start
        parser.EndElementHandler = self.end
        parser.CharacterDataHandler = self.characters
        parser.CommentHandler = self.comment
        parser.ProcessingInstructionHandler = self.instruction
        parser.EntityDeclHandler = self.entity
        parser.UnparsedEntityDeclHandler = self.entity
        parser.SkippedEntityHandler = self.entity  # a reference to an entity of an external DTD would be lost

    def start_namespace(self, prefix: str | None, uri: str | None) -> None:
        self.pending.append((prefix or "", uri or ""))

    def add(self, element: ET.Element[Any]) -> None:
        if self.stack:
            self.stack[-1].append(element)

    def start(self, name: str, attributes: list[str]) -> None:
        if len(self.stack) >= MAX_DEPTH:
            raise _Refused(f"nests elements more than {MAX_DEPTH} deep")
        tag, prefix = _clark(name)
        element = ET.Element(tag)
        for i in range(0, len(attributes), 2):
            element.set(_clark(attributes[i])[0], attributes[i + 1])
        if self.pending:
            self.declarations[id(element)] = list(self.pending)
            self.pending.clear()
        if prefix is not None:
            self.prefixes[id(element)] = prefix
        if not self.stack:
            if self.root is not None:
                raise _Refused("has more than one root element")
            self.root, self.begin = element, self.parser.CurrentByteIndex
        self.add(element)
        self.stack.append(element)

    def end(self, _name: str) -> None:
        self.stack.pop()
        if not self.stack:
            at = self.parser.CurrentByteIndex
            # an end tag is reported where it starts; an empty-element tag where it has ended
            self.finish = self.data.index(b">", at) + 1 if self.data.startswith(b"</", at) else at

    def characters(self, chunk: str) -> None:
        if not self.stack:
            return
        parent = self.stack[-1]
        if len(parent):
            last = parent[-1]
            last.tail = (last.tail or "") + chunk
        else:
            parent.text = (parent.text or "") + chunk

    def comment(self, body: str) -> None:
        if self.stack:
            self.add(ET.Comment(body))

    def instruction(self, target: str, body: str) -> None:
        if self.stack:
            self.add(ET.ProcessingInstruction(target, body or None))

    def entity(self, *_args: object) -> None:
        raise _Refused("declares or refers to XML entities, which sdltag does not expand")


def _parse_text(path: Path, text: str) -> _Document:
    """Parse with expat into an ElementTree, without recursion and without entity declarations."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise XmpError(path, "holds characters that are not Unicode text; left untouched, fix or remove it") from None
    parser = expat.ParserCreate(encoding="UTF-8", namespace_separator="\x01")
    parser.namespace_prefixes = True
    parser.ordered_attributes = True
    parser.buffer_text = True
    parser.specified_attributes = True  # a DTD's default attributes are not written out on a rewrite
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    tree = _TreeBuilder(parser, data)
    try:
        parser.Parse(data, True)
    except _Refused as exc:
        raise XmpError(path, f"{exc}; left untouched, fix or remove it") from None
    except expat.ExpatError as exc:
        raise XmpError(path, f"not valid XML ({exc}); left untouched, fix or remove it") from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise XmpError(path, f"cannot be parsed ({type(exc).__name__}); left untouched, fix or remove it") from None
    if not isinstance(tree.root, ET.Element):
        raise XmpError(path, "has no XML element; left untouched, fix or remove it")
    return _Document(
        root=tree.root,
        prolog=data[: tree.begin].decode("utf-8"),
        epilog=data[tree.finish :].decode("utf-8"),
        declarations=tree.declarations,
        prefixes=tree.prefixes,
    )


def _parse(path: Path) -> _Document | None:
    """The parsed sidecar at ``path``; None when there is none."""
    data = _read_regular(path)
    if data is None:
        return None
    text, codec, bom = _decode(path, data)
    document = _parse_text(path, text)
    document.codec, document.bom = codec, bom
    document.crlf = "\r\n" in text and text.count("\r\n") == text.count("\n")
    return document


# --- keywords in the tree ---------------------------------------------------------------


def _rdf(root: ET.Element) -> ET.Element | None:
    if root.tag == RDF:
        return root
    for element in root.iter(RDF):
        return element
    return None


def _descriptions(root: ET.Element) -> list[ET.Element]:
    """The top-level ``rdf:Description`` elements, where XMP properties live."""
    rdf = _rdf(root)
    return [] if rdf is None else rdf.findall(DESCRIPTION)


def _li_value(li: ET.Element) -> str | None:
    """A keyword item's text, stripped; None for an item that is not a plain keyword."""
    if li.tag != LI or any(isinstance(child.tag, str) for child in li):
        return None
    value = (li.text or "").strip()
    return value or None


def _property_items(descriptions: Iterable[ET.Element], prop: str) -> list[tuple[ET.Element, ET.Element]]:
    """(container, li) for every keyword item of ``prop`` (an rdf:Bag/Seq/Alt), in file order."""
    items: list[tuple[ET.Element, ET.Element]] = []
    for description in descriptions:
        for element in description.findall(prop):
            for container in element:
                if container.tag in CONTAINERS:
                    items.extend((container, li) for li in container if _li_value(li) is not None)
    return items


def _values(descriptions: Iterable[ET.Element], prop: str) -> list[str]:
    return [_li_value(li) or "" for _container, li in _property_items(descriptions, prop)]


def _dedupe(values: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for value in values:
        key = value.casefold()
        if key not in seen:
            seen.add(key)
            out.append(value)
    return out


_LISTS = ((SUBJECT, "Bag"), (HIERARCHICAL, "Bag"), (TAGS_LIST, "Seq"), (ADDED_SUBJECT, "Bag"))


def _as_lists(document: _Document, descriptions: list[ET.Element], path: Path, strict: bool) -> None:
    """Give the keyword properties written as a plain value (``dc:subject="Sea"`` or
    ``<dc:subject>Sea</dc:subject>``, which some tools write) their list form, in memory, so the
    value counts as a keyword the user had. With ``strict``, a keyword property holding
    something else (a structure) raises ``XmpError``: sdltag cannot add to it."""
    for prop, kind in _LISTS:
        for description in descriptions:
            for element in description.findall(prop):
                _element_as_list(document, element, kind, path, strict)
            if prop in description.attrib:
                _attribute_as_list(document, description, prop, kind)


def _element_as_list(document: _Document, element: ET.Element, kind: str, path: Path, strict: bool) -> None:
    """``<dc:subject>Sea</dc:subject>`` -> ``<dc:subject><rdf:Bag><rdf:li>Sea</rdf:li></rdf:Bag></dc:subject>``."""
    children = [child for child in element if isinstance(child.tag, str)]
    if any(child.tag in CONTAINERS for child in children):
        return
    if children:
        if strict:
            local = str(element.tag).rpartition("}")[2]
            raise XmpError(path, f"its {local} is not a list of keywords; left untouched, fix or remove it")
        return
    value = (element.text or "").strip()
    element.text = None
    _append(document, element, ET.Element(f"{{{RDF_NS}}}{kind}"))
    if value:
        _append(document, element[-1], _li(value))


def _attribute_as_list(document: _Document, description: ET.Element, prop: str, kind: str) -> None:
    """``dc:subject="Sea"`` -> one more item of the property's list (made when there is none)."""
    value = description.attrib.pop(prop).strip()
    container = next((c for e in description.findall(prop) for c in e if c.tag in CONTAINERS), None)
    if container is None:
        element = ET.Element(prop)
        _append(document, description, element)
        container = ET.Element(f"{{{RDF_NS}}}{kind}")
        _append(document, element, container)
    if value:
        _append(document, container, _li(value))


def _li(value: str) -> ET.Element:
    li = ET.Element(LI)
    li.text = value
    return li


def read_keywords(xmp_path: Path) -> list[str]:
    """The keywords of a sidecar: ``dc:subject`` plus the leaves of ``lr:hierarchicalSubject``,
    case-insensitively de-duplicated, in file order. Raises ``XmpError`` for a file it cannot read."""
    xmp_path = Path(xmp_path)
    document = _parse(xmp_path)
    if document is None:
        raise XmpError(xmp_path, "does not exist")
    descriptions = _descriptions(document.root)
    _as_lists(document, descriptions, xmp_path, strict=False)
    subject = _values(descriptions, SUBJECT)
    leaves = [value.split("|")[-1].strip() for value in _values(descriptions, HIERARCHICAL)]
    return _dedupe(subject + [leaf for leaf in leaves if leaf])


@dataclass(frozen=True)
class KeywordSet:
    """The keyword properties of a sidecar, and which flat keywords sdltag added (``sdltag:addedSubject``)."""

    subject: list[str]
    hierarchical: list[str]
    tags_list: list[str]
    added: list[str] = field(default_factory=list)


def read_keyword_set(xmp_path: Path) -> KeywordSet:
    """Every keyword property of a sidecar as written, with sdltag's record of the flat keywords it
    added (training tells a person's keywords from a program's with it). Raises ``XmpError``."""
    xmp_path = Path(xmp_path)
    document = _parse(xmp_path)
    if document is None:
        raise XmpError(xmp_path, "does not exist")
    descriptions = _descriptions(document.root)
    _as_lists(document, descriptions, xmp_path, strict=False)
    return KeywordSet(
        subject=_values(descriptions, SUBJECT),
        hierarchical=_values(descriptions, HIERARCHICAL),
        tags_list=_values(descriptions, TAGS_LIST),
        added=_values(descriptions, ADDED_SUBJECT),
    )


def merge_keywords(existing: KeywordSet, keywords: list[str], root: str = "sdltag") -> KeywordSet:
    """Replace ``root``'s entries with ``keywords``, keeping everything else (case-insensitive union).

    A flat ``dc:subject`` keyword is removed only when ``existing.added`` records that sdltag
    added it, no new keyword matches it and no other tool's hierarchy lists it. A keyword
    already there is never recorded as sdltag's, even when sdltag proposes it too.
    """
    lr_prefix, dk_prefix = f"{root}|".casefold(), f"{root}/".casefold()
    ours_h = {h.casefold() for h in existing.hierarchical if h.casefold().startswith(lr_prefix)}
    ours_t = {t.casefold() for t in existing.tags_list if t.casefold().startswith(dk_prefix)}
    other_h = [h for h in existing.hierarchical if h.casefold() not in ours_h]
    other_t = [t for t in existing.tags_list if t.casefold() not in ours_t]
    other_leaves = {h.split("|")[-1].strip().casefold() for h in other_h}
    other_leaves |= {t.split("/")[-1].strip().casefold() for t in other_t}
    keywords = _dedupe([k.strip() for k in keywords if k.strip()])
    wanted = {k.casefold() for k in keywords}
    present = {s.casefold() for s in existing.subject}
    recorded = {a.casefold() for a in existing.added} & present
    removed = {key for key in recorded if key not in wanted and key not in other_leaves}
    new = [k for k in keywords if k.casefold() not in present]
    # still ours: recorded, kept, and listed by no other tool (then it is shared, so kept for good)
    still_ours = recorded - removed - other_leaves
    return KeywordSet(
        subject=[s for s in existing.subject if s.casefold() not in removed] + new,
        hierarchical=_dedupe(other_h + [f"{root}|{k.replace('|', '-')}" for k in keywords]),
        tags_list=_dedupe(other_t + [f"{root}/{k.replace('/', '-')}" for k in keywords]),
        added=_dedupe([s for s in existing.subject if s.casefold() in still_ours] + new),
    )


def _same(a: KeywordSet, b: KeywordSet) -> bool:
    """Equal up to order and case: a re-run that picks the same tags leaves the file alone."""

    def norm(values: list[str]) -> set[str]:
        return {v.casefold() for v in values}

    pairs = ((a.subject, b.subject), (a.hierarchical, b.hierarchical), (a.tags_list, b.tags_list), (a.added, b.added))
    return all(norm(x) == norm(y) for x, y in pairs)


# --- editing the tree in place ------------------------------------------------------------


def _leading(element: ET.Element, parents: dict[int, ET.Element]) -> str | None:
    """The indentation ``element`` is written with (the whitespace after the last line break before it)."""
    parent = parents.get(id(element))
    if parent is None:
        return ""
    siblings = list(parent)
    index = siblings.index(element)
    before = siblings[index - 1].tail if index else parent.text
    if before is None or "\n" not in before or before.strip():
        return None
    return before.rpartition("\n")[2]


def _append(document: _Document, parent: ET.Element, child: ET.Element) -> None:
    """Append ``child`` laid out like its siblings, or one indentation step inside ``parent``."""
    parents = document.parents
    if len(parent):
        last = parent[-1]
        child.tail = last.tail
        last.tail = parent[-2].tail if len(parent) > 1 else parent.text
        if last.tail is not None and last.tail.strip():  # mixed content: no layout to copy
            last.tail = child.tail = None
    elif parent.text is None or not parent.text.strip():
        own = _leading(parent, parents)
        if own is None:
            parent.text, child.tail = None, None
        else:
            grandparent = parents.get(id(parent))
            outer = _leading(grandparent, parents) if grandparent is not None else None
            step = own[len(outer) :] if outer is not None and own.startswith(outer) and len(own) > len(outer) else ""
            parent.text = "\n" + own + (step or _INDENT)
            child.tail = "\n" + own
    parent.append(child)
    parents[id(child)] = parent


def _remove(document: _Document, parent: ET.Element, child: ET.Element) -> None:
    """Remove ``child``, giving its closing layout to the sibling before it when it was the last."""
    children = list(parent)
    index = children.index(child)
    closing = child.tail if child.tail is not None and not child.tail.strip() else None
    if index == len(children) - 1:
        if index > 0:
            children[index - 1].tail = closing
        elif parent.text is None or not parent.text.strip():
            parent.text = closing
    parent.remove(child)
    document.parents.pop(id(child), None)
    document._removed.append(child)


def _update_property(
    document: _Document,
    descriptions: list[ET.Element],
    prop: str,
    container_tag: str,
    values: list[str],
    target: ET.Element,
) -> None:
    """Make ``prop``'s keyword items the case-insensitive set ``values``, editing in place.

    Items whose value is kept stay exactly as written (text, ``xml:lang``, comments around
    them); removed ones go; new ones are appended to the property's first container, or to
    a new property in ``target``. A container sdltag empties goes, with its property when
    that holds nothing else.
    """
    keep = {v.casefold() for v in values}
    emptied: list[ET.Element] = []
    for container, li in _property_items(descriptions, prop):
        if (_li_value(li) or "").casefold() not in keep:
            _remove(document, container, li)
            if all(c is not container for c in emptied):
                emptied.append(container)
    have = {v.casefold() for v in _values(descriptions, prop)}
    missing = _dedupe(v for v in values if v.casefold() not in have)
    if missing:
        first: ET.Element | None = next(
            (c for d in descriptions for e in d.findall(prop) for c in e if c.tag in CONTAINERS),
            None,
        )
        if first is None:
            _declare(document, target, prop)
            element = ET.Element(prop)
            _append(document, target, element)
            first = ET.Element(container_tag)
            _append(document, element, first)
        for value in missing:
            _append(document, first, _li(value))
    parents = document.parents
    for container in emptied:
        if any(child.tag == LI for child in container) or id(container) not in parents:
            continue
        element = parents[id(container)]
        if len(element) == 1 and not element.attrib and id(element) in parents:
            _remove(document, parents[id(element)], element)
        elif not len(container):
            container.text = None


def _namespace(tag: str) -> str:
    return tag[1:].partition("}")[0] if tag.startswith("{") else ""


def _scope(document: _Document, element: ET.Element) -> dict[str, str]:
    """The namespace bindings in force at ``element`` (prefix -> uri)."""
    chain, parents = [element], document.parents
    while id(chain[-1]) in parents:
        chain.append(parents[id(chain[-1])])
    scope: dict[str, str] = {"xml": XML_NS}
    for ancestor in reversed(chain):
        scope.update(document.declarations.get(id(ancestor), ()))
    return scope


def _declare(document: _Document, target: ET.Element, prop: str) -> None:
    """Declare ``prop``'s namespace on ``target`` (the usual XMP layout) when it is not in scope there."""
    uri = _namespace(prop)
    scope = _scope(document, target)
    if any(bound == uri for prefix, bound in scope.items() if prefix):
        return
    prefix = _free_prefix(_PREFERRED.get(uri, "ns"), scope)
    document.declarations.setdefault(id(target), []).append((prefix, uri))


def _free_prefix(preferred: str, scope: dict[str, str]) -> str:
    if preferred not in scope and not preferred.lower().startswith("xml"):
        return preferred
    n = 1
    while f"{preferred}{n}" in scope:
        n += 1
    return f"{preferred}{n}"


# --- writing the tree ---------------------------------------------------------------------


def _escape_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")


def _escape_attribute(text: str) -> str:
    return _escape_text(text).replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;").replace("\r", "&#13;")


class _Scope:
    """The namespace bindings in force at an element, and the qualified names already worked out there."""

    def __init__(self, bindings: dict[str, str]) -> None:
        self.bindings = bindings
        self.names: dict[tuple[str, str, bool], str] = {}

    def bound(self, declarations: list[tuple[str, str]]) -> _Scope:
        return _Scope({**self.bindings, **dict(declarations)}) if declarations else self

    def name(self, tag: str, attribute: bool) -> str | None:
        """``{uri}local`` as written in this scope; None when its namespace needs a declaration first."""
        key = (tag, "", attribute)
        known = self.names.get(key)
        if known is not None:
            return known
        uri, _, local = tag[1:].partition("}") if tag.startswith("{") else ("", "", tag)
        if not uri:
            if not attribute and self.bindings.get(""):
                return None  # an element in no namespace under a default one: needs xmlns=""
            name = local
        elif attribute and uri == XML_NS:
            name = f"xml:{local}"
        else:
            prefix = next(
                (
                    p
                    for p, bound in reversed(self.bindings.items())
                    if bound == uri and p != "xml" and (p or not attribute)
                ),
                None,
            )
            if prefix is None:
                return None
            name = f"{prefix}:{local}" if prefix else local
        self.names[key] = name
        return name


def _qualified(
    element: ET.Element, document: _Document, scope: _Scope, declarations: list[tuple[str, str]]
) -> tuple[_Scope, str, list[tuple[str, str]]]:
    """(scope inside ``element``, its tag's name, its attributes' names and values), declaring what is missing."""
    tag = element.tag
    prefix = document.prefixes.get(id(element))
    uri = tag[1:].partition("}")[0] if tag.startswith("{") else ""
    while True:
        if prefix is not None and uri and scope.bindings.get(prefix) == uri:  # as the source wrote it
            local = tag.partition("}")[2]
            name: str | None = f"{prefix}:{local}" if prefix else local
        else:
            name = scope.name(tag, attribute=False)
        attributes = [(scope.name(key, attribute=True), value) for key, value in element.attrib.items()]
        names = [name, *(n for n, _value in attributes)]
        missing = next((key for key, n in zip([tag, *element.attrib], names, strict=True) if n is None), None)
        if missing is None:
            return scope, name or "", [(n or "", v) for n, v in attributes]
        missing_uri = missing[1:].partition("}")[0] if missing.startswith("{") else ""
        declaration = (
            ("", "")
            if not missing_uri
            else (_free_prefix(_PREFERRED.get(missing_uri, "ns"), scope.bindings), missing_uri)
        )
        declarations.append(declaration)
        scope = scope.bound([declaration])


def _serialize(document: _Document) -> str:
    """The document's root element as XML, each element with the prefixes it was written with."""
    out: list[str] = []
    # (element, scope) to open, or (element, closing tag) to close: no recursion at any depth
    todo: list[tuple[ET.Element, _Scope | str]] = [(document.root, _Scope({"xml": XML_NS}))]
    while todo:
        element, scope = todo.pop()
        if isinstance(scope, str):
            out.append(scope)
        else:
            opening, closing, inner = _opening(element, document, scope)
            out.append(opening)
            if closing is not None:
                todo.append((element, closing))
                todo.extend((child, inner) for child in reversed(element))
                continue
        if element.tail and element is not document.root:
            out.append(_escape_text(element.tail))
    return "".join(out)


def _opening(element: ET.Element, document: _Document, scope: _Scope) -> tuple[str, str | None, _Scope]:
    """(what opens ``element`` with its text, its closing tag or None when nothing is left to close, inner scope)."""
    if element.tag is ET.Comment:
        return f"<!--{element.text or ''}-->", None, scope
    if element.tag is ET.ProcessingInstruction:
        return f"<?{element.text or ''}?>", None, scope
    inner, name, start = _start_tag(element, document, scope)
    if not len(element) and not element.text:
        return f"{start}/>", None, inner
    return f"{start}>" + (_escape_text(element.text) if element.text else ""), f"</{name}>", inner


def _start_tag(element: ET.Element, document: _Document, scope: _Scope) -> tuple[_Scope, str, str]:
    """(scope inside ``element``, its name, its start tag without the closing ``>``)."""
    declarations = list(document.declarations.get(id(element), ()))
    inner, name, attributes = _qualified(element, document, scope.bound(declarations), declarations)
    parts = [name]
    for prefix, bound in declarations:
        parts.append(f'xmlns:{prefix}="{_escape_attribute(bound)}"' if prefix else f'xmlns="{bound}"')
    parts.extend(f'{key}="{_escape_attribute(value)}"' for key, value in attributes)
    return inner, name, f"<{' '.join(parts)}"


def _new_document() -> _Document:
    meta = ET.Element(f"{{{X_NS}}}xmpmeta")
    rdf = ET.SubElement(meta, RDF)
    description = ET.SubElement(rdf, DESCRIPTION, {f"{{{RDF_NS}}}about": ""})
    document = _Document(root=meta, prolog=XPACKET_BEGIN, epilog=XPACKET_END)
    document.declarations[id(meta)] = [("x", X_NS)]
    document.declarations[id(rdf)] = [("rdf", RDF_NS)]
    document.declarations[id(description)] = [(p, _PREFIXES[p]) for p in ("dc", "lr", "digiKam")]
    ET.indent(meta, space=_INDENT)
    return document


def _check_keywords(path: Path, keywords: list[str]) -> None:
    for keyword in keywords:
        bad = _NOT_XML_CHAR.search(keyword)
        if bad is not None:
            raise XmpError(
                path,
                f"the keyword {keyword!r} holds U+{ord(bad.group()):04X}, which XML cannot store; "
                "sidecar left untouched, fix the label",
            )


def write_keywords(xmp_path: Path, keywords: list[str], *, root: str = "sdltag", dry_run: bool = False) -> bool:
    """Merge ``keywords`` into the sidecar at ``xmp_path`` (created if missing), atomically.

    Returns True when the file was (or, with ``dry_run``, would be) changed; an
    identical re-run changes nothing, and no keywords for a photo without a sidecar
    create none. A sidecar that cannot be read safely raises
    ``XmpError`` and is left as it is.
    """
    xmp_path = Path(xmp_path)
    _check_keywords(xmp_path, [*keywords, root])
    document = _parse(xmp_path)
    exists = document is not None
    if document is None:
        document = _new_document()
    rdf = _rdf(document.root)
    if rdf is None:
        raise XmpError(xmp_path, "has no rdf:RDF element; left untouched, fix or remove it")
    descriptions = _descriptions(document.root)
    if not descriptions:
        description = ET.Element(DESCRIPTION, {f"{{{RDF_NS}}}about": ""})
        _append(document, rdf, description)
        descriptions = [description]
    _as_lists(document, descriptions, xmp_path, strict=True)
    existing = KeywordSet(
        subject=_values(descriptions, SUBJECT),
        hierarchical=_values(descriptions, HIERARCHICAL),
        tags_list=_values(descriptions, TAGS_LIST),
        added=_values(descriptions, ADDED_SUBJECT),
    )
    merged = merge_keywords(existing, keywords, root=root)
    if _same(merged, existing) and (exists or not merged.subject):  # nothing to add: no new empty sidecar
        return False
    if dry_run:
        return True
    target = next((d for d in descriptions if d.find(SUBJECT) is not None), descriptions[0])
    for prop, container, values in (
        (SUBJECT, "Bag", merged.subject),
        (HIERARCHICAL, "Bag", merged.hierarchical),
        (TAGS_LIST, "Seq", merged.tags_list),
        (ADDED_SUBJECT, "Bag", merged.added),
    ):
        owner = next((d for d in descriptions if d.find(prop) is not None), target)
        _update_property(document, descriptions, prop, f"{{{RDF_NS}}}{container}", values, owner)
    body = _serialize(document)
    if document.crlf:  # line breaks inside text are CR LF again (a parser reads them back as LF)
        body = body.replace("\n", "\r\n")
    text = document.prolog + body + document.epilog
    try:
        payload = document.bom + text.encode(document.codec, "xmlcharrefreplace")
    except (UnicodeError, LookupError) as exc:
        raise XmpError(xmp_path, f"cannot be written back in {document.codec} ({exc}); left untouched") from None
    try:
        with atomic_write(xmp_path, "wb") as handle:
            handle.write(payload)
    except OSError as exc:
        raise XmpError(xmp_path, f"cannot write sidecar ({exc.strerror or exc})") from None
    return True
