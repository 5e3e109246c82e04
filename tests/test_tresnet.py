"""TResNet-M against the official architecture: layout, golden output (torch and ONNX), and its layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import zs_sdl_layout as zs

from sdltag.modelfolder import EmbedderSpec, InputSpec, load_model_folder
from sdltag.nn.backbones import available_backbones, create_backbone
from sdltag.nn.backbones.tresnet import AntiAliasDownsample, InPlaceABN, SpaceToDepth
from sdltag.nn.export import export_model
from sdltag.nn.model import SDLModel
from sdltag.nn.official import official_config, to_official_key, to_sdltag_key


@pytest.fixture(scope="module")
def official_model() -> SDLModel:
    """sdltag's SDLModel(tresnet_m, interleaved) with the layout rule's weights, loaded strictly."""
    zs.require_fixtures()
    model = SDLModel(official_config())
    missing, unexpected = model.load_state_dict(
        {to_sdltag_key(k): v for k, v in zs.rule_state_dict().items()}, strict=True
    )
    assert not missing and not unexpected
    return model.eval()


def test_registered() -> None:
    assert "tresnet_m" in available_backbones()
    assert create_backbone("tresnet_m").num_features == 2048


def test_state_dict_keys_and_shapes_equal_the_official_layout() -> None:
    layout = zs.layout_shapes()
    model = SDLModel(official_config())
    ours = {to_official_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(layout)  # same keys, same order
    assert ours == layout
    # The backbone alone carries exactly the official keys minus the head's embedding.
    assert set(model.backbone.state_dict()) == set(layout) - {"embedding.weight"}
    assert sum(p.numel() for p in model.state_dict().values()) == zs.load_layout()["num_parameters"]


def test_golden_output_torch(official_model: SDLModel) -> None:
    with torch.no_grad():
        out = official_model(torch.from_numpy(zs.golden_input()))  # (1, 7, 300)
    assert out.shape == (1, 7, 300)
    diff = np.abs(out[0].numpy() - zs.golden_principal_vectors()).max()
    assert diff < 1e-4, f"max abs difference to the official output: {diff}"


def test_golden_output_onnx(official_model: SDLModel, tmp_path: Path) -> None:
    labels = ["a", "b"]
    vectors = np.eye(2, 300, dtype=np.float32)
    folder = export_model(
        official_model,
        tmp_path / "model",
        input_spec=InputSpec(224, 224),
        embedder=EmbedderSpec("word-vectors", "t", "t@sha256:0", 300),
        seen_labels=labels,
        unseen_labels=[],
        label_vectors=vectors,
    )
    folder = load_model_folder(folder.path)
    session = ort.InferenceSession(str(folder.onnx_path), providers=["CPUExecutionProvider"])
    x = zs.golden_input()
    noise = np.random.default_rng(0).random(x.shape, dtype=np.float32)
    batch = np.concatenate([x, noise])  # dynamic batch of 2; the second image differs
    (out,) = session.run(None, {"images": batch})
    assert out.shape == (2, 7, 300)
    diff = np.abs(out[0] - zs.golden_principal_vectors()).max()
    assert diff < 1e-4, f"ONNX: max abs difference to the official output: {diff}"
    with torch.no_grad():
        expected = official_model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
    # Under the rule's weights the output moves little with the input, but well beyond the tolerance.
    assert np.abs(out[1] - out[0]).max() > 1e-3


# --- the layers, against their definitions (no fixtures needed) ---------------------------------


def _abn(activation: str = "leaky_relu", slope: float = 0.01) -> InPlaceABN:
    torch.manual_seed(0)
    abn = InPlaceABN(5, activation=activation, slope=slope)
    with torch.no_grad():
        abn.weight.copy_(torch.tensor([1.5, -0.7, 0.0, 2.0, -1.0]))  # negative and zero: scale is |w| + 1e-5
        abn.bias.uniform_(-0.5, 0.5)
        abn.running_mean.uniform_(-0.3, 0.3)
        abn.running_var.uniform_(0.5, 2.0)
    return abn


@pytest.mark.parametrize(("activation", "slope"), [("leaky_relu", 0.01), ("leaky_relu", 0.001), ("identity", 0.0)])
def test_inplace_abn_eval_formula(activation: str, slope: float) -> None:
    abn = _abn(activation, slope).eval()
    x = torch.randn(3, 5, 4, 4) * 3
    c = (slice(None), None, None)
    y = (x - abn.running_mean[c]) / torch.sqrt(abn.running_var[c] + 1e-5) * (abn.weight.abs()[c] + 1e-5)
    y = y + abn.bias[c]
    if activation == "leaky_relu":
        y = torch.where(y >= 0, y, y * slope)
    torch.testing.assert_close(abn(x), y)
    assert set(abn.state_dict()) == {"weight", "bias", "running_mean", "running_var"}


def test_inplace_abn_trains_like_batch_norm() -> None:
    abn = _abn("identity").train()
    mean0, var0 = abn.running_mean.clone(), abn.running_var.clone()
    x = torch.randn(4, 5, 3, 3) * 2 + 1
    y = abn(x)
    batch_mean = x.mean(dim=(0, 2, 3))
    batch_var = x.var(dim=(0, 2, 3), unbiased=False)
    c = (slice(None), None, None)
    expected = (x - batch_mean[c]) / torch.sqrt(batch_var[c] + 1e-5) * (abn.weight.abs()[c] + 1e-5) + abn.bias[c]
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(abn.running_mean, 0.9 * mean0 + 0.1 * batch_mean)
    torch.testing.assert_close(abn.running_var, 0.9 * var0 + 0.1 * x.var(dim=(0, 2, 3), unbiased=True))


def test_space_to_depth_channel_order() -> None:
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    y = SpaceToDepth()(x)
    assert y.shape == (2, 48, 2, 3)
    for n in range(2):
        for i in range(4):
            for j in range(4):
                for c in range(3):
                    # permute (0, 3, 5, 1, 2, 4): channel = (i * 4 + j) * C + c, pixel (4h + i, 4w + j)
                    torch.testing.assert_close(y[n, (i * 4 + j) * 3 + c], x[n, c, i::4, j::4])


def test_anti_alias_downsample_is_a_reflect_padded_binomial_blur() -> None:
    torch.manual_seed(0)
    layer = AntiAliasDownsample(2)
    assert dict(layer.state_dict()) == {}  # not stored in the checkpoint
    x = torch.randn(1, 2, 6, 6)
    y = layer(x)
    assert y.shape == (1, 2, 3, 3)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")[0].numpy()
    kernel = np.outer([1, 2, 1], [1, 2, 1]) / 16.0
    for c in range(2):
        for r in range(3):
            for q in range(3):
                window = padded[c, 2 * r : 2 * r + 3, 2 * q : 2 * q + 3]
                assert abs(float(y[0, c, r, q]) - float((window * kernel).sum())) < 1e-5
    flat = layer(torch.full((1, 2, 6, 6), 0.7))
    torch.testing.assert_close(flat, torch.full((1, 2, 3, 3), 0.7))


def test_tiny_tresnet_feature_map_and_batch_independence() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("tresnet_m", width_factor=0.125, layers=[1, 1, 1, 1]).eval()
    assert backbone.num_features == 256
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = backbone(x)
        single = backbone(x[1:2])
    assert out.shape == (3, 256, 2, 2)  # stride 32
    torch.testing.assert_close(out[1:2], single, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        create_backbone("tresnet_m", layers=[1, 1, 1])


def test_zero_initialised_norm_scales_still_learn() -> None:
    # Each residual branch's last InPlaceABN starts at weight 0 (as the official init); the
    # scale |w| + 1e-5 must still pass a gradient to w there, or those weights never move.
    torch.manual_seed(0)
    backbone = create_backbone("tresnet_m", width_factor=0.125, layers=[1, 1, 1, 1]).train()
    zero = [name for name, p in backbone.named_parameters() if name.endswith(".1.weight") and not p.any()]
    assert len(zero) == 4  # one per block
    backbone(torch.randn(2, 3, 64, 64)).square().sum().backward()
    params = dict(backbone.named_parameters())
    for name in zero:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
