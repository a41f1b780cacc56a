"""DDPM ancestral sampling (Ho et al. 2020), on any Gaussian process.

x_s ~ N(posterior mean(x_t, x0_hat), var) with var = the posterior variance beta_tilde ("fixed_small")
or the forward transition variance beta_t ("fixed_large"); see :func:`base.ancestral_step`. On a VE
process "fixed_large" is Song & Ermon's SMLD ancestral step, identical to score_sde's reverse-diffusion
predictor and diffusers' ``ScoreSdeVeScheduler.step_pred``. Matches diffusers' ``DDPMScheduler``.
"""
from __future__ import annotations

from nndiff.diffusion.options import Sampler as SamplerName, VarianceType, parse_option
from nndiff.diffusion.samplers.base import Sampler, StepOutput, ancestral_step


class DDPMSampler(Sampler):
    """Ancestral sampler. Extra argument: ``variance_type`` (fixed_small | fixed_large)."""

    name = SamplerName.DDPM
    stochastic = True

    def __init__(self, process, parameterization="eps", *, variance_type=VarianceType.FIXED_SMALL, **kwargs):
        super().__init__(process, parameterization, **kwargs)
        self.variance_type = parse_option(VarianceType, variance_type, "variance_type")

    def _step(self, i, phase, model_output, x, generator, noise, x0_hook):
        pred = self.predict(model_output, x, i, x0_hook)
        mean, std = ancestral_step(x, pred.x0, self.coefficients(i), self.coefficients(i + 1), self.variance_type.value)
        if i + 1 < self.num_grid_points:  # no noise on the jump to clean data (diffusers: t > 0)
            mean = mean + std * self.draw_noise(x, generator, noise)
        return StepOutput(mean, pred.x0, self.grid_time(i + 1))
