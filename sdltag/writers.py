"""Result writers: a Rich table for a terminal, CSV (long form), JSON (array), JSONL, bare paths.

Writers stream: each result is written as it arrives (the table, which needs every
row, is printed at the end). Paths are written with ``surrogateescape`` so a file
name that is not valid UTF-8 comes out as its original bytes and survives a pipe
to ``xargs``; every other name is UTF-8 whatever the locale.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from sdltag.errors import SdltagError
from sdltag.paths import atomic_write

TAG_FORMATS = ("table", "csv", "json", "jsonl", "paths")
CSV_HEADER = ("path", "rank", "label", "score", "kind")
SEARCH_CSV_HEADER = ("rank", "path", "score", "label", "kind")
SCORE_DIGITS = 4


@dataclass(frozen=True)
class Tag:
    """One label of one image: ``kind`` is ``seen`` (the model was trained on it) or ``unseen``."""

    label: str
    score: float
    kind: str


@dataclass
class TagResult:
    """The tags of one image, best first."""

    path: Path
    tags: list[Tag] = field(default_factory=list)
    thumbnail: bytes | None = field(default=None, repr=False)  # a small JPEG from the decode (HTML sheets)


@dataclass(frozen=True)
class SearchHit:
    """One image ranked by a query label's score."""

    rank: int
    path: Path
    score: float
    label: str
    kind: str


class ResultWriter(Protocol):
    def write(self, result: TagResult) -> None: ...

    def close(self) -> None: ...


def path_text(path: Path | str) -> str:
    """A path as text; undecodable bytes stay as surrogates, written back as bytes by our streams."""
    return os.fsdecode(os.fspath(path))


def _score(value: float) -> float:
    return round(float(value), SCORE_DIGITS)


def result_record(result: TagResult) -> dict:
    return {
        "path": path_text(result.path),
        "tags": [{"label": t.label, "score": _score(t.score), "kind": t.kind} for t in result.tags],
    }


class JsonlWriter:
    """One ``{"path", "tags"}`` object per line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, result: TagResult) -> None:
        self.stream.write(json.dumps(result_record(result), ensure_ascii=False) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class JsonWriter:
    """A JSON array of ``{"path", "tags"}`` objects, streamed element by element."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.count = 0

    def write(self, result: TagResult) -> None:
        self.stream.write(
            ("[\n  " if self.count == 0 else ",\n  ") + json.dumps(result_record(result), ensure_ascii=False)
        )
        self.count += 1

    def close(self) -> None:
        self.stream.write("[]\n" if self.count == 0 else "\n]\n")
        self.stream.flush()


class CsvWriter:
    """Long form: one row per (image, tag) with the header ``path,rank,label,score,kind``."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.writer = csv.writer(stream, lineterminator="\n")
        self.writer.writerow(CSV_HEADER)

    def write(self, result: TagResult) -> None:
        path = path_text(result.path)
        for rank, tag in enumerate(result.tags, start=1):
            self.writer.writerow((path, rank, tag.label, f"{_score(tag.score):.{SCORE_DIGITS}f}", tag.kind))

    def close(self) -> None:
        self.stream.flush()


class PathsWriter:
    """Just the paths of images that got at least one tag, one per line (for ``xargs``)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, result: TagResult) -> None:
        if result.tags:
            self.stream.write(path_text(result.path) + "\n")

    def close(self) -> None:
        self.stream.flush()


class TableWriter:
    """A Rich table (image, tags with scores), printed when the run ends."""

    def __init__(self, stream: IO[str], title: str = "") -> None:
        self.stream = stream
        self.rows: list[TagResult] = []
        self.title = title

    def write(self, result: TagResult) -> None:
        self.rows.append(result)

    def close(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=self.title or None, show_lines=False)
        table.add_column("image", overflow="fold")
        table.add_column("tags (score)", overflow="fold")
        for result in self.rows:
            tags = ", ".join(f"{t.label} ({t.score:.2f})" + ("*" if t.kind == "unseen" else "") for t in result.tags)
            table.add_row(_display(result.path), tags or "-")
        console = Console(file=self.stream, soft_wrap=False)
        console.print(table)
        if any(t.kind == "unseen" for r in self.rows for t in r.tags):
            console.print("* zero-shot (unseen) label")


def _display(path: Path) -> str:
    """A path for a terminal: relative to the working folder when under it, undecodable bytes shown as \\xNN."""
    text = path_text(path)
    try:
        rel = os.path.relpath(text)
        if not rel.startswith(".."):
            text = rel
    except ValueError:
        pass
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def make_writer(fmt: str, stream: IO[str], title: str = "", output: Path | None = None, **sheet) -> ResultWriter:
    """The writer of ``fmt`` on ``stream``; ``output`` (the file ``stream`` becomes) names an HTML sheet's folder."""
    if fmt == "html":
        from sdltag.contact_sheet import ContactSheetWriter

        return ContactSheetWriter(stream, output, title=title, **sheet)
    if fmt == "jsonl":
        return JsonlWriter(stream)
    if fmt == "json":
        return JsonWriter(stream)
    if fmt == "csv":
        return CsvWriter(stream)
    if fmt == "paths":
        return PathsWriter(stream)
    if fmt == "table":
        return TableWriter(stream, title=title)
    raise SdltagError(f"--format {fmt!r} is not one of {', '.join(TAG_FORMATS)}.")


def stdout_stream() -> IO[str]:
    """sys.stdout as UTF-8 with surrogateescape (Unicode and non-UTF-8 names survive pipes)."""
    import sys

    stream = sys.stdout
    try:
        stream.reconfigure(encoding="utf-8", errors="surrogateescape")  # type: ignore[union-attr]
    except (AttributeError, ValueError, io.UnsupportedOperation):
        pass
    return stream


@contextmanager
def open_output(path: Path | None) -> Iterator[IO[str]]:
    """``path`` written atomically (UTF-8, surrogateescape), or stdout when None."""
    if path is None:
        yield stdout_stream()
        return
    with atomic_write(Path(path), "wb", encoding=None) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        try:
            yield text
            text.flush()
        finally:
            text.detach()


def write_search_hits(hits: list[SearchHit], fmt: str, stream: IO[str]) -> None:
    """Search results, best first, in ``fmt`` (table, csv, json, jsonl, paths)."""
    records = [
        {"rank": h.rank, "path": path_text(h.path), "score": _score(h.score), "label": h.label, "kind": h.kind}
        for h in hits
    ]
    if fmt == "jsonl":
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif fmt == "json":
        stream.write(json.dumps(records, ensure_ascii=False, indent=2) + "\n")
    elif fmt == "csv":
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(SEARCH_CSV_HEADER)
        for r in records:
            writer.writerow((r["rank"], r["path"], f"{r['score']:.{SCORE_DIGITS}f}", r["label"], r["kind"]))
    elif fmt == "paths":
        for record in records:
            stream.write(record["path"] + "\n")
    elif fmt == "table":
        from rich.console import Console
        from rich.table import Table

        table = Table()
        table.add_column("#", justify="right")
        table.add_column("score", justify="right")
        table.add_column("image", overflow="fold")
        for hit in hits:
            table.add_row(str(hit.rank), f"{hit.score:.3f}", _display(hit.path))
        Console(file=stream, soft_wrap=False).print(table)
    else:
        raise SdltagError(f"--format {fmt!r} is not one of {', '.join(TAG_FORMATS)}.")
    stream.flush()
