"""``sdltag train --train-blocks K``: fine-tuning the pretrained backbone's last K blocks on cached feature maps,
and ``--feature-cache``, one feature folder shared by several runs.

Small generated images at 64 px keep the backbone cheap; label vectors come from ``HashEmbedder``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.errors import SdltagError
from sdltag.images import load_image
from sdltag.nn.augment import AugmentConfig
from sdltag.nn.backbones import efficientnet_lite as lite
from sdltag.nn.checkpoint import load_checkpoint
from sdltag.nn.features import FEATURES_DIR, FeatureCache, content_hash
from sdltag.nn.model import ModelConfig, SDLModel
from sdltag.nn.train import RuntimeOptions, TrainConfig, TrainingInterrupted, train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import HashEmbedder, Recorder, make_scenes  # noqa: E402
from test_train_pretrained import lite_config  # noqa: E402

OPTIONS = dict(workers=0, threads=2)


def blocks_config(data: Path, out: Path, **overrides) -> TrainConfig:
    """The pretrained tests' settings (``lite_config``), training the last 2 blocks for 2 epochs."""
    settings: dict = dict(freeze_backbone=False, epochs=2, train_blocks=2)
    settings.update(overrides)
    return lite_config(data, out, **settings)


def _no_extraction(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, images):  # noqa: ANN001, ANN202
        raise AssertionError("features were recomputed instead of read from the cache")

    monkeypatch.setattr(FeatureCache, "_run", refuse)


@pytest.mark.parametrize("blocks", [0, 1, 3, 16])
def test_trunk_then_tail_is_the_whole_backbone(blocks: int) -> None:
    torch.manual_seed(0)
    net = lite.EfficientNetLite("efficientnet_lite0").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        split = net.tail(net.trunk(x, blocks), blocks)
        assert torch.allclose(split, net(x), atol=1e-6)
    assert len(net.tail_modules(blocks)) == blocks + 2  # the blocks, the head convolution and its batch norm
    with pytest.raises(ValueError, match="16 blocks"):
        net.trunk(x, 17)


def test_maps_cache_stores_pooled_vectors_too_and_ignores_the_trained_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_scenes(tmp_path / "data", 3, size=40)
    paths = sorted(data.glob("*.png"))
    net = lite.efficientnet_lite("efficientnet_lite0", pretrained=True).eval()
    spec = lite.input_spec("efficientnet_lite0")
    spec = type(spec)(64, 64, spec.resize, spec.interpolation, spec.mean, spec.std)
    from sdltag.nn.data import ImageStore

    def cache(blocks: int) -> FeatureCache:
        return FeatureCache(
            tmp_path / "f", "efficientnet_lite0", net, spec, AugmentConfig(), torch.device("cpu"), 2, blocks
        )

    maps = cache(2).store(ImageStore(paths, spec, cache=False, workers=0), 1)
    assert maps.features.shape == (3, 1, 192, 2, 2) and maps.blocks == 2
    images = torch.stack([torch.from_numpy(load_image(p, spec)) for p in paths])
    with torch.no_grad():
        assert torch.allclose(maps.features[:, 0], net.trunk(images, 2), atol=1e-4)  # onnxruntime vs torch
    # A frozen run on the same folder finds the pooled vectors the maps pass stored: nothing is recomputed.
    _no_extraction(monkeypatch)
    pooled = cache(0).store(ImageStore(paths, spec, cache=False, workers=0), 1)
    with torch.no_grad():
        assert torch.allclose(pooled.features[:, 0], net.tail(maps.features[:, 0], 2).mean(dim=(2, 3)), atol=1e-4)
    # Training the last blocks does not change the maps' keys (they depend on the frozen part only) ...
    key = cache(2).key(content_hash(paths[0]) or "", 0)
    with torch.no_grad():
        net._blocks[15]._project_conv.weight.mul_(2)
        net._conv_head.weight.mul_(2)
    assert cache(2).key(content_hash(paths[0]) or "", 0) == key
    # ... but changing the frozen part does.
    with torch.no_grad():
        net._blocks[13]._project_conv.weight.mul_(2)
    assert cache(2).key(content_hash(paths[0]) or "", 0) != key


