"""Dataset fingerprint: per-case analysis (worker-safe) and the dataset-level summary.

Field names follow nnU-Net v2 where they overlap; the full list is in
documentation/architecture.md ("dataset_fingerprint.json") and documentation/preprocessing.md.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from nndiff.diffusion.options import Modality, TaskFamily
from nndiff.errors import DatasetError
from nndiff.fingerprint.modality import detect_modality, value_warnings
from nndiff.fingerprint.statistics import PartialStats, merge_all
from nndiff.preprocessing.case_io import CaseFiles, case_files_of, read_case
from nndiff.preprocessing.cropping import bbox_from_mask, channel_background_values, crop, nonzero_mask
from nndiff.preprocessing.layout import stored_channels, to_real_channels
from nndiff.preprocessing.parallel import map_cases

logger = logging.getLogger(__name__)

#: Voxels sampled per channel over the whole dataset for medians/percentiles (split evenly
#: over cases). nnU-Net samples 10x more; 1e7 keeps the percentiles to about 1e-3 of the
#: distribution (binomial error at 0.5 %) while bounding memory to ~40 MB per channel.
MAX_SAMPLES_TOTAL = 10_000_000

FOREGROUND_LABEL = "label > 0"
FOREGROUND_NONZERO = (
    "nonzero: voxels where any channel differs from its background value (the channel minimum "
    "when every image corner holds it, else 0), inside the crop box"
)
#: Tasks whose label maps mark something other than the anatomy (anomaly masks), so they do not
#: define the foreground for intensity statistics.
TASKS_WITHOUT_LABEL_FOREGROUND = (TaskFamily.ANOMALY_DETECTION,)


@dataclass
class ChannelStats:
    """Whole-image and foreground statistics of one channel of one case (magnitude if complex)."""

    whole: PartialStats
    foreground: PartialStats


@dataclass
class CaseStats:
    """Everything the fingerprint needs from one case (picklable, returned by workers)."""

    identifier: str
    spacing: list[float]
    spatial_dims: int
    shape_before_crop: list[int]
    shape_after_crop: list[int]
    is_complex: bool
    is_rgb: bool
    num_stored_channels: int
    images: list[ChannelStats]
    targets: list[ChannelStats] = field(default_factory=list)
    label_counts: dict[int, int] = field(default_factory=dict)
    missing_channels: list[int] = field(default_factory=list)


def case_rng(seed: int, identifier: str) -> np.random.Generator:
    """Generator of one case: depends on the seed and the case id only, not on the worker."""
    return np.random.default_rng([int(seed), zlib.crc32(identifier.encode("utf-8"))])


def _magnitude(array: np.ndarray) -> np.ndarray:
    return np.abs(array) if np.iscomplexobj(array) else np.asarray(array)


def analyze_case(
    images: np.ndarray,
    properties: Any,
    label: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    max_samples: int = MAX_SAMPLES_TOTAL,
    rng: np.random.Generator | None = None,
    identifier: str = "case",
    label_is_foreground: bool = True,
    missing_channels: Sequence[int] = (),
) -> CaseStats:
    """Analyse one case: crop box (same rule as preprocessing), shapes, intensity statistics.

    Foreground is ``label > 0`` when a label is given and ``label_is_foreground``, else the
    nonzero rule (module constant ``FOREGROUND_NONZERO``) of the images (resp. targets).
    ``missing_channels`` (allow_missing_channels): image channels the case lacks; they add no
    statistics and do not shape the crop box or the foreground.
    """
    rng = rng if rng is not None else case_rng(1234, identifier)
    missing = sorted({int(c) for c in missing_channels})
    real_images, is_complex = to_real_channels(images)
    rows = [r for c in range(images.shape[0]) if c not in missing for r in stored_channels(c, is_complex)]
    image_bg = channel_background_values(real_images[rows])
    mask = nonzero_mask(real_images[rows], image_bg)
    num_stored = real_images.shape[0]
    target_mask = None
    if targets is not None:
        real_targets, _ = to_real_channels(targets)
        target_mask = nonzero_mask(real_targets, channel_background_values(real_targets))
        num_stored += real_targets.shape[0]
    bbox = bbox_from_mask(mask if target_mask is None else mask | target_mask)
    use_label = label is not None and label_is_foreground
    fg = (np.asarray(label)[0] > 0) if use_label else mask
    image_stats = _whole_and_cropped(images, fg, bbox, max_samples, rng, missing)
    target_stats: list[ChannelStats] = []
    if targets is not None:
        target_fg = fg if use_label else target_mask
        target_stats = _whole_and_cropped(targets, target_fg, bbox, max_samples, rng)
    counts: dict[int, int] = {}
    if label is not None:
        values, numbers = np.unique(np.asarray(label), return_counts=True)
        counts = {int(v): int(n) for v, n in zip(values, numbers)}
    return CaseStats(
        identifier=identifier,
        spacing=[float(s) for s in properties.spacing],
        spatial_dims=int(properties.spatial_dims),
        shape_before_crop=[int(n) for n in images.shape[1:]],
        shape_after_crop=[hi - lo for lo, hi in bbox],
        is_complex=bool(is_complex),
        is_rgb=bool(getattr(properties, "is_rgb", False)),
        num_stored_channels=int(num_stored),
        images=image_stats,
        targets=target_stats,
        label_counts=counts,
        missing_channels=missing,
    )


def _whole_and_cropped(values: np.ndarray, fg: np.ndarray, bbox: list[list[int]], max_samples: int,
                       rng: np.random.Generator, missing: Sequence[int] = ()) -> list[ChannelStats]:
    """Whole-image statistics over every voxel; foreground ones inside the crop box (as nnU-Net).
    A ``missing`` channel gets empty statistics (merging skips them)."""
    cropped_fg = crop(fg[None], bbox)[0]
    out = []
    for index, channel in enumerate(_magnitude(values)):
        if index in missing:
            out.append(ChannelStats(PartialStats(), PartialStats()))
            continue
        whole = PartialStats.from_values(channel, max_samples, rng)
        foreground = PartialStats.from_values(crop(channel[None], bbox)[0][cropped_fg], max_samples, rng)
        out.append(ChannelStats(whole, foreground))
    return out


# --------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class _AnalysisTask:
    files: CaseFiles
    max_samples: int
    seed: int
    label_is_foreground: bool


def _analyze_one(task: _AnalysisTask) -> CaseStats:
    """Worker: read and analyse one case."""
    raw = read_case(task.files)
    return analyze_case(raw.images, raw.properties, raw.label, raw.targets, task.max_samples,
                        case_rng(task.seed, raw.identifier), raw.identifier, task.label_is_foreground,
                        raw.missing_channels)


# --------------------------------------------------------------------------- summary


def _median(rows: Sequence[Sequence[float]]) -> list[float]:
    return [float(v) for v in np.median(np.asarray(rows, dtype=np.float64), axis=0)]


def _names(mapping: dict | None, count: int, prefix: str) -> list[str]:
    mapping = mapping or {}
    return [str(mapping.get(str(i), mapping.get(i, f"{prefix}{i}"))) for i in range(count)]


def _properties_per_channel(cases: list[CaseStats], role: str, which: str,
                            warnings: list[str] | None = None) -> dict[str, dict[str, float]]:
    """``{"0": {mean, median, ...}, ...}`` merged over cases in identifier order.

    A channel without a single foreground voxel (e.g. every label map empty) gets its whole-image
    statistics instead, with a warning, so the planner never reads NaN.
    """
    count = len(getattr(cases[0], role)) if cases else 0
    out = {}
    for c in range(count):
        if role == "images" and all(c in case.missing_channels for case in cases):
            raise DatasetError([(f"image channel {c}", "is missing in every training case, so it has no "
                                 "intensity statistics to plan its normalization from",
                                 "add the channel's files for at least one case or remove the channel from "
                                 "channel_names")])
        merged = merge_all([getattr(getattr(case, role)[c], which) for case in cases])
        if merged.count == 0 and which == "foreground":
            merged = merge_all([getattr(case, role)[c].whole for case in cases])
            message = (f"{role} channel {c} has no foreground voxels in any case; its foreground "
                       "statistics are those of the whole images")
            logger.warning(message)
            if warnings is not None:
                warnings.append(message)
        out[str(c)] = merged.summary()
    return out


def _label_statistics(cases: list[CaseStats], labels: dict | None) -> dict[str, dict[str, Any]]:
    """Per class: declared value, fraction of all voxels, number of cases where it occurs."""
    if not any(case.label_counts for case in cases):
        return {}
    total = sum(int(np.prod(case.shape_before_crop)) for case in cases)
    names = {int(v): str(k) for k, v in (labels or {}).items() if isinstance(v, (int, np.integer))}
    values = sorted(set(names) | {v for case in cases for v in case.label_counts})
    stats: dict[str, dict[str, Any]] = {}
    for value in values:
        voxels = sum(case.label_counts.get(value, 0) for case in cases)
        stats[names.get(value, f"label_{value}")] = {
            "value": value,
            "voxel_fraction": voxels / total if total else 0.0,
            "num_cases_present": sum(1 for case in cases if case.label_counts.get(value, 0) > 0),
        }
    return stats


def _anisotropy(median_spacing: list[float], spatial_dims: int) -> float:
    real = median_spacing[1:] if spatial_dims == 2 else median_spacing
    return float(max(real) / min(real))


def _channels(image_names: list[str], target_names: list[str]) -> list[dict[str, Any]]:
    rows = [{"index": i, "name": n, "modality": str(detect_modality(n)), "role": "image"}
            for i, n in enumerate(image_names)]
    rows += [{"index": i, "name": n, "modality": str(detect_modality(n)), "role": "target"}
             for i, n in enumerate(target_names)]
    return rows


def _modality_warnings(channels: list[dict[str, Any]], whole: dict, target_whole: dict) -> list[str]:
    found: list[str] = []
    for row in channels:
        props = (whole if row["role"] == "image" else target_whole).get(str(row["index"]))
        if props is None:
            continue
        label = f"{row['index']} ({row['role']}) {row['name']!r}"
        found += value_warnings(label, Modality(row["modality"]), props["min"], props["max"])
    return found


def assemble_fingerprint(
    cases: list[CaseStats],
    channel_names: dict | None,
    target_names: dict | None = None,
    labels: dict | None = None,
    dataset_name: str = "",
    task: str = "",
    foreground_definition: str = FOREGROUND_NONZERO,
    seed: int = 1234,
) -> dict[str, Any]:
    """The ``dataset_fingerprint.json`` dict from per-case statistics (pure; no I/O)."""
    if not cases:
        raise ValueError("a fingerprint needs at least one case")
    cases = sorted(cases, key=lambda c: c.identifier)
    spatial_dims = 2 if all(c.spatial_dims == 2 for c in cases) else 3
    image_names = _names(channel_names, len(cases[0].images), "channel_")
    target_count = len(cases[0].targets)
    tnames = _names(target_names, target_count, "target_") if target_count else []
    channels = _channels(image_names, tnames)
    whole = _properties_per_channel(cases, "images", "whole")
    target_whole = _properties_per_channel(cases, "targets", "whole")
    median_spacing = _median([c.spacing for c in cases])
    image_modalities = [row["modality"] for row in channels if row["role"] == "image"]
    is_rgb = any(c.is_rgb for c in cases) or (
        len(image_modalities) == 3 and all(m == Modality.MICROSCOPY_RGB for m in image_modalities))
    relative_sizes = [np.prod(c.shape_after_crop) / np.prod(c.shape_before_crop) for c in cases]
    warnings: list[str] = []
    foreground = _properties_per_channel(cases, "images", "foreground", warnings)
    target_foreground = _properties_per_channel(cases, "targets", "foreground", warnings)
    voxels = sum(int(np.prod(c.shape_before_crop)) for c in cases)
    return {
        "dataset_name": dataset_name,
        "task": task,
        "num_cases": len(cases),
        "case_identifiers": [c.identifier for c in cases],
        "spatial_dims": spatial_dims,
        "spacings": [c.spacing for c in cases],
        "shapes_before_crop": [c.shape_before_crop for c in cases],
        "shapes_after_crop": [c.shape_after_crop for c in cases],
        "median_relative_size_after_cropping": float(np.median(relative_sizes)),
        "median_spacing": median_spacing,
        "median_shape": _median([c.shape_after_crop for c in cases]),
        "anisotropy": _anisotropy(median_spacing, spatial_dims),
        "channels": channels,
        "is_rgb": bool(is_rgb),
        "is_complex": any(c.is_complex for c in cases),
        "foreground_definition": foreground_definition,
        "foreground_intensity_properties_per_channel": foreground,
        "intensity_properties_per_channel": whole,
        "target_intensity_properties_per_channel": target_whole,
        "target_foreground_intensity_properties_per_channel": target_foreground,
        "label_statistics": _label_statistics(cases, labels),
        "missing_channels": {c.identifier: list(c.missing_channels) for c in cases if c.missing_channels},
        "dataset_size": {
            "num_cases": len(cases),
            "total_voxels": voxels,
            "bytes_float32": sum(int(np.prod(c.shape_before_crop)) * c.num_stored_channels * 4 for c in cases),
        },
        "sampling": {"seed": int(seed), "max_samples_per_case": None},
        "warnings": warnings + _modality_warnings(channels, whole, target_whole),
    }


def labels_define_foreground(dataset: Any, files: list[CaseFiles]) -> bool:
    """Label maps define the foreground when every case has one and the task's labels mark
    anatomy (not anomaly masks)."""
    task = str(getattr(dataset, "task", ""))
    if task in [str(t) for t in TASKS_WITHOUT_LABEL_FOREGROUND]:
        return False
    return bool(files) and all(f.label is not None for f in files)


def extract_fingerprint(dataset: Any, num_processes: int = 1, seed: int = 1234) -> dict[str, Any]:
    """Fingerprint of a raw dataset (``nndiff.dataset.RawDataset``): the content of
    ``dataset_fingerprint.json``. Deterministic for a given ``seed``, whatever ``num_processes``."""
    files = case_files_of(dataset)
    if not files:
        raise ValueError(f"dataset {getattr(dataset, 'name', '?')} has no training cases")
    use_labels = labels_define_foreground(dataset, files)
    max_samples = max(1, MAX_SAMPLES_TOTAL // len(files))
    tasks = [_AnalysisTask(f, max_samples, seed, use_labels) for f in files]
    cases = map_cases(_analyze_one, tasks, num_processes, desc="fingerprint")
    fingerprint = assemble_fingerprint(
        cases,
        getattr(dataset, "channel_names", None),
        getattr(dataset, "target_names", None),
        getattr(dataset, "labels", None),
        dataset_name=str(getattr(dataset, "name", "")),
        task=str(getattr(dataset, "task", "")),
        foreground_definition=FOREGROUND_LABEL if use_labels else FOREGROUND_NONZERO,
        seed=seed,
    )
    fingerprint["sampling"]["max_samples_per_case"] = max_samples
    logger.info("fingerprint of %s: %d case(s), %dD, median spacing %s, anisotropy %.3g, foreground %s, "
                "%d warning(s)", fingerprint["dataset_name"], fingerprint["num_cases"],
                fingerprint["spatial_dims"], fingerprint["median_spacing"], fingerprint["anisotropy"],
                "label > 0" if use_labels else "nonzero", len(fingerprint["warnings"]))
    return fingerprint
