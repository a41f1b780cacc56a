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
from dataclasses import dataclass
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


def _between(values: np.ndarray, index: int) -> float:
    """A threshold that keeps ``values[:index + 1]`` (descending distinct values) with ``>`` and ``>=``
    alike: the midpoint to the next smaller value, or just below the smallest."""
    if index + 1 < values.size:
        return float((values[index] + values[index + 1]) / 2.0)
    return float(np.nextafter(values[index], -np.inf))


def dice_optimal_threshold(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[float, float]:
    """``(threshold, dice)``: the threshold whose pooled Dice of the predicted mask is highest.

    Candidates are every distinct map value (exact; one sort of all voxels). The returned threshold
    lies between the last kept value and the next smaller one, so ``map > threshold`` and
    ``map >= threshold`` give the same mask. Ties between thresholds go to the highest one (the
    smallest predicted mask). When no mask has a foreground voxel the best prediction is empty: the
    threshold is just above the largest map value, Dice 1.
    """
    scores, labels = _pooled(maps, masks)
    if not labels.any():
        return float(np.nextafter(scores.max(), np.inf)), 1.0
    values, dice = _dice_curve(scores, labels)
    best = int(np.argmax(dice))  # first maximum = highest threshold among equals
    return _between(values, best), float(dice[best])


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


# --------------------------------------------------------------------------- ranking metrics
#: Pooled voxels above this count are subsampled (seeded, uniform with replacement) for AUROC/AUPRC.
MAX_VOXELS = 10_000_000
SUBSAMPLE_SEED = 0


def subsample_voxels(scores: np.ndarray, labels: np.ndarray,
                     max_voxels: int | None = MAX_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_voxels`` (score, label) pairs: all of them, or a seeded uniform draw (same
    inputs -> same subset, so reports are reproducible). ``None`` keeps everything."""
    if max_voxels is None or scores.size <= max_voxels:
        return scores, labels
    index = np.random.default_rng(SUBSAMPLE_SEED).integers(0, scores.size, size=int(max_voxels))
    logger.info("AUROC/AUPRC on %d of %d voxels (seeded subsample)", max_voxels, scores.size)
    return scores[index], labels[index]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the binary ``labels`` (Mann-Whitney U with average
    ranks, so ties count one half, as ``sklearn.metrics.roc_auc_score``). ``None`` when only one
    class is present (the AUROC is undefined)."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1) != 0
    positives, negatives = int(labels.sum()), int(labels.size - labels.sum())
    if positives == 0 or negatives == 0:
        return None
    rank_sum = float(rankdata(scores)[labels].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the precision-recall curve as the step sum ``sum_n (R_n - R_{n-1}) P_n`` over the
    distinct score values (``sklearn.metrics.average_precision_score``'s definition, no
    interpolation). ``None`` without any positive label."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1) != 0
    total = int(labels.sum())
    if total == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    sorted_scores, true_positives = scores[order], np.cumsum(labels[order], dtype=np.int64)
    last = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1]
    recall = true_positives[last] / total
    precision = true_positives[last] / (last + 1)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                max_voxels: int | None = MAX_VOXELS) -> float | None:
    """Pooled voxel-level AUROC of the anomaly maps against the masks (``None``: one class only)."""
    return roc_auc(*subsample_voxels(*_pooled(maps, masks), max_voxels))


def pixel_auprc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                max_voxels: int | None = MAX_VOXELS) -> float | None:
    """Pooled voxel-level average precision (``None``: no anomalous voxel)."""
    return average_precision(*subsample_voxels(*_pooled(maps, masks), max_voxels))


# --------------------------------------------------------------------------- Dice and case scores
def pooled_dice(predictions: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Dice of binary predictions against masks over all voxels of all cases (1 when both are empty)."""
    predicted, labels = _pooled(predictions, masks)
    predicted = predicted != 0
    denominator = int(predicted.sum() + labels.sum())
    return 1.0 if denominator == 0 else 2.0 * int(np.logical_and(predicted, labels).sum()) / denominator


def dice_at_threshold(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float) -> float:
    """Pooled Dice of ``map >= threshold`` (the operating point a predictor chose)."""
    return pooled_dice([np.asarray(m) >= threshold for m in maps], masks)


#: Case-score rules; the default matches the anomaly predictor's case score.
CASE_SCORE_METHODS = ("top1_mean", "max")
TOP_FRACTION = 0.01


def case_score(anomaly_map: np.ndarray, method: str = "top1_mean", fraction: float = TOP_FRACTION) -> float:
    """One number per case: the mean of the largest ``fraction`` of the map's voxels (at least one
    voxel; robust to single hot voxels) or the map's maximum."""
    values = np.asarray(anomaly_map, dtype=np.float64).reshape(-1)
    if method == "max":
        return float(values.max())
    if method != "top1_mean":
        raise NnDiffError(f"unknown case score {method!r}. Fix: use one of {', '.join(CASE_SCORE_METHODS)}")
    if not 0 < fraction <= 1:
        raise NnDiffError(f"case-score fraction must be in (0, 1], got {fraction}")
    count = max(1, int(np.ceil(fraction * values.size)))
    return float(np.partition(values, values.size - count)[values.size - count:].mean())


def case_auroc(scores: Sequence[float], anomalous: Sequence[bool]) -> float | None:
    """AUROC of case scores for telling anomalous from healthy cases (``None``: one kind only)."""
    return roc_auc(np.asarray(scores, dtype=np.float64), np.asarray(anomalous, dtype=bool))


# --------------------------------------------------------------------------- z-score baseline
#: Voxel-wise standard deviations are floored at this fraction of the pooled healthy std, so that
#: constant background (std 0) does not turn rounding noise into huge z-scores.
STD_FLOOR_FRACTION = 0.05


@dataclass
class ZScoreStats:
    """Healthy intensity statistics per channel: ``(C, *spatial)`` maps (voxel-wise) or ``(C,)``
    values broadcast over the image (global, when the healthy images differ in shape)."""

    mean: np.ndarray
    std: np.ndarray

    @property
    def voxelwise(self) -> bool:
        return self.mean.ndim > 1


def normalize_image(image: np.ndarray) -> np.ndarray:
    """Per-image, per-channel z-score normalization (nnU-Net's default for MR): removes scanner
    scaling before healthy and test intensities are compared."""
    image = np.asarray(image, dtype=np.float64)
    axes = tuple(range(1, image.ndim))
    mean, std = image.mean(axis=axes, keepdims=True), image.std(axis=axes, keepdims=True)
    return (image - mean) / np.maximum(std, 1e-8)


def fit_zscore_baseline(healthy_images: Sequence[np.ndarray], voxelwise: bool | None = None) -> ZScoreStats:
    """Mean and std of normalized healthy images ``(C, *spatial)``: voxel-wise maps when every image
    has one shape (``voxelwise=None`` decides so), else per-channel global values."""
    if len(healthy_images) == 0:
        raise NnDiffError("the z-score baseline needs healthy training images, got none. Fix: provide "
                          "healthy cases (metadata.json \"healthy\": true, or an all-zero labelsTr mask)")
    images = [normalize_image(image) for image in healthy_images]
    same_shape = len({image.shape for image in images}) == 1
    if voxelwise and not same_shape:
        raise NnDiffError("voxel-wise z-score statistics need healthy images of one shape; got shapes "
                          f"{sorted({image.shape for image in images})}. Fix: pass voxelwise=False (global statistics)")
    pooled = np.concatenate([image.reshape(image.shape[0], -1) for image in images], axis=1)
    floor = STD_FLOOR_FRACTION * np.maximum(pooled.std(axis=1), 1e-8)
    if (voxelwise is None and same_shape) or voxelwise:
        stack = np.stack(images)
        shape = (-1,) + (1,) * (stack.ndim - 2)
        return ZScoreStats(stack.mean(axis=0), np.maximum(stack.std(axis=0), floor.reshape(shape)))
    return ZScoreStats(pooled.mean(axis=1), np.maximum(pooled.std(axis=1), floor))


def zscore_map(image: np.ndarray, stats: ZScoreStats) -> np.ndarray:
    """Anomaly map of the baseline: ``sum_c |z_c|`` of the normalized image against healthy stats."""
    normalized = normalize_image(image)
    if stats.voxelwise:
        if stats.mean.shape != normalized.shape:
            raise NnDiffError(f"image shape {normalized.shape} differs from the healthy statistics' "
                              f"{stats.mean.shape}. Fix: fit global statistics (voxelwise=False) or align the images")
        mean, std = stats.mean, stats.std
    else:
        if stats.mean.shape[0] != normalized.shape[0]:
            raise NnDiffError(f"image has {normalized.shape[0]} channel(s), the healthy statistics "
                              f"{stats.mean.shape[0]}. Fix: use images of the same dataset")
        shape = (-1,) + (1,) * (normalized.ndim - 1)
        mean, std = stats.mean.reshape(shape), stats.std.reshape(shape)
    return np.abs((normalized - mean) / std).sum(axis=0)
