"""SSIM and MS-SSIM for 2D and 3D images, batched over image pairs.

Definitions (Wang et al. 2004, 2003) with a Gaussian window (sigma 1.5, 11 taps per axis), constants
``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` for data range ``L``, population (not sample) covariances,
and the SSIM map averaged over the *valid* positions only (where the window lies inside the image).
This equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=L)``, which crops the same border. Multi-channel images:
the mean over channels. Computation is in float64 because the luminance term is not shift-invariant,
so intensities in original units (e.g. HU) cannot be re-centred to save float32 precision.
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

#: Standard MS-SSIM scale weights (Wang et al. 2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
DEFAULT_WIN_SIZE = 11
DEFAULT_SIGMA = 1.5
K1 = 0.01
K2 = 0.03


@functools.lru_cache(maxsize=8)
def gaussian_window_1d(win_size: int, sigma: float) -> torch.Tensor:
    """Normalised 1D Gaussian of odd length ``win_size`` (float64)."""
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd number, got {win_size}")
    offsets = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return window / window.sum()


@functools.lru_cache(maxsize=32)
def _band_matrix(size: int, window: torch.Tensor) -> torch.Tensor:
    """``(size - k + 1, size)`` matrix whose rows are the window shifted by one: a 'valid' filter.

    Cached: the same few sizes recur for every chunk of image pairs.
    """
    k = window.numel()
    rows = size - k + 1
    matrix = torch.zeros(rows, size, dtype=window.dtype)
    for row in range(rows):
        matrix[row, row:row + k] = window
    return matrix


def _valid_filter(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of ``(B, 1, *spatial)``, 'valid' output (no padding).

    Each axis is filtered by a matrix product with a band matrix: in float64 on the CPU this is
    over ten times faster than ``conv2d``/``conv3d`` (which have no fast float64 kernels) for axes
    up to several hundred pixels, and it gives the same numbers.
    """
    for axis in range(2, x.ndim):
        band = _band_matrix(x.shape[axis], window)
        x = torch.movedim(torch.movedim(x, axis, -1) @ band.T, -1, axis)
    return x


def _check_pair(x: torch.Tensor, y: torch.Tensor, win_size: int) -> None:
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim not in (4, 5):
        raise ValueError(f"expected (B, C, *spatial) with 2 or 3 spatial axes, got {tuple(x.shape)}")
    if min(x.shape[2:]) < win_size:
        raise ValueError(
            f"image size {tuple(x.shape[2:])} is smaller than the SSIM window ({win_size}); "
            "pass a smaller odd win_size or use ms_ssim, which adapts to small images"
        )


