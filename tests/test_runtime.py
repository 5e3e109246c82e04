"""The onnxruntime wrapper: shapes, batching, explicit provider choice (never a silent fallback)."""

from __future__ import annotations

import numpy as np
import pytest

from sdltag.errors import SdltagError
from sdltag.runtime import CPU, CUDA, ImageModel, available_providers, choose_providers


def test_run_shapes_and_batch_independence(tiny_model) -> None:
    model = ImageModel(tiny_model, device="cpu", threads=1)
    assert model.provider == CPU and model.device == "cpu"
    spec = tiny_model.manifest.input
    rng = np.random.default_rng(1)
    images = rng.normal(size=(3, 3, spec.height, spec.width)).astype(np.float32)
    out = model.run(images)
    assert out.shape == (3, tiny_model.manifest.rows, tiny_model.manifest.dim) and out.dtype == np.float32
    assert np.isfinite(out).all()
    one = model.run(images[1:2])
    np.testing.assert_allclose(one[0], out[1], rtol=1e-4, atol=1e-5)
    assert model.run(images[:0]).shape == (0, tiny_model.manifest.rows, tiny_model.manifest.dim)


def test_run_refuses_wrong_input_shape(tiny_model) -> None:
    model = ImageModel(tiny_model, device="cpu")
    with pytest.raises(ValueError, match="expects"):
        model.run(np.zeros((1, 3, 7, 7), dtype=np.float32))


def test_provider_choice_is_explicit() -> None:
    assert choose_providers("cpu", [CUDA, CPU]) == [CPU]
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("auto", [CPU]) == [CPU]
    assert choose_providers("cuda", [CUDA, CPU])[0] == CUDA
    with pytest.raises(SdltagError, match="no CUDA execution provider"):
        choose_providers("cuda", [CPU])
    with pytest.raises(SdltagError, match="--device 'tpu'"):
        choose_providers("tpu", [CPU])


def test_cuda_without_cuda_is_an_error_not_a_fallback(tiny_model) -> None:
    if CUDA in available_providers():
        model = ImageModel(tiny_model, device="cuda")
        assert model.provider == CUDA
        return
    with pytest.raises(SdltagError, match="--device cuda"):
        ImageModel(tiny_model, device="cuda")


def test_bad_threads_refused(tiny_model) -> None:
    with pytest.raises(SdltagError, match="--threads"):
        ImageModel(tiny_model, threads=0)
