"""Export an SDL model to an sdltag model folder (ONNX graph + manifest + label embeddings)."""

from __future__ import annotations

import datetime as _dt
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdltag import __version__
from sdltag.modelfolder import (
    EmbedderSpec,
    InputSpec,
    Manifest,
    ModelFolder,
    check_output_folder,
    write_model_folder,
)
from sdltag.nn.checkpoint import load_checkpoint
from sdltag.nn.model import ModelConfig, SDLModel

ONNX_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "principal_vectors"


def export_onnx(
    model: torch.nn.Module,
    input_spec: InputSpec,
    path: Path,
    opset: int = ONNX_OPSET,
    output_names: tuple[str, ...] = (OUTPUT_NAME,),
) -> None:
    """Trace ``model`` (images -> (B, M, d), or one tensor per name of ``output_names``) to ONNX with a dynamic
    batch dimension."""
    model = model.eval()
    dummy = torch.zeros(2, 3, input_spec.height, input_spec.width)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in output_names}},
            opset_version=opset,
            dynamo=False,
        )


def export_model(
    model: SDLModel,
    out_dir: Path,
    *,
    input_spec: InputSpec,
    embedder: EmbedderSpec,
    seen_labels: list[str],
    unseen_labels: list[str],
    label_vectors: np.ndarray,
    name: str = "",
    calibration: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    model_card: dict[str, Any] | None = None,
    model_card_md: str | None = None,
    sidecar: dict[str, Any] | None = None,
) -> ModelFolder:
    """Write ``model`` as a model folder at ``out_dir`` (atomically) and return it loaded.

    ``sidecar``: the model's advice for sidecar keywords (``{"threshold", "max_keywords"}``).
    """
    config: ModelConfig = model.config
    manifest = Manifest(
        name=name or Path(out_dir).name,
        backbone=config.backbone,
        backbone_config=config.backbone_config,
        input=input_spec,
        rows=config.rows,
        dim=config.dim,
        embedder=embedder,
        seen_labels=list(seen_labels),
        unseen_labels=list(unseen_labels),
        head_layout=config.head_layout,
        calibration=calibration,
        provenance={
            "exported_by": f"sdltag {__version__}",
            "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            **(provenance or {}),
        },
        model_card=model_card or {},
        onnx={"input": INPUT_NAME, "output": OUTPUT_NAME, "opset": ONNX_OPSET},
        sidecar=sidecar,
    )
    with tempfile.TemporaryDirectory(prefix="sdltag-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(model, input_spec, onnx_path)
        return write_model_folder(Path(out_dir), onnx_path, manifest, label_vectors, model_card_md)


def model_from_checkpoint(checkpoint: dict[str, Any]) -> SDLModel:
    """Rebuild the architecture recorded in a checkpoint and load its weights strictly."""
    model = SDLModel(ModelConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"], strict=True)
    return model.eval()


def export_checkpoint(checkpoint_path: Path, out_dir: Path, name: str = "") -> ModelFolder:
    """``sdltag export``: a training checkpoint -> a model folder."""
    check_output_folder(out_dir)
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint)
    vectors = checkpoint["label_vectors"]
    vectors = vectors.detach().cpu().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)
    return export_model(
        model,
        out_dir,
        input_spec=InputSpec.from_json(checkpoint["input"]),
        embedder=EmbedderSpec.from_json(checkpoint["embedder"]),
        seen_labels=list(checkpoint["seen_labels"]),
        unseen_labels=list(checkpoint.get("unseen_labels", [])),
        label_vectors=vectors,
        name=name,
        calibration=checkpoint.get("calibration"),
        provenance={"checkpoint": str(Path(checkpoint_path).name), **checkpoint.get("provenance", {})},
        model_card=checkpoint.get("model_card"),
    )
