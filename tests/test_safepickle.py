"""The restricted unpickler: plain data and numpy arrays load; any other global is refused unexecuted."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zs_sdl_layout as zs

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
