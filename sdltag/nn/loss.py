"""The SDL loss (Ben-Cohen et al., ICCV 2021), as specified in docs/SDL-METHOD.md.

Per image with seen positives P and negatives N (every other seen label):

    s_c    = max_m <A_m, w_c>
    L_rank = (1 + sigma) * (1/|P|) * sum_{p in P} sum_{n in N} softplus(s_n - s_p)
    sigma  = trace of the unbiased covariance of the positive label vectors (0 if |P| = 1),
             a constant (from labels only, no gradient)
    L_reg  = || unbiased variance over the M rows of A, per dimension ||_1
    L      = 2 * ((1 - lambda) * L_rank + lambda * L_reg)

averaged over the images that have at least one positive (the others are dropped:
their ranking term is 0/0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sdltag.nn.model import sdl_scores


@dataclass
class LossParts:
    total: Tensor
    rank: Tensor  # mean over kept images, sigma-weighted
    reg: Tensor  # mean over kept images
    sigma: Tensor  # (B_kept,) the diversity weights used
    kept: int  # images with at least one positive


def semantic_diversity(targets: Tensor, label_vectors: Tensor) -> Tensor:
    """sigma per image: trace of the unbiased covariance of its positive labels' vectors.

    targets (B, L) in {0, 1}; label_vectors (L, d). Returns (B,), 0 where |P| <= 1.
    Uses trace(Cov) = (sum_p |w_p|^2 - |sum_p w_p|^2 / n) / (n - 1), no gradient.
    """
    with torch.no_grad():
        t = targets.to(label_vectors.dtype)
        count = t.sum(dim=1)  # (B,)
        sum_vec = t @ label_vectors  # (B, d)
        sum_sq = t @ (label_vectors * label_vectors).sum(dim=1)  # (B,)
        safe = count.clamp(min=1)
        trace = (sum_sq - (sum_vec * sum_vec).sum(dim=1) / safe) / (count - 1).clamp(min=1)
        return torch.where(count > 1, trace.clamp(min=0), torch.zeros_like(trace))


def sdl_loss(
    principal_vectors: Tensor,
    label_vectors: Tensor,
    targets: Tensor,
    lam: float = 0.3,
    use_sigma: bool = True,
) -> LossParts:
    """SDL loss for a batch.

    principal_vectors (B, M, d); label_vectors (L, d) unit vectors of the seen labels;
    targets (B, L) with 1 for a positive label, 0 otherwise. Returns the loss parts;
    ``total`` is 0 (with a graph) when no image has a positive.
    """
    targets = targets.to(principal_vectors.dtype)
    keep = targets.sum(dim=1) > 0
    kept = int(keep.sum())
    if kept == 0:
        zero = principal_vectors.sum() * 0.0
        return LossParts(zero, zero, zero, torch.zeros(0), 0)
    A = principal_vectors[keep]  # (B', M, d)
    t = targets[keep]  # (B', L)
    scores = sdl_scores(A.float(), label_vectors.float())  # (B', L)
    pos = t > 0
    # Gather each image's positive scores (padded to the largest |P| in the batch) so the
    # pair tensor is (B', P_max, L), not (B', L, L): a few MB instead of hundreds.
    max_pos = int(pos.sum(dim=1).max())
    pos_weight, pos_index = torch.topk(t, max_pos, dim=1)  # (B', P_max): 1 for real positives
    pos_scores = scores.gather(1, pos_index)  # (B', P_max)
    diff = scores.unsqueeze(1) - pos_scores.unsqueeze(2)  # (B', P_max, L): s_n - s_p
    pair_mask = (pos_weight > 0).unsqueeze(2) & (~pos).unsqueeze(1)  # (B', P_max, L)
    pair_loss = (F.softplus(diff) * pair_mask).sum(dim=(1, 2))  # (B',)
    rank = pair_loss / t.sum(dim=1)  # (B',)
    sigma = semantic_diversity(t, label_vectors.float()) if use_sigma else torch.zeros_like(rank)
    rank = (1.0 + sigma) * rank
    reg = A.float().var(dim=1, unbiased=True).abs().sum(dim=1) if A.shape[1] > 1 else torch.zeros_like(rank)  # (B',)
    total = 2.0 * ((1.0 - lam) * rank + lam * reg)
    return LossParts(total.mean(), rank.mean(), reg.mean(), sigma, kept)
