"""Intensity normalization schemes and their exact inverses.

Schemes and ``params`` are those of the plans (documentation/architecture.md):

- ``ct_window`` / ``dataset_percentile``: ``{"clip_low", "clip_high"}``;
  ``y = 2 (clip(x, lo, hi) - lo) / (hi - lo) - 1``.
- ``per_image_percentile``: ``{"low_percentile", "high_percentile"}``; the image's own
  percentiles (of the cropped image) are the window and are returned as per-image values,
  which the case JSON stores so the inverse exists.
- ``rgb``: ``y = clip(x, 0, 255) / 127.5 - 1``.
- ``scale_only``: ``{"scale"}``; ``y = x / scale`` (linear, no clip: reconstruction needs it).
- ``none``: ``y = x``.

The inverse is exact (to float32 rounding) for values inside the window; values the
forward step clipped come back as the window edge. The inverse also clips ``y`` to
[-1, 1] for bounded schemes, because a generated sample outside that range has no meaning
beyond the window edge.
Arithmetic runs in float64 so that the float32 result is the correctly rounded value.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from nndiff.diffusion.options import NormalizationScheme, parse_option
from nndiff.errors import PlansError

WINDOW_SCHEMES = (NormalizationScheme.CT_WINDOW, NormalizationScheme.DATASET_PERCENTILE)
BOUNDED_SCHEMES = (*WINDOW_SCHEMES, NormalizationScheme.PER_IMAGE_PERCENTILE, NormalizationScheme.RGB)
RGB_RANGE = (0.0, 255.0)


def _scheme(entry: dict) -> NormalizationScheme:
    try:
        return parse_option(NormalizationScheme, entry.get("scheme", "none"), "normalization scheme")
    except ValueError as err:
        raise PlansError(f"normalization entry {entry.get('channel', '?')}: {err}") from None


def _param(entry: dict, key: str) -> float:
    params = entry.get("params") or {}
    if key not in params:
        raise PlansError(
            f"normalization entry for channel {entry.get('channel', '?')} (scheme "
            f"{entry.get('scheme')!r}) has no params.{key}; re-run nndiff_plan_experiment"
        )
    return float(params[key])


def per_image_values(x: np.ndarray, entry: dict) -> dict[str, float] | None:
    """Values one image needs for its own normalization (``per_image_percentile`` only)."""
    if _scheme(entry) is not NormalizationScheme.PER_IMAGE_PERCENTILE:
        return None
    low = _param(entry, "low_percentile")
    high = _param(entry, "high_percentile")
    lo, hi = np.percentile(np.asarray(x, dtype=np.float64), [low, high])
    if hi <= lo:  # constant image: any positive width keeps the map invertible
        hi = lo + 1.0
    return {"lo": float(lo), "hi": float(hi)}


def window(entry: dict, image_values: dict[str, float] | None = None) -> tuple[float, float] | None:
    """The clip window ``(lo, hi)`` of a bounded scheme in original units, else ``None``."""
    scheme = _scheme(entry)
    if scheme in WINDOW_SCHEMES:
        lo, hi = _param(entry, "clip_low"), _param(entry, "clip_high")
    elif scheme is NormalizationScheme.PER_IMAGE_PERCENTILE:
        if image_values is None:
            raise ValueError("per_image_percentile needs the image's stored lo/hi values")
        lo, hi = image_values["lo"], image_values["hi"]
    elif scheme is NormalizationScheme.RGB:
        lo, hi = RGB_RANGE
    else:
        return None
    if not hi > lo:
        raise PlansError(
            f"normalization entry for channel {entry.get('channel', '?')}: clip window "
            f"[{lo}, {hi}] is empty; the high end must exceed the low end"
        )
    return lo, hi


def _scale(entry: dict) -> float:
    scale = _param(entry, "scale")
    if scale == 0:
        raise PlansError(f"normalization entry for channel {entry.get('channel', '?')}: scale is 0")
    return scale


def normalize(x: np.ndarray, entry: dict, image_values: dict[str, float] | None = None) -> np.ndarray:
    """Forward map of one real channel to model units (float64)."""
    x = np.asarray(x, dtype=np.float64)
    bounds = window(entry, image_values)
    if bounds is not None:
        lo, hi = bounds
        return 2.0 * (np.clip(x, lo, hi) - lo) / (hi - lo) - 1.0
    if _scheme(entry) is NormalizationScheme.SCALE_ONLY:
        return x / _scale(entry)
    return x.copy()


def denormalize(y: np.ndarray, entry: dict, image_values: dict[str, float] | None = None) -> np.ndarray:
    """Inverse map of one channel back to original units (float64)."""
    y = np.asarray(y, dtype=np.float64)
    bounds = window(entry, image_values)
    if bounds is not None:
        lo, hi = bounds
        return lo + (np.clip(y, -1.0, 1.0) + 1.0) * ((hi - lo) / 2.0)
    if _scheme(entry) is NormalizationScheme.SCALE_ONLY:
        return y * _scale(entry)
    return y.copy()


def clip_counts(x: np.ndarray, entry: dict, image_values: dict[str, float] | None = None) -> tuple[int, int]:
    """``(voxels outside the window, voxels)`` of one channel; 0 clipped for unbounded schemes."""
    bounds = window(entry, image_values)
    if bounds is None:
        return 0, int(np.size(x))
    lo, hi = bounds
    return int(np.count_nonzero((x < lo) | (x > hi))), int(np.size(x))


def background_fallback(entry: dict, image_values: dict[str, float] | None = None) -> float:
    """Padding value for un-cropping when a case JSON has none (e.g. a predicted target).

    The low window edge for bounded schemes (what normalized -1 maps to), else 0.
    """
    scheme = _scheme(entry)
    if scheme is NormalizationScheme.PER_IMAGE_PERCENTILE and image_values is None:
        return 0.0
    bounds = window(entry, image_values)
    return float(bounds[0]) if bounds is not None else 0.0


def describe(entry: dict) -> dict[str, Any]:
    """The part of a plans normalization entry the case JSON keeps (scheme + params)."""
    return {"scheme": str(_scheme(entry)), "params": dict(entry.get("params") or {})}
