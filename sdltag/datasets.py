"""Labeled image directories: the four layouts `sdltag train` and `sdltag eval` read.

- ``manifest``: ``labels.csv`` (columns ``path,labels``; labels separated by ``;``) or
  ``labels.jsonl`` (one ``{"path": ..., "labels": [...]}`` per line); paths relative to
  the folder (or absolute); a path on several rows gets the labels of all of them.
- ``sidecar``: a text file beside each image, ``IMG.jpg.txt`` or ``IMG.txt``, with labels
  separated by commas or newlines.
- ``folders``: one sub-folder per label (``DATA/dog/001.jpg``); an image found under
  several label folders with the same relative name is not merged (each file is one item).
- ``xmp``: keywords (``dc:subject``) in XMP sidecars ``IMG.xmp`` or ``IMG.jpg.xmp``, as
  Lightroom, darktable and digiKam write them.

Labels are normalised exactly as in ``--labels`` files (``sdltag.labels.normalize_label``).
Images without a label and manifest rows naming a missing file are reported (one warning
each, logged to ``sdltag.datasets``) and skipped; readability of the image itself is checked when it is decoded.
Image files are those ``sdltag tag`` reads (``sdltag.images.IMAGE_EXTENSIONS``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sdltag.errors import SdltagError
from sdltag.images import walk
from sdltag.sidecars import caption_candidates, existing_file, xmp_candidates

if TYPE_CHECKING:
    from sdltag.xmp import KeywordSet

FORMATS = ("manifest", "sidecar", "folders", "xmp")
MANIFEST_NAMES = ("labels.csv", "labels.jsonl")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabeledImage:
    """One training or evaluation example: an image file and its (normalised) labels."""

    path: Path
    labels: tuple[str, ...]


@dataclass
class LabeledDataset:
    """The usable items of a labeled folder plus what was skipped and why."""

    root: Path
    format: str
    items: list[LabeledImage]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def label_counts(self) -> Counter[str]:
        """How many images carry each label."""
        return Counter(label for item in self.items for label in item.labels)

    @property
    def labels(self) -> list[str]:
        """Every label that occurs, sorted."""
        return sorted(self.label_counts())


def normalize_labels(raw: Iterable[str], spellings: dict[str, str] | None = None) -> tuple[str, ...]:
    """Normalise as labels files are, drop empties and case-insensitive duplicates.

    ``spellings`` maps a label's case-insensitive key to the first spelling met in the
    whole folder, so "Dog" and "dog" on two images are one label.
    """
    from sdltag.labels import label_key, normalize_label

    spellings = {} if spellings is None else spellings
    out: dict[str, str] = {}
    for text in raw:
        label = normalize_label(str(text))
        if label:
            key = label_key(label)
            out.setdefault(key, spellings.setdefault(key, label))
    return tuple(out.values())


def walk_images(root: Path, report: bool = True) -> list[Path]:
    """Every image file under ``root``, sorted: the walk ``sdltag tag`` makes (``sdltag.images.walk``).

    Recursive at any depth, hidden files and folders and ``._*`` skipped, each real folder
    entered once (links to folders followed, loops walked once); a folder that cannot be
    read is one warning (unless not ``report``).
    """
    problems: list[tuple[str, str]] = []
    found = walk(os.fspath(root), problems=problems)
    if report:
        for path, reason in problems:
            logger.warning(f"{path}: {reason}, skipped")
    return sorted(Path(path) for path in found)


def _sidecar_text(image: Path) -> Path | None:
    return existing_file(caption_candidates(image))


def _sidecar_xmp(image: Path) -> Path | None:
    return existing_file(xmp_candidates(image))


def detect_format(root: Path) -> str:
    """Guess the layout of ``root``: manifest, then sidecar text, then XMP, then sub-folders."""
    if any((root / name).is_file() for name in MANIFEST_NAMES):
        return "manifest"
    images = walk_images(root, report=False)
    if any(_sidecar_text(path) is not None for path in images):
        return "sidecar"
    if any(_sidecar_xmp(path) is not None for path in images):
        return "xmp"
    if any(path.parent != root for path in images):
        return "folders"
    raise SdltagError(
        f"{root}: cannot tell how the images are labelled (no labels.csv/labels.jsonl, no IMG.txt or IMG.xmp "
        "sidecars, no label sub-folders). See `sdltag train --help` for the layouts, or pass --layout."
    )


def _manifest_csv_rows(csv_path: Path) -> list[tuple[Path, list[str]]]:
    """``labels.csv``: (path as written, labels) per row; a row without a path is one warning."""
    rows: list[tuple[Path, list[str]]] = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"path", "labels"} <= {f.strip() for f in reader.fieldnames}:
                raise SdltagError(
                    f"{csv_path}: needs a header row with columns `path,labels` (labels separated by `;`)."
                )
            for line_no, row in enumerate(reader, start=2):
                row = {(k or "").strip(): v for k, v in row.items()}
                path_text = (row.get("path") or "").strip()
                if not path_text:
                    logger.warning(f"{csv_path}:{line_no}: no path, row skipped")
                    continue
                rows.append((Path(path_text), (row.get("labels") or "").split(";")))
    except UnicodeDecodeError as exc:
        raise SdltagError(f"{csv_path}: not UTF-8 text ({exc.reason}). Save it as UTF-8.") from None
    return rows


def _manifest_jsonl_row(jsonl_path: Path, line_no: int, line: str) -> tuple[Path, list[str]] | None:
    """One ``labels.jsonl`` line as (path as written, labels); None (after one warning) when it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        logger.warning(f"{jsonl_path}:{line_no}: not valid JSON ({exc.msg}), line skipped")
        return None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        logger.warning(f'{jsonl_path}:{line_no}: needs an object with a string "path", line skipped')
        return None
    labels = record.get("labels", [])
    if isinstance(labels, str):
        labels = labels.split(";")
    if not isinstance(labels, list):
        logger.warning(f'{jsonl_path}:{line_no}: "labels" must be a list of strings, line skipped')
        return None
    return Path(record["path"]), [str(v) for v in labels]


