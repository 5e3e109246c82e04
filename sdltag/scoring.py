"""SDL scoring in numpy: a label's score is the best match over the image's principal vectors.

    score(image, label) = max_m <A_m, w_label>      A: (M, d), w: unit vector (d,)

Raw scores are unbounded dot products; a model's manifest may carry a calibration
(Platt scaling fitted on validation data) that maps them to confidences in [0, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np


def l2_normalize(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (float32); zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, eps)


def sdl_scores(principal_vectors: np.ndarray, label_vectors: np.ndarray) -> np.ndarray:
    """Raw SDL scores.

    principal_vectors: (B, M, d) image matrices; label_vectors: (L, d) unit vectors.
    Returns (B, L) float32: for each image and label, max over the M rows of <A_m, w>.
    """
    principal_vectors = np.asarray(principal_vectors, dtype=np.float32)
    label_vectors = np.asarray(label_vectors, dtype=np.float32)
    batch, rows, dim = principal_vectors.shape
    if label_vectors.ndim != 2 or label_vectors.shape[1] != dim:
        raise ValueError(f"label vectors {label_vectors.shape} do not match principal vectors of dimension {dim}")
    if label_vectors.shape[0] == 0:
        return np.zeros((batch, 0), dtype=np.float32)
    flat = principal_vectors.reshape(batch * rows, dim) @ label_vectors.T  # (B*M, L)
    return flat.reshape(batch, rows, -1).max(axis=1)  # (B, L)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, written with tanh so large |x| never overflows; keeps x's dtype."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def calibrate(scores: np.ndarray, unseen_mask: np.ndarray | None, calibration: dict[str, Any] | None) -> np.ndarray:
    """Map raw scores (B, L) to confidences in [0, 1] with the manifest's calibration.

    ``calibration`` is ``{"method": "platt", "seen": {"a": .., "b": ..}, "unseen": {...}}``
    (``unseen`` optional: seen parameters are used for unseen labels when absent).
    Returns the raw scores unchanged when ``calibration`` is None.
    """
    if not calibration:
        return scores
    if calibration.get("method") != "platt":
        raise ValueError(f"unknown calibration method {calibration.get('method')!r}")
    seen = calibration["seen"]
    unseen = calibration.get("unseen") or seen
    a = np.full(scores.shape[-1], float(seen["a"]), dtype=np.float32)
    b = np.full(scores.shape[-1], float(seen["b"]), dtype=np.float32)
    if unseen_mask is not None:
        mask = np.asarray(unseen_mask, dtype=bool)
        a[mask] = float(unseen["a"])
        b[mask] = float(unseen["b"])
    return sigmoid(scores * a + b)  # float32: scores, a and b are float32


def top_k(scores: np.ndarray, k: int, threshold: float | None = None) -> list[list[tuple[int, float]]]:
    """Per image, the (label index, score) pairs of the ``k`` best labels, best first.

    Ties are broken by label index so the order is deterministic; pairs below
    ``threshold`` are dropped. Only the candidates at or above each row's k-th best
    score are sorted, so re-scoring a large index with many labels stays cheap.
    """
    n_images, n_labels = scores.shape
    k = max(0, min(k, n_labels))
    if k == 0:
        return [[] for _ in range(n_images)]
    kth = np.partition(scores, n_labels - k, axis=1)[:, n_labels - k]  # (B,) the k-th best score
    results: list[list[tuple[int, float]]] = []
    for row, cutoff in zip(scores, kth, strict=True):
        candidates = np.flatnonzero(row >= cutoff)  # >= k entries; more only when ties straddle the cut
        order = candidates[np.lexsort((candidates, -row[candidates]))][:k]
        picked = [(int(i), float(row[i])) for i in order]
        if threshold is not None:
            picked = [(i, s) for i, s in picked if s >= threshold]
        results.append(picked)
    return results
