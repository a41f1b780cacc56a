"""Forward (noising) processes: discrete VP (DDPM), discrete VE (NCSN) and the VP / sub-VP / VE SDEs.

Every process has a Gaussian marginal ``x_t = alpha(t) x0 + sigma(t) eps`` (Kingma et al. 2021,
"Variational diffusion models"), so every sampler is written once in terms of (alpha, sigma) and runs
on every process. The processes differ in their time variable, their table of (alpha, sigma), what the
network receives as time input, and (SDEs only) the drift f(t) and diffusion g(t)^2.

Time variable and network time input (``model_time``)
-----------------------------------------------------
===============  ======================================  =============================================
process          process time t                          network time input (float per sample)
===============  ======================================  =============================================
vp_discrete      integer 0 .. T-1                        t (as float, 0 .. T-1), as DDPM
ve_discrete      integer level 0 .. N-1 (sigma ascending) log(sigma_t) (NCSN++ conditions on log sigma)
vp_sde/subvp_sde continuous t in [eps, 1]                (T-1) * t, score_sde's DDPM-compatible scale
ve_sde           continuous t in [eps, 1]                log(sigma(t))
===============  ======================================  =============================================

The clean state is ``t_clean`` (-1 for discrete processes, 0 for SDEs) with alpha = 1, sigma = 0.

Sources: Ho et al. 2020 (DDPM); Song & Ermon 2019 (NCSN); Song et al. 2021, "Score-based generative
modeling through stochastic differential equations" (VP / sub-VP / VE SDEs, Eqs. 9, 11, 30-34).
"""
from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod

import torch

from nndiff.diffusion._tensor import per_sample
from nndiff.diffusion.options import Process, Schedule, TimestepSpacing, parse_option
from nndiff.diffusion.schedules import (
    continuous_timesteps,
    discrete_vp_alphas_cumprod,
    geometric_sigmas,
    respace_timesteps,
)

Tensor = torch.Tensor
logger = logging.getLogger(__name__)


