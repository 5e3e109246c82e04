"""The restricted unpickler: plain data and numpy arrays load; any other global is refused unexecuted."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zs_sdl_layout as zs

from sdltag import safepickle
from sdltag.errors import SdltagError
from sdltag.safepickle import UnsafePickleError, safe_load, safe_loads


class _Reduce:
    """Pickles as a call of ``func(*args)``: what a malicious pickle does."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_data_and_numpy_arrays_round_trip(protocol: int) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T  # Fortran order, like the official word vectors
    data = {
        0: "abandoned",
        "vectors": array,
        "ints": np.array([[1, -2]], dtype=np.int16),
        "misc": [np.float64(2.5), np.int64(3), b"bytes", {1, 2}, frozenset({3}), bytearray(b"z"), (None, True)],
    }
    loaded = safe_loads(pickle.dumps(data, protocol=protocol))
    assert loaded[0] == "abandoned"
    np.testing.assert_array_equal(loaded["vectors"], array)
    assert loaded["vectors"].dtype == np.float32
    assert loaded["ints"].dtype == np.int16 and loaded["ints"].tolist() == [[1, -2]]
    assert loaded["misc"] == data["misc"]


@pytest.mark.parametrize(
    ("payload", "name"),
    [
        (lambda marker: _Reduce(os.system, f"touch {marker}"), "system"),
        (lambda marker: _Reduce(subprocess.Popen, ["touch", str(marker)]), "Popen"),
        (lambda marker: _Reduce(eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
        (lambda marker: _Reduce(getattr, "text", "upper"), "builtins.getattr"),
        (lambda marker: {"vectors": np.zeros(2), "x": [_Reduce(os.system, f"touch {marker}")]}, "system"),
    ],
)
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, payload, name: str, protocol: int) -> None:
    marker = tmp_path / "pwned"
    data = pickle.dumps(payload(marker), protocol=protocol)
    with pytest.raises(UnsafePickleError, match=name):
        safe_loads(data)
    assert not marker.exists(), "the refused global was executed"
    # Through the file API: a user-facing error naming the file and the refused global.
    path = tmp_path / "evil.pickle"
    path.write_bytes(data)
    with pytest.raises(SdltagError, match=rf"evil\.pickle: refused global .*{name}"):
        safe_load(path, "--wordvecs pickle")
    assert not marker.exists()


def test_codecs_encode_only_for_latin1() -> None:
    import codecs

    assert safe_loads(pickle.dumps(b"\x00\xff", protocol=2)) == b"\x00\xff"  # bytes via _codecs.encode
    with pytest.raises(pickle.UnpicklingError, match="codec"):
        safe_loads(pickle.dumps(_Reduce(codecs.encode, "x", "rot13"), protocol=2))


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "not found"), (b"", "not a readable"), (pickle.dumps(list(range(1000)))[:-50], "truncated or corrupt")],
)
def test_unreadable_files_name_the_file(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "classes.pickle"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SdltagError, match=rf"classes\.pickle.*{message}"):
        safe_load(path, "--classes pickle")


def test_official_pickles_load() -> None:
    zs.require_fixtures()
    classes = safe_load(zs.CLASSES)
    unseen = safe_load(zs.UNSEEN)
    vectors = safe_load(zs.WORDVECS)
    assert isinstance(classes, dict) and sorted(classes) == list(range(1006))
    assert isinstance(unseen, list) and len(unseen) == 81 and set(unseen) <= set(classes.values())
    assert isinstance(vectors, np.ndarray) and vectors.shape == (300, 1006) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=0), 1.0, atol=1e-5)


# set(bytearray(10**9)) in 44 bytes: a gigabyte and ten seconds of work before the size limits.
AMPLIFIER = b"cbuiltins\nset\ncbuiltins\nbytearray\nJ\x00\xca\x9a;\x85R\x85R."


def test_a_tiny_file_cannot_ask_for_a_gigabyte(tmp_path: Path) -> None:
    assert len(AMPLIFIER) < 50
    path = tmp_path / "classes.pickle"
    path.write_bytes(AMPLIFIER)
    started = time.perf_counter()
    with pytest.raises(SdltagError, match=r"classes\.pickle: .*bytearray\(int\)"):
        safe_load(path, "--classes pickle")
    assert time.perf_counter() - started < 1.0
    # bytearray from its bytes (how pickles store one) still loads, at every protocol
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert safe_loads(pickle.dumps(bytearray(b"\x00ab"), protocol=protocol)) == bytearray(b"\x00ab")


def test_numpy_reconstruct_cannot_allocate_a_huge_array() -> None:
    # _reconstruct(ndarray, (10**9,), b"b"): numpy allocates the shape it is given, before any data.
    payload = b"cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\xca\x9a;\x85C\x01b\x87R."
    started = time.perf_counter()
    with pytest.raises(pickle.UnpicklingError, match="shape"):
        safe_loads(payload)
    assert time.perf_counter() - started < 1.0


def test_deeply_nested_containers_are_refused_without_crashing(tmp_path: Path) -> None:
    # A dict keyed by a tuple nested a million deep (1 MB): hashing it overflowed the C stack (segfault).
    path = tmp_path / "deep.pickle"
    path.write_bytes(b"\x80\x02})" + b"\x85" * 1_000_000 + b"X\x01\x00\x00\x00xs.")
    code = (
        "import sys; from sdltag.safepickle import safe_load; from sdltag.errors import SdltagError\n"
        f"try: safe_load({str(path)!r}, '--classes pickle')\n"
        "except SdltagError as exc: print(exc); sys.exit(2)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-500:]
    assert "deep.pickle" in done.stdout and "nested more than" in done.stdout
    # Ordinary nesting (a few levels, as data files have) loads.
    nested: object = "leaf"
    for depth in range(300):
        nested = (nested,) if depth % 3 == 0 else [nested] if depth % 3 == 1 else {"k": nested}
    assert safe_loads(pickle.dumps(nested, protocol=4)) == nested


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safepickle, "MAX_FILE_BYTES", 1000)
    path = tmp_path / "big.pickle"
    path.write_bytes(pickle.dumps(list(range(1000))))
    with pytest.raises(SdltagError, match=r"big\.pickle: the --wordvecs pickle is 0 MB, over the 0 MB"):
        safe_load(path, "--wordvecs pickle")


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ({0: "sky", "1": "cat", 2.5: "dog"}, r"keys must be 0\.\.N-1, integers .*\(found the key '1'\)"),
        ({(1, 2): "sky"}, r"keys must be 0\.\.N-1, integers"),
        ({}, r"keys must be 0\.\.N-1, integers"),
        ([], "lists no classes"),
        (["sky", 3], "every class name must be a non-empty string"),
        (np.zeros(3), "expected a dict index -> class name or a list of names, got ndarray"),
    ],
)
def test_import_official_refuses_odd_class_pickles_in_one_line(tmp_path: Path, classes, message: str) -> None:
    from typer.testing import CliRunner

    from sdltag.cli import app

    classes_path, vectors_path = tmp_path / "classes.pickle", tmp_path / "wordvecs.pickle"
    classes_path.write_bytes(pickle.dumps(classes))
    vectors_path.write_bytes(pickle.dumps(np.ones((300, 2), dtype=np.float32)))
    args = ["import-official", str(tmp_path / "missing.pth"), "--wordvecs", str(vectors_path)]
    result = CliRunner().invoke(app, [*args, "--classes", str(classes_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("sdltag: error:")]
    assert len(errors) == 1 and "classes.pickle" in errors[0] and re.search(message, errors[0]), result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
