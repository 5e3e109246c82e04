"""Keywords in XMP sidecars: read them (training data) and merge sdltag's tags into them.

What photo tools read (see PHOTO-TOOLS.md): ``dc:subject`` (an ``rdf:Bag`` of flat
keywords), ``lr:hierarchicalSubject`` (``root|leaf``, Lightroom, darktable) and
``digiKam:TagsList`` (``root/leaf``). sdltag writes all three with its entries under
one root (``sdltag`` by default), merges with what is there (case-insensitive union),
removes only its own root's entries on a re-run, leaves every other property and
namespace in place, and replaces the file atomically.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from sdltag.errors import SdltagError
from sdltag.paths import atomic_write

X_NS = "adobe:ns:meta/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC_NS = "http://purl.org/dc/elements/1.1/"
LR_NS = "http://ns.adobe.com/lightroom/1.0/"
DIGIKAM_NS = "http://www.digikam.org/ns/1.0/"
_PREFIXES = {"x": X_NS, "rdf": RDF_NS, "dc": DC_NS, "lr": LR_NS, "digiKam": DIGIKAM_NS}

SUBJECT = f"{{{DC_NS}}}subject"
HIERARCHICAL = f"{{{LR_NS}}}hierarchicalSubject"
TAGS_LIST = f"{{{DIGIKAM_NS}}}TagsList"
DESCRIPTION = f"{{{RDF_NS}}}Description"
LI = f"{{{RDF_NS}}}li"
CONTAINERS = (f"{{{RDF_NS}}}Bag", f"{{{RDF_NS}}}Seq", f"{{{RDF_NS}}}Alt")
XPACKET_BEGIN = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
XPACKET_END = '\n<?xpacket end="w"?>\n'
NAMINGS = ("ext", "adobe")


class XmpError(SdltagError):
    """A sidecar that exists but cannot be parsed; it is never overwritten."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}", exit_code=1)
        self.path = path
        self.reason = reason


for _prefix, _uri in _PREFIXES.items():
    ET.register_namespace(_prefix, _uri)


def sidecar_path(image_path: Path, naming: str = "ext") -> Path:
    """``IMG.jpg.xmp`` (naming ``ext``: darktable, digiKam) or ``IMG.xmp`` (``adobe``: Lightroom)."""
    if naming == "adobe":
        return image_path.with_suffix(".xmp")
    if naming != "ext":
        raise SdltagError(f"--xmp-naming {naming!r} is not one of {', '.join(NAMINGS)}.")
    return image_path.with_name(image_path.name + ".xmp")