class DiffusionProcess(ABC):
    """A forward process with Gaussian marginals ``x_t = alpha(t) x0 + sigma(t) eps``."""

    kind: Process
    is_discrete: bool
    is_sde: bool = False
    t_clean: float
    #: number of training timesteps / noise levels (SDEs: the scale of the network time input)
    num_train_timesteps: int

    # ---- marginals -----------------------------------------------------------------------------
    @abstractmethod
    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Marginal coefficients (float64, shape of ``t``) at process time ``t``."""

    def snr(self, t: Tensor | float) -> Tensor:
        """Signal-to-noise ratio alpha^2 / sigma^2 (float64)."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha**2 / sigma**2

    @property
    @abstractmethod
    def t_max(self) -> float:
        """The noisiest time (start of sampling from the prior)."""

    @property
    @abstractmethod
    def t_min(self) -> float:
        """The least noisy time a sampling grid visits before the final jump to clean data."""

    # ---- network interface ---------------------------------------------------------------------
    @abstractmethod
    def model_time(self, t: Tensor | float, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float the network is conditioned on at process time ``t`` (see the module table)."""

    @abstractmethod
    def alpha_sigma_from_model_time(self, t_net: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha, sigma) from the network time input; used by wrappers that only see ``t_net``."""

    # ---- training --------------------------------------------------------------------------------
    @abstractmethod
    def sample_t(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """Training times, uniform over the process' time domain (int64 discrete, float64 continuous)."""

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """Forward marginal sample ``alpha(t) x0 + sigma(t) noise`` (t: scalar or per sample)."""
        alpha, sigma = self.alpha_sigma(torch.as_tensor(t, device=x0.device))
        return per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * noise

    # ---- sampling --------------------------------------------------------------------------------
    @abstractmethod
    def sampling_timesteps(
        self,
        num_steps: int,
        spacing: TimestepSpacing | str = TimestepSpacing.TRAILING,
        t_start: float | None = None,
        include_zero: bool = True,
    ) -> Tensor:
        """Descending grid of ``num_steps`` model-evaluation times, from ``t_start`` (default: the
        spacing's own start) towards ``t_min``. ``include_zero=False`` is DPM-Solver's convention
        (n + 1 points, the last one dropped because the final step lands on clean data)."""

    def prior_std(self, t: float | None = None) -> float:
        """Standard deviation of the noise a sample starts from at ``t`` (default ``t_max``): sigma(t).

        For VP processes this is ~1 (N(0, I) prior), for VE processes sigma_max (score_sde)."""
        _, sigma = self.alpha_sigma(self.t_max if t is None else t)
        return float(sigma)

    def sde(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Drift coefficient f(t) and squared diffusion g(t)^2 of dx = f(t) x dt + g(t) dw."""
        raise NotImplementedError(
            f"process {self.kind.value!r} is discrete and has no SDE; use vp_sde, subvp_sde or ve_sde"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.num_train_timesteps})"


# ===================================================================================================
# discrete processes
# ===================================================================================================
class _DiscreteProcess(DiffusionProcess):
    is_discrete = True
    t_clean = -1.0

    def __init__(self, alphas: Tensor, sigmas: Tensor):
        self._alphas = alphas.to(torch.float64)
        self._sigmas = sigmas.to(torch.float64)
        self.num_train_timesteps = int(alphas.shape[0])

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    @property
    def t_min(self) -> float:
        return 0.0

    def _index(self, t: Tensor | float) -> Tensor:
        tt = torch.as_tensor(t, dtype=torch.float64)
        idx = tt.round().long()
        if torch.any((tt - idx).abs() > 1e-6) or torch.any(idx < -1) or torch.any(idx >= self.num_train_timesteps):
            raise ValueError(
                f"{self.kind.value} times must be integers in [-1, {self.num_train_timesteps - 1}] "
                f"(-1 = clean), got {tt.flatten()[:8].tolist()}"
            )
        return idx

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        idx = self._index(t)
        device = idx.device
        clean = idx < 0
        safe = idx.clamp(min=0)
        alpha = torch.where(clean, 1.0, self._alphas.to(device)[safe])
        sigma = torch.where(clean, 0.0, self._sigmas.to(device)[safe])
        return alpha, sigma

    def sample_t(self, batch, generator=None, device=None):
        if generator is not None and device is None:
            device = generator.device
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=device)

    def sampling_timesteps(self, num_steps, spacing=TimestepSpacing.TRAILING, t_start=None, include_zero=True):
        spacing = parse_option(TimestepSpacing, spacing, "timestep_spacing")
        if t_start is None:
            span = self.num_train_timesteps
        else:
            span = int(self._index(t_start)) + 1
            if span < 1:
                raise ValueError("t_start must be a noisy time (>= 0)")
            # A warm start at t0 has only t0 + 1 integer times below it: a plan asking for more steps
            # (e.g. DDPM with all 1000) means "every timestep", so use them all.
            limit = span if include_zero or spacing is TimestepSpacing.TRAILING else span - 1
            if num_steps > limit:
                logger.debug("warm start at t=%d: %d steps requested, using all %d", span - 1, num_steps, limit)
                num_steps = limit
        if not include_zero and spacing is not TimestepSpacing.TRAILING:
            if num_steps + 1 > span:
                raise ValueError(f"num_steps must be <= {span - 1} for this grid, got {num_steps}")
            ts = respace_timesteps(span, num_steps + 1, spacing)[:-1]
        else:
            ts = respace_timesteps(span, num_steps, spacing)
        if t_start is not None and spacing is TimestepSpacing.LEADING:
            # 'leading' never starts at the top of its range; a warm start must begin at t_start exactly.
            ts = ts + (span - 1 - int(ts[0]))
        return ts


class DiscreteVP(_DiscreteProcess):
    """DDPM's discrete variance-preserving process: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)."""

    kind = Process.VP_DISCRETE

    def __init__(self, alphas_cumprod: Tensor):
        abar = alphas_cumprod.to(torch.float64)
        if torch.any(abar < 0) or torch.any(abar >= 1) or torch.any(abar[1:] > abar[:-1]):
            raise ValueError("alphas_cumprod must be non-increasing and in [0, 1)")
        self.alphas_cumprod = abar
        super().__init__(abar.sqrt(), (1.0 - abar).sqrt())

    @classmethod
    def from_schedule(
        cls,
        schedule: Schedule | str = Schedule.LINEAR,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        max_beta: float = 0.999,
        snr_shift: float = 1.0,
        zero_terminal_snr: bool = False,
    ) -> "DiscreteVP":
        """Build from a named beta schedule (see :mod:`nndiff.diffusion.schedules`)."""
        abar = discrete_vp_alphas_cumprod(
            schedule, num_train_timesteps, beta_start, beta_end, max_beta, snr_shift, zero_terminal_snr
        )
        return cls(abar)

    @property
    def betas(self) -> Tensor:
        abar = self.alphas_cumprod
        return 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])

    def model_time(self, t, dtype=torch.float32):
        return self._index(t).to(dtype)

    def alpha_sigma_from_model_time(self, t_net):
        return self.alpha_sigma(t_net.to(torch.float64).round())


class DiscreteVE(_DiscreteProcess):
    """NCSN's discrete variance-exploding process: x_i = x0 + sigma_i z with ascending sigma levels."""

    kind = Process.VE_DISCRETE

    def __init__(self, sigmas: Tensor):
        s = sigmas.to(torch.float64)
        if torch.any(s <= 0) or torch.any(s[1:] <= s[:-1]):
            raise ValueError("VE sigma levels must be positive and strictly ascending")
        self.sigmas = s
        super().__init__(torch.ones_like(s), s)

    @classmethod
    def geometric(cls, sigma_min: float = 0.01, sigma_max: float = 50.0, num_levels: int = 1000) -> "DiscreteVE":
        """Geometric levels between ``sigma_min`` and ``sigma_max`` (Song & Ermon 2019/2020)."""
        return cls(geometric_sigmas(sigma_min, sigma_max, num_levels))

    def model_time(self, t, dtype=torch.float32):
        _, sigma = self.alpha_sigma(t)
        return sigma.log().to(dtype)

    def alpha_sigma_from_model_time(self, t_net):
        sigma = t_net.to(torch.float64).exp()
        return torch.ones_like(sigma), sigma


# ===================================================================================================
# continuous-time SDEs (Song et al. 2021)
# ===================================================================================================
class _SDEProcess(DiffusionProcess):
    is_discrete = False
    is_sde = True
    t_clean = 0.0

    def __init__(self, num_train_timesteps: int, sampling_eps: float, train_eps: float):
        if not 0 < sampling_eps < 1 or not 0 < train_eps < 1:
            raise ValueError("sampling_eps and train_eps must be in (0, 1)")
        self.num_train_timesteps = int(num_train_timesteps)
        self.sampling_eps = float(sampling_eps)
        self.train_eps = float(train_eps)

    @property
    def t_max(self) -> float:
        return 1.0

    @property
    def t_min(self) -> float:
        return self.sampling_eps

    @staticmethod
    def _time(t: Tensor | float) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float64)

    def sample_t(self, batch, generator=None, device=None):
        if generator is not None and device is None:
            device = generator.device
        u = torch.rand((batch,), generator=generator, device=device, dtype=torch.float64)
        return self.train_eps + (1.0 - self.train_eps) * u

    def sampling_timesteps(self, num_steps, spacing=TimestepSpacing.TRAILING, t_start=None, include_zero=True):
        # The continuous grid is uniform in t (score_sde); the spacing names only matter for discrete T.
        parse_option(TimestepSpacing, spacing, "timestep_spacing")
        start = 1.0 if t_start is None else float(t_start)
        if not self.sampling_eps <= start <= 1.0:
            raise ValueError(f"t_start must be in [{self.sampling_eps}, 1], got {start}")
        return continuous_timesteps(start, self.sampling_eps, num_steps)


