"""The plans ``diffusion`` block: defaults, validation messages, factories and the sampler registry."""
from __future__ import annotations

import json

import pytest
import torch

from nndiff.diffusion import (
    SAMPLERS,
    DDIMSampler,
    DiffusionConfig,
    DiscreteVP,
    GaussianNoise,
    build_noise,
    build_process,
    build_sampler,
    sample,
    sampler_class,
)
from nndiff.diffusion.options import Process, Sampler as SamplerName
from nndiff.errors import PlansError

PLAN_BLOCK = {
    "process": "vp_discrete",
    "num_train_timesteps": 1000,
    "schedule": "cosine",
    "snr_shift": 1.0,
    "parameterization": "v",
    "loss_weighting": "min_snr",
    "min_snr_gamma": 5.0,
    "noise_type": "gaussian",
    "sampler": "ddim",
    "num_sampling_steps": 50,
    "timestep_spacing": "trailing",
    "clip_x0": [-1, 1],
}


def test_plan_block_builds_process_and_sampler():
    cfg = DiffusionConfig.from_dict(PLAN_BLOCK)
    assert cfg.clip_x0 == (-1.0, 1.0) and cfg.sampler is SamplerName.DDIM
    sampler = build_sampler(PLAN_BLOCK)
    assert isinstance(sampler, DDIMSampler) and sampler.num_steps == 50 and sampler.clip_range == (-1.0, 1.0)
    assert isinstance(sampler.process, DiscreteVP) and sampler.parameterization.value == "v"
    assert isinstance(build_noise(PLAN_BLOCK), GaussianNoise)
    # the JSON form round-trips
    again = DiffusionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    # overrides for a predictor that wants another sampler
    dpm = build_sampler(PLAN_BLOCK, "dpm_solver_pp_2m", 20)
    assert dpm.name is SamplerName.DPM_SOLVER_PP_2M and dpm.num_steps == 20
    eta = build_sampler({**PLAN_BLOCK, "sampler_options": {"eta": 0.5}})
    assert eta.eta == 0.5


@pytest.mark.parametrize("process", [p.value for p in Process])
def test_every_process_builds_with_defaults(process):
    proc = build_process({"process": process})
    assert proc.kind.value == process
    sampler = build_sampler({"process": process, "sampler": "ddpm", "num_sampling_steps": 5})
    shape = (2, 1, 4, 4)
    out = sample(sampler, lambda x, t, c: torch.zeros_like(x), shape, generator=torch.Generator().manual_seed(0))
    assert out.sample.shape == shape and torch.isfinite(out.sample).all()


@pytest.mark.parametrize("name", [s.value for s in SamplerName])
def test_registry_covers_every_sampler_name(name):
    cls = sampler_class(name)
    assert SAMPLERS[SamplerName(name)] is cls and cls.name.value == name
    process = "vp_sde" if cls.requires_sde else "vp_discrete"
    sampler = build_sampler({"process": process, "sampler": name, "num_sampling_steps": 4})
    assert isinstance(sampler, cls)


@pytest.mark.parametrize(
    "block,message",
    [
        ({"proces": "vp_discrete"}, "unknown key(s) ['proces']; valid keys:"),
        ({"sampler": "ddim2"}, "diffusion.sampler: unknown sampler 'ddim2'; valid values: ddpm, ddim"),
        ({"parameterization": "noise"}, "valid values: eps, x0, v, score"),
        ({"schedule": "geometric"}, "does not fit process 'vp_discrete'"),
        ({"clip_x0": [1, -1]}, "diffusion.clip_x0 must be null or [low, high]"),
        ({"zero_terminal_snr": True}, "needs parameterization v or x0"),
        ({"process": "ve_sde", "snr_shift": 2.0}, "snr_shift applies to vp_discrete only"),
        ({"sampler_options": {"etaa": 1}}, "unknown option(s) ['etaa'] for sampler 'ddim'; valid: eta, use_clipped_model_output"),
        ({"sampler": "euler_maruyama"}, "needs process vp_sde, subvp_sde or ve_sde"),
        ({"noise_type": "gaussian", "noise_params": {"octaves": 3}}, "gaussian noise takes no parameters"),
        ({"dynamic_threshold": {"percentile": 2}}, "diffusion.dynamic_threshold"),
    ],
)
def test_bad_blocks_fail_with_the_valid_choices(block, message):
    with pytest.raises(PlansError) as err:
        cfg = DiffusionConfig.from_dict(block)
        build_noise(cfg)
        build_sampler(cfg)
    assert message in str(err.value)


def test_simplex_noise_from_plan():
    noise = build_noise({"noise_type": "simplex", "noise_params": {"octaves": 2}})
    assert type(noise).__name__ == "SimplexNoise"
    sampler = build_sampler({"noise_type": "simplex", "noise_params": {"octaves": 2}, "num_sampling_steps": 3})
    assert type(sampler.noise_fn).__name__ == "SimplexNoise"
