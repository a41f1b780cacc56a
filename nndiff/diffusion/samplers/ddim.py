"""DDIM (Song, Meng & Ermon 2021) with eta, on any Gaussian process, and DDIM inversion.

x_s = alpha_s x0_hat + sqrt(sigma_s^2 - std^2) eps_hat + std z,  std = eta * sqrt(posterior variance).
eta = 0 is the deterministic sampler (first-order solver of the probability-flow ODE in the
coordinates x/alpha, sigma/alpha; Karras et al. 2022), eta = 1 matches DDPM's fixed_small law.
Matches diffusers' ``DDIMScheduler`` (set_alpha_to_one=True) whenever its fixed stride T // n equals
the grid spacing; we always step to the next grid point (also for linspace and non-divisible n).

Inversion (x0 -> x_t encoding) walks the grid backwards, see :func:`nndiff.diffusion.samplers.invert`:
the explicit step evaluates the model at the target time with the current (less noisy) sample
(first-order error), the fixed-point step solves x_t = DDIM^{-1}(x_s) exactly by iteration
(Pan et al. 2023, "Effective real image editing with accelerated iterative diffusion inversion").
"""
from __future__ import annotations

import math

import torch

from nndiff.diffusion.options import Sampler as SamplerName
from nndiff.diffusion.parameterization import to_x0_eps
from nndiff.diffusion.samplers.base import Sampler, StepOutput, X0Hook

Tensor = torch.Tensor


class DDIMSampler(Sampler):
    """DDIM. Extra arguments: ``eta`` (0 = deterministic) and ``use_clipped_model_output``
    (recompute eps from the clipped / projected x0 for the direction term; diffusers' default False,
    as in DDS data-consistency sampling)."""

    name = SamplerName.DDIM

    def __init__(self, process, parameterization="eps", *, eta: float = 0.0, use_clipped_model_output: bool = False, **kwargs):
        super().__init__(process, parameterization, **kwargs)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.use_clipped_model_output = bool(use_clipped_model_output)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    def _std(self, i: int, j: int) -> float:
        (alpha_t, sigma_t), (alpha_s, sigma_s) = self.coefficients(i), self.coefficients(j)
        a = alpha_t / alpha_s
        posterior_var = max(sigma_t**2 - a**2 * sigma_s**2, 0.0) * sigma_s**2 / sigma_t**2
        return self.eta * math.sqrt(posterior_var)

    def transition(
        self, model_output: Tensor, x: Tensor, i: int, j: int, x0_hook: X0Hook | None = None, std: float = 0.0
    ) -> tuple[Tensor, Tensor]:
        """Mean of the DDIM move from grid index ``i`` to ``j`` (> i), and the x0 used."""
        pred = self.predict(model_output, x, i, x0_hook)
        eps = pred.eps if self.use_clipped_model_output else pred.eps_model
        alpha_s, sigma_s = self.coefficients(j)
        direction = math.sqrt(max(sigma_s**2 - std**2, 0.0))
        return alpha_s * pred.x0 + direction * eps, pred.x0

    def _step(self, i, phase, model_output, x, generator, noise, x0_hook):
        std = self._std(i, i + 1)
        prev, x0 = self.transition(model_output, x, i, i + 1, x0_hook, std)
        if self.eta > 0:  # diffusers draws whenever eta > 0 (std is 0 on the last step)
            prev = prev + std * self.draw_noise(x, generator, noise)
        return StepOutput(prev, x0, self.grid_time(i + 1))

    # ------------------------------------------------------------------------------------------
    # inversion helpers (used by samplers.driver.invert)
    # ------------------------------------------------------------------------------------------
    def explicit_inversion_step(self, model_output: Tensor, x_s: Tensor, j: int, i: int) -> Tensor:
        """x at grid index ``i`` from x at the less noisy index ``j`` (= i + 1, or n for clean data).

        ``model_output`` is the network evaluated at (x_s, t_i): the usual approximation that the
        sample barely moves within one step; its error is first order in the step size.
        """
        alpha_t, sigma_t = self.coefficients(i)
        alpha_s, sigma_s = self.coefficients(j)
        _, eps = to_x0_eps(model_output, x_s, alpha_t, sigma_t, self.parameterization)
        x0 = (x_s - sigma_s * eps) / alpha_s
        return alpha_t * x0 + sigma_t * eps

    def fixed_point_update(self, model_output: Tensor, x_t: Tensor, x_s: Tensor, i: int, j: int) -> Tensor:
        """One fixed-point iteration for x_t with DDIM(x_t: i -> j) = x_s.

        x_t <- x_t - (alpha_t / alpha_s) (DDIM(x_t) - x_s): for the plain DDIM step this is exactly
        x_t = (alpha_t/alpha_s) x_s + (sigma_t - alpha_t sigma_s / alpha_s) eps(x_t), and it stays
        consistent with clipping because it goes through the sampler's own transition.
        """
        forward, _ = self.transition(model_output, x_t, i, j)
        return x_t - (self.coefficients(i)[0] / self.coefficients(j)[0]) * (forward - x_s)
