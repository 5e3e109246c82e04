"""The SDL loss against a computation by explicit loops over label pairs."""

from __future__ import annotations

import math

import pytest
import torch

from sdltag.nn.loss import sdl_loss, semantic_diversity
from sdltag.nn.model import sdl_scores


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    return w / w.norm(dim=1, keepdim=True)


def _loop_loss(A: torch.Tensor, W: torch.Tensor, T: torch.Tensor, lam: float, use_sigma: bool) -> float:
    """Reference: the formula of SDL-METHOD.md written with plain Python loops."""
    per_image = []
    for b in range(A.shape[0]):
        positives = [c for c in range(W.shape[0]) if T[b, c] > 0]
        if not positives:
            continue
        negatives = [c for c in range(W.shape[0]) if T[b, c] == 0]
        scores = [max(float(A[b, m] @ W[c]) for m in range(A.shape[1])) for c in range(W.shape[0])]
        pair_sum = 0.0
        for p in positives:
            for n in negatives:
                pair_sum += math.log1p(math.exp(scores[n] - scores[p]))
        rank = pair_sum / len(positives)
        sigma = 0.0
        if use_sigma and len(positives) > 1:
            d = W.shape[1]
            for k in range(d):
                values = [float(W[p, k]) for p in positives]
                mean = sum(values) / len(values)
                sigma += sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        rank *= 1.0 + sigma
        reg = 0.0
        M = A.shape[1]
        for k in range(A.shape[2]):
            values = [float(A[b, m, k]) for m in range(M)]
            mean = sum(values) / M
            reg += abs(sum((v - mean) ** 2 for v in values) / (M - 1))
        per_image.append(2.0 * ((1 - lam) * rank + lam * reg))
    return sum(per_image) / len(per_image)


@pytest.mark.parametrize("use_sigma", [True, False])
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.01])
def test_loss_equals_explicit_pair_loops(lam: float, use_sigma: bool) -> None:
    torch.manual_seed(1)
    A = torch.randn(4, 3, 5, dtype=torch.float64)  # (B, M, d)
    W = _unit(6, 5, seed=2)
    T = torch.tensor(
        [[1, 0, 0, 1, 0, 1], [0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 1, 0, 1, 0]], dtype=torch.float64
    )
    parts = sdl_loss(A, W, T, lam=lam, use_sigma=use_sigma)
    expected = _loop_loss(A, W, T, lam, use_sigma)
    assert parts.kept == 4
    assert float(parts.total) == pytest.approx(expected, rel=1e-5)


def test_sigma_is_zero_for_one_positive_and_trace_of_covariance_otherwise() -> None:
    W = _unit(5, 4, seed=3)
    T = torch.tensor([[0, 0, 1, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.float64)
    sigma = semantic_diversity(T, W)
    assert float(sigma[0]) == 0.0
    positives = W[[0, 2, 3]]
    expected = torch.trace(torch.cov(positives.T, correction=1))
    assert float(sigma[1]) == pytest.approx(float(expected), rel=1e-9)
    assert float(sigma[1]) > 0


def test_images_without_positive_are_dropped() -> None:
    torch.manual_seed(4)
    A = torch.randn(3, 2, 4, dtype=torch.float64)
    W = _unit(5, 4, seed=5)
    T = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.float64)
    parts = sdl_loss(A, W, T)
    alone = sdl_loss(A[[0, 2]], W, T[[0, 2]])
    assert parts.kept == 2
    assert float(parts.total) == pytest.approx(float(alone.total), rel=1e-12)
    empty = sdl_loss(A, W, torch.zeros_like(T))
    assert empty.kept == 0 and float(empty.total) == 0.0


def test_no_nan_with_large_scores_and_gradients_flow() -> None:
    A = (torch.randn(2, 3, 4) * 1e4).requires_grad_()
    W = _unit(6, 4, seed=6).float()
    T = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 1]], dtype=torch.float32)
    parts = sdl_loss(A, W, T, lam=0.1)
    parts.total.backward()
    assert torch.isfinite(parts.total)
    assert torch.isfinite(A.grad).all() and A.grad.abs().sum() > 0


def test_torch_scores_are_max_over_rows() -> None:
    A = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2, 2)
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    assert sdl_scores(A, W).tolist() == [[1.0, 2.0, pytest.approx(1.6)]]
