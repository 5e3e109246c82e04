"""OPENBLAS_CORETYPE is set only when safe: AVX-512 present, unset by the user, numpy not loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdltag import _platform


def test_not_set_when_numpy_is_loaded_or_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    import numpy  # noqa: F401

    assert _platform.tune_openblas() is False
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert _platform.tune_openblas() is False


def test_cli_sets_it_only_on_avx512_cpus() -> None:
    code = "import os, sdltag.cli; print(os.environ.get('OPENBLAS_CORETYPE', '-'))"
    env = {"PATH": "/usr/bin:/bin", "SDLTAG_HOME": "/tmp"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    expected = "SkylakeX" if _platform.cpu_has_avx512() else "-"
    assert out.stdout.strip() == expected
    env["OPENBLAS_CORETYPE"] = "Haswell"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Haswell"


def test_cli_keeps_numpy_blas_to_one_thread_unless_the_user_chose() -> None:
    code = "import os, sdltag.cli; print(os.environ.get('OPENBLAS_NUM_THREADS', '-'))"
    env = {"PATH": "/usr/bin:/bin", "SDLTAG_HOME": "/tmp"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    env["OPENBLAS_NUM_THREADS"] = "4"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "4"


def test_blas_threads_not_touched_once_numpy_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    import numpy  # noqa: F401

    assert _platform.single_thread_blas() is False
    assert "OPENBLAS_NUM_THREADS" not in __import__("os").environ
