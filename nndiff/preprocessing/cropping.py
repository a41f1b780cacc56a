"""Crop to the non-background region and its exact inverse.

Rule (shared by the fingerprint and preprocessing): each channel has a *background value*,
the channel's minimum when every corner voxel of the image holds exactly that minimum, and 0
otherwise. A voxel is foreground ("nonzero") when any channel differs from its background
value; the crop keeps the bounding box of those voxels.

Why not nnU-Net's plain ``!= 0``: CT volumes padded with -1024 (or -2048, -3024 outside the
field of view) have no zero background, so ``!= 0`` keeps everything and the padding value is
unknown to the inverse. With a zero background (MR, most PNGs) the rule is exactly nnU-Net's.
Outside the box every voxel equals its channel's background value by construction, so
un-cropping with those values restores the original exactly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

BBox = list[list[int]]  # per spatial axis [start, stop), stop exclusive (as nnU-Net v2)


def channel_background_values(images: np.ndarray) -> list[float]:
    """Background value of each channel of a real ``(C, Z, Y, X)`` array (rule in the module doc)."""
    values: list[float] = []
    for channel in images:
        minimum = channel.min()
        corners = channel[np.ix_(*[[0, n - 1] for n in channel.shape])]
        values.append(float(minimum) if np.all(corners == minimum) else 0.0)
    return values


def nonzero_mask(images: np.ndarray, background: Sequence[float] | None = None) -> np.ndarray:
    """Boolean ``(Z, Y, X)`` mask of voxels where any channel differs from its background value."""
    if background is None:
        background = channel_background_values(images)
    mask = np.zeros(images.shape[1:], dtype=bool)
    for channel, value in zip(images, background):
        mask |= channel != value
    return mask


def bbox_from_mask(mask: np.ndarray) -> BBox:
    """Tight bounding box of ``mask``; the whole array when the mask is empty (nothing to crop)."""
    if not mask.any():
        return [[0, n] for n in mask.shape]
    box: BBox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append([int(hits[0]), int(hits[-1]) + 1])
    return box


def full_bbox(shape: Sequence[int]) -> BBox:
    """The box that covers a whole array of spatial ``shape`` (used when cropping is off)."""
    return [[0, int(n)] for n in shape]


def crop(array: np.ndarray, bbox: BBox) -> np.ndarray:
    """Crop the spatial axes of a ``(C, Z, Y, X)`` array to ``bbox``."""
    slicer = (slice(None),) + tuple(slice(lo, hi) for lo, hi in bbox)
    return array[slicer]


def uncrop(
    array: np.ndarray, bbox: BBox, shape: Sequence[int], background: Sequence[float] | float = 0.0
) -> np.ndarray:
    """Place a cropped ``(C, ...)`` array back into spatial ``shape``, padding with ``background``.

    ``background`` is one value per channel (or one for all), in the array's units.
    """
    channels = array.shape[0]
    fill = np.broadcast_to(np.asarray(background, dtype=np.float64), (channels,))
    out = np.empty((channels, *shape), dtype=array.dtype)
    for c in range(channels):
        out[c] = fill[c]
    slicer = (slice(None),) + tuple(slice(lo, hi) for lo, hi in bbox)
    out[slicer] = array
    return out
