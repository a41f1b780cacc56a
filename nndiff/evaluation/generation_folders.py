"""Evaluate a folder of generated samples against folders of real images:
:func:`evaluate_generation_folders` (the body of ``nndiff_evaluate_folder`` for generation).

Decisions (documentation/evaluation.md, "nndiff_evaluate_folder"):

* **SSIM data range** ``L``: plan-independent, so numbers compare across runs and plans. From the
  dataset fingerprint when one is given (``percentile_99_5 - percentile_00_5`` of the whole-image
  intensities, the largest over channels), else ``max - min`` over the reference images. Never
  from the samples (a model could move it) nor from the optional training set (the same
  reference gives the same ``L`` with or without ``--training``).
* **Alignment**: generated samples have one shape; reference and training images of another shape
  are centre-cropped / padded (with their minimum) to it for the SSIM-based and feature metrics.
  The intensity Wasserstein-1 uses the reference images as read (it needs no alignment).
  2D samples against 3D volumes: the volumes are cut into their z slices (array axis 0) first.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import torch

from nndiff.diffusion.options import TaskFamily
from nndiff.errors import DatasetError, NnDiffError
from nndiff.evaluation.distributions import FeatureExtractor, intensity_wasserstein, load_feature_extractor
from nndiff.evaluation.folders import ImageFolder, center_crop_or_pad, load_image_folder, volume_slices
from nndiff.evaluation.generation_metrics import evaluate_generation
from nndiff.evaluation.memorization import NEAR_COPY_SSIM
from nndiff.utils.files import load_json, save_json

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
#: Where each other family's folder evaluation lives (named in the refusal message).
OTHER_FAMILY_EVALUATIONS = {
    TaskFamily.TRANSLATION.value: "nndiff.evaluation.translation.evaluate_translation_folders",
    TaskFamily.DENOISING.value: "nndiff.evaluation.denoising.evaluate_denoising",
    TaskFamily.RECONSTRUCTION.value: "nndiff.evaluation.reconstruction.evaluate_reconstruction",
    TaskFamily.ANOMALY_DETECTION.value: "nndiff.evaluation.anomaly.evaluate_anomaly_folders",
    TaskFamily.SEGMENTATION.value: "nndiff.evaluation.segmentation.evaluate_segmentation_folders",
}


# --------------------------------------------------------------------------- dataset facts
def _load_dataset_json(dataset_json: PathLike | Mapping[str, Any] | None) -> tuple[dict | None, str | None]:
    """``(dataset.json dict, where)`` or ``(None, None)``; a missing/broken file is a DatasetError."""
    if dataset_json is None:
        return None, None
    if isinstance(dataset_json, Mapping):
        return dict(dataset_json), "dataset.json (given as a dict)"
    path = Path(dataset_json)
    if not path.is_file():
        raise DatasetError([(path, "does not exist", "pass -d ID with --raw/nnDiff_raw, or an existing dataset.json")])
    try:
        return load_json(path), str(path)
    except ValueError as error:
        raise DatasetError([(path, f"is not valid JSON ({error})", "fix the JSON syntax")]) from None


def _check_generation(data: dict, where: str) -> None:
    """Only generation datasets are evaluated here; name the evaluation of the dataset's family."""
    task = data.get("task")
    if task != TaskFamily.GENERATION.value:
        other = OTHER_FAMILY_EVALUATIONS.get(str(task))
        fix = (f"use {other} (or nndiff_evaluate_folder, which dispatches by task)" if other else
               "pass a dataset whose dataset.json has \"task\": \"generation\"")
        raise NnDiffError(f"{where}: task is {task!r}; this function evaluates generation datasets only. Fix: {fix}")


def _channels_and_ending(data: dict | None) -> tuple[int | None, str | None]:
    if data is None:
        return None, None
    names = data.get("channel_names", data.get("modality"))
    return (len(names) if isinstance(names, dict) else None), data.get("file_ending")


# --------------------------------------------------------------------------- data range
def fingerprint_data_range(fingerprint: Mapping[str, Any]) -> float | None:
    """``max_c (p99.5_c - p0.5_c)`` of the whole-image intensities in a dataset fingerprint, or None."""
    per_channel = fingerprint.get("intensity_properties_per_channel") or {}
    spans = []
    for props in per_channel.values():
        if isinstance(props, Mapping) and "percentile_00_5" in props and "percentile_99_5" in props:
            spans.append(float(props["percentile_99_5"]) - float(props["percentile_00_5"]))
    span = max(spans, default=0.0)
    return span if span > 0 else None


