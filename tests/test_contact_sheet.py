"""The HTML contact sheet (`--format html`): valid HTML5, every input present, hostile names inert, links exact.

Pages are parsed with html5lib in strict mode (a parse error fails the test). The
rendering in a real browser (grid, filter) is the slow test at the end (headless Chromium).
"""

from __future__ import annotations

import base64
import gc
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import html5lib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdltag import contact_sheet, log
from sdltag.cli import app
from sdltag.contact_sheet import (
    MARKER,
    SCRIPT,
    STYLE,
    ContactSheetWriter,
    file_url,
    thumbnail_jpeg,
    thumbs_folder_for,
)
from sdltag.images import open_image
from sdltag.writers import SearchHit, Tag, TagResult

NS = "{http://www.w3.org/1999/xhtml}"
HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_BYTES = os.fsdecode(b"caf\xe9 <img src=x onerror=alert(1)> #1 100%.jpg")  # not UTF-8, and < > # %


def parse(page: str):
    """The page as an ElementTree, parsed strictly (any HTML5 parse error raises)."""
    return html5lib.HTMLParser(strict=True, namespaceHTMLElements=True).parse(page)


def sheet_data(tree) -> dict:
    (block,) = [s for s in tree.iter(NS + "script") if s.get("type") == "application/json"]
    return json.loads(block.text)


def assert_inert(page: str, tree) -> None:
    """No element the page did not make itself: no img, no event handler attribute, only its own two scripts."""
    assert not list(tree.iter(NS + "img"))
    for element in tree.iter():
        assert not any(name.lower().startswith("on") for name in element.attrib), element.attrib
    scripts = list(tree.iter(NS + "script"))
    assert len(scripts) == 2 and scripts[1].text == SCRIPT
    assert "<img src=x" not in page


def photo(path: Path, colour=(200, 40, 40), size=(64, 48)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def test_file_url_percent_encodes_the_path_bytes(tmp_path: Path) -> None:
    assert file_url("/photos/a b#1%?.jpg") == "file:///photos/a%20b%231%25%3F.jpg"
    assert file_url("/photos/\u00e9t\u00e9.jpg") == "file:///photos/%C3%A9t%C3%A9.jpg"  # UTF-8 bytes
    assert file_url(os.fsdecode(b"/photos/caf\xe9.jpg")) == "file:///photos/caf%E9.jpg"  # the byte itself
    assert file_url("/photos/<x>\"'.jpg") == "file:///photos/%3Cx%3E%22%27.jpg"
    assert file_url("rel/a.jpg") == "file://" + os.path.abspath("rel/a.jpg")


def test_sheet_is_valid_html_with_every_input_and_hostile_names_inert(tmp_path: Path) -> None:
    paths = [photo(tmp_path / "plain.jpg"), photo(tmp_path / HOSTILE_BYTES), photo(tmp_path / "\u00e9t\u00e9.png")]
    out = io.StringIO()
    sheet = ContactSheetWriter(out, title=f"review {HOSTILE}")
    for i, path in enumerate(paths):
        sheet.write(TagResult(path, [Tag(HOSTILE, 0.9 - i / 10, "unseen"), Tag("cat", 0.25, "seen")]))
    sheet.problem(tmp_path / HOSTILE_BYTES.replace(".jpg", ".png"), f"cannot decode: {HOSTILE}")
    sheet.close()
    page = out.getvalue()
    tree = parse(page)
    assert_inert(page, tree)

    assert tree.find(f".//{NS}title").text == f"review {HOSTILE}"  # text, not markup
    data = sheet_data(tree)
    assert data["labels"] == [[HOSTILE, "unseen"], ["cat", "seen"]]
    shown = [item[0] for item in data["items"]]
    assert shown == [
        str(tmp_path / "plain.jpg"),
        str(tmp_path) + "/caf\\xe9 " + HOSTILE + " #1 100%.jpg",
        str(paths[2]),
    ]
    assert [item[1] for item in data["items"]] == [file_url(p) for p in paths]
    assert data["items"][1][1].endswith("/caf%E9%20%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E%20%231%20100%25.jpg")
    assert [item[3] for item in data["items"]] == [[0, 0.9, 1, 0.25], [0, 0.8, 1, 0.25], [0, 0.7, 1, 0.25]]
    for item in data["items"]:  # thumbnails made from the files (nothing came with the results): embedded JPEGs
        assert item[2].startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(item[2].split(",", 1)[1])))
        assert thumb.format == "JPEG" and thumb.size == (64, 48)

    (failed,) = [d for d in tree.iter(NS + "details") if d.get("id") == "failed"]
    (link,) = failed.iter(NS + "a")
    assert link.text == str(tmp_path) + "/caf\\xe9 " + HOSTILE + " #1 100%.png"
    assert link.get("href") == file_url(tmp_path / HOSTILE_BYTES.replace(".jpg", ".png"))
    assert "".join(failed.find(f".//{NS}li").itertext()).endswith(f": cannot decode: {HOSTILE}")


