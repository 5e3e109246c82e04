"""Result writers: a Rich table for a terminal, CSV (long form), JSON (array), JSONL, bare paths.

Writers stream: each result is written as it arrives (the table, which needs every
row, is printed at the end). Every format is UTF-8 whatever the locale.

- ``paths`` (newline-terminated) and ``paths0`` (NUL-terminated, for ``xargs -0``) write a
  file name that is not valid UTF-8 as its original bytes, so it reaches the next program.
- JSON, JSONL and CSV stay valid UTF-8 for strict readers: such a name's ``path`` has
  U+FFFD where its bytes do not decode, and ``path_bytes`` holds the exact bytes in base64
  (empty or absent for every valid UTF-8 name).
- CSV rows are quoted so a line break or carriage return inside a name or label stays in
  its cell, and a text cell that begins with ``= + - @``, a tab, a carriage return or ``'``
  gets one ``'`` in front so a spreadsheet shows it as text instead of running it as a
  formula (``csv_unescape`` removes it again).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO, Any, Protocol

from sdltag.cells import clean_text, csv_escape
from sdltag.errors import SdltagError
from sdltag.paths import atomic_write
from sdltag.results import SearchHit, Tag, TagResult

__all__ = ["OutputFormat", "ReportFormat", "SearchHit", "Tag", "TagResult", "make_writer", "open_results"]


class OutputFormat(str, Enum):
    """``-f/--format`` of ``sdltag tag`` and ``sdltag search`` (a Typer choice: listed in --help, checked first)."""

    table = "table"
    csv = "csv"
    json = "json"
    jsonl = "jsonl"
    paths = "paths"  # newline-terminated
    paths0 = "paths0"  # NUL-terminated, for xargs -0
    html = "html"  # a contact sheet


class ReportFormat(str, Enum):
    """``-f/--format`` of ``sdltag eval``: its report as a table or as JSON."""

    table = "table"
    json = "json"


FORMATS = tuple(f.value for f in OutputFormat)
# --output's extension -> the format, when --format is not given
EXTENSION_FORMATS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "paths",
    ".html": "html",
    ".htm": "html",
}
CSV_HEADER = ("path", "rank", "label", "score", "kind", "path_bytes")
SEARCH_CSV_HEADER = ("rank", "path", "score", "label", "kind", "path_bytes")
logger = logging.getLogger(__name__)
SCORE_DIGITS = 4


class ResultWriter(Protocol):
    def write(self, result: TagResult) -> None: ...

    def close(self) -> None: ...


def path_text(path: Path | str) -> str:
    """A path as text; undecodable bytes stay as surrogates, written back as bytes by our streams."""
    return os.fsdecode(os.fspath(path))


def path_fields(path: Path | str) -> tuple[str, str | None]:
    """``(path, path_bytes)`` for JSON and CSV: valid UTF-8 text, plus base64 of the raw bytes when needed.

    A name that is valid UTF-8 gives ``(name, None)``; any other gets U+FFFD for each
    undecodable byte and the exact bytes in base64, so nothing is lost and strict readers
    still read the file.
    """
    raw = os.fsencode(os.fspath(path))
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), base64.b64encode(raw).decode("ascii")


def path_from_fields(path: str, path_bytes: str | None) -> bytes:
    """The exact bytes of a file name from a record's ``path`` and ``path_bytes``."""
    return base64.b64decode(path_bytes, validate=True) if path_bytes else path.encode("utf-8")


