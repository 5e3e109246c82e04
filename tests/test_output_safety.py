"""`sdltag tag`/`search` output behaviour: -o through links and to stdout, sidecars kept as they are,
NUL-terminated paths, -q, a reader that goes away (a real pipe), an empty folder."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdltag.cli import app

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _photos(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        pixels = (np.random.default_rng(i).uniform(0, 255, size=(40, 48, 3))).astype(np.uint8)
        path = folder / name
        Image.fromarray(pixels).save(path, format="JPEG")
        paths.append(path)
    return paths


def _cli(args: list[str], **kwargs):
    return CliRunner().invoke(app, args, catch_exceptions=False, **kwargs)


def test_output_dash_and_symlinked_output(tmp_path: Path, tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _photos(tmp_path / "lib", ["a.jpg", "b.jpg"])
    base = ["tag", str(tmp_path / "lib"), "--model", str(tiny_model.path), "--no-index", "-q"]
    monkeypatch.chdir(tmp_path)
    result = _cli([*base, "-o", "-", "-f", "jsonl"])
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == [str(f) for f in files]
    assert not (tmp_path / "-").exists()
    (tmp_path / "exports").mkdir()
    target = tmp_path / "exports" / "tags.csv"
    target.write_text("old\n")
    target.chmod(0o640)
    link = tmp_path / "tags.csv"
    link.symlink_to(target)
    result = _cli([*base, "-o", str(link)])
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and target.read_text().startswith("path,rank,label,score,kind")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_sidecars_keep_links_mode_and_owner(tmp_path: Path, tiny_model) -> None:
    folder = tmp_path / "lib"
    linked, hard, owned = _photos(folder, ["linked.jpg", "hard.jpg", "owned.jpg"])
    (tmp_path / "sidecars").mkdir()
    real = tmp_path / "sidecars" / "linked.jpg.xmp"
    real.write_text("")  # empty: a new sidecar is written into it
    real.unlink()
    (folder / "linked.jpg.xmp").symlink_to(real)
    other_name = tmp_path / "sidecars" / "hard-copy.xmp"
    _cli(["tag", str(hard), "--model", str(tiny_model.path), "--no-index", "-q", "--xmp"])
    os.link(folder / "hard.jpg.xmp", other_name)
    _cli(["tag", str(owned), "--model", str(tiny_model.path), "--no-index", "-q", "--xmp"])
    (folder / "owned.jpg.xmp").chmod(0o600)
    if ROOT:
        os.chown(folder / "owned.jpg.xmp", 65534, 65534)
    before = {p: p.read_text() for p in (other_name, folder / "owned.jpg.xmp")}
    result = _cli(["tag", str(folder), "--model", str(tiny_model.path), "--no-index", "-q", "--xmp", "-k", "2"])
    assert result.exit_code == 0, result.stderr
    assert (folder / "linked.jpg.xmp").is_symlink() and "sdltag|" in real.read_text()
    assert os.stat(other_name).st_nlink == 2 and other_name.read_text() == (folder / "hard.jpg.xmp").read_text()
    assert other_name.read_text() != before[other_name]  # -k 2 this time: the link shows the new sidecar
    st = (folder / "owned.jpg.xmp").stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    if ROOT:
        assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert [p.name for p in folder.iterdir() if ".sdltag-tmp-" in p.name] == []


def test_paths0_for_tag_and_search(tmp_path: Path, tiny_model) -> None:
    files = _photos(tmp_path / "lib", ["with space.jpg", 'quote\'d "x".jpg'])
    index = ["--index", str(tmp_path / "i.db")]
    result = _cli(["tag", str(tmp_path / "lib"), "--model", str(tiny_model.path), *index, "-q", "-f", "paths0"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes.split(b"\0") == [os.fsencode(f) for f in sorted(files)] + [b""]
    result = _cli(["search", "cat", "--model", str(tiny_model.path), *index, "-f", "paths0"])
    assert result.exit_code == 0, result.stderr
    assert sorted(result.stdout_bytes.split(b"\0")[:-1]) == sorted(os.fsencode(f) for f in files)
    assert result.stdout_bytes.endswith(b"\0") and b"\n" not in result.stdout_bytes
    result = _cli(["search", os.fsdecode(b"caf\xe9"), "--model", str(tiny_model.path), *index])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("sdltag: error: the search query: 'caf\\xe9' is not valid UTF-8 (byte 0xe9)")


def test_quiet_prints_nothing_and_an_empty_folder_warns(tmp_path: Path, tiny_model) -> None:
    _photos(tmp_path / "lib", ["a.jpg"])
    result = _cli(["tag", str(tmp_path / "lib"), "--model", str(tiny_model.path), "--no-index", "-q"])
    assert result.exit_code == 0 and result.stderr == ""  # no provider line, no summary
    result = _cli(["tag", str(tmp_path / "lib"), "--model", str(tiny_model.path), "--no-index"])
    assert "ExecutionProvider" in result.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a photo")
    result = _cli(["tag", str(tmp_path / "empty"), "--model", str(tiny_model.path), "--no-index", "-q"])
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"sdltag: warning: no images found in {tmp_path / 'empty'}; nothing to tag "
        "(hidden files are skipped unless --include-hidden)"
    ]


def _closed_pipe_run(args: list[str]) -> tuple[int, str]:
    """Run the installed command with its stdout a pipe nobody reads (`| head -c0`), the real way."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen(
        [sys.executable, "-m", "sdltag", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader goes away before the first result
    err = child.stderr.read().decode()
    return child.wait(timeout=120), err


def test_broken_pipe_exits_141_quietly_and_keeps_the_index(tmp_path: Path, tiny_model) -> None:
    _photos(tmp_path / "lib", [f"p{i}.jpg" for i in range(6)])
    index = ["--index", str(tmp_path / "i.db")]
    code, err = _closed_pipe_run(["tag", str(tmp_path / "lib"), "--model", str(tiny_model.path), *index, "-f", "jsonl"])
    assert code == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    from sdltag.index import ImageIndex

    with ImageIndex.open(tmp_path / "i.db") as idx:  # the finished batch was committed on the way out
        assert idx.count() >= 1
    code, err = _closed_pipe_run(["search", "cat", "--model", str(tiny_model.path), *index, "-f", "paths"])
    assert code == 141 and err == "", err
