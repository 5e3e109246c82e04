"""Label vocabularies: labels files (``--labels FILE``) and inline labels (``--label TEXT``).

A labels file is UTF-8 (a byte-order mark is accepted), one label per line::

    # a comment line
    cat
    golden retriever          # an inline comment starts at whitespace + "#"
    tabby: a striped domestic cat     <- "label: description": the description is embedded
    beach<TAB>0.4                     <- a tab, then a number: this label's own threshold

A colon followed by whitespace starts a description (so ``12:30`` and ``C#`` stay
labels). A tab followed by a number at the end of a line (before any comment) is that
label's threshold: ``sdltag tag`` emits the label only when it scores at least that (a
label that should end in a number is written with a space instead of the tab). Surrounding
whitespace is stripped and inner runs of whitespace collapse to
one space. Case-insensitive duplicates are collapsed (the first spelling wins) with
one warning naming them all. Anything that cannot be a label is refused with an
``SdltagError`` naming the file and line. Labels end up in XMP sidecars, so that
includes a character XML 1.0 cannot hold (C0 control characters other than tab, line
feed and carriage return; DEL; surrogates; U+FFFE and U+FFFF), and a ``--label`` that
is not valid UTF-8.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sdltag.errors import SdltagError

logger = logging.getLogger(__name__)

MAX_LABEL_CHARS = 200
MAX_DESCRIPTION_CHARS = 1000
INLINE_SOURCE = "--label"

# "label: description" -- the first colon followed by whitespace separates them.
_DESCRIPTION = re.compile(r"^(?P<label>.*?):(?:\s+(?P<text>.*))?$", re.DOTALL)
_COMMENT = re.compile(r"(^|\s)#.*$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Not characters of XML 1.0 (besides the control characters above): a sidecar holding them is not XML.
_NOT_XML = re.compile("[\ud800-\udfff\ufffe\uffff]")
# What Python puts in argv for bytes that are not valid UTF-8 (surrogateescape).
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
# "label<TAB>0.4": a per-label threshold (labels files only).
_THRESHOLD = re.compile(r"\t[ \t]*(?P<value>[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)[ \t]*$")


@dataclass(frozen=True)
class LabelEntry:
    """One label of a vocabulary.

    ``label`` is the display label as the user spelled it, ``text`` is what gets
    embedded (the description after ``label:``, else the label itself), ``source`` is
    ``"FILE:LINE"`` or ``"--label"`` for messages.
    """

    label: str
    text: str
    source: str
    threshold: float | None = None  # a labels file's ``label<TAB>0.4``: emitted only at this score or above

    @property
    def key(self) -> str:
        """The case-insensitive identity used to collapse duplicates."""
        return label_key(self.label)


def normalize_label(text: str) -> str:
    """Strip surrounding whitespace and collapse inner whitespace to single spaces."""
    return " ".join(text.split())


def label_key(label: str) -> str:
    """Case-insensitive comparison key of a label (normalised, case-folded)."""
    return normalize_label(label).casefold()


def parse_label_line(
    line: str, source: str, *, strip_comments: bool = True, allow_threshold: bool = False
) -> LabelEntry | None:
    """Parse one line (or one ``--label`` value); None for a blank or comment line.

    With ``allow_threshold`` (labels files), a tab and a number ending the line are the label's
    threshold. Raises ``SdltagError`` naming ``source`` for anything that cannot be a label.
    """
    raw = line
    if strip_comments:
        raw = _COMMENT.sub("", raw)
    threshold: float | None = None
    found = _THRESHOLD.search(raw) if allow_threshold else None
    if found is not None:
        threshold = float(found.group("value"))
        if not math.isfinite(threshold):
            raise SdltagError(f"{source}: the threshold {found.group('value')} is not a finite number. Write e.g. 0.4.")
        raw = raw[: found.start()]
        if not raw.strip():
            raise SdltagError(
                f"{source}: the threshold {found.group('value')} has no label before it. Write `label<TAB>0.4`."
            )
    raw = raw.strip()
    if not raw:
        return None
    if _CONTROL.search(raw):
        raise SdltagError(f"{source}: the label contains a control character ({raw!r}). Remove it.")
    bad = _NOT_XML.search(raw)
    if bad is not None:
        raise SdltagError(
            f"{source}: the label contains U+{ord(bad.group()):04X}, which XML (and so an XMP sidecar) cannot "
            f"hold ({raw!r}). Remove it."
        )
    match = _DESCRIPTION.match(raw)
    description: str | None = None
    if match:
        label = normalize_label(match.group("label"))
        description = normalize_label(match.group("text") or "")
        if not label:
            raise SdltagError(
                f"{source}: {raw!r} has a description but no label before the colon. Write `label: description`."
            )
        if not description:
            raise SdltagError(
                f"{source}: {raw!r} ends with a colon but has no description. "
                "Remove the colon or write `label: description`."
            )
    else:
        label = normalize_label(raw)
    if len(label) > MAX_LABEL_CHARS:
        raise SdltagError(
            f"{source}: the label is {len(label)} characters long, more than the {MAX_LABEL_CHARS} allowed "
            f"({label[:40]!r}...). Shorten it, or put the long text after the label as `label: description`."
        )
    if description is not None and len(description) > MAX_DESCRIPTION_CHARS:
        raise SdltagError(
            f"{source}: the description of {label!r} is {len(description)} characters long, more than the "
            f"{MAX_DESCRIPTION_CHARS} allowed. Shorten it."
        )
    return LabelEntry(
        label=label, text=description if description is not None else label, source=source, threshold=threshold
    )


def read_labels_file(path: Path) -> list[LabelEntry]:
    """Read one labels file (duplicates are kept here; ``build_vocabulary`` collapses them)."""
    path = Path(path).expanduser()
    fix = "Pass a UTF-8 text file with one label per line."
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SdltagError(f"{path}: labels file does not exist. Check the --labels path.") from None
    except IsADirectoryError:
        raise SdltagError(f"{path}: is a folder, not a labels file. {fix}") from None
    except PermissionError:
        raise SdltagError(f"{path}: labels file cannot be read (permission denied). Check its permissions.") from None
    except OSError as exc:
        raise SdltagError(f"{path}: labels file cannot be read ({exc.strerror or exc}). {fix}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_number = data[: exc.start].count(b"\n") + 1
        raise SdltagError(
            f"{path}:{line_number}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}). "
            "Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None
    entries: list[LabelEntry] = []
    # Split on \n only (after normalising \r\n and \r) so a stray U+2028 stays inside its line.
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        entry = parse_label_line(line, f"{path}:{number}", allow_threshold=True)
        if entry is not None:
            entries.append(entry)
    return entries


def check_utf8_argument(value: str, source: str) -> None:
    """Refuse a command-line value holding bytes that are not UTF-8 (argv keeps them as surrogate escapes)."""
    escaped = _ESCAPED_BYTE.search(value)
    if escaped is not None:
        shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise SdltagError(
            f"{source}: '{shown}' is not valid UTF-8 (byte 0x{ord(escaped.group()) - 0xDC00:02x}). "
            "Pass the label as UTF-8 text (check the terminal's or script's encoding)."
        )


def parse_inline_label(value: str) -> LabelEntry:
    """Parse one ``--label`` value (``label`` or ``label: description``; no comments)."""
    check_utf8_argument(value, INLINE_SOURCE)
    entry = parse_label_line(value, INLINE_SOURCE, strip_comments=False)
    if entry is None:
        raise SdltagError(f"{INLINE_SOURCE} {value!r}: the label is empty. Give a non-empty label.")
    return entry


def dedupe(entries: Sequence[LabelEntry]) -> list[LabelEntry]:
    """Collapse case-insensitive duplicates (first wins), with one warning naming all of them."""
    first: dict[str, LabelEntry] = {}
    duplicates: list[tuple[LabelEntry, LabelEntry]] = []
    for entry in entries:
        kept = first.get(entry.key)
        if kept is None:
            first[entry.key] = entry
        else:
            duplicates.append((entry, kept))
    if duplicates:
        shown = [
            f"{dup.label!r} ({dup.source}, same as {kept.label!r} at {kept.source})" for dup, kept in duplicates[:10]
        ]
        more = f", and {len(duplicates) - 10} more" if len(duplicates) > 10 else ""
        logger.warning(
            f"ignored {len(duplicates)} duplicate label{'s' if len(duplicates) != 1 else ''} "
            f"(case-insensitive; the first spelling is kept): {', '.join(shown)}{more}"
        )
    return list(first.values())


def build_vocabulary(
    files: Sequence[Path] = (),
    inline: Sequence[str] = (),
    *,
    allow_empty: bool = False,
) -> list[LabelEntry]:
    """The user's vocabulary: every labels file in order, then the ``--label`` values.

    Duplicates are collapsed case-insensitively (first spelling wins, one logged warning).
    An empty result is refused unless ``allow_empty``.
    """
    entries: list[LabelEntry] = []
    for path in files:
        entries.extend(read_labels_file(Path(path)))
    for value in inline:
        entries.append(parse_inline_label(value))
    if not entries and not allow_empty:
        if files:
            names = ", ".join(str(Path(p)) for p in files)
            raise SdltagError(f"{names}: no labels found (every line is blank or a comment). Add one label per line.")
        raise SdltagError("no labels given. Pass a labels file (--labels FILE) or --label TEXT.")
    return dedupe(entries)
