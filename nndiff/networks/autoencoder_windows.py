"""Sliding-window encode and decode of an autoencoder whose GroupNorms see the whole volume.

Used by latent diffusion for volumes too large to encode or decode in one pass
(``documentation/latent.md``); :func:`receptive_radius` gives the halo each window needs.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nndiff.errors import NnDiffError
from nndiff.networks.layers import Upsample


# ----------------------------------------------------------------------------------------------
# Sliding windows
# ----------------------------------------------------------------------------------------------
# Why not just decode windows and blend them: (1) near a window's edge the decoder sees zero
# padding instead of the neighbours, so each window is decoded with a halo of ``context`` latent
# voxels that is cropped away; (2) GroupNorm normalises with statistics of the whole tensor, so a
# window normalised by its own statistics comes out with a slightly different contrast (the seams
# of tiled VAE decoding). The statistics of every GroupNorm are therefore measured first over the
# whole volume, window by window (one truncated pass per GroupNorm layer, each reusing the exact
# statistics of the layers before it), and then frozen for the blended pass.


class _Stop(Exception):
    """Ends a truncated statistics pass once the GroupNorm being measured has seen its input."""


class _FrozenGroupNorms:
    """Context manager that routes every GroupNorm of ``module`` through frozen statistics.

    ``stats[i] = (sum, sum of squares, count)`` per (sample, group) of GroupNorm ``i``.
    ``measure = i``: GroupNorm ``i`` adds the core region of its input to ``stats[i]`` and stops
    the forward pass; GroupNorms before it use their frozen statistics.
    """

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self.stats: dict[int, list[torch.Tensor]] = {}
        self.measure: int | None = None
        #: (input window size, core start, core end) per axis, in the units of the pass's input.
        self.core: tuple[Sequence[int], Sequence[int], Sequence[int]] | None = None

    def __enter__(self) -> "_FrozenGroupNorms":
        for index, norm in enumerate(self.norms):
            norm.forward = self._forward_for(index, norm)  # instance attribute shadows the class method
        return self

    def __exit__(self, *exc: Any) -> None:
        for norm in self.norms:
            del norm.forward

    def _forward_for(self, index: int, norm: nn.GroupNorm):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.measure == index:
                self._accumulate(index, norm, x)
                raise _Stop
            if index not in self.stats:
                return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
            return self._normalise(index, norm, x)
        return forward

    def _accumulate(self, index: int, norm: nn.GroupNorm, x: torch.Tensor) -> None:
        assert self.core is not None
        size, lo, hi = self.core
        # The input window maps to this activation by a per-axis scale (e.g. 4x after two upsamplings).
        region = tuple(slice(int(round(a * n / s)), int(round(b * n / s)))
                       for n, s, a, b in zip(x.shape[2:], size, lo, hi))
        core = x[(slice(None), slice(None), *region)].double().reshape(x.shape[0], norm.num_groups, -1)
        new = [core.sum(-1), (core ** 2).sum(-1), torch.tensor(float(core.shape[-1]), dtype=torch.float64)]
        old = self.stats.get(index)
        self.stats[index] = new if old is None else [o + n for o, n in zip(old, new)]

    def _normalise(self, index: int, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        total, total_sq, count = (s.to(x.device) for s in self.stats[index])
        mean = total / count
        var = (total_sq / count - mean ** 2).clamp_min(0.0)
        b, c = x.shape[:2]
        grouped = x.float().reshape(b, norm.num_groups, -1)
        y = ((grouped - mean[..., None].float()) * torch.rsqrt(var[..., None].float() + norm.eps)).reshape(x.shape)
        affine = [1, c] + [1] * (x.ndim - 2)
        if norm.affine:
            y = y * norm.weight.reshape(affine) + norm.bias.reshape(affine)
        return y.to(x.dtype)


def receptive_radius(module: nn.Module, spatial_dims: int) -> tuple[float, ...]:
    """Per-axis receptive-field radius of ``module``'s convolution stack, in voxels of its input.

    Walks the modules in registration order (which is the forward order of :class:`Encoder` and
    :class:`Decoder`): a k-tap conv adds ``k // 2`` voxels at the current resolution, a stride
    coarsens it, an :class:`Upsample` refines it. A halo of this size makes a window exact.
    """
    step = [1.0] * spatial_dims  # size of one voxel of the current activation, in input voxels
    radius = [0.0] * spatial_dims
    for m in module.modules():
        if isinstance(m, Upsample):
            step = [s / k for s, k in zip(step, m.stride)]
        elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
            radius = [r + (k // 2) * s for r, k, s in zip(radius, m.kernel_size, step)]
            step = [s * k for s, k in zip(step, m.stride)]
    return tuple(radius)


def _window_starts(size: int, window: int, overlap: float, align: int = 1) -> list[int]:
    """Start positions covering ``[0, size)`` with windows of ``window`` (the last one flush with the
    end); steps are multiples of ``align`` (encoding: the factor, so windows map to whole latent voxels)."""
    if window >= size:
        return [0]
    step = max(align, int(round(window * (1.0 - overlap))) // align * align)
    starts = list(range(0, size - window, step))
    return starts + [size - window]


def blending_weights(window: Sequence[int], mode: str = "gaussian", device: torch.device | str = "cpu"
                     ) -> torch.Tensor:
    """Separable weights of one window: ``gaussian`` (sigma = window / 8, as nnU-Net) or ``linear``
    (a tent); floored at a small positive value so every voxel has weight."""
    weights = torch.ones((), device=device)
    for n in window:
        pos = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        if mode == "gaussian":
            axis = torch.exp(-0.5 * (pos / max(n / 8.0, 1e-3)) ** 2)
        elif mode == "linear":
            axis = 1.0 - pos.abs() / (n / 2.0 + 0.5)
        else:
            raise NnDiffError(f"unknown blending mode {mode!r}; choose 'gaussian' or 'linear'")
        weights = weights[..., None] * (axis / axis.max())
    return weights.clamp_min(1e-3)


@dataclass(frozen=True)
class _Window:
    """One window: its core ``[start, end)`` and the halo-extended input ``[lo, hi)``, per axis."""

    start: tuple[int, ...]
    end: tuple[int, ...]
    lo: tuple[int, ...]
    hi: tuple[int, ...]

    def input_slice(self) -> tuple[slice, ...]:
        return (slice(None), slice(None), *(slice(a, b) for a, b in zip(self.lo, self.hi)))

    def core_in_window(self) -> tuple[list[int], list[int], list[int]]:
        return ([b - a for a, b in zip(self.lo, self.hi)], [s - a for s, a in zip(self.start, self.lo)],
                [e - a for e, a in zip(self.end, self.lo)])


def _windows(spatial: Sequence[int], window: Sequence[int], overlap: float, context: Sequence[int],
             align: Sequence[int], partition: bool = False) -> list[_Window]:
    """Overlapping windows (``partition``: non-overlapping tiles that cover each voxel once)."""
    per_axis = []
    for n, w, a in zip(spatial, window, align):
        w = min(w, n)
        starts = list(range(0, n, w)) if partition else _window_starts(n, w, overlap, a)
        per_axis.append([(s, min(n, s + w)) for s in starts])
    out = []
    for combo in itertools.product(*per_axis):
        start = tuple(s for s, _ in combo)
        end = tuple(e for _, e in combo)
        lo = tuple(max(0, s - c) for s, c in zip(start, context))
        hi = tuple(min(n, e + c) for e, c, n in zip(end, context, spatial))
        out.append(_Window(start, end, lo, hi))
    return out


def _measure_norm_statistics(freezer: _FrozenGroupNorms, run, source: torch.Tensor, window: Sequence[int],
                             context: Sequence[int], align: Sequence[int]) -> None:
    """Fill ``freezer.stats`` with whole-volume statistics, one GroupNorm at a time."""
    tiles = _windows(source.shape[2:], window, 0.0, context, align, partition=True)
    for index in range(len(freezer.norms)):
        freezer.measure = index
        for tile in tiles:
            freezer.core = tile.core_in_window()
            try:
                run(source[tile.input_slice()])
            except _Stop:
                pass
    freezer.measure = None


def _blend(run, source: torch.Tensor, window: Sequence[int], overlap: float, scale: Sequence[float],
           context: Sequence[int], align: Sequence[int], mode: str,
           out_device: torch.device | str | None) -> list[torch.Tensor]:
    """Run ``run`` on overlapping halo-extended windows of ``source``; blend each output's cores.

    ``scale`` maps input voxels to output voxels per axis (factors for decoding, 1/factors for
    encoding). Returns one blended tensor per output of ``run``.
    """
    spatial = source.shape[2:]
    device = source.device if out_device is None else torch.device(out_device)
    out_spatial = [int(round(n * s)) for n, s in zip(spatial, scale)]
    sums: list[torch.Tensor] | None = None
    norm = torch.zeros(out_spatial, device=device)
    for win in _windows(spatial, window, overlap, context, align):
        outputs = run(source[win.input_slice()])
        core = tuple(slice(int(round((s - a) * k)), int(round((e - a) * k)))
                     for s, e, a, k in zip(win.start, win.end, win.lo, scale))
        target = tuple(slice(int(round(s * k)), int(round(e * k))) for s, e, k in zip(win.start, win.end, scale))
        weights = blending_weights([t.stop - t.start for t in target], mode, device)
        if sums is None:
            sums = [torch.zeros(*o.shape[:2], *out_spatial, device=device, dtype=torch.float32) for o in outputs]
        for total, out in zip(sums, outputs):
            window_core = out[(slice(None), slice(None), *core)].float().to(device)
            total[(slice(None), slice(None), *target)] += window_core * weights
        norm[target] += weights
    assert sums is not None
    return [total / norm for total in sums]


def _check_window(window: Sequence[int] | int, dims: int, what: str) -> tuple[int, ...]:
    window = (int(window),) * dims if isinstance(window, int) else tuple(int(w) for w in window)
    if len(window) != dims or min(window) < 1:
        raise NnDiffError(f"{what} must be a positive size per spatial axis ({dims} values), got {window}")
    return window


def _check_overlap(overlap: float) -> None:
    if not 0.0 <= overlap < 1.0:
        raise NnDiffError(f"overlap must be in [0, 1), got {overlap}")


def _resolve_factors(ae: nn.Module, factors: Sequence[int] | None) -> tuple[int, ...]:
    own = tuple(getattr(ae, "factors", ()))
    if factors is None:
        if not own:
            raise NnDiffError("pass factors: the autoencoder does not say its downsampling factors")
        return own
    factors = tuple(int(f) for f in factors)
    if own and factors != own:
        raise NnDiffError(f"factors {factors} differ from the autoencoder's downsampling factors {own}")
    return factors


def _resolve_context(context: Sequence[int] | int | None, module: nn.Module, dims: int,
                     multiple: Sequence[int] | None = None) -> tuple[int, ...]:
    """The halo: given, or the module's full receptive radius (rounded up to ``multiple``)."""
    if context is None:
        radius = receptive_radius(module, dims)
        multiple = multiple or [1] * dims
        return tuple(int(math.ceil(r / m)) * m for r, m in zip(radius, multiple))
    ctx = (int(context),) * dims if isinstance(context, int) else tuple(int(c) for c in context)
    if len(ctx) != dims or min(ctx) < 0 or (multiple and any(c % m for c, m in zip(ctx, multiple))):
        raise NnDiffError(f"context must be {dims} non-negative sizes" +
                          (f" that are multiples of the factors {tuple(multiple)}" if multiple else "") +
                          f", got {ctx}")
    return ctx


