"""Input conventions shared by the generation metrics.

A single image is channel-first, ``(C, *spatial)`` with two or three spatial axes, as everywhere
in nnDiff (``(C, Z, Y, X)``; a 2D image may come as ``(C, 1, Y, X)``). A *set* of images is either
an array ``(N, C, *spatial)`` or a sequence of ``(C, *spatial)`` arrays (which may differ in shape
when only per-image or intensity metrics are asked for).
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

ImageSet = Union[np.ndarray, Sequence[np.ndarray]]


def squeeze_2d(image: np.ndarray) -> np.ndarray:
    """Drop the singleton Z axis of a ``(C, 1, Y, X)`` 2D image so it is treated as 2D."""
    if image.ndim == 4 and image.shape[1] == 1:
        return image[:, 0]
    return image


def as_image_list(images: ImageSet, name: str = "images") -> list[np.ndarray]:
    """Return the set as a list of float64 ``(C, *spatial)`` arrays with 2 or 3 spatial axes.

    Raises ``ValueError`` naming ``name`` when an image has the wrong number of axes.
    """
    items = list(images) if not isinstance(images, np.ndarray) else [images[i] for i in range(len(images))]
    result = []
    for index, image in enumerate(items):
        array = squeeze_2d(np.asarray(image, dtype=np.float64))
        if array.ndim not in (3, 4):
            raise ValueError(
                f"{name}[{index}] has shape {array.shape}; expected (C, Y, X) or (C, Z, Y, X) "
                "(channel first, one image per entry)"
            )
        result.append(array)
    return result


def as_image_batch(images: ImageSet, name: str = "images") -> np.ndarray:
    """Stack the set into one float64 array ``(N, C, *spatial)``; all images must share a shape."""
    items = as_image_list(images, name)
    if not items:
        raise ValueError(f"{name} is empty")
    shapes = {item.shape for item in items}
    if len(shapes) != 1:
        raise ValueError(f"{name} mixes image shapes {sorted(shapes)}; this metric needs one shape")
    return np.stack(items)


def intensity_range(*sets: list[np.ndarray]) -> float:
    """``max - min`` over every image of the given sets (the SSIM data range in original units).

    Returns 1.0 for constant data so SSIM constants stay positive.
    """
    lows = [float(image.min()) for images in sets for image in images]
    highs = [float(image.max()) for images in sets for image in images]
    if not lows:
        raise ValueError("no images to take the intensity range from")
    span = max(highs) - min(lows)
    return span if span > 0 else 1.0
