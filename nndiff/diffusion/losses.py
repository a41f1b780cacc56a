"""Training loss: MSE on the chosen target with uniform, min-SNR-gamma or sigma^2 weighting,
and optional importance sampling of t.

Weightings are defined by the weight they put on the x0 error. With MSE_target = c * MSE_x0
(c = 1 for x0, SNR for eps, SNR + 1 for v, SNR / sigma^2 for score), the weight applied to the
target-space MSE is:

- uniform:        1 (plain MSE on the target; Ho et al. 2020 "simple" loss for eps)
- min_snr:        min(SNR, gamma) / c  (Hang et al. 2023, "Efficient diffusion training via min-SNR
                  weighting"; gamma = 5; for eps min(SNR, gamma)/SNR, for v min(SNR, gamma)/(SNR + 1))
- sigma_squared:  SNR / c, i.e. NCSN's lambda(sigma) = sigma^2 on the score loss (Song & Ermon 2019),
                  which equals the uniform eps loss

Importance sampling (Nichol & Dhariwal 2021, Sec. 3.3): t is drawn with probability proportional to
sqrt(E[L_t^2]) over a history of recent losses (after a uniform warm-up) and each loss is multiplied
by 1 / (K p(bin)) so the objective stays unbiased.
"""
from __future__ import annotations

import torch

from nndiff.diffusion.options import LossWeighting, Parameterization, parse_option
from nndiff.diffusion.parameterization import training_target
from nndiff.diffusion.processes import DiffusionProcess

Tensor = torch.Tensor


def target_scale(parameterization: Parameterization | str, alpha: Tensor, sigma: Tensor) -> Tensor:
    """c(t) with MSE_target = c * MSE_x0 for ``parameterization``."""
    p = parse_option(Parameterization, parameterization, "parameterization")
    snr = alpha**2 / sigma**2
    if p is Parameterization.X0:
        return torch.ones_like(snr)
    if p is Parameterization.EPS:
        return snr
    if p is Parameterization.V:
        return snr + 1.0
    return snr / sigma**2


def loss_weight(
    weighting: LossWeighting | str,
    parameterization: Parameterization | str,
    alpha: Tensor,
    sigma: Tensor,
    min_snr_gamma: float = 5.0,
) -> Tensor:
    """Per-sample weight (float64) on the target-space MSE (see the module docstring)."""
    w = parse_option(LossWeighting, weighting, "loss_weighting")
    alpha, sigma = alpha.to(torch.float64), sigma.to(torch.float64)
    if w is LossWeighting.UNIFORM:
        return torch.ones_like(alpha)
    snr = alpha**2 / sigma**2
    c = target_scale(parameterization, alpha, sigma)
    if w is LossWeighting.MIN_SNR:
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        return torch.clamp(snr, max=min_snr_gamma) / c
    return snr / c


def diffusion_loss(
    model_output: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    process: DiffusionProcess,
    parameterization: Parameterization | str,
    weighting: LossWeighting | str = LossWeighting.UNIFORM,
    *,
    min_snr_gamma: float = 5.0,
    sample_weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Weighted MSE between ``model_output`` and the target for (x0, noise, t).

    ``x_t = process.add_noise(x0, noise, t)`` is what the network saw; ``sample_weights`` (e.g. the
    importance weights) multiply the per-sample losses; ``reduction``: "mean" or "none" (per sample).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; valid values: mean, none")
    alpha, sigma = process.alpha_sigma(t.to(x0.device))
    target = training_target(parameterization, x0, noise, alpha, sigma)
    per = (model_output - target).pow(2).reshape(x0.shape[0], -1).mean(dim=1)
    w = loss_weight(weighting, parameterization, alpha, sigma, min_snr_gamma).to(per.dtype)
    per = per * w
    if sample_weights is not None:
        per = per * sample_weights.to(per.dtype)
    return per.mean() if reduction == "mean" else per


class ImportanceTimeSampler:
    """Loss-aware sampling of training times (Nichol & Dhariwal 2021, LossSecondMomentResampler).

    Times are grouped in ``num_bins`` bins (discrete processes: one bin per timestep). Until every
    bin holds ``history`` losses, times are uniform; afterwards p(bin) ~ sqrt(mean(L^2)) mixed with
    ``uniform_prob`` of the uniform law. ``sample`` returns (t, weights) with weights = 1/(K p(bin)).
    """

    def __init__(self, process: DiffusionProcess, num_bins: int | None = None, history: int = 10, uniform_prob: float = 1e-3):
        self.process = process
        self.num_bins = process.num_train_timesteps if process.is_discrete else int(num_bins or 100)
        if self.num_bins < 1 or history < 1 or not 0 <= uniform_prob <= 1:
            raise ValueError("num_bins, history must be >= 1 and uniform_prob in [0, 1]")
        self.history = history
        self.uniform_prob = uniform_prob
        self._losses = torch.zeros(self.num_bins, history, dtype=torch.float64)
        self._counts = torch.zeros(self.num_bins, dtype=torch.long)

    def state_dict(self) -> dict[str, Tensor]:
        """The loss history, for checkpoints (a resumed run samples times as an uninterrupted one)."""
        return {"losses": self._losses.clone(), "counts": self._counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._losses.copy_(state["losses"])
        self._counts.copy_(state["counts"])

    @property
    def warmed_up(self) -> bool:
        return bool((self._counts >= self.history).all())

    def probabilities(self) -> Tensor:
        """Current p(bin) (uniform during warm-up)."""
        if not self.warmed_up:
            return torch.full((self.num_bins,), 1.0 / self.num_bins, dtype=torch.float64)
        p = self._losses.pow(2).mean(dim=1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_bins

    def sample(self, batch: int, generator: torch.Generator | None = None, device=None) -> tuple[Tensor, Tensor]:
        """Draw ``batch`` times and their importance weights."""
        gen_device = generator.device if generator is not None else None
        p = self.probabilities()
        bins = torch.multinomial(p.to(gen_device), batch, replacement=True, generator=generator)
        weights = 1.0 / (self.num_bins * p.to(bins.device)[bins])
        if self.process.is_discrete:
            t = bins
        else:
            u = torch.rand(batch, generator=generator, device=bins.device, dtype=torch.float64)
            lo = self.process.train_eps
            width = (1.0 - lo) / self.num_bins
            t = lo + (bins.to(torch.float64) + u) * width
        return t.to(device), weights.to(device)

    def _bin(self, t: Tensor) -> Tensor:
        if self.process.is_discrete:
            return t.round().long().cpu()
        lo = self.process.train_eps
        return ((t.double().cpu() - lo) / ((1.0 - lo) / self.num_bins)).long().clamp(0, self.num_bins - 1)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-sample (unweighted) losses for the times they were computed at."""
        for b, loss in zip(self._bin(t).tolist(), losses.detach().double().cpu().tolist()):
            if self._counts[b] < self.history:
                self._losses[b, self._counts[b]] = loss
            else:
                self._losses[b] = torch.roll(self._losses[b], -1)
                self._losses[b, -1] = loss
            self._counts[b] += 1