@torch.no_grad()
def sliding_window_decode(ae: nn.Module, z: torch.Tensor, latent_window: Sequence[int] | int,
                          overlap: float = 0.5, factors: Sequence[int] | None = None, *,
                          context: Sequence[int] | int | None = None, mode: str = "gaussian",
                          exact_norm: bool = True, out_device: torch.device | str | None = None) -> torch.Tensor:
    """Decode ``z`` in overlapping windows of ``latent_window`` latent voxels, blended in pixel space.

    Each window is decoded with a halo of ``context`` latent voxels per side (default: the
    decoder's receptive radius, which makes every window exact), cropped back to the window and
    averaged with ``mode`` weights (``gaussian`` or ``linear``). ``exact_norm``: GroupNorm
    statistics are measured over the whole latent first (see the section comment); off, each
    window uses its own (faster, seams possible). ``out_device``: where the full-size image is
    accumulated (e.g. ``"cpu"`` when it does not fit on the GPU).
    """
    _check_overlap(overlap)
    factors = _resolve_factors(ae, factors)
    dims = z.ndim - 2
    window = _check_window(latent_window, dims, "latent_window")
    decoder = getattr(ae, "decoder", ae)
    ctx = _resolve_context(context, decoder, dims)
    if all(w >= n for w, n in zip(window, z.shape[2:])):
        return ae.decode(z)  # one window holds everything: nothing to blend
    run = lambda w: (ae.decode(w),)  # noqa: E731
    ones = [1] * dims
    if not exact_norm:
        return _blend(run, z, window, overlap, factors, ctx, ones, mode, out_device)[0]
    with _FrozenGroupNorms(decoder) as freezer:
        _measure_norm_statistics(freezer, run, z, window, ctx, ones)
        return _blend(run, z, window, overlap, factors, ctx, ones, mode, out_device)[0]