def _manifest_jsonl_rows(jsonl_path: Path) -> list[tuple[Path, list[str]]]:
    """``labels.jsonl``: (path as written, labels) per line; a line that is not a record is one warning."""
    try:
        lines = jsonl_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise SdltagError(f"{jsonl_path}: not UTF-8 text ({exc.reason}). Save it as UTF-8.") from None
    rows = [
        _manifest_jsonl_row(jsonl_path, line_no, line)
        for line_no, line in enumerate(lines, start=1)
        if line.strip()  # blank lines are allowed
    ]
    return [row for row in rows if row is not None]


def _read_manifest(root: Path, skipped: list[tuple[Path, str]]) -> list[tuple[Path, list[str]]]:
    csv_path, jsonl_path = root / "labels.csv", root / "labels.jsonl"
    if csv_path.is_file():
        source, rows = csv_path, _manifest_csv_rows(csv_path)
    elif jsonl_path.is_file():
        source, rows = jsonl_path, _manifest_jsonl_rows(jsonl_path)
    else:
        raise SdltagError(f"{root}: no labels.csv or labels.jsonl. Write one, or pick another --layout.")
    # A path listed on several rows (one row per label, as many exports write) gets all their labels.
    resolved: dict[Path, list[str]] = {}
    for rel, labels in rows:
        path = rel if rel.is_absolute() else root / rel
        if path in resolved:
            resolved[path].extend(labels)
            continue
        if not path.is_file():
            logger.warning(f"{path}: listed in {source.name} but not found, skipped")
            skipped.append((path, "not found"))
            continue
        resolved[path] = list(labels)
    return list(resolved.items())


def _split_sidecar(text: str) -> list[str]:
    return [part for line in text.splitlines() for part in line.split(",")]


def _read_sidecar(root: Path, skipped: list[tuple[Path, str]]) -> list[tuple[Path, list[str]]]:
    rows: list[tuple[Path, list[str]]] = []
    for image in walk_images(root):
        sidecar = _sidecar_text(image)
        if sidecar is None:
            rows.append((image, []))
            continue
        try:
            text = sidecar.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning(f"{sidecar}: cannot read ({exc}), image skipped")
            skipped.append((image, "unreadable sidecar"))
            continue
        rows.append((image, _split_sidecar(text)))
    return rows


def _read_folders(root: Path, skipped: list[tuple[Path, str]]) -> list[tuple[Path, list[str]]]:
    rows: list[tuple[Path, list[str]]] = []
    for image in walk_images(root):
        rel = image.relative_to(root)
        if len(rel.parts) < 2:
            logger.warning(f"{image}: not inside a label folder, skipped")
            skipped.append((image, "no label folder"))
            continue
        rows.append((image, [rel.parts[0]]))
    return rows


# Keyword hierarchies programs write by themselves, not people: sdltag's own tags (``sdltag|beach``),
# darktable's automatic tags (``darktable|format|jpg``, ``darktable|changed``, ``darktable|exported``)
# and digiKam's internal bookkeeping (never meant to leave its database). Compared case-insensitively
# with the first level of ``lr:hierarchicalSubject`` (``|``) and ``digiKam:TagsList`` (``/``).
MACHINE_ROOTS = ("sdltag", "darktable", "_Digikam_Internal_Tags_")


def _root(value: str, separator: str) -> str:
    return value.split(separator, 1)[0].strip().casefold()


