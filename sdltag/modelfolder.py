"""The model folder: an ONNX graph, a manifest and the seen labels' embeddings.

Layout of a model folder (format version 1)::

    MODEL_DIR/
      model.onnx             input "images" (B, 3, H, W) float32, already normalised;
                             output "principal_vectors" (B, M, d) float32
      manifest.json          everything tagging must match (see ``Manifest``)
      label_embeddings.npy   float32 (L, d), L2-normalised rows: the seen labels,
                             then the manifest's ``unseen`` labels, in manifest order
      model.int8.onnx        optional: the same graph quantised to 8 bits (``sdltag quantize
                             --attach``), listed under the manifest's ``onnx_int8``
      MODEL_CARD.md          optional, human-readable
      checkpoint.pt          optional: the torch weights (``sdltag train``, for ``--init``)

Nothing else belongs in a model folder: ``check_output_folder`` replaces an existing
``--out`` only when it is a model folder holding these files alone.

Everything that must agree between training and tagging (input size, resize rule,
mean/std, M, d, the embedder) is read from the manifest, never retyped. This module
imports no torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdltag.errors import SdltagError
from sdltag.hashing import file_sha256
from sdltag.paths import atomic_write

FORMAT_NAME = "sdltag-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"
PRECISIONS = ("float", "int8")
EMBEDDINGS_FILE = "label_embeddings.npy"
MODEL_CARD_FILE = "MODEL_CARD.md"
CHECKPOINT_FILE = "checkpoint.pt"
# Every file sdltag writes into a model folder; ``check_output_folder`` replaces nothing else.
MODEL_FILES = frozenset({MANIFEST, ONNX_FILE, INT8_ONNX_FILE, EMBEDDINGS_FILE, MODEL_CARD_FILE, CHECKPOINT_FILE})
# Leftovers of an interrupted write: ``atomic_write``'s temporary files and ``attach_int8``'s partial graph.
_MODEL_DEBRIS = re.compile(
    r"\.(manifest\.json|MODEL_CARD\.md|checkpoint\.pt|model\.int8\.onnx)\.(sdltag-tmp-\d+-\w+|.+\.tmp|partial-\d+)"
)
RESIZE_RULES = ("squash", "shorter_center_crop")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
HEAD_LAYOUTS = ("contiguous", "interleaved")
EMBEDDER_KINDS = ("sentence-transformers", "word-vectors")
MAX_INPUT_SIDE = 4096
MAX_ROWS = 4096
MAX_DIM = 1 << 16
VERIFIED_GRAPHS = "verified-graphs.json"  # in the cache folder: graphs already hashed, by file identity
_VERIFIED_KEEP = 256


def _identity(path: Path) -> str:
    """What changes whenever a file's bytes may have: path, device, inode, size, mtime and ctime.

    ``ctime`` cannot be set back by a user, so a same-size replacement with a restored mtime
    still gets a new identity.
    """
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _verified_path() -> Path:
    from sdltag.paths import cache_dir

    return cache_dir() / VERIFIED_GRAPHS


def _read_verified() -> dict[str, str]:
    try:
        data = json.loads(_verified_path().read_text(encoding="utf-8"))
        entries = data.get("graphs") if isinstance(data, dict) else None
        return {k: v for k, v in entries.items() if isinstance(v, str)} if isinstance(entries, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def graph_sha256(path: Path) -> str:
    """The sha256 of an ONNX graph, hashed once per file identity (``_identity``) and remembered.

    The record lives in the cache folder (``verified-graphs.json``, the last 256 graphs); if it
    cannot be written the file is simply hashed again next time.
    """
    key = _identity(path)
    known = _read_verified()
    if key in known:
        return known[key]
    digest = file_sha256(path)
    if _identity(path) != key:  # changed while being read: hash what is there now, remember nothing
        return file_sha256(path)
    known = _read_verified()
    known.pop(key, None)
    known[key] = digest
    entries = dict(list(known.items())[-_VERIFIED_KEEP:])
    try:
        with atomic_write(_verified_path()) as out:
            out.write(json.dumps({"graphs": entries}, indent=0) + "\n")
    except OSError:
        pass
    return digest


class ManifestFieldError(ValueError):
    """A manifest field of the wrong type, range or length; ``field`` is its dotted name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field!r} {problem}")
        self.field = field


