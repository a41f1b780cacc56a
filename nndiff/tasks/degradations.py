"""Degradation simulators and single-image noise-level estimation for the denoising family.

Simulators (torch, seeded through a ``torch.Generator``, on the input's device, 2D and 3D)
------------------------------------------------------------------------------------------
==================  ============================================================  ===================
function            model                                                         ``level`` means
==================  ============================================================  ===================
gaussian_noise      y = x + s R n                                                 s = std / reference
rician_noise        y = | x + s R (n1 + i n2) |  (magnitude MR)                   s = std / reference
poisson_noise       y = Poisson(k x) / k, k = counts / mean(x)  (PET)             mean count per voxel
ct_low_dose         p = A mu; N ~ Poisson(I0 exp(-p)); FBP(-log(N / I0))  (CT)     I0 photons per ray
==================  ============================================================  ===================

``R`` is the reference intensity: the per-case maximum of |x| unless given (pass 1.0 for an
absolute std). :func:`simulate` dispatches on :class:`~nndiff.diffusion.options.Degradation` with one
relative ``level`` for every kind: the noise std as a fraction of the reference for gaussian / rician,
and for poisson the relative noise at the mean intensity (PET) or on an unattenuated ray (CT), so
``counts = photons = 1 / level**2`` (level 0.1 -> 100 counts per voxel; level 0.01 -> 10^4 photons).
A ``[low, high]`` level draws one level per case, uniformly (training augmentation in clean-only mode).

Batch convention: a 4-D ``(N, C, H, W)`` or 5-D ``(N, C, D, H, W)`` tensor holds N cases (per-case
reference, level and counts); any other shape is one image.

CT: the projector pair is passed in (``project`` = forward Radon transform A, ``reconstruct`` = a left
inverse such as filtered back-projection), e.g. ``ParallelBeamCT.forward`` / ``ParallelBeamCT.fbp``
from :mod:`nndiff.tasks.operators`; this module does not import them so any geometry plugs in.

Noise estimation
----------------
:func:`estimate_noise_sigma`: Donoho's robust estimate sigma = median(|d|) / 0.6745 over the finest
orthonormal Haar detail coefficients that are high-pass along every axis (diagonal band, 2D and 3D).
:func:`matching_timestep` gives the process time whose noise-to-signal ratio sigma_t / alpha_t equals a
(normalised) noise level, and :func:`noisy_image_state` turns a noisy image into the diffusion state
at that time (come-closer-diffuse-faster / R2D2+ warm start).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from nndiff.diffusion.options import Degradation, parse_option
from nndiff.diffusion.processes import DiffusionProcess
from nndiff.errors import NnDiffError

Tensor = torch.Tensor
LevelLike = float | Sequence[float] | Tensor
TensorFn = Callable[[Tensor], Tensor]
logger = logging.getLogger(__name__)

#: Phi^-1(3/4): median(|n|) of a standard normal, Donoho & Johnstone's MAD constant.
MAD_TO_SIGMA = 0.6744897501960817
#: Linear attenuation coefficient of water, 1/mm, at about 70 keV (effective energy of a 120 kVp beam).
MU_WATER_PER_MM = 0.019
#: Detector counts below this are set to it before the log (a zero count has no finite line integral).
MIN_COUNT = 1.0
#: Bisection steps for continuous-time processes (2^-60 of the time interval: float64 exact).
_BISECTION_STEPS = 60


class DegradationError(NnDiffError, ValueError):
    """A degradation setting or input image is unusable (unknown kind, bad level, negative counts)."""


# ===================================================================================================
# batch helpers
# ===================================================================================================
def num_cases(x: Tensor) -> int:
    """Number of cases: the batch axis of a 4-D / 5-D tensor, otherwise 1."""
    return int(x.shape[0]) if x.ndim >= 4 else 1


def _per_case(values: Tensor | float, x: Tensor, batched: bool | None = None) -> Tensor:
    """Per-case values ``(N,)`` (or a scalar) shaped to broadcast against ``x`` (real dtype, x's device).

    ``batched`` (default: ``x`` is 4-D / 5-D) says whether axis 0 of ``x`` holds the cases.
    """
    batched = x.ndim >= 4 if batched is None else batched
    real = x.real.dtype if x.is_complex() else x.dtype
    v = torch.as_tensor(values, dtype=real, device=x.device)
    if v.ndim == 0:
        return v
    cases = int(x.shape[0]) if batched else 1
    if v.shape != (cases,):
        raise DegradationError(
            f"per-case values must have shape ({cases},) for an input of shape {tuple(x.shape)}, "
            f"got {tuple(v.shape)}; pass one value per case or a single number"
        )
    return v.reshape((-1,) + (1,) * (x.ndim - 1)) if batched else v.reshape(())


def _case_reduce(x: Tensor, op: str) -> Tensor:
    """Per-case max |x| or mean, keeping dims so it broadcasts against ``x``."""
    flat = x.reshape(num_cases(x), -1)
    value = flat.abs().amax(dim=1) if op == "max" else flat.mean(dim=1)
    return value.reshape((-1,) + (1,) * (x.ndim - 1)) if x.ndim >= 4 else value.reshape(())


def _reference(clean: Tensor, reference: float | Tensor | None) -> Tensor:
    if reference is None:
        return _case_reduce(clean.abs() if clean.is_complex() else clean, "max")
    ref = _per_case(reference, clean)
    if torch.any(ref <= 0):
        raise DegradationError(f"the noise reference intensity must be > 0, got {ref.flatten()[:4].tolist()}")
    return ref


def _check_generator(generator: torch.Generator | None, x: Tensor) -> None:
    if generator is not None and generator.device.type != x.device.type:
        raise DegradationError(
            f"the generator is on {generator.device} but the image is on {x.device}; "
            f"create it with torch.Generator(device={str(x.device)!r})"
        )


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    real = x.real.dtype if x.is_complex() else x.dtype
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=real)


def _check_level_values(values: Tensor, what: str) -> None:
    if not torch.all(torch.isfinite(values)) or torch.any(values <= 0):
        raise DegradationError(f"{what} must be finite and > 0, got {values.flatten()[:4].tolist()}")


# ===================================================================================================
# levels
# ===================================================================================================
def sample_levels(level: LevelLike, count: int, generator: torch.Generator | None = None) -> Tensor:
    """``count`` per-case levels (float64, on the generator's device or CPU).

    ``level`` is a number (repeated), a ``[low, high]`` range (uniform draws, the dataset.json
    ``degradation.level`` form) or a tensor of ``count`` levels (used as given).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    if isinstance(level, Tensor) and level.ndim == 1:
        values = level.to(device=device, dtype=torch.float64)
        if values.shape != (count,):
            raise DegradationError(f"a level tensor must hold one level per case ({count}), got {tuple(values.shape)}")
    elif isinstance(level, (list, tuple)):
        low, high = _level_range(level)
        u = torch.rand(count, generator=generator, device=device, dtype=torch.float64)
        values = low + (high - low) * u
    else:
        values = torch.full((count,), float(level), dtype=torch.float64, device=device)
    _check_level_values(values, "degradation level")
    return values


def _level_range(level: Sequence[float]) -> tuple[float, float]:
    flat = [float(v) for v in level]
    if len(flat) != 2 or not flat[0] <= flat[1]:
        raise DegradationError(f"a level range must be [low, high] with low <= high, got {list(flat)}")
    return flat[0], flat[1]


# ===================================================================================================
# simulators
# ===================================================================================================
def gaussian_noise(clean: Tensor, sigma: float | Tensor, generator: torch.Generator | None = None,
                   *, reference: float | Tensor | None = None) -> Tensor:
    """``clean + sigma * reference * n``, n ~ N(0, 1); ``sigma`` per case or scalar (see module doc)."""
    _check_generator(generator, clean)
    std = _per_case(sigma, clean) * _reference(clean, reference)
    return clean + std * _randn(clean, generator)


def rician_noise(clean: Tensor, sigma: float | Tensor, generator: torch.Generator | None = None,
                 *, reference: float | Tensor | None = None) -> Tensor:
    """Magnitude of complex Gaussian noise added to ``clean`` (real magnitude or complex image).

    ``| x + s (n1 + i n2) |`` with s = sigma * reference in both the real and imaginary channel: the
    noise floor of a zero signal is Rayleigh with mean s sqrt(pi / 2), and E[y^2] = |x|^2 + 2 s^2.
    """
    _check_generator(generator, clean)
    std = _per_case(sigma, clean) * _reference(clean, reference)
    real = clean.real if clean.is_complex() else clean
    imag = clean.imag if clean.is_complex() else torch.zeros_like(clean)
    return torch.hypot(real + std * _randn(real, generator), imag + std * _randn(real, generator))


def poisson_noise(clean: Tensor, mean_count: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Poisson counting noise (PET): each case scaled so its mean is ``mean_count`` counts per voxel.

    Returns ``Poisson(k x) / k`` with ``k = mean_count / mean(x)``, in the input's units (unbiased,
    variance x / k). A case that is zero everywhere stays zero. Intensities must be >= 0.
    """
    _check_generator(generator, clean)
    if clean.is_complex() or not torch.all(torch.isfinite(clean)):
        raise DegradationError("poisson noise needs a real, finite image (activity or counts)")
    minimum = float(clean.min())
    if minimum < 0:
        raise DegradationError(
            f"poisson noise needs non-negative intensities, found a minimum of {minimum:g}; pass images "
            "in original units (activity / counts), not normalised to [-1, 1], or clip negatives first"
        )
    counts = _per_case(mean_count, clean)
    _check_level_values(counts.reshape(-1), "the mean count")
    mean = _case_reduce(clean, "mean")
    scale = torch.where(mean > 0, counts / mean.clamp_min(torch.finfo(clean.dtype).tiny), torch.zeros_like(mean))
    sampled = torch.poisson(clean * scale, generator=generator)
    return torch.where(scale > 0, sampled / scale.clamp_min(torch.finfo(clean.dtype).tiny), clean)


def hu_to_attenuation(hu: Tensor, pixel_mm: float = 1.0, mu_water_per_mm: float = MU_WATER_PER_MM) -> Tensor:
    """Hounsfield units -> linear attenuation per pixel (line integrals in pixel units), >= 0.

    mu = mu_water (1 + HU / 1000) * pixel size; values below air (-1000 HU) are clipped to 0.
    """
    return (mu_water_per_mm * pixel_mm * (1.0 + hu / 1000.0)).clamp_min(0.0)


def attenuation_to_hu(mu: Tensor, pixel_mm: float = 1.0, mu_water_per_mm: float = MU_WATER_PER_MM) -> Tensor:
    """Inverse of :func:`hu_to_attenuation` (for attenuation >= 0)."""
    return 1000.0 * (mu / (mu_water_per_mm * pixel_mm) - 1.0)


def transmission_noise(attenuation: Tensor, photons: float | Tensor, project: TensorFn, reconstruct: TensorFn,
                       generator: torch.Generator | None = None) -> Tensor:
    """Low-dose CT: Poisson noise on the transmitted photon counts, reconstructed back to attenuation.

    ``p = project(mu)`` are line integrals, ``N ~ Poisson(I0 exp(-p))`` the detector counts (``I0``
    = ``photons`` incident per ray, per case or scalar), counts below :data:`MIN_COUNT` are raised to it
    (photon starvation), and ``reconstruct(-log(N / I0))`` maps the noisy sinogram back to the image.
    No electronic noise, beam hardening or scatter: a Poisson-only transmission model.
    """
    _check_generator(generator, attenuation)
    sinogram = project(attenuation)
    batched = attenuation.ndim >= 4
    if not isinstance(sinogram, Tensor) or (batched and sinogram.shape[:1] != attenuation.shape[:1]):
        raise DegradationError("project(x) must return a tensor that keeps the image's batch axis first")
    incident = _per_case(photons, sinogram, batched)
    _check_level_values(incident.reshape(-1), "the photon count")
    counts = torch.poisson(incident * torch.exp(-sinogram), generator=generator).clamp_min(MIN_COUNT)
    return reconstruct(torch.log(incident) - torch.log(counts))


@dataclass(frozen=True)
class CTProjector:
    """The projector pair and pixel size :func:`simulate` needs for low-dose CT on HU images.

    ``project``: image -> sinogram (line integrals, pixel units); ``reconstruct``: sinogram -> image
    (e.g. filtered back-projection). ``pixel_mm`` converts HU to attenuation per pixel.
    """

    project: TensorFn
    reconstruct: TensorFn
    pixel_mm: float = 1.0
    mu_water_per_mm: float = MU_WATER_PER_MM


def ct_low_dose(clean_hu: Tensor, photons: float | Tensor, ct: CTProjector,
                generator: torch.Generator | None = None) -> Tensor:
    """Low-dose version of a CT image in HU at ``photons`` incident photons per ray (HU in and out)."""
    mu = hu_to_attenuation(clean_hu, ct.pixel_mm, ct.mu_water_per_mm)
    noisy = transmission_noise(mu, photons, ct.project, ct.reconstruct, generator)
    return attenuation_to_hu(noisy, ct.pixel_mm, ct.mu_water_per_mm)


def counts_for_level(level: Tensor | float) -> Tensor | float:
    """Counts (PET mean count per voxel, CT photons per ray) whose relative noise is ``level``: 1 / level^2."""
    return 1.0 / level**2


def simulate(kind: Degradation | str, clean: Tensor, level: LevelLike, generator: torch.Generator | None = None,
             *, reference: float | Tensor | None = None, ct: CTProjector | None = None) -> Tensor:
    """Degrade ``clean`` with the ``kind`` of noise at ``level`` (see the module table).

    ``level``: a number, a ``[low, high]`` range (one uniform draw per case) or per-case tensor.
    gaussian / rician: std = level * reference (per-case max |x| unless ``reference`` is given).
    poisson: PET counting noise with ``1 / level**2`` mean counts per voxel, or, when ``ct`` is given,
    low-dose CT on an HU image with ``1 / level**2`` photons per ray.
    """
    try:
        kind = parse_option(Degradation, kind, "degradation type")
    except ValueError as error:
        raise DegradationError(str(error)) from None
    if ct is not None and kind is not Degradation.POISSON:
        raise DegradationError(f"a CT projector only applies to the 'poisson' degradation, not {kind.value!r}")
    _check_generator(generator, clean)
    levels = sample_levels(level, num_cases(clean), generator).to(clean.device)
    if clean.ndim < 4:
        levels = levels[0]
    if kind is Degradation.GAUSSIAN:
        return gaussian_noise(clean, levels, generator, reference=reference)
    if kind is Degradation.RICIAN:
        return rician_noise(clean, levels, generator, reference=reference)
    if ct is not None:
        return ct_low_dose(clean, counts_for_level(levels), ct, generator)
    return poisson_noise(clean, counts_for_level(levels), generator)


# ===================================================================================================
# noise-level estimation
# ===================================================================================================
def _spatial_dims(x: Tensor, spatial_dims: int | None) -> int:
    if spatial_dims is None:
        inferred = {2: 2, 4: 2, 5: 3}.get(x.ndim)
        if inferred is None:
            raise DegradationError(
                f"cannot tell 2D from 3D for an input of shape {tuple(x.shape)}; pass spatial_dims=2 or 3"
            )
        return inferred
    if spatial_dims not in (2, 3) or x.ndim < spatial_dims:
        raise DegradationError(
            f"spatial_dims must be 2 or 3 and at most x.ndim, got {spatial_dims} for {tuple(x.shape)}"
        )
    return spatial_dims


def haar_diagonal_details(x: Tensor, spatial_dims: int) -> Tensor:
    """Finest orthonormal Haar coefficients that are high-pass along every spatial axis.

    Each axis: ``(x[2k] - x[2k+1]) / sqrt(2)`` (an odd trailing row is dropped), so white noise of
    std sigma gives coefficients of std sigma while smooth intensity variations nearly cancel.
    """
    for axis in range(x.ndim - spatial_dims, x.ndim):
        pairs = x.narrow(axis, 0, x.shape[axis] // 2 * 2).unfold(axis, 2, 2)
        x = (pairs[..., 0] - pairs[..., 1]) / math.sqrt(2.0)
    return x


def _block_mask(mask: Tensor, spatial_dims: int) -> Tensor:
    """A detail coefficient counts when every voxel of its 2^d block lies inside the mask."""
    for axis in range(mask.ndim - spatial_dims, mask.ndim):
        even = mask.narrow(axis, 0, mask.shape[axis] // 2 * 2)
        mask = even.unfold(axis, 2, 2).all(-1)
    return mask


def estimate_noise_sigma(image: Tensor, *, spatial_dims: int | None = None, mask: Tensor | None = None) -> Tensor:
    """Robust noise std of each image: median(|d|) / 0.6745 over the finest diagonal Haar details d.

    ``image``: ``(..., *spatial)``; ``spatial_dims`` is inferred for ``(H, W)``, ``(N, C, H, W)`` and
    ``(N, C, D, H, W)``. Returns one sigma per leading index (shape ``image.shape[:-spatial_dims]``),
    in the image's units. ``mask`` (boolean, broadcastable to the image) restricts the estimate to
    voxels inside it, e.g. the foreground of a magnitude MR image (Rician background biases it low).
    Assumes white, signal-independent noise; structures as fine as one voxel raise the estimate.
    """
    dims = _spatial_dims(image, spatial_dims)
    if image.is_complex() or min(image.shape[-dims:]) < 2:
        raise DegradationError(
            f"noise estimation needs a real image with >= 2 voxels per axis, got {tuple(image.shape)}"
        )
    details = haar_diagonal_details(image.to(torch.float64), dims).abs()
    lead = image.shape[:-dims]
    if mask is None:
        return (details.flatten(-dims).median(dim=-1).values / MAD_TO_SIGMA).to(image.dtype)
    try:
        full = torch.broadcast_to(mask.to(device=image.device, dtype=torch.bool), image.shape)
    except RuntimeError:
        raise DegradationError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the image {tuple(image.shape)}"
        ) from None
    flat = details.reshape(-1, math.prod(details.shape[-dims:]))
    keep = _block_mask(full, dims).reshape(flat.shape)
    sigmas = []
    for values, inside in zip(flat, keep):
        if not inside.any():
            raise DegradationError("the mask leaves no 2x2(x2) block of voxels to estimate the noise from")
        sigmas.append(values[inside].median() / MAD_TO_SIGMA)
    return torch.stack(sigmas).reshape(lead).to(image.dtype)


# ===================================================================================================
# matching the diffusion time (come-closer-diffuse-faster / R2D2+)
# ===================================================================================================
def noise_to_signal(process: DiffusionProcess, t: Tensor | float) -> Tensor:
    """sigma_t / alpha_t of the process at time ``t`` (float64): the noise std of x_t / alpha_t."""
    alpha, sigma = process.alpha_sigma(t)
    return sigma / alpha


def matching_timestep(sigma: float | Tensor, process: DiffusionProcess) -> float | Tensor:
    """Process time whose noise-to-signal ratio sigma_t / alpha_t equals ``sigma`` (network units).

    ``sigma`` is the image's noise std after the plan's intensity normalisation (e.g. times 2 / (hi -
    lo) for a [lo, hi] -> [-1, 1] mapping). Discrete processes return the smallest integer t with
    sigma_t / alpha_t >= sigma (the gap is topped up by :func:`noisy_image_state`); continuous ones
    solve the equation by bisection. Levels outside the process' range clamp to ``t_min`` / ``t_max``.
    A float in gives a float out; a tensor gives a float64 tensor of times.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if not torch.all(torch.isfinite(s)) or torch.any(s <= 0):
        raise DegradationError(f"the noise level must be finite and > 0, got {s.flatten()[:4].tolist()}")
    ratio_max = float(noise_to_signal(process, process.t_max))
    if torch.any(s > ratio_max):
        logger.warning("noise level %.4g exceeds the process' largest sigma/alpha %.4g; starting at t_max",
                       float(s.max()), ratio_max)
    times = _discrete_time(s, process) if process.is_discrete else _continuous_time(s, process)
    return float(times) if not isinstance(sigma, Tensor) else times


def _discrete_time(s: Tensor, process: DiffusionProcess) -> Tensor:
    table = noise_to_signal(process, torch.arange(process.num_train_timesteps, dtype=torch.float64))
    # A relative slack of 1e-6 keeps a level read back in float32 on its own timestep.
    index = torch.searchsorted(table, s.reshape(-1) * (1.0 - 1e-6), right=False)
    return index.clamp(max=process.num_train_timesteps - 1).to(torch.float64).reshape(s.shape)


def _continuous_time(s: Tensor, process: DiffusionProcess) -> Tensor:
    low = torch.full_like(s, process.t_min)
    high = torch.full_like(s, process.t_max)
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        below = noise_to_signal(process, middle) < s
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    return high


def noisy_image_state(process: DiffusionProcess, noisy: Tensor, sigma: float | Tensor, t0: float | None = None,
                      noise: Tensor | torch.Generator | None = None) -> tuple[float, Tensor]:
    """``(t0, x_t0)``: the diffusion state a noisy image stands for, for ``sample(start_at=...)``.

    With y = x0 + sigma n (network units), alpha_t0 y already carries noise of std alpha_t0 sigma; a fresh
    draw of std sqrt(sigma_t0^2 - alpha_t0^2 sigma^2) brings it to exactly sigma_t0, so x_t0 follows the
    process' marginal. ``t0`` defaults to :func:`matching_timestep` of the largest per-case sigma (one
    grid serves the batch); ``sigma`` is a scalar or per case ``(N,)``. ``noise``: a tensor shaped like
    ``noisy`` or a generator to draw it.
    """
    sig = _per_case(torch.as_tensor(sigma, dtype=torch.float64), noisy).to(torch.float64)
    if t0 is None:
        t0 = matching_timestep(float(sig.max()), process)
    alpha, sigma_t = (v.to(noisy.device) for v in process.alpha_sigma(float(t0)))
    top_up = (sigma_t**2 - alpha**2 * sig**2).clamp_min(0.0).sqrt()
    if not isinstance(noise, Tensor):
        _check_generator(noise, noisy)
        noise = _randn(noisy, noise)
    return float(t0), (alpha * noisy + top_up * noise).to(noisy.dtype)