class _VPLikeSDE(_SDEProcess):
    def __init__(self, beta_min=0.1, beta_max=20.0, num_train_timesteps=1000, sampling_eps=1e-3, train_eps=1e-5):
        super().__init__(num_train_timesteps, sampling_eps, train_eps)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t: Tensor | float) -> Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + self._time(t) * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor | float) -> Tensor:
        """log alpha(t) = -1/2 int_0^t beta = -t^2 (beta_max - beta_min)/4 - t beta_min/2."""
        t = self._time(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def model_time(self, t, dtype=torch.float32):
        return ((self.num_train_timesteps - 1) * self._time(t)).to(dtype)

    def alpha_sigma_from_model_time(self, t_net):
        return self.alpha_sigma(t_net.to(torch.float64) / (self.num_train_timesteps - 1))


class VPSDE(_VPLikeSDE):
    """VP SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw; alpha = exp(log_alpha), sigma^2 = 1 - alpha^2."""

    kind = Process.VP_SDE

    def alpha_sigma(self, t):
        la = self.log_alpha(t)
        return la.exp(), (-torch.expm1(2 * la)).clamp(min=0).sqrt()

    def sde(self, t):
        beta = self.beta(t)
        return -0.5 * beta, beta


class SubVPSDE(_VPLikeSDE):
    """sub-VP SDE: same drift, g^2 = beta(t) (1 - alpha^4); sigma = 1 - alpha^2 (Song et al. 2021 Eq. 11)."""

    kind = Process.SUBVP_SDE

    def alpha_sigma(self, t):
        la = self.log_alpha(t)
        return la.exp(), -torch.expm1(2 * la)

    def sde(self, t):
        beta = self.beta(t)
        return -0.5 * beta, beta * (-torch.expm1(4 * self.log_alpha(t)))


class VESDE(_SDEProcess):
    """VE SDE dx = sqrt(d sigma^2/dt) dw with sigma(t) = sigma_min (sigma_max/sigma_min)^t; alpha = 1.

    As in score_sde the marginal std is sigma(t) itself (the data are taken to carry sigma_min of
    noise already); t = 0 is the clean state (sigma = 0) that the final denoising step lands on.
    """

    kind = Process.VE_SDE

    def __init__(self, sigma_min=0.01, sigma_max=50.0, num_train_timesteps=1000, sampling_eps=1e-5, train_eps=1e-5):
        super().__init__(num_train_timesteps, sampling_eps, train_eps)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sigma(self, t: Tensor | float) -> Tensor:
        t = self._time(t)
        s = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        return torch.where(t <= 0, torch.zeros_like(s), s)

    def alpha_sigma(self, t):
        sigma = self.sigma(t)
        return torch.ones_like(sigma), sigma

    def sde(self, t):
        sigma = self.sigma(t)
        return torch.zeros_like(sigma), sigma**2 * (2 * math.log(self.sigma_max / self.sigma_min))

    def model_time(self, t, dtype=torch.float32):
        return self.sigma(t).log().to(dtype)

    def alpha_sigma_from_model_time(self, t_net):
        sigma = t_net.to(torch.float64).exp()
        return torch.ones_like(sigma), sigma


PROCESSES: dict[Process, type[DiffusionProcess]] = {
    Process.VP_DISCRETE: DiscreteVP,
    Process.VE_DISCRETE: DiscreteVE,
    Process.VP_SDE: VPSDE,
    Process.SUBVP_SDE: SubVPSDE,
    Process.VE_SDE: VESDE,
}
