"""One call that evaluates a set of generated images: :func:`evaluate_generation`.

Every metric works in original intensity units (e.g. HU), so pass samples after the predictor
has mapped them back. A metric that cannot be computed (no feature extractor, too few images,
mixed shapes) is ``None`` in the summary and its reason is listed under ``"skipped"`` and logged.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Union

import numpy as np

from nndiff.evaluation.distributions import (
    FeatureExtractor,
    extract_features,
    frechet_distance,
    intensity_wasserstein,
    kernel_distance,
    load_feature_extractor,
)
from nndiff.evaluation.images import ImageSet, as_image_list, intensity_range
from nndiff.evaluation.memorization import NEAR_COPY_SSIM, memorization_check
from nndiff.evaluation.ssim import ms_ssim_diversity

logger = logging.getLogger(__name__)


def _same_shape(images: list[np.ndarray]) -> bool:
    return len({image.shape for image in images}) == 1


def _diversity(images: list[np.ndarray], data_range: float, max_pairs: int, name: str,
               skipped: dict[str, str]) -> dict | None:
    """MS-SSIM diversity of one set, or ``None`` with the reason recorded in ``skipped``."""
    if len(images) < 2:
        skipped[f"ms_ssim_diversity.{name}"] = f"{name} has fewer than two images"
        return None
    if not _same_shape(images):
        skipped[f"ms_ssim_diversity.{name}"] = f"{name} images differ in shape"
        return None
    return ms_ssim_diversity(np.stack(images), data_range, max_pairs=max_pairs)


def _feature_metrics(extractor: Union[FeatureExtractor, str, Path, None], samples: list[np.ndarray],
                     real: list[np.ndarray], skipped: dict[str, str]) -> tuple[float | None, dict | None]:
    """Fréchet and kernel distances in the extractor's feature space, or ``(None, None)``."""
    if extractor is None:
        skipped["frechet_distance"] = skipped["kernel_distance"] = (
            "no feature extractor given (pass a TorchScript model, e.g. --feature_extractor model.pt)"
        )
        return None, None
    if len(samples) < 2 or len(real) < 2:
        skipped["frechet_distance"] = skipped["kernel_distance"] = (
            "Fréchet and kernel distances need at least two generated and two real images"
        )
        return None, None
    if isinstance(extractor, (str, Path)):
        extractor = load_feature_extractor(extractor)
    gen_features = extract_features(extractor, samples)
    real_features = extract_features(extractor, real)
    return frechet_distance(gen_features, real_features), kernel_distance(gen_features, real_features)


def _memorization(samples: list[np.ndarray], training: list[np.ndarray] | None, data_range: float,
                  threshold: float, candidates: int | None, skipped: dict[str, str]) -> dict | None:
    """The memorization check as a dict, or ``None`` with the reason recorded in ``skipped``."""
    if not training:
        skipped["memorization"] = "no training images given"
        return None
    shapes = {image.shape for image in samples + training}
    if len(shapes) != 1:
        skipped["memorization"] = f"samples and training images differ in shape: {sorted(shapes)}"
        return None
    if min(samples[0].shape[1:]) < 11:
        skipped["memorization"] = f"images {samples[0].shape[1:]} are smaller than the 11-pixel SSIM window"
        return None
    result = memorization_check(np.stack(samples), np.stack(training), data_range, threshold, candidates)
    return result.to_json()


def _memorization_reference(real: list[np.ndarray], training: list[np.ndarray] | None, data_range: float,
                            threshold: float, candidates: int | None) -> dict | None:
    """The same check for held-out real images: how close unseen real data comes to training.

    A sample set much closer to training than this reference suggests copying even below the
    near-copy threshold. ``None`` when the shapes do not allow it (no reason logged: optional).
    """
    if not training or len({image.shape for image in real + training}) != 1 or min(real[0].shape[1:]) < 11:
        return None
    result = memorization_check(np.stack(real), np.stack(training), data_range, threshold, candidates)
    return {"mean_nearest_ssim": result.mean_nearest_ssim, "max_ssim": result.max_ssim,
            "near_copy_rate": result.near_copy_rate}


def _finite(value):
    """Replace non-finite floats by ``None`` recursively (JSON has no NaN)."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate_generation(
    samples: ImageSet,
    real_heldout: ImageSet,
    training: ImageSet | None = None,
    feature_extractor: Union[FeatureExtractor, str, Path, None] = None,
    *,
    data_range: float | None = None,
    near_copy_threshold: float = NEAR_COPY_SSIM,
    memorization_candidates: int | None = 32,
    max_diversity_pairs: int = 2000,
) -> dict:
    """Evaluate generated images against held-out real images and the training set.

    Args:
        samples: generated images, ``(N, C, *spatial)`` or a list of ``(C, *spatial)``.
        real_heldout: real images not used for training (same channels; shapes may differ).
        training: training images for the memorization check (same shape as the samples).
        feature_extractor: TorchScript path or callable ``(B, C, *spatial) -> (B, F)``; without it
            the Fréchet and kernel distances are skipped.
        data_range: SSIM data range ``L``; default ``max - min`` over real held-out and training.
        near_copy_threshold: SSIM at or above which a sample is a near-copy.
        memorization_candidates: training images scored with SSIM per sample (``None`` = all).
        max_diversity_pairs: cap on image pairs for MS-SSIM diversity (seeded subset).

    Returns a JSON-serialisable dict: counts, ``data_range``, ``intensity_wasserstein1``
    (per channel + mean), ``ms_ssim_diversity`` for ``samples`` and, as a reference, ``real_heldout``,
    ``frechet_distance``, ``kernel_distance``, ``memorization``, ``memorization_reference_real``
    (the same check for held-out real images) and ``skipped`` (metric -> reason).
    """
    gen = as_image_list(samples, "samples")
    real = as_image_list(real_heldout, "real_heldout")
    train = as_image_list(training, "training") if training is not None else None
    if not gen or not real:
        raise ValueError("evaluate_generation needs at least one generated and one real image")
    if data_range is None:
        data_range = intensity_range(real, train or [])
    skipped: dict[str, str] = {}
    fid, kid = _feature_metrics(feature_extractor, gen, real, skipped)
    summary = {
        "num_samples": len(gen),
        "num_real_heldout": len(real),
        "num_training": len(train) if train is not None else 0,
        "spatial_dims": gen[0].ndim - 1,
        "data_range": float(data_range),
        "intensity_wasserstein1": intensity_wasserstein(gen, real),
        "ms_ssim_diversity": {
            "samples": _diversity(gen, data_range, max_diversity_pairs, "samples", skipped),
            "real_heldout": _diversity(real, data_range, max_diversity_pairs, "real_heldout", skipped),
        },
        "frechet_distance": fid,
        "kernel_distance": kid,
        "memorization": _memorization(gen, train, data_range, near_copy_threshold,
                                      memorization_candidates, skipped),
        "memorization_reference_real": _memorization_reference(real, train, data_range, near_copy_threshold,
                                                               memorization_candidates),
        "skipped": skipped,
    }
    for metric, reason in skipped.items():
        logger.info("skipped %s: %s", metric, reason)
    return _finite(summary)
