"""Schedules, processes, parameterizations and losses (exact identities, 4-D and 5-D)."""
from __future__ import annotations

import math

import pytest
import torch

from nndiff.diffusion import (
    PROCESSES,
    VESDE,
    VPSDE,
    DiscreteVE,
    DiscreteVP,
    DynamicThreshold,
    ImportanceTimeSampler,
    SubVPSDE,
    clip_x0,
    convert,
    diffusion_loss,
    discrete_vp_alphas_cumprod,
    dynamic_threshold,
    from_x0_eps,
    loss_weight,
    make_betas,
    respace_timesteps,
    score_from_output,
    shift_snr,
    to_x0_eps,
    training_target,
)

F64 = torch.float64
PARAMS = ["eps", "x0", "v", "score"]
ALL_PROCESSES = {
    "vp_discrete": DiscreteVP.from_schedule("cosine", 1000),
    "ve_discrete": DiscreteVE.geometric(0.01, 50.0, 1000),
    "vp_sde": VPSDE(),
    "subvp_sde": SubVPSDE(),
    "ve_sde": VESDE(),
}


def g(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------
def test_beta_schedules_basic_properties():
    for name in ("linear", "scaled_linear", "cosine", "sigmoid"):
        betas = make_betas(name, 1000)
        assert betas.dtype == F64 and betas.shape == (1000,)
        assert torch.all(betas > 0) and torch.all(betas <= 0.999)
    cos = make_betas("cosine", 1000, max_beta=0.5)
    assert cos.max() == 0.5  # max-beta clipping hits the last steps
    with pytest.raises(ValueError, match="valid values"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="sigma levels"):
        make_betas("geometric", 10)


def test_zero_terminal_snr_and_snr_shift():
    base = discrete_vp_alphas_cumprod("linear", 1000)
    zero = discrete_vp_alphas_cumprod("linear", 1000, zero_terminal_snr=True)
    assert zero[-1] == 0 and torch.isclose(zero[0], base[0], rtol=1e-12)
    assert torch.all(zero[1:] <= zero[:-1])
    for s in (0.5, 2.0, 4.0):
        shifted = shift_snr(base, s)
        snr, snr_s = base / (1 - base), shifted / (1 - shifted)
        assert torch.allclose(snr_s, snr / s**2, rtol=1e-10)
    assert torch.equal(shift_snr(base, 1.0), base)
    proc = DiscreteVP.from_schedule("cosine", 1000, snr_shift=2.0)
    assert torch.all(proc.snr(torch.arange(1000)) < DiscreteVP.from_schedule("cosine", 1000).snr(torch.arange(1000)))


def test_respacing_rules():
    assert respace_timesteps(1000, 10, "trailing")[0] == 999
    assert respace_timesteps(1000, 10, "linspace").tolist()[::9] == [999, 0]
    assert respace_timesteps(1000, 10, "leading").tolist()[:2] == [900, 800]
    with pytest.raises(ValueError, match="num_steps"):
        respace_timesteps(10, 11)


@pytest.mark.parametrize("name", ["vp_sde", "subvp_sde", "ve_sde"])
def test_sde_coefficients_match_marginals(name):
    """f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2 (Kingma et al. 2021, Eq. 33)."""
    proc = ALL_PROCESSES[name]
    t = torch.linspace(0.05, 0.95, 19, dtype=F64)
    h = 1e-6
    (a_p, s_p), (a_m, s_m) = proc.alpha_sigma(t + h), proc.alpha_sigma(t - h)
    _, s = proc.alpha_sigma(t)
    f_num = (a_p.log() - a_m.log()) / (2 * h)
    g2_num = (s_p**2 - s_m**2) / (2 * h) - 2 * f_num * s**2
    f, g2 = proc.sde(t)
    assert torch.allclose(f, f_num, rtol=1e-6, atol=1e-8)
    assert torch.allclose(g2, g2_num, rtol=1e-5)


def test_processes_marginals_times_and_training_draws():
    x0 = torch.randn(4, 2, 3, 5, 5, generator=g(0), dtype=F64)
    noise = torch.randn(x0.shape, generator=g(1), dtype=F64)
    for name, proc in ALL_PROCESSES.items():
        assert proc.kind.value == name and PROCESSES[proc.kind] is type(proc)
        t = proc.sample_t(4, generator=g(2))
        if proc.is_discrete:
            assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < proc.num_train_timesteps
        else:
            assert t.min() >= proc.train_eps and t.max() <= 1
        xt = proc.add_noise(x0, noise, t)
        alpha, sigma = proc.alpha_sigma(t)
        assert torch.allclose(xt, alpha.view(-1, 1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise)
        # the network time input maps back to the same coefficients
        a2, s2 = proc.alpha_sigma_from_model_time(proc.model_time(t, dtype=F64))
        assert torch.allclose(a2, alpha, rtol=1e-10) and torch.allclose(s2, sigma, rtol=1e-10)
        assert proc.alpha_sigma(proc.t_clean) == (1.0, 0.0)
        grid = proc.sampling_timesteps(10)
        assert len(grid) == 10 and torch.all(grid[1:] < grid[:-1])
    assert ALL_PROCESSES["vp_sde"].model_time(torch.tensor([0.5])).item() == pytest.approx(499.5)
    assert ALL_PROCESSES["ve_discrete"].model_time(torch.tensor([0])).item() == pytest.approx(math.log(0.01), rel=1e-6)
    with pytest.raises(ValueError, match="integers"):
        ALL_PROCESSES["vp_discrete"].alpha_sigma(torch.tensor([0.5]))


def test_add_noise_matches_diffusers():
    import diffusers  # test-only oracle (setup.py extra "test"); a missing install must fail, not skip
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    proc = DiscreteVP.from_schedule("cosine", 1000)
    x0 = torch.randn(3, 1, 8, 8, generator=g(3), dtype=F64)
    noise = torch.randn(x0.shape, generator=g(4), dtype=F64)
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(proc.add_noise(x0, noise, t), sched.add_noise(x0, noise, t), atol=1e-5)
    assert torch.allclose(training_target("v", x0, noise, *proc.alpha_sigma(t)), sched.get_velocity(x0, noise, t), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# parameterizations
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("proc_name", list(ALL_PROCESSES))
@pytest.mark.parametrize("shape", [(4, 2, 6, 6), (4, 1, 3, 4, 4)])
def test_parameterization_conversions_round_trip(proc_name, shape):
    proc = ALL_PROCESSES[proc_name]
    t = proc.sample_t(shape[0], generator=g(5))
    alpha, sigma = proc.alpha_sigma(t)
    x0 = torch.randn(shape, generator=g(6), dtype=F64)
    eps = torch.randn(shape, generator=g(7), dtype=F64)
    x = proc.add_noise(x0, eps, t)
    for src in PARAMS:
        out = from_x0_eps(x0, eps, alpha, sigma, src)
        x0_back, eps_back = to_x0_eps(out, x, alpha, sigma, src)
        assert torch.allclose(x0_back, x0, atol=1e-8 * max(1.0, float(sigma.max()))) and torch.allclose(eps_back, eps, atol=1e-8)
        for dst in PARAMS:
            assert torch.allclose(convert(out, x, alpha, sigma, src, dst), from_x0_eps(x0, eps, alpha, sigma, dst), rtol=1e-7, atol=1e-7)
        score = score_from_output(out, x, alpha, sigma, src)
        assert torch.allclose(score, -eps / sigma.view((-1,) + (1,) * (len(shape) - 1)), rtol=1e-7, atol=1e-9)
    # the VP v is the usual alpha eps - sigma x0 and O(1) at every noise level
    if proc_name == "vp_discrete":
        v = from_x0_eps(x0, eps, alpha, sigma, "v")
        assert torch.allclose(v, alpha.view((-1,) + (1,) * (len(shape) - 1)) * eps - sigma.view((-1,) + (1,) * (len(shape) - 1)) * x0)


def test_clipping_and_dynamic_thresholding_on_a_custom_range():
    x0 = 3 * torch.randn(5, 2, 8, 8, generator=g(8), dtype=F64)
    assert clip_x0(x0, (0.0, 2.0)).min() == 0.0 and clip_x0(x0, (0.0, 2.0)).max() == 2.0
    th = DynamicThreshold(percentile=0.9, max_value=2.5)
    sym = dynamic_threshold(x0, (-1.0, 1.0), th)
    assert sym.abs().max() <= 1.0 + 1e-12
    # the same operation on data living in [0, 4] is the affine image of the symmetric one
    shifted = dynamic_threshold(2 * x0 + 2, (0.0, 4.0), th)
    assert torch.allclose(shifted, 2 * sym + 2, atol=1e-12)
    # with max_value = 1 it is plain clipping
    assert torch.allclose(dynamic_threshold(x0, (-1.0, 1.0), DynamicThreshold(0.9, 1.0)), x0.clamp(-1, 1))
    with pytest.raises(ValueError):
        clip_x0(x0, (1.0, 0.0))


# ---------------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------------
def _batch(proc, shape=(16, 1, 4, 4, 4)):
    x0 = torch.randn(shape, generator=g(9), dtype=F64)
    noise = torch.randn(shape, generator=g(10), dtype=F64)
    t = proc.sample_t(shape[0], generator=g(11))
    return x0, noise, t


@pytest.mark.parametrize("proc_name", ["vp_discrete", "ve_discrete", "vp_sde"])
def test_loss_weightings_are_consistent_across_parameterizations(proc_name):
    """min-SNR and sigma^2 weightings put the same weight on the x0 error whatever the target, so the
    same (x0, eps) prediction gives the same loss in all four parameterizations."""
    proc = ALL_PROCESSES[proc_name]
    x0, noise, t = _batch(proc)
    alpha, sigma = proc.alpha_sigma(t)
    x = proc.add_noise(x0, noise, t)
    x0_pred = x0 + 0.1 * torch.randn(x0.shape, generator=g(12), dtype=F64)
    sv = sigma.view(-1, 1, 1, 1, 1)
    eps_pred = (x - alpha.view(-1, 1, 1, 1, 1) * x0_pred) / sv
    for weighting in ("min_snr", "sigma_squared"):
        losses = [
            diffusion_loss(from_x0_eps(x0_pred, eps_pred, alpha, sigma, p), x0, noise, t, proc, p, weighting, reduction="none")
            for p in PARAMS
        ]
        for other in losses[1:]:
            assert torch.allclose(other, losses[0], rtol=1e-9)
    # exact prediction -> zero loss; uniform eps loss == sigma_squared loss of any target
    for p in PARAMS:
        exact = training_target(p, x0, noise, alpha, sigma)
        assert diffusion_loss(exact, x0, noise, t, proc, p, "min_snr").item() == pytest.approx(0.0, abs=1e-20)
    uniform_eps = diffusion_loss(eps_pred, x0, noise, t, proc, "eps", "uniform", reduction="none")
    sq_score = diffusion_loss(-eps_pred / sv, x0, noise, t, proc, "score", "sigma_squared", reduction="none")
    assert torch.allclose(uniform_eps, sq_score, rtol=1e-9)


def test_min_snr_weights_match_hang_et_al():
    alpha = torch.tensor([0.99, 0.8, 0.3], dtype=F64)
    sigma = (1 - alpha**2).sqrt()
    snr = alpha**2 / sigma**2
    gamma = 5.0
    assert torch.allclose(loss_weight("min_snr", "eps", alpha, sigma, gamma), snr.clamp(max=gamma) / snr)
    assert torch.allclose(loss_weight("min_snr", "v", alpha, sigma, gamma), snr.clamp(max=gamma) / (snr + 1))
    assert torch.allclose(loss_weight("min_snr", "x0", alpha, sigma, gamma), snr.clamp(max=gamma))
    assert torch.equal(loss_weight("uniform", "v", alpha, sigma), torch.ones(3, dtype=F64))


@pytest.mark.parametrize("proc_name", ["vp_discrete", "vp_sde"])
def test_importance_sampling_is_unbiased(proc_name):
    proc = ALL_PROCESSES[proc_name]
    sampler = ImportanceTimeSampler(proc, num_bins=20, history=2)
    t, w = sampler.sample(64, generator=g(13))
    assert torch.all(w == 1.0) and not sampler.warmed_up
    bins = sampler.num_bins
    # feed every bin a loss proportional to its index (+1)
    if proc.is_discrete:
        times = torch.arange(bins).repeat(2)
    else:
        width = (1 - proc.train_eps) / bins
        times = proc.train_eps + (torch.arange(bins).repeat(2).double() + 0.5) * width
    losses = (sampler._bin(times) + 1).double()
    sampler.update(times, losses)
    assert sampler.warmed_up
    p = sampler.probabilities()
    assert torch.isclose(p.sum(), torch.tensor(1.0, dtype=F64))
    expected = torch.arange(1, bins + 1, dtype=F64)
    expected = expected / expected.sum() * (1 - sampler.uniform_prob) + sampler.uniform_prob / bins
    assert torch.allclose(p, expected)
    # E_p[w L] = mean over bins of L: the importance weights keep the objective unbiased
    bin_loss = torch.arange(1, bins + 1, dtype=F64)
    assert torch.isclose((p * (1.0 / (bins * p)) * bin_loss).sum(), bin_loss.mean())
    t, w = sampler.sample(4096, generator=g(14))
    est = (w * (sampler._bin(t) + 1).double()).mean()
    assert abs(est - bin_loss.mean()) < 0.05 * bin_loss.mean()
