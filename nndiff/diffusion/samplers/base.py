"""Sampler protocol shared by every sampler family (shaped like a diffusers scheduler).

Usage (what :func:`nndiff.diffusion.samplers.sample` does for you)::

    timesteps = sampler.set_timesteps(num_steps)          # model-evaluation schedule
    x = sampler.init_noise(shape, generator=g)
    for t in timesteps:
        out = model(x, process.model_time(t), cond)        # output in the plan's parameterization
        x = sampler.step(out, t, x, generator=g).prev_sample

A sampler walks a descending *grid* of ``n`` process times t_0 > ... > t_{n-1} and then lands on
clean data (alpha = 1, sigma = 0). Samplers that evaluate the model several times per grid point
(Heun, predictor-corrector, annealed Langevin) list the grid time once per evaluation in
``timesteps``, as diffusers' Heun scheduler does; ``step`` keeps an internal cursor, so calls must
follow ``timesteps`` in order (a mismatching ``t`` raises).

All formulas are written in terms of the marginal coefficients (alpha_i, sigma_i) of the grid, so
every sampler runs on every process (discrete VP/VE, VP/sub-VP/VE SDEs) and on 4-D and 5-D tensors.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch

from nndiff.diffusion.noise import GaussianNoise, NoiseFn
from nndiff.diffusion.options import Parameterization, Sampler as SamplerName, TimestepSpacing, parse_option
from nndiff.diffusion.parameterization import DynamicThreshold, clip_x0, dynamic_threshold, to_x0_eps
from nndiff.diffusion.processes import DiffusionProcess

Tensor = torch.Tensor
#: consistency / projection applied to the predicted x0 at process time t: ``hook(x0_hat, t) -> x0_hat``
X0Hook = Callable[[Tensor, float], Tensor]


@dataclass
class StepOutput:
    """Result of one :meth:`Sampler.step`.

    ``prev_sample`` lives at process time ``t_prev`` (``process.t_clean`` after the final step);
    ``pred_x0`` is the x0 prediction used by the step (after clipping and the x0 hook).
    """

    prev_sample: Tensor
    pred_x0: Tensor | None
    t_prev: float


@dataclass
class Prediction:
    """x0 and eps implied by a model output at one grid point.

    ``x0`` is after clipping / thresholding / the x0 hook; ``eps`` is consistent with that ``x0``
    (recomputed from it when it changed); ``eps_model`` is the network's own eps.
    """

    x0: Tensor
    eps: Tensor
    eps_model: Tensor


class Sampler(ABC):
    """Base class: grid handling, model-output conversion, x0 processing, noise draws.

    Args:
        process: the forward process the network was trained with.
        parameterization: what the network outputs (eps, x0, v, score).
        num_steps: default number of grid points (``set_timesteps`` may override).
        timestep_spacing: leading / linspace / trailing respacing of discrete processes.
        clip_x0: ``(low, high)`` range the predicted x0 is clamped to, or ``None``.
        dynamic_threshold: Imagen dynamic thresholding (a :class:`DynamicThreshold` or a percentile);
            it uses ``clip_x0`` as its nominal range ((-1, 1) when ``clip_x0`` is ``None``).
        noise_fn: source of every stochastic draw (Gaussian by default; simplex plugs in here).
    """

    name: ClassVar[SamplerName]
    #: convergence order of the deterministic part (documented, checked by the tests)
    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = False
    #: needs the process' SDE drift and diffusion (continuous-time processes only)
    requires_sde: ClassVar[bool] = False
    #: grid convention: True = diffusers DDPM/DDIM (t = 0 may be a grid point); False = DPM-Solver
    grid_includes_zero: ClassVar[bool] = True
    #: needs alpha > 0 at every grid time (works in the x/alpha coordinates)
    requires_positive_alpha: ClassVar[bool] = False

    def __init__(
        self,
        process: DiffusionProcess,
        parameterization: Parameterization | str = Parameterization.EPS,
        *,
        num_steps: int = 50,
        timestep_spacing: TimestepSpacing | str = TimestepSpacing.TRAILING,
        clip_x0: Sequence[float] | None = None,
        dynamic_threshold: DynamicThreshold | float | None = None,
        noise_fn: NoiseFn | None = None,
    ):
        if not isinstance(process, DiffusionProcess):
            raise TypeError(f"process must be a DiffusionProcess, got {type(process).__name__}")
        if self.requires_sde and not process.is_sde:
            raise ValueError(
                f"sampler {self.name.value!r} integrates an SDE and needs process vp_sde, subvp_sde or "
                f"ve_sde, got {process.kind.value!r}; use 'ddpm' (ancestral) for discrete processes"
            )
        self.process = process
        self.parameterization = parse_option(Parameterization, parameterization, "parameterization")
        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = int(num_steps)
        self.timestep_spacing = parse_option(TimestepSpacing, timestep_spacing, "timestep_spacing")
        self.clip_range = None if clip_x0 is None else tuple(float(v) for v in clip_x0)
        if self.clip_range is not None and (len(self.clip_range) != 2 or not self.clip_range[0] < self.clip_range[1]):
            raise ValueError(f"clip_x0 must be [low, high] with low < high, got {clip_x0}")
        if isinstance(dynamic_threshold, (int, float)):
            dynamic_threshold = DynamicThreshold(percentile=float(dynamic_threshold))
        self.dynamic_threshold = dynamic_threshold
        self.noise_fn: NoiseFn = noise_fn if noise_fn is not None else GaussianNoise()
        self.timesteps: Tensor | None = None
        self._grid: Tensor | None = None
        self._alpha: list[float] = []
        self._sigma: list[float] = []
        self._plan: list[tuple[int, str]] = []
        self._cursor = 0

    # ------------------------------------------------------------------------------------------
    # schedule
    # ------------------------------------------------------------------------------------------
    def set_timesteps(
        self,
        num_steps: int | None = None,
        device: torch.device | str | None = None,
        *,
        timesteps: Sequence[float] | Tensor | None = None,
        t_start: float | None = None,
    ) -> Tensor:
        """Build the grid and return the model-evaluation schedule ``timesteps`` (on ``device``).

        ``timesteps`` gives a custom descending grid; ``t_start`` builds ``num_steps`` points from
        ``t_start`` down (partial diffusion / warm start). Resets the sampler's state.
        """
        if timesteps is not None:
            if num_steps is not None and num_steps != len(timesteps):
                raise ValueError("pass either num_steps or timesteps, not both")
            grid = self._validate_custom_grid(timesteps)
        else:
            n = self.num_steps if num_steps is None else int(num_steps)
            grid = self.process.sampling_timesteps(n, self.timestep_spacing, t_start, self.grid_includes_zero)
        alpha, sigma = self.process.alpha_sigma(grid.to(torch.float64))
        self._grid = grid.cpu()
        self._alpha = [float(a) for a in alpha] + [1.0]
        self._sigma = [float(s) for s in sigma] + [0.0]
        self._check_grid()
        self._plan = self._build_plan(len(grid))
        self.timesteps = torch.stack([self._grid[i] for i, _ in self._plan]).to(device)
        self._cursor = 0
        self._reset_state()
        return self.timesteps

    def _validate_custom_grid(self, timesteps) -> Tensor:
        dtype = torch.int64 if self.process.is_discrete else torch.float64
        grid = torch.as_tensor(timesteps).detach().cpu()
        if self.process.is_discrete:
            if torch.any(grid != grid.round()):
                raise ValueError("custom timesteps of a discrete process must be integers")
        grid = grid.to(dtype).flatten()
        if len(grid) < 1 or torch.any(grid[1:] >= grid[:-1]):
            raise ValueError("custom timesteps must be strictly descending")
        if self.process.is_discrete:
            if grid[-1] < 0 or grid[0] > self.process.t_max:
                raise ValueError(f"custom timesteps must lie in [0, {self.process.t_max:g}]")
        elif grid[-1] <= 0 or grid[0] > 1:
            raise ValueError("custom timesteps of an SDE process must lie in (0, 1]")
        return grid

    def _check_grid(self) -> None:
        sig = self._sigma[:-1]
        if any(s <= 0 for s in sig):
            raise ValueError("every grid time must be noisy (sigma > 0)")
        if self.parameterization in (Parameterization.EPS, Parameterization.SCORE) and any(
            a <= 0 for a in self._alpha
        ):
            raise ValueError(
                "eps/score prediction cannot recover x0 where alpha = 0 (zero terminal SNR); "
                "use the v or x0 parameterization"
            )
        if self.requires_positive_alpha and any(a <= 0 for a in self._alpha):
            raise ValueError(
                f"sampler {self.name.value!r} works in x/alpha coordinates and needs alpha > 0 on the "
                "grid; with zero terminal SNR start one step later or use ddim / dpm_solver_pp_2m"
            )

    def _build_plan(self, n: int) -> list[tuple[int, str]]:
        """One (grid index, phase) entry per model evaluation; default: one per grid point."""
        return [(i, "step") for i in range(n)]

    def _reset_state(self) -> None:
        """Clear multistep / multi-phase state (called by ``set_timesteps``)."""

    @property
    def grid(self) -> Tensor:
        """The distinct grid times t_0 > ... > t_{n-1} (without repetitions)."""
        self._require_timesteps()
        return self._grid

    @property
    def num_grid_points(self) -> int:
        return len(self.grid)

    def grid_time(self, i: int) -> float:
        """Process time of grid index ``i``; ``i = n`` is the clean end (``process.t_clean``)."""
        return self.process.t_clean if i >= len(self._grid) else float(self._grid[i])

    def coefficients(self, i: int) -> tuple[float, float]:
        """(alpha, sigma) at grid index ``i`` (``i = n``: (1, 0))."""
        return self._alpha[i], self._sigma[i]

    def _require_timesteps(self) -> None:
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps() before sampling")

    def init_noise(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Starting sample at the first grid time: sigma(t_0) * noise (zero-mean data assumed)."""
        self._require_timesteps()
        z = self.noise_fn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return self._sigma[0] * z

    # ------------------------------------------------------------------------------------------
    # stepping
    # ------------------------------------------------------------------------------------------
    def step(
        self,
        model_output: Tensor,
        t: Tensor | float,
        x: Tensor,
        generator: torch.Generator | None = None,
        *,
        noise: Tensor | None = None,
        x0_hook: X0Hook | None = None,
    ) -> StepOutput:
        """Advance ``x`` by one model evaluation.

        ``model_output`` is the network output at (x, t) in the sampler's parameterization;
        ``noise`` replaces the draw from ``noise_fn`` (reproduction / tests); ``x0_hook`` is the
        consistency / projection applied to the predicted x0 (``hook(x0_hat, t) -> x0_hat``).
        """
        self._require_timesteps()
        if self._cursor >= len(self._plan):
            raise RuntimeError("all timesteps are consumed; call set_timesteps() to sample again")
        expected = float(self.timesteps[self._cursor])
        given = float(t)
        if not math.isclose(given, expected, rel_tol=1e-9, abs_tol=1e-9):
            raise ValueError(
                f"step() got t={given:g} but the schedule expects t={expected:g} at call "
                f"{self._cursor}; follow sampler.timesteps in order"
            )
        i, phase = self._plan[self._cursor]
        out = self._step(i, phase, model_output, x, generator, noise, x0_hook)
        self._cursor += 1
        return out

    @abstractmethod
    def _step(
        self,
        i: int,
        phase: str,
        model_output: Tensor,
        x: Tensor,
        generator: torch.Generator | None,
        noise: Tensor | None,
        x0_hook: X0Hook | None,
    ) -> StepOutput:
        """One evaluation at grid index ``i`` in ``phase`` (see ``_build_plan``)."""

    # ------------------------------------------------------------------------------------------
    # shared helpers
    # ------------------------------------------------------------------------------------------
    def process_x0(self, x0: Tensor) -> Tensor:
        """Clip or dynamically threshold a predicted x0 as configured."""
        if self.dynamic_threshold is not None:
            return dynamic_threshold(x0, self.clip_range or (-1.0, 1.0), self.dynamic_threshold)
        if self.clip_range is not None:
            return clip_x0(x0, self.clip_range)
        return x0

    def predict(self, model_output: Tensor, x: Tensor, i: int, x0_hook: X0Hook | None = None) -> Prediction:
        """Convert the model output at grid index ``i`` to (x0, eps), applying clipping and the hook."""
        alpha, sigma = self._alpha[i], self._sigma[i]
        x0, eps = to_x0_eps(model_output, x, alpha, sigma, self.parameterization)
        processed = self.process_x0(x0)
        if x0_hook is not None:
            processed = x0_hook(processed, self.grid_time(i))
        if processed is x0:
            return Prediction(x0, eps, eps)
        return Prediction(processed, (x - alpha * processed) / sigma, eps)

    def draw_noise(self, like: Tensor, generator: torch.Generator | None, noise: Tensor | None) -> Tensor:
        """A standard-noise tensor shaped like ``like`` from ``noise_fn`` (or the given ``noise``)."""
        if noise is not None:
            if noise.shape != like.shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(like.shape)}")
            return noise.to(dtype=like.dtype, device=like.device)
        return self.noise_fn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(process={self.process.kind.value}, "
            f"parameterization={self.parameterization.value}, num_steps={self.num_steps})"
        )