@torch.no_grad()
def sliding_window_encode(ae: nn.Module, x: torch.Tensor, pixel_window: Sequence[int] | int,
                          overlap: float = 0.5, factors: Sequence[int] | None = None, *,
                          context: Sequence[int] | int | None = None, mode: str = "gaussian",
                          exact_norm: bool = True, out_device: torch.device | str | None = None
                          ) -> tuple[torch.Tensor, ...]:
    """Encode ``x`` in overlapping pixel windows, blended in latent space (the mirror of
    :func:`sliding_window_decode`; windows, halo and image size must be multiples of the factors).

    KL autoencoder: returns ``(mean, logvar)``. VQ autoencoder: the pre-quantisation latents are
    blended and then quantised, returning ``(z_q, indices, vq_loss)`` like ``encode``.
    """
    _check_overlap(overlap)
    factors = _resolve_factors(ae, factors)
    dims = x.ndim - 2
    window = _check_window(pixel_window, dims, "pixel_window")
    if any(w % f for w, f in zip(window, factors)) or any(n % f for n, f in zip(x.shape[2:], factors)):
        raise NnDiffError(f"pixel_window {window} and the image size {tuple(x.shape[2:])} must be multiples of the "
                          f"downsampling factors {factors}. Fix: pad the image / choose another window")
    if all(w >= n for w, n in zip(window, x.shape[2:])):
        return tuple(ae.encode(x))  # one window holds everything: nothing to blend
    encoder = getattr(ae, "encoder", ae)
    ctx = _resolve_context(context, encoder, dims, multiple=factors)
    scale = [1.0 / f for f in factors]
    # A vector-quantised autoencoder (AutoencoderVQ) blends its continuous codes, then quantises them.
    vq = callable(getattr(ae, "encode_continuous", None))
    run = (lambda w: (ae.encode_continuous(w),)) if vq else (lambda w: ae.encode(w))  # noqa: E731
    with _FrozenGroupNorms(encoder) if exact_norm else contextlib.nullcontext() as freezer:
        if freezer is not None:
            _measure_norm_statistics(freezer, run, x, window, ctx, factors)
        outputs = _blend(run, x, window, overlap, scale, ctx, factors, mode, out_device)
    if vq:
        return ae.quantize(outputs[0].to(x.device, x.dtype))
    return outputs[0], outputs[1]
