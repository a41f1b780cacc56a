"""Forward operators for reconstruction: Cartesian MRI (single / multi-coil) and parallel-beam CT.

Everything is plain torch: differentiable, on the input's device, batched over any leading axes.

Conventions
-----------
- MRI images and k-space are complex tensors ``(..., H, W)``; the centred orthonormal FFT acts on the
  last two axes (zero frequency at index ``(H // 2, W // 2)``, fastMRI's layout). Coils sit on axis
  -3: multi-coil k-space is ``(B, C, H, W)``, the image ``(B, 1, H, W)``.
- The network sees complex images as real channel pairs ``(real, imag)`` per complex channel
  (channel ``c`` -> channels ``2c`` and ``2c + 1``), the layout preprocessing stores
  (``nndiff.preprocessing.layout``); :func:`channels_to_complex` / :func:`complex_to_channels` convert.
- Masks are binary tensors ``(H, W)`` (or anything broadcastable to the k-space, e.g. fastMRI's ``(W,)``
  after :func:`expand_mask`); 1D masks sample whole phase-encode columns (the last axis), as fastMRI.
- CT images are real ``(..., H, W)`` in pixel units (pixel size 1); sinograms ``(..., n_angles, n_det)``.

Every operator has ``forward(x)``, ``adjoint(y)`` and ``normal(x) = adjoint(forward(x))``; the
adjoint is the exact adjoint of the discrete forward (tests check <Ax, y> = <x, A^H y>).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from enum import StrEnum
from typing import Sequence

import torch

from nndiff.errors import NnDiffError

Tensor = torch.Tensor
SeedLike = int | torch.Generator | None


class MeasurementError(NnDiffError):
    """A measurement, mask, sensitivity map or operator setting is unusable (shape, values)."""


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


# ===================================================================================================
# complex <-> real channel pairs
# ===================================================================================================
def channels_to_complex(x: Tensor) -> Tensor:
    """Real ``(B, 2C, ...)`` with (real, imag) channel pairs -> complex ``(B, C, ...)``."""
    if x.is_complex():
        raise MeasurementError("channels_to_complex expects a real tensor of (real, imag) channel pairs")
    if x.ndim < 2 or x.shape[1] % 2:
        raise MeasurementError(
            f"complex images as channels need an even channel count (real, imag pairs), got shape {tuple(x.shape)}"
        )
    return torch.complex(x[:, 0::2], x[:, 1::2])


def complex_to_channels(z: Tensor) -> Tensor:
    """Complex ``(B, C, ...)`` -> real ``(B, 2C, ...)`` with channels (re_0, im_0, re_1, im_1, ...)."""
    if not z.is_complex():
        raise MeasurementError("complex_to_channels expects a complex tensor")
    pairs = torch.stack([z.real, z.imag], dim=2)  # (B, C, 2, ...)
    return pairs.reshape(z.shape[0], 2 * z.shape[1], *z.shape[2:])


# ===================================================================================================
# precision: complex tensors follow the real sample's precision
# ===================================================================================================
def real_dtype_of(t: Tensor) -> torch.dtype:
    """The real precision a tensor computes in: float64 stays float64, anything else (float32,
    bfloat16 / float16 from autocast, complex64) is float32, because FFTs need float32 or float64."""
    real = t.real.dtype if t.is_complex() else t.dtype
    return torch.float64 if real == torch.float64 else torch.float32


def complex_dtype_of(t: Tensor) -> torch.dtype:
    """The complex dtype matching ``t``'s precision: complex128 for float64 / complex128, else complex64."""
    return torch.complex128 if real_dtype_of(t) == torch.float64 else torch.complex64


def match_precision(value: Tensor, like: Tensor) -> Tensor:
    """``value`` on ``like``'s device in ``like``'s precision, keeping whether it is complex.

    A plain ``value.to(like.dtype)`` of a complex measurement to a real sample's dtype would drop the
    imaginary part (PyTorch only warns), which silently enforces a wrong measurement."""
    dtype = complex_dtype_of(like) if value.is_complex() else real_dtype_of(like)
    return value.to(device=like.device, dtype=dtype)


# ===================================================================================================
# centred orthonormal FFT
# ===================================================================================================
_FFT_DIMS = (-2, -1)


