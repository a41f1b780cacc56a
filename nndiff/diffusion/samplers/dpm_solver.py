"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022, "DPM-Solver++", Alg. 2; Sec. 5 for SDE-DPM-Solver++).

Multistep second-order solver of the data-prediction ODE in lambda = log(alpha/sigma) with
h = lambda_s - lambda_t:

  ODE: x_s = (sigma_s/sigma_t) x_t - alpha_s (e^{-h} - 1) (D0 + D1/2)
  SDE: x_s = (sigma_s/sigma_t) e^{-h} x_t + alpha_s (1 - e^{-2h}) (D0 + D1/2) + sigma_s sqrt(1 - e^{-2h}) z

with D0 = x0_hat(t), D1 = (x0_hat(t) - x0_hat(t_prev)) / r, r = h_prev / h ("midpoint" form).
The first step and the final jump to clean data (sigma = 0: x = x0_hat) are first order, as in
diffusers' ``DPMSolverMultistepScheduler`` (algorithm_type dpmsolver++ / sde-dpmsolver++,
final_sigmas_type "zero"), which this matches, grid included.
"""
from __future__ import annotations

import math

import torch

from nndiff.diffusion.options import Sampler as SamplerName
from nndiff.diffusion.samplers.base import Sampler, StepOutput


def _log_snr_half(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma); -inf where alpha = 0 (zero terminal SNR)."""
    return -math.inf if alpha == 0.0 else math.log(alpha) - math.log(sigma)


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M), deterministic (``sde = False``) or SDE-DPM-Solver++(2M)."""

    name = SamplerName.DPM_SOLVER_PP_2M
    order = 2
    grid_includes_zero = False
    sde = False
    stochastic = False

    def _reset_state(self):
        self._prev_x0: torch.Tensor | None = None
        self._prev_lambda: float | None = None

    def _step(self, i, phase, model_output, x, generator, noise, x0_hook):
        pred = self.predict(model_output, x, i, x0_hook)
        alpha_t, sigma_t = self.coefficients(i)
        alpha_s, sigma_s = self.coefficients(i + 1)
        lam_t = _log_snr_half(alpha_t, sigma_t)
        noise_draw = self.draw_noise(x, generator, noise) if self.sde else None  # drawn every step, as diffusers
        if sigma_s == 0.0:
            prev = pred.x0  # both variants land exactly on x0_hat
        else:
            lam_s = _log_snr_half(alpha_s, sigma_s)
            h = lam_s - lam_t
            d = pred.x0
            if self._prev_x0 is not None and math.isfinite(h):
                r = (lam_t - self._prev_lambda) / h
                if math.isfinite(r) and r > 0:
                    d = pred.x0 + (0.5 / r) * (pred.x0 - self._prev_x0)
            prev = self._update(x, d, alpha_s, sigma_t, sigma_s, h, noise_draw)
        self._prev_x0, self._prev_lambda = pred.x0, lam_t
        return StepOutput(prev, pred.x0, self.grid_time(i + 1))

    def _update(self, x, d, alpha_s, sigma_t, sigma_s, h, z):
        e = math.exp(-h)
        if not self.sde:
            return (sigma_s / sigma_t) * x + alpha_s * (1.0 - e) * d
        return (sigma_s / sigma_t * e) * x + alpha_s * (1.0 - e * e) * d + sigma_s * math.sqrt(1.0 - e * e) * z


class DPMSolverPP2MSDESampler(DPMSolverPP2MSampler):
    """SDE-DPM-Solver++(2M) (stochastic; first-order strong, samples the right law)."""

    name = SamplerName.DPM_SOLVER_PP_2M_SDE
    order = 1
    sde = True
    stochastic = True
