"""Synthetic lesions for the MNI152 anomaly-detection dataset: soft-edged elliptical blobs in a slice."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from nndiff.errors import NnDiffError

#: The template file stores 8-bit values (0..255); lesioned slices stay in that range.
TEMPLATE_MAX_VALUE = 255.0
#: Synthetic lesion model of the anomaly-detection task (:func:`insert_lesions`), also written to
#: the conversion record. Blob = ellipse in the slice plane (the 2D section of an ellipsoid).
LESION_MODEL: dict[str, Any] = {
    "blobs_per_slice": [1, 3],        # uniform integer, inclusive
    "semi_axis_mm": [3.0, 10.0],      # each of the two semi-axes uniform in this range; angle uniform
    "contrast_of_wm": [0.3, 0.6],     # |change| = fraction (uniform) x template WM intensity
    "sign": "one per slice: hyper- (+) or hypointense (-) with probability 1/2",
    "edge_sigma_mm": 1.0,             # Gaussian smoothing of the blob's indicator (soft edge)
    "edge_cutoff": 0.05,              # smoothed weight below this is set to 0: change = mask exactly
    "brain_margin_sigmas": 2.0,       # centre at least max semi-axis + 2 sigma inside the brain mask
    "wm_probability": 0.9,            # WM intensity = median T1 where P(WM) > this
    "clip": [0.0, TEMPLATE_MAX_VALUE],  # the result stays in the 8-bit range (bright WM lesions saturate)
}


def _ellipse(shape: tuple[int, int], spacing: tuple[float, float], centre: tuple[int, int],
             semi_axes: tuple[float, float], angle: float) -> np.ndarray:
    """Boolean ellipse (in mm, rotated by ``angle`` radians) on a 2D grid of ``spacing`` mm."""
    rows = (np.arange(shape[0]) - centre[0])[:, None] * spacing[0]
    cols = (np.arange(shape[1]) - centre[1])[None, :] * spacing[1]
    u = cols * math.cos(angle) + rows * math.sin(angle)
    v = -cols * math.sin(angle) + rows * math.cos(angle)
    return (u / semi_axes[0]) ** 2 + (v / semi_axes[1]) ** 2 <= 1.0


def _blob_centre(depth_mm: np.ndarray, semi_axes: tuple[float, float], margin_mm: float,
                 rng: np.random.Generator) -> tuple[tuple[int, int], tuple[float, float]]:
    """A random centre deep enough in the brain for the blob and its soft edge.

    Where no voxel is deep enough (a small brain section), the deepest voxel is taken and the
    semi-axes shrink to fit; the brain mask still bounds the change (:func:`insert_lesions`).
    """
    needed = max(semi_axes) + margin_mm
    candidates = np.argwhere(depth_mm >= needed)
    if len(candidates):
        row, col = candidates[rng.integers(len(candidates))]
        return (int(row), int(col)), semi_axes
    row, col = np.unravel_index(int(np.argmax(depth_mm)), depth_mm.shape)
    scale = max(float(depth_mm[row, col]) - margin_mm, 1e-3) / max(semi_axes)
    return (int(row), int(col)), (semi_axes[0] * scale, semi_axes[1] * scale)


def insert_lesions(image: np.ndarray, brain: np.ndarray, spacing: tuple[float, float], wm_value: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Add 1-3 soft-edged elliptical blobs to a 2D slice; returns (image, mask, blob descriptions).

    Lesion model (``LESION_MODEL``): per slice one sign (hyper/hypo), per blob semi-axes 3-10 mm,
    a random angle, a centre at least max semi-axis + 2 sigma inside the brain mask, and a change
    of sign * c * ``wm_value`` with c in 0.3-0.6, weighted by the blob's indicator smoothed with a
    Gaussian of sigma 1 mm; weights below 0.05 are cut to 0 and the weight is 0 outside the brain,
    so the mask (weight > 0, any blob) is exactly where the image changes. Overlapping blobs add.
    The result is clipped to 0..255. ``image``/``brain`` are (rows, cols); ``spacing`` in mm.
    """
    from scipy import ndimage  # noqa: PLC0415  (only this task needs it)

    model = LESION_MODEL
    image = np.asarray(image, dtype=np.float32)
    brain = np.asarray(brain, dtype=bool)
    if not brain.any():
        raise NnDiffError("cannot place a lesion on a slice without brain; the slice split keeps only "
                          "slices with brain, so this is a bug in the caller")
    depth_mm = ndimage.distance_transform_edt(brain, sampling=spacing)
    sigma_mm = float(model["edge_sigma_mm"])
    margin_mm = float(model["brain_margin_sigmas"]) * sigma_mm
    sign = 1.0 if rng.random() < 0.5 else -1.0
    change = np.zeros(image.shape, np.float64)
    mask = np.zeros(image.shape, bool)
    blobs: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(model["blobs_per_slice"][0], model["blobs_per_slice"][1] + 1))):
        semi = (float(rng.uniform(*model["semi_axis_mm"])), float(rng.uniform(*model["semi_axis_mm"])))
        angle = float(rng.uniform(0.0, math.pi))
        contrast = float(rng.uniform(*model["contrast_of_wm"]))
        centre, semi = _blob_centre(depth_mm, semi, margin_mm, rng)
        indicator = _ellipse(image.shape, spacing, centre, semi, angle).astype(np.float64)
        weight = ndimage.gaussian_filter(indicator, sigma=[sigma_mm / s for s in spacing], mode="constant")
        weight = np.where((weight >= model["edge_cutoff"]) & brain, weight, 0.0)
        change += sign * contrast * wm_value * weight
        mask |= weight > 0
        blobs.append({"centre_row_col": list(centre), "semi_axes_mm": [round(a, 3) for a in semi],
                      "angle_deg": round(math.degrees(angle), 2), "contrast": round(sign * contrast, 4)})
    lesioned = np.clip(image + change, *model["clip"]).astype(np.float32)
    return lesioned, mask.astype(np.uint8), blobs
