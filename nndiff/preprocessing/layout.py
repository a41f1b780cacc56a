"""Channel layout (complex → real/imaginary pairs) and axis transposition, with inverses."""
from __future__ import annotations

from typing import Sequence

import numpy as np

COMPLEX_LAYOUT = "real_imag_pairs"


def to_real_channels(array: np.ndarray) -> tuple[np.ndarray, bool]:
    """Split a complex ``(C, ...)`` array into ``(2C, ...)`` real/imaginary pairs.

    Channel ``c`` becomes stored channels ``2c`` (real) and ``2c + 1`` (imaginary). Real input is
    returned unchanged (as float64 for exact normalization arithmetic). Returns ``(array, is_complex)``.
    """
    if np.iscomplexobj(array):
        pairs = np.stack([array.real, array.imag], axis=1)  # (C, 2, ...)
        return pairs.reshape(array.shape[0] * 2, *array.shape[1:]).astype(np.float64), True
    return np.asarray(array, dtype=np.float64), False


def from_real_channels(array: np.ndarray, is_complex: bool) -> np.ndarray:
    """Inverse of :func:`to_real_channels` (complex64 out when ``is_complex``)."""
    if not is_complex:
        return array
    if array.shape[0] % 2:
        raise ValueError(f"complex layout needs an even number of channels, got {array.shape[0]}")
    pairs = array.reshape(array.shape[0] // 2, 2, *array.shape[1:])
    return (pairs[:, 0] + 1j * pairs[:, 1]).astype(np.complex64)


def stored_channels(original_channel: int, is_complex: bool) -> list[int]:
    """Indices of the stored channels that hold original channel ``original_channel``."""
    return [2 * original_channel, 2 * original_channel + 1] if is_complex else [original_channel]


def spatial_transpose(transpose: Sequence[int]) -> list[int]:
    """The 3-axis spatial permutation; a 2-entry one (2D plans) leaves the Z=1 axis first."""
    axes = [int(a) for a in transpose]
    if len(axes) == 2:
        axes = [0] + [a + 1 for a in axes]
    if sorted(axes) != [0, 1, 2]:
        raise ValueError(f"transpose {list(transpose)} is not a permutation of the spatial axes")
    return axes


def transpose_array(array: np.ndarray, transpose: Sequence[int]) -> np.ndarray:
    """Permute the spatial axes of a ``(C, Z, Y, X)`` array (channel axis stays first)."""
    axes = spatial_transpose(transpose)
    return np.ascontiguousarray(array.transpose([0] + [a + 1 for a in axes]))


def transpose_values(values: Sequence, transpose: Sequence[int]) -> list:
    """Permute per-axis values (spacing, shape) like the array axes."""
    return [values[a] for a in spatial_transpose(transpose)]
