"""Noise sources for training and sampling (pluggable: Gaussian or simplex).

Every noise source follows :class:`NoiseFn`: called with a shape ``(B, C, *spatial)`` it returns
a tensor of that shape, zero mean and unit variance per sample, on ``device`` in ``dtype``,
drawn from ``generator`` when given (reproducible).

:func:`make_noise` builds one from the plan's ``noise_type`` and parameters. See
``documentation/noise.md`` for the simplex parameters and how they relate to AnoDDPM.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Protocol, Sequence

import torch

from nndiff.diffusion.options import NoiseType, parse_option
from nndiff.diffusion.simplex import (
    fractal_simplex,
    octave_amplitudes,
    octave_scales,
    random_permutations,
)

# Offsets are drawn in [0, OFFSET_RANGE) noise units per axis; the hash repeats every 256 lattice
# cells, so this range places each octave of each field at an unrelated part of the lattice.
OFFSET_RANGE = 256.0


class NoiseFn(Protocol):
    def __call__(
        self,
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor: ...


class GaussianNoise:
    """Standard normal noise (the default everywhere)."""

    def __call__(self, shape, *, generator=None, device=None, dtype=torch.float32):
        if generator is not None and device is None:
            device = generator.device
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


class SimplexNoise:
    """Multi-octave OpenSimplex noise (AnoDDPM, Wyatt et al. 2022), normalised per sample and channel.

    For each (sample, channel) a fresh permutation table and per-octave random offsets are drawn
    from ``generator``; the field is ``sum_k persistence**k * simplex(i * spacing * lacunarity**k /
    frequency + offset_k)`` over voxel indices ``i``, then shifted and scaled to zero mean and unit
    variance (population variance) over the spatial axes of that (sample, channel).

    Args:
        octaves: number of octaves (AnoDDPM: 6).
        persistence: amplitude ratio between consecutive octaves (AnoDDPM: 0.8).
        frequency: AnoDDPM's name for the feature size of the first octave, in voxels (AnoDDPM: 64);
            larger means smoother noise.
        lacunarity: spatial-frequency ratio between consecutive octaves (AnoDDPM: 2).
        spacing: optional relative voxel size per spatial axis (array order, e.g. ``(3, 1, 1)`` for
            3 mm slices with 1 mm pixels) so that blobs are round in physical space; default isotropic.
        planar_2d: for 2D images sample a plane of 3D noise at a random depth (default; AnoDDPM's
            code does this too); ``False`` uses 2D OpenSimplex, about 3x faster, with slightly more
            elongated features.
        max_chunk_points: (voxel, octave) points evaluated at once; default by device (see
            :func:`~nndiff.diffusion.simplex.fractal_simplex`). Bounds memory, never changes values.
    """

    def __init__(
        self,
        octaves: int = 6,
        persistence: float = 0.8,
        frequency: float = 64.0,
        lacunarity: float = 2.0,
        spacing: Sequence[float] | None = None,
        planar_2d: bool = True,
        max_chunk_points: int | None = None,
    ):
        if isinstance(octaves, bool) or not isinstance(octaves, int) or octaves < 1:
            raise ValueError(f"simplex noise octaves must be an integer >= 1, got {octaves!r}")
        for name, value in (("persistence", persistence), ("frequency", frequency), ("lacunarity", lacunarity)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"simplex noise {name} must be a finite number > 0, got {value!r}")
        if spacing is not None:
            spacing = tuple(float(s) for s in spacing)
            if not spacing or any(not math.isfinite(s) or s <= 0 for s in spacing):
                raise ValueError(f"simplex noise spacing must be positive numbers, got {spacing!r}")
        if max_chunk_points is not None and (not isinstance(max_chunk_points, int) or max_chunk_points < 1):
            raise ValueError(f"simplex noise max_chunk_points must be None or an integer >= 1, got {max_chunk_points!r}")
        self.octaves = octaves
        self.persistence = float(persistence)
        self.frequency = float(frequency)
        self.lacunarity = float(lacunarity)
        self.spacing = spacing
        self.planar_2d = bool(planar_2d)
        self.max_chunk_points = max_chunk_points

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-friendly): ``make_noise("simplex", **noise.config)`` rebuilds it."""
        return {
            "octaves": self.octaves,
            "persistence": self.persistence,
            "frequency": self.frequency,
            "lacunarity": self.lacunarity,
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "planar_2d": self.planar_2d,
        }

    @property
    def scales(self) -> list[float]:
        """Noise units per voxel of each octave (see :func:`~nndiff.diffusion.simplex.octave_scales`)."""
        return octave_scales(self.octaves, self.frequency, self.lacunarity)

    @property
    def amplitudes(self) -> list[float]:
        """Weight of each octave (see :func:`~nndiff.diffusion.simplex.octave_amplitudes`)."""
        return octave_amplitudes(self.octaves, self.persistence)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"SimplexNoise({args})"

    def noise_dims(self, spatial_dims: int) -> int:
        """Dimension of the noise function used for a grid with ``spatial_dims`` axes."""
        return 3 if spatial_dims == 3 or self.planar_2d else 2

    def draw_parameters(
        self,
        fields: int,
        spatial_dims: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random permutation tables ``(fields, 256)`` and offsets ``(fields, octaves, noise_dims)``.

        Drawn in this order from ``generator`` (on its own device, so a CPU generator also serves
        CUDA output), then moved to ``device``. Exposed so tests can rebuild a field octave by octave.
        """
        draw_device = generator.device if generator is not None else device
        perm = random_permutations(fields, generator=generator, device=draw_device)
        shape = (fields, self.octaves, self.noise_dims(spatial_dims))
        offsets = torch.rand(shape, generator=generator, device=draw_device, dtype=torch.float64) * OFFSET_RANGE
        return perm.to(device), offsets.to(device)

    def __call__(
        self,
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        shape = _check_shape(shape)
        if device is None:  # as GaussianNoise: the generator's device, else torch's default device
            device = generator.device if generator is not None else torch.empty(0).device
        batch, channels, spatial = shape[0], shape[1], shape[2:]
        if self.spacing is not None and len(self.spacing) != len(spatial):
            raise ValueError(
                f"SimplexNoise was built with spacing {self.spacing} for {len(self.spacing)} spatial axes, "
                f"called with shape {shape}"
            )
        perm, offsets = self.draw_parameters(batch * channels, len(spatial), generator=generator, device=device)
        # float64 only when asked for; half precision would lose the lattice position.
        compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        field = fractal_simplex(
            spatial,
            perm,
            offsets,
            scales=self.scales,
            amplitudes=self.amplitudes,
            spacing=self.spacing,
            dtype=compute_dtype,
            max_chunk_points=self.max_chunk_points,
        )
        return standardize(field).reshape(shape).to(dtype)


def standardize(fields: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit (population) variance along every axis but the first."""
    flat = fields.reshape(fields.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    centred = flat - mean
    std = centred.square().mean(dim=1, keepdim=True).sqrt()
    # A constant field (possible only for tiny grids) cannot be scaled to unit variance; leave it at 0.
    return (centred / std.clamp_min(torch.finfo(flat.dtype).tiny)).reshape(fields.shape)


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (4, 5) or any(s < 1 for s in shape):
        raise ValueError(f"simplex noise needs a shape (B, C, H, W) or (B, C, D, H, W) of positive sizes, got {shape}")
    if math.prod(shape[2:]) < 2:
        raise ValueError(f"simplex noise needs at least 2 voxels per sample to normalise, got shape {shape}")
    return shape


def make_noise(noise_type: str | NoiseType, **params: Any) -> NoiseFn:
    """Build the noise source named in a plan (``"gaussian"`` or ``"simplex"``) with its parameters.

    Unknown names and unknown or invalid parameters raise ValueError naming the valid choices.
    """
    kind = parse_option(NoiseType, noise_type, "noise type")
    if kind == NoiseType.GAUSSIAN:
        if params:
            raise ValueError(f"gaussian noise takes no parameters, got {sorted(params)}")
        return GaussianNoise()
    valid = [name for name in inspect.signature(SimplexNoise).parameters]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown simplex noise parameter(s) {unknown}; valid: {', '.join(valid)}")
    return SimplexNoise(**params)