def test_csp_allows_only_the_pages_own_script_and_style() -> None:
    out = io.StringIO()
    ContactSheetWriter(out).close()
    tree = parse(out.getvalue())
    csp = next(m.get("content") for m in tree.iter(NS + "meta") if m.get("http-equiv") == "Content-Security-Policy")

    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    assert f"script-src {digest(SCRIPT)};" in csp and f"style-src {digest(STYLE)};" in csp
    assert "default-src 'none'" in csp and "http" not in csp
    assert tree.find(f".//{NS}style").text == STYLE


def test_json_block_cannot_close_its_script() -> None:
    out = io.StringIO()
    sheet = ContactSheetWriter(out)
    sheet.write(TagResult(Path("/p/</script><script>alert(1)</script>.jpg"), [Tag("<!-- a & b -->", 0.5, "seen")]))
    sheet.close()
    page = out.getvalue()
    block = page[page.index('type="application/json">') :]
    block = block[: block.index("</script>")]
    assert "<" not in block.split(">", 1)[1] and "&" not in block
    data = sheet_data(parse(page))
    assert data["items"][0][0] == "/p/</script><script>alert(1)</script>.jpg"
    assert data["labels"] == [["<!-- a & b -->", "seen"]]


def test_thumbnails_move_to_a_folder_past_the_embedding_limit(tmp_path: Path) -> None:
    paths = [photo(tmp_path / f"p{i}.png", (i * 20, 0, 0)) for i in range(5)]
    output = tmp_path / "my review.html"
    with open(output, "w", encoding="utf-8") as stream:
        sheet = ContactSheetWriter(stream, output, embed_max_bytes=1500)
        for path in paths:
            sheet.write(TagResult(path, [Tag("red", 0.5, "seen")], thumbnail=thumbnail_jpeg(Image.open(path))))
        sheet.close()
    folder = tmp_path / "my review_files"
    assert thumbs_folder_for(output) == folder
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER] + [f"{i:06d}.jpg" for i in range(5)])
    data = sheet_data(parse(output.read_text(encoding="utf-8")))
    assert [item[2] for item in data["items"]] == [f"my%20review_files/{i:06d}.jpg" for i in range(5)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

    # A smaller sheet of the same name embeds its thumbnails and removes the folder sdltag wrote.
    with open(output, "w", encoding="utf-8") as stream:
        sheet = ContactSheetWriter(stream, output)
        sheet.write(TagResult(paths[0], [Tag("red", 0.5, "seen")]))
        sheet.close()
    assert not folder.exists()
    assert sheet_data(parse(output.read_text(encoding="utf-8")))["items"][0][2].startswith("data:image/jpeg")


def test_a_folder_sdltag_did_not_write_is_never_touched(tmp_path: Path) -> None:
    path = photo(tmp_path / "a.png")
    output = tmp_path / "review.html"
    folder = thumbs_folder_for(output)
    folder.mkdir()
    (folder / "000000.jpg").write_bytes(b"the user's own")
    (folder / MARKER).write_text("")  # even with sdltag's marker: a file of someone else's is beside it
    (folder / "notes.txt").write_text("mine")
    warnings: list[str] = []
    for _ in range(2):  # past the limit, where the folder would be used: a run, then a run over its sheet
        with open(output, "w", encoding="utf-8") as stream, log.collect() as found:
            sheet = ContactSheetWriter(stream, output, embed_max_bytes=1)
            for _ in range(3):
                sheet.write(TagResult(path, [], thumbnail=thumbnail_jpeg(Image.open(path))))
            sheet.close()
        warnings += found
        items = sheet_data(parse(output.read_text(encoding="utf-8")))["items"]
        assert all(item[2].startswith("data:image/jpeg;base64,") for item in items)  # embedded instead
    assert len(warnings) == 2 and "embedded" in warnings[0]
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER, "000000.jpg", "notes.txt"])
    assert (folder / "000000.jpg").read_bytes() == b"the user's own"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_abandoned_sheet_leaves_no_staging_folder(tmp_path: Path) -> None:
    path = photo(tmp_path / "a.png")
    sheet = ContactSheetWriter(io.StringIO(), tmp_path / "review.html", embed_max_bytes=1)
    for _ in range(3):
        sheet.write(TagResult(path, [], thumbnail=thumbnail_jpeg(Image.open(path))))
    staging = sheet.staging
    for pending in sheet.writes:  # thumbnails are written on a pool: wait for them before counting
        pending.result()
    assert staging is not None and len(list(staging.iterdir())) == 4
    del sheet  # a run interrupted before close()
    gc.collect()
    assert not staging.exists()
    assert not thumbs_folder_for(tmp_path / "review.html").exists()


