"""Oracle tests: our schedules and samplers against diffusers' schedulers (test-only dependency).

Same schedule configuration and same model outputs must give the same timesteps, alphas_cumprod
and next samples to <= 1e-5. The "model" is a fixed smooth function of (x, t); every step feeds both
implementations the same x, so a mismatch at any step is caught where it happens. diffusers keeps its
tables in float32 and casts some steps to float32; ours are float64 (the 1e-5 budget covers it).
"""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

import diffusers  # test-only oracle (setup.py extra "test"); a missing install must fail, not skip
# diffusers 0.42 + numpy 2 emit a DeprecationWarning (np.array(tensor, copy=False)); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from nndiff.diffusion import (  # noqa: E402
    DDIMSampler,
    DDPMSampler,
    DiscreteVE,
    DiscreteVP,
    DPMSolverPP2MSampler,
    DPMSolverPP2MSDESampler,
    DynamicThreshold,
    PFODEHeunSampler,
    PredictorCorrectorSampler,
    discrete_vp_alphas_cumprod,
    from_x0_eps,
    geometric_sigmas,
)

TOL = 1e-5
DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}
PREDICTION_TYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SHAPES = [(2, 3, 8, 8), (2, 1, 4, 6, 6)]


def fake_model(x: torch.Tensor, t: float, seed: int = 0) -> torch.Tensor:
    """A deterministic, smooth stand-in for a network (same output for both implementations)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(x.shape[1:], generator=g, dtype=x.dtype)
    return 0.6 * torch.tanh(x) + 0.4 * r * np.cos(float(t) / 300.0)


def plausible_model(x: torch.Tensor, t, process, param: str) -> torch.Tensor:
    """A stand-in network whose x0 prediction stays in a data-like range (keeps samples O(1)).

    A model whose output is unrelated to x would push eps-parameterised trajectories to |x| ~ 400,
    where float32 tables (diffusers) cannot hold 1e-5 absolute agreement.
    """
    alpha, sigma = (float(v) for v in process.alpha_sigma(t))
    x0 = 0.8 * torch.tanh(fake_model(x, t))
    eps = (x - alpha * x0) / sigma
    return from_x0_eps(x0, eps, alpha, sigma, param)


def gen(k: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + k)


def float64_tables(sched):
    """Recompute a DDPM/DDIM scheduler's alphas_cumprod in float64 from its own (float32) betas.

    diffusers evaluates 1 - abar_t in float32, which keeps only ~3 digits at t = 0 (abar_0 = 0.9999):
    the last step then differs from exact arithmetic by ~3e-5. This is the "float64 where needed".
    """
    sched.alphas_cumprod = torch.cumprod(1.0 - sched.betas.double(), dim=0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


def assert_close(ours, theirs, what, tol=TOL):
    err = (ours.double() - theirs.double()).abs().max().item()
    assert err <= tol, f"{what}: max abs difference {err:.3g} > {tol}"


# ---------------------------------------------------------------------------------------------------
# schedules and timesteps
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", list(DIFFUSERS_SCHEDULE))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(schedule, zero_snr):
    theirs = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule], rescale_betas_zero_snr=zero_snr
    )
    ours = discrete_vp_alphas_cumprod(schedule, 1000, zero_terminal_snr=zero_snr)
    assert_close(ours, theirs.alphas_cumprod, f"alphas_cumprod {schedule} zsnr={zero_snr}")
    if zero_snr:
        assert ours[-1] == 0.0


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("n", [1, 7, 10, 50, 999])
def test_timesteps_match_ddpm_ddim_dpm(spacing, n):
    proc = DiscreteVP.from_schedule("linear", 1000)
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        sched = cls(num_train_timesteps=1000, timestep_spacing=spacing)
        sched.set_timesteps(n)
        ours = proc.sampling_timesteps(n, spacing)
        assert torch.equal(ours, sched.timesteps), f"{cls.__name__} {spacing} n={n}"
        sampler = DDIMSampler(proc, timestep_spacing=spacing, num_steps=n)
        assert torch.equal(sampler.set_timesteps(), sched.timesteps)
    if n < 999:
        dpm = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
        dpm.set_timesteps(n)
        ours = DPMSolverPP2MSampler(proc, timestep_spacing=spacing, num_steps=n).set_timesteps()
        assert torch.equal(ours, dpm.timesteps), f"DPM {spacing} n={n}: {ours[:5]} vs {dpm.timesteps[:5]}"


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_timesteps_match_euler_and_heun(spacing):
    proc = DiscreteVP.from_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    euler = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing
    )
    euler.set_timesteps(20)
    ours = PFODEHeunSampler(proc, second_order=False, timestep_spacing=spacing).set_timesteps(20)
    assert torch.equal(ours.float(), euler.timesteps)
    heun = diffusers.HeunDiscreteScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing
    )
    heun.set_timesteps(20)
    ours = PFODEHeunSampler(proc, timestep_spacing=spacing).set_timesteps(20)
    assert torch.equal(ours.float(), heun.timesteps)


def test_geometric_sigmas_match_score_sde_ve():
    sched = diffusers.ScoreSdeVeScheduler(num_train_timesteps=100, sigma_min=0.01, sigma_max=50.0)
    sched.set_timesteps(100)
    sched.set_sigmas(100)
    assert_close(geometric_sigmas(0.01, 50.0, 100), sched.discrete_sigmas, "discrete sigmas", tol=1e-5 * 50)
    rel = (geometric_sigmas(0.01, 50.0, 100) / sched.discrete_sigmas.double() - 1).abs().max()
    assert rel <= 1e-6


# ---------------------------------------------------------------------------------------------------
# DDPM / DDIM
# ---------------------------------------------------------------------------------------------------
def _run_pair(ours, theirs, shape, theirs_kwargs=None, ours_noise=None, their_step=None):
    """Step both samplers through their schedules on the same x; return the number of steps."""
    x = torch.randn(shape, generator=gen(0), dtype=torch.float64)
    k = 0
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        assert float(t_ours) == float(t_theirs)
        out = plausible_model(x, t_ours, ours.process, ours.parameterization.value)
        ours_out = ours.step(out, t_ours, x, gen(k), noise=None if ours_noise is None else ours_noise(k, x))
        if their_step is None:
            theirs_out = theirs.step(out, t_theirs, x, generator=gen(k), **(theirs_kwargs or {}))
            ref = theirs_out.prev_sample
        else:
            ref = their_step(out, t_theirs, x, k)
        assert_close(ours_out.prev_sample, ref, f"step {k} (t={float(t_ours):g})")
        x = ours_out.prev_sample
        k += 1
    return k


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("shape", SHAPES)
def test_ddpm_matches_diffusers(param, variance, shape):
    proc = DiscreteVP.from_schedule("linear", 1000)
    theirs = diffusers.DDPMScheduler(
        num_train_timesteps=1000, prediction_type=PREDICTION_TYPE[param], variance_type=variance,
        clip_sample=False, timestep_spacing="leading",
    )
    float64_tables(theirs).set_timesteps(25)  # leading: the grid ends at t = 0, where diffusers adds no noise either
    ours = DDPMSampler(proc, param, variance_type=variance, num_steps=25, timestep_spacing="leading")
    ours.set_timesteps()
    assert _run_pair(ours, theirs, shape) == 25


@pytest.mark.parametrize("clip", ["clip", "threshold"])
def test_ddpm_clipping_and_thresholding_match_diffusers(clip):
    proc = DiscreteVP.from_schedule("cosine", 1000)
    if clip == "clip":
        theirs = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=1.5)
        ours = DDPMSampler(proc, "eps", num_steps=20, clip_x0=(-1.5, 1.5), timestep_spacing="leading")
    else:
        theirs = diffusers.DDPMScheduler(
            beta_schedule="squaredcos_cap_v2", thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0
        )
        ours = DDPMSampler(
            proc, "eps", num_steps=20, dynamic_threshold=DynamicThreshold(0.9, 3.0), timestep_spacing="leading"
        )
    float64_tables(theirs).set_timesteps(20)
    ours.set_timesteps()
    _run_pair(ours, theirs, (3, 2, 8, 8))


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
@pytest.mark.parametrize("spacing,n", [("leading", 20), ("trailing", 20), ("trailing", 8)])
@pytest.mark.parametrize("shape", SHAPES)
def test_ddim_matches_diffusers(param, spacing, n, shape):
    proc = DiscreteVP.from_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    theirs = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type=PREDICTION_TYPE[param], clip_sample=False, timestep_spacing=spacing,
    )
    float64_tables(theirs).set_timesteps(n)
    ours = DDIMSampler(proc, param, num_steps=n, timestep_spacing=spacing)
    ours.set_timesteps()
    assert _run_pair(ours, theirs, shape) == n


@pytest.mark.parametrize("use_clipped", [False, True])
def test_ddim_eta_clip_and_zero_snr_match_diffusers(use_clipped):
    proc = DiscreteVP.from_schedule("linear", 1000, zero_terminal_snr=True)
    theirs = diffusers.DDIMScheduler(
        rescale_betas_zero_snr=True, prediction_type="v_prediction", clip_sample=True, clip_sample_range=1.0,
        timestep_spacing="trailing",
    )
    theirs.set_timesteps(10)
    ours = DDIMSampler(proc, "v", eta=0.7, num_steps=10, clip_x0=(-1, 1), use_clipped_model_output=use_clipped)
    ours.set_timesteps()
    assert float(ours.coefficients(0)[0]) == 0.0  # the grid starts at SNR 0
    _run_pair(ours, theirs, (2, 2, 8, 8), theirs_kwargs={"eta": 0.7, "use_clipped_model_output": use_clipped})


# ---------------------------------------------------------------------------------------------------
# DPM-Solver++
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("param", ["eps", "x0", "v"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dpm_solver_pp_2m_matches_diffusers(param, spacing, shape):
    proc = DiscreteVP.from_schedule("linear", 1000)
    theirs = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, prediction_type=PREDICTION_TYPE[param], timestep_spacing=spacing
    )
    theirs.set_timesteps(12)
    ours = DPMSolverPP2MSampler(proc, param, num_steps=12, timestep_spacing=spacing)
    ours.set_timesteps()
    assert _run_pair(ours, theirs, shape) == 12


@pytest.mark.parametrize("param", ["eps", "v"])
def test_dpm_solver_pp_2m_sde_matches_diffusers(param):
    proc = DiscreteVP.from_schedule("scaled_linear", 1000)
    theirs = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", algorithm_type="sde-dpmsolver++", solver_order=2,
        prediction_type=PREDICTION_TYPE[param], timestep_spacing="trailing",
    )
    theirs.set_timesteps(15)
    ours = DPMSolverPP2MSDESampler(proc, param, num_steps=15)
    ours.set_timesteps()
    shape = (2, 2, 8, 8)

    def noise(k, x):
        return torch.randn(x.shape, generator=gen(50 + k), dtype=x.dtype)

    def their_step(out, t, x, k):
        return theirs.step(out, t, x, variance_noise=noise(k, x)).prev_sample

    assert _run_pair(ours, theirs, shape, ours_noise=noise, their_step=their_step) == 15


# ---------------------------------------------------------------------------------------------------
# Euler / Heun (probability-flow ODE in x/alpha coordinates)
# ---------------------------------------------------------------------------------------------------
def _scaled_pair_run(ours, theirs, shape):
    """diffusers' Euler/Heun keep y = x / alpha; feed them y and compare in x."""
    proc = ours.process
    x = torch.randn(shape, generator=gen(0), dtype=torch.float64)
    for k, (t_o, t_d) in enumerate(zip(ours.timesteps, theirs.timesteps)):
        assert float(t_o) == float(t_d)
        out = plausible_model(x, t_o, proc, ours.parameterization.value)
        alpha_in = float(proc.alpha_sigma(t_o)[0])
        ref_y = theirs.step(out, t_d, x / alpha_in).prev_sample.double()
        step = ours.step(out, t_o, x)
        alpha_out = float(proc.alpha_sigma(step.t_prev)[0])
        assert_close(step.prev_sample, alpha_out * ref_y, f"step {k}")
        x = step.prev_sample


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_pf_ode_euler_matches_euler_discrete_and_ddim(param, spacing):
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing)
    proc = DiscreteVP.from_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    theirs = diffusers.EulerDiscreteScheduler(prediction_type=PREDICTION_TYPE[param], **kw)
    theirs.set_timesteps(20)
    ours = PFODEHeunSampler(proc, param, second_order=False, num_steps=20, timestep_spacing=spacing)
    ours.set_timesteps()
    _scaled_pair_run(ours, theirs, (2, 2, 8, 8))
    # DDIM with eta = 0 is the same Euler step (Karras et al. 2022): identical to rounding.
    ddim = DDIMSampler(proc, param, num_steps=20, timestep_spacing=spacing)
    euler = PFODEHeunSampler(proc, param, second_order=False, num_steps=20, timestep_spacing=spacing)
    x = torch.randn(2, 1, 4, 4, 4, generator=gen(1), dtype=torch.float64)
    for t_a, t_b in zip(ddim.set_timesteps(), euler.set_timesteps()):
        out = fake_model(x, float(t_a))
        a, b = ddim.step(out, t_a, x).prev_sample, euler.step(out, t_b, x).prev_sample
        assert_close(a, b, "ddim vs euler", tol=1e-10)
        x = a


