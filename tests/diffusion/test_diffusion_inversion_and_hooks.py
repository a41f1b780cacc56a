"""DDIM inversion, partial diffusion, guidance and the other sampling-loop hooks."""
from __future__ import annotations

import math

import pytest
import torch

from diffusion_testutils import GaussianModel, MixtureModel
from nndiff.diffusion import (
    SAMPLERS,
    ClassifierFreeGuidance,
    DDIMSampler,
    DDPMSampler,
    DiscreteVE,
    DiscreteVP,
    EulerMaruyamaSampler,
    PFODEHeunSampler,
    VPSDE,
    grad_of_log_prob,
    invert,
    sample,
)
from nndiff.diffusion._tensor import per_sample

F64 = torch.float64


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def means(shape, seed=3):
    return 0.5 * torch.randn(shape[1:], generator=g(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------------
# inversion
# ---------------------------------------------------------------------------------------------------
def test_explicit_ddim_inversion_is_first_order():
    proc = DiscreteVP.from_schedule("linear", 1000)
    shape = (32, 1, 8, 8)
    model = GaussianModel(proc, "eps", means(shape), 0.5)
    x0 = model.marginal_sample(shape, (1.0, 0.0), g(1))
    latent_err, recon_err = [], []
    for n in (24, 48, 96):
        grid = torch.linspace(960, 0, n + 1).round().long()
        sampler = DDIMSampler(proc, "eps")
        inv = invert(sampler, model, x0, timesteps=grid, method="explicit")
        exact = model.ode_map(x0, (1.0, 0.0), sampler.coefficients(0))
        latent_err.append((inv.latent - exact).abs().max().item())
        back = sample(sampler, model, start_at=(inv.t, inv.latent), timesteps=inv.timesteps).sample
        recon_err.append((back - x0).abs().max().item())
    for errs in (latent_err, recon_err):
        ratio = errs[1] / errs[2]
        assert 1.75 <= ratio <= 2.25, errs
        assert errs[2] > 1e-4  # the explicit method is visibly inexact


@pytest.mark.parametrize("case", ["gaussian_2d_eps", "mixture_3d_v", "ve_score_clipped"])
def test_fixed_point_inversion_round_trip_is_exact(case):
    if case == "gaussian_2d_eps":
        proc, param, shape, clip = DiscreteVP.from_schedule("cosine", 1000), "eps", (8, 2, 8, 8), None
        model = GaussianModel(proc, param, means(shape), 0.5)
        x0 = model.marginal_sample(shape, (1.0, 0.0), g(2))
    elif case == "mixture_3d_v":
        proc, param, shape, clip = DiscreteVP.from_schedule("linear", 1000), "v", (8, 1, 4, 4, 4), None
        model = MixtureModel(proc, param, [0.3, 0.7], [-1.0, 1.0], [0.25, 0.25])
        x0 = model.marginal_sample(shape, (1.0, 0.0), g(2))
    else:
        proc, param, shape, clip = DiscreteVE.geometric(0.01, 20.0, 1000), "score", (4, 1, 8, 8), (-2.0, 2.0)
        model = GaussianModel(proc, param, means(shape), 0.5)
        x0 = model.marginal_sample(shape, (1.0, 0.0), g(2)).clamp(-1.5, 1.5)
    sampler = DDIMSampler(proc, param, num_steps=20, clip_x0=clip)
    inv = invert(sampler, model, x0, method="fixed_point", tol=1e-12, max_iter=500)
    assert max(inv.iterations) < 500 and max(inv.residuals) <= 1e-12
    back = sample(sampler, model, start_at=(inv.t, inv.latent), timesteps=inv.timesteps).sample
    err = (back - x0).abs().max().item()
    assert err <= 1e-5, err
    explicit = invert(sampler, model, x0, method="explicit")
    back_explicit = sample(sampler, model, start_at=(explicit.t, explicit.latent), timesteps=explicit.timesteps).sample
    assert (back_explicit - x0).abs().max().item() > 100 * max(err, 1e-9)


def test_inversion_rejects_stochastic_ddim():
    proc = DiscreteVP.from_schedule("linear", 1000)
    with pytest.raises(ValueError, match="eta = 0"):
        invert(DDIMSampler(proc, eta=0.5), lambda x, t, c: x, torch.zeros(1, 1, 4, 4))


# ---------------------------------------------------------------------------------------------------
# partial diffusion (start_at / SDEdit) returns the posterior
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ddpm_start_at", "em_start_at", "ddpm_sdedit"])
def test_partial_diffusion_samples_the_posterior(kind):
    std = 1.0
    shape = (512, 1, 8, 8)
    if kind.startswith("ddpm"):
        proc, sampler, t0, steps = DiscreteVP.from_schedule("linear", 1000), None, 400, 401
        sampler = DDPMSampler(proc, "eps")
    else:
        proc, t0, steps = VPSDE(), 0.4, 400
        sampler = EulerMaruyamaSampler(proc, "x0")
    mu = means(shape)
    model = GaussianModel(proc, sampler.parameterization, mu, std)
    alpha, sigma = (float(v) for v in proc.alpha_sigma(t0))
    k = alpha * std**2 / (alpha**2 * std**2 + sigma**2)
    post_var = std**2 * sigma**2 / (alpha**2 * std**2 + sigma**2)
    y = model.marginal_sample((1,) + shape[1:], (1.0, 0.0), g(4))  # one clean image
    if kind == "ddpm_sdedit":
        out = sample(sampler, model, sdedit=(t0, y.expand(shape).clone()), num_steps=steps, generator=g(5)).sample
        target_mean = mu + k * alpha * (y - mu)
        target_var = post_var + k**2 * sigma**2  # the SDEdit noise adds its own spread
    else:
        x_t0 = alpha * y + sigma * torch.randn(y.shape, generator=g(6), dtype=F64)  # one noisy image
        out = sample(sampler, model, start_at=(t0, x_t0.expand(shape).clone()), num_steps=steps, generator=g(5)).sample
        target_mean = mu + k * (x_t0 - alpha * mu)
        target_var = post_var
    assert float(sampler.grid[0]) == pytest.approx(t0)
    z = ((out - target_mean) / math.sqrt(target_var)).flatten()
    n = z.numel()
    assert abs(z.mean().item()) * math.sqrt(n) <= 4
    assert abs(z.std().item() - 1) * math.sqrt(2 * n) <= 4


def test_start_at_leading_spacing_starts_exactly_at_t0():
    proc = DiscreteVP.from_schedule("linear", 1000)
    sampler = DDIMSampler(proc, timestep_spacing="leading")
    ts = sampler.set_timesteps(10, t_start=437)
    assert int(ts[0]) == 437 and len(ts) == 10 and torch.all(ts[1:] < ts[:-1])
    # more steps than integer times below t0 (a DDPM plan with all 1000 steps): every timestep is used
    ts = DDPMSampler(proc, num_steps=1000).set_timesteps(t_start=250)
    assert ts.tolist() == list(range(250, -1, -1))


# ---------------------------------------------------------------------------------------------------
# guidance
# ---------------------------------------------------------------------------------------------------
def _conditional_model(x, t_net, cond):
    offset = 0.0 if cond is None else cond
    return 0.3 * x + offset + 1e-3 * per_sample(t_net, x)


def test_classifier_free_guidance_scale_one_and_zero():
    proc = DiscreteVP.from_schedule("linear", 1000)
    shape = (4, 1, 8, 8)
    cond = torch.randn(shape, generator=g(1), dtype=F64)
    x = torch.randn(shape, generator=g(2), dtype=F64)
    t = torch.full((4,), 500.0, dtype=F64)
    null = torch.zeros_like(cond)
    for scale, ref in ((1.0, _conditional_model(x, t, cond)), (0.0, _conditional_model(x, t, null))):
        assert torch.equal(ClassifierFreeGuidance(_conditional_model, scale, null)(x, t, cond), ref)
    out_c, out_u = _conditional_model(x, t, cond), _conditional_model(x, t, null)
    two = ClassifierFreeGuidance(_conditional_model, 2.5, null)(x, t, cond)
    one = ClassifierFreeGuidance(_conditional_model, 2.5, null, batched=True)(x, t, cond)
    assert torch.allclose(two, out_u + 2.5 * (out_c - out_u), atol=1e-12)
    assert torch.allclose(one, two, atol=1e-12)
    # through the sampling loop: scale 1 = the conditional model, scale 0 = the unconditional one
    for scale, plain_cond in ((1.0, cond), (0.0, null)):
        guided = sample(DDPMSampler(proc, num_steps=10), _conditional_model, shape, cond=cond, guidance_scale=scale,
                        null_cond=null, generator=g(3), dtype=F64).sample
        plain = sample(DDPMSampler(proc, num_steps=10), _conditional_model, shape, cond=plain_cond, generator=g(3),
                       dtype=F64).sample
        assert torch.equal(guided, plain)


def test_classifier_guidance_samples_the_exact_posterior():
    """x0 ~ N(0, 1), y = x0 + N(0, r^2). With the exact grad log p(y | x_t) the guided sampler draws
    from p(x0 | y) = N(y / (1 + r^2), r^2 / (1 + r^2))."""
    proc, r = VPSDE(), 0.5
    shape = (512, 1, 8, 8)
    model = GaussianModel(proc, "eps", torch.zeros(shape[1:], dtype=F64), 1.0)
    y = 1.5 * torch.randn(shape[1:], generator=g(11), dtype=F64)

    def log_likelihood(x, t_net, cond):
        alpha, sigma = (per_sample(v, x) for v in proc.alpha_sigma_from_model_time(t_net))
        k = alpha / (alpha**2 + sigma**2)  # E[x0 | x_t] = k x_t
        var = sigma**2 / (alpha**2 + sigma**2) + r**2
        return (-0.5 * (y - k * x) ** 2 / var).flatten(1).sum(1)

    out = sample(EulerMaruyamaSampler(proc, "eps", num_steps=1000), model, shape,
                 classifier_grad=grad_of_log_prob(log_likelihood), classifier_scale=1.0,
                 generator=g(12), dtype=F64).sample
    z = ((out - y / (1 + r**2)) / math.sqrt(r**2 / (1 + r**2))).flatten()
    n = z.numel()
    assert abs(z.mean().item()) * math.sqrt(n) <= 4
    assert abs(z.std().item() - 1) * math.sqrt(2 * n) <= 4


# ---------------------------------------------------------------------------------------------------
# consistency hooks, intermediates, generator, noise source
# ---------------------------------------------------------------------------------------------------
def _sampler(name, proc_vp, proc_sde, **kw):
    cls = SAMPLERS[name]
    proc = proc_sde if cls.requires_sde else proc_vp
    extra = {"steps_per_level": 2} if name == "annealed_langevin" else {}
    return cls(proc, "v", num_steps=6, **extra, **kw)


@pytest.mark.parametrize("name", [s.value for s in SAMPLERS])
def test_hooks_every_sampler_honours(name):
    proc_vp, proc_sde = DiscreteVP.from_schedule("cosine", 1000), VPSDE()
    shape = (3, 1, 4, 4, 4)
    sampler = _sampler(name, proc_vp, proc_sde)
    model = GaussianModel(sampler.process, "v", means(shape), 0.7)
    target = torch.full(shape, 0.25, dtype=F64)
    x0_times, xt_times = [], []

    def project_x0(x0, t):
        x0_times.append(t)
        return target.clone()

    def project_xt(x, t):
        xt_times.append(t)
        return x * 1.0

    out = sample(sampler, model, shape, consistency=project_x0, consistency_xt=project_xt,
                 return_intermediates=True, generator=g(1), dtype=F64)
    # every sampler ends on its (projected) x0 prediction
    assert torch.allclose(out.sample, target, atol=1e-12)
    assert x0_times == [float(t) for t in sampler.timesteps]
    assert xt_times == out.times and out.times[-1] == sampler.process.t_clean
    assert len(out.intermediates) == len(sampler.timesteps) == len(out.pred_x0)
    assert torch.equal(out.intermediates[-1], out.sample)
    # explicit generator: reproducible; a different seed differs for stochastic samplers
    a = sample(_sampler(name, proc_vp, proc_sde), model, shape, generator=g(7), dtype=F64).sample
    b = sample(_sampler(name, proc_vp, proc_sde), model, shape, generator=g(7), dtype=F64).sample
    c = sample(_sampler(name, proc_vp, proc_sde), model, shape, generator=g(8), dtype=F64).sample
    assert torch.equal(a, b) and not torch.equal(a, c)


class CountingNoise:
    """A noise source that records each draw (and returns scaled Gaussian noise)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, shape, *, generator=None, device=None, dtype=torch.float32):
        self.calls += 1
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


@pytest.mark.parametrize("name", [s.value for s in SAMPLERS if SAMPLERS[s].stochastic is True])
def test_noise_fn_supplies_every_draw(name):
    proc_vp, proc_sde = DiscreteVP.from_schedule("linear", 1000), VPSDE()
    sampler = _sampler(name, proc_vp, proc_sde)
    shape = (2, 1, 8, 8)
    model = GaussianModel(sampler.process, "v", means(shape), 1.0)
    counter = CountingNoise()
    out = sample(sampler, model, shape, noise_fn=counter, generator=g(1), dtype=F64)
    assert counter.calls >= len(sampler.timesteps) - 1  # the start plus (almost) every step
    assert sampler.noise_fn is not counter  # the override is for this call only
    again = sample(sampler, model, shape, noise_fn=CountingNoise(), generator=g(1), dtype=F64)
    assert torch.equal(out.sample, again.sample)


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (1, 1, 8, 8, 8)])
def test_simplex_noise_plugs_into_sampling(shape):
    from nndiff.diffusion.noise import make_noise

    simplex = make_noise("simplex", octaves=2, frequency=8.0)
    proc = DiscreteVP.from_schedule("linear", 1000)
    model = GaussianModel(proc, "eps", torch.zeros(shape[1:], dtype=F64), 1.0)
    a = sample(DDPMSampler(proc, num_steps=4, noise_fn=simplex), model, shape, generator=g(1), dtype=F64).sample
    b = sample(DDPMSampler(proc, num_steps=4, noise_fn=simplex), model, shape, generator=g(1), dtype=F64).sample
    gauss = sample(DDPMSampler(proc, num_steps=4), model, shape, generator=g(1), dtype=F64).sample
    assert torch.equal(a, b) and not torch.allclose(a, gauss)


# ---------------------------------------------------------------------------------------------------
# protocol errors
# ---------------------------------------------------------------------------------------------------
def test_protocol_errors_are_explicit():
    proc = DiscreteVP.from_schedule("linear", 1000)
    sampler = DDIMSampler(proc, num_steps=3)
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sampler.step(x, 999, x)
    ts = sampler.set_timesteps()
    with pytest.raises(ValueError, match="expects t=999"):
        sampler.step(x, 5, x)
    for t in ts:
        sampler.step(torch.zeros_like(x), t, x)
    with pytest.raises(RuntimeError, match="consumed"):
        sampler.step(x, 0, x)
    with pytest.raises(ValueError, match="strictly descending"):
        sampler.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match="exactly one"):
        sample(sampler, lambda x, t, c: x, (1, 1, 4, 4), x_start=x)
    with pytest.raises(ValueError, match="needs process vp_sde"):
        EulerMaruyamaSampler(proc)
    zero_snr = DiscreteVP.from_schedule("linear", 1000, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="alpha = 0"):
        DDIMSampler(zero_snr, "eps").set_timesteps(10)
    with pytest.raises(ValueError, match="alpha > 0"):
        PFODEHeunSampler(zero_snr, "v").set_timesteps(10)
    with pytest.raises(ValueError, match="valid values"):
        DDIMSampler(proc, "noise")
