"""The ``diffusion`` block of a plans configuration: keys, defaults, validation and factories.

The planner writes exactly these keys (documentation/diffusion.md lists them with their meaning);
:func:`build_process`, :func:`build_sampler` and :func:`build_noise` turn the block into objects.
Unknown keys and unknown option names raise :class:`nndiff.errors.PlansError` naming the valid ones.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from nndiff.diffusion.noise import NoiseFn, make_noise
from nndiff.diffusion.options import (
    Guidance,
    LossWeighting,
    NoiseType,
    Parameterization,
    Process,
    Sampler as SamplerName,
    Schedule,
    TimestepSpacing,
    parse_option,
)
from nndiff.diffusion.parameterization import DynamicThreshold
from nndiff.diffusion.processes import VESDE, DiffusionProcess, DiscreteVE, DiscreteVP, SubVPSDE, VPSDE
from nndiff.diffusion.samplers import Sampler, sampler_class
from nndiff.errors import PlansError

#: schedules each process accepts (the first one is the default)
PROCESS_SCHEDULES: dict[Process, tuple[Schedule, ...]] = {
    Process.VP_DISCRETE: (Schedule.COSINE, Schedule.LINEAR, Schedule.SCALED_LINEAR, Schedule.SIGMOID),
    Process.VE_DISCRETE: (Schedule.GEOMETRIC,),
    Process.VP_SDE: (Schedule.LINEAR,),
    Process.SUBVP_SDE: (Schedule.LINEAR,),
    Process.VE_SDE: (Schedule.GEOMETRIC,),
}


@dataclass(frozen=True)
class DiffusionConfig:
    """Validated ``diffusion`` block. ``None`` for process-dependent defaults (see ``resolved``)."""

    process: Process = Process.VP_DISCRETE
    num_train_timesteps: int = 1000
    schedule: Schedule | None = None
    beta_start: float = 1e-4
    beta_end: float = 0.02
    max_beta: float = 0.999
    zero_terminal_snr: bool = False
    snr_shift: float = 1.0
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    beta_min: float = 0.1
    beta_max: float = 20.0
    sampling_eps: float | None = None
    train_eps: float = 1e-5
    parameterization: Parameterization = Parameterization.EPS
    loss_weighting: LossWeighting = LossWeighting.UNIFORM
    min_snr_gamma: float = 5.0
    importance_sampling: bool = False
    noise_type: NoiseType = NoiseType.GAUSSIAN
    noise_params: dict = field(default_factory=dict)
    sampler: SamplerName = SamplerName.DDIM
    num_sampling_steps: int = 50
    timestep_spacing: TimestepSpacing = TimestepSpacing.TRAILING
    clip_x0: tuple[float, float] | None = None
    dynamic_threshold: float | dict | None = None
    sampler_options: dict = field(default_factory=dict)
    guidance: Guidance = Guidance.NONE
    guidance_scale: float = 1.0
    condition_dropout: float = 0.0

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | "DiffusionConfig") -> "DiffusionConfig":
        """Parse and validate a plans ``diffusion`` block (missing keys take their defaults)."""
        if isinstance(block, DiffusionConfig):
            return block
        if not isinstance(block, Mapping):
            raise PlansError(f"the diffusion block must be a JSON object, got {type(block).__name__}")
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(block) - valid)
        if unknown:
            raise PlansError(f"diffusion: unknown key(s) {unknown}; valid keys: {', '.join(sorted(valid))}")
        values = dict(block)
        enums = {
            "process": Process,
            "schedule": Schedule,
            "parameterization": Parameterization,
            "loss_weighting": LossWeighting,
            "noise_type": NoiseType,
            "sampler": SamplerName,
            "timestep_spacing": TimestepSpacing,
            "guidance": Guidance,
        }
        for key, enum in enums.items():
            if values.get(key) is not None:
                try:
                    values[key] = parse_option(enum, values[key], key)
                except ValueError as err:
                    raise PlansError(f"diffusion.{key}: {err}") from None
        if values.get("clip_x0") is not None:
            clip = values["clip_x0"]
            if not isinstance(clip, (list, tuple)) or len(clip) != 2 or not float(clip[0]) < float(clip[1]):
                raise PlansError(f"diffusion.clip_x0 must be null or [low, high] with low < high, got {clip!r}")
            values["clip_x0"] = (float(clip[0]), float(clip[1]))
        for key in ("noise_params", "sampler_options"):
            if values.get(key) is None:
                values[key] = {}
            elif not isinstance(values[key], Mapping):
                raise PlansError(f"diffusion.{key} must be a JSON object")
            values[key] = dict(values[key])
        cfg = cls(**values)
        cfg._check()
        return cfg

    def _check(self) -> None:
        allowed = PROCESS_SCHEDULES[self.process]
        if self.schedule is not None and self.schedule not in allowed:
            raise PlansError(
                f"diffusion.schedule {self.schedule.value!r} does not fit process {self.process.value!r}; "
                f"valid: {', '.join(s.value for s in allowed)}"
            )
        if self.snr_shift != 1.0 and self.process is not Process.VP_DISCRETE:
            raise PlansError("diffusion.snr_shift applies to vp_discrete only (VE: scale sigma_max instead)")
        if self.zero_terminal_snr and self.process is not Process.VP_DISCRETE:
            raise PlansError("diffusion.zero_terminal_snr applies to vp_discrete only")
        if self.zero_terminal_snr and self.parameterization in (Parameterization.EPS, Parameterization.SCORE):
            raise PlansError(
                "diffusion.zero_terminal_snr needs parameterization v or x0 (eps cannot recover x0 at SNR 0)"
            )
        if self.num_train_timesteps < 1 or self.num_sampling_steps < 1:
            raise PlansError("diffusion.num_train_timesteps and num_sampling_steps must be >= 1")
        if self.process in (Process.VP_DISCRETE, Process.VE_DISCRETE) and self.num_sampling_steps > self.num_train_timesteps:
            raise PlansError("diffusion.num_sampling_steps must be <= num_train_timesteps for discrete processes")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise PlansError("diffusion.condition_dropout must be in [0, 1)")
        if self.min_snr_gamma <= 0:
            raise PlansError("diffusion.min_snr_gamma must be > 0")
        try:
            self.threshold
        except (TypeError, ValueError) as err:
            raise PlansError(f"diffusion.dynamic_threshold: {err}") from None

    @property
    def threshold(self) -> DynamicThreshold | None:
        """``dynamic_threshold`` as an object (a number is the percentile)."""
        d = self.dynamic_threshold
        if d is None:
            return None
        return DynamicThreshold(**d) if isinstance(d, Mapping) else DynamicThreshold(percentile=float(d))

    @property
    def resolved_schedule(self) -> Schedule:
        return self.schedule or PROCESS_SCHEDULES[self.process][0]

    def to_dict(self) -> dict:
        """JSON-ready dict (option names as strings)."""
        out = asdict(self)
        for key, value in out.items():
            if hasattr(value, "value"):
                out[key] = value.value
        out["clip_x0"] = list(self.clip_x0) if self.clip_x0 is not None else None
        return out


def build_process(diffusion_cfg: Mapping[str, Any] | DiffusionConfig) -> DiffusionProcess:
    """The forward process described by a plans ``diffusion`` block."""
    cfg = DiffusionConfig.from_dict(diffusion_cfg)
    try:
        if cfg.process is Process.VP_DISCRETE:
            return DiscreteVP.from_schedule(
                cfg.resolved_schedule,
                cfg.num_train_timesteps,
                cfg.beta_start,
                cfg.beta_end,
                cfg.max_beta,
                cfg.snr_shift,
                cfg.zero_terminal_snr,
            )
        if cfg.process is Process.VE_DISCRETE:
            return DiscreteVE.geometric(cfg.sigma_min, cfg.sigma_max, cfg.num_train_timesteps)
        if cfg.process is Process.VE_SDE:
            return VESDE(cfg.sigma_min, cfg.sigma_max, cfg.num_train_timesteps, cfg.sampling_eps or 1e-5, cfg.train_eps)
        cls = VPSDE if cfg.process is Process.VP_SDE else SubVPSDE
        return cls(cfg.beta_min, cfg.beta_max, cfg.num_train_timesteps, cfg.sampling_eps or 1e-3, cfg.train_eps)
    except ValueError as err:
        raise PlansError(f"diffusion: {err}") from None


def build_noise(diffusion_cfg: Mapping[str, Any] | DiffusionConfig) -> NoiseFn:
    """The noise source (``noise_type`` + ``noise_params``) for training and sampling."""
    cfg = DiffusionConfig.from_dict(diffusion_cfg)
    try:
        return make_noise(cfg.noise_type, **cfg.noise_params)
    except (ValueError, TypeError) as err:
        raise PlansError(f"diffusion.noise_params: {err}") from None


def build_sampler(
    diffusion_cfg: Mapping[str, Any] | DiffusionConfig,
    sampler: str | SamplerName | None = None,
    num_steps: int | None = None,
    *,
    process: DiffusionProcess | None = None,
    noise_fn: NoiseFn | None = None,
    **overrides: Any,
) -> Sampler:
    """A sampler configured from the block; ``sampler`` / ``num_steps`` / ``overrides`` (sampler
    options such as ``eta``) override the plan, e.g. for a predictor run with another sampler.

    ``sampler_options`` from the block apply only when the plan's own sampler is used.
    """
    cfg = DiffusionConfig.from_dict(diffusion_cfg)
    try:
        name = cfg.sampler if sampler is None else parse_option(SamplerName, sampler, "sampler")
    except ValueError as err:
        raise PlansError(str(err)) from None
    cls = sampler_class(name)
    options = dict(cfg.sampler_options) if name == cfg.sampler else {}
    options.update(overrides)
    accepted = _accepted_options(cls)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise PlansError(
            f"diffusion.sampler_options: unknown option(s) {unknown} for sampler {name.value!r}; "
            f"valid: {', '.join(sorted(accepted)) or '(none)'}"
        )
    try:
        return cls(
            process if process is not None else build_process(cfg),
            cfg.parameterization,
            num_steps=num_steps or cfg.num_sampling_steps,
            timestep_spacing=cfg.timestep_spacing,
            clip_x0=cfg.clip_x0,
            dynamic_threshold=cfg.threshold,
            noise_fn=noise_fn if noise_fn is not None else build_noise(cfg),
            **options,
        )
    except (ValueError, TypeError) as err:
        raise PlansError(f"diffusion (sampler {name.value!r}): {err}") from None


def _accepted_options(cls: type[Sampler]) -> set[str]:
    """Keyword options a sampler class adds on top of the common ones."""
    common = set(inspect.signature(Sampler.__init__).parameters)
    own = set()
    for klass in cls.__mro__:
        if klass is Sampler or not issubclass(klass, Sampler) or "__init__" not in vars(klass):
            continue
        own |= {
            name
            for name, p in inspect.signature(klass.__init__).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
    return own - common
