"""Backbones, the SDL head layouts, and numpy/torch scoring agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdltag import scoring
from sdltag.nn.backbones import available_backbones, create_backbone
from sdltag.nn.model import ModelConfig, SDLHead, SDLModel, sdl_scores

# Tiny configurations of every registered backbone (name -> (config, input size)).
TINY = {
    "smallcnn": ({"width": 4}, 32),
    "resnet50": ({"width": 4, "layers": (1, 1, 1, 1)}, 64),
    "tresnet_m": ({"width_factor": 0.125, "layers": (1, 1, 1, 1)}, 64),
    # EfficientNet-Lite has no width option (its weights fix the shapes): the real network, small input.
    "efficientnet_lite0": ({}, 32),
    "efficientnet_lite1": ({}, 32),
    "efficientnet_lite2": ({}, 32),
}


def test_every_registered_backbone_has_a_tiny_config() -> None:
    assert {"smallcnn", "resnet50"} <= set(available_backbones())
    missing = set(available_backbones()) - set(TINY)
    assert not missing, f"add a tiny configuration for {missing}"


@pytest.mark.parametrize("name", sorted(TINY))
def test_backbone_shape_finite_and_gradients_everywhere(name: str) -> None:
    if name not in available_backbones():
        pytest.skip(f"{name} not registered")
    config, size = TINY[name]
    torch.manual_seed(0)
    model = SDLModel(ModelConfig(backbone=name, backbone_config=config, rows=3, dim=8))
    model.train()
    # Residual blocks zero-initialise their last norm scale (identity at start), which blocks
    # gradients to the layers before it at step 0; give those scales a value first.
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1 and not param.any():
                param.fill_(1.0)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3, 8)
    assert torch.isfinite(out).all()
    # A loss that depends on every output element, so every parameter should get a gradient.
    (out.square().sum() + out.sum()).backward()
    for pname, param in model.named_parameters():
        if pname.startswith("backbone._fc."):
            # EfficientNet-Lite keeps its ImageNet classifier (the photo recipe's teacher); the SDL
            # path never uses it, so it must get no gradient.
            assert param.grad is None, f"{name}: the ImageNet classifier {pname} is on the SDL path"
            continue
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


def test_unknown_backbone_is_refused_with_the_choices() -> None:
    from sdltag.errors import SdltagError

    with pytest.raises(SdltagError, match="smallcnn"):
        create_backbone("vgg-nonexistent")


def test_head_layouts() -> None:
    head_c = SDLHead(4, rows=2, dim=3, layout="contiguous")
    head_i = SDLHead(4, rows=2, dim=3, layout="interleaved")
    weight = torch.arange(24, dtype=torch.float32).view(6, 4)
    head_c.embedding.weight.data.copy_(weight)
    head_i.embedding.weight.data.copy_(weight)
    features = torch.randn(1, 4, 2, 2)
    flat = features.mean(dim=(2, 3)) @ weight.T  # (1, 6)
    torch.testing.assert_close(head_c(features)[0, 1], flat[0, 3:6])  # row 1 = out[3:6]
    torch.testing.assert_close(head_i(features)[0, 1], flat[0, 1::2])  # row 1 = out[1::2]
    with pytest.raises(ValueError):
        SDLHead(4, 2, 3, layout="diagonal")


def test_numpy_and_torch_scoring_agree() -> None:
    rng = np.random.default_rng(0)
    A = rng.normal(size=(5, 7, 16)).astype(np.float32)
    W = scoring.l2_normalize(rng.normal(size=(40, 16)))
    expected = sdl_scores(torch.from_numpy(A), torch.from_numpy(W)).numpy()
    np.testing.assert_allclose(scoring.sdl_scores(A, W), expected, rtol=1e-5, atol=1e-5)
    # and both equal the definition: max over rows of the dot product
    brute = np.array([[max(A[b, m] @ W[c] for m in range(7)) for c in range(40)] for b in range(5)])
    np.testing.assert_allclose(expected, brute, rtol=1e-5, atol=1e-5)


def test_calibration_and_top_k() -> None:
    scores = np.array([[2.0, -1.0, 0.5, 2.0]], dtype=np.float32)
    calibration = {"method": "platt", "seen": {"a": 2.0, "b": -1.0}, "unseen": {"a": 1.0, "b": 0.0}}
    unseen = np.array([False, False, True, True])
    conf = scoring.calibrate(scores, unseen, calibration)
    expected = 1 / (1 + np.exp(-np.array([3.0, -3.0, 0.5, 2.0])))
    np.testing.assert_allclose(conf[0], expected, rtol=1e-5)
    assert scoring.calibrate(scores, unseen, None) is scores
    # ties broken by label index; threshold drops low scores
    assert scoring.top_k(scores, 3) == [[(0, 2.0), (3, 2.0), (2, 0.5)]]
    assert scoring.top_k(scores, 10, threshold=1.0) == [[(0, 2.0), (3, 2.0)]]


def test_top_k_matches_a_full_sort_with_ties() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=(40, 30)).astype(np.float32)  # many ties
    for k in (1, 3, 10, 30, 50):
        expected = [
            [(int(i), float(row[i])) for i in sorted(range(row.size), key=lambda i: (-row[i], i))[:k]] for row in scores
        ]
        assert scoring.top_k(scores, k) == expected
    assert scoring.top_k(scores, 0) == [[] for _ in range(40)]
