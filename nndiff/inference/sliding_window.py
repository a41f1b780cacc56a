"""Sliding-window evaluation of a network on inputs larger (or smaller) than its patch size.

For diffusion sampling the window is applied to the *denoiser* at every step
(:func:`sliding_window_model`): the sampler keeps one state for the whole image and each step's
network output is assembled from overlapping windows, so the sample has no seams between windows
(sampling each window to the end independently would). Deterministic families (segmentation
baseline, regression) use :func:`sliding_window` directly.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
#: Standard deviation of the Gaussian importance map as a fraction of the patch size (nnU-Net's 1/8).
GAUSSIAN_SIGMA_SCALE = 1.0 / 8.0
#: Default overlap: windows step by half a patch (nnU-Net's tile_step_size 0.5).
DEFAULT_STEP_FRACTION = 0.5


def window_starts(size: int, patch: int, step_fraction: float = DEFAULT_STEP_FRACTION) -> list[int]:
    """Start indices of windows of length ``patch`` covering ``size`` (``size >= patch``), the
    first at 0 and the last ending at ``size``, spaced evenly at most ``patch * step_fraction``."""
    if not 0 < step_fraction <= 1:
        raise ValueError(f"step_fraction must be in (0, 1], got {step_fraction}")
    if size <= patch:
        return [0]
    count = math.ceil((size - patch) / (patch * step_fraction)) + 1
    step = (size - patch) / (count - 1)
    return [int(round(step * i)) for i in range(count)]


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = GAUSSIAN_SIGMA_SCALE,
                        device: torch.device | str = "cpu") -> Tensor:
    """Separable Gaussian weight map (max 1) centred on the patch: window borders, where a
    convolutional network sees less context, count less. Clamped away from 0 so every voxel has
    positive weight."""
    weights = torch.ones((), dtype=torch.float64)
    for axis, n in enumerate(patch_size):
        coords = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        profile = torch.exp(-0.5 * (coords / max(n * sigma_scale, 1e-6)) ** 2)
        weights = weights.unsqueeze(-1) * profile.view(*([1] * axis), n)
    weights = weights / weights.max()
    positive = weights[weights > 0]
    weights = weights.clamp_min(float(positive.min()) if positive.numel() else 1.0)
    return weights.to(device=device, dtype=torch.float32)


def _pad_to(x: Tensor, patch_size: Sequence[int]) -> tuple[Tensor, list[slice]]:
    """Pad the spatial axes of ``x`` ``(B, C, *spatial)`` up to ``patch_size`` (centred, zeros)."""
    spatial = x.shape[2:]
    pads: list[int] = []
    crop: list[slice] = []
    for n, p in zip(reversed(spatial), reversed(patch_size)):
        extra = max(p - n, 0)
        pads += [extra // 2, extra - extra // 2]
    for n, p in zip(spatial, patch_size):
        extra = max(p - n, 0)
        crop.append(slice(extra // 2, extra // 2 + n))
    return (F.pad(x, pads) if any(pads) else x), crop


def sliding_window(fn: Callable[..., Tensor], x: Tensor, patch_size: Sequence[int], *,
                   extra: Mapping[str, Tensor] | None = None, step_fraction: float = DEFAULT_STEP_FRACTION,
                   gaussian: bool = True, windows_per_call: int = 1) -> Tensor:
    """``fn`` evaluated over ``x`` ``(B, C, *spatial)`` in windows of ``patch_size``.

    ``fn(window, **extra_windows) -> (B, C_out, *patch_size)``; ``extra`` holds tensors with the
    same spatial shape as ``x`` (conditioning images), cut with the same windows. Axes shorter
    than the patch are zero-padded (centred) and cropped back. Overlapping outputs are averaged
    with Gaussian (or uniform) weights. An input of exactly the patch size is one call.
    ``windows_per_call`` k > 1 stacks up to k windows along the batch axis of one call (window-major:
    ``fn`` then sees ``k·B`` items, and must treat them independently, as a network in eval mode
    does), so small batches fill the device with fewer calls.
    """
    if windows_per_call < 1:
        raise ValueError(f"windows_per_call must be >= 1, got {windows_per_call}")
    patch_size = [int(p) for p in patch_size]
    if len(patch_size) != x.ndim - 2:
        raise ValueError(f"patch_size {patch_size} does not match input shape {list(x.shape)}")
    extra = dict(extra or {})
    padded, crop = _pad_to(x, patch_size)
    padded_extra = {k: _pad_to(v, patch_size)[0] for k, v in extra.items()}
    spatial = padded.shape[2:]
    weight = gaussian_importance(patch_size, device=x.device) if gaussian else \
        torch.ones(patch_size, device=x.device)
    output: Tensor | None = None
    total = torch.zeros(spatial, device=x.device, dtype=torch.float32)
    starts = [window_starts(n, p, step_fraction) for n, p in zip(spatial, patch_size)]
    windows = [(slice(None), slice(None), *[slice(s, s + p) for s, p in zip(corner, patch_size)])
               for corner in itertools.product(*starts)]
    batch = x.shape[0]
    for first in range(0, len(windows), windows_per_call):
        group = windows[first:first + windows_per_call]
        stacked = torch.cat([padded[w] for w in group])
        results = fn(stacked, **{k: torch.cat([v[w] for w in group]) for k, v in padded_extra.items()}).float()
        for index, window in enumerate(group):
            result = results[index * batch:(index + 1) * batch]
            if output is None:
                output = torch.zeros((*result.shape[:2], *spatial), device=x.device, dtype=torch.float32)
            output[window] += result * weight
            total[window[2:]] += weight
    assert output is not None
    output = output / total
    return output[(slice(None), slice(None), *crop)]


def _repeat_items(value: Any, repeats: int, batch: int) -> Any:
    """A per-item tensor (first axis ``batch``) repeated for ``repeats`` stacked windows; anything
    else (a scalar time, None, a shared tensor) unchanged."""
    if repeats > 1 and isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return torch.cat([value] * repeats)
    return value


def sliding_window_model(model: Callable[[Tensor, Tensor, Any], Tensor], patch_size: Sequence[int], *,
                         step_fraction: float = DEFAULT_STEP_FRACTION, gaussian: bool = True,
                         max_batch: int | None = None) -> Callable[[Tensor, Tensor, Any], Tensor]:
    """A ``model(x, t, cond)`` (the diffusion ``ModelFn``) that evaluates ``model`` in windows.

    ``cond`` may be None or a dict of network keyword arguments; its ``cond_image`` (same spatial
    shape as ``x``) is windowed with ``x``, other entries (class labels, continuous values) are
    repeated with the windows. ``max_batch``: stack as many windows per call as keep the call's
    batch at most this (at least one window per call); None: one window per call.
    """
    def windowed(x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        cond = dict(cond or {})
        image = cond.pop("cond_image", None)
        batch = x.shape[0]

        def call(window: Tensor, **windows: Tensor) -> Tensor:
            repeats = window.shape[0] // batch
            shared = {key: _repeat_items(value, repeats, batch) for key, value in cond.items()}
            return model(window, _repeat_items(t, repeats, batch), {**shared, **windows})

        extra = {"cond_image": image} if image is not None else None
        per_call = max(1, int(max_batch) // batch) if max_batch else 1
        return sliding_window(call, x, patch_size, extra=extra, step_fraction=step_fraction, gaussian=gaussian,
                              windows_per_call=per_call)

    return windowed
