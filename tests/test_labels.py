"""Labels files and --label values: parsing, duplicates, every refusal; `sdltag labels list/cache`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sdltag import log
from sdltag.cli import app
from sdltag.errors import SdltagError
from sdltag.labels import (
    MAX_LABEL_CHARS,
    LabelEntry,
    build_vocabulary,
    normalize_label,
    parse_inline_label,
    read_labels_file,
)


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_normalize_label_strips_and_collapses_whitespace() -> None:
    assert normalize_label("  golden \t  retriever \n") == "golden retriever"
    assert normalize_label("cat") == "cat"
    assert normalize_label("   ") == ""


def test_file_with_bom_comments_blank_lines_and_descriptions(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "labels.txt",
        "\ufeff# my labels\n"
        "\n"
        "  Golden   Retriever  \n"
        "tabby: a striped   domestic cat\n"
        "C#\n"
        "7:00\n"
        "sunset   # the evening sky\n"
        "   # indented comment\n"
        "http://example.org\n",
    )
    entries = read_labels_file(path)
    assert entries == [
        LabelEntry("Golden Retriever", "Golden Retriever", f"{path}:3"),
        LabelEntry("tabby", "a striped domestic cat", f"{path}:4"),
        LabelEntry("C#", "C#", f"{path}:5"),
        LabelEntry("7:00", "7:00", f"{path}:6"),
        LabelEntry("sunset", "sunset", f"{path}:7"),
        LabelEntry("http://example.org", "http://example.org", f"{path}:9"),
    ]


def test_crlf_line_endings_keep_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path / "crlf.txt", b"cat\r\n\r\ndog\r\n")
    assert [(e.label, e.source) for e in read_labels_file(path)] == [("cat", f"{path}:1"), ("dog", f"{path}:3")]


def test_duplicates_collapse_case_insensitively_with_one_warning(tmp_path: Path) -> None:
    first = _write(tmp_path / "a.txt", "Cat\ndog\n")
    second = _write(tmp_path / "b.txt", "cat\nDOG: a big dog\nbird\n")
    with log.collect() as warnings:
        entries = build_vocabulary([first, second], ["  CAT  ", "fish"])
    assert [e.label for e in entries] == ["Cat", "dog", "bird", "fish"]
    assert entries[1].text == "dog"  # the first spelling (and its text) wins
    assert len(warnings) == 1
    message = warnings[0]
    assert "3 duplicate labels" in message
    assert f"{second}:1" in message and f"{second}:2" in message and "--label" in message


def test_inline_labels_accept_descriptions_and_keep_hashes() -> None:
    assert parse_inline_label("tabby: a striped cat") == LabelEntry("tabby", "a striped cat", "--label")
    assert parse_inline_label("no. #1 fan") == LabelEntry("no. #1 fan", "no. #1 fan", "--label")


def test_empty_vocabulary_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "empty.txt", "# only a comment\n\n   \n")
    with pytest.raises(SdltagError, match=r"empty\.txt: no labels found"):
        build_vocabulary([path])
    with pytest.raises(SdltagError, match="no labels given"):
        build_vocabulary()
    assert build_vocabulary([path], allow_empty=True) == []


def test_non_utf8_file_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "latin1.txt", "cat\ndog\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(SdltagError, match=r"latin1\.txt:3: not UTF-8 \(byte 0xe9") as info:
        read_labels_file(path)
    assert "UTF-8" in str(info.value) and "iconv" in str(info.value)


def test_missing_file_and_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SdltagError, match=r"nope\.txt: labels file does not exist"):
        build_vocabulary([tmp_path / "nope.txt"])
    with pytest.raises(SdltagError, match="is a folder"):
        read_labels_file(tmp_path)


def test_over_long_label_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    ok = "x" * MAX_LABEL_CHARS
    path = _write(tmp_path / "long.txt", f"cat\n{ok}\n{'y' * (MAX_LABEL_CHARS + 1)}\n")
    with pytest.raises(SdltagError, match=rf"long\.txt:3: the label is {MAX_LABEL_CHARS + 1} characters long"):
        read_labels_file(path)
    # A long description is fine: only the label itself is limited.
    path = _write(tmp_path / "desc.txt", f"cat: {'a very long description ' * 10}\n")
    assert read_labels_file(path)[0].label == "cat"
    with pytest.raises(SdltagError, match="--label: the label is"):
        parse_inline_label("z" * 300)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (": only a description", "no label before the colon"),
        ("cat:", "ends with a colon"),
        ("bad\x00label", "control character"),
    ],
)
def test_malformed_lines_are_refused(tmp_path: Path, line: str, message: str) -> None:
    path = _write(tmp_path / "bad.txt", f"fine\n{line}\n")
    with pytest.raises(SdltagError, match=rf"bad\.txt:2: .*{message}"):
        read_labels_file(path)


@pytest.mark.parametrize("char", ["\ufffe", "\uffff", "\x0b", "\x1f", "\x7f"])
def test_characters_xml_cannot_hold_are_refused_naming_file_and_line(tmp_path: Path, char: str) -> None:
    path = _write(tmp_path / "odd.txt", f"fine\n# a comment\nbad{char}label: a description\n")
    with pytest.raises(SdltagError, match=r"odd\.txt:3: the label contains") as info:
        read_labels_file(path)
    assert f"U+{ord(char):04X}" in str(info.value) or "control character" in str(info.value)
    with pytest.raises(SdltagError, match=r"^--label: the label contains"):
        build_vocabulary(inline=[f"x{char}y"])


def test_description_with_a_forbidden_character_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.txt", "cat: a furry \uffff animal\n")
    with pytest.raises(SdltagError, match=r"d\.txt:1: .*U\+FFFF"):
        read_labels_file(path)


def test_inline_label_with_a_non_utf8_byte_is_one_clear_error() -> None:
    value = os.fsdecode(b"caf\xe9")  # what argv holds for a latin-1 terminal's "cafe"
    with pytest.raises(SdltagError, match=r"^--label: 'caf\\xe9' is not valid UTF-8 \(byte 0xe9\)"):
        build_vocabulary(inline=["ok", value])
    with pytest.raises(SdltagError, match="U\\+D800"):  # a lone surrogate that is not an escaped byte
        parse_inline_label("x\ud800")


def test_cli_non_utf8_label_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sdltag", "tag", str(tmp_path), "--no-index", b"--label", b"caf\xe9"],
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode().splitlines() == [
        "sdltag: error: --label: 'caf\\xe9' is not valid UTF-8 (byte 0xe9). "
        "Pass the label as UTF-8 text (check the terminal's or script's encoding)."
    ]


_LINES = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),  # everything, surrogates excluded (a file is decoded strictly)
        st.sampled_from(list(" \t:#\ufffe\uffff\x00\x0b\x7f\u2028\ufeff")),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(lines=st.lists(_LINES, max_size=6))
def test_parser_accepts_only_labels_xml_can_hold(tmp_path_factory: pytest.TempPathFactory, lines: list[str]) -> None:
    """Any file: either labels that survive an XML round trip, or one error naming the file and line."""
    import xml.etree.ElementTree as ET

    path = tmp_path_factory.mktemp("fuzz") / "labels.txt"
    path.write_text("\n".join(lines), encoding="utf-8", newline="")
    try:
        entries = read_labels_file(path)
    except SdltagError as exc:
        assert re.match(rf"{re.escape(str(path))}:[0-9]+: ", str(exc)), str(exc)
        return
    for entry in entries:
        assert entry.label and entry.label == normalize_label(entry.label) and len(entry.label) <= MAX_LABEL_CHARS
        for text in (entry.label, entry.text):
            element = ET.Element("li")
            element.text = text
            assert ET.fromstring(ET.tostring(element, encoding="unicode")).text == text


def test_empty_inline_label_is_refused() -> None:
    with pytest.raises(SdltagError, match="--label '  ': the label is empty"):
        build_vocabulary(inline=["  "])


# -- CLI -------------------------------------------------------------------------------------------


def test_labels_list_prints_seen_then_marked_unseen(tmp_path: Path) -> None:
    import numpy as np

    from tests.conftest import build_tiny_model

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(4, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    model = build_tiny_model(
        tmp_path / "m", ["cat", "dog", "tree"], vectors, unseen_labels=["zebra"], rows=2, size=16, width=4
    )
    result = CliRunner().invoke(app, ["labels", "list", "--model", str(model.path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["cat", "dog", "tree", "zebra\t# unseen"]
    # The listing is itself a valid labels file with the same labels.
    listing = _write(tmp_path / "listing.txt", result.stdout)
    assert [e.label for e in read_labels_file(listing)] == ["cat", "dog", "tree", "zebra"]
    result = CliRunner().invoke(app, ["labels", "list", "--model", str(model.path), "--no-unseen"])
    assert result.stdout.splitlines() == ["cat", "dog", "tree"]


def test_labels_list_refuses_a_missing_model(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["labels", "list", "--model", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "model folder does not exist" in result.output


def test_labels_cache_reports_an_empty_cache_and_clears(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = CliRunner().invoke(app, ["labels", "cache", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert f"location: {cache}" in result.stdout and "entries: 0" in result.stdout
    assert not (cache / "labels.sqlite3").exists()  # looking does not create anything

    from sdltag.embedding.cache import LabelVectorCache

    store = LabelVectorCache(cache)
    unit = [1.0] + [0.0] * 7
    import numpy as np

    store.put_many("demo@sha256:00", [("cat", np.array(unit)), ("dog", np.array(unit[::-1]))])
    store.close()
    result = CliRunner().invoke(app, ["labels", "cache", "--cache-dir", str(cache)])
    assert "entries: 2" in result.stdout and "demo@sha256:00: 2" in result.stdout
    result = CliRunner().invoke(app, ["labels", "cache", "--clear", "--cache-dir", str(cache)])
    assert result.exit_code == 0 and "2 label vectors removed" in result.output
    assert not (cache / "labels.sqlite3").exists()


def test_labels_cache_uses_sdltag_home(sdltag_home: Path) -> None:
    result = CliRunner().invoke(app, ["labels", "cache"])
    assert f"location: {sdltag_home / 'cache'}" in result.stdout


def test_labels_embed_refuses_a_bad_labels_file_before_loading_a_model(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.txt", b"ok\n\xff\n")
    result = CliRunner().invoke(app, ["labels", "embed", str(path), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert f"{path}:2: not UTF-8" in result.output


def test_labels_list_defaults_to_the_bundled_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from tests.conftest import build_tiny_model

    vectors = np.eye(2, 8, dtype=np.float32)
    model = build_tiny_model(tmp_path / "m", ["sun", "moon"], vectors, rows=2, size=16, width=4)
    monkeypatch.setenv("SDLTAG_MODEL", str(model.path))  # what default_model_dir() honours
    result = CliRunner().invoke(app, ["labels", "list"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["sun", "moon"]
