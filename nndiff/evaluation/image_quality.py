"""Full-reference image-quality metrics, body masks, uncertainty calibration and classical denoisers.

Metrics take one image pair in **original units** (HU for CT), any shape (channel-first
``(C, *spatial)`` by convention; the 2D layout ``(C, 1, Y, X)`` is 2D), as numpy arrays or torch
tensors, and compute in float64. Each accepts an optional boolean ``mask`` (e.g. a body mask) that
broadcasts to the image (``(*spatial)`` masks broadcast over channels); only voxels inside it count.

=============  ==================================================================================
PSNR           10 log10(L^2 / MSE); the data range L is always explicit (fastMRI uses max(reference))
MAE            mean |prediction - reference|
NMSE           ||reference - prediction||^2 / ||reference||^2 (fastMRI's definition)
SSIM           :mod:`nndiff.evaluation.ssim` (Gaussian window 11 taps, sigma 1.5, valid positions);
               with a mask, the SSIM map is averaged over valid window centres inside the mask
=============  ==================================================================================

Baselines (:func:`nl_means_baseline`, :func:`tv_baseline`) wrap scikit-image, imported lazily; their
parameters follow from the noise std sigma (estimated from the image when not given):
non-local means h = 0.8 sigma with sigma passed for the bias correction, patch 5 / search distance 6
(2D) or 3 / 3 (3D, for speed), scikit-image's fast mode; total variation (Chambolle) weight = 0.75 sigma.
Both rules scale with the intensity units (h and the ROF weight are in intensity units); they were
chosen from h in {0.6, 0.8, 1.0} sigma and weight in {0.5, 0.75, 1, 1.5} sigma on a normalised MNI152
slice at sigma = 2, 5 and 10 %, best or within 0.5 dB of the best at each level (documentation/denoising.md).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from nndiff.errors import NnDiffError
from nndiff.evaluation.ssim import DEFAULT_SIGMA, DEFAULT_WIN_SIZE, gaussian_window_1d, ssim_maps

ArrayLike = np.ndarray | torch.Tensor
#: Default body threshold: this fraction of the way from the 1st to the 99th percentile of the image.
BODY_FRACTION = 0.1
BODY_PERCENTILES = (1.0, 99.0)
#: h / sigma for non-local means (scikit-image's example for fast mode with sigma given).
NLM_H_PER_SIGMA = 0.8
#: TV weight / sigma (weight = 1 / lambda of the ROF problem).
TV_WEIGHT_PER_SIGMA = 0.75


class ImageQualityError(NnDiffError, ValueError):
    """Images, masks or settings given to a metric are unusable (shapes, data range, empty mask)."""


# ===================================================================================================
# inputs
# ===================================================================================================
def _array(x: ArrayLike, name: str) -> np.ndarray:
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if np.iscomplexobj(array):
        raise ImageQualityError(f"{name} is complex; pass a magnitude (or real) image")
    return array.astype(np.float64, copy=False)


def _pair(prediction: ArrayLike, reference: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, r = _array(prediction, "prediction"), _array(reference, "reference")
    if p.shape != r.shape:
        raise ImageQualityError(f"prediction shape {p.shape} differs from reference shape {r.shape}; "
                                "align them (same crop / resampling) before computing metrics")
    return p, r


def _mask(mask: ArrayLike | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """Boolean mask broadcast to ``shape``; a mask with no voxel inside is an error."""
    if mask is None:
        return None
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    try:
        full = np.broadcast_to(m.astype(bool), shape)
    except ValueError:
        raise ImageQualityError(f"mask of shape {m.shape} does not broadcast to the image shape {shape}; "
                                "pass a mask of the spatial shape or of the full image shape") from None
    if not full.any():
        raise ImageQualityError("the mask selects no voxel; check the body-mask threshold or pass mask=None")
    return full


def _selected(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return values[mask] if mask is not None else values.reshape(-1)


# ===================================================================================================
# pixel metrics
# ===================================================================================================
def mse(prediction: ArrayLike, reference: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Mean squared error (inside ``mask`` when given)."""
    p, r = _pair(prediction, reference)
    return float(np.mean(_selected((p - r) ** 2, _mask(mask, p.shape))))


