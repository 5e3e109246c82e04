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

Everything that must agree between training and tagging (input size, resize rule,
mean/std, M, d, the embedder) is read from the manifest, never retyped. This module
imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdltag.errors import SdltagError
from sdltag.paths import atomic_write

FORMAT_NAME = "sdltag-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"
PRECISIONS = ("float", "int8")
EMBEDDINGS_FILE = "label_embeddings.npy"
RESIZE_RULES = ("squash", "shorter_center_crop")


def hash_file(path: Path, digest: Any, chunk: int = 1 << 20) -> Any:
    """Feed a file's bytes to ``digest`` (any object with ``update``) in chunks; returns it."""
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    return hash_file(path, hashlib.sha256(), chunk).hexdigest()


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
    def from_json(cls, data: dict[str, Any]) -> InputSpec:
        height, width = (int(v) for v in data["size"])
        return cls(
            height=height,
            width=width,
            resize=str(data.get("resize", "squash")),
            interpolation=str(data.get("interpolation", "bilinear")),
            mean=tuple(float(v) for v in data.get("mean", (0.0, 0.0, 0.0))),
            std=tuple(float(v) for v in data.get("std", (1.0, 1.0, 1.0))),
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
    def from_json(cls, data: dict[str, Any]) -> EmbedderSpec:
        return cls(kind=str(data["kind"]), name=str(data["name"]), id=str(data["id"]), dim=int(data["dim"]))


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
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        data = {
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
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        labels = data["labels"]
        return cls(
            name=str(data.get("name", "")),
            backbone=str(data["backbone"]["name"]),
            backbone_config=dict(data["backbone"].get("config", {})),
            input=InputSpec.from_json(data["input"]),
            rows=int(data["rows"]),
            dim=int(data["dim"]),
            embedder=EmbedderSpec.from_json(data["embedder"]),
            seen_labels=[str(v) for v in labels["seen"]],
            unseen_labels=[str(v) for v in labels.get("unseen", [])],
            head_layout=str(data.get("head_layout", "contiguous")),
            calibration=data.get("calibration"),
            provenance=dict(data.get("provenance", {})),
            model_card=dict(data.get("model_card", {})),
            onnx=dict(data.get("onnx", {})),
            onnx_int8=dict(data["onnx_int8"]) if data.get("onnx_int8") else None,
            format_version=int(data["format_version"]),
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
        """Check the running ONNX file's hash against the manifest (reads the whole file)."""
        expected = self.model_id
        if expected and file_sha256(self.onnx_path) != expected:
            raise SdltagError(
                f"{self.onnx_path}: the file does not match the hash in {MANIFEST} (corrupt or replaced). "
                "Re-export the model with `sdltag export` or copy the model folder again."
            )


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


def load_model_folder(path: Path | str) -> ModelFolder:
    """Validate and open a model folder, refusing anything tagging could not trust.

    Checks: the folder and its three files exist, the manifest is valid JSON of a
    known (not newer) format, the ONNX file has the size recorded at export (a cheap
    truncation check; ``ModelFolder.verify_onnx`` checks the full hash).
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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _refuse(manifest_path, f"not valid JSON ({exc})", "Re-export the model with `sdltag export`.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise _refuse(manifest_path, "not an sdltag model manifest", fix)
    version = data.get("format_version")
    if not isinstance(version, int):
        raise _refuse(manifest_path, "has no integer format_version", "Re-export the model with `sdltag export`.")
    if version > FORMAT_VERSION:
        raise _refuse(
            manifest_path,
            f"model format version {version} is newer than this sdltag supports ({FORMAT_VERSION})",
            "Upgrade sdltag (pip install --upgrade sdltag) to use this model.",
        )
    try:
        manifest = Manifest.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise _refuse(
            manifest_path, f"manifest is missing or has a bad field ({exc})", "Re-export the model."
        ) from None
    if manifest.input.resize not in RESIZE_RULES:
        raise _refuse(manifest_path, f"unknown resize rule {manifest.input.resize!r}", "Upgrade sdltag or re-export.")
    if not manifest.seen_labels and not manifest.unseen_labels:
        raise _refuse(manifest_path, "lists no labels", "Re-export the model with its labels.")
    onnx_path = path / ONNX_FILE
    if not onnx_path.is_file():
        raise _refuse(onnx_path, "missing", "Re-export the model with `sdltag export`.")
    expected_bytes = manifest.onnx.get("bytes")
    actual = onnx_path.stat().st_size
    if expected_bytes is not None and actual != int(expected_bytes):
        raise _refuse(
            onnx_path,
            f"is {actual} bytes but was {expected_bytes} when exported (truncated or corrupt)",
            "Re-export the model with `sdltag export` or copy the model folder again.",
        )
    if not (path / EMBEDDINGS_FILE).is_file():
        raise _refuse(path / EMBEDDINGS_FILE, "missing", "Re-export the model with `sdltag export`.")
    return ModelFolder(path=path, manifest=manifest)


def check_output_folder(out_dir: Path | str) -> Path:
    """Refuse an ``--out`` that is a file or a non-empty folder other than a model folder.

    Cheap, so commands call it before slow work; ``write_model_folder`` calls it again.
    Returns the absolute path.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise _refuse(out_dir, "exists and is not a folder", "Choose another --out path.")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
            raise _refuse(out_dir, "exists, is not empty and is not a model folder", "Choose another --out path.")
    return out_dir


def write_model_folder(
    out_dir: Path, onnx_file: Path, manifest: Manifest, label_vectors: np.ndarray, model_card_md: str | None = None
) -> ModelFolder:
    """Write a complete model folder atomically: build it beside ``out_dir``, then swap it in.

    An existing ``out_dir`` is replaced only if it is a model folder or empty; anything
    else is refused so a typo never deletes a user's folder.
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
            (staging / "MODEL_CARD.md").write_text(model_card_md, encoding="utf-8")
        os.chmod(staging, 0o755)
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


DEFAULT_MODEL = "emoji"


def default_model_dir() -> Path:
    """The model used when ``--model`` is not given: the bundled ``models/emoji``.

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
        "no model given and the bundled model (models/emoji) is not installed. "
        "Pass --model MODEL_DIR (a folder written by `sdltag train` or `sdltag export`)."
    )
