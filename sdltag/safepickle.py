"""A restricted unpickler for data files: builtin containers and numpy arrays, nothing else.

``pickle.load`` runs whatever callable a file names, so a pickle from the internet can
execute code. ``safe_load`` resolves only an allow-list of globals: the few numpy
functions and classes that rebuild an ``ndarray`` (and numpy scalars), plus harmless
builtin container types. Any other global (``os.system``, ``subprocess.Popen``, ...)
is refused *before* it is called, with an error naming it.

Sizes are bounded too, so a small file cannot make the loader allocate or loop without
end: the file (``MAX_FILE_BYTES``; arrays, bytes and containers are built from its bytes),
what one call may allocate beyond that (``bytearray(n)`` is refused, and numpy's
``_reconstruct``, which pickles call with an empty shape, may not ask for more than
``MAX_RECONSTRUCT_BYTES``) and the nesting depth of containers (``MAX_DEPTH``: deeper
tuples would overflow the C stack when hashed), checked by scanning the opcodes before
anything is built.

Used for the official SDL release's word-vector and class-list pickles. No torch.
"""

from __future__ import annotations

import io
import pickle
import pickletools
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


# The official pickles are a few MB and nest 3-4 levels; these bounds are far above any data file.
MAX_FILE_BYTES = 1 << 30
MAX_RECONSTRUCT_BYTES = 1 << 20
MAX_DEPTH = 1000


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


def _bytearray(*args: Any) -> bytearray:
    """``bytearray`` as pickles call it (no argument, bytes, or str + codec); ``bytearray(n)`` is refused.

    A data pickle never stores a size: ``bytearray(10**9)`` is how a tiny file asks for a gigabyte.
    """
    if args and not isinstance(args[0], (bytes, bytearray, str)):
        raise pickle.UnpicklingError(
            f"refused bytearray({type(args[0]).__name__}) (a data pickle stores the bytes, not a size)"
        )
    return bytearray(*args)


def _checked_reconstruct(reconstruct: Any) -> Any:
    """numpy's ``_reconstruct(subtype, shape, typecode)``, refusing a shape over ``MAX_RECONSTRUCT_BYTES``.

    Array pickles call it with shape ``(0,)`` and fill the array from the file's bytes afterwards.
    """

    def build(subtype: Any, shape: Any, typecode: Any) -> Any:
        import numpy as np

        if subtype is not np.ndarray:
            raise pickle.UnpicklingError("refused _reconstruct of a type other than numpy.ndarray")
        dims = shape if isinstance(shape, tuple) else (shape,)
        if not all(isinstance(n, int) and n >= 0 for n in dims):
            raise pickle.UnpicklingError(f"refused _reconstruct with shape {shape!r}")
        try:
            total = np.dtype(typecode.decode("latin1") if isinstance(typecode, bytes) else typecode).itemsize
        except (TypeError, ValueError):
            raise pickle.UnpicklingError(f"refused _reconstruct with type code {typecode!r}") from None
        for n in dims:
            total *= n
            if total > MAX_RECONSTRUCT_BYTES:
                raise pickle.UnpicklingError(f"refused an empty array of shape {shape} (a size, not data)")
        return reconstruct(subtype, shape, typecode)

    return build


def _resolve(module: str, name: str) -> Any:
    """The allowed object for (module, name), taken from numpy/builtins directly (no import by name)."""
    if module == "_codecs":
        return _encode_latin1
    if module == "builtins":
        return {"set": set, "frozenset": frozenset, "bytearray": _bytearray}[name]
    import numpy as np

    if module == "numpy":
        return {"ndarray": np.ndarray, "dtype": np.dtype}[name]
    try:  # numpy >= 2 keeps the implementation in numpy._core; old pickles name numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]  # the same modules, numpy 1.x names
    found = getattr(numeric if module.endswith(".numeric") else multiarray, name)
    return _checked_reconstruct(found) if name == "_reconstruct" else found


# Opcodes that build a container from the items above the topmost mark, or from a fixed number of items.
_FROM_MARK = {"TUPLE", "LIST", "DICT", "FROZENSET", "INST", "OBJ"}
_ADD_FROM_MARK = {"APPENDS", "SETITEMS", "ADDITEMS"}
_FIXED = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
# Opcodes that pop some items and push one result built from them.
_COMBINE = {"REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3, "STACK_GLOBAL": 2, "BINPERSID": 1}
# Opcodes that pop some items into the container below them.
_ADD = {"APPEND": 1, "SETITEM": 2, "BUILD": 1}


def check_structure(data: bytes, max_depth: int = MAX_DEPTH) -> None:
    """Scan the opcodes (building nothing) and refuse containers nested deeper than ``max_depth``.

    Tracks each stack entry's nesting depth; memo entries keep the depth they had when stored,
    which is exact for tuples and frozensets (the only containers that are hashed, recursively).
    Raises ``pickle.UnpicklingError`` (also for a truncated or malformed opcode stream).
    """
    stack: list[int] = []
    marks: list[list[int]] = []
    memo: dict[int, int] = {}

    def pop_mark() -> list[int]:
        nonlocal stack
        if not marks:
            raise pickle.UnpicklingError("malformed pickle (no mark)")
        items, stack = stack, marks.pop()
        return items

    def pop(count: int) -> list[int]:
        if len(stack) < count:
            raise pickle.UnpicklingError("malformed pickle (stack underflow)")
        items = stack[len(stack) - count :]
        del stack[len(stack) - count :]
        return items

    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name == "MARK":
                marks.append(stack)
                stack = []
            elif name in _FROM_MARK:
                items = pop_mark()
                stack.append(1 + max(items, default=0))
            elif name in _ADD_FROM_MARK:
                items = pop_mark()
                if not stack:
                    raise pickle.UnpicklingError("malformed pickle (nothing to add to)")
                stack[-1] = max(stack[-1], 1 + max(items, default=0))
            elif name in _FIXED:
                stack.append(1 + max(pop(_FIXED[name])))
            elif name in _COMBINE:
                stack.append(1 + max(pop(_COMBINE[name])))
            elif name in _ADD:
                items = pop(_ADD[name])
                if not stack:
                    raise pickle.UnpicklingError("malformed pickle (nothing to add to)")
                stack[-1] = max(stack[-1], 1 + max(items))
            elif name == "POP":
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(pop(1)[0])
                stack.append(stack[-1])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg if isinstance(arg, int) else -1] = pop(1)[0]
                stack.append(memo[arg if isinstance(arg, int) else -1])
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else 0
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg if isinstance(arg, int) else -1, 0))
            elif name in ("PROTO", "FRAME", "STOP", "READONLY_BUFFER"):
                pass
            else:  # every other opcode pushes one new object built from its argument
                stack.append(0)
            if stack and stack[-1] > max_depth:
                raise pickle.UnpicklingError(f"refused: containers nested more than {max_depth} deep")
    except ValueError as exc:  # pickletools' word for a truncated or unknown opcode
        raise pickle.UnpicklingError(f"malformed pickle ({exc})") from None


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
    check_structure(data)
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
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SdltagError(
                f"{path}: the {what} is {size / 1e6:.0f} MB, over the {MAX_FILE_BYTES >> 20} MB a data pickle "
                "may have. Use the file from the official release."
            )
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
        RecursionError,
        UnicodeDecodeError,
    ) as exc:
        raise SdltagError(
            f"{path}: not a readable {what} ({type(exc).__name__}: {exc}). "
            "The file may be truncated or corrupt; download it again."
        ) from None