def test_search_hits_carry_their_rank() -> None:
    out = io.StringIO()
    contact_sheet.write_search_sheet(
        [
            SearchHit(1, Path("/nowhere/b.jpg"), 0.8, "beach", "seen"),
            SearchHit(2, Path("/nowhere/a.jpg"), 0.1, "beach", "seen"),
        ],
        out,
        title="sdltag search beach",
    )
    data = sheet_data(parse(out.getvalue()))
    assert data["kind"] == "search"
    assert [(item[0], item[2], item[3], item[4]) for item in data["items"]] == [
        ("/nowhere/b.jpg", "", [0, 0.8], 1),  # a missing file: no thumbnail, still listed
        ("/nowhere/a.jpg", "", [0, 0.1], 2),
    ]


def test_a_big_jpeg_gives_its_thumbnail_from_the_one_reduced_decode(tmp_path: Path, monkeypatch) -> None:
    """A 12 MP JPEG tagged by a 96 px model: one decode (at a reduced scale) gives the model input and the thumbnail."""
    from sdltag import images
    from sdltag.modelfolder import InputSpec
    from sdltag.tagger import _prepare

    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(path)
    opened = []
    real_open = images.open_image

    def counting_open(*args, **kwargs):
        image = real_open(*args, **kwargs)
        opened.append(image.size)
        return image

    monkeypatch.setattr("sdltag.tagger.open_image", counting_open)
    monkeypatch.setattr(images, "open_image", counting_open)
    monkeypatch.setattr(contact_sheet, "file_thumbnail", None)  # never called on this path
    prepared = _prepare(path, path.stat().st_size, InputSpec(96, 96), 100.0, False, frozenset(), 240)
    assert len(opened) == 1 and 96 <= opened[0][1] < 750  # one decode, well under full size (3000 rows)
    thumb = Image.open(io.BytesIO(prepared.thumbnail))
    assert thumb.format == "JPEG" and thumb.size == (min(240, opened[0][0]), round(min(240, opened[0][0]) * 0.75))
    plain = _prepare(path, path.stat().st_size, InputSpec(96, 96), 100.0, False, frozenset())
    assert plain.thumbnail is None
    np.testing.assert_array_equal(prepared.array, plain.array)  # the model's input is the same with a thumbnail


