"""Data consistency for reconstruction, as callables for the sampling loop's hooks.

The loop (:func:`nndiff.diffusion.samplers.sample`) offers three places to enforce a measurement
y = A x (``nndiff.tasks.operators``):

==========================  ========================================  =======================================
hook of ``sample()``        callable here                             method
==========================  ========================================  =======================================
``consistency(x0_hat, t)``  :class:`KSpaceReplacement` (MRI),         hard projection of every predicted x0
                            :class:`POCSProjection` (CT, any A)       (DDS / CCDF-style; Score-MRI's replacement)
``consistency_xt(x_t, t)``  the same classes with ``space="xt"``      projection of the sample onto the noised
                                                                      measurement y_t = alpha_t y + sigma_t A z
                                                                      (Song et al. 2022; MCG's projection)
``classifier_grad``         :class:`DPSGuidance`                      grad_x log p(y | x_t) through the network,
                                                                      -||y - A x0_hat(x_t)||^2 (DPS, Chung 2023)
==========================  ========================================  =======================================

:func:`dps_hooks`, :func:`mcg_hooks` and :func:`projection_hooks` return the keyword arguments to
pass to ``sample(...)``. Network tensors are real: for MRI a complex image arrives as (real, imag)
channel pairs and is converted on the fly; the measurement must be in the network's intensity units
(divide k-space / sinogram by the plan's scale-only normalisation factor).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from nndiff.diffusion._tensor import per_sample
from nndiff.diffusion.guidance import ModelFn
from nndiff.diffusion.options import Parameterization, parse_option
from nndiff.diffusion.parameterization import to_x0_eps
from nndiff.diffusion.processes import DiffusionProcess
from nndiff.tasks.operators import (
    LinearOperator,
    MeasurementError,
    MultiCoilMRI,
    ParallelBeamCT,
    RealImageOperator,
    SingleCoilMRI,
    channels_to_complex,
    complex_to_channels,
    fft2c,
    ifft2c,
    make_generator,
    match_precision,
    mirror_kspace,
)

Tensor = torch.Tensor
X0Fn = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------------------
# network layout <-> operator image
# ---------------------------------------------------------------------------------------------------
def to_operator_image(operator: LinearOperator, x: Tensor) -> Tensor:
    """The operator's image from a network tensor (MRI: (real, imag) channel pairs -> complex)."""
    if operator.complex_image and not x.is_complex():
        return channels_to_complex(x)
    return x


def from_operator_image(operator: LinearOperator, z: Tensor, like: Tensor) -> Tensor:
    """Back to the layout and dtype of ``like`` (complex -> channel pairs when ``like`` is real)."""
    if z.is_complex() and not like.is_complex():
        return complex_to_channels(z).to(like.dtype)
    return z.to(like.dtype)


def residual(operator: LinearOperator, measurement: Tensor, x: Tensor) -> Tensor:
    """Relative data-consistency residual ||A x - y|| / ||y|| per sample (x in network or operator layout)."""
    z = to_operator_image(operator, x)
    y = match_precision(measurement, z)
    diff = operator.forward(z) - y
    dims = tuple(range(1, diff.ndim))
    num = torch.linalg.vector_norm(diff, dim=dims)
    den = torch.linalg.vector_norm(y, dim=dims).clamp(min=torch.finfo(num.dtype).tiny)
    return num / den