def _parse(path: Path) -> ET.Element:
    """Parse a sidecar, registering its own namespace prefixes so they survive a rewrite."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise XmpError(path, f"cannot read sidecar ({exc.strerror or exc})") from None
    try:
        for _event, (prefix, uri) in ET.iterparse(io.BytesIO(data), events=("start-ns",)):
            if prefix and uri not in _PREFIXES.values():
                try:
                    ET.register_namespace(prefix, uri)
                except ValueError:  # prefixes like ns0 are reserved by ElementTree
                    pass
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise XmpError(path, f"not valid XML ({exc}); left untouched, fix or remove it") from None
    return root


def _rdf(root: ET.Element) -> ET.Element | None:
    if root.tag == f"{{{RDF_NS}}}RDF":
        return root
    return root.find(f".//{{{RDF_NS}}}RDF")


def _items(root: ET.Element, prop: str) -> list[str]:
    """The ``rdf:li`` texts of every ``prop`` (rdf:Bag/Seq/Alt) in any ``rdf:Description``."""
    values: list[str] = []
    for element in root.iter(prop):
        for container in element:
            if container.tag in CONTAINERS:
                values.extend((li.text or "").strip() for li in container.iter(LI))
    return [v for v in values if v]


def _dedupe(values: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for value in values:
        key = value.casefold()
        if key not in seen:
            seen.add(key)
            out.append(value)
    return out


def read_keywords(xmp_path: Path) -> list[str]:
    """The keywords of a sidecar: ``dc:subject`` plus the leaves of ``lr:hierarchicalSubject``,
    case-insensitively de-duplicated, in file order. Raises ``XmpError`` for a broken file."""
    root = _parse(Path(xmp_path))
    subject = _items(root, SUBJECT)
    leaves = [value.split("|")[-1].strip() for value in _items(root, HIERARCHICAL)]
    return _dedupe(subject + [leaf for leaf in leaves if leaf])


@dataclass(frozen=True)
class KeywordSet:
    """The three keyword properties of a sidecar."""

    subject: list[str]
    hierarchical: list[str]
    tags_list: list[str]


def merge_keywords(existing: KeywordSet, keywords: list[str], root: str = "sdltag") -> KeywordSet:
    """Replace ``root``'s entries with ``keywords``, keeping everything else (case-insensitive union).

    A flat ``dc:subject`` keyword is dropped on a re-run only when it was a leaf of
    one of our old ``root|`` entries and no other hierarchy lists it.
    """
    lr_prefix, dk_prefix = f"{root}|".casefold(), f"{root}/".casefold()
    ours_h = [h for h in existing.hierarchical if h.casefold().startswith(lr_prefix)]
    ours_t = [t for t in existing.tags_list if t.casefold().startswith(dk_prefix)]
    other_h = [h for h in existing.hierarchical if h not in ours_h]
    other_t = [t for t in existing.tags_list if t not in ours_t]
    old_leaves = {h.split("|")[-1].casefold() for h in ours_h} | {t.split("/")[-1].casefold() for t in ours_t}
    other_leaves = {h.split("|")[-1].casefold() for h in other_h} | {t.split("/")[-1].casefold() for t in other_t}
    subject = [s for s in existing.subject if s.casefold() not in old_leaves or s.casefold() in other_leaves]
    keywords = _dedupe([k.strip() for k in keywords if k.strip()])
    return KeywordSet(
        subject=_dedupe(subject + keywords),
        hierarchical=_dedupe(other_h + [f"{root}|{k.replace('|', '-')}" for k in keywords]),
        tags_list=_dedupe(other_t + [f"{root}/{k.replace('/', '-')}" for k in keywords]),
    )


def _same(a: KeywordSet, b: KeywordSet) -> bool:
    """Equal up to order and case: a re-run that picks the same tags leaves the file alone."""

    def norm(values: list[str]) -> list[str]:
        return sorted(v.casefold() for v in values)

    return all(
        norm(x) == norm(y)
        for x, y in ((a.subject, b.subject), (a.hierarchical, b.hierarchical), (a.tags_list, b.tags_list))
    )


def _skeleton() -> ET.Element:
    meta = ET.Element(f"{{{X_NS}}}xmpmeta")
    rdf = ET.SubElement(meta, f"{{{RDF_NS}}}RDF")
    ET.SubElement(rdf, DESCRIPTION, {f"{{{RDF_NS}}}about": ""})
    return meta


def _set_property(root: ET.Element, prop: str, container: str, values: list[str]) -> None:
    """Put ``values`` in ``prop`` (in the Description that already has it, else the first one)."""
    rdf = _rdf(root)
    descriptions = list(root.iter(DESCRIPTION))
    if rdf is None or not descriptions:
        raise ValueError("sidecar has no rdf:RDF/rdf:Description")
    target = next((d for d in descriptions if d.find(prop) is not None), descriptions[0])
    for description in descriptions:
        for element in description.findall(prop):
            description.remove(element)
    if not values:
        return
    element = ET.SubElement(target, prop)
    bag = ET.SubElement(element, f"{{{RDF_NS}}}{container}")
    for value in values:
        ET.SubElement(bag, LI).text = value


def write_keywords(xmp_path: Path, keywords: list[str], *, root: str = "sdltag", dry_run: bool = False) -> bool:
    """Merge ``keywords`` into the sidecar at ``xmp_path`` (created if missing), atomically.

    Returns True when the file was (or, with ``dry_run``, would be) changed; an
    identical re-run changes nothing. A sidecar that cannot be parsed raises
    ``XmpError`` and is left as it is.
    """
    xmp_path = Path(xmp_path)
    if xmp_path.exists():
        tree_root = _parse(xmp_path)
        if _rdf(tree_root) is None or next(tree_root.iter(DESCRIPTION), None) is None:
            rdf = _rdf(tree_root)
            if rdf is None:
                raise XmpError(xmp_path, "has no rdf:RDF element; left untouched, fix or remove it")
            ET.SubElement(rdf, DESCRIPTION, {f"{{{RDF_NS}}}about": ""})
    else:
        tree_root = _skeleton()
    existing = KeywordSet(
        subject=_items(tree_root, SUBJECT),
        hierarchical=_items(tree_root, HIERARCHICAL),
        tags_list=_items(tree_root, TAGS_LIST),
    )
    merged = merge_keywords(existing, keywords, root=root)
    if xmp_path.exists() and _same(merged, existing):
        return False
    if dry_run:
        return True
    _set_property(tree_root, SUBJECT, "Bag", merged.subject)
    _set_property(tree_root, HIERARCHICAL, "Bag", merged.hierarchical)
    _set_property(tree_root, TAGS_LIST, "Seq", merged.tags_list)
    ET.indent(tree_root, space=" ")
    text = XPACKET_BEGIN + ET.tostring(tree_root, encoding="unicode") + XPACKET_END
    try:
        with atomic_write(xmp_path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise XmpError(xmp_path, f"cannot write sidecar ({exc.strerror or exc})") from None
    return True
