"""Probability-flow ODE with Heun's method (Karras et al. 2022, "Elucidating the design space", Alg. 1).

The PF-ODE of any Gaussian process (Song et al. 2021, Eq. 13) reads, in the coordinates
y = x / alpha and s = sigma / alpha, dy/ds = eps_hat(x, t) (Karras et al. 2022, Sec. 4). Heun's
second-order step evaluates the slope at both ends of [s_i, s_{i+1}]; the final step to s = 0 is
Euler (which returns x0_hat). With ``second_order=False`` it is Euler's method, which is
diffusers' ``EulerDiscreteScheduler`` (and DDIM with eta = 0); with Heun it matches
``HeunDiscreteScheduler``. Model evaluations: 2 n - 1 for n grid points.
"""
from __future__ import annotations

from nndiff.diffusion.options import Sampler as SamplerName
from nndiff.diffusion.samplers.base import Sampler, StepOutput


class PFODEHeunSampler(Sampler):
    """Heun (default) or Euler (``second_order=False``) on the probability-flow ODE."""

    name = SamplerName.PF_ODE_HEUN
    order = 2
    requires_positive_alpha = True

    def __init__(self, process, parameterization="eps", *, second_order: bool = True, **kwargs):
        super().__init__(process, parameterization, **kwargs)
        self.second_order = bool(second_order)
        if not self.second_order:
            self.order = 1

    def _build_plan(self, n):
        plan = [(0, "euler")]
        for i in range(1, n):
            if self.second_order:
                plan.append((i, "correct"))
            plan.append((i, "euler"))
        return plan

    def _reset_state(self):
        self._saved = None  # (y_i, slope_i, i) between the Euler and the correction evaluation

    def _scaled_sigma(self, i: int) -> float:
        alpha, sigma = self.coefficients(i)
        return sigma / alpha

    def _step(self, i, phase, model_output, x, generator, noise, x0_hook):
        alpha = self.coefficients(i)[0]
        pred = self.predict(model_output, x, i, x0_hook)
        slope = pred.eps  # dy/ds with y = x / alpha, s = sigma / alpha
        if phase == "correct":
            y_prev, slope_prev, i_prev = self._saved
            self._saved = None
            ds = self._scaled_sigma(i) - self._scaled_sigma(i_prev)
            y = y_prev + ds * 0.5 * (slope_prev + slope)
            return StepOutput(alpha * y, pred.x0, self.grid_time(i))
        y = x / alpha
        j = i + 1
        y_next = y + (self._scaled_sigma(j) - self._scaled_sigma(i)) * slope
        if self.second_order and j < self.num_grid_points:
            self._saved = (y, slope, i)
        return StepOutput(self.coefficients(j)[0] * y_next, pred.x0, self.grid_time(j))