@pytest.mark.parametrize("param", ["eps", "v"])
def test_pf_ode_heun_matches_heun_discrete(param):
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    proc = DiscreteVP.from_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    theirs = diffusers.HeunDiscreteScheduler(prediction_type=PREDICTION_TYPE[param], **kw)
    theirs.set_timesteps(10)
    ours = PFODEHeunSampler(proc, param, num_steps=10)
    ours.set_timesteps()
    assert len(ours.timesteps) == 19
    _scaled_pair_run(ours, theirs, (2, 1, 4, 6, 6))


# ---------------------------------------------------------------------------------------------------
# ScoreSdeVe: predictor-corrector on the discrete VE process
# ---------------------------------------------------------------------------------------------------
def _randn64(shape, generator=None, **_):
    return torch.randn(shape, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
def test_predictor_corrector_matches_score_sde_ve(shape):
    n, sigma_min, sigma_max = 30, 0.01, 20.0
    theirs = diffusers.ScoreSdeVeScheduler(num_train_timesteps=n, snr=0.15, sigma_min=sigma_min, sigma_max=sigma_max)
    theirs.set_timesteps(n)
    theirs.set_sigmas(n)
    # float64 where needed: diffusers builds the same geometric levels in float32 (rel. error 6e-8,
    # i.e. 2e-5 absolute on samples of size sigma_max); recompute them with its formula in float64
    theirs.discrete_sigmas = torch.exp(torch.linspace(np.log(sigma_min), np.log(sigma_max), n, dtype=torch.float64))
    proc = DiscreteVE.geometric(sigma_min, sigma_max, n)
    ours = PredictorCorrectorSampler(proc, "score", num_steps=n, snr=0.15, corrector_steps=1, corrector_norm="batch")
    ours.set_timesteps()
    # their continuous t maps to level index (t (N - 1)).long(): the same levels, noisiest first
    their_levels = (theirs.timesteps * (n - 1)).long()
    assert torch.equal(their_levels, ours.grid)
    x = sigma_max * torch.randn(shape, generator=gen(0), dtype=torch.float64)
    calls = iter(ours.timesteps)
    with mock.patch("diffusers.schedulers.scheduling_sde_ve.randn_tensor", _randn64):
        for k, t in enumerate(theirs.timesteps):
            level = next(calls)
            out = fake_model(x, float(level)) / float(proc.sigmas[level])
            ref = theirs.step_correct(out, x, generator=gen(2 * k)).prev_sample
            got = ours.step(out, level, x, gen(2 * k)).prev_sample
            assert_close(got, ref, f"corrector {k}")
            x = got
            assert int(next(calls)) == int(level)
            out = fake_model(x, float(level)) / float(proc.sigmas[level])
            pred = theirs.step_pred(out, t, x, generator=gen(2 * k + 1))
            got = ours.step(out, level, x, gen(2 * k + 1)).prev_sample
            ref = pred.prev_sample if k + 1 < n else pred.prev_sample_mean  # the pipeline returns the mean
            assert_close(got, ref, f"predictor {k}")
            x = got
