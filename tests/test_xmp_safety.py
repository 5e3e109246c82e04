"""Sidecars sdltag cannot read safely: one error naming the file, the file untouched, never a hang."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from sdltag import log
from sdltag.cli import app
from sdltag.xmp import MAX_DEPTH, XmpError, read_keywords, write_keywords

BODY = """<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">
   <dc:subject><rdf:Bag><rdf:li>{keyword}</rdf:li></rdf:Bag></dc:subject>{extra}
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def _body(keyword: str = "Mine", extra: str = "") -> str:
    return BODY.format(keyword=keyword, extra=extra)


def _declared(encoding: str) -> bytes:
    return f'<?xml version="1.0" encoding="{encoding}"?>\n'.encode() + _body().encode()


def _deep(depth: int) -> bytes:
    return _body(extra="<dc:x>" + "<rdf:Bag>" * depth + "</rdf:Bag>" * depth + "</dc:x>").encode()


BROKEN = {
    "unknown encoding": (_declared("bogus-8"), "declares the encoding 'bogus-8'"),
    "EBCDIC": (_declared("EBCDIC"), "declares the encoding 'EBCDIC'"),
    "UTF-7": (_declared("UTF-7"), "declares the encoding 'UTF-7'"),
    "UTF-16 declared, ASCII written": (_declared("UTF-16"), "declares the encoding 'UTF-16' but is not written in it"),
    "UTF-32 declared, ASCII written": (_declared("UTF-32"), "declares the encoding 'UTF-32' but is not written in it"),
    "UTF-16 BOM, odd length": (b"\xff\xfe" + _body().encode("utf-16-le") + b"\x00", "not valid UTF-16-LE"),
    "Shift_JIS declared, invalid bytes": (_declared("Shift_JIS") + b"\x81\x00", "not valid SHIFT_JIS"),
    "not UTF-8": (_body("Caf\xe9").encode("latin-1"), "not valid UTF-8"),
    "deep nesting": (_deep(1500), f"more than {MAX_DEPTH} deep"),
    "entity expansion": (
        b'<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>' + _body("&b;").encode(),
        "declares or refers to XML entities",
    ),
    "external entity": (b'<!DOCTYPE x SYSTEM "x.dtd">' + _body("&ext;").encode(), "refers to XML entities"),
    "empty": (b"", "not valid XML"),
    "two roots": (_body().encode() * 2, "not valid XML"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_unreadable_sidecar_raises_and_stays_untouched(tmp_path: Path, case: str) -> None:
    data, message = BROKEN[case]
    path = tmp_path / "IMG_1.jpg.xmp"
    path.write_bytes(data)
    with pytest.raises(XmpError, match=message) as caught:
        write_keywords(path, ["cat"])
    assert str(path) in str(caught.value)
    with pytest.raises(XmpError):
        read_keywords(path)
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_nesting_up_to_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "ok.xmp"
    path.write_bytes(_deep(MAX_DEPTH - 10))
    write_keywords(path, ["cat"])
    assert read_keywords(path) == ["Mine", "cat"] and path.read_text().count("<rdf:Bag>") == MAX_DEPTH - 10 + 2


@pytest.mark.parametrize(
    ("encoding", "bom"),
    [("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff"), ("utf-32-le", b"\xff\xfe\x00\x00"), ("utf-8", b"")],
)
def test_unicode_sidecars_are_written_back_in_their_encoding(tmp_path: Path, encoding: str, bom: bytes) -> None:
    path = tmp_path / "u.xmp"
    name = encoding.upper()[:6]
    path.write_bytes(bom + (f'<?xml version="1.0" encoding="{name}"?>\n' + _body("Café")).encode(encoding))
    write_keywords(path, ["日本", "cat"])
    data = path.read_bytes()
    assert data.startswith(bom + f'<?xml version="1.0" encoding="{name}"?>'.encode(encoding))
    assert data[len(bom) :].decode(encoding).count("<rdf:li>日本</rdf:li>") == 2  # dc:subject and the record
    assert read_keywords(path) == ["Café", "日本", "cat"]


@pytest.mark.parametrize("encoding", ["ISO-8859-1", "windows-1252", "Shift_JIS", "KOI8-R"])
def test_declared_legacy_encoding_is_kept(tmp_path: Path, encoding: str) -> None:
    """Keywords the encoding cannot hold are written as character references."""
    path = tmp_path / "l.xmp"
    user = {"Shift_JIS": "写真", "KOI8-R": "Фото"}.get(encoding, "Café")
    source = (f'<?xml version="1.0" encoding="{encoding}"?>\n' + _body(user)).encode(encoding)
    path.write_bytes(source)
    write_keywords(path, ["\U0001f30awave", "cat"])
    data = path.read_bytes()
    assert data.startswith(f'<?xml version="1.0" encoding="{encoding}"?>'.encode())
    assert f"<rdf:li>{user}</rdf:li>".encode(encoding) in data and b"&#127754;wave" in data
    assert read_keywords(path) == [user, "\U0001f30awave", "cat"]


def test_a_fifo_sidecar_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "IMG_1.jpg.xmp"
    os.mkfifo(fifo)
    outcome: list[BaseException | bool] = []

    def attempt() -> None:
        try:
            outcome.append(write_keywords(fifo, ["cat"]))
        except BaseException as exc:  # noqa: BLE001 - the test checks which
            outcome.append(exc)
        try:
            outcome.append(read_keywords(fifo))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # blocked in open(): release it so the test process can go on
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
        pytest.fail("opening the FIFO sidecar blocked")
    assert len(outcome) == 2 and all(isinstance(o, XmpError) for o in outcome), outcome
    assert "not a regular file" in str(outcome[0])
    assert fifo.is_fifo()


def test_a_folder_named_like_a_sidecar_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "IMG_1.jpg.xmp"
    folder.mkdir()
    with pytest.raises(XmpError, match="not a regular file"):
        write_keywords(folder, ["cat"])
    assert folder.is_dir() and not any(folder.iterdir())


@pytest.mark.parametrize("keyword", ["bad\ufffe", "bad\uffff", "bell\x07", "nul\x00", "half\ud800"])
def test_keyword_xml_cannot_hold_is_refused(tmp_path: Path, keyword: str) -> None:
    path = tmp_path / "k.xmp"
    path.write_text(_body(), encoding="utf-8")
    with pytest.raises(XmpError, match="which XML cannot store"):
        write_keywords(path, ["cat", keyword])
    assert path.read_text(encoding="utf-8") == _body()
    with pytest.raises(XmpError):
        write_keywords(tmp_path / "new.xmp", [keyword])
    assert not (tmp_path / "new.xmp").exists()


def test_tag_run_reports_each_bad_sidecar_and_goes_on(tmp_path: Path, tiny_model) -> None:
    folder = tmp_path / "lib"
    folder.mkdir()
    names = ["good", "fifo", "deep", "bogus", "utf32"]
    for i, name in enumerate(names):
        Image.new("RGB", (40, 30), (40 * i, 90, 200)).save(folder / f"{name}.jpg")
    os.mkfifo(folder / "fifo.jpg.xmp")
    bad = {
        "deep.jpg.xmp": _deep(1200),
        "bogus.jpg.xmp": _declared("bogus-8"),
        "utf32.jpg.xmp": _declared("UTF-32"),
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    result = CliRunner().invoke(
        app, ["tag", str(folder), "--model", str(tiny_model.path), "--no-index", "--xmp"], catch_exceptions=False
    )
    assert result.exit_code == 1
    assert len(result.stdout.splitlines()) == len(names)  # every photo is still tagged
    assert {Path(json.loads(line)["path"]).stem for line in result.stdout.splitlines()} == set(names)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 4, result.stderr
    for name in ["fifo.jpg.xmp", *bad]:
        assert sum(name in line for line in errors) == 1, (name, result.stderr)
    for name, data in bad.items():
        assert (folder / name).read_bytes() == data
    assert (folder / "fifo.jpg.xmp").is_fifo()
    assert read_keywords(folder / "good.jpg.xmp")


def test_an_oversized_sidecar_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sdltag.xmp

    monkeypatch.setattr(sdltag.xmp, "MAX_BYTES", 1000)
    path = tmp_path / "big.xmp"
    data = _body(extra="<!--" + "x" * 2000 + "-->").encode()
    path.write_bytes(data)
    with pytest.raises(XmpError, match="more than a sidecar sdltag reads"):
        write_keywords(path, ["cat"])
    assert path.read_bytes() == data


def test_tag_reruns_keep_the_users_keywords_end_to_end(tmp_path: Path, tiny_model) -> None:
    """`sdltag tag --xmp` twice over sidecars whose keywords sdltag also proposes: the user's stay."""
    folder = tmp_path / "lib"
    folder.mkdir()
    user = ["Cat", "Dog", "Holiday"]  # the tiny model's labels include cat and dog
    items = "".join(f"<rdf:li>{k}</rdf:li>" for k in user)
    for i in range(3):
        Image.new("RGB", (40, 30), (70 * i, 120, 30)).save(folder / f"p{i}.jpg")
        (folder / f"p{i}.jpg.xmp").write_text(_body().replace("<rdf:li>Mine</rdf:li>", items), encoding="utf-8")
    base = ["tag", str(folder), "--model", str(tiny_model.path), "--no-index", "--xmp", "-q"]
    first = CliRunner().invoke(app, [*base, "-k", "6", "--sidecar-max", "6"], catch_exceptions=False)
    assert first.exit_code == 0, first.stderr
    for i in range(3):
        assert {k.casefold() for k in read_keywords(folder / f"p{i}.jpg.xmp")} == {
            "cat", "dog", "holiday", "tree", "car", "sun", "boat"
        }  # fmt: skip
    second = CliRunner().invoke(app, [*base, "-k", "1"], catch_exceptions=False)
    assert second.exit_code == 0, second.stderr
    for line in second.stdout.splitlines():
        record = json.loads(line)
        (top,) = [t["label"] for t in record["tags"]]
        keywords = read_keywords(Path(record["path"] + ".xmp"))
        assert keywords[:3] == user  # exactly as the user wrote them, first
        assert {k.casefold() for k in keywords} == {"cat", "dog", "holiday", top}


def test_training_data_skips_unreadable_sidecars_without_hanging(tmp_path: Path) -> None:
    from sdltag.datasets import read_labeled_dir

    for name in ["good", "fifo", "deep"]:
        Image.new("RGB", (20, 20), (9, 9, 9)).save(tmp_path / f"{name}.jpg")
    (tmp_path / "good.jpg.xmp").write_text(_body("beach"), encoding="utf-8")
    os.mkfifo(tmp_path / "fifo.jpg.xmp")
    (tmp_path / "deep.jpg.xmp").write_bytes(_deep(1200))
    with log.collect() as warnings:
        dataset = read_labeled_dir(tmp_path, "xmp")
    assert [(item.path.name, list(item.labels)) for item in dataset.items] == [("good.jpg", ["beach"])]
    assert sorted(p.name for p, _reason in dataset.skipped) == ["deep.jpg", "fifo.jpg"]
    assert len(warnings) == 2 and any("deep.jpg.xmp" in w for w in warnings) and any("fifo.jpg" in w for w in warnings)
