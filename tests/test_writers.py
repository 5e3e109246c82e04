"""Writers: CSV long form, JSON array, JSONL, bare paths, table; non-UTF-8 names survive as bytes."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from sdltag.errors import SdltagError
from sdltag.writers import CSV_HEADER, SearchHit, Tag, TagResult, make_writer, open_output, write_search_hits

RESULTS = [
    TagResult(Path("/p/a.jpg"), [Tag("cat", 0.91234, "seen"), Tag("red car", 0.5, "unseen")]),
    TagResult(Path('/p/b, "quoted".jpg'), [Tag("dog", 0.25, "seen")]),
    TagResult(Path("/p/empty.jpg"), []),
]


def _render(fmt: str, results=RESULTS) -> str:
    stream = io.StringIO()
    writer = make_writer(fmt, stream)
    for result in results:
        writer.write(result)
    writer.close()
    return stream.getvalue()


def test_csv_long_form() -> None:
    rows = list(csv.reader(io.StringIO(_render("csv"))))
    assert tuple(rows[0]) == CSV_HEADER
    assert rows[1:] == [
        ["/p/a.jpg", "1", "cat", "0.9123", "seen"],
        ["/p/a.jpg", "2", "red car", "0.5000", "unseen"],
        ['/p/b, "quoted".jpg', "1", "dog", "0.2500", "seen"],
    ]


def test_json_and_jsonl() -> None:
    records = json.loads(_render("json"))
    assert records[0] == {
        "path": "/p/a.jpg",
        "tags": [
            {"label": "cat", "score": 0.9123, "kind": "seen"},
            {"label": "red car", "score": 0.5, "kind": "unseen"},
        ],
    }
    assert records[2] == {"path": "/p/empty.jpg", "tags": []}
    lines = _render("jsonl").splitlines()
    assert [json.loads(line) for line in lines] == records
    assert json.loads(_render("json", [])) == []


def test_paths_and_table() -> None:
    assert _render("paths").splitlines() == ["/p/a.jpg", '/p/b, "quoted".jpg']
    table = _render("table")
    assert "cat (0.91)" in table and "red car (0.50)*" in table and "zero-shot" in table


def test_unknown_format() -> None:
    with pytest.raises(SdltagError, match="--format"):
        make_writer("xml", io.StringIO())


def test_output_file_atomic_and_non_utf8_bytes_survive(tmp_path: Path) -> None:
    odd = Path(os.fsdecode(b"/p/caf\xe9.jpg"))
    out = tmp_path / "out.jsonl"
    with open_output(out) as stream:
        writer = make_writer("jsonl", stream)
        writer.write(TagResult(odd, [Tag("caf\u00e9 \u2615", 0.5, "unseen")]))
        writer.close()
    data = out.read_bytes()
    assert b"/p/caf\xe9.jpg" in data  # the original bytes, as a shell or xargs would need them
    assert "caf\u00e9 \u2615".encode() in data  # labels are UTF-8
    with pytest.raises(RuntimeError):
        with open_output(out) as stream:
            stream.write("partial")
            raise RuntimeError("boom")
    assert out.read_bytes() == data  # a failed write leaves the old file
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_search_hits_formats() -> None:
    hits = [
        SearchHit(1, Path("/p/a.jpg"), 0.8, "beach", "unseen"),
        SearchHit(2, Path("/p/b.jpg"), 0.3, "beach", "unseen"),
    ]
    for fmt in ("jsonl", "json", "csv", "paths", "table"):
        stream = io.StringIO()
        write_search_hits(hits, fmt, stream)
        text = stream.getvalue()
        assert "/p/a.jpg" in text and text.index("/p/a.jpg") < text.index("/p/b.jpg")
    stream = io.StringIO()
    write_search_hits(hits, "jsonl", stream)
    assert json.loads(stream.getvalue().splitlines()[0]) == {
        "rank": 1,
        "path": "/p/a.jpg",
        "score": 0.8,
        "label": "beach",
        "kind": "unseen",
    }
