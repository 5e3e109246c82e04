"""A restricted unpickler for data files: builtin containers and numpy arrays, nothing else.

``pickle.load`` runs whatever callable a file names, so a pickle from the internet can
execute code. ``safe_load`` resolves only an allow-list of globals: the few numpy
functions and classes that rebuild an ``ndarray`` (and numpy scalars), plus harmless
builtin container types. Any other global (``os.system``, ``subprocess.Popen``, ...)
is refused *before* it is called, with an error naming it.

Used for the official SDL release's word-vector and class-list pickles. No torch.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from sdltag.errors import SdltagError

# (module, name) pairs a data pickle may name. Strings, numbers, lists, dicts and tuples
# need no global at all; these cover numpy arrays, a few builtin containers and bytes.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # Protocol 5 rebuilds arrays with numeric._frombuffer(buffer, dtype, shape, order).
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        # Protocol 2 stores bytes (e.g. an array's buffer) as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"refused global {module}.{name} (only builtin containers and numpy arrays are allowed)")
        self.module, self.name = module, name


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    """The one use of ``_codecs.encode`` in data pickles; any other codec is refused."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


def _resolve(module: str, name: str) -> Any:
    """The allowed object for (module, name), taken from numpy/builtins directly (no import by name)."""
    if module == "_codecs":
        return _encode_latin1
    if module == "builtins":
        return {"set": set, "frozenset": frozenset, "bytearray": bytearray}[name]
    import numpy as np

    if module == "numpy":
        return {"ndarray": np.ndarray, "dtype": np.dtype}[name]
    try:  # numpy >= 2 keeps the implementation in numpy._core; old pickles name numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return getattr(numeric if module.endswith(".numeric") else multiarray, name)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns allow-listed globals."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # how protocols 0-2 (and Python 2) name builtins
            module = "builtins"
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(module, name)
        return _resolve(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id (not a plain data pickle)")


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` with the allow-list; raises ``pickle.UnpicklingError`` on anything else."""
    # latin1: how numpy recommends reading Python 2 array pickles (their buffers are str).
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def safe_load(path: Path | str, what: str = "pickle") -> Any:
    """Load a data pickle from ``path``, or raise ``SdltagError`` naming the file and the problem.

    ``what`` describes the file in messages (e.g. "--wordvecs pickle").
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SdltagError(f"{path}: {what} not found. Pass the path of an existing file.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SdltagError(f"{path}: cannot read the {what} ({exc.strerror or exc}).") from None
    try:
        return safe_loads(data)
    except UnsafePickleError as exc:
        raise SdltagError(
            f"{path}: {exc}; this {what} is not a plain data file and was not loaded. "
            "Use the file from the official release."
        ) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        MemoryError,
        UnicodeDecodeError,
    ) as exc:
        raise SdltagError(
            f"{path}: not a readable {what} ({type(exc).__name__}: {exc}). "
            "The file may be truncated or corrupt; download it again."
        ) from None
