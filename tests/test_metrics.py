"""The paper's metrics against values computed by hand on tiny score matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdltag.metrics import (
    average_precision,
    filter_images,
    mean_average_precision,
    precision_recall_f1_at_k,
    ranking_metrics,
    top_k_indices,
    zsl_gzsl_metrics,
)

# Image 1 has a tie between labels 1 and 2; image 2 has no positive label (filtered out).
SCORES = np.array([[0.9, 0.8, 0.1], [0.2, 0.7, 0.7], [0.5, 0.4, 0.3]])
TARGETS = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0]])


def test_filter_drops_images_without_positives() -> None:
    scores, targets = filter_images(SCORES, TARGETS)
    assert scores.shape == (2, 3)
    assert targets.tolist() == [[True, False, False], [False, False, True]]


def test_ties_in_top_k_go_to_the_lower_label_index() -> None:
    assert top_k_indices(SCORES, 1).ravel().tolist() == [0, 1, 0]
    assert top_k_indices(SCORES, 2).tolist() == [[0, 1], [1, 2], [0, 1]]
    assert top_k_indices(SCORES, 10).shape == (3, 3)


def test_micro_precision_recall_f1_by_hand() -> None:
    scores, targets = filter_images(SCORES, TARGETS)
    # K=1: image 0 -> label 0 (hit); image 1 -> label 1 by the tie rule (miss). 1 TP of 2 picks, 2 GT.
    assert precision_recall_f1_at_k(scores, targets, 1) == pytest.approx((0.5, 0.5, 0.5))
    # K=2: one hit per image: P = 2 / (2 * 2), R = 2 / 2, F1 = 2 * 0.5 * 1 / 1.5.
    assert precision_recall_f1_at_k(scores, targets, 2) == pytest.approx((0.5, 1.0, 2 / 3))
    # Micro, not per-image: an image with 3 GT labels weighs more in recall.
    scores2 = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.9]])
    targets2 = np.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    p, r, f = precision_recall_f1_at_k(scores2, targets2, 1)
    assert (p, r) == pytest.approx((1 / 2, 1 / 4))
    assert f == pytest.approx(2 * 0.5 * 0.25 / 0.75)


def test_zero_hits_give_zero_f1() -> None:
    assert precision_recall_f1_at_k(np.array([[0.9, 0.1]]), np.array([[0, 1]]), 1) == (0.0, 0.0, 0.0)


def test_average_precision_by_hand() -> None:
    # Ranks: neg, pos, neg, pos -> precisions 1/2 and 2/4.
    assert average_precision([0.9, 0.6, 0.5, 0.1], [0, 1, 0, 1]) == pytest.approx(0.5)
    # Perfect ranking.
    assert average_precision([0.9, 0.8, 0.1], [1, 1, 0]) == pytest.approx(1.0)
    # Label without a positive: undefined.
    assert math.isnan(average_precision([0.3, 0.2], [0, 0]))


def test_average_precision_with_ties_is_order_independent() -> None:
    # 0.9 neg, then {0.5 pos, 0.5 neg} tied, then 0.1 pos. The tied positive gets the
    # precision at the end of its group (1 TP in 3), the last one 2/4: AP = (1/3 + 1/2) / 2.
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    positives = np.array([0, 1, 0, 1])
    assert average_precision(scores, positives) == pytest.approx(5 / 12)
    swapped = [0, 2, 1, 3]
    assert average_precision(scores[swapped], positives[swapped]) == pytest.approx(5 / 12)
    # All scores tied: precision = prevalence.
    assert average_precision([0.3, 0.3, 0.3, 0.3], [1, 0, 0, 0]) == pytest.approx(0.25)


def test_map_rules_for_labels_without_positives() -> None:
    scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.5, 0.8], [0.5, 0.6, 0.4]])
    targets = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1]])
    scores[0, 2] = 0.95
    # AP: label 0 = 1; label 1 has no positive; label 2 ranks 0.95 neg, 0.8 pos, 0.4 pos -> (1/2 + 2/3) / 2 = 7/12.
    skip, n_skip = mean_average_precision(scores, targets, empty="skip")
    zero, n_zero = mean_average_precision(scores, targets, empty="zero")
    assert (skip, n_skip) == (pytest.approx((1 + 7 / 12) / 2), 2)
    assert (zero, n_zero) == (pytest.approx((1 + 0 + 7 / 12) / 3), 3)
    with pytest.raises(ValueError):
        mean_average_precision(scores, targets, empty="nan")


def test_ranking_metrics_filters_and_reports_percentages() -> None:
    result = ranking_metrics(SCORES, TARGETS, ks=(1, 2))
    assert result.images == 2
    assert result.labels == 3
    assert result.labels_with_positives == 2
    # AP label 0 over images 0, 1: [0.9 pos, 0.2 neg] -> 1; label 2: [0.1 neg, 0.7 pos] -> 1.
    assert result.map == pytest.approx(100.0)
    assert result.precision[1] == pytest.approx(50.0)
    assert result.f1[2] == pytest.approx(200 / 3)
    assert result.to_json()["f1"]["2"] == pytest.approx(66.6667)


def test_zsl_uses_unseen_columns_and_their_own_filtering() -> None:
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.6], [0.4, 0.3, 0.9]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    unseen = np.array([False, True, True])
    results = zsl_gzsl_metrics(scores, targets, unseen, ks=(1,))
    assert results["gzsl"].images == 3
    assert results["gzsl"].precision[1] == pytest.approx(100.0)
    zsl = results["zsl"]
    assert zsl.images == 2  # image 0 has no unseen label
    assert zsl.labels == 2
    assert zsl.precision[1] == pytest.approx(100.0)  # among unseen only: 0.8 > 0.6 and 0.9 > 0.3
    seen = results["seen"]  # the seen column alone: only image 0 has a seen label
    assert seen.images == 1 and seen.labels == 1 and seen.map == pytest.approx(100.0)
    assert "zsl" not in zsl_gzsl_metrics(scores, targets, None)
    assert "seen" not in zsl_gzsl_metrics(scores, targets, None)  # GZSL is already "seen" there


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError):
        precision_recall_f1_at_k(np.zeros((2, 3)), np.zeros((2, 2)), 1)