# ---------------------------------------------------------------------------------------------------
# hard projections
# ---------------------------------------------------------------------------------------------------
class _Projection:
    """Shared parts: measurement validation, x0 / x_t space, the noised measurement y_t.

    ``space="x0"``: the callable is the ``consistency(x0_hat, t)`` hook and always enforces y.
    ``space="xt"``: the ``consistency_xt(x_t, t)`` hook; x_t is projected onto y_t = alpha_t y +
    sigma_t A z (fresh z from ``generator`` each call; ``measurement_noise=False`` uses alpha_t y).
    At the clean time (alpha = 1, sigma = 0) both enforce y itself.
    """

    def __init__(
        self,
        operator: LinearOperator,
        measurement: Tensor,
        *,
        space: str = "x0",
        process: DiffusionProcess | None = None,
        measurement_noise: bool = True,
        generator: torch.Generator | None = None,
        source: str | None = None,
    ):
        operator.check_measurement(measurement, source)
        if space not in ("x0", "xt"):
            raise ValueError(f"space must be 'x0' (consistency hook) or 'xt' (consistency_xt hook), got {space!r}")
        if space == "xt" and process is None:
            raise ValueError("space='xt' needs the diffusion process to noise the measurement to each step's time")
        self.operator = operator
        self.measurement = measurement
        self.space = space
        self.process = process
        self.measurement_noise = measurement_noise
        self.generator = generator

    def _coefficients(self, t: float) -> tuple[float, float]:
        if self.space == "x0" or float(t) <= self.process.t_clean:
            return 1.0, 0.0
        alpha, sigma = self.process.alpha_sigma(float(t))
        return float(alpha), float(sigma)

    def target(self, t: float, z: Tensor) -> Tensor:
        """The measurement the image ``z`` (operator layout) must match at process time ``t``."""
        y = match_precision(self.measurement, z)  # the sample's precision decides; complex stays complex
        alpha, sigma = self._coefficients(t)
        if alpha == 1.0 and sigma == 0.0:
            return y
        y_t = alpha * y
        if self.measurement_noise and sigma > 0:
            noise = torch.randn(z.shape, generator=self.generator, dtype=z.real.dtype, device=self._noise_device())
            if z.is_complex():
                imag = torch.randn(z.shape, generator=self.generator, dtype=z.real.dtype, device=self._noise_device())
                noise = torch.complex(noise, imag)
            y_t = y_t + sigma * self.operator.forward(noise.to(z.device))
        return y_t

    def _noise_device(self) -> torch.device | str:
        return self.generator.device if self.generator is not None else "cpu"

    def __call__(self, x: Tensor, t: float) -> Tensor:
        z = to_operator_image(self.operator, x)
        return from_operator_image(self.operator, self.project(z, self.target(t, z)), x)

    def project(self, z: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class KSpaceReplacement(_Projection):
    """Hard MRI data consistency: measured k-space samples are replaced by the measurement.

    Single coil: k = F x; k[M] = y[M]; x = F^H k, the exact projection onto {M F x = y}
    (Score-MRI, Chung & Ye 2022). Multi-coil: replacement in every coil's k-space of S x, then the
    coils are combined with conj(S) (for maps normalised to sum |S_c|^2 = 1 this is
    x + A^H (y - A x): exact for the measured samples of the coil images, a Landweber step for x).
    """

    def __init__(self, operator: SingleCoilMRI, measurement: Tensor, **kwargs: Any):
        if not isinstance(operator, SingleCoilMRI):
            raise TypeError("KSpaceReplacement needs a SingleCoilMRI or MultiCoilMRI operator; use POCSProjection for CT")
        super().__init__(operator, measurement, **kwargs)

    def project(self, z: Tensor, y: Tensor) -> Tensor:
        op = self.operator
        measured = op.mask.to(z.device) > 0
        if isinstance(op, MultiCoilMRI):
            maps = op.maps_like(z)
            k = torch.where(measured, y, fft2c(maps * z))
            return (maps.conj() * ifft2c(k)).sum(dim=-3, keepdim=True)
        return ifft2c(torch.where(measured, y, fft2c(z)))


class POCSProjection(_Projection):
    """POCS / Landweber data consistency for any operator: x <- x + step A^H (y - A x) / L.

    L (``normaliser``) defaults to ||A||^2 from power iteration (computed on the first call for that
    image shape), so any ``step`` in (0, 2) decreases ||y - A x||; ``iterations`` repeats the step.
    This is the CT projection of the sparse-view methods (Song et al. 2022 use it with the noised y_t).
    """

    def __init__(
        self,
        operator: LinearOperator,
        measurement: Tensor,
        step: float = 1.0,
        iterations: int = 1,
        normaliser: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(operator, measurement, **kwargs)
        if not 0 < step < 2:
            raise ValueError(f"POCS step must be in (0, 2) (relative to 1/||A||^2), got {step}")
        if int(iterations) < 1:
            raise ValueError(f"POCS iterations must be >= 1, got {iterations}")
        self.step = float(step)
        self.iterations = int(iterations)
        self.normaliser = None if normaliser is None else float(normaliser)

    def _normaliser(self, z: Tensor) -> float:
        if self.normaliser is None:
            one = (1,) * (z.ndim - 2) + tuple(z.shape[-2:])  # one image of the batch: A is per sample
            self.normaliser = self.operator.operator_norm_squared(one, device=z.device)
        return self.normaliser

    def project(self, z: Tensor, y: Tensor) -> Tensor:
        scale = self.step / self._normaliser(z)
        for _ in range(self.iterations):
            z = z + scale * self.operator.adjoint(y - self.operator.forward(z))
        return z


class RealKSpaceReplacement(_Projection):
    """Exact hard MRI data consistency for a real (magnitude) prior and a single-coil operator.

    A real image has Hermitian k-space, k(-f) = conj(k(f)), so measuring k(f) also fixes k(-f).
    The projection onto {real x : M F x = y} in the least-squares sense (orthogonal, since F is
    unitary) replaces every measured frequency and its mirror by the mean of the measurements that
    reach it (y(f) and/or conj(y(-f))) and keeps the rest. For Hermitian y (a real object, as in
    simulation) it enforces y exactly; for complex y it is the real image closest to it. A plain
    POCS step x + Re(A^H (y - A x)) only halves the misfit of frequencies whose mirror is unmeasured.
    """

    def __init__(self, operator: RealImageOperator, measurement: Tensor, **kwargs: Any):
        inner = getattr(operator, "operator", None)
        if not isinstance(operator, RealImageOperator) or type(inner) is not SingleCoilMRI:
            raise TypeError("RealKSpaceReplacement needs a RealImageOperator around a SingleCoilMRI operator")
        super().__init__(operator, measurement, **kwargs)

    def project(self, z: Tensor, y: Tensor) -> Tensor:
        mask = self.operator.operator._mask_like(y)  # (.., H, W) in y's real precision, broadcastable
        mask = mask.expand(*mask.shape[:-2], *y.shape[-2:])  # fastMRI (1, W) columns -> (H, W): rows mirror too
        mirrored_mask = mirror_kspace(mask)
        weight = mask + mirrored_mask
        target = (mask * y + mirrored_mask * mirror_kspace(y).conj()) / weight.clamp(min=1)
        k = torch.where(weight > 0, target, fft2c(z.to(y.dtype)))
        return ifft2c(k).real


def hard_projection(operator: LinearOperator, measurement: Tensor, **kwargs: Any) -> _Projection:
    """The default hard data consistency of an operator: k-space replacement (MRI; Hermitian
    replacement for a real prior with a single coil) or POCS (CT, real prior with multi-coil, others)."""
    if isinstance(operator, SingleCoilMRI):
        return KSpaceReplacement(operator, measurement, **kwargs)
    if isinstance(operator, RealImageOperator) and type(operator.operator) is SingleCoilMRI:
        return RealKSpaceReplacement(operator, measurement, **kwargs)
    return POCSProjection(operator, measurement, **kwargs)


# ---------------------------------------------------------------------------------------------------
# gradient (DPS) and MCG
# ---------------------------------------------------------------------------------------------------
def measurement_loss(operator: LinearOperator, measurement: Tensor, x0: Tensor) -> Tensor:
    """||y - A x0||^2 per sample (x0 in network or operator layout), differentiable."""
    z = to_operator_image(operator, x0)
    diff = match_precision(measurement, z) - operator.forward(z)
    return (diff.abs() ** 2).flatten(1).sum(dim=1)


def dps_gradient(x_t: Tensor, x0_fn: X0Fn, operator: LinearOperator, measurement: Tensor,
                 normalise: bool = True) -> Tensor:
    """grad_{x_t} ||y - A x0_fn(x_t)||^2 per sample, through ``x0_fn`` (the network's x0 prediction).

    A pure function cannot reach the network, so the caller passes ``x0_fn(x_t) -> x0_hat`` (any
    differentiable callable; :class:`DPSGuidance` builds it from a model function). With
    ``normalise`` each sample's gradient is divided by ||y - A x0_hat||, DPS's step-size rule
    (zeta_i = zeta / ||y - A x0_hat||, Chung et al. 2023, Alg. 1).
    """
    with torch.enable_grad():
        xg = x_t.detach().requires_grad_(True)
        loss = measurement_loss(operator, measurement, x0_fn(xg))
        (grad,) = torch.autograd.grad(loss.sum(), xg)
    if normalise:
        norm = loss.detach().sqrt().clamp(min=torch.finfo(loss.dtype).tiny)
        grad = grad / per_sample(norm, grad)
    return grad.detach()


class DPSGuidance:
    """DPS likelihood gradient as the sampling loop's ``classifier_grad`` hook.

    Returns grad_x log p(y | x_t) ~= -grad_x ||y - A x0_hat(x_t)||^2 (normalised as in
    :func:`dps_gradient`), where x0_hat comes from ``model_fn`` with autograd; the loop adds
    ``classifier_scale`` times it to the score (eps <- eps - sigma * scale * grad). Costs one extra
    network evaluation with backpropagation per step.
    """

    def __init__(
        self,
        operator: LinearOperator,
        measurement: Tensor,
        model_fn: ModelFn,
        process: DiffusionProcess,
        parameterization: Parameterization | str,
        normalise: bool = True,
        source: str | None = None,
    ):
        operator.check_measurement(measurement, source)
        self.operator = operator
        self.measurement = measurement
        self.model_fn = model_fn
        self.process = process
        self.parameterization = parse_option(Parameterization, parameterization, "parameterization")
        self.normalise = normalise

    def __call__(self, x: Tensor, t_net: Tensor, cond: Any) -> Tensor:
        alpha, sigma = self.process.alpha_sigma_from_model_time(t_net)

        def x0_fn(xg: Tensor) -> Tensor:
            out = self.model_fn(xg, t_net, cond)
            return to_x0_eps(out, xg, alpha.to(xg.device), sigma.to(xg.device), self.parameterization)[0]

        return -dps_gradient(x, x0_fn, self.operator, self.measurement, self.normalise)


def dps_hooks(operator: LinearOperator, measurement: Tensor, model_fn: ModelFn, process: DiffusionProcess,
              parameterization: Parameterization | str, scale: float = 1.0, **kwargs: Any) -> dict[str, Any]:
    """Keyword arguments of ``sample()`` for DPS: the likelihood gradient as classifier guidance."""
    grad = DPSGuidance(operator, measurement, model_fn, process, parameterization, **kwargs)
    return {"classifier_grad": grad, "classifier_scale": float(scale)}


def mcg_hooks(operator: LinearOperator, measurement: Tensor, model_fn: ModelFn, process: DiffusionProcess,
              parameterization: Parameterization | str, scale: float = 1.0,
              generator: torch.Generator | None = None, normalise: bool = True) -> dict[str, Any]:
    """Keyword arguments of ``sample()`` for MCG (Chung et al. 2022): the manifold-constrained gradient
    step (DPS gradient through the network) followed by the projection of every new sample onto the
    noised measurement (``consistency_xt``)."""
    hooks = dps_hooks(operator, measurement, model_fn, process, parameterization, scale, normalise=normalise)
    hooks["consistency_xt"] = hard_projection(operator, measurement, space="xt", process=process, generator=generator)
    return hooks


def projection_hooks(operator: LinearOperator, measurement: Tensor, space: str = "x0",
                     process: DiffusionProcess | None = None, **kwargs: Any) -> dict[str, Any]:
    """Keyword arguments of ``sample()`` for hard data consistency on x0 (default) or on x_t."""
    dc = hard_projection(operator, measurement, space=space, process=process, **kwargs)
    return {"consistency": dc} if space == "x0" else {"consistency_xt": dc}


# ---------------------------------------------------------------------------------------------------
# warm start (come-closer-diffuse-faster)
# ---------------------------------------------------------------------------------------------------
def warm_start_image(operator: LinearOperator, measurement: Tensor, fbp_filter: str = "ramp") -> Tensor:
    """The classical reconstruction in network layout: zero-filled A^H y (MRI; coil-combined with the
    maps for multi-coil) as (real, imag) channels, or the filtered back-projection (CT)."""
    operator.check_measurement(measurement)
    if isinstance(operator, ParallelBeamCT):
        return operator.fbp(measurement, fbp_filter)
    z = operator.adjoint(measurement)
    return complex_to_channels(z) if z.is_complex() else z


def warm_start_state(process: DiffusionProcess, x_init: Tensor, t0: float,
                     noise: Tensor | torch.Generator | int | None = None) -> tuple[float, Tensor]:
    """``(t0, x_t0)`` with x_t0 = alpha(t0) x_init + sigma(t0) noise, ready for ``sample(start_at=...)``.

    ``noise`` is a tensor shaped like ``x_init``, or a generator / int seed to draw it (CCDF: start
    the reverse process from the forwarded classical reconstruction at t0 < T).
    """
    if not process.t_clean < float(t0) <= process.t_max:
        raise ValueError(f"warm-start time t0 must lie in ({process.t_clean:g}, {process.t_max:g}], got {t0}")
    if not isinstance(noise, Tensor):
        g = make_generator(noise)
        noise = torch.randn(x_init.shape, generator=g, dtype=x_init.dtype, device=g.device).to(x_init.device)
    if noise.shape != x_init.shape:
        raise MeasurementError(f"warm-start noise has shape {tuple(noise.shape)}, expected {tuple(x_init.shape)}")
    return float(t0), process.add_noise(x_init, noise.to(x_init.dtype), float(t0))
