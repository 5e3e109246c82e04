"""Score calibration: Platt scaling of raw SDL scores, fitted on validation data.

A raw score is an unbounded dot product; ``confidence = sigmoid(a * raw + b)`` with one
(a, b) for seen labels and one for unseen labels (their scores sit lower: the image side
never trained on them). Each pair is fitted by Newton's method on the logistic loss
over every (image, label) pair of the validation set, with Platt's smoothed targets
(``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``) so a perfectly separated set does not
send ``a`` to infinity. The result is the manifest's ``calibration`` dict read by
``sdltag.scoring.calibrate``. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sdltag.scoring import sigmoid

ECE_BINS = 15


def fit_platt(scores: np.ndarray, targets: np.ndarray, max_iter: int = 100, tol: float = 1e-10) -> tuple[float, float]:
    """Fit (a, b) of sigmoid(a * s + b) to binary ``targets`` by Newton's method (Platt, 1999)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(targets).ravel() > 0
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if s.size == 0:
        raise ValueError("no scores to calibrate")
    t = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    a, b = 1.0, float(np.log((n_pos + 1.0) / (n_neg + 1.0)))
    # Scale the scores for a well-conditioned Hessian; undo it at the end.
    scale = float(s.std()) or 1.0
    x = s / scale

    def loss(a_: float, b_: float) -> float:
        z = a_ * x + b_
        return float(np.sum(np.logaddexp(0.0, z) - t * z))

    current = loss(a, b)
    for _ in range(max_iter):
        z = a * x + b
        p = 0.5 * (1.0 + np.tanh(0.5 * z))
        g_a, g_b = float(np.dot(p - t, x)), float(np.sum(p - t))
        w = p * (1 - p)
        h_aa, h_ab, h_bb = float(np.dot(w, x * x)) + 1e-12, float(np.dot(w, x)), float(w.sum()) + 1e-12
        det = h_aa * h_bb - h_ab * h_ab
        if det <= 0:
            break
        step_a = (h_bb * g_a - h_ab * g_b) / det
        step_b = (h_aa * g_b - h_ab * g_a) / det
        step = 1.0
        while step > 1e-8:  # backtracking line search keeps every step a descent step
            new = loss(a - step * step_a, b - step * step_b)
            if new <= current:
                break
            step /= 2
        a, b = a - step * step_a, b - step * step_b
        improvement, current = current - new, new
        if improvement < tol * max(1.0, abs(current)):
            break
    return a / scale, b


def expected_calibration_error(confidences: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: sum over equal-width confidence bins of (share of pairs) * |positive rate - mean confidence|."""
    c = np.asarray(confidences, dtype=np.float64).ravel()
    y = (np.asarray(targets).ravel() > 0).astype(np.float64)
    if c.size == 0:
        return 0.0
    which = np.minimum((c * bins).astype(np.int64), bins - 1)
    conf_sum = np.bincount(which, weights=c, minlength=bins)
    pos_sum = np.bincount(which, weights=y, minlength=bins)
    return float(np.abs(pos_sum - conf_sum).sum() / c.size)


@dataclass
class CalibrationReport:
    """ECE of the fitted calibration on the data it was fitted on, per label group."""

    ece_seen: float | None
    ece_unseen: float | None
    pairs_seen: int
    pairs_unseen: int

    def to_json(self) -> dict[str, Any]:
        return {
            "ece_seen": None if self.ece_seen is None else round(self.ece_seen, 5),
            "ece_unseen": None if self.ece_unseen is None else round(self.ece_unseen, 5),
            "pairs_seen": self.pairs_seen,
            "pairs_unseen": self.pairs_unseen,
        }


def fit_calibration(
    scores: np.ndarray, targets: np.ndarray, unseen_mask: np.ndarray | None = None
) -> tuple[dict[str, Any] | None, CalibrationReport]:
    """Fit Platt parameters for the seen and (when present) unseen columns of (N, L) raw scores.

    A group without any positive pair cannot be fitted and is left out (unseen labels then
    use the seen parameters). Returns (manifest calibration dict or None, ECE report).
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets) > 0
    mask = np.zeros(scores.shape[1], dtype=bool) if unseen_mask is None else np.asarray(unseen_mask, dtype=bool)
    calibration: dict[str, Any] = {"method": "platt"}
    eces: dict[str, float | None] = {"seen": None, "unseen": None}
    pairs = {"seen": 0, "unseen": 0}
    for group, columns in (("seen", ~mask), ("unseen", mask)):
        s, y = scores[:, columns], targets[:, columns]
        pairs[group] = int(s.size)
        if s.size == 0 or not y.any() or y.all():
            continue
        a, b = fit_platt(s, y)
        calibration[group] = {"a": a, "b": b}
        eces[group] = expected_calibration_error(sigmoid(a * s + b), y)
    if "seen" not in calibration:
        if "unseen" not in calibration:
            return None, CalibrationReport(None, None, pairs["seen"], pairs["unseen"])
        calibration["seen"] = calibration["unseen"]
    return calibration, CalibrationReport(eces["seen"], eces["unseen"], pairs["seen"], pairs["unseen"])
