"""What the network predicts (eps, x0, v, score), conversions between them, and x0 clipping.

For a Gaussian marginal ``x = alpha x0 + sigma eps`` (any process in :mod:`processes`):

- eps   (Ho et al. 2020):           x0 = (x - sigma eps) / alpha
- x0    (Ramesh et al. 2022, "sample"):  eps = (x - alpha x0) / sigma
- v     (Salimans & Ho 2022): with r = sqrt(alpha^2 + sigma^2), a = alpha/r, s = sigma/r,
        v = a eps - s x0;  x0 = a x/r - s v;  eps = s x/r + a v.
        For VP processes r = 1 and this is the usual v = alpha eps - sigma x0; for VE/sub-VP it is
        the same definition on the VP-normalised sample x/r (so v stays O(1) at every noise level).
- score (Song & Ermon 2019, Vincent 2011): s = grad log p_t(x) = -eps / sigma.

x0 clipping to a configurable range and dynamic thresholding (Saharia et al. 2022, Imagen) are
applied to the predicted x0 by the samplers; the range is the data range the plan normalised to
(``clip_x0`` in the plans JSON), not a hard-coded [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nndiff.diffusion._tensor import per_sample
from nndiff.diffusion.options import Parameterization, parse_option

Tensor = torch.Tensor
Coef = Tensor | float


def _b(c: Coef, x: Tensor) -> Tensor | float:
    """Broadcast a per-sample coefficient against ``x`` (Python floats pass through)."""
    if isinstance(c, (float, int)):
        return float(c)
    return per_sample(c, x)


def _normalised(alpha: Coef, sigma: Coef, x: Tensor):
    a, s = _b(alpha, x), _b(sigma, x)
    r = (a * a + s * s) ** 0.5
    return a / r, s / r, r


def to_x0_eps(
    model_output: Tensor, x: Tensor, alpha: Coef, sigma: Coef, parameterization: Parameterization | str
) -> tuple[Tensor, Tensor]:
    """Return (x0, eps) implied by a network output in ``parameterization`` at noisy sample ``x``."""
    p = parse_option(Parameterization, parameterization, "parameterization")
    a, s = _b(alpha, x), _b(sigma, x)
    if p is Parameterization.EPS:
        eps = model_output
        return (x - s * eps) / a, eps
    if p is Parameterization.X0:
        x0 = model_output
        return x0, (x - a * x0) / s
    if p is Parameterization.V:
        an, sn, r = _normalised(alpha, sigma, x)
        xn = x / r
        return an * xn - sn * model_output, sn * xn + an * model_output
    eps = -s * model_output  # score
    return (x - s * eps) / a, eps


def from_x0_eps(
    x0: Tensor, eps: Tensor, alpha: Coef, sigma: Coef, parameterization: Parameterization | str
) -> Tensor:
    """The network output (or training target) in ``parameterization`` for given x0 and eps."""
    p = parse_option(Parameterization, parameterization, "parameterization")
    if p is Parameterization.EPS:
        return eps
    if p is Parameterization.X0:
        return x0
    if p is Parameterization.V:
        an, sn, _ = _normalised(alpha, sigma, x0)
        return an * eps - sn * x0
    return -eps / _b(sigma, eps)


def training_target(
    parameterization: Parameterization | str, x0: Tensor, noise: Tensor, alpha: Coef, sigma: Coef
) -> Tensor:
    """Regression target for a network trained in ``parameterization`` (noise is the eps used)."""
    return from_x0_eps(x0, noise, alpha, sigma, parameterization)


def convert(
    model_output: Tensor,
    x: Tensor,
    alpha: Coef,
    sigma: Coef,
    source: Parameterization | str,
    target: Parameterization | str,
) -> Tensor:
    """Re-express a network output from one parameterization in another."""
    x0, eps = to_x0_eps(model_output, x, alpha, sigma, source)
    return from_x0_eps(x0, eps, alpha, sigma, target)


def score_from_output(model_output: Tensor, x: Tensor, alpha: Coef, sigma: Coef, parameterization) -> Tensor:
    """grad_x log p_t(x) implied by the network output."""
    if parse_option(Parameterization, parameterization) is Parameterization.SCORE:
        return model_output
    _, eps = to_x0_eps(model_output, x, alpha, sigma, parameterization)
    return -eps / _b(sigma, x)


# ---------------------------------------------------------------------------------------------------
# x0 clipping and dynamic thresholding
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DynamicThreshold:
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3), on a configurable range.

    Per sample, s = the ``percentile`` quantile of |u| with u = x0 mapped affinely so that the
    range becomes [-1, 1]; s is clamped to [1, ``max_value``]; u is clipped to [-s, s] and divided
    by s, then mapped back. With ``max_value`` = 1 this is plain clipping (diffusers' default).
    """

    percentile: float = 0.995
    max_value: float | None = None

    def __post_init__(self):
        if not 0 < self.percentile <= 1:
            raise ValueError(f"dynamic threshold percentile must be in (0, 1], got {self.percentile}")
        if self.max_value is not None and self.max_value < 1:
            raise ValueError(f"dynamic threshold max_value must be >= 1, got {self.max_value}")


def clip_x0(x0: Tensor, value_range: tuple[float, float]) -> Tensor:
    """Clamp x0 to ``value_range`` = (low, high)."""
    lo, hi = _check_range(value_range)
    return x0.clamp(lo, hi)


def dynamic_threshold(x0: Tensor, value_range: tuple[float, float], threshold: DynamicThreshold) -> Tensor:
    """Apply :class:`DynamicThreshold` to x0 whose nominal range is ``value_range``."""
    lo, hi = _check_range(value_range)
    centre, half = (hi + lo) / 2, (hi - lo) / 2
    u = (x0 - centre) / half
    flat = u.reshape(u.shape[0], -1)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(work.abs(), threshold.percentile, dim=1)
    s = s.clamp(min=1.0, max=threshold.max_value) if threshold.max_value is not None else s.clamp(min=1.0)
    s = s.to(u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
    u = torch.maximum(torch.minimum(u, s), -s) / s
    return centre + half * u


def _check_range(value_range) -> tuple[float, float]:
    lo, hi = (float(v) for v in value_range)
    if not lo < hi:
        raise ValueError(f"x0 range must satisfy low < high, got {value_range}")
    return lo, hi
