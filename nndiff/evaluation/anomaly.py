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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

from nndiff.errors import DatasetError, NnDiffError
from nndiff.evaluation.folders import ImageFolder, load_image_folder
from nndiff.utils.files import load_json, save_json

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


# --------------------------------------------------------------------------- one method's table row
def evaluate_anomaly_maps(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], *,
                          case_ids: Sequence[str] | None = None, threshold: float | None = None,
                          predicted_masks: Sequence[np.ndarray] | None = None,
                          case_score_method: str = "top1_mean", max_voxels: int | None = MAX_VOXELS) -> dict:
    """Every anomaly metric of one method (a strategy's prediction folder or the baseline).

    The chosen operating point is ``predicted_masks`` (what the predictor wrote) when given, else
    ``map > threshold``; without either, ``dice_at_threshold`` is ``None``. A case is anomalous when
    its mask has a foreground voxel. JSON-ready: undefined values are ``None``, never NaN.
    """
    case_ids = list(case_ids) if case_ids is not None else [f"case_{i}" for i in range(len(maps))]
    best_threshold, best_dice = dice_optimal_threshold(maps, masks)
    if predicted_masks is not None:
        chosen, source = pooled_dice(predicted_masks, masks), "predicted masks"
        per_case_chosen = [pooled_dice([p], [m]) for p, m in zip(predicted_masks, masks)]
    elif threshold is not None:
        chosen, source = pooled_dice([np.asarray(m) > threshold for m in maps], masks), "threshold"
        per_case_chosen = [pooled_dice([np.asarray(a) > threshold], [m]) for a, m in zip(maps, masks)]
    else:
        chosen, source, per_case_chosen = None, None, [None] * len(maps)
    scores = [case_score(m, case_score_method) for m in maps]
    anomalous = [bool(np.any(np.asarray(m) != 0)) for m in masks]
    return {
        "pixel_auroc": pixel_auroc(maps, masks, max_voxels),
        "pixel_auprc": pixel_auprc(maps, masks, max_voxels),
        "best_dice": best_dice,
        "best_dice_threshold": best_threshold,
        "dice_at_threshold": chosen,
        "threshold": None if threshold is None else float(threshold),
        "operating_point": source,
        "case_auroc": case_auroc(scores, anomalous),
        "metric_per_case": [{"case": c, "anomalous": a, "case_score": s, "dice_at_threshold": d}
                            for c, a, s, d in zip(case_ids, anomalous, scores, per_case_chosen)],
    }


# --------------------------------------------------------------------------- folders
#: Where the predictor writes float maps when the dataset's ending stores integers only (PNG...).
FLOAT_MAP_ENDING = ".nii.gz"
MASK_SUFFIX = "_mask"
THRESHOLD_FILE = "anomaly_threshold.json"
BASELINE_NAME = "zscore_baseline"
#: The global-statistics z-score row added beside a voxel-wise baseline.
GLOBAL_BASELINE_NAME = "zscore_baseline_global"
PathLike = Union[str, Path]


def read_spatial(path: Path, label: bool = False) -> np.ndarray:
    """One single-channel file as its spatial array: ``(Y, X)`` for 2D, ``(Z, Y, X)`` for 3D."""
    from nndiff.dataset.io import read_file, read_label

    array, props = read_label(path) if label else read_file(path)
    if array.shape[0] != 1:
        raise DatasetError([(path, f"has {array.shape[0]} channels; expected one",
                             "write anomaly maps, masks and label maps as single-channel images")])
    return array[0, 0] if props.spatial_dims == 2 else array[0]


def _dataset_facts(dataset_json: PathLike) -> tuple[dict, Path]:
    path = Path(dataset_json)
    if not path.is_file():
        raise DatasetError([(path, "does not exist", "pass -d ID with --raw/nnDiff_raw, or an existing dataset.json")])
    try:
        return load_json(path), path.parent
    except ValueError as error:
        raise DatasetError([(path, f"is not valid JSON ({error})", "fix the JSON syntax")]) from None


