"""Noise schedules: discrete VP betas / alphas_cumprod, SNR shifts, VE sigma levels, respacing.

Everything is computed in float64 so that the samplers' coefficients are exact to well below the
1e-5 tolerance the oracle tests use; callers cast to their working dtype at the last moment.

Sources
-------
- linear: Ho et al. 2020 (DDPM), beta in [1e-4, 0.02].
- scaled_linear: Rombach et al. 2022 (latent diffusion), sqrt(beta) linear.
- cosine: Nichol & Dhariwal 2021 (improved DDPM), abar(t) = cos^2((t/T + s)/(1 + s) pi/2), s=0.008,
  betas clipped to ``max_beta`` (0.999) to avoid a singular last step.
- sigmoid: Jabri et al. 2022 / diffusers, beta = sigmoid(linspace(-6, 6)) scaled to [beta_start, beta_end].
- zero terminal SNR: Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed", Alg. 1.
- SNR shift: Hoogeboom et al. 2023 ("simple diffusion") and Chen 2023 ("On the importance of noise
  scheduling"): larger images need more noise at the same t; SNR'(t) = SNR(t) / shift^2.
- geometric sigmas: Song & Ermon 2019 (NCSN), sigma_i geometric between sigma_min and sigma_max.
- respacing (leading / linspace / trailing): Lin et al. 2023, Table 2; identical to diffusers.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from nndiff.diffusion.options import Schedule, TimestepSpacing, parse_option

COSINE_OFFSET = 0.008  # Nichol & Dhariwal's s: keeps beta_0 from being vanishingly small


def make_betas(
    schedule: Schedule | str,
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """Return the ``num_timesteps`` betas (float64) of a discrete variance-preserving schedule.

    ``beta_start``/``beta_end`` apply to linear, scaled_linear and sigmoid; ``max_beta`` clips cosine.
    """
    schedule = parse_option(Schedule, schedule, "schedule")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if schedule is Schedule.LINEAR:
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule is Schedule.SCALED_LINEAR:
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if schedule is Schedule.COSINE:
        return _cosine_betas(num_timesteps, max_beta)
    if schedule is Schedule.SIGMOID:
        ramp = torch.sigmoid(torch.linspace(-6.0, 6.0, num_timesteps, dtype=torch.float64))
        return ramp * (beta_end - beta_start) + beta_start
    raise ValueError(f"schedule {schedule.value!r} defines sigma levels, not betas; use geometric_sigmas()")


def _cosine_betas(num_timesteps: int, max_beta: float) -> torch.Tensor:
    def abar(u: float) -> float:
        return math.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    betas = [
        min(1.0 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s)."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Invert :func:`alphas_cumprod_from_betas` (beta_0 = 1 - abar_0)."""
    abar = alphas_cumprod.to(torch.float64)
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last step has SNR exactly 0 (Lin et al. 2023, Algorithm 1).

    sqrt(abar) is shifted so its last value is 0 and scaled so its first value is unchanged.
    The last alphas_cumprod becomes 0: the network must not predict eps there (use v or x0).
    """
    sqrt_abar = alphas_cumprod_from_betas(betas).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    return betas_from_alphas_cumprod(sqrt_abar**2)


def shift_snr(alphas_cumprod: torch.Tensor, shift: float) -> torch.Tensor:
    """Shift a schedule to a noisier one: SNR'(t) = SNR(t) / shift^2 (log-SNR minus 2 log shift).

    ``shift`` > 1 is what larger images need (the planner sets it from the image size relative to
    a base resolution, as in Hoogeboom et al. 2023); ``shift`` = 1 returns the input unchanged.
    """
    if shift <= 0:
        raise ValueError(f"snr_shift must be > 0, got {shift}")
    abar = alphas_cumprod.to(torch.float64)
    if shift == 1.0:
        return abar.clone()
    # abar' = SNR'/(1 + SNR') with SNR = abar/(1-abar); written without dividing by 1-abar.
    return abar / (abar + shift**2 * (1.0 - abar))


def discrete_vp_alphas_cumprod(
    schedule: Schedule | str,
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    max_beta: float = 0.999,
    snr_shift: float = 1.0,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """alphas_cumprod of a discrete VP process: base betas, then SNR shift, then zero-terminal-SNR."""
    abar = alphas_cumprod_from_betas(make_betas(schedule, num_timesteps, beta_start, beta_end, max_beta))
    abar = shift_snr(abar, snr_shift)
    if zero_terminal_snr:
        abar = alphas_cumprod_from_betas(rescale_zero_terminal_snr(betas_from_alphas_cumprod(abar)))
    return abar


def geometric_sigmas(sigma_min: float, sigma_max: float, num_levels: int) -> torch.Tensor:
    """NCSN noise levels, ascending: exp(linspace(log sigma_min, log sigma_max, num_levels)), float64."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    return torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), num_levels, dtype=torch.float64))


def respace_timesteps(
    num_train_timesteps: int,
    num_steps: int,
    spacing: TimestepSpacing | str = TimestepSpacing.TRAILING,
    steps_offset: int = 0,
) -> torch.Tensor:
    """Pick ``num_steps`` of ``num_train_timesteps`` integer timesteps, descending (int64).

    - leading: 0, k, 2k, ... with k = T // n (+ offset); never reaches T - 1 (Lin et al. 2023).
    - linspace: round(linspace(0, T - 1, n)); contains both 0 and T - 1.
    - trailing: round(arange(T, 0, -T/n)) - 1; starts at T - 1 (recommended).
    """
    spacing = parse_option(TimestepSpacing, spacing, "timestep_spacing")
    T, n = num_train_timesteps, num_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_steps must be in [1, {T}] (num_train_timesteps), got {n}")
    if spacing is TimestepSpacing.LINSPACE:
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif spacing is TimestepSpacing.LEADING:
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
    else:
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    return torch.from_numpy(ts.copy())


def continuous_timesteps(t_start: float, t_end: float, num_steps: int) -> torch.Tensor:
    """Uniform grid from ``t_start`` down to ``t_end`` with ``num_steps`` points (float64), as score_sde."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([t_start], dtype=torch.float64)
    return torch.linspace(t_start, t_end, num_steps, dtype=torch.float64)