def xmp_labels(keywords: KeywordSet, machine_keywords: bool = False) -> list[str]:
    """The training labels of one sidecar's keywords: ``dc:subject`` plus the leaves of
    ``lr:hierarchicalSubject``, without what programs wrote unless ``machine_keywords``.

    Left out by default: hierarchical entries under ``MACHINE_ROOTS`` and the flat keywords
    sdltag recorded as its own additions (``sdltag:addedSubject``) that no other hierarchy
    lists. Every other flat keyword is a person's, even one sdltag also proposed.
    """
    machine = {root.casefold() for root in MACHINE_ROOTS}
    hierarchical = keywords.hierarchical
    subject = keywords.subject
    if not machine_keywords:
        hierarchical = [h for h in hierarchical if _root(h, "|") not in machine]
        people = {h.split("|")[-1].strip().casefold() for h in hierarchical}
        people |= {t.split("/")[-1].strip().casefold() for t in keywords.tags_list if _root(t, "/") not in machine}
        added = {a.casefold() for a in keywords.added} - people
        subject = [s for s in subject if s.casefold() not in added]
    leaves = [h.split("|")[-1].strip() for h in hierarchical]
    return subject + [leaf for leaf in leaves if leaf]


def _read_xmp(
    root: Path, skipped: list[tuple[Path, str]], machine_keywords: bool = False
) -> list[tuple[Path, list[str]]]:
    from sdltag.xmp import read_keyword_set

    rows: list[tuple[Path, list[str]]] = []
    for image in walk_images(root):
        sidecar = _sidecar_xmp(image)
        if sidecar is None:
            rows.append((image, []))
            continue
        try:
            keywords = read_keyword_set(sidecar)
        except SdltagError as exc:  # XmpError names the file already
            logger.warning(f"{exc}; image skipped")
            skipped.append((image, "unreadable XMP"))
            continue
        except (OSError, ValueError, SyntaxError) as exc:  # ElementTree's ParseError is a SyntaxError
            logger.warning(f"{sidecar}: cannot read XMP ({exc}), image skipped")
            skipped.append((image, "unreadable XMP"))
            continue
        rows.append((image, xmp_labels(keywords, machine_keywords)))
    return rows


def _not_text(label: str) -> bool:
    """True for a label holding the stand-ins Python uses for bytes that are not UTF-8 (lone surrogates)."""
    try:
        label.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_READERS = {"manifest": _read_manifest, "sidecar": _read_sidecar, "folders": _read_folders, "xmp": _read_xmp}


def read_labeled_dir(
    root: Path | str,
    format: str = "auto",
    *,
    exclude: Iterable[str] = (),
    machine_keywords: bool = False,
) -> LabeledDataset:
    """Read a labeled folder in the given layout (``auto`` detects it).

    ``exclude`` globs (``--exclude``, matched as ``sdltag.excludes`` says, relative to ``root``)
    leave the files they match out. XMP keywords that programs wrote (``xmp_labels``) are
    left out unless ``machine_keywords``. A problem with a single file is one warning (logged to
    ``sdltag.datasets``) and the file is skipped; a label that is not valid text (a folder name that is not
    UTF-8) is left out with one line; a folder that yields no labelled image raises ``SdltagError``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SdltagError(f"{root}: not a folder. Pass the folder holding the labelled images.")
    if format == "auto":
        format = detect_format(root)
    if format not in _READERS:
        raise SdltagError(f"unknown --layout {format!r}; choose auto, {', '.join(FORMATS)}")
    skipped: list[tuple[Path, str]] = []
    items: list[LabeledImage] = []
    spellings: dict[str, str] = {}
    from sdltag.excludes import Excluder

    excluder = Excluder(exclude)
    rows = _read_xmp(root, skipped, machine_keywords) if format == "xmp" else _READERS[format](root, skipped)
    for path, raw in rows:
        if excluder and excluder.excluded(os.fspath(path), os.fspath(root)):
            continue
        labels = normalize_labels(raw, spellings)
        bad = [label for label in labels if _not_text(label)]
        if bad:
            labels = tuple(label for label in labels if not _not_text(label))
            shown = ", ".join(repr(os.fsencode(label))[1:] for label in bad)
            what = "skipped" if not labels else "that label left out"
            logger.warning(f"{path}: label {shown} is not valid UTF-8 (rename the folder or file), {what}")
            if not labels:
                skipped.append((path, "label not UTF-8"))
                continue
        if not labels:
            logger.warning(f"{path}: no label, skipped")
            skipped.append((path, "no label"))
            continue
        items.append(LabeledImage(path=path, labels=labels))
    if not items:
        raise SdltagError(
            f"{root}: no labelled image found in the {format} layout ({len(skipped)} skipped). "
            "Check the labels files or pass another --layout."
        )
    return LabeledDataset(root=root, format=format, items=items, skipped=skipped)