def test_train_blocks_trains_the_tail_only_exports_one_graph_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretrained = lite.read_weights("efficientnet_lite0")
    data = make_scenes(tmp_path / "data", 24, size=48)
    shared = tmp_path / "shared-features"
    reference = train(
        blocks_config(data, tmp_path / "ref"),
        RuntimeOptions(**OPTIONS, feature_cache=shared),
        embedder=HashEmbedder(),
        reporter=Recorder(),
    )
    # One feature pass into the shared folder (18 training + 6 validation images: maps and pooled vectors).
    assert len(list(shared.rglob("*.npy"))) == 2 * 24
    assert not (tmp_path / "ref.train" / FEATURES_DIR).exists()

    weights = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")["model"]
    for key in ("_conv_stem.weight", "_blocks.13._project_conv.weight", "_blocks.13._bn2.running_var", "_fc.weight"):
        assert torch.equal(weights[f"backbone.{key}"], pretrained[key]), key  # the frozen part stays ImageNet's
    for key in ("_blocks.14._expand_conv.weight", "_blocks.15._project_conv.weight", "_conv_head.weight"):
        assert not torch.equal(weights[f"backbone.{key}"], pretrained[key]), key  # the last 2 blocks trained
    assert not torch.equal(weights["backbone._bn1.running_mean"], pretrained["_bn1.running_mean"])

    # The exported model is one ONNX graph that matches the torch model, and tags like any other.
    from sdltag.runtime import ImageModel

    folder = reference.model_folder
    model = SDLModel(ModelConfig.from_dict(load_checkpoint(tmp_path / "ref" / "checkpoint.pt")["model_config"]))
    model.load_state_dict(weights)
    image = load_image(data / "img000.png", folder.manifest.input)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(image)[None]).numpy()
    assert (
        list((tmp_path / "ref").glob("*.onnx")) and np.abs(ImageModel(folder).run(image[None]) - expected).max() < 1e-4
    )
    tagged = CliRunner().invoke(app, ["tag", str(data / "img000.png"), "--model", str(folder.path), "--no-index"])
    assert tagged.exit_code == 0, tagged.output
    assert any(colour in tagged.stdout for colour in ("red", "green", "blue", "yellow"))

    # Interrupted after 2 steps, then resumed: no feature is computed again, and the result is identical.
    _no_extraction(monkeypatch)
    config = blocks_config(data, tmp_path / "run")
    with pytest.raises(TrainingInterrupted):
        train(config, RuntimeOptions(**OPTIONS, feature_cache=shared), embedder=HashEmbedder(), reporter=Recorder(2))
    train(config, RuntimeOptions(**OPTIONS, feature_cache=shared, resume=True), embedder=HashEmbedder())
    resumed = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    for key in ("head.embedding.weight", "backbone._blocks.15._project_conv.weight", "backbone._bn1.running_var"):
        assert torch.equal(resumed[key], weights[key]), key

    # A frozen run on the same images reads the pooled vectors the maps pass stored.
    frozen = train(
        blocks_config(data, tmp_path / "frozen", train_blocks=0, freeze_backbone=True, epochs=1),
        RuntimeOptions(**OPTIONS, feature_cache=shared),
        embedder=HashEmbedder(),
    )
    assert frozen.model_folder.path.is_dir()


def _cli(tmp_path: Path, *extra: str):
    data = make_scenes(tmp_path / "data", 8)
    args = ["train", str(data), "--out", str(tmp_path / "m"), "--workers", "0", "--epochs", "1", *extra]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--backbone", "efficientnet_lite0", "--train-blocks", "2", "--freeze-backbone"], "--freeze-backbone"),
        (["--backbone", "efficientnet_lite0", "--train-blocks", "2", "--no-pretrained"], "--train-blocks 2"),
        (["--backbone", "smallcnn", "--train-blocks", "1"], "--train-blocks 1"),
        (["--backbone", "efficientnet_lite0", "--train-blocks", "17", "--image-size", "32"], "16 blocks"),
        (["--backbone", "efficientnet_lite0", "--train-blocks", "-1"], "--train-blocks -1"),
    ],
)
def test_impossible_train_blocks_are_one_line_exit_2(tmp_path: Path, extra: list[str], named: str) -> None:
    result = _cli(tmp_path, *extra)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], lines
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.train").exists()


def test_untrained_backbone_is_refused_before_reading_images(tmp_path: Path) -> None:
    data = make_scenes(tmp_path / "data", 8)
    with pytest.raises(SdltagError, match="--train-blocks 1"):
        train(blocks_config(data, tmp_path / "m", pretrained=False, train_blocks=1), RuntimeOptions(**OPTIONS))