def _load_fingerprint(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError([(path, "fingerprint file does not exist",
                             "run nndiff_extract_fingerprint -d ID, or leave the fingerprint out")])
    try:
        return load_json(path)
    except ValueError as error:
        raise DatasetError([(path, f"is not valid JSON ({error})",
                             "recompute it with nndiff_extract_fingerprint --clean")]) from None


def resolve_fingerprint(fingerprint: Mapping[str, Any] | PathLike | None) -> tuple[dict | None, str | None]:
    """``(fingerprint dict, where)``: a path is read (a missing or broken file is a DatasetError)."""
    if fingerprint is None:
        return None, None
    if isinstance(fingerprint, Mapping):
        return dict(fingerprint), "fingerprint (given as a dict)"
    return _load_fingerprint(Path(fingerprint)), str(fingerprint)


def choose_data_range(reference: list[np.ndarray], fingerprint: Mapping[str, Any] | PathLike | None,
                      data_range: float | None, fingerprint_source: str | None = None) -> tuple[float, str]:
    """SSIM data range and where it came from (explicit > fingerprint > reference min/max).

    ``fingerprint_source`` names a fingerprint given as a dict in the returned description.
    """
    if data_range is not None:
        if not data_range > 0:
            raise NnDiffError(f"data range must be positive, got {data_range}. Fix: pass --data_range L > 0")
        return float(data_range), "given explicitly"
    fingerprint, where = resolve_fingerprint(fingerprint)
    where = fingerprint_source or where
    if fingerprint is not None:
        span = fingerprint_data_range(fingerprint)
        if span is not None:
            return span, (f"{where}: percentile_99_5 - percentile_00_5 of intensity_properties_per_channel "
                          "(max over channels)")
        logger.info("%s has no usable intensity percentiles; data range from the reference images", where)
    low = min(float(image.min()) for image in reference)
    high = max(float(image.max()) for image in reference)
    span = high - low
    return (span if span > 0 else 1.0), "max - min over the reference images"


# --------------------------------------------------------------------------- alignment
def _as_2d_slices(folder: ImageFolder) -> tuple[list[np.ndarray], list[str]]:
    images, names = [], []
    for image, identifier in zip(folder.images, folder.identifiers):
        slices, ids = volume_slices(image, identifier)
        images += slices
        names += ids
    return images, names


def _comparable(folder: ImageFolder, samples: ImageFolder, role: str) -> tuple[list[np.ndarray], list[str]]:
    """Images and ids of ``folder`` with the samples' dimensionality (volumes cut into z slices)."""
    if folder.num_channels != samples.num_channels:
        raise DatasetError([(folder.folder, f"{role} images have {folder.num_channels} channel(s), the generated "
                             f"samples in {samples.folder} have {samples.num_channels}",
                             "compare images of the same dataset (same channel_names)")])
    if folder.spatial_dims == samples.spatial_dims:
        return list(folder.images), list(folder.identifiers)
    if folder.spatial_dims == 3 and samples.spatial_dims == 2:
        logger.info("%s: 3D volumes cut into z slices to compare with 2D samples", role)
        return _as_2d_slices(folder)
    raise DatasetError([(folder.folder, f"{role} images are 2D but the samples in {samples.folder} are 3D",
                         "compare 3D samples with 3D reference volumes")])


def _align(images: list[np.ndarray], shape: tuple[int, ...] | None) -> tuple[list[np.ndarray], int]:
    """Centre-crop/pad to ``shape`` (None: samples differ in shape, leave as is); count changed."""
    if shape is None:
        return images, 0
    aligned = [center_crop_or_pad(image, shape) for image in images]
    return aligned, sum(image.shape[1:] != shape for image in images)


# --------------------------------------------------------------------------- feature extractor
def _prepare_extractor(extractor: FeatureExtractor | PathLike | None,
                       samples: ImageFolder) -> FeatureExtractor | None:
    """Load the extractor and try it on one sample, so a wrong model fails with a clear message."""
    if extractor is None:
        return None
    where = str(extractor) if isinstance(extractor, (str, Path)) else type(extractor).__name__
    model = load_feature_extractor(extractor) if isinstance(extractor, (str, Path)) else extractor
    probe = torch.as_tensor(samples.images[0][None], dtype=torch.float32)
    try:
        with torch.no_grad():
            output = model(probe)
    except Exception as error:  # any failure inside a user model is a user error here
        raise NnDiffError(f"feature extractor {where} fails on a batch of shape {list(probe.shape)} "
                          f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). Fix: the model must take "
                          "float32 (B, C, *spatial) images in original units and return (B, F) features") from None
    if not isinstance(output, torch.Tensor) or output.ndim < 1 or output.shape[0] != 1:
        raise NnDiffError(f"feature extractor {where} returned {type(output).__name__} "
                          f"{list(getattr(output, 'shape', []))} for one image. Fix: return a (B, F) tensor")
    return model