def read_reference_masks(reference_dir: PathLike, file_ending: str) -> dict[str, np.ndarray]:
    """Case id -> reference mask of every ``{case}{ending}`` in ``reference_dir`` (e.g. labelsTs)."""
    folder = Path(reference_dir)
    files = sorted(folder.glob(f"*{file_ending}")) if folder.is_dir() else []
    if not files:
        raise DatasetError([(folder, f"holds no reference masks ({file_ending})",
                             "pass the folder of test masks (labelsTs): one {case}" + file_ending + " per case")])
    return {p.name[: -len(file_ending)]: read_spatial(p, label=True) for p in files}


def _map_file(folder: Path, case: str, file_ending: str) -> Path | None:
    for ending in dict.fromkeys((file_ending, FLOAT_MAP_ENDING)):
        if (folder / f"{case}{ending}").is_file():
            return folder / f"{case}{ending}"
    return None


def method_folders(prediction: PathLike | Sequence[PathLike] | Mapping[str, PathLike], cases: Sequence[str],
                   file_ending: str) -> dict[str, Path]:
    """Method name -> prediction folder. A mapping is taken as is; a list names each folder by its
    name; one folder holding no map of the first case but subfolders that do is a folder of
    strategies (one method per subfolder)."""
    if isinstance(prediction, Mapping):
        return {str(k): Path(v) for k, v in prediction.items()}
    if not isinstance(prediction, (str, Path)):
        folders = [Path(p) for p in prediction]
        names = [p.name for p in folders]
        if len(set(names)) != len(names):
            raise NnDiffError(f"prediction folders share a name ({', '.join(names)}). "
                              "Fix: pass a mapping name -> folder")
        return dict(zip(names, folders))
    folder = Path(prediction)
    if folder.is_dir() and cases and _map_file(folder, cases[0], file_ending) is None:
        subfolders = {p.name: p for p in sorted(folder.iterdir())
                      if p.is_dir() and _map_file(p, cases[0], file_ending) is not None}
        if subfolders:
            return subfolders
    return {folder.name: folder}


def _stored_threshold(folder: Path) -> float | None:
    """``anomaly_threshold.json`` next to the predictions: ``{"threshold": t}``, or the predictor's
    ``{"strategies": {name: {"threshold": t}}}`` with the strategy of ``prediction_info.json``."""
    path = folder / THRESHOLD_FILE
    if not path.is_file():
        return None
    content = load_json(path)
    if "threshold" in content:
        return float(content["threshold"])
    info = folder / "prediction_info.json"
    strategy = load_json(info).get("strategy") if info.is_file() else None
    entries = content.get("strategies") or {}
    if strategy is None and len(entries) == 1:
        strategy = next(iter(entries))
    entry = entries.get(strategy) if strategy is not None else None
    return float(entry["threshold"]) if isinstance(entry, Mapping) and "threshold" in entry else None


def read_method_folder(folder: Path, cases: Sequence[str], file_ending: str,
                       masks: Mapping[str, np.ndarray]
                       ) -> tuple[list[np.ndarray], list[np.ndarray] | None, float | None]:
    """``(maps, predicted masks or None, stored threshold or None)`` of one prediction folder; every
    missing map or shape mismatch is reported at once."""
    problems, maps = [], []
    for case in cases:
        path = _map_file(folder, case, file_ending)
        if path is None:
            problems.append((folder / f"{case}{file_ending}", "anomaly map missing",
                             f"run nndiff_predict on the test images into {folder}, "
                             "or remove the case's reference mask"))
            continue
        amap = read_spatial(path)
        if amap.shape != masks[case].shape:
            problems.append((path, f"shape {amap.shape} differs from the reference mask's {masks[case].shape}",
                             "predict on the images the reference masks belong to (same grid)"))
        maps.append(amap)
    if problems:
        raise DatasetError(problems)
    mask_files = [folder / f"{case}{MASK_SUFFIX}{file_ending}" for case in cases]
    predicted = [read_spatial(p) for p in mask_files] if all(p.is_file() for p in mask_files) else None
    return maps, predicted, _stored_threshold(folder)


