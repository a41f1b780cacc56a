"""Samplers (one module per family), the shared sampling loop and the registry name -> class.

The registry is keyed by :class:`nndiff.diffusion.options.Sampler`; third-party samplers register
through the ``nndiff.samplers`` entry point group (see :func:`sampler_class`).
"""
from __future__ import annotations

from importlib.metadata import entry_points

from nndiff.diffusion.options import Sampler as SamplerName, parse_option
from nndiff.diffusion.samplers.base import Prediction, Sampler, StepOutput, ancestral_step
from nndiff.diffusion.samplers.ddim import DDIMSampler
from nndiff.diffusion.samplers.ddpm import DDPMSampler
from nndiff.diffusion.samplers.dpm_solver import DPMSolverPP2MSampler, DPMSolverPP2MSDESampler
from nndiff.diffusion.samplers.driver import InversionOutput, SampleOutput, guided_model, invert, sample
from nndiff.diffusion.samplers.langevin import AnnealedLangevinSampler
from nndiff.diffusion.samplers.ode import PFODEHeunSampler
from nndiff.diffusion.samplers.sde import EulerMaruyamaSampler, PredictorCorrectorSampler

SAMPLERS: dict[SamplerName, type[Sampler]] = {
    SamplerName.DDPM: DDPMSampler,
    SamplerName.DDIM: DDIMSampler,
    SamplerName.DPM_SOLVER_PP_2M: DPMSolverPP2MSampler,
    SamplerName.DPM_SOLVER_PP_2M_SDE: DPMSolverPP2MSDESampler,
    SamplerName.EULER_MARUYAMA: EulerMaruyamaSampler,
    SamplerName.PREDICTOR_CORRECTOR: PredictorCorrectorSampler,
    SamplerName.PF_ODE_HEUN: PFODEHeunSampler,
    SamplerName.ANNEALED_LANGEVIN: AnnealedLangevinSampler,
}


def sampler_class(name: str | SamplerName) -> type[Sampler]:
    """The sampler class for ``name``: built-ins first, then ``nndiff.samplers`` entry points."""
    for ep in entry_points(group="nndiff.samplers"):
        if ep.name == str(name) and str(name) not in {s.value for s in SamplerName}:
            return ep.load()
    return SAMPLERS[parse_option(SamplerName, name, "sampler")]


__all__ = [
    "SAMPLERS",
    "AnnealedLangevinSampler",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPP2MSDESampler",
    "DPMSolverPP2MSampler",
    "EulerMaruyamaSampler",
    "InversionOutput",
    "PFODEHeunSampler",
    "Prediction",
    "PredictorCorrectorSampler",
    "SampleOutput",
    "Sampler",
    "StepOutput",
    "ancestral_step",
    "guided_model",
    "invert",
    "sample",
    "sampler_class",
]
