"""Writers: CSV long form, JSON array, JSONL, bare paths, table; non-UTF-8 names survive as bytes."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdltag.cells import csv_unescape
from sdltag.errors import SdltagError
from sdltag.writers import (
    CSV_HEADER,
    SearchHit,
    Tag,
    TagResult,
    make_writer,
    open_output,
    path_from_fields,
    write_search_hits,
)

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
        ["/p/a.jpg", "1", "cat", "0.9123", "seen", ""],
        ["/p/a.jpg", "2", "red car", "0.5000", "unseen", ""],
        ['/p/b, "quoted".jpg', "1", "dog", "0.2500", "seen", ""],
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
    record = json.loads(data.decode("utf-8"))  # strict UTF-8: one odd name does not spoil the file
    assert record["path"] == "/p/caf\ufffd.jpg"
    assert base64.b64decode(record["path_bytes"]) == b"/p/caf\xe9.jpg"  # the exact bytes, losslessly
    assert record["tags"][0]["label"] == "caf\u00e9 \u2615"
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


# -- interop: line breaks, formulas, names that are not UTF-8 --------------------------------------

ODD = Path(os.fsdecode(b"/p/caf\xe9\r\nb.jpg"))


def _bytes_out(fmt: str, results) -> bytes:
    """What a writer puts on a real output stream (UTF-8, surrogateescape, as ``open_output``)."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
    writer = make_writer(fmt, stream)
    for result in results:
        writer.write(result)
    writer.close()
    stream.flush()
    return raw.getvalue()


def _csv_rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


def test_csv_line_breaks_stay_inside_their_cell() -> None:
    results = [
        TagResult(Path("/p/a\rb.jpg"), [Tag("x\ry", 0.5, "seen")]),
        TagResult(Path("/p/c\nd.jpg"), [Tag("z", 0.5, "seen")]),
    ]
    text = _render("csv", results)
    assert text.count("\n") == 3 + 1  # three rows ending in \n, plus the \n inside a quoted name
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert [row[:3] for row in rows[1:]] == [["/p/a\rb.jpg", "1", "x\ry"], ["/p/c\nd.jpg", "1", "z"]]
    stream = io.StringIO()
    write_search_hits([SearchHit(1, Path("/p/a\rb.jpg"), 0.5, "q", "seen")], "csv", stream)
    assert list(csv.reader(io.StringIO(stream.getvalue(), newline="")))[1][1] == "/p/a\rb.jpg"


def test_csv_cells_that_look_like_formulas_are_neutralised() -> None:
    labels = ['=HYPERLINK("http://x")', "+1", "-2", "@SUM(A1)", "\tx", "'quoted", "plain", "a=b"]
    result = TagResult(Path("=cmd|' /C calc'!A0.jpg"), [Tag(label, 0.5, "unseen") for label in labels])
    rows = _csv_rows(_bytes_out("csv", [result]))[1:]
    assert {row[0] for row in rows} == {"'=cmd|' /C calc'!A0.jpg"}
    assert [row[2] for row in rows] == ["'" + label for label in labels[:6]] + ["plain", "a=b"]
    assert [csv_unescape(row[2]) for row in rows] == labels
    # numbers are left as numbers: a negative raw score is not text
    raw = _csv_rows(_bytes_out("csv", [TagResult(Path("/p/a.jpg"), [Tag("cat", -1.5, "seen")])]))
    assert raw[1][3] == "-1.5000"
    stream = io.StringIO()
    write_search_hits([SearchHit(1, Path("/p/a.jpg"), 0.5, "=1+1", "unseen")], "csv", stream)
    assert list(csv.reader(io.StringIO(stream.getvalue())))[1][3] == "'=1+1"


