"""8-bit model folders: onnxruntime's static quantisation of a model folder's image graph.

Weights become int8 (per output channel) and activations uint8, with scales taken from
calibration images decoded exactly as ``sdltag tag`` decodes them (QDQ format, which
onnxruntime runs with integer kernels: VNNI on CPUs that have it). The label vectors,
labels and calibration of the source folder are kept; the new folder's ONNX hash, and
so its model identity in the index, differs (its vectors are not the float model's).

Quantisation changes the principal vectors a little, so the fidelity is measured on
images held out of calibration where there are enough: the float and 8-bit models'
scores over every label are compared (Pearson correlation, mean overlap of the top-10
labels) and recorded in the manifest's provenance, and the command prints them.
Imports onnx and onnxruntime's quantisation tools (not torch).
"""

from __future__ import annotations

import copy
import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdltag.errors import SdltagError
from sdltag.images import ImageError, discover, load_image
from sdltag.modelfolder import MODEL_CARD_FILE, ModelFolder, attach_int8, check_output_folder, write_model_folder
from sdltag.runtime import ImageModel
from sdltag.scoring import sdl_scores

METHOD = "onnxruntime static int8 (QDQ; weights int8 per channel, activations uint8, min-max calibration)"
logger = logging.getLogger(__name__)
HELD_OUT_MIN = 16  # fewer usable images than calibration + this: the fidelity is measured on the calibration set


@dataclass
class Fidelity:
    """How close the 8-bit model's scores are to the float model's."""

    images: int
    held_out: bool
    score_correlation: float
    top10_overlap: float
    mean_abs_score_difference: float

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "held_out": self.held_out,
            "score_correlation": round(self.score_correlation, 5),
            "top10_overlap": round(self.top10_overlap, 4),
            "mean_abs_score_difference": round(self.mean_abs_score_difference, 5),
        }


def _decoded(model: ModelFolder, images: Path, count: int, seed: int) -> np.ndarray:
    """Up to ``count`` images of the folder (a seeded sample), decoded as tag decodes them: (N, 3, H, W)."""
    found = discover([images])
    for where, reason in found.problems:
        logger.warning(f"{where}: {reason}")
    paths = list(found.files)
    random.Random(seed).shuffle(paths)
    arrays: list[np.ndarray] = []
    for path in paths:
        if len(arrays) >= count:
            break
        try:
            arrays.append(load_image(path, model.manifest.input))
        except ImageError as exc:
            logger.warning(str(exc))
    if len(arrays) < 2:
        raise SdltagError(
            f"{images}: {len(arrays)} decodable image(s); quantising needs at least 2 (a few hundred of the "
            "photos you will tag are best)."
        )
    return np.stack(arrays).astype(np.float32)


def fidelity(
    float_vectors: np.ndarray, int8_vectors: np.ndarray, label_vectors: np.ndarray, held_out: bool
) -> Fidelity:
    """Compare two models' scores over every label on the same images."""
    a = sdl_scores(float_vectors, label_vectors)
    b = sdl_scores(int8_vectors, label_vectors)
    k = min(10, a.shape[1])
    top_a = np.argsort(-a, axis=1, kind="stable")[:, :k]
    top_b = np.argsort(-b, axis=1, kind="stable")[:, :k]
    overlap = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b, strict=True)]))
    corr = float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) if a.size > 1 else 1.0
    return Fidelity(len(a), held_out, corr, overlap, float(np.mean(np.abs(a - b))))


def quantize_model_folder(
    model: ModelFolder,
    images: Path,
    out: Path | None,
    *,
    count: int = 256,
    seed: int = 0,
    name: str = "",
) -> tuple[ModelFolder, Fidelity]:
    """Quantise ``model``, calibrated on images of ``images``; returns the result and its fidelity.

    With ``out``, a separate 8-bit model folder is written there; with ``out=None`` the
    8-bit graph is attached to ``model``'s own folder (``model.int8.onnx``), where
    ``--precision auto`` picks it on CPUs with 8-bit dot-product instructions. Images that cannot
    be read are skipped with a warning (``logging``).
    """
    import onnxruntime as ort

    if out is not None:
        out = check_output_folder(out)  # refuse a folder that is not ours before the slow work
    model = model.with_precision("float")
    if model.manifest.provenance.get("quantization"):
        raise SdltagError(f"{model.path}: this model is already quantised. Quantise the float model it came from.")
    if count < 2:
        raise SdltagError(f"--count {count}: at least 2 calibration images are needed.")
    arrays = _decoded(model, images, count + 64, seed)
    held_out = len(arrays) >= count + HELD_OUT_MIN
    calibration = arrays[:count] if held_out else arrays
    check = arrays[count:] if held_out else arrays
    input_name = str(model.manifest.onnx.get("input") or "images")

    with tempfile.TemporaryDirectory(prefix="sdltag-quantize-") as tmp:
        quantized = _quantize_graph(model, calibration, input_name, Path(tmp))
        int8_vectors = _run_int8(quantized, check, input_name)
        float_vectors = ImageModel(model, device="cpu").run(check)
        result = fidelity(float_vectors, int8_vectors, model.label_vectors, held_out)
        source_id = model.model_id
        details = {
            "method": METHOD,
            "source_model": source_id,
            "calibration_images": len(calibration),
            "calibration_folder": str(images),
            "onnxruntime": ort.__version__,
            "fidelity": result.to_json(),
        }
        section = (
            f"Quantised from model {source_id[:16]} by `sdltag quantize` ({METHOD}), calibrated "
            f"on {len(calibration)} images of `{images}`. Against the float model on {result.images} "
            f"{'held-out' if held_out else 'calibration'} images: score correlation {result.score_correlation:.4f}, "
            f"top-10 overlap {result.top10_overlap:.3f}.\n"
        )
        if out is None:
            return attach_int8(model, quantized, details, section), result
        folder = _write_copy(model, out, name, quantized, details, section)
    return folder, result


def _quantize_graph(model: ModelFolder, calibration: np.ndarray, input_name: str, tmp: Path) -> Path:
    """onnxruntime's static quantisation of the model's graph, calibrated on ``calibration``: the new graph's path."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 16)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    prepared, quantized = tmp / "prepared.onnx", tmp / "model.int8.onnx"
    try:
        quant_pre_process(str(model.onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            extra_options={"CalibTensorRangeSymmetric": False},
        )
    except Exception as exc:  # noqa: BLE001 - onnx/onnxruntime raise many types
        raise SdltagError(f"{model.onnx_path}: onnxruntime could not quantise this graph ({exc}).") from None
    return quantized


def _run_int8(quantized: Path, images: np.ndarray, input_name: str) -> np.ndarray:
    """The 8-bit graph's principal vectors of ``images`` (N, 3, H, W) -> (N, M, d), on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(quantized), options, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [session.run(None, {input_name: part})[0] for part in np.array_split(images, max(1, len(images) // 32))]
    )


def _write_copy(
    model: ModelFolder, out: Path, name: str, quantized: Path, details: dict[str, Any], section: str
) -> ModelFolder:
    """A separate 8-bit model folder at ``out``: the source's manifest and card, with the quantisation recorded."""
    manifest = copy.deepcopy(model.manifest)
    manifest.name = name or out.name
    manifest.provenance = {**manifest.provenance, "quantization": details}
    manifest.onnx = {k: v for k, v in manifest.onnx.items() if k not in ("sha256", "bytes")}
    card_path = model.path / MODEL_CARD_FILE
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else ""
    card += "\n\n## 8-bit copy\n\n" + section
    return write_model_folder(out, quantized, manifest, model.label_vectors, card)