def _case_ids(folder: ImageFolder) -> list[str]:
    """Raw-layout case ids of an image folder: where one file is one image the reader keeps the
    ``_0000`` channel suffix in the identifier (multi-channel identifiers are already case ids)."""
    return [re.sub(r"_0000$", "", identifier) if len(files) == 1 else identifier
            for identifier, files in zip(folder.identifiers, folder.files)]


def healthy_training_images(training_dir: Path, data: dict, raw_dir: Path | None) -> tuple[list[np.ndarray], int]:
    """Training images of the healthy cases by the family's healthy rule (metadata.json, then the
    labelsTr mask, else healthy) and the number of training cases read."""
    from nndiff.tasks.anomaly import healthy_cases

    names = data.get("channel_names", data.get("modality"))
    folder = load_image_folder(training_dir, "training", file_ending=data.get("file_ending"),
                               num_channels=len(names) if isinstance(names, Mapping) else None)
    ending = folder.file_ending
    metadata_path = raw_dir / "metadata.json" if raw_dir is not None else None
    metadata = load_json(metadata_path) if metadata_path is not None and metadata_path.is_file() else None

    def label(case: str) -> np.ndarray | None:
        path = raw_dir / "labelsTr" / f"{case}{ending}" if raw_dir is not None else None
        return read_spatial(path, label=True) if path is not None and path.is_file() else None

    cases = _case_ids(folder)
    healthy = healthy_cases(cases, metadata, label)
    return [image for case, image in zip(cases, folder.images) if healthy[case]], len(folder.images)


def zscore_baseline_maps(test_images: Sequence[np.ndarray],
                         healthy_images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], str]:
    """Baseline maps of the test images and the kind of statistics used: voxel-wise when healthy and
    test images share one shape (aligned data such as registered slices), else global."""
    shapes = {np.shape(i) for i in healthy_images} | {np.shape(i) for i in test_images}
    stats = fit_zscore_baseline(healthy_images, voxelwise=len(shapes) == 1)
    return [zscore_map(image, stats) for image in test_images], "voxelwise" if stats.voxelwise else "global"


def _baseline_images(images_dir: Path | None, cases: Sequence[str], data: dict) -> list[np.ndarray] | str:
    """Test images of ``cases`` in reference order, or the reason the baseline is skipped."""

    if images_dir is None or not images_dir.is_dir():
        return f"no test images folder ({images_dir}); pass images_dir (imagesTs) for the z-score baseline"
    names = data.get("channel_names", data.get("modality"))
    folder = load_image_folder(images_dir, "test image", file_ending=data.get("file_ending"),
                               num_channels=len(names) if isinstance(names, Mapping) else None)
    by_case = dict(zip(_case_ids(folder), folder.images))
    missing = [case for case in cases if case not in by_case]
    if missing:
        raise DatasetError([(images_dir, f"test image(s) missing for {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}",
                             "pass the images the reference masks belong to (the z-score baseline needs them)")])
    return [by_case[case] for case in cases]


