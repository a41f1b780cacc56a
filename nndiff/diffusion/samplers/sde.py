"""Reverse-SDE samplers: Euler-Maruyama and predictor-corrector (Song et al. 2021, Sec. 4, Alg. 2-3).

Reverse SDE (Anderson 1982): dx = [f(t) x - g(t)^2 grad log p_t(x)] dt + g(t) dw_bar.

- Euler-Maruyama, from grid time t_i to t_{i+1} (dt = t_i - t_{i+1} > 0):
  x <- x - [f x - g^2 s] dt + g sqrt(dt) z.   Needs an SDE process (f, g analytic).
- Predictor-corrector: at every grid time, ``corrector_steps`` Langevin corrector steps
  x <- x + e s + sqrt(2 e) z with e = 2 a (snr ||z|| / ||s||)^2 (score_sde's LangevinCorrector;
  a = alpha_t^2 / alpha_{t - 1 training step}^2, i.e. 1 - beta_t for VP, 1 for VE), then one
  predictor step: "ancestral" (the reverse-diffusion / SMLD step, any process; this is diffusers'
  ``ScoreSdeVeScheduler``), "euler_maruyama" (SDE processes) or "none" (corrector only).

Both end with the denoising step of score_sde / Jolicoeur-Martineau et al. 2021: from the last
grid time straight to x0_hat (Tweedie's formula x0 = (x + sigma^2 s) / alpha), no noise.
"""
from __future__ import annotations

import math

import torch

from nndiff.diffusion.options import Sampler as SamplerName
from nndiff.diffusion.samplers.base import Sampler, StepOutput, ancestral_step

PREDICTORS = ("ancestral", "euler_maruyama", "none")
CORRECTOR_NORMS = ("batch", "sample")


def _euler_maruyama(sampler: Sampler, x, pred, i, z):
    """x_{i+1} from x_i by one Euler-Maruyama step of the reverse SDE (z = None: drift only)."""
    t, t_next = sampler.grid_time(i), sampler.grid_time(i + 1)
    dt = t - t_next
    f, g2 = (float(v) for v in sampler.process.sde(t))
    score = -pred.eps / sampler.coefficients(i)[1]
    mean = x - (f * x - g2 * score) * dt
    return mean if z is None else mean + math.sqrt(g2 * dt) * z


class EulerMaruyamaSampler(Sampler):
    """Euler-Maruyama on the reverse SDE of vp_sde / subvp_sde / ve_sde (weak order 1)."""

    name = SamplerName.EULER_MARUYAMA
    stochastic = True
    requires_sde = True

    def _step(self, i, phase, model_output, x, generator, noise, x0_hook):
        pred = self.predict(model_output, x, i, x0_hook)
        if i + 1 >= self.num_grid_points:
            return StepOutput(pred.x0, pred.x0, self.grid_time(i + 1))
        prev = _euler_maruyama(self, x, pred, i, self.draw_noise(x, generator, noise))
        return StepOutput(prev, pred.x0, self.grid_time(i + 1))


class PredictorCorrectorSampler(Sampler):
    """Predictor-corrector sampling with a Langevin corrector at a target signal-to-noise ratio.

    Extra arguments: ``predictor`` (ancestral | euler_maruyama | none), ``snr`` (score_sde: 0.16 for
    VE, 0.01 for VP), ``corrector_steps`` per grid time, ``corrector_norm``: "batch" averages the
    gradient and noise norms over the batch as score_sde and diffusers do, "sample" keeps samples
    independent.
    """

    name = SamplerName.PREDICTOR_CORRECTOR
    stochastic = True

    def __init__(
        self,
        process,
        parameterization="eps",
        *,
        predictor: str = "ancestral",
        snr: float = 0.16,
        corrector_steps: int = 1,
        corrector_norm: str = "batch",
        **kwargs,
    ):
        super().__init__(process, parameterization, **kwargs)
        if predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {predictor!r}; valid values: {', '.join(PREDICTORS)}")
        if predictor == "euler_maruyama" and not process.is_sde:
            raise ValueError("predictor 'euler_maruyama' needs an SDE process; use 'ancestral'")
        if corrector_norm not in CORRECTOR_NORMS:
            raise ValueError(f"unknown corrector_norm {corrector_norm!r}; valid values: {', '.join(CORRECTOR_NORMS)}")
        if snr <= 0 or int(corrector_steps) < 0:
            raise ValueError("snr must be > 0 and corrector_steps >= 0")
        self.predictor = predictor
        self.snr = float(snr)
        self.corrector_steps = int(corrector_steps)
        self.corrector_norm = corrector_norm

    def _build_plan(self, n):
        plan = []
        for i in range(n):
            plan += [(i, "correct")] * self.corrector_steps + [(i, "predict")]
        return plan

    def _corrector_alpha(self, i: int) -> float:
        """score_sde's per-step alpha_i: 1 - beta_i on the training discretisation (1 for VE)."""
        t = self.grid_time(i)
        dt = 1.0 if self.process.is_discrete else 1.0 / self.process.num_train_timesteps
        t_before = max(t - dt, self.process.t_clean)
        alpha_now = float(self.process.alpha_sigma(t)[0])
        alpha_before = float(self.process.alpha_sigma(t_before)[0])
        return (alpha_now / alpha_before) ** 2

    def _norm(self, v: torch.Tensor) -> torch.Tensor:
        norms = v.reshape(v.shape[0], -1).norm(dim=-1)
        if self.corrector_norm == "batch":
            return norms.mean().expand(v.shape[0])
        return norms

    def _step(self, i, phase, model_output, x, generator, noise, x0_hook):
        pred = self.predict(model_output, x, i, x0_hook)
        last = i + 1 >= self.num_grid_points
        if phase == "correct":
            z = self.draw_noise(x, generator, noise)
            score = -pred.eps / self.coefficients(i)[1]
            ratio = self.snr * self._norm(z) / self._norm(score)
            step = (2.0 * self._corrector_alpha(i)) * ratio**2
            step = step.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            return StepOutput(x + step * score + (2.0 * step).sqrt() * z, pred.x0, self.grid_time(i))
        if last:
            return StepOutput(pred.x0, pred.x0, self.grid_time(i + 1))
        if self.predictor == "ancestral":
            mean, std = ancestral_step(x, pred.x0, self.coefficients(i), self.coefficients(i + 1), "fixed_large")
            prev = mean + std * self.draw_noise(x, generator, noise)
        elif self.predictor == "euler_maruyama":
            prev = _euler_maruyama(self, x, pred, i, self.draw_noise(x, generator, noise))
        else:  # corrector only: carry x to the next level (a rescale, identity for VE)
            prev = (self.coefficients(i + 1)[0] / self.coefficients(i)[0]) * x
        return StepOutput(prev, pred.x0, self.grid_time(i + 1))