def _ssim_and_cs(
    x: torch.Tensor, y: torch.Tensor, data_range: float, win_size: int, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term per (pair, channel): two ``(B, C)`` tensors."""
    _check_pair(x, y, win_size)
    batch, channels = x.shape[:2]
    window = gaussian_window_1d(win_size, sigma)
    # Channels are filtered independently: fold them into the batch axis.
    flat = lambda t: t.reshape(batch * channels, 1, *t.shape[2:])  # noqa: E731
    ssim_values, cs_map = ssim_maps(flat(x), flat(y), data_range, window)
    reduce = lambda m: m.flatten(1).mean(1).reshape(batch, channels)  # noqa: E731
    return reduce(ssim_values), reduce(cs_map)


def ssim_maps(x: torch.Tensor, y: torch.Tensor, data_range: float,
              window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM and contrast-structure maps at every valid window position of ``(N, 1, *spatial)``
    float64 tensors (separable Gaussian ``window``, C1 = (K1 L)², C2 = (K2 L)²)."""
    mu_x, mu_y = _valid_filter(x, window), _valid_filter(y, window)
    var_x = _valid_filter(x * x, window) - mu_x**2
    var_y = _valid_filter(y * y, window) - mu_y**2
    cov = _valid_filter(x * y, window) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return luminance * cs_map, cs_map


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """float64 tensor ``(P, C, *spatial)``; a singleton Z axis (2D image as ``(C, 1, Y, X)``) is dropped."""
    tensor = torch.as_tensor(np.asarray(array, dtype=np.float64))
    if tensor.ndim == 5 and tensor.shape[2] == 1:
        tensor = tensor[:, :, 0]
    return tensor


def _chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def ssim_pairs(
    a: np.ndarray,
    b: np.ndarray,
    data_range: float,
    win_size: int = DEFAULT_WIN_SIZE,
    sigma: float = DEFAULT_SIGMA,
    batch_size: int = 256,
) -> np.ndarray:
    """SSIM of each pair ``(a[i], b[i])``; ``a`` and ``b`` are ``(P, C, *spatial)``. Returns ``(P,)``.

    Processed ``batch_size`` pairs at a time to bound memory.
    """
    a_t, b_t = _as_tensor(a), _as_tensor(b)
    out = np.empty(a_t.shape[0], dtype=np.float64)
    with torch.no_grad():
        for part in _chunks(a_t.shape[0], batch_size):
            value, _ = _ssim_and_cs(a_t[part], b_t[part], data_range, win_size, sigma)
            out[part] = value.mean(1).numpy()
    return out


def ssim(
    x: np.ndarray,
    y: np.ndarray,
    data_range: float,
    win_size: int = DEFAULT_WIN_SIZE,
    sigma: float = DEFAULT_SIGMA,
) -> float:
    """SSIM of two images ``(C, *spatial)`` (2 or 3 spatial axes, ``(C, 1, Y, X)`` counts as 2D).

    See the module docstring for the exact definition. Raises ``ValueError`` when an axis is
    shorter than ``win_size``.
    """
    return float(ssim_pairs(np.asarray(x)[None], np.asarray(y)[None], data_range, win_size, sigma)[0])


def ms_ssim_num_scales(spatial_shape: tuple[int, ...], win_size: int = DEFAULT_WIN_SIZE) -> int:
    """Number of MS-SSIM scales for an image of ``spatial_shape``.

    Rule: scale ``j`` (0 = finest) has size ``floor(n / 2**j)`` per axis; a scale is kept only if
    every axis is at least ``win_size``, and at most five scales (the standard weights) are used.
    Returns 0 when even the finest scale is smaller than the window.
    """
    smallest = min(spatial_shape)
    scales = 0
    while scales < len(MS_SSIM_WEIGHTS) and smallest // (2**scales) >= win_size:
        scales += 1
    return scales


def ms_ssim_weights(num_scales: int) -> list[float]:
    """The first ``num_scales`` standard weights, renormalised to sum to one."""
    chosen = MS_SSIM_WEIGHTS[:num_scales]
    total = sum(chosen)
    return [w / total for w in chosen]


def small_image_window(spatial_shape: tuple[int, ...]) -> tuple[int, float]:
    """Window for an image smaller than the default one: the largest odd size that fits.

    Sigma shrinks in proportion (1.5 per 11 taps). Images under 3 pixels on an axis are refused.
    """
    smallest = min(spatial_shape)
    if smallest < 3:
        raise ValueError(f"image size {tuple(spatial_shape)} is too small for SSIM (need >= 3 per axis)")
    win = smallest if smallest % 2 == 1 else smallest - 1
    return win, DEFAULT_SIGMA * win / DEFAULT_WIN_SIZE


def _ms_ssim_tensor(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """MS-SSIM per pair ``(B,)`` for ``(B, C, *spatial)`` tensors (scales adapted to the size)."""
    scales = ms_ssim_num_scales(tuple(x.shape[2:]))
    if scales == 0:
        win, sigma = small_image_window(tuple(x.shape[2:]))
        value, _ = _ssim_and_cs(x, y, data_range, win, sigma)
        return value.clamp_min(0).mean(1)
    weights = ms_ssim_weights(scales)
    pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
    result = torch.ones(x.shape[:2], dtype=torch.float64)
    for scale, weight in enumerate(weights):
        value, cs = _ssim_and_cs(x, y, data_range, DEFAULT_WIN_SIZE, DEFAULT_SIGMA)
        # Negative terms (anti-correlated structure) are clamped to 0 so fractional powers stay real.
        term = value if scale == scales - 1 else cs
        result = result * term.clamp_min(0) ** weight
        if scale < scales - 1:
            x, y = pool(x, 2), pool(y, 2)
    return result.mean(1)


def ms_ssim_pairs(a: np.ndarray, b: np.ndarray, data_range: float, batch_size: int = 128) -> np.ndarray:
    """MS-SSIM of each pair ``(a[i], b[i])``; ``(P, C, *spatial)`` inputs, ``(P,)`` output in [0, 1].

    Scales follow :func:`ms_ssim_num_scales` with renormalised weights (:func:`ms_ssim_weights`);
    an image smaller than the window gets single-scale SSIM with :func:`small_image_window`.
    """
    a_t, b_t = _as_tensor(a), _as_tensor(b)
    out = np.empty(a_t.shape[0], dtype=np.float64)
    with torch.no_grad():
        for part in _chunks(a_t.shape[0], batch_size):
            out[part] = _ms_ssim_tensor(a_t[part], b_t[part], data_range).numpy()
    return out


def ms_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """MS-SSIM of two images ``(C, *spatial)``; see :func:`ms_ssim_pairs`."""
    return float(ms_ssim_pairs(np.asarray(x)[None], np.asarray(y)[None], data_range)[0])


def pair_indices(count: int, max_pairs: int | None, seed: int = 0) -> np.ndarray:
    """All unordered pairs ``i < j`` of ``count`` items, or a seeded subset of ``max_pairs`` of them."""
    first, second = np.triu_indices(count, k=1)
    pairs = np.stack([first, second], axis=1)
    if max_pairs is not None and len(pairs) > max_pairs:
        chosen = np.random.default_rng(seed).choice(len(pairs), size=max_pairs, replace=False)
        pairs = pairs[np.sort(chosen)]
    return pairs


def ms_ssim_diversity(
    images: np.ndarray, data_range: float, max_pairs: int | None = 2000, seed: int = 0
) -> dict:
    """Mean pairwise MS-SSIM of a set ``(N, C, *spatial)``: lower means a more diverse set.

    Uses every unordered pair, or ``max_pairs`` of them drawn with ``seed`` (deterministic).
    Returns ``{"mean", "std", "num_pairs", "num_scales"}``.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 5 and images.shape[2] == 1:
        images = images[:, :, 0]
    if len(images) < 2:
        raise ValueError("MS-SSIM diversity needs at least two images")
    pairs = pair_indices(len(images), max_pairs, seed)
    # Gather pairs chunk by chunk: copying every pair at once would not fit for 3D volumes.
    values = np.concatenate([
        ms_ssim_pairs(images[pairs[part, 0]], images[pairs[part, 1]], data_range)
        for part in _chunks(len(pairs), 128)
    ])
    spatial = images.shape[2:]
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "num_pairs": int(len(pairs)),
        "num_scales": max(ms_ssim_num_scales(spatial), 1),
    }