def fft2c(x: Tensor) -> Tensor:
    """Centred orthonormal 2D FFT over the last two axes (image -> k-space, DC at the centre)."""
    shifted = torch.fft.ifftshift(x, dim=_FFT_DIMS)
    return torch.fft.fftshift(torch.fft.fft2(shifted, dim=_FFT_DIMS, norm="ortho"), dim=_FFT_DIMS)


def ifft2c(k: Tensor) -> Tensor:
    """Inverse of :func:`fft2c` (also its adjoint: the transform is unitary)."""
    shifted = torch.fft.ifftshift(k, dim=_FFT_DIMS)
    return torch.fft.fftshift(torch.fft.ifft2(shifted, dim=_FFT_DIMS, norm="ortho"), dim=_FFT_DIMS)


def mirror_index(n: int, device: torch.device | str | None = None) -> Tensor:
    """Index of frequency -f for each index of a centred axis of length ``n`` (DC at ``n // 2``):
    ``(2 (n // 2) - i) mod n``; for even ``n`` the Nyquist index 0 is its own mirror."""
    return (2 * (n // 2) - torch.arange(n, device=device)) % n


def mirror_kspace(k: Tensor) -> Tensor:
    """k(-f) over the last two axes of centred k-space (conj(mirror_kspace(k)) == k iff k is the
    spectrum of a real image: Hermitian symmetry)."""
    rows, cols = mirror_index(k.shape[-2], k.device), mirror_index(k.shape[-1], k.device)
    return k.index_select(-2, rows).index_select(-1, cols)


def rss(coil_images: Tensor, dim: int = -3, keepdim: bool = True) -> Tensor:
    """Root-sum-of-squares coil combination sqrt(sum_c |x_c|^2) over the coil axis ``dim``."""
    return torch.sqrt((coil_images.abs() ** 2).sum(dim=dim, keepdim=keepdim))


# ===================================================================================================
# undersampling masks
# ===================================================================================================
class MaskPattern(StrEnum):
    EQUISPACED = "equispaced"
    RANDOM = "random"
    GAUSSIAN = "gaussian"


def make_generator(seed: SeedLike) -> torch.Generator:
    """A CPU generator from an int seed (``None`` -> seed 0, so masks are always reproducible)."""
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def _centre_slice(n: int, n_centre: int) -> slice:
    # fastMRI's placement: the block of n_centre always contains the DC index n // 2.
    start = (n - n_centre + 1) // 2
    return slice(start, start + n_centre)


def _validate_mask_args(shape: Sequence[int], acceleration: float, center_fraction: float, dims: int) -> None:
    if len(shape) != 2 or min(shape) < 1:
        raise MeasurementError(f"mask shape must be (H, W) with positive sizes, got {tuple(shape)}")
    if not math.isfinite(acceleration) or acceleration < 1:
        raise MeasurementError(
            f"mask acceleration must be a finite number >= 1 (R = all samples / measured samples), got "
            f"{acceleration}; use 1 for full sampling"
        )
    if not 0.0 <= center_fraction <= 1.0:
        raise MeasurementError(f"mask center_fraction must be in [0, 1], got {center_fraction}")
    if dims not in (1, 2):
        raise MeasurementError(f"mask dims must be 1 (phase-encode lines) or 2 (points), got {dims}")


def _distance_from_centre(shape: tuple[int, int], dims: int) -> Tensor:
    """Normalised distance of each candidate (columns for 1D, pixels for 2D) from the DC sample."""
    h, w = shape
    col = (torch.arange(w, dtype=torch.float64) - w // 2) / w
    if dims == 1:
        return col.abs()
    row = (torch.arange(h, dtype=torch.float64) - h // 2) / h
    return torch.sqrt(row[:, None] ** 2 + col[None, :] ** 2).flatten()


def _choose(
    candidates: Tensor, n: int, pattern: MaskPattern, weights: Tensor, generator: torch.Generator
) -> Tensor:
    """Pick ``n`` of the candidate indices by ``pattern`` (exact count, no repeats)."""
    if n == 0:
        return candidates[:0]
    if pattern is MaskPattern.RANDOM:
        return candidates[torch.randperm(len(candidates), generator=generator)[:n]]
    if pattern is MaskPattern.GAUSSIAN:
        picked = torch.multinomial(weights.clamp(min=1e-300), n, replacement=False, generator=generator)
        return candidates[picked]
    # equispaced: spacing >= 1 between picks, random offset, so the count is exact
    spacing = len(candidates) / n
    offset = float(torch.rand((), generator=generator, dtype=torch.float64)) * spacing
    positions = torch.floor(offset + spacing * torch.arange(n, dtype=torch.float64)).long()
    return candidates[positions.clamp(max=len(candidates) - 1)]


def undersampling_mask(
    shape: Sequence[int],
    acceleration: float,
    center_fraction: float = 0.08,
    pattern: MaskPattern | str = MaskPattern.RANDOM,
    dims: int = 1,
    seed: SeedLike = 0,
    gaussian_std: float = 0.15,
    device: torch.device | str | None = None,
) -> Tensor:
    """Binary Cartesian undersampling mask of ``shape = (H, W)`` (bool, always ``(H, W)``).

    Exactly ``round(N / acceleration)`` of the N candidates are sampled (N = W columns for ``dims=1``,
    N = H * W points for ``dims=2``), including a fully sampled centre of ``round(center_fraction * W)``
    columns (1D) or ``round(cf * H) x round(cf * W)`` points (2D). The rest are chosen outside the
    centre: ``equispaced`` (evenly spaced over the outside candidates in raster order, random offset),
    ``random`` (uniform) or ``gaussian`` (variable density exp(-d^2 / (2 gaussian_std^2)), d the
    distance from the DC sample as a fraction of the matrix size). The same ``seed`` (int or
    torch.Generator) gives the same mask.
    """
    shape = tuple(int(s) for s in shape)
    _validate_mask_args(shape, float(acceleration), float(center_fraction), dims)
    pattern = _parse_pattern(pattern)
    h, w = shape
    centre = torch.zeros(shape if dims == 2 else (w,), dtype=torch.bool)
    if dims == 1:
        centre[_centre_slice(w, round(center_fraction * w))] = True
    else:
        centre[_centre_slice(h, round(center_fraction * h)), _centre_slice(w, round(center_fraction * w))] = True
    centre = centre.flatten()
    n_total = round(centre.numel() / float(acceleration))
    n_centre = int(centre.sum())
    if n_centre > n_total:
        raise MeasurementError(
            f"center_fraction {center_fraction} needs {n_centre} fully sampled {'columns' if dims == 1 else 'points'} "
            f"but acceleration {acceleration} allows only {n_total} of {centre.numel()}; lower center_fraction "
            "or the acceleration"
        )
    candidates = torch.nonzero(~centre).flatten()
    weights = torch.exp(-_distance_from_centre(shape, dims)[candidates] ** 2 / (2 * gaussian_std**2))
    chosen = _choose(candidates, n_total - n_centre, pattern, weights, make_generator(seed))
    sampled = centre.clone()
    sampled[chosen] = True
    mask = sampled.reshape(1, w).expand(h, w) if dims == 1 else sampled.reshape(h, w)
    return mask.contiguous().to(device)


def _parse_pattern(pattern: MaskPattern | str) -> MaskPattern:
    try:
        return MaskPattern(str(pattern))
    except ValueError:
        valid = ", ".join(p.value for p in MaskPattern)
        raise MeasurementError(f"unknown mask pattern {pattern!r}; valid patterns: {valid}") from None


def mask_acceleration(mask: Tensor) -> float:
    """Acceleration R = (number of k-space positions) / (number measured) of a binary mask."""
    measured = float(mask.to(torch.float64).sum())
    if measured <= 0:
        raise MeasurementError("the mask measures no k-space sample (all zeros); acceleration is undefined")
    return mask.numel() / measured


def expand_mask(mask: Tensor, kspace_shape: Sequence[int], source: str | None = None) -> Tensor:
    """Validate ``mask`` against k-space of ``kspace_shape`` and return it as a float tensor broadcastable to it.

    Accepted: ``(W,)`` (fastMRI's 1D columns), ``(1, W)``, ``(H, W)`` or any shape whose last two axes
    are ``(H or 1, W)`` and whose leading axes broadcast. Values must be 0/1 (a mask with values above
    one would mean an acceleration below 1).
    """
    mask = torch.as_tensor(mask)
    kspace_shape = tuple(int(s) for s in kspace_shape)
    if mask.ndim == 1:
        mask = mask.reshape(1, -1)
    h, w = kspace_shape[-2:]
    ok = mask.shape[-1] == w and mask.shape[-2] in (1, h) and mask.ndim <= len(kspace_shape)
    if ok:
        try:
            torch.broadcast_shapes(tuple(mask.shape), kspace_shape)
        except RuntimeError:
            ok = False
    if not ok:
        raise MeasurementError(
            f"{_where(source)}k-space shape {kspace_shape} disagrees with mask shape {tuple(mask.shape)}; the mask "
            f"must be (W,), (1, W) or (H, W) with (H, W) = {(h, w)} (the last two k-space axes)"
        )
    values = mask.to(torch.float64)
    if not bool(torch.all((values == 0) | (values == 1))):
        raise MeasurementError(
            f"{_where(source)}mask values must be 0 or 1 (got values in [{float(values.min()):g}, {float(values.max()):g}]); "
            "a mask above 1 would mean an acceleration below 1. Store the binary sampling pattern"
        )
    if float(values.sum()) == 0:
        raise MeasurementError(f"{_where(source)}mask measures no k-space sample (all zeros)")
    return mask.to(torch.float32)


def check_finite(y: Tensor, name: str, source: str | None = None) -> None:
    """Raise :class:`MeasurementError` if ``y`` holds NaN or Inf (names the file and the array)."""
    bad = int((~torch.isfinite(y)).sum())
    if bad:
        raise MeasurementError(
            f"{_where(source)}{name} contains {bad} non-finite value(s) (NaN or Inf) of {y.numel()}; "
            "replace them (unmeasured samples must be 0 and excluded by the mask)"
        )


# ===================================================================================================
# operators
# ===================================================================================================
class LinearOperator(ABC):
    """A linear measurement operator with its exact adjoint."""

    #: True when images are complex (MRI); the network then sees (real, imag) channel pairs
    complex_image: bool = False

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """A x."""

    @abstractmethod
    def adjoint(self, y: Tensor) -> Tensor:
        """A^H y."""

    def normal(self, x: Tensor) -> Tensor:
        """A^H A x."""
        return self.adjoint(self.forward(x))

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    @abstractmethod
    def check_measurement(self, y: Tensor, source: str | None = None) -> None:
        """Raise :class:`MeasurementError` if ``y`` cannot be a measurement of this operator."""

    def operator_norm_squared(self, image_shape: Sequence[int], iterations: int = 30, seed: int = 0,
                              dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> float:
        """||A||^2 (largest eigenvalue of A^H A) by power iteration from a seeded random image."""
        g = make_generator(seed)
        x = torch.randn(tuple(image_shape), generator=g, dtype=dtype)
        if self.complex_image:
            x = torch.complex(x, torch.randn(tuple(image_shape), generator=g, dtype=dtype))
        x = x.to(device)
        value = 0.0
        for _ in range(iterations):
            x = x / torch.linalg.vector_norm(x)
            ax = self.normal(x)
            value = float(torch.vdot(x.flatten(), ax.flatten()).real) if x.is_complex() else float((x * ax).sum())
            x = ax
        return value


def _check_image_plane(x: Tensor, shape: tuple[int, int], what: str) -> None:
    if tuple(x.shape[-2:]) != shape:
        raise MeasurementError(f"{what} has shape {tuple(x.shape)}; its last two axes must be {shape}")


class SingleCoilMRI(LinearOperator):
    """Single-coil Cartesian MRI: A x = M F x, A^H y = F^H M y (F = :func:`fft2c`).

    ``mask``: binary, ``(H, W)``, ``(W,)`` or broadcastable (see :func:`expand_mask`); A A^H = M is
    a projection, so x + A^H (y - A x) is the exact projection onto {A x = y}.
    """

    complex_image = True

    def __init__(self, mask: Tensor, source: str | None = None):
        mask = torch.as_tensor(mask)
        if mask.ndim == 1:  # fastMRI's (W,) columns
            mask = mask.reshape(1, -1)
        self.mask = expand_mask(mask, tuple(mask.shape), source)  # checks values; k-space checked per call
        self.source = source

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape[-2:])

    def _mask_like(self, k: Tensor) -> Tensor:
        rows, cols = self.mask.shape[-2:]
        if (rows != 1 and rows != k.shape[-2]) or cols != k.shape[-1]:
            raise MeasurementError(
                f"{_where(self.source)}k-space shape {tuple(k.shape)} disagrees with mask shape {tuple(self.mask.shape)}"
            )
        return self.mask.to(device=k.device, dtype=k.real.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self._mask_like(x) * fft2c(x)

    def adjoint(self, y: Tensor) -> Tensor:
        return ifft2c(self._mask_like(y) * y)

    def check_measurement(self, y: Tensor, source: str | None = None) -> None:
        source = source or self.source
        expand_mask(self.mask, tuple(y.shape), source)
        check_finite(y, "k-space", source)


class MultiCoilMRI(SingleCoilMRI):
    """Multi-coil Cartesian MRI with sensitivity maps S (coil axis -3).

    A x = M F (S x) for an image ``(B, 1, H, W)`` and maps ``(B, C, H, W)`` or ``(C, H, W)``;
    A^H y = sum_c conj(S_c) F^H M y_c. With maps normalised to sum_c |S_c|^2 = 1 (as
    :func:`estimate_sensitivity_maps` returns) ||A|| <= 1.
    """

    def __init__(self, mask: Tensor, sens_maps: Tensor, source: str | None = None):
        super().__init__(mask, source)
        sens_maps = torch.as_tensor(sens_maps)
        if not sens_maps.is_complex():
            sens_maps = sens_maps.to(torch.complex64)
        if sens_maps.ndim < 3:
            raise MeasurementError(
                f"{_where(source)}sens_maps must be (C, H, W) or (B, C, H, W), got shape {tuple(sens_maps.shape)}"
            )
        check_finite(sens_maps, "sens_maps", source)
        rows, cols = self.mask.shape[-2:]
        if (rows != 1 and rows != sens_maps.shape[-2]) or cols != sens_maps.shape[-1]:
            raise MeasurementError(
                f"{_where(source)}sens_maps shape {tuple(sens_maps.shape)} disagrees with mask shape "
                f"{tuple(self.mask.shape)} (last two axes must match)"
            )
        self.sens_maps = sens_maps

    @property
    def num_coils(self) -> int:
        return self.sens_maps.shape[-3]

    def maps_like(self, t: Tensor) -> Tensor:
        """The maps on ``t``'s device in its complex dtype."""
        return self.sens_maps.to(device=t.device, dtype=complex_dtype_of(t))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 3 or x.shape[-3] != 1:
            raise MeasurementError(f"multi-coil image must be (..., 1, H, W), got shape {tuple(x.shape)}")
        _check_image_plane(x, tuple(self.sens_maps.shape[-2:]), "image")
        return super().forward(self.maps_like(x) * x)

    def adjoint(self, y: Tensor) -> Tensor:
        self._check_coils(y)
        coil_images = super().adjoint(y)
        return (self.maps_like(coil_images).conj() * coil_images).sum(dim=-3, keepdim=True)

    def _check_coils(self, y: Tensor, source: str | None = None) -> None:
        if y.ndim < 3 or y.shape[-3] != self.num_coils or tuple(y.shape[-2:]) != tuple(self.sens_maps.shape[-2:]):
            raise MeasurementError(
                f"{_where(source or self.source)}k-space shape {tuple(y.shape)} disagrees with sens_maps shape "
                f"{tuple(self.sens_maps.shape)} (coils on axis -3, then H, W)"
            )

    def check_measurement(self, y: Tensor, source: str | None = None) -> None:
        super().check_measurement(y, source)
        self._check_coils(y, source)


class RealImageOperator(LinearOperator):
    """A complex-image operator restricted to real images: A_r x = A x, A_r^H y = Re(A^H y).

    Lets a real (1-channel magnitude) prior use an MRI operator. For real x the k-space is Hermitian,
    so the exact projection onto {real x: A x = y} (least squares when y is not Hermitian) is the
    Hermitian k-space replacement of :class:`nndiff.tasks.data_consistency.RealKSpaceReplacement`."""

    complex_image = False

    def __init__(self, operator: LinearOperator):
        if not operator.complex_image:
            raise TypeError(f"RealImageOperator wraps a complex-image operator, got {type(operator).__name__}")
        self.operator = operator

    def forward(self, x: Tensor) -> Tensor:
        return self.operator.forward(x.to(complex_dtype_of(x)))

    def adjoint(self, y: Tensor) -> Tensor:
        return self.operator.adjoint(y).real

    def check_measurement(self, y: Tensor, source: str | None = None) -> None:
        self.operator.check_measurement(y, source)


# ===================================================================================================
# sensitivity maps
# ===================================================================================================
def _centre_run(line: Tensor) -> tuple[int, int]:
    """[start, stop) of the run of ones containing the centre index of a 1D binary line."""
    n = line.numel()
    c = n // 2
    if not bool(line[c]):
        return c, c
    start, stop = c, c + 1
    while start > 0 and bool(line[start - 1]):
        start -= 1
    while stop < n and bool(line[stop]):
        stop += 1
    return start, stop


def calibration_region(mask: Tensor, kspace_shape: Sequence[int], source: str | None = None) -> tuple[slice, slice]:
    """The fully sampled centred rectangle (autocalibration region) of ``mask`` as (row, column) slices."""
    h, w = int(kspace_shape[-2]), int(kspace_shape[-1])
    full = expand_mask(mask, (h, w), source).expand(h, w).reshape(h, w) > 0
    rows = _centre_run(full[:, w // 2])
    cols = _centre_run(full[h // 2, :])
    region = (slice(*rows), slice(*cols))
    if rows[1] - rows[0] < 2 or cols[1] - cols[0] < 2 or not bool(full[region].all()):
        raise MeasurementError(
            f"{_where(source)}the mask has no fully sampled centre of at least 2 x 2 samples, needed to estimate "
            "coil sensitivities; give sens_maps in the file or sample the k-space centre fully"
        )
    return region


def estimate_sensitivity_maps(
    kspace: Tensor,
    mask: Tensor,
    threshold: float = 0.0,
    window: str = "box",
    source: str | None = None,
) -> Tensor:
    """Coil sensitivities from the fully sampled k-space centre, normalised by their root-sum-of-squares.

    Method (a low-resolution ratio estimate, the initial guess of ESPIRiT-style methods): keep only the
    calibration region of each coil's k-space (:func:`calibration_region`; ``window="hann"`` tapers it
    to reduce ringing), transform to low-resolution coil images I_c, and return
    S_c = I_c / sqrt(sum_c |I_c|^2). Pixels whose RSS is at most ``threshold`` times the maximum get
    S = 0 (background). The maps satisfy sum_c |S_c|^2 = 1 wherever they are non-zero.
    """
    if kspace.ndim < 3:
        raise MeasurementError(f"{_where(source)}multi-coil kspace must be (..., C, H, W), got {tuple(kspace.shape)}")
    check_finite(kspace, "kspace", source)
    rows, cols = calibration_region(mask, kspace.shape, source)
    taper = torch.zeros(kspace.shape[-2:], dtype=kspace.real.dtype, device=kspace.device)
    taper[rows, cols] = _window(rows.stop - rows.start, window, taper)[:, None] * \
        _window(cols.stop - cols.start, window, taper)[None, :]
    low_res = ifft2c(kspace * taper)
    norm = rss(low_res, dim=-3)
    keep = norm > threshold * norm.amax(dim=(-2, -1), keepdim=True)
    keep = keep & (norm > 0)
    return torch.where(keep, low_res / torch.where(keep, norm, torch.ones_like(norm)), torch.zeros_like(low_res))


def _window(n: int, kind: str, like: Tensor) -> Tensor:
    if kind == "box":
        return torch.ones(n, dtype=like.dtype, device=like.device)
    if kind == "hann":
        # periodic-free Hann that stays positive at the region's edges
        k = torch.arange(n, dtype=like.dtype, device=like.device)
        return 0.5 - 0.5 * torch.cos(2 * math.pi * (k + 1) / (n + 1))
    raise MeasurementError(f"unknown calibration window {kind!r}; valid: box, hann")


def sensitivity_combine(coil_images: Tensor, sens_maps: Tensor) -> Tensor:
    """Coil combination sum_c conj(S_c) x_c (keeps the coil axis as size 1); exact for normalised maps."""
    return (sens_maps.to(coil_images.device).conj() * coil_images).sum(dim=-3, keepdim=True)


# ===================================================================================================
# parallel-beam CT
# ===================================================================================================
def parallel_beam_angles(num_views: int, arc: float = math.pi, dtype: torch.dtype = torch.float64) -> Tensor:
    """``num_views`` equally spaced projection angles in [0, arc) (radians); 180 over pi = 1 degree steps."""
    if int(num_views) < 1:
        raise MeasurementError(f"number of CT views must be >= 1, got {num_views}")
    return torch.arange(int(num_views), dtype=dtype) * (arc / int(num_views))


class ParallelBeamCT(LinearOperator):
    """Parallel-beam Radon transform by ray-driven bilinear interpolation, with its exact adjoint.

    The line integral of detector bin s at angle theta is the sum over ``ray_step``-spaced points
    p = s (cos t, sin t) + u (-sin t, cos t) of the bilinearly interpolated image (zero outside), times
    ``ray_step``; pixel centres sit at integer offsets from the image centre ((H-1)/2, (W-1)/2); x is
    the column axis, y the row axis. The interpolation weights of every sample point form a sparse
    matrix that is recomputed per chunk of angles (no stored matrix, so memory stays bounded): the
    forward gathers with it, the adjoint (back-projection) scatters with the same weights, so
    <A x, y> = <x, A^T y> holds to rounding. Both are differentiable torch ops on the input's device.

    Args:
        image_shape: (H, W).
        angles: projection angles in radians (see :func:`parallel_beam_angles`).
        num_detectors: detector bins (default: ceil of the image diagonal, so every pixel is seen).
        detector_spacing: bin width in pixels.
        ray_step: spacing of the points along each ray, in pixels.
        chunk_points: sample points processed at once (bounds the temporary memory).
        cache_points: geometries with at most this many sample points keep their indices and weights
            per (device, dtype) (12 bytes a point; sampling applies A and A^T at every step).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        angles: Tensor | Sequence[float],
        num_detectors: int | None = None,
        detector_spacing: float = 1.0,
        ray_step: float = 1.0,
        chunk_points: int = 1 << 22,
        cache_points: int = 1 << 24,
    ):
        if len(image_shape) != 2 or min(image_shape) < 1:
            raise MeasurementError(f"CT image_shape must be (H, W), got {tuple(image_shape)}")
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.angles = torch.as_tensor(angles, dtype=torch.float64).flatten()
        if self.angles.numel() < 1 or not bool(torch.isfinite(self.angles).all()):
            raise MeasurementError("CT angles must be a non-empty list of finite radians")
        diagonal = math.hypot(*self.image_shape)
        self.num_detectors = int(num_detectors) if num_detectors else int(math.ceil(diagonal / detector_spacing))
        if detector_spacing <= 0 or ray_step <= 0:
            raise MeasurementError("detector_spacing and ray_step must be positive")
        self.detector_spacing = float(detector_spacing)
        self.ray_step = float(ray_step)
        self.num_ray_points = int(math.ceil(diagonal / ray_step)) + 1
        self.chunk_angles = max(1, int(chunk_points) // (self.num_detectors * self.num_ray_points * 4))
        total = self.angles.numel() * self.num_detectors * self.num_ray_points * 4
        self.cached = total <= int(cache_points)
        self._cache: dict[tuple[str, torch.dtype], list[tuple[slice, Tensor, Tensor]]] = {}

    @property
    def sinogram_shape(self) -> tuple[int, int]:
        return (self.angles.numel(), self.num_detectors)

    def _weights(self, angles: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """Flat pixel indices and bilinear weights (n_angles, n_det, n_points * 4) of the ray points."""
        h, w = self.image_shape
        a = angles.to(device)
        s = (torch.arange(self.num_detectors, dtype=torch.float64, device=device)
             - (self.num_detectors - 1) / 2) * self.detector_spacing
        u = (torch.arange(self.num_ray_points, dtype=torch.float64, device=device)
             - (self.num_ray_points - 1) / 2) * self.ray_step
        cos, sin = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
        col = s[None, :, None] * cos - u[None, None, :] * sin + (w - 1) / 2
        row = s[None, :, None] * sin + u[None, None, :] * cos + (h - 1) / 2
        c0, r0 = torch.floor(col), torch.floor(row)
        fc, fr = col - c0, row - r0
        indices, weights = [], []
        for dr, dc, wt in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
            rr, cc = r0 + dr, c0 + dc
            inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            indices.append((rr.clamp(0, h - 1) * w + cc.clamp(0, w - 1)).long())
            weights.append(torch.where(inside, wt, torch.zeros_like(wt)))
        idx = torch.stack(indices, dim=-1).reshape(a.numel(), self.num_detectors, -1)
        wts = torch.stack(weights, dim=-1).reshape(a.numel(), self.num_detectors, -1) * self.ray_step
        return idx, wts

    def _chunks(self, device: torch.device, dtype: torch.dtype) -> list[tuple[slice, Tensor, Tensor]]:
        """(angle slice, indices, weights in ``dtype``) per chunk of angles (cached when small)."""
        key = (str(device), dtype)
        if key in self._cache:
            return self._cache[key]
        n = self.angles.numel()
        chunks = []
        for start in range(0, n, self.chunk_angles):
            part = slice(start, min(start + self.chunk_angles, n))
            idx, wts = self._weights(self.angles[part], device)
            chunks.append((part, idx, wts.to(dtype)))
        if self.cached:
            self._cache[key] = chunks
        return chunks

    def _check_image(self, x: Tensor) -> None:
        if x.is_complex():
            raise MeasurementError("CT images must be real tensors")
        _check_image_plane(x, self.image_shape, "CT image")

    def forward(self, x: Tensor) -> Tensor:
        self._check_image(x)
        lead = x.shape[:-2]
        flat = x.reshape(-1, self.image_shape[0] * self.image_shape[1])
        parts = []
        for _, idx, wts in self._chunks(x.device, x.dtype):
            values = flat[:, idx.flatten()].reshape(flat.shape[0], *idx.shape)
            parts.append((values * wts).sum(dim=-1))
        return torch.cat(parts, dim=1).reshape(*lead, *self.sinogram_shape)

    def adjoint(self, y: Tensor) -> Tensor:
        self.check_measurement(y, check_values=False)
        lead = y.shape[:-2]
        flat = y.reshape(-1, *self.sinogram_shape)
        out = torch.zeros(flat.shape[0], self.image_shape[0] * self.image_shape[1], dtype=y.dtype, device=y.device)
        for part, idx, wts in self._chunks(y.device, y.dtype):
            contributions = flat[:, part, :, None] * wts
            out = out.index_add(1, idx.flatten(), contributions.reshape(flat.shape[0], -1))
        return out.reshape(*lead, *self.image_shape)

    def check_measurement(self, y: Tensor, source: str | None = None, check_values: bool = True) -> None:
        if tuple(y.shape[-2:]) != self.sinogram_shape:
            raise MeasurementError(
                f"{_where(source)}sinogram shape {tuple(y.shape)} disagrees with the geometry: last two axes must be "
                f"(angles, detectors) = {self.sinogram_shape}"
            )
        if check_values:
            check_finite(y, "sinogram", source)

    # ---- filtered back-projection ---------------------------------------------------------------
    def ramp_filter(self, size: int, window: str = "ramp", device=None, dtype=torch.float64) -> Tensor:
        """Frequency response (length ``size``) of the band-limited ramp filter, optionally Hann-windowed.

        Built from the spatial ramp kernel h(0) = 1/(4 d^2), h(n odd) = -1/(pi n d)^2, h(n even) = 0
        (Kak & Slaney, Eq. 3.61), which avoids the DC error of a sampled |f|.
        """
        n = torch.arange(size, device=device, dtype=dtype)
        n = torch.where(n > size // 2, n - size, n)  # signed offsets, circular layout
        d = self.detector_spacing
        kernel = torch.where(n % 2 == 1, -1.0 / (math.pi * n * d) ** 2, torch.zeros_like(n))
        kernel = torch.where(n == 0, torch.full_like(n, 1.0 / (4 * d * d)), kernel)
        response = torch.fft.fft(kernel).real * d
        if window == "hann":
            f = torch.fft.fftfreq(size, device=device, dtype=dtype)  # cycles / sample in [-0.5, 0.5)
            response = response * 0.5 * (1 + torch.cos(2 * math.pi * f))
        elif window != "ramp":
            raise MeasurementError(f"unknown FBP filter {window!r}; valid: ramp, hann")
        return response

    def filter_sinogram(self, y: Tensor, window: str = "ramp") -> Tensor:
        """Ramp-filter every projection along the detector axis (zero-padded: no wrap-around)."""
        size = 1 << int(math.ceil(math.log2(2 * self.num_detectors)))
        response = self.ramp_filter(size, window, y.device).to(y.dtype)
        spectrum = torch.fft.fft(y, n=size, dim=-1) * response
        return torch.fft.ifft(spectrum, dim=-1).real[..., : self.num_detectors].to(y.dtype)

    def fbp(self, y: Tensor, window: str = "ramp") -> Tensor:
        """Filtered back-projection (angles assumed equally spaced over [0, pi)): (pi / n) d A^T(h * y)."""
        self.check_measurement(y)
        scale = math.pi / self.angles.numel() * self.detector_spacing
        return self.adjoint(self.filter_sinogram(y, window)) * scale