def _shown(value: Any) -> str:
    """A short rendering of a bad value for a message."""
    if isinstance(value, (dict, list)):
        return f"a{'n' if isinstance(value, dict) else ''} {'object' if isinstance(value, dict) else 'list'}"
    text = repr(value) if isinstance(value, float) else json.dumps(value, ensure_ascii=False)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate shown, not raised
    return text if len(text) <= 40 else text[:37] + "..."


def _dict(data: Any, field: str, *, optional: bool = False) -> dict[str, Any]:
    if data is None and optional:
        return {}
    if not isinstance(data, dict):
        raise ManifestFieldError(field, f"must be an object, not {_shown(data)}")
    return data


def _str(value: Any, field: str, *, choices: tuple[str, ...] = (), empty: bool = True) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise ManifestFieldError(field, f"must be {'a' if empty else 'a non-empty'} string, not {_shown(value)}")
    if choices and value not in choices:
        raise ManifestFieldError(field, f"must be one of {', '.join(choices)}, not {_shown(value)}")
    return value


def _int(value: Any, field: str, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ManifestFieldError(field, f"must be an integer {bounds}, not {_shown(value)}")
    return value


def _float(value: Any, field: str, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 1e30  # NaN fails too
    if not ok or (positive and value <= 0):
        raise ManifestFieldError(
            field, f"must be a finite {'positive ' if positive else ''}number, not {_shown(value)}"
        )
    return float(value)


def _three_floats(value: Any, field: str, *, positive: bool = False) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ManifestFieldError(field, f"must be a list of 3 numbers, not {_shown(value)}")
    first, second, third = (_float(v, f"{field}[{i}]", positive=positive) for i, v in enumerate(value))
    return first, second, third


# Characters XML 1.0 cannot hold: a label with one would make every sidecar it is written to unreadable.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _labels(value: Any, field: str) -> list[str]:
    if not isinstance(value, list):
        raise ManifestFieldError(field, f"must be a list of label strings, not {_shown(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ManifestFieldError(f"{field}[{i}]", f"must be a non-empty string, not {_shown(item)}")
        bad = _NOT_XML_CHAR.search(item)
        if bad is not None:
            raise ManifestFieldError(f"{field}[{i}]", f"holds U+{ord(bad.group()):04X}, which XML cannot store")
    return list(value)


def _sha256(value: Any, field: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ManifestFieldError(field, f"must be 64 lowercase hex digits (a sha256), not {_shown(value)}")
    return value


def _graph_entry(data: Any, field: str, *, optional_hash: bool) -> dict[str, Any]:
    """The ``onnx`` / ``onnx_int8`` entry: file, tensor names, sha256 and size (other keys are kept)."""
    entry = dict(_dict(data, field, optional=True))
    if "file" in entry:
        name = _str(entry["file"], f"{field}.file", empty=False)
        if name != Path(name).name or name in (".", ".."):
            raise ManifestFieldError(f"{field}.file", f"must be a file name in the model folder, not {_shown(name)}")
    for key in ("input", "output"):
        if entry.get(key) is not None:
            _str(entry[key], f"{field}.{key}", empty=False)
    if entry.get("sha256") is not None or not optional_hash:
        _sha256(entry.get("sha256"), f"{field}.sha256")
    if entry.get("bytes") is not None:
        _int(entry["bytes"], f"{field}.bytes", 0)
    if entry.get("opset") is not None:
        _int(entry["opset"], f"{field}.opset", 1, 1000)
    return entry


def _calibration(data: Any) -> dict[str, Any] | None:
    """``{"method": "platt", "seen": {"a", "b"}, "unseen": {"a", "b"} | absent}`` or None."""
    if data is None or data == {}:
        return None
    data = _dict(data, "calibration")
    _str(data.get("method"), "calibration.method", choices=("platt",))
    for group in ("seen", "unseen"):
        if group == "seen" or data.get(group) is not None:
            params = _dict(data.get(group), f"calibration.{group}")
            for key in ("a", "b"):
                _float(params.get(key), f"calibration.{group}.{key}")
    return data


def _sidecar(data: Any) -> dict[str, Any] | None:
    """``{"threshold": 0..1, "max_keywords": 1..100, ...}`` (the model's advice for sidecar keywords) or None."""
    if data is None:
        return None
    data = _dict(data, "sidecar")
    threshold = _float(data.get("threshold"), "sidecar.threshold")
    if not 0.0 <= threshold <= 1.0:
        raise ManifestFieldError("sidecar.threshold", f"must be from 0 to 1, not {_shown(threshold)}")
    _int(data.get("max_keywords"), "sidecar.max_keywords", 1, 100)
    return data


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the model's input tensor."""

    height: int
    width: int
    resize: str = "squash"  # "squash": resize to HxW ignoring aspect; "shorter_center_crop"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "size": [self.height, self.width],
            "resize": self.resize,
            "interpolation": self.interpolation,
            "scale": "0-1",
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_json(cls, data: Any, field: str = "input") -> InputSpec:
        """Parse and validate; raises ``ManifestFieldError`` naming the bad field."""
        data = _dict(data, field)
        size = data.get("size")
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise ManifestFieldError(f"{field}.size", f"must be [height, width], not {_shown(size)}")
        height, width = (_int(v, f"{field}.size", 1, MAX_INPUT_SIDE) for v in size)
        if data.get("scale", "0-1") != "0-1":
            raise ManifestFieldError(f"{field}.scale", f'must be "0-1", not {_shown(data.get("scale"))}')
        return cls(
            height=height,
            width=width,
            resize=_str(data.get("resize", "squash"), f"{field}.resize", choices=RESIZE_RULES),
            interpolation=_str(data.get("interpolation", "bilinear"), f"{field}.interpolation", choices=INTERPOLATIONS),
            mean=_three_floats(data.get("mean", [0.0, 0.0, 0.0]), f"{field}.mean"),
            std=_three_floats(data.get("std", [1.0, 1.0, 1.0]), f"{field}.std", positive=True),
        )


@dataclass(frozen=True)
class EmbedderSpec:
    """The text embedder a model's label space belongs to.

    ``kind`` is "sentence-transformers" or "word-vectors"; ``id`` is the name plus a
    content hash of the weights (e.g. ``all-MiniLM-L6-v2@sha256:1a2b...``).
    """

    kind: str
    name: str
    id: str
    dim: int

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "id": self.id, "dim": self.dim}

    @classmethod
    def from_json(cls, data: Any, field: str = "embedder") -> EmbedderSpec:
        """Parse and validate; raises ``ManifestFieldError`` naming the bad field."""
        data = _dict(data, field)
        return cls(
            kind=_str(data.get("kind"), f"{field}.kind", choices=EMBEDDER_KINDS),
            name=_str(data.get("name"), f"{field}.name", empty=False),
            id=_str(data.get("id"), f"{field}.id", empty=False),
            dim=_int(data.get("dim"), f"{field}.dim", 1, MAX_DIM),
        )


@dataclass
class Manifest:
    """The contents of ``manifest.json``."""

    name: str
    backbone: str
    backbone_config: dict[str, Any]
    input: InputSpec
    rows: int
    dim: int
    embedder: EmbedderSpec
    seen_labels: list[str]
    unseen_labels: list[str] = field(default_factory=list)
    head_layout: str = "contiguous"
    calibration: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    model_card: dict[str, Any] = field(default_factory=dict)
    onnx: dict[str, Any] = field(default_factory=dict)
    # The optional 8-bit graph: file, sha256, bytes and how it was made (``sdltag quantize --attach``).
    onnx_int8: dict[str, Any] | None = None
    # The model's advice for keywords written to sidecars (XMP, captions): a calibrated-score cut-off
    # and a count, chosen on validation photos by whoever trained it (see ``sdltag.sidecars``).
    sidecar: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    # Top-level entries this version does not know (a later version's provenance, say), kept as read.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = {
            **self.extra,
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "name": self.name,
            "backbone": {"name": self.backbone, "config": self.backbone_config},
            "input": self.input.to_json(),
            "rows": self.rows,
            "dim": self.dim,
            "head_layout": self.head_layout,
            "onnx": self.onnx,
            "embedder": self.embedder.to_json(),
            "labels": {"seen": self.seen_labels, "unseen": self.unseen_labels, "embeddings": EMBEDDINGS_FILE},
            "calibration": self.calibration,
            "provenance": self.provenance,
            "model_card": self.model_card,
        }
        if self.onnx_int8:
            data["onnx_int8"] = self.onnx_int8
        if self.sidecar:
            data["sidecar"] = self.sidecar
        return data

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse and validate every field tagging uses; raises ``ManifestFieldError`` naming the bad one.

        Unknown entries are accepted (and kept): a newer sdltag of the same format version may add
        optional ones, such as provenance records.
        """
        data = _dict(data, "manifest")
        version = _int(data.get("format_version"), "format_version", 1)
        backbone = _dict(data.get("backbone"), "backbone")
        rows = _int(data.get("rows"), "rows", 1, MAX_ROWS)
        dim = _int(data.get("dim"), "dim", 1, MAX_DIM)
        embedder = EmbedderSpec.from_json(data.get("embedder"))
        if embedder.dim != dim:
            raise ManifestFieldError("embedder.dim", f"is {embedder.dim} but the model's dim is {dim}")
        labels = _dict(data.get("labels"), "labels")
        seen = _labels(labels.get("seen"), "labels.seen")
        unseen = _labels(labels.get("unseen", []), "labels.unseen")
        if not seen and not unseen:
            raise ManifestFieldError("labels", "lists no labels")
        if labels.get("embeddings", EMBEDDINGS_FILE) != EMBEDDINGS_FILE:
            raise ManifestFieldError("labels.embeddings", f"must be {EMBEDDINGS_FILE!r}")
        int8 = data.get("onnx_int8")
        known = {
            "format",
            "format_version",
            "name",
            "backbone",
            "input",
            "rows",
            "dim",
            "head_layout",
            "onnx",
            "embedder",
            "labels",
            "calibration",
            "provenance",
            "model_card",
            "onnx_int8",
            "sidecar",
        }
        return cls(
            name=_str(data.get("name", ""), "name"),
            backbone=_str(backbone.get("name"), "backbone.name", empty=False),
            backbone_config=dict(_dict(backbone.get("config"), "backbone.config", optional=True)),
            input=InputSpec.from_json(data.get("input")),
            rows=rows,
            dim=dim,
            embedder=embedder,
            seen_labels=seen,
            unseen_labels=unseen,
            head_layout=_str(data.get("head_layout", "contiguous"), "head_layout", choices=HEAD_LAYOUTS),
            calibration=_calibration(data.get("calibration")),
            provenance=dict(_dict(data.get("provenance"), "provenance", optional=True)),
            model_card=dict(_dict(data.get("model_card"), "model_card", optional=True)),
            onnx=_graph_entry(data.get("onnx"), "onnx", optional_hash=True),
            onnx_int8=_graph_entry(int8, "onnx_int8", optional_hash=False) if int8 else None,
            sidecar=_sidecar(data.get("sidecar")),
            format_version=version,
            extra={k: v for k, v in data.items() if k not in known},
        )


@dataclass
class ModelFolder:
    """A validated model folder. ``label_vectors`` rows follow ``all_labels``.

    ``precision`` says which graph runs: ``float`` (``model.onnx``) or ``int8`` (the
    attached ``model.int8.onnx``); ``onnx_path`` and ``model_id`` follow it, so the index
    keeps the two graphs' vectors apart.
    """

    path: Path
    manifest: Manifest
    _label_vectors: np.ndarray | None = None
    precision: str = "float"

    @property
    def onnx_path(self) -> Path:
        if self.precision == "int8" and self.manifest.onnx_int8:
            return self._int8_path
        return self.path / ONNX_FILE

    @property
    def _int8_path(self) -> Path:
        """Where the manifest says the 8-bit graph is (whether or not it runs)."""
        return self.path / str((self.manifest.onnx_int8 or {}).get("file", INT8_ONNX_FILE))

    @property
    def model_id(self) -> str:
        """Identity of the image model that runs: the sha256 of its ONNX file (recorded when written)."""
        if self.precision == "int8" and self.manifest.onnx_int8:
            return str(self.manifest.onnx_int8["sha256"])
        return str(self.manifest.onnx["sha256"])

    @property
    def has_int8(self) -> bool:
        """Whether the manifest lists an 8-bit graph (``with_precision`` checks its file)."""
        return bool(self.manifest.onnx_int8)

    def with_precision(self, precision: str) -> ModelFolder:
        """This folder running its ``float`` or ``int8`` graph; refuses a missing or damaged 8-bit file."""
        if precision not in PRECISIONS:
            raise SdltagError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
        if precision == "int8":
            if not self.manifest.onnx_int8:
                raise SdltagError(
                    f"{self.path}: this model has no 8-bit graph. Add one with `sdltag quantize {self.path} "
                    "IMAGES --attach`, or use --precision float."
                )
            int8 = self._int8_path
            expected = self.manifest.onnx_int8.get("bytes")
            if not int8.is_file():
                raise _refuse(int8, "missing (the manifest lists it)", "Run `sdltag quantize --attach` again.")
            if expected is not None and int8.stat().st_size != int(expected):
                raise _refuse(
                    int8,
                    f"is {int8.stat().st_size} bytes but was {expected} when written (truncated or corrupt)",
                    "Run `sdltag quantize --attach` again, or use --precision float.",
                )
        return ModelFolder(self.path, self.manifest, self._label_vectors, precision)

    @property
    def all_labels(self) -> list[str]:
        return self.manifest.seen_labels + self.manifest.unseen_labels

    @property
    def label_vectors(self) -> np.ndarray:
        """(L, d) float32 unit vectors of ``all_labels``."""
        if self._label_vectors is None:
            self._label_vectors = _load_embeddings(self.path / EMBEDDINGS_FILE, len(self.all_labels), self.manifest.dim)
        return self._label_vectors

    def verify_onnx(self) -> None:
        """Check the running ONNX file's sha256 against the manifest before its vectors are trusted.

        The file is hashed once per identity (path, device, inode, size, mtime, ctime): later
        checks of an unchanged file read a small record in the cache folder (``graph_sha256``).
        """
        expected = self.model_id
        try:
            actual = graph_sha256(self.onnx_path)
        except OSError as exc:
            raise _refuse(self.onnx_path, f"cannot read the graph ({exc.strerror or exc})", _COPY_AGAIN) from None
        if actual != expected:
            raise _refuse(
                self.onnx_path,
                f"the file does not match the sha256 in {MANIFEST} (corrupt or replaced)",
                _COPY_AGAIN,
            )


_COPY_AGAIN = "Re-export the model with `sdltag export` or copy the model folder again."


def _refuse(path: Path, problem: str, fix: str) -> SdltagError:
    return SdltagError(f"{path}: {problem}. {fix}")


def _load_embeddings(path: Path, rows: int, dim: int) -> np.ndarray:
    fix = "Re-export the model folder with `sdltag export`."
    if not path.is_file():
        raise _refuse(path, "missing label embeddings file", fix)
    try:
        vectors = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _refuse(path, f"cannot read label embeddings ({exc})", fix) from None
    if vectors.ndim != 2 or vectors.shape != (rows, dim):
        raise _refuse(path, f"label embeddings have shape {vectors.shape}, the manifest expects ({rows}, {dim})", fix)
    if not np.all(np.isfinite(vectors)):
        raise _refuse(path, "label embeddings contain NaN or infinity", fix)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _check_embeddings_header(path: Path, rows: int, dim: int) -> None:
    """The ``.npy`` header (not the data): a float matrix of one row per label, ``dim`` wide."""
    fix = "Re-export the model folder with `sdltag export`."
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(handle)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise _refuse(path, f"cannot read label embeddings ({' '.join(str(exc).split())[:200]})", fix) from None
    if shape != (rows, dim):
        raise _refuse(
            path, f"label embeddings have shape {shape}; the manifest lists {rows} labels of dimension {dim}", fix
        )
    if dtype.kind != "f":
        raise _refuse(path, f"label embeddings are {dtype}, not floating point", fix)


def load_model_folder(path: Path | str) -> ModelFolder:
    """Validate and open a model folder, refusing anything tagging could not trust.

    Checks: the folder and its three files exist; the manifest is valid JSON of a known
    (not newer) format whose every field has the right type, range and length (the error
    names the field); the label embeddings' header matches the labels; the ONNX file has
    the size recorded at export (a cheap truncation check; ``ModelFolder.verify_onnx``, run
    before a graph's vectors are used, checks its sha256). A manifest without the graph's
    sha256 gets one computed now and recorded where the folder is writable.
    """
    path = Path(path).expanduser()
    fix = "Pass a folder written by `sdltag export` or `sdltag train` (it holds model.onnx and manifest.json)."
    if not path.exists():
        raise _refuse(path, "model folder does not exist", fix)
    if not path.is_dir():
        raise _refuse(path, "is not a model folder", fix)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise _refuse(manifest_path, "missing", fix)
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as exc:  # not UTF-8, not JSON, or a number of over 4300 digits
        raise _refuse(manifest_path, f"not valid JSON ({exc})", "Re-export the model with `sdltag export`.") from None
    except RecursionError:
        raise _refuse(manifest_path, "not valid JSON (nested too deep)", "Re-export the model.") from None
    except OSError as exc:
        raise _refuse(manifest_path, f"cannot read ({exc.strerror or exc})", fix) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise _refuse(manifest_path, "not an sdltag model manifest", fix)
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _refuse(manifest_path, "has no integer format_version", "Re-export the model with `sdltag export`.")
    if version > FORMAT_VERSION:
        raise _refuse(
            manifest_path,
            f"model format version {version} is newer than this sdltag supports ({FORMAT_VERSION})",
            "Upgrade sdltag (pip install --upgrade sdltag) to use this model.",
        )
    try:
        manifest = Manifest.from_json(data)
    except ManifestFieldError as exc:
        raise _refuse(manifest_path, f"bad manifest: {exc}", "Re-export the model with `sdltag export`.") from None
    onnx_path = path / ONNX_FILE
    if not onnx_path.is_file():
        raise _refuse(onnx_path, "missing", "Re-export the model with `sdltag export`.")
    expected_bytes = manifest.onnx.get("bytes")
    actual = onnx_path.stat().st_size
    if expected_bytes is not None and actual != expected_bytes:
        raise _refuse(
            onnx_path, f"is {actual} bytes but was {expected_bytes} when exported (truncated or corrupt)", _COPY_AGAIN
        )
    embeddings = path / EMBEDDINGS_FILE
    if not embeddings.is_file():
        raise _refuse(embeddings, "missing", "Re-export the model with `sdltag export`.")
    _check_embeddings_header(embeddings, len(manifest.seen_labels) + len(manifest.unseen_labels), manifest.dim)
    if not manifest.onnx.get("sha256"):
        _record_graph_hash(manifest_path, data, manifest, onnx_path)
    return ModelFolder(path=path, manifest=manifest)


def _record_graph_hash(manifest_path: Path, data: dict[str, Any], manifest: Manifest, onnx_path: Path) -> None:
    """Give a manifest without the graph's sha256 one (the graph's identity in the index), and keep it.

    Written into the manifest where the folder allows; otherwise it holds for this run (and
    ``graph_sha256`` remembers it while the file is unchanged).
    """
    try:
        digest = graph_sha256(onnx_path)
    except OSError as exc:
        raise _refuse(onnx_path, f"cannot read the graph ({exc.strerror or exc})", _COPY_AGAIN) from None
    manifest.onnx = {**manifest.onnx, "sha256": digest, "bytes": onnx_path.stat().st_size}
    updated = {**data, "onnx": {**(data.get("onnx") or {}), "sha256": digest, "bytes": manifest.onnx["bytes"]}}
    try:
        with atomic_write(manifest_path) as out:
            out.write(json.dumps(updated, indent=2, ensure_ascii=False) + "\n")
    except OSError:
        pass


def _refused_contents(out_dir: Path) -> str | None:
    """Why ``out_dir`` (an existing folder) is not a model folder sdltag may replace, or None if it is."""
    entries = sorted(out_dir.iterdir(), key=lambda p: p.name)
    if not entries:
        return None
    others = [
        p.name + ("/" if p.is_dir() else "")
        for p in entries
        if p.is_dir() or not (p.name in MODEL_FILES or _MODEL_DEBRIS.fullmatch(p.name))
    ]
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return f"exists and is not a model folder (it holds {shown})"
    manifest = out_dir / MANIFEST
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"exists and is not a model folder (no {MANIFEST})"
    except (OSError, ValueError, RecursionError):
        return f"exists and its {MANIFEST} cannot be read as an sdltag manifest"
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        return f"exists and its {MANIFEST} is not an sdltag model manifest"
    return None


def check_output_folder(out_dir: Path | str) -> Path:
    """Refuse an ``--out`` that sdltag may not replace; returns the absolute path.

    Allowed: a path that does not exist, an empty folder, or a model folder (a manifest
    of this format) holding nothing but model files (``MODEL_FILES``, and what an
    interrupted write leaves). Anything else (a file, a link, extra files or sub-folders,
    an unreadable manifest) is refused, untouched. Cheap, so commands call it before slow
    work; ``write_model_folder`` calls it again just before the swap.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    fix = "Choose another --out path (a new folder, or a model folder sdltag wrote)."
    if out_dir.is_symlink():
        raise _refuse(out_dir, "is a symbolic link", fix)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise _refuse(out_dir, "exists and is not a folder", fix)
        try:
            problem = _refused_contents(out_dir)
        except OSError as exc:
            raise _refuse(out_dir, f"exists and cannot be listed ({exc.strerror or exc})", fix) from None
        if problem:
            raise _refuse(out_dir, problem, fix)
    return out_dir


def write_model_folder(
    out_dir: Path, onnx_file: Path, manifest: Manifest, label_vectors: np.ndarray, model_card_md: str | None = None
) -> ModelFolder:
    """Write a complete model folder atomically: build it beside ``out_dir``, then swap it in.

    An existing ``out_dir`` is replaced only if it is a model folder holding nothing but
    model files, or empty (``check_output_folder``); anything else is refused so a typo
    never deletes a user's folder.
    """
    out_dir = check_output_folder(out_dir)
    vectors = np.ascontiguousarray(label_vectors, dtype=np.float32)
    expected = (len(manifest.seen_labels) + len(manifest.unseen_labels), manifest.dim)
    if vectors.shape != expected:
        raise ValueError(f"label vectors have shape {vectors.shape}, expected {expected}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shutil.copyfile(onnx_file, staging / ONNX_FILE)
        manifest.onnx = {
            **manifest.onnx,
            "file": ONNX_FILE,
            "input": manifest.onnx.get("input", "images"),
            "output": manifest.onnx.get("output", "principal_vectors"),
            "sha256": file_sha256(staging / ONNX_FILE),
            "bytes": (staging / ONNX_FILE).stat().st_size,
        }
        manifest.onnx_int8 = None  # an 8-bit graph belongs to the graph it was quantised from
        np.save(staging / EMBEDDINGS_FILE, vectors, allow_pickle=False)
        (staging / MANIFEST).write_text(
            json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        if model_card_md:
            (staging / MODEL_CARD_FILE).write_text(model_card_md, encoding="utf-8")
        os.chmod(staging, 0o755)
        check_output_folder(out_dir)  # again: the folder may have changed while the model was written
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_model_folder(out_dir)


def attach_int8(model: ModelFolder, int8_file: Path, details: dict[str, Any], card_section: str = "") -> ModelFolder:
    """Add (or replace) the 8-bit graph of ``model``'s folder: ``model.int8.onnx`` plus its manifest entry.

    The ONNX file is written beside its final name and renamed into place, then the
    manifest is replaced the same way, so a reader sees the old folder or the new one;
    a crash in between leaves an unlisted file the next attach replaces.
    """
    folder = model.path
    partial = folder / f".{INT8_ONNX_FILE}.partial-{os.getpid()}"
    try:
        try:
            shutil.copyfile(int8_file, partial)
        except OSError as exc:
            raise _refuse(
                folder,
                f"cannot write the 8-bit graph into this folder ({exc.strerror or exc})",
                "Copy the model folder somewhere writable first, or write a separate 8-bit folder with --out.",
            ) from None
        entry = {
            **details,
            "file": INT8_ONNX_FILE,
            "input": model.manifest.onnx.get("input", "images"),
            "output": model.manifest.onnx.get("output", "principal_vectors"),
            "sha256": file_sha256(partial),
            "bytes": partial.stat().st_size,
        }
        os.replace(partial, folder / INT8_ONNX_FILE)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    data["onnx_int8"] = entry
    with atomic_write(folder / MANIFEST) as out:
        out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    card = folder / "MODEL_CARD.md"
    if card_section and card.is_file():
        text = card.read_text(encoding="utf-8")
        marker = "\n\n## 8-bit graph\n"
        text = text.split(marker)[0].rstrip("\n") + marker + "\n" + card_section.strip("\n") + "\n"
        with atomic_write(card) as out:
            out.write(text)
    return load_model_folder(folder)


DEFAULT_MODEL = "photo-lite0"


def default_model_dir() -> Path:
    """The model used when ``--model`` is not given: the bundled ``models/photo-lite0``.

    It is the photo model; ``models/emoji`` stays as the emoji benchmark's model.

    ``SDLTAG_MODEL`` overrides it. The bundled models ship as the ``sdltag_models``
    package (the repository's top-level ``models/`` folder), so this works for a
    source checkout, an editable install and a built wheel alike.
    """
    override = os.environ.get("SDLTAG_MODEL")
    if override:
        return Path(override).expanduser()
    candidates: list[Path] = []
    try:
        from importlib.resources import files

        candidates.append(Path(str(files("sdltag_models"))) / DEFAULT_MODEL)
    except (ModuleNotFoundError, TypeError):
        pass
    candidates.append(Path(__file__).resolve().parent.parent / "models" / DEFAULT_MODEL)
    for candidate in candidates:
        if (candidate / MANIFEST).is_file():
            return candidate
    raise SdltagError(
        "no model given and the bundled model (models/photo-lite0) is not installed. "
        "Pass --model MODEL_DIR (a folder written by `sdltag train` or `sdltag export`)."
    )
