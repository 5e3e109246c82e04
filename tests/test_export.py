"""Export to a model folder: ONNX parity with torch, the checkpoint round trip, and the loader's refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.errors import SdltagError
from sdltag.modelfolder import EmbedderSpec, InputSpec, load_model_folder
from sdltag.nn.checkpoint import load_checkpoint, save_checkpoint
from sdltag.nn.export import export_model
from sdltag.nn.model import ModelConfig, SDLModel

LABELS = ["cat", "dog", "tree", "car"]
EMBEDDER = EmbedderSpec(kind="sentence-transformers", name="test", id="test@sha256:0", dim=12)


def _model(backbone: str = "smallcnn", config: dict | None = None, layout: str = "contiguous") -> SDLModel:
    torch.manual_seed(0)
    model = SDLModel(
        ModelConfig(backbone=backbone, backbone_config=config or {"width": 8}, rows=3, dim=12, head_layout=layout)
    )
    # Non-trivial norm statistics so eval mode is exercised, not identity batch norms.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def _vectors(n: int = len(LABELS)) -> np.ndarray:
    v = np.random.default_rng(1).normal(size=(n, 12)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize(
    "backbone,config,layout",
    [("smallcnn", {"width": 8}, "contiguous"), ("resnet50", {"width": 4, "layers": (1, 1, 1, 1)}, "interleaved")],
)
def test_onnx_matches_torch_at_batch_1_and_5(tmp_path: Path, backbone: str, config: dict, layout: str) -> None:
    model = _model(backbone, config, layout)
    folder = export_model(
        model,
        tmp_path / "m",
        input_spec=InputSpec(48, 48),
        embedder=EMBEDDER,
        seen_labels=LABELS,
        unseen_labels=[],
        label_vectors=_vectors(),
    )
    session = ort.InferenceSession(str(folder.onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 48, 48)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(["principal_vectors"], {"images": x.numpy()})
        assert got.shape == (batch, 3, 12)
        assert np.abs(got - expected).max() <= 1e-4


def test_manifest_records_what_tagging_needs(tmp_path: Path) -> None:
    folder = export_model(
        _model(),
        tmp_path / "m",
        input_spec=InputSpec(40, 48, mean=(0.1, 0.2, 0.3), std=(1, 2, 3)),
        embedder=EMBEDDER,
        seen_labels=LABELS[:3],
        unseen_labels=LABELS[3:],
        label_vectors=_vectors(),
        calibration={"method": "platt", "seen": {"a": 1.0, "b": 0.0}},
    )
    data = json.loads((folder.path / "manifest.json").read_text())
    assert data["format_version"] == 1 and data["backbone"]["name"] == "smallcnn"
    assert data["input"]["size"] == [40, 48] and data["input"]["std"] == [1, 2, 3]
    assert (data["rows"], data["dim"]) == (3, 12)
    assert data["embedder"] == EMBEDDER.to_json()
    assert data["labels"]["seen"] == LABELS[:3] and data["labels"]["unseen"] == LABELS[3:]
    assert data["onnx"]["bytes"] == folder.onnx_path.stat().st_size
    loaded = load_model_folder(folder.path)
    assert loaded.all_labels == LABELS
    np.testing.assert_allclose(loaded.label_vectors, _vectors())
    assert loaded.model_id == data["onnx"]["sha256"]
    loaded.verify_onnx()


def _checkpoint(tmp_path: Path) -> Path:
    model = _model()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(
        path,
        {
            "model_config": model.config.to_dict(),
            "model": model.state_dict(),
            "input": InputSpec(32, 32).to_json(),
            "embedder": EMBEDDER.to_json(),
            "seen_labels": LABELS,
            "unseen_labels": [],
            "label_vectors": torch.from_numpy(_vectors()),
        },
    )
    return path


def test_export_command_writes_a_folder_that_agrees_with_the_checkpoint(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    result = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    folder = load_model_folder(tmp_path / "out")
    model = _model()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(folder.onnx_path), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"images": x.numpy()})[0] - expected).max() <= 1e-4
    # re-export over an existing model folder replaces it
    assert CliRunner().invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "out")]).exit_code == 0


def test_export_refuses_a_non_checkpoint_and_a_user_folder(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a torch file")
    result = CliRunner().invoke(app, ["export", str(bogus), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "bogus.pt" in result.output
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "a.jpg").write_bytes(b"x")
    result = CliRunner().invoke(app, ["export", str(_checkpoint(tmp_path)), "--out", str(precious)])
    assert result.exit_code == 2 and "not a model folder" in result.output
    assert (precious / "a.jpg").exists()


def test_checkpoint_is_loaded_without_arbitrary_pickle(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "sdltag-checkpoint", "x": Evil()}, path)
    with pytest.raises(SdltagError, match="cannot read the checkpoint"):
        load_checkpoint(path)


@pytest.fixture()
def good_folder(tmp_path: Path, tiny_model) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(tiny_model.path, target)
    return target


def test_loader_refuses_missing_files(good_folder: Path) -> None:
    (good_folder / "model.onnx").unlink()
    with pytest.raises(SdltagError, match=r"model\.onnx: missing"):
        load_model_folder(good_folder)
    with pytest.raises(SdltagError, match="does not exist"):
        load_model_folder(good_folder / "nope")


def test_loader_refuses_truncated_onnx(good_folder: Path) -> None:
    onnx_file = good_folder / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    with pytest.raises(SdltagError, match="truncated"):
        load_model_folder(good_folder)


def test_loader_refuses_newer_format_and_bad_json(good_folder: Path) -> None:
    manifest = good_folder / "manifest.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(SdltagError, match="(?s)newer.*Upgrade sdltag"):
        load_model_folder(good_folder)
    manifest.write_text("{ not json")
    with pytest.raises(SdltagError, match="manifest.json: not valid JSON"):
        load_model_folder(good_folder)


def test_loader_refuses_corrupt_embeddings(good_folder: Path) -> None:
    np.save(good_folder / "label_embeddings.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(SdltagError, match="label_embeddings.npy"):  # the header is checked when the folder opens
        load_model_folder(good_folder)
