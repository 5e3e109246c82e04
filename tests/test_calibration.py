"""Platt calibration and expected calibration error."""

from __future__ import annotations

import numpy as np
import pytest

from sdltag.nn.calibration import expected_calibration_error, fit_calibration, fit_platt
from sdltag.scoring import calibrate


def test_ece_by_hand() -> None:
    # Bin of 0.1: positive rate 0.5 -> |0.5 - 0.1| * 2/4; bin of 0.9: rate 1 -> 0.1 * 2/4.
    assert expected_calibration_error([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1]) == pytest.approx(0.25)
    assert expected_calibration_error([0.0, 1.0], [0, 1]) == pytest.approx(0.0)


def test_platt_recovers_the_true_curve() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=200_000)
    truth = 1 / (1 + np.exp(-(3.0 * scores - 1.0)))
    labels = rng.random(scores.size) < truth
    a, b = fit_platt(scores, labels)
    assert a == pytest.approx(3.0, abs=0.1)
    assert b == pytest.approx(-1.0, abs=0.05)
    calibrated = 1 / (1 + np.exp(-(a * scores + b)))
    assert expected_calibration_error(calibrated, labels) < 0.01
    assert expected_calibration_error(1 / (1 + np.exp(-scores)), labels) > 0.05


def test_platt_survives_perfect_separation() -> None:
    a, b = fit_platt(np.array([-2.0, -1.0, 1.0, 2.0]), np.array([0, 0, 1, 1]))
    assert np.isfinite(a) and np.isfinite(b) and a > 0


def test_fit_calibration_format_matches_scoring() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(400, 5))
    targets = rng.random((400, 5)) < 1 / (1 + np.exp(-(2 * scores - 2)))
    targets[:, 4] |= scores[:, 4] > 1.5  # unseen column: a different relation
    unseen = np.array([False, False, False, False, True])
    calibration, report = fit_calibration(scores, targets, unseen)
    assert calibration["method"] == "platt" and set(calibration) == {"method", "seen", "unseen"}
    assert report.ece_seen is not None and report.ece_seen < 0.05
    assert report.ece_unseen is not None
    assert report.pairs_seen == 1600 and report.pairs_unseen == 400
    confidences = calibrate(scores.astype(np.float32), unseen, calibration)
    seen = calibration["seen"]
    expected = 1 / (1 + np.exp(-(seen["a"] * scores[:, 0] + seen["b"])))
    np.testing.assert_allclose(confidences[:, 0], expected, rtol=1e-4, atol=1e-6)
    assert ((confidences >= 0) & (confidences <= 1)).all()


def test_group_without_positives_is_not_fitted() -> None:
    scores = np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3]])
    targets = np.array([[1, 0], [0, 0], [1, 0]])
    calibration, report = fit_calibration(scores, targets, np.array([False, True]))
    assert "unseen" not in calibration
    assert report.ece_unseen is None
    none, _ = fit_calibration(scores, np.zeros_like(targets), None)
    assert none is None