def test_non_utf8_name_keeps_every_format_strict_utf8_and_lossless() -> None:
    results = [TagResult(ODD, [Tag("cat", 0.5, "seen")]), TagResult(Path("/p/ok.jpg"), [Tag("dog", 0.5, "seen")])]
    raw_name = os.fsencode(ODD)
    for fmt in ("json", "jsonl"):
        data = _bytes_out(fmt, results)
        text = data.decode("utf-8")  # strict: raises on the old raw bytes
        records = json.loads(text) if fmt == "json" else [json.loads(line) for line in text.split("\n") if line]
        assert records[0]["path"] == "/p/caf\ufffd\r\nb.jpg"
        assert path_from_fields(records[0]["path"], records[0].get("path_bytes")) == raw_name
        assert "path_bytes" not in records[1]
    rows = _csv_rows(_bytes_out("csv", results))
    assert rows[0][-1] == "path_bytes"
    assert base64.b64decode(rows[1][5]) == raw_name and rows[2][5] == ""
    # paths and paths0 are for the next program: the exact bytes
    assert _bytes_out("paths", results) == raw_name + b"\n/p/ok.jpg\n"
    assert _bytes_out("paths0", results) == raw_name + b"\0/p/ok.jpg\0"


def test_search_hits_paths0_and_non_utf8() -> None:
    hits = [SearchHit(1, ODD, 0.8, "beach", "unseen"), SearchHit(2, Path("/p/b c.jpg"), 0.3, "beach", "unseen")]
    for fmt, check in [
        ("paths0", lambda data: data == os.fsencode(ODD) + b"\0/p/b c.jpg\0"),
        (
            "jsonl",
            lambda data: (
                base64.b64decode(json.loads(data.decode("utf-8").split("\n")[0])["path_bytes"]) == os.fsencode(ODD)
            ),
        ),
        (
            "json",
            lambda data: (
                json.loads(data.decode("utf-8"))[1]
                == {"rank": 2, "path": "/p/b c.jpg", "score": 0.3, "label": "beach", "kind": "unseen"}
            ),
        ),
    ]:
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        write_search_hits(hits, fmt, stream)
        stream.flush()
        assert check(raw.getvalue()), fmt


def test_output_dash_is_stdout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with open_output(Path("-")) as stream:
        stream.write("x\n")
    assert capsys.readouterr().out == "x\n" and list(tmp_path.iterdir()) == []


_NAMES = st.lists(
    st.binary(min_size=1, max_size=24).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")),
    min_size=1,
    max_size=4,
)
# What the labels parser lets through: no C0 controls but tab/LF/CR, no DEL, no surrogates, no U+FFFE/U+FFFF
_LABEL = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"), exclude_characters="\ufffe\uffff")
    | st.sampled_from(list("=+-@'\t\r\n,\" ")),
    min_size=1,
    max_size=20,
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(names=_NAMES, labels=st.lists(_LABEL, min_size=0, max_size=3))
def test_round_trip_through_csv_and_json_readers(names: list[bytes], labels: list[str]) -> None:
    """Any file names and labels: strict UTF-8 readers get back every name's bytes and every label."""
    results = [
        TagResult(Path(os.fsdecode(b"/p/" + name)), [Tag(label, 0.5, "unseen") for label in labels]) for name in names
    ]
    expected = [(b"/p/" + name, labels) for name in names]
    for fmt in ("json", "jsonl"):
        text = _bytes_out(fmt, results).decode("utf-8")
        records = json.loads(text) if fmt == "json" else [json.loads(line) for line in text.split("\n") if line]
        got = [(path_from_fields(r["path"], r.get("path_bytes")), [t["label"] for t in r["tags"]]) for r in records]
        assert got == expected, fmt
    rows = _csv_rows(_bytes_out("csv", results))
    assert tuple(rows[0]) == CSV_HEADER and all(len(row) == len(CSV_HEADER) for row in rows)
    got_rows = [(path_from_fields(csv_unescape(r[0]), r[5] or None), int(r[1]), csv_unescape(r[2])) for r in rows[1:]]
    assert got_rows == [(path, rank, label) for path, ls in expected for rank, label in enumerate(ls, start=1)]
    stream = io.BytesIO(_bytes_out("paths0", results))
    assert stream.getvalue().split(b"\0")[:-1] == ([path for path, _ in expected] if labels else [])
