"""atomic_write: regular files replaced atomically; links, FIFOs, devices and hard links written through."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sdltag.paths import TEMP_MARK, atomic_write, remove_stale_temps, temp_name

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_MARK in p.name)


def test_regular_file_replaced_through_a_recognisable_temp_keeping_its_mode(tmp_path: Path) -> None:
    out = tmp_path / "tags.csv"
    out.write_text("old")
    out.chmod(0o640)
    old_inode = out.stat().st_ino
    with atomic_write(out) as handle:
        handle.write("new")
        assert out.read_text() == "old"  # readers see the old file until the rename
        (temp,) = _temps(tmp_path)
        assert temp.startswith(f".tags.csv{TEMP_MARK}{os.getpid()}-")
    assert out.read_text() == "new"
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert out.stat().st_ino != old_inode  # replaced by rename, not rewritten
    assert _temps(tmp_path) == []


def test_new_file_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        from sdltag import paths

        paths._UMASK = None  # read again
        with atomic_write(tmp_path / "a.txt") as handle:
            handle.write("x")
    finally:
        os.umask(old)
        paths._UMASK = None
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640


@pytest.mark.skipif(not ROOT, reason="changing a file's owner needs root")
def test_owner_and_group_kept(tmp_path: Path) -> None:
    out = tmp_path / "IMG_1.jpg.xmp"
    out.write_text("old")
    os.chown(out, 65534, 65534)
    with atomic_write(out) as handle:
        handle.write("new")
    st = out.stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534) and out.read_text() == "new"


def test_failed_write_leaves_the_file_and_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(out) as handle:
            handle.write("partial")
            raise RuntimeError("boom")
    assert out.read_text() == "old" and _temps(tmp_path) == []


def test_symlink_is_written_through_and_stays_a_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "IMG_1.xmp"
    target.write_text("old")
    target.chmod(0o600)
    link = tmp_path / "IMG_1.xmp"
    link.symlink_to(Path("real") / "IMG_1.xmp")
    with atomic_write(link) as handle:
        handle.write("new")
    assert link.is_symlink() and os.readlink(link) == str(Path("real") / "IMG_1.xmp")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert _temps(tmp_path) == [] and _temps(tmp_path / "real") == []
    # a link to a file that does not exist yet creates the file, not a regular file in the link's place
    dangling = tmp_path / "new.csv"
    dangling.symlink_to(tmp_path / "real" / "new.csv")
    with atomic_write(dangling) as handle:
        handle.write("created")
    assert dangling.is_symlink() and (tmp_path / "real" / "new.csv").read_text() == "created"


def test_fifo_is_written_directly_and_stays_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    with atomic_write(fifo, "wb", encoding=None) as handle:
        handle.write(b"row 1\nrow 2\n")
    reader.join(10)
    assert received == [b"row 1\nrow 2\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and _temps(tmp_path) == []


def test_character_device_is_written_directly(tmp_path: Path) -> None:
    if ROOT:  # a private node like /dev/null, so nothing of the system's is at stake
        device = tmp_path / "null"
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    else:
        device = Path(os.devnull)
    with atomic_write(device) as handle:
        handle.write("discarded")
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    if ROOT:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]


def test_dash_is_stdout(tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with atomic_write("-") as handle:
        handle.write("to stdout\n")
    assert capfd.readouterr().out == "to stdout\n"
    assert list(tmp_path.iterdir()) == []


def test_hard_link_written_in_place_so_both_names_see_it(tmp_path: Path) -> None:
    first = tmp_path / "a.xmp"
    first.write_text("old content, longer than the new one")
    first.chmod(0o640)
    second = tmp_path / "b.xmp"
    os.link(first, second)
    with atomic_write(first) as handle:
        handle.write("new")
        assert first.read_text().startswith("old")  # rendered whole before the original is touched
    assert second.read_text() == "new" and first.read_text() == "new"
    assert first.stat().st_ino == second.stat().st_ino and first.stat().st_nlink == 2
    assert stat.S_IMODE(first.stat().st_mode) == 0o640 and _temps(tmp_path) == []
    with pytest.raises(RuntimeError):
        with atomic_write(second) as handle:
            handle.write("partial")
            raise RuntimeError("boom")
    assert first.read_text() == "new" and _temps(tmp_path) == []


def test_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "out.csv"
    folder.mkdir()
    with pytest.raises(IsADirectoryError):
        with atomic_write(folder) as handle:
            handle.write("x")
    assert folder.is_dir() and _temps(tmp_path) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_stale_temps_of_this_output_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    old = time.time() - 60
    dead = tmp_path / temp_name("out.csv", _dead_pid())
    fresh_dead = tmp_path / temp_name("out.csv", _dead_pid())
    live = tmp_path / temp_name("out.csv", os.getpid())
    ancient_live = tmp_path / temp_name("out.csv", os.getpid())
    keep = [
        fresh_dead,  # may still be on its way to a rename (clock skew on a shared folder)
        live,  # this process (a concurrent writer) is still running
        tmp_path / ".out.csv.tmp",  # someone else's naming
        tmp_path / f".out.csv{TEMP_MARK}123-notahexx",
        tmp_path / f".other.csv{TEMP_MARK}123-0123abcd",  # another output's temp
        tmp_path / f"out.csv{TEMP_MARK}123-0123abcd",  # not hidden: not ours
        tmp_path / "out.csv.bak",
    ]
    for path in [dead, ancient_live, *keep]:
        path.write_text("x")
    for path in [dead, *keep[1:]]:
        os.utime(path, (old, old))
    os.utime(ancient_live, (time.time() - 3 * 86400,) * 2)
    folder_like = tmp_path / temp_name("out.csv", _dead_pid())
    folder_like.mkdir()  # not a regular file: never removed
    os.utime(folder_like, (old, old))
    with atomic_write(out) as handle:
        handle.write("result")
    assert not dead.exists() and not ancient_live.exists()
    assert all(path.exists() for path in keep) and folder_like.is_dir()
    assert remove_stale_temps(out) == []


def test_debris_of_a_killed_writer_is_cleaned_up_by_the_next_write(tmp_path: Path) -> None:
    out = tmp_path / "tags.jsonl"
    out.write_text("previous results\n")
    script = (
        "import sys, time\n"
        "from sdltag.paths import atomic_write\n"
        "with atomic_write(sys.argv[1]) as h:\n"
        "    h.write('half' * 1000); h.flush(); print('writing', flush=True); time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, env=env, text=True)
    assert child.stdout is not None and child.stdout.readline() == "writing\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    (debris,) = _temps(tmp_path)
    assert debris.startswith(f".tags.jsonl{TEMP_MARK}{child.pid}-")
    assert out.read_text() == "previous results\n"  # the kill never touched the output
    old = time.time() - 10
    os.utime(tmp_path / debris, (old, old))
    with atomic_write(out) as handle:
        handle.write("new results\n")
    assert out.read_text() == "new results\n" and _temps(tmp_path) == []
