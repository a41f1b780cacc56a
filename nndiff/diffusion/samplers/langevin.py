"""Annealed Langevin dynamics (Song & Ermon 2019, NCSN, Alg. 1) with the final denoising step
(Song & Ermon 2020, NCSNv2; Jolicoeur-Martineau et al. 2021).

For each grid level i (noisiest first), ``steps_per_level`` Langevin steps
x <- x + (e_i / 2) s(x, t_i) + sqrt(e_i) z with e_i = step_lr * sigma_i^2 / sigma_last^2, then
x <- (alpha_{i+1} / alpha_i) x to move to the next level (identity for VE, where NCSN was defined).
A last model evaluation at the final level returns x0_hat (Tweedie). Model evaluations:
n * steps_per_level + 1.
"""
from __future__ import annotations

import math

from nndiff.diffusion.options import Sampler as SamplerName
from nndiff.diffusion.samplers.base import Sampler, StepOutput


class AnnealedLangevinSampler(Sampler):
    """Annealed Langevin dynamics. Extra arguments: ``steps_per_level`` (NCSN: 100) and
    ``step_lr`` (NCSN: 2e-5 for sigma_last = 0.01)."""

    name = SamplerName.ANNEALED_LANGEVIN
    stochastic = True

    def __init__(self, process, parameterization="eps", *, steps_per_level: int = 100, step_lr: float = 2e-5, **kwargs):
        super().__init__(process, parameterization, **kwargs)
        if int(steps_per_level) < 1 or step_lr <= 0:
            raise ValueError("steps_per_level must be >= 1 and step_lr > 0")
        self.steps_per_level = int(steps_per_level)
        self.step_lr = float(step_lr)

    def _build_plan(self, n):
        plan = []
        for i in range(n):
            plan += [(i, f"langevin{k}") for k in range(self.steps_per_level)]
        return plan + [(n - 1, "denoise")]

    def _step(self, i, phase, model_output, x, generator, noise, x0_hook):
        pred = self.predict(model_output, x, i, x0_hook)
        n = self.num_grid_points
        if phase == "denoise":
            return StepOutput(pred.x0, pred.x0, self.grid_time(n))
        alpha, sigma = self.coefficients(i)
        e = self.step_lr * (sigma / self.coefficients(n - 1)[1]) ** 2
        score = -pred.eps / sigma
        x = x + (0.5 * e) * score + math.sqrt(e) * self.draw_noise(x, generator, noise)
        last_at_level = phase == f"langevin{self.steps_per_level - 1}"
        if last_at_level and i + 1 < n:
            return StepOutput((self.coefficients(i + 1)[0] / alpha) * x, pred.x0, self.grid_time(i + 1))
        return StepOutput(x, pred.x0, self.grid_time(i))
