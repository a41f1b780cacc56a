"""Diffusion core: pure math, no I/O. Processes, schedules, parameterizations, losses, guidance,
samplers (with a shared sampling loop and hooks) and the plans-block factories.

Every operation works on 4-D ``(B, C, H, W)`` and 5-D ``(B, C, D, H, W)`` tensors. See
``documentation/diffusion.md`` for the equations, their sources and the plans keys.

The names below are imported lazily: ``nndiff.diffusion.options`` (used by the dataset,
fingerprint and planning modules and their worker processes) must not pull in torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AnnealedLangevinSampler": "nndiff.diffusion.samplers",
    "ClassifierFreeGuidance": "nndiff.diffusion.guidance",
    "ClassifierGuidance": "nndiff.diffusion.guidance",
    "DDIMSampler": "nndiff.diffusion.samplers",
    "DDPMSampler": "nndiff.diffusion.samplers",
    "DPMSolverPP2MSDESampler": "nndiff.diffusion.samplers",
    "DPMSolverPP2MSampler": "nndiff.diffusion.samplers",
    "DiffusionConfig": "nndiff.diffusion.config",
    "DiffusionProcess": "nndiff.diffusion.processes",
    "DiscreteVE": "nndiff.diffusion.processes",
    "DiscreteVP": "nndiff.diffusion.processes",
    "DynamicThreshold": "nndiff.diffusion.parameterization",
    "EulerMaruyamaSampler": "nndiff.diffusion.samplers",
    "GaussianNoise": "nndiff.diffusion.noise",
    "ImportanceTimeSampler": "nndiff.diffusion.losses",
    "InversionOutput": "nndiff.diffusion.samplers",
    "ModelFn": "nndiff.diffusion.guidance",
    "NoiseFn": "nndiff.diffusion.noise",
    "PFODEHeunSampler": "nndiff.diffusion.samplers",
    "PROCESSES": "nndiff.diffusion.processes",
    "PredictorCorrectorSampler": "nndiff.diffusion.samplers",
    "SAMPLERS": "nndiff.diffusion.samplers",
    "SampleOutput": "nndiff.diffusion.samplers",
    "Sampler": "nndiff.diffusion.samplers",
    "StepOutput": "nndiff.diffusion.samplers",
    "SubVPSDE": "nndiff.diffusion.processes",
    "VESDE": "nndiff.diffusion.processes",
    "VPSDE": "nndiff.diffusion.processes",
    "build_noise": "nndiff.diffusion.config",
    "build_process": "nndiff.diffusion.config",
    "build_sampler": "nndiff.diffusion.config",
    "clip_x0": "nndiff.diffusion.parameterization",
    "continuous_timesteps": "nndiff.diffusion.schedules",
    "convert": "nndiff.diffusion.parameterization",
    "diffusion_loss": "nndiff.diffusion.losses",
    "discrete_vp_alphas_cumprod": "nndiff.diffusion.schedules",
    "dynamic_threshold": "nndiff.diffusion.parameterization",
    "from_x0_eps": "nndiff.diffusion.parameterization",
    "geometric_sigmas": "nndiff.diffusion.schedules",
    "grad_of_log_prob": "nndiff.diffusion.guidance",
    "invert": "nndiff.diffusion.samplers",
    "loss_weight": "nndiff.diffusion.losses",
    "make_betas": "nndiff.diffusion.schedules",
    "rescale_zero_terminal_snr": "nndiff.diffusion.schedules",
    "respace_timesteps": "nndiff.diffusion.schedules",
    "sample": "nndiff.diffusion.samplers",
    "sampler_class": "nndiff.diffusion.samplers",
    "score_from_output": "nndiff.diffusion.parameterization",
    "shift_snr": "nndiff.diffusion.schedules",
    "target_scale": "nndiff.diffusion.losses",
    "to_x0_eps": "nndiff.diffusion.parameterization",
    "training_target": "nndiff.diffusion.parameterization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