# --------------------------------------------------------------------------- summary helpers
def _near_copies(memorization: dict | None, samples: list[str], training: list[str]) -> list[dict]:
    """Readable list of near-copies: sample id, nearest training id, SSIM."""
    if not memorization:
        return []
    return [{"sample": samples[i], "training": training[memorization["nearest_ssim_index"][i]],
             "ssim": memorization["nearest_ssim"][i]} for i in memorization["near_copy_indices"]]


def _inputs_entry(folder: ImageFolder, identifiers: list[str]) -> dict:
    return {"folder": str(folder.folder), "num_files": len(folder.file_names()),
            "files": folder.file_names(), "images": identifiers}


def _check_folders_exist(**folders: PathLike | None) -> None:
    """Every given folder exists (checked before any image is read, so a typo fails at once)."""
    problems = [(str(path), f"{role} folder does not exist", "pass an existing folder")
                for role, path in folders.items() if path is not None and not Path(path).is_dir()]
    if problems:
        raise DatasetError(problems)


def _validate_settings(max_pairs: int, near_copy_ssim: float, memorization_candidates: int | None,
                       data_range: float | None) -> None:
    if max_pairs < 1:
        raise NnDiffError(f"--max_pairs must be at least 1, got {max_pairs}")
    if not 0 < near_copy_ssim <= 1:
        raise NnDiffError(f"--near_copy_ssim must be in (0, 1], got {near_copy_ssim}")
    if memorization_candidates is not None and memorization_candidates < 1:
        raise NnDiffError(f"memorization candidates must be at least 1, got {memorization_candidates}")
    if data_range is not None and not data_range > 0:
        raise NnDiffError(f"data range must be positive, got {data_range}. Fix: pass --data_range L > 0")


# --------------------------------------------------------------------------- reading and alignment
@dataclass
class ComparableSets:
    """Reference and training images in the samples' dimensionality and shape, with their ids."""

    reference: list[np.ndarray]
    reference_ids: list[str]
    training: list[np.ndarray] | None
    training_ids: list[str]
    shape: tuple[int, ...] | None  # the samples' spatial shape (None when samples differ in shape)
    reference_aligned: int  # images that were cropped or padded
    training_aligned: int


def _read_folders(prediction_dir: PathLike, reference_dir: PathLike, training_dir: PathLike | None,
                  data: dict | None) -> tuple[ImageFolder, ImageFolder, ImageFolder | None]:
    """Samples, reference and (optional) training images, checked against dataset.json."""
    num_channels, file_ending = _channels_and_ending(data)
    options = {"file_ending": file_ending, "num_channels": num_channels}
    samples = load_image_folder(prediction_dir, "prediction", **options)
    reference = load_image_folder(reference_dir, "reference", **options)
    training = load_image_folder(training_dir, "training", **options) if training_dir is not None else None
    return samples, reference, training


def _comparable_sets(samples: ImageFolder, reference: ImageFolder, training: ImageFolder | None) -> ComparableSets:
    """Slice volumes for 2D samples, then centre-crop/pad to the sample shape."""
    ref_images, ref_ids = _comparable(reference, samples, "reference")
    train_images, train_ids = _comparable(training, samples, "training") if training is not None else (None, [])
    shapes = {image.shape[1:] for image in samples.images}
    shape = shapes.pop() if len(shapes) == 1 else None
    ref_aligned, ref_changed = _align(ref_images, shape)
    train_aligned, train_changed = _align(train_images, shape) if train_images is not None else (None, 0)
    return ComparableSets(ref_aligned, ref_ids, train_aligned, train_ids, shape, ref_changed, train_changed)


def _extractor_name(extractor: FeatureExtractor | PathLike | None) -> str | None:
    if extractor is None:
        return None
    return str(extractor) if isinstance(extractor, (str, Path)) else type(extractor).__name__