def evaluate_anomaly_folders(reference: PathLike, prediction: PathLike | Sequence[PathLike] | Mapping[str, PathLike], *,
                             dataset_json: PathLike, images_dir: PathLike | None = None,
                             training_dir: PathLike | None = None, output_file: PathLike | None = None,
                             case_score_method: str = "top1_mean", max_voxels: int | None = MAX_VOXELS) -> dict:
    """Evaluate anomaly-detection predictions and the z-score baseline in one table.

    ``reference``: test masks ``{case}{ending}`` (labelsTs; all-zero = healthy case). ``prediction``:
    one predictor output folder, several (list or name -> folder), or a folder of strategy
    subfolders. ``images_dir`` (default imagesTs beside dataset.json) and ``training_dir`` (default
    imagesTr) feed the baseline; it is skipped, with the reason in ``skipped``, when either is absent.
    Writes ``output_file`` (JSON) when given and returns the summary.
    """
    data, raw_dir = _dataset_facts(dataset_json)
    ending = data.get("file_ending")
    if not ending:
        raise DatasetError([(dataset_json, "has no 'file_ending'", "add the dataset's file ending, e.g. \".nii.gz\"")])
    masks = read_reference_masks(reference, ending)
    cases = sorted(masks)
    reference_masks = [masks[c] for c in cases]
    methods: dict[str, dict] = {}
    for name, folder in method_folders(prediction, cases, ending).items():
        maps, predicted, threshold = read_method_folder(folder, cases, ending, masks)
        methods[name] = {"folder": str(folder), **evaluate_anomaly_maps(
            maps, reference_masks, case_ids=cases, threshold=threshold, predicted_masks=predicted,
            case_score_method=case_score_method, max_voxels=max_voxels)}
    skipped: dict[str, str] = {}
    images_dir = Path(images_dir) if images_dir is not None else raw_dir / "imagesTs"
    training_dir = Path(training_dir) if training_dir is not None else raw_dir / "imagesTr"
    test_images = _baseline_images(images_dir, cases, data)
    statistics = None
    if isinstance(test_images, str):
        skipped[BASELINE_NAME] = test_images
    elif not training_dir.is_dir():
        skipped[BASELINE_NAME] = f"no training images folder ({training_dir}); pass training_dir (imagesTr)"
    else:
        healthy, _ = healthy_training_images(training_dir, data, raw_dir)
        maps, statistics = zscore_baseline_maps(test_images, healthy)
        methods[BASELINE_NAME] = {"folder": None, "num_healthy_training": len(healthy), **evaluate_anomaly_maps(
            maps, reference_masks, case_ids=cases, case_score_method=case_score_method, max_voxels=max_voxels)}
        if statistics == "voxelwise":
            # Voxel-wise statistics assume that a voxel shows the same anatomy in every image (registered
            # subjects); slices of different levels of one brain break that. The global row is the
            # other standard z-score; a strategy should beat the stronger of the two.
            stats = fit_zscore_baseline(healthy, voxelwise=False)
            methods[GLOBAL_BASELINE_NAME] = {
                "folder": None, "num_healthy_training": len(healthy), **evaluate_anomaly_maps(
                    [zscore_map(image, stats) for image in test_images], reference_masks, case_ids=cases,
                    case_score_method=case_score_method, max_voxels=max_voxels)}
    for reason in skipped.values():
        logger.info("z-score baseline skipped: %s", reason)
    summary = {
        "task": "anomaly_detection",
        "num_cases": len(cases),
        "num_anomalous_cases": int(sum(bool(np.any(m != 0)) for m in reference_masks)),
        "settings": {"reference": str(reference), "case_score": case_score_method, "case_score_fraction": TOP_FRACTION,
                     "max_voxels": max_voxels, "images_dir": str(images_dir), "training_dir": str(training_dir),
                     "baseline_statistics": statistics, "std_floor_fraction": STD_FLOOR_FRACTION},
        "methods": methods,
        "skipped": skipped,
    }
    if output_file is not None:
        save_json(summary, output_file)
    return summary


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_anomaly_table(summary: Mapping) -> str:
    """Markdown table: one row per method (strategies and the z-score baseline side by side)."""
    columns = ("pixel_auroc", "pixel_auprc", "best_dice", "dice_at_threshold", "case_auroc")
    lines = [f"{summary['num_cases']} case(s), {summary['num_anomalous_cases']} with anomalies",
             "| method | pixel AUROC | pixel AUPRC | best Dice | Dice at threshold | case AUROC |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in summary["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[c]) for c in columns) + " |")
    lines += [f"skipped {name}: {reason}" for name, reason in summary["skipped"].items()]
    return "\n".join(lines)
