"""Shared fixtures. Every test gets its own SDLTAG_HOME so no test touches the user's cache or index."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def sdltag_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("sdltag-home")
    monkeypatch.setenv("SDLTAG_HOME", str(home))
    return home


def build_tiny_model(
    out_dir: Path,
    seen_labels: list[str],
    label_vectors: np.ndarray,
    embedder: dict | None = None,
    *,
    rows: int = 3,
    size: int = 32,
    width: int = 8,
    backbone: str = "smallcnn",
    seed: int = 0,
    unseen_labels: list[str] | None = None,
    calibration: dict | None = None,
):
    """Export a randomly initialised tiny SDL model as a real model folder (torch + ONNX)."""
    import torch

    from sdltag.modelfolder import EmbedderSpec, InputSpec
    from sdltag.nn.export import export_model
    from sdltag.nn.model import ModelConfig, SDLModel

    torch.manual_seed(seed)
    dim = int(label_vectors.shape[1])
    config = ModelConfig(backbone=backbone, backbone_config={"width": width}, rows=rows, dim=dim)
    model = SDLModel(config)
    spec = EmbedderSpec.from_json(
        embedder
        or {"kind": "sentence-transformers", "name": "test-embedder", "id": "test-embedder@sha256:0", "dim": dim}
    )
    return export_model(
        model,
        out_dir,
        input_spec=InputSpec(size, size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        embedder=spec,
        seen_labels=seen_labels,
        unseen_labels=unseen_labels or [],
        label_vectors=label_vectors,
        calibration=calibration,
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model folder with 6 seen labels and random 16-d label vectors (no text model)."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = ["cat", "dog", "tree", "car", "sun", "boat"]
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", labels, vectors)
