"""Anomaly-detection evaluation: thresholds, pixel/case metrics, z-score baseline, folder evaluation."""
from __future__ import annotations

import numpy as np
import pytest

from nndiff.errors import NnDiffError
from nndiff.evaluation.anomaly import dice_optimal_threshold, otsu_threshold


def _dice(prediction: np.ndarray, mask: np.ndarray) -> float:
    return 2.0 * np.logical_and(prediction, mask).sum() / (prediction.sum() + mask.sum())


def test_dice_optimal_threshold_known_answer():
    # Case 1: lesion values 0.8, 0.9; case 2: lesion 0.85 with a healthy 0.3. Threshold 0.8 is perfect.
    maps = [np.array([[0.1, 0.2], [0.8, 0.9]]), np.array([0.3, 0.85])]
    masks = [np.array([[0, 0], [1, 1]]), np.array([0, 1])]
    threshold, dice = dice_optimal_threshold(maps, masks)
    # Between the last kept value (0.8) and the next smaller one (0.3): '>' and '>=' agree.
    assert threshold == pytest.approx(0.55)
    assert dice == pytest.approx(1.0)


def test_dice_optimal_threshold_matches_brute_force(rng):
    maps = [rng.normal(size=(8, 8)) for _ in range(3)]
    masks = [(m + rng.normal(scale=0.8, size=m.shape)) > 1.0 for m in maps]
    threshold, dice = dice_optimal_threshold(maps, masks)
    pooled_map, pooled_mask = np.concatenate([m.ravel() for m in maps]), np.concatenate([k.ravel() for k in masks])
    brute = max(_dice(pooled_map >= t, pooled_mask) for t in np.unique(pooled_map))
    assert dice == pytest.approx(brute)
    assert _dice(pooled_map >= threshold, pooled_mask) == pytest.approx(dice)
    assert _dice(pooled_map > threshold, pooled_mask) == pytest.approx(dice)
    assert 0 < dice < 1


def test_dice_optimal_threshold_ties_and_empty_masks():
    # Tied values are predicted together: {0.5, 0.5} with one lesion -> Dice 2/3 at 0.5, not 1.
    threshold, dice = dice_optimal_threshold([np.array([0.5, 0.5, 0.1])], [np.array([1, 0, 0])])
    assert (threshold, dice) == (pytest.approx(0.3), pytest.approx(2 / 3))
    # No lesion anywhere: the empty prediction (threshold above the maximum) is perfect.
    threshold, dice = dice_optimal_threshold([np.array([0.2, 0.7])], [np.zeros(2)])
    assert threshold > 0.7 and dice == 1.0
    # Everything is lesion: the threshold falls below the smallest value.
    threshold, dice = dice_optimal_threshold([np.array([0.2, 0.7])], [np.ones(2)])
    assert threshold < 0.2 and dice == 1.0


def test_dice_optimal_threshold_bad_input():
    with pytest.raises(NnDiffError, match="shape"):
        dice_optimal_threshold([np.zeros((2, 2))], [np.zeros((2, 3))])
    with pytest.raises(NnDiffError, match="NaN"):
        dice_optimal_threshold([np.array([np.nan, 1.0])], [np.array([0, 1])])
    with pytest.raises(NnDiffError, match="2 anomaly map"):
        dice_optimal_threshold([np.zeros(2), np.zeros(2)], [np.zeros(2)])


def test_otsu_threshold_bimodal(rng):
    low, high = rng.normal(0.0, 1.0, 500), rng.normal(10.0, 1.0, 500)
    threshold = otsu_threshold(np.concatenate([low, high]))
    # Between the modes, splitting the sample into its two components (up to one 256-bin histogram step).
    assert 2.0 < threshold < 8.0
    assert (low < threshold).mean() > 0.99 and (high >= threshold).mean() > 0.99
    assert otsu_threshold(np.full(5, 2.5)) == 2.5
    with pytest.raises(NnDiffError, match="empty"):
        otsu_threshold(np.array([]))