class _CsvRows:
    """CSV rows ending in ``\n``, with every cell holding a ``\r`` or ``\n`` quoted.

    (With ``lineterminator="\n"`` the csv module leaves a lone ``\r`` unquoted, which
    splits the row for most readers; with ``"\r\n"`` it quotes both, and the row's own
    terminator is then swapped for ``\n``.)
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.buffer = io.StringIO()
        self.writer = csv.writer(self.buffer, lineterminator="\r\n")

    def writerow(self, row) -> None:
        self.buffer.seek(0)
        self.buffer.truncate()
        self.writer.writerow(row)
        self.stream.write(self.buffer.getvalue()[:-2] + "\n")


def _score(value: float) -> float:
    return round(float(value), SCORE_DIGITS)


def result_record(result: TagResult) -> dict:
    """``{"path", ["path_bytes",] "tags"}``: ``path_bytes`` only for a name that is not valid UTF-8."""
    path, path_bytes = path_fields(result.path)
    record: dict = {"path": path}
    if path_bytes is not None:
        record["path_bytes"] = path_bytes
    record["tags"] = [{"label": clean_text(t.label), "score": _score(t.score), "kind": t.kind} for t in result.tags]
    return record


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
    """Long form: one row per (image, tag) with the header ``path,rank,label,score,kind,path_bytes``."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.writer = _CsvRows(stream)
        self.writer.writerow(CSV_HEADER)

    def write(self, result: TagResult) -> None:
        path, path_bytes = path_fields(result.path)
        path = csv_escape(path)
        for rank, tag in enumerate(result.tags, start=1):
            self.writer.writerow(
                (
                    path,
                    rank,
                    csv_escape(clean_text(tag.label)),
                    f"{_score(tag.score):.{SCORE_DIGITS}f}",
                    tag.kind,
                    path_bytes or "",
                )
            )

    def close(self) -> None:
        self.stream.flush()


class PathsWriter:
    """Just the paths of images that got at least one tag, each ending in ``terminator`` (for ``xargs``)."""

    def __init__(self, stream: IO[str], terminator: str = "\n") -> None:
        self.stream = stream
        self.terminator = terminator

    def write(self, result: TagResult) -> None:
        if result.tags:
            self.stream.write(path_text(result.path) + self.terminator)

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
    if fmt == "paths0":
        return PathsWriter(stream, "\0")
    if fmt == "table":
        return TableWriter(stream, title=title)
    raise SdltagError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")


def stdout_stream() -> IO[str]:
    """sys.stdout as UTF-8 with surrogateescape (Unicode and non-UTF-8 names survive pipes)."""
    import sys

    stream = sys.stdout
    try:
        # TextIO has no reconfigure; sys.stdout is a TextIOWrapper unless something replaced it
        stream.reconfigure(encoding="utf-8", errors="surrogateescape")  # type: ignore[union-attr]
    except (AttributeError, ValueError, io.UnsupportedOperation):
        pass
    return stream


@contextmanager
def open_output(path: Path | None) -> Iterator[IO[str]]:
    """``path`` written atomically (UTF-8, surrogateescape), or stdout when None or ``-``."""
    if path is None or str(path) == "-":
        yield stdout_stream()
        return
    with atomic_write(Path(path), "wb", encoding=None) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        try:
            yield text
            text.flush()
        finally:
            text.detach()


def choose_format(fmt: str | None, output: Path | None = None) -> str:
    """``--format`` when given; else from ``--output``'s extension (jsonl when unknown); else table on a terminal."""
    if fmt is not None:
        value = fmt.value if isinstance(fmt, Enum) else fmt
        if value not in FORMATS:
            raise SdltagError(f"--format {value!r} is not one of {', '.join(FORMATS)}.")
        return value
    if output is not None and str(output) != "-":
        return EXTENSION_FORMATS.get(Path(output).suffix.lower(), "jsonl")
    return "table" if sys.stdout.isatty() else "jsonl"


@dataclass
class ResultsOutput:
    """Where a tag run's results go: ``writer``; ``failed`` when ``--output`` could not be opened (stdout instead)."""

    writer: ResultWriter
    failed: bool = False

    def problem(self, where: str | Path, reason: str) -> None:
        """A file that could not be tagged: the contact sheet lists it (other formats have no place for it)."""
        listed = getattr(self.writer, "problem", None)
        if listed is not None:
            listed(where, reason)


