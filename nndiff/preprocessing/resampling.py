"""Resampling to a target spacing (images: spline order 3; label maps: linear per label).

Grid alignment: voxel *edges* of the input and output grids coincide (scipy's
``zoom(..., grid_mode=True)``, the same alignment as skimage's ``resize`` that nnU-Net uses),
so resampling there and back keeps the field of view.

Anisotropic data (nnU-Net's rule): when the max/min spacing ratio of the current or the new
spacing exceeds ``separate_z_anisotropy_threshold`` (3) and exactly one axis is the coarse one,
each slice is resampled in-plane with the full order and the coarse axis separately with
``order_z`` (0 = nearest), because a cubic spline across 3-5 mm slices invents structure
between slices. Axes of length 1 (2D images) are never resampled.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy.ndimage import zoom

ANISOTROPY_THRESHOLD = 3.0


@dataclass(frozen=True)
class ResamplingSettings:
    """How one kind of array is resampled (read from the configuration's ``resampling`` block)."""

    order: int = 3
    order_z: int = 0
    force_separate_z: bool | None = None
    separate_z_anisotropy_threshold: float = ANISOTROPY_THRESHOLD

    def to_json(self) -> dict:
        return asdict(self)


DATA_DEFAULTS = ResamplingSettings(order=3, order_z=0)
LABEL_DEFAULTS = ResamplingSettings(order=1, order_z=0)


def settings_from_config(config: dict, kind: str) -> ResamplingSettings:
    """Settings for ``kind`` ("data" | "target" | "seg") from a configuration's ``resampling``.

    Accepted layout: ``{"data": {...}, "seg": {...}, "target": {...}}`` with keys of
    :class:`ResamplingSettings`; a missing block or key takes the default (targets default to
    the data settings).
    """
    block = config.get("resampling") or {}
    defaults = LABEL_DEFAULTS if kind == "seg" else DATA_DEFAULTS
    raw = block.get(kind)
    if raw is None and kind == "target":
        raw = block.get("data")
    raw = raw or {}
    known = {k: raw[k] for k in ResamplingSettings.__dataclass_fields__ if k in raw}
    return ResamplingSettings(**{**asdict(defaults), **known})


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> list[int]:
    """Spatial shape after resampling from ``spacing`` to ``new_spacing`` (size-1 axes stay 1)."""
    new_shape = []
    for n, s, t in zip(shape, spacing, new_spacing):
        new_shape.append(1 if n == 1 else max(1, int(round(n * float(s) / float(t)))))
    return new_shape


def coarse_axis(
    current_spacing: Sequence[float], new_spacing: Sequence[float], settings: ResamplingSettings
) -> int | None:
    """The axis to resample separately, or ``None`` (rule in the module docstring)."""
    if settings.force_separate_z is False:
        return None
    for spacing in (current_spacing, new_spacing):
        spacing = np.asarray(spacing, dtype=np.float64)
        anisotropic = spacing.max() / spacing.min() > settings.separate_z_anisotropy_threshold
        if anisotropic or settings.force_separate_z:
            coarse = np.flatnonzero(spacing == spacing.max())
            # two or three equally coarse axes: no single axis to treat apart (as nnU-Net)
            return int(coarse[0]) if len(coarse) == 1 else None
    return None


def _zoom_to(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resize one spatial array to ``shape`` with edge-aligned grids; identity when equal."""
    if tuple(array.shape) == tuple(shape):
        return array
    factors = [t / s for t, s in zip(shape, array.shape)]
    out = zoom(array, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    assert out.shape == tuple(shape), (out.shape, shape)
    return out


def _zoom_labels(seg: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resize an integer map: nearest for order 0, else each label's mask interpolated (>= 0.5)."""
    if tuple(seg.shape) == tuple(shape):
        return seg
    if order == 0:
        return _zoom_to(seg, shape, 0)
    out = np.zeros(shape, dtype=seg.dtype)
    for value in np.unique(seg):
        if value == 0:
            continue
        resized = _zoom_to((seg == value).astype(np.float32), shape, order)
        out[resized >= 0.5] = value
    return out


def _resample_spatial(
    array: np.ndarray, new_shape: Sequence[int], axis: int | None, order: int, order_z: int, is_seg: bool
) -> np.ndarray:
    """Resample one ``(Z, Y, X)`` array, the ``axis`` (if any) separately with ``order_z``."""
    resize = _zoom_labels if is_seg else _zoom_to
    if axis is None:
        return resize(array, new_shape, order)
    in_plane_shape = [n for a, n in enumerate(new_shape) if a != axis]
    slices = [resize(np.take(array, i, axis=axis), in_plane_shape, order) for i in range(array.shape[axis])]
    stacked = np.stack(slices, axis=axis)
    return resize(stacked, new_shape, order_z)


def resample(
    array: np.ndarray,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    settings: ResamplingSettings,
    is_seg: bool = False,
) -> np.ndarray:
    """Resample every channel of a ``(C, Z, Y, X)`` array to spatial ``new_shape``.

    Images come back as float32 (computed in float64), label maps in their own dtype.
    """
    new_shape = [int(n) for n in new_shape]
    if list(array.shape[1:]) == new_shape:
        return array if is_seg else array.astype(np.float32, copy=False)
    axis = coarse_axis(current_spacing, new_spacing, settings)
    work = array if is_seg else array.astype(np.float64, copy=False)
    out = [
        _resample_spatial(channel, new_shape, axis, settings.order, settings.order_z, is_seg)
        for channel in work
    ]
    result = np.stack(out)
    return result if is_seg else result.astype(np.float32)
