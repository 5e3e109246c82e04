"""The paper's metrics (docs/SDL-METHOD.md, "Evaluation protocol"), in numpy.

- Images are kept only if they have at least one ground-truth label in the evaluated
  label set (ZSL: the unseen labels; GZSL: seen + unseen).
- P@K, R@K, F1@K are micro ("overall"): P = sum TP / (N_images * K), R = sum TP / sum GT,
  F1 = 2PR / (P + R). The top K of an image are its K highest scores; equal scores are
  ordered by label index (the same rule as ``sdltag.scoring.top_k``), so results are
  deterministic.
- AP of one label: non-interpolated, the mean over its positive images of the precision
  at that image's rank. Images with equal scores are ranked as one group (each positive
  in the group gets the precision over everything scoring at least as high), so AP never
  depends on the order of tied images. mAP averages AP over labels.
- Labels without a positive image: AP is undefined. sdltag **skips** them from the mean
  (``empty="skip"``, the default) and reports how many labels were averaged; the
  official SDL code counts them as 0 (``empty="zero"``), which lowers mAP by the share
  of such labels.

Functions return fractions in [0, 1]; ``RankingMetrics`` holds percentages (x100) as the
paper reports them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

EMPTY_RULES = ("skip", "zero")


def _check(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets) > 0
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must be the same (N, L) shape")
    return scores, targets


def filter_images(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the rows (images) with at least one positive label."""
    scores, targets = _check(scores, targets)
    keep = targets.any(axis=1)
    return scores[keep], targets[keep]


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """(N, min(k, L)) label indices of each row's k best scores; ties go to the lower label index."""
    scores = np.asarray(scores, dtype=np.float64)
    k = max(0, min(k, scores.shape[1]))
    # A stable sort of -scores keeps equal scores in label-index order.
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def precision_recall_f1_at_k(scores: np.ndarray, targets: np.ndarray, k: int) -> tuple[float, float, float]:
    """Micro P@K, R@K, F1@K over the given images (no filtering here: see ``filter_images``)."""
    scores, targets = _check(scores, targets)
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        return 0.0, 0.0, 0.0
    picked = top_k_indices(scores, k)  # (N, K)
    true_positives = float(np.take_along_axis(targets, picked, axis=1).sum())
    precision = true_positives / (scores.shape[0] * k)
    total_gt = float(targets.sum())
    recall = true_positives / total_gt if total_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Non-interpolated AP of one label over images; NaN when the label has no positive.

    Tied scores form one group: every positive in a group gets the precision measured at
    the group's end (all images scoring at least as high).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = np.asarray(positives).ravel() > 0
    n_pos = int(positives.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_pos = scores[order], positives[order]
    # Index of the last element of each run of equal scores.
    group_end = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    cum_tp = np.cumsum(sorted_pos)[group_end]  # true positives at each group's end
    tp_in_group = np.diff(np.r_[0, cum_tp])
    precision_at_end = cum_tp / (group_end + 1)
    return float((tp_in_group * precision_at_end).sum() / n_pos)


def mean_average_precision(scores: np.ndarray, targets: np.ndarray, empty: str = "skip") -> tuple[float, int]:
    """mAP over labels and how many labels were averaged. ``empty``: "skip" or "zero" (see module doc)."""
    if empty not in EMPTY_RULES:
        raise ValueError(f"empty must be one of {EMPTY_RULES}")
    scores, targets = _check(scores, targets)
    aps = np.array([average_precision(scores[:, j], targets[:, j]) for j in range(scores.shape[1])])
    if empty == "zero":
        aps = np.nan_to_num(aps, nan=0.0)
    valid = aps[~np.isnan(aps)]
    return (float(valid.mean()) if valid.size else 0.0), int(valid.size)


@dataclass
class RankingMetrics:
    """One protocol's results (ZSL or GZSL); metric values are percentages (x100)."""

    images: int  # images kept (with >= 1 positive in the evaluated labels)
    labels: int  # labels ranked
    labels_with_positives: int  # labels averaged in mAP (rule "skip")
    map: float
    precision: dict[int, float]
    recall: dict[int, float]
    f1: dict[int, float]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("precision", "recall", "f1"):
            data[key] = {str(k): round(v, 4) for k, v in data[key].items()}
        data["map"] = round(self.map, 4)
        return data


def ranking_metrics(
    scores: np.ndarray, targets: np.ndarray, ks: tuple[int, ...] = (3, 5), empty: str = "skip"
) -> RankingMetrics:
    """The paper's protocol on one label set: filter images, then mAP and micro P/R/F1 at each K."""
    n_labels = int(np.asarray(scores).shape[1])
    scores, targets = filter_images(scores, targets)
    mean_ap, averaged = mean_average_precision(scores, targets, empty=empty)
    precision, recall, f1 = {}, {}, {}
    for k in ks:
        p, r, f = precision_recall_f1_at_k(scores, targets, k)
        precision[k], recall[k], f1[k] = 100 * p, 100 * r, 100 * f
    with_pos = int(targets.any(axis=0).sum())
    return RankingMetrics(
        images=int(scores.shape[0]),
        labels=n_labels,
        labels_with_positives=with_pos if empty == "skip" else averaged,
        map=100 * mean_ap,
        precision=precision,
        recall=recall,
        f1=f1,
    )


def zsl_gzsl_metrics(
    scores: np.ndarray,
    targets: np.ndarray,
    unseen_mask: np.ndarray | None,
    ks: tuple[int, ...] = (3, 5),
    empty: str = "skip",
) -> dict[str, RankingMetrics]:
    """GZSL on every column and, when some labels are unseen, ZSL on the unseen columns only and
    "seen" on the seen columns only (how well the training labels themselves were learned)."""
    scores, targets = _check(scores, targets)
    results = {"gzsl": ranking_metrics(scores, targets, ks, empty)}
    if unseen_mask is not None and np.asarray(unseen_mask).any():
        mask = np.asarray(unseen_mask, dtype=bool)
        results["zsl"] = ranking_metrics(scores[:, mask], targets[:, mask], ks, empty)
        if (~mask).any():
            results["seen"] = ranking_metrics(scores[:, ~mask], targets[:, ~mask], ks, empty)
    return results