def mae(prediction: ArrayLike, reference: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Mean absolute error (inside ``mask`` when given)."""
    p, r = _pair(prediction, reference)
    return float(np.mean(_selected(np.abs(p - r), _mask(mask, p.shape))))


def psnr(prediction: ArrayLike, reference: ArrayLike, data_range: float, mask: ArrayLike | None = None) -> float:
    """10 log10(data_range^2 / MSE) in dB; ``inf`` for identical images. ``data_range`` > 0 is required."""
    if not (isinstance(data_range, (int, float)) and math.isfinite(data_range) and data_range > 0):
        raise ImageQualityError(f"data_range must be a finite number > 0, got {data_range!r}; use e.g. "
                                "max - min of the reference (or max(reference), as fastMRI)")
    error = mse(prediction, reference, mask)
    return math.inf if error == 0 else 10.0 * math.log10(data_range**2 / error)


def nmse(prediction: ArrayLike, reference: ArrayLike, mask: ArrayLike | None = None) -> float:
    """||reference - prediction||^2 / ||reference||^2 (fastMRI); the reference must not be all zero."""
    p, r = _pair(prediction, reference)
    m = _mask(mask, p.shape)
    energy = float(np.sum(_selected(r, m) ** 2))
    if energy == 0:
        raise ImageQualityError("NMSE is undefined for a reference that is zero everywhere (inside the mask)")
    return float(np.sum(_selected((r - p) ** 2, m))) / energy


# ===================================================================================================
# SSIM
# ===================================================================================================
def _ssim_layout(x: np.ndarray) -> np.ndarray:
    """``(C, *spatial)`` with 2 or 3 spatial axes; ``(C, 1, Y, X)`` becomes ``(C, Y, X)``."""
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim not in (3, 4):
        raise ImageQualityError(f"SSIM expects a channel-first image (C, *spatial) with 2 or 3 spatial axes, "
                                f"got shape {x.shape}; add a channel axis (x[None]) for a single-channel image")
    return x


def ssim_map(prediction: ArrayLike, reference: ArrayLike, data_range: float,
             win_size: int = DEFAULT_WIN_SIZE, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """SSIM at every valid window position, ``(C, *[n - win_size + 1 for n in spatial])``.

    Same definition as :func:`nndiff.evaluation.ssim.ssim` (whose value is this map's mean).
    """
    p, r = (_ssim_layout(a) for a in _pair(prediction, reference))
    if min(p.shape[1:]) < win_size:
        raise ImageQualityError(f"image size {p.shape[1:]} is smaller than the SSIM window ({win_size}); "
                                "pass a smaller odd win_size")
    window = gaussian_window_1d(win_size, sigma)
    x, y = torch.from_numpy(p)[:, None], torch.from_numpy(r)[:, None]  # channels as batch
    return ssim_maps(x, y, data_range, window)[0][:, 0].numpy()


def _valid_centres(mask: np.ndarray, win_size: int) -> np.ndarray:
    """The part of a spatial mask at the window centres of the valid SSIM positions."""
    half = win_size // 2
    return mask[(slice(None),) + tuple(slice(half, n - half) for n in mask.shape[1:])]


def ssim(prediction: ArrayLike, reference: ArrayLike, data_range: float, mask: ArrayLike | None = None,
         win_size: int = DEFAULT_WIN_SIZE, sigma: float = DEFAULT_SIGMA) -> float:
    """SSIM of two images ``(C, *spatial)``; with ``mask``, the mean SSIM over window centres inside it."""
    if not (math.isfinite(data_range) and data_range > 0):
        raise ImageQualityError(f"data_range must be a finite number > 0, got {data_range!r}")
    values = ssim_map(prediction, reference, data_range, win_size, sigma)
    if mask is None:
        return float(values.mean())
    shape = _ssim_layout(_array(reference, "reference")).shape
    m = _mask(_ssim_layout_mask(mask, shape), shape)
    centres = _valid_centres(m, win_size)
    if not centres.any():
        raise ImageQualityError(f"no voxel of the mask lies at least {win_size // 2} voxels inside the image "
                                "border, where SSIM windows fit; use a larger image or a smaller win_size")
    return float(values[centres].mean())


def _ssim_layout_mask(mask: ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
    """Drop the singleton Z axis of a 2D-layout mask so it matches :func:`_ssim_layout`."""
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim == len(shape) + 1 and m.shape[-3] == 1:  # (C, 1, Y, X) or (1, Y, X) for a 2D image
        m = m[..., 0, :, :]
    return m


def image_quality(prediction: ArrayLike, reference: ArrayLike, data_range: float,
                  mask: ArrayLike | None = None) -> dict[str, float]:
    """``{"psnr", "ssim", "mae", "nmse"}`` of one pair (inside ``mask`` when given); JSON-friendly."""
    return {
        "psnr": psnr(prediction, reference, data_range, mask),
        "ssim": ssim(prediction, reference, data_range, mask),
        "mae": mae(prediction, reference, mask),
        "nmse": nmse(prediction, reference, mask),
    }


# ===================================================================================================
# body mask and uncertainty calibration
# ===================================================================================================
def body_mask(image: ArrayLike, threshold: float | None = None, fraction: float = BODY_FRACTION) -> np.ndarray:
    """Boolean body mask of a 2D ``(Y, X)`` or 3D ``(Z, Y, X)`` image (pass one channel).

    1. voxels above ``threshold`` (default: 1st percentile + ``fraction`` x (99th - 1st percentile),
       -822 HU for a CT with air at -1024 HU and bone at 1000 HU);
    2. the largest connected component (face connectivity), so the table and noise specks drop out;
    3. holes filled (per axial slice, array axis 0, for volumes: air in lungs or bowel is enclosed
       in-plane even when it is open to the outside in 3D).
    Returns an all-False mask when nothing exceeds the threshold.
    """
    from scipy import ndimage

    x = _array(image, "image")
    if x.ndim not in (2, 3):
        raise ImageQualityError(f"body_mask expects a 2D (Y, X) or 3D (Z, Y, X) image, got shape {x.shape}; "
                                "pass a single channel")
    if threshold is None:
        low, high = np.percentile(x, BODY_PERCENTILES)
        threshold = float(low + fraction * (high - low))
    foreground = x > threshold
    labels, count = ndimage.label(foreground)
    if count == 0:
        return foreground
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == (int(np.argmax(sizes)) + 1)
    if x.ndim == 2:
        return ndimage.binary_fill_holes(largest)
    return np.stack([ndimage.binary_fill_holes(plane) for plane in largest])


def uncertainty_error_correlation(std: ArrayLike, prediction: ArrayLike, reference: ArrayLike,
                                  mask: ArrayLike | None = None) -> float | None:
    """Pearson r between a predicted std map and the absolute error |prediction - reference|.

    High r: the model is uncertain where it is wrong. None when either map is constant (r undefined).
    """
    p, r = _pair(prediction, reference)
    s = _array(std, "std")
    if s.shape != p.shape:
        raise ImageQualityError(f"std map shape {s.shape} differs from the prediction shape {p.shape}")
    m = _mask(mask, p.shape)
    a, b = _selected(s, m), _selected(np.abs(p - r), m)
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return None if denominator == 0 else float(np.dot(a, b) / denominator)


# ===================================================================================================
# classical denoising baselines (scikit-image)
# ===================================================================================================
def _restoration() -> Any:
    try:
        from skimage import restoration
    except ImportError:
        raise NnDiffError("the classical denoising baselines need scikit-image; install it with "
                          "'pip install scikit-image>=0.21'") from None
    return restoration


def _spatial_channels(noisy: ArrayLike) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(C, *spatial)`` (2D layout squeezed) and the original shape to restore."""
    x = _array(noisy, "noisy image")
    return _ssim_layout(x), x.shape


def _noise_sigma(channel: np.ndarray, sigma: float | None) -> float:
    if sigma is not None:
        if not (math.isfinite(sigma) and sigma > 0):
            raise ImageQualityError(f"the noise std sigma must be a finite number > 0, got {sigma!r}")
        return float(sigma)
    from nndiff.tasks.degradations import estimate_noise_sigma

    estimate = float(estimate_noise_sigma(torch.from_numpy(channel), spatial_dims=channel.ndim))
    if estimate <= 0:
        raise ImageQualityError("the estimated noise std is 0 (a noise-free or constant image); pass sigma")
    return estimate


def nl_means_baseline(noisy: ArrayLike, sigma: float | None = None) -> np.ndarray:
    """Non-local means of each channel of ``noisy`` ``(C, *spatial)``; sigma estimated when None."""
    restoration = _restoration()
    channels, shape = _spatial_channels(noisy)
    out = []
    for channel in channels:
        s = _noise_sigma(channel, sigma)
        patch, distance = (5, 6) if channel.ndim == 2 else (3, 3)
        out.append(restoration.denoise_nl_means(channel, patch_size=patch, patch_distance=distance,
                                                h=NLM_H_PER_SIGMA * s, sigma=s, fast_mode=True,
                                                preserve_range=True))
    return np.stack(out).reshape(shape)


def tv_baseline(noisy: ArrayLike, sigma: float | None = None) -> np.ndarray:
    """Total-variation (Chambolle) denoising of each channel of ``noisy`` ``(C, *spatial)``, weight = 0.75 sigma."""
    restoration = _restoration()
    channels, shape = _spatial_channels(noisy)
    out = [restoration.denoise_tv_chambolle(channel, weight=TV_WEIGHT_PER_SIGMA * _noise_sigma(channel, sigma))
           for channel in channels]
    return np.stack(out).reshape(shape)


#: name -> baseline function, in the order the evaluation tables list them.
BASELINES = {"nl_means": nl_means_baseline, "total_variation": tv_baseline}


def denoising_baselines(noisy: ArrayLike, sigma: float | None = None) -> dict[str, np.ndarray]:
    """Every classical baseline's output for one noisy image ``(C, *spatial)``."""
    return {name: baseline(noisy, sigma) for name, baseline in BASELINES.items()}