def ancestral_step(
    x: Tensor,
    x0: Tensor,
    coef_t: tuple[float, float],
    coef_s: tuple[float, float],
    variance: str,
) -> tuple[Tensor, float]:
    """Mean and std of the ancestral step x_t -> x_s (s less noisy) for a Gaussian process.

    The forward transition is x_t = a x_s + sqrt(v) z with a = alpha_t/alpha_s and
    v = sigma_t^2 - a^2 sigma_s^2; the posterior q(x_s | x_t, x0) has mean
    (a sigma_s^2 / sigma_t^2) x_t + (alpha_s v / sigma_t^2) x0 and variance v sigma_s^2 / sigma_t^2
    ("fixed_small"); "fixed_large" uses v (DDPM's beta_t; for VE this is the SMLD / reverse-diffusion
    predictor). No noise is added on the last step to clean data.
    """
    (alpha_t, sigma_t), (alpha_s, sigma_s) = coef_t, coef_s
    a = alpha_t / alpha_s
    v = max(sigma_t**2 - a**2 * sigma_s**2, 0.0)
    mean = (a * sigma_s**2 / sigma_t**2) * x + (alpha_s * v / sigma_t**2) * x0
    if sigma_s == 0.0:
        return mean, 0.0
    var = v * sigma_s**2 / sigma_t**2 if variance == "fixed_small" else v
    return mean, math.sqrt(var)