# ---------------------------------------------------------------------------------------------
# Through the command line, with a real model (tiny_model: onnxruntime) and real files


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(folder / f"img{i}.jpg", quality=90)
    shutil.copy(folder / "img0.jpg", folder / (HOSTILE + ".jpg"))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_tag_html_lists_every_photo_with_the_tags_of_jsonl_and_thumbnails_from_the_decode(
    tiny_model, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = str(tiny_model.path)
    plain = run("tag", str(photos), "-m", model, "--no-index", "-f", "jsonl", "-q")
    assert plain.exit_code == 1
    expected = {json.loads(line)["path"]: json.loads(line)["tags"] for line in plain.stdout.splitlines()}

    made_from_files: list[Path] = []
    monkeypatch.setattr(contact_sheet, "file_thumbnail", lambda path, *a: made_from_files.append(path))
    out = tmp_path / "review.html"
    result = run("tag", str(photos), "-m", model, "--index", str(tmp_path / "i.db"), "-o", str(out))
    assert result.exit_code == 1  # broken.jpg
    assert not made_from_files  # every thumbnail came from the decode done for tagging
    page = out.read_text(encoding="utf-8")
    tree = parse(page)
    assert_inert(page, tree)
    data = sheet_data(tree)
    labels = data["labels"]
    got = {
        item[0]: [
            {"label": labels[item[3][k]][0], "score": item[3][k + 1], "kind": labels[item[3][k]][1]}
            for k in range(0, len(item[3]), 2)
        ]
        for item in data["items"]
    }
    assert list(got) == list(expected) and len(got) == 5  # input order, the hostile name included
    for path, tags in expected.items():  # the same tags and scores as JSONL: the thumbnail changed no input
        assert [(t["label"], t["kind"]) for t in got[path]] == [(t["label"], t["kind"]) for t in tags]
        assert np.allclose([t["score"] for t in got[path]], [t["score"] for t in tags], atol=6e-4)
    decoded = open_image(photos / "img0.jpg", target=(32, 32)).size  # what tagging decodes for a 32 px model
    for item in data["items"]:
        thumb = Image.open(io.BytesIO(base64.b64decode(item[2].split(",", 1)[1])))
        assert thumb.size == decoded
    failed = "".join(next(d for d in tree.iter(NS + "details") if d.get("id") == "failed").itertext())
    assert str(photos / "broken.jpg") in failed and "not an image" in failed

    # A re-run reuses the index (no decode): thumbnails are then made from the files.
    monkeypatch.undo()
    again = run("tag", str(photos), "-m", model, "--index", str(tmp_path / "i.db"), "-o", str(out), "-q")
    assert again.exit_code == 1
    items = sheet_data(parse(out.read_text(encoding="utf-8")))["items"]
    assert len(items) == 5 and all(item[2].startswith("data:image/jpeg;base64,") for item in items)


def test_dry_run_html_goes_to_stdout(tiny_model, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "review.html"
    result = run("tag", str(photos), "-m", str(tiny_model.path), "--dry-run", "-o", str(out), "-f", "html", "-q")
    assert result.exit_code == 1 and not out.exists()
    assert len(sheet_data(parse(result.stdout))["items"]) == 5


def test_search_html(tiny_model, photos: Path, tmp_path: Path) -> None:
    index = str(tmp_path / "i.db")
    assert run("tag", str(photos), "-m", str(tiny_model.path), "--index", index, "-q", "-f", "jsonl").exit_code == 1
    listed = run("search", "cat", str(photos), "-m", str(tiny_model.path), "--index", index, "-f", "jsonl", "-n", "3")
    html_run = run("search", "cat", str(photos), "-m", str(tiny_model.path), "--index", index, "-f", "html", "-n", "3")
    assert html_run.exit_code == 0
    hits = [json.loads(line) for line in listed.stdout.splitlines()]
    tree = parse(html_run.stdout)
    items = sheet_data(tree)["items"]
    assert [(item[0], item[4]) for item in items] == [(h["path"], h["rank"]) for h in hits]
    assert all(item[2].startswith("data:image/jpeg;base64,") for item in items)
    assert tree.find(f".//{NS}title").text == "sdltag search cat"


# ---------------------------------------------------------------------------------------------
# In a browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def dump_dom(url: str, tmp_path: Path) -> str:
    browser = _chromium()
    profile = tmp_path / "chromium-profile"
    done = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,800", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_sheet_renders_and_filters_in_headless_chromium(tmp_path: Path) -> None:
    if _chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    thumb = thumbnail_jpeg(Image.new("RGB", (80, 60), (10, 120, 200)))
    trap = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"
    output = tmp_path / "sheet.html"
    with open(output, "w", encoding="utf-8") as stream:
        sheet = ContactSheetWriter(stream, output, embed_max_bytes=50_000)  # some thumbnails to a folder
        for i in range(300):  # more than one page (120 cards)
            tags = [Tag("beach", 0.9, "seen")] if i % 3 == 0 else [Tag("forest", 0.6, "seen")]
            if i % 10 == 0:
                tags.append(Tag(trap, 0.4, "unseen"))
            sheet.write(TagResult(Path(f"/photos/{trap}-{i:03d}.jpg"), tags, thumbnail=thumb))
        sheet.problem("/photos/" + trap + ".jpg", "cannot decode: " + trap)
        sheet.close()
    url = output.as_uri()

    def pwned(dom: str) -> bool:  # the trap's handler ran: an attribute on <body>
        return re.search(r"<body[^>]*\sdata-pwned=\"1\"", dom) is not None

    def figures(dom: str) -> list[str]:
        return re.findall(r"<figure>.*?</figure>", dom, flags=re.S)

    dom = dump_dom(url, tmp_path)
    assert 'data-ready="1"' in dom and not pwned(dom)
    cards = figures(dom)
    assert len(cards) == 120  # the first page only; the rest as the reader scrolls
    assert all('<img loading="lazy" decoding="async"' in card for card in cards)
    assert "300 photos (120 shown so far)" in dom
    assert "&lt;img src=x onerror=" in dom  # the hostile label and names are text
    assert len(re.findall(r"<img\b", dom)) == 120  # no other image element came to life

    dom = dump_dom(url + "#filter=beach", tmp_path)  # photos with the label
    assert "100 of 300 photos" in dom and len(figures(dom)) == 100
    assert all(">beach<" in card for card in figures(dom))

    dom = dump_dom(url + "#filter=" + "-beach%2C%20forest", tmp_path)  # without beach, with forest
    assert "200 of 300 photos" in dom and all(">beach<" not in card for card in figures(dom))
    dom = dump_dom(url + "#filter=-" + quote(trap, safe=""), tmp_path)
    assert "270 of 300 photos" in dom and not pwned(dom)

    shot = tmp_path / "sheet.png"
    subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'p2'}", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert (np.abs(image.astype(int) - (10, 120, 200)).sum(axis=2) < 30).sum() > 5000  # thumbnails painted
