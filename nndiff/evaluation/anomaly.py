"""Anomaly-detection evaluation (issue 6): pure metrics on numpy arrays plus the folder evaluation.

Conventions (documentation/anomaly_detection.md, "Evaluation"):

* an anomaly map is a float array, larger = more anomalous; a mask is anything whose non-zero
  voxels are anomalous; a map and its mask have the same shape;
* a threshold ``t`` predicts ``map >= t`` as anomalous;
* pooled metrics (pixel AUROC / AUPRC, best Dice) treat all voxels of all cases as one set, so
  large lesions weigh more than small ones (the convention of the AnoDDPM / Wolleb / CDPM papers).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from nndiff.errors import NnDiffError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- input checks
def _pooled(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All voxels of all cases as ``(scores float64, labels bool)``; shape/NaN problems are errors."""
    if len(maps) != len(masks):
        raise NnDiffError(f"got {len(maps)} anomaly map(s) but {len(masks)} mask(s). "
                          "Fix: pass one reference mask per anomaly map, in the same order")
    if not maps:
        raise NnDiffError("no anomaly maps given. Fix: pass at least one (map, mask) pair")
    scores, labels = [], []
    for index, (score, mask) in enumerate(zip(maps, masks)):
        score, mask = np.asarray(score), np.asarray(mask)
        if score.shape != mask.shape:
            raise NnDiffError(f"case {index}: anomaly map shape {score.shape} differs from mask shape "
                              f"{mask.shape}. Fix: compare each map with the mask of the same case and geometry")
        if not np.all(np.isfinite(score)):
            raise NnDiffError(f"case {index}: the anomaly map holds NaN or infinite values. "
                              "Fix: recompute the map (a diverged reconstruction gives non-finite residuals)")
        scores.append(score.reshape(-1).astype(np.float64))
        labels.append(mask.reshape(-1) != 0)
    return np.concatenate(scores), np.concatenate(labels)


# --------------------------------------------------------------------------- thresholds
def _dice_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dice of ``scores >= v`` for every distinct value ``v`` (descending): sort once, cumulative sums."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    true_positives = np.cumsum(sorted_labels, dtype=np.int64)
    # Last index of each run of equal values: ties are predicted together.
    last = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1]
    predicted = last + 1
    dice = 2.0 * true_positives[last] / (predicted + int(labels.sum()))
    return sorted_scores[last], dice


def dice_optimal_threshold(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[float, float]:
    """``(threshold, dice)``: the threshold whose pooled Dice of ``map >= threshold`` is highest.

    Candidates are every distinct map value (exact; one sort of all voxels). Ties between
    thresholds go to the highest one (the smallest predicted mask). When no mask has a foreground
    voxel the best prediction is empty: the threshold is just above the largest map value, Dice 1.
    """
    scores, labels = _pooled(maps, masks)
    if not labels.any():
        return float(np.nextafter(scores.max(), np.inf)), 1.0
    values, dice = _dice_curve(scores, labels)
    best = int(np.argmax(dice))  # first maximum = highest threshold among equals
    return float(values[best]), float(dice[best])


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of a sample of anomaly-map values (``skimage.filters.threshold_otsu``, 256 bins).

    Used when no validation masks exist. A constant sample has no two classes: its value is returned
    (``map >= threshold`` then marks everything, which the caller should treat as "no separation").
    """
    from skimage.filters import threshold_otsu

    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if flat.size == 0:
        raise NnDiffError("Otsu threshold of an empty sample. Fix: pass at least one anomaly-map value")
    if not np.all(np.isfinite(flat)):
        raise NnDiffError("Otsu threshold: the values hold NaN or infinite entries. Fix: recompute the maps")
    if flat.min() == flat.max():
        return float(flat[0])
    return float(threshold_otsu(flat))