# --------------------------------------------------------------------------- public API
def evaluate_generation_folders(
    reference_dir: PathLike,
    prediction_dir: PathLike,
    *,
    training_dir: PathLike | None = None,
    dataset_json: PathLike | Mapping[str, Any] | None = None,
    feature_extractor: FeatureExtractor | PathLike | None = None,
    fingerprint: PathLike | Mapping[str, Any] | None = None,
    data_range: float | None = None,
    max_pairs: int = 2000,
    near_copy_ssim: float = NEAR_COPY_SSIM,
    memorization_candidates: int | None = 32,
    output_file: PathLike | None = None,
) -> dict:
    """Evaluate generated samples in ``prediction_dir`` against held-out real images in ``reference_dir``.

    Args:
        reference_dir: held-out real images (e.g. the raw dataset's ``imagesTs``).
        prediction_dir: generated samples (``sample_XXXX{ending}`` from ``nndiff_predict``).
        training_dir: training images for the memorization check (skipped without).
        dataset_json: path or dict; gives file ending and channel count and must be a generation
            dataset. Without it each file is one image and the folders only need to agree.
        feature_extractor: TorchScript / ``.pt2`` path or callable for Fréchet and kernel distances.
        fingerprint: ``dataset_fingerprint.json`` path or dict, for the SSIM data range.
        data_range: explicit SSIM data range (overrides the fingerprint).
        max_pairs, near_copy_ssim, memorization_candidates: see :func:`evaluate_generation`.
        output_file: where to write the summary JSON (atomically); not written when None.

    Returns the summary dict: ``metrics`` (:func:`evaluate_generation`'s result without
    ``skipped``), ``skipped`` (metric -> reason), ``near_copies``, ``settings`` and ``inputs``.
    Raises :class:`~nndiff.errors.NnDiffError` (or its DatasetError) for every user error.
    """
    _validate_settings(max_pairs, near_copy_ssim, memorization_candidates, data_range)
    _check_folders_exist(reference=reference_dir, prediction=prediction_dir, training=training_dir)
    fingerprint_dict, fingerprint_where = resolve_fingerprint(fingerprint)  # read early: fail before the images
    data, where = _load_dataset_json(dataset_json)
    if data is not None:
        _check_generation(data, where or "dataset.json")
    if isinstance(feature_extractor, (str, Path)):
        load_feature_extractor(feature_extractor)  # fail before reading every image
    samples, reference, training = _read_folders(prediction_dir, reference_dir, training_dir, data)
    extractor = _prepare_extractor(feature_extractor, samples)
    sets = _comparable_sets(samples, reference, training)
    range_value, range_source = choose_data_range(reference.images, fingerprint_dict, data_range, fingerprint_where)

    metrics = evaluate_generation(samples.images, sets.reference, sets.training, extractor, data_range=range_value,
                                  near_copy_threshold=near_copy_ssim,
                                  memorization_candidates=memorization_candidates, max_diversity_pairs=max_pairs)
    if sets.reference_aligned:  # W1 on the images as read: crop/pad would add or drop intensities
        metrics["intensity_wasserstein1"] = intensity_wasserstein(
            [image.astype(np.float64) for image in samples.images],
            [image.astype(np.float64) for image in reference.images])
    skipped = metrics.pop("skipped")
    summary = {
        "family": TaskFamily.GENERATION.value,
        "metrics": metrics,
        "skipped": skipped,
        "near_copies": _near_copies(metrics.get("memorization"), samples.identifiers, sets.training_ids),
        "settings": {
            "dataset_json": where,
            "dataset_name": (data or {}).get("name"),
            "file_ending": samples.file_ending,
            "num_channels": samples.num_channels,
            "spatial_dims": samples.spatial_dims,
            "sample_shape": list(sets.shape) if sets.shape is not None else None,
            "data_range": range_value,
            "data_range_source": range_source,
            "alignment": ("reference and training images centre-cropped/padded (with their minimum) to the sample "
                          "shape for SSIM-based and feature metrics; intensity W1 on the images as read"),
            "aligned_images": {"reference": sets.reference_aligned, "training": sets.training_aligned},
            "max_pairs": max_pairs,
            "near_copy_ssim": near_copy_ssim,
            "memorization_candidates": memorization_candidates,
            "feature_extractor": _extractor_name(feature_extractor),
        },
        "inputs": {
            "prediction": _inputs_entry(samples, samples.identifiers),
            "reference": _inputs_entry(reference, sets.reference_ids),
            "training": _inputs_entry(training, sets.training_ids) if training is not None else None,
        },
    }
    if output_file is not None:
        save_json(summary, output_file)
        logger.info("summary written to %s", output_file)
    return summary