@contextmanager
def open_results(
    fmt: str,
    output: Path | None,
    *,
    dry_run: bool = False,
    title: str = "",
    max_megapixels: float = 100.0,
) -> Iterator[ResultsOutput]:
    """A writer of ``fmt`` on ``output`` (atomically, kept only when the block ends normally) or stdout.

    An ``output`` that cannot be opened is one error line and the results go to stdout
    (``failed`` is set, the run exits 1); a dry run writes no file either. An HTML contact
    sheet puts its thumbnails beside ``output`` when too many to embed (none on stdout).
    """
    with ExitStack() as stack:
        stream: IO[str] | None = None
        failed = False
        if output is not None and dry_run:
            logger.info(f"--dry-run: not writing {output}; results go to stdout")
        elif output is not None:
            try:
                stream = stack.enter_context(open_output(output))
            except OSError as exc:
                logger.error(
                    f"{output}: cannot write the output ({exc.strerror or exc}); writing the results to stdout "
                    "instead. Pass --output somewhere writable."
                )
                failed = True
        sheet: dict[str, Any] = {}
        if fmt == "html":
            sheet = {"output": None if stream is None else output, "title": title}
            sheet.update(max_megapixels=max_megapixels)
        results = ResultsOutput(make_writer(fmt, stream or stdout_stream(), **sheet), failed)
        yield results
        results.writer.close()


def sheet_title(command: str, inputs: Sequence[Path]) -> str:
    """A contact sheet's title: the command and its first few inputs."""
    from sdltag.contact_sheet import display_path

    return f"{command} " + ", ".join(display_path(p) for p in inputs[:3]) + (", ..." if len(inputs) > 3 else "")


def thumbnail_size(fmt: str) -> int:
    """The contact sheet's thumbnails are made from the tagging decode; no other format needs one."""
    if fmt != "html":
        return 0
    from sdltag.contact_sheet import THUMB_SIZE

    return THUMB_SIZE


def write_hits(hits: list[SearchHit], fmt: str, title: str = "") -> None:
    """Search hits on stdout in ``fmt``; ``html`` is a contact sheet titled ``title``."""
    if fmt == "html":
        from sdltag.contact_sheet import write_search_sheet

        write_search_sheet(hits, stdout_stream(), title=title)
        return
    write_search_hits(hits, fmt, stdout_stream())


def _hit_records(hits: list[SearchHit]) -> list[dict]:
    records = []
    for h in hits:
        path, path_bytes = path_fields(h.path)
        record: dict = {"rank": h.rank, "path": path}
        if path_bytes is not None:
            record["path_bytes"] = path_bytes
        record.update(score=_score(h.score), label=clean_text(h.label), kind=h.kind)
        records.append(record)
    return records


def _hits_csv(records: list[dict], stream: IO[str]) -> None:
    rows = _CsvRows(stream)
    rows.writerow(SEARCH_CSV_HEADER)
    for r in records:
        rows.writerow(
            (
                r["rank"],
                csv_escape(r["path"]),
                f"{r['score']:.{SCORE_DIGITS}f}",
                csv_escape(r["label"]),
                r["kind"],
                r.get("path_bytes", ""),
            )
        )


def _hits_table(hits: list[SearchHit], stream: IO[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("image", overflow="fold")
    for hit in hits:
        table.add_row(str(hit.rank), f"{hit.score:.3f}", _display(hit.path))
    Console(file=stream, soft_wrap=False).print(table)


def _hits_jsonl(hits: list[SearchHit], stream: IO[str]) -> None:
    for record in _hit_records(hits):
        stream.write(json.dumps(record, ensure_ascii=False) + "\n")


def _hits_json(hits: list[SearchHit], stream: IO[str]) -> None:
    stream.write(json.dumps(_hit_records(hits), ensure_ascii=False, indent=2) + "\n")


def _hits_paths(hits: list[SearchHit], stream: IO[str], terminator: str = "\n") -> None:
    for hit in hits:
        stream.write(path_text(hit.path) + terminator)


_HIT_WRITERS = {
    "jsonl": _hits_jsonl,
    "json": _hits_json,
    "csv": lambda hits, stream: _hits_csv(_hit_records(hits), stream),
    "paths": _hits_paths,
    "paths0": lambda hits, stream: _hits_paths(hits, stream, "\0"),
    "table": _hits_table,
}


def write_search_hits(hits: list[SearchHit], fmt: str, stream: IO[str]) -> None:
    """Search results, best first, in ``fmt`` (table, csv, json, jsonl, paths, paths0)."""
    write = _HIT_WRITERS.get(fmt)
    if write is None:
        raise SdltagError(f"--format {fmt!r} is not one of {', '.join(_HIT_WRITERS)}.")
    write(hits, stream)
    stream.flush()
