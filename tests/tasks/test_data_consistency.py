"""Data consistency callables for the sampling loop: hard projections, DPS, MCG, warm start."""
from __future__ import annotations

import pytest
import torch

from nndiff.diffusion.processes import VESDE, DiscreteVP
from nndiff.diffusion.samplers import DDIMSampler, PredictorCorrectorSampler, sample
from nndiff.tasks.data_consistency import (
    DPSGuidance,
    KSpaceReplacement,
    POCSProjection,
    dps_gradient,
    dps_hooks,
    hard_projection,
    mcg_hooks,
    measurement_loss,
    projection_hooks,
    residual,
    warm_start_image,
    warm_start_state,
)
from nndiff.tasks.operators import (
    MeasurementError,
    MultiCoilMRI,
    ParallelBeamCT,
    SingleCoilMRI,
    channels_to_complex,
    complex_to_channels,
    fft2c,
    ifft2c,
    parallel_beam_angles,
    undersampling_mask,
)

F64 = torch.float64


def crandn(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64))


@pytest.fixture()
def mri():
    mask = undersampling_mask((16, 16), 4, 0.125, "random", 1, seed=0)
    op = SingleCoilMRI(mask)
    truth = crandn(2, 1, 16, 16, seed=1)
    return op, mask, truth, op.forward(truth)


def zero_model(x, t_net, cond):
    return torch.zeros_like(x)


# ------------------------------------------------------------------------------------------------
# hard projections
# ------------------------------------------------------------------------------------------------
def test_kspace_replacement_keeps_measured_samples_exactly(mri):
    op, mask, _, y = mri
    x = complex_to_channels(crandn(2, 1, 16, 16, seed=7))  # network layout: (real, imag) channels
    dc = KSpaceReplacement(op, y)
    out = dc(x, 500)
    assert out.shape == x.shape and out.dtype == x.dtype and not out.is_complex()
    k_out, k_in = fft2c(channels_to_complex(out)), fft2c(channels_to_complex(x))
    assert torch.allclose(k_out[..., mask], y[..., mask], rtol=0, atol=1e-12)  # measured: the measurement
    assert torch.allclose(k_out[..., ~mask], k_in[..., ~mask], rtol=0, atol=1e-12)  # the rest: untouched
    assert torch.allclose(dc(out, 10), out, atol=1e-12)  # a projection is idempotent
    assert float(residual(op, y, out).max()) < 1e-12


def test_multi_coil_replacement_is_coil_kspace_replacement_then_combination():
    mask = undersampling_mask((12, 12), 3, 0.25, "gaussian", 2, seed=3)
    maps = crandn(1, 3, 12, 12, seed=4)
    maps = maps / torch.sqrt((maps.abs() ** 2).sum(dim=1, keepdim=True))  # sum |S|^2 = 1
    op = MultiCoilMRI(mask, maps)
    y = op.forward(crandn(1, 1, 12, 12, seed=5))
    x = crandn(1, 1, 12, 12, seed=6)
    out = KSpaceReplacement(op, y)(x, 0)
    assert torch.allclose(out, x + op.adjoint(y - op.forward(x)), atol=1e-12)
    expected = (maps.conj() * ifft2c(torch.where(mask, y, fft2c(maps * x)))).sum(dim=1, keepdim=True)
    assert torch.allclose(out, expected, atol=1e-12)
    assert float(residual(op, y, out)) < float(residual(op, y, x))


def test_pocs_ct_step_normaliser_and_convergence():
    op = ParallelBeamCT((8, 8), parallel_beam_angles(6))
    truth = torch.rand(1, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = op.forward(truth)
    matrix = torch.stack([op.forward(e.reshape(1, 1, 8, 8)).flatten() for e in torch.eye(64, dtype=F64)], dim=1)
    largest = float(torch.linalg.eigvalsh(matrix.T @ matrix)[-1])
    dc = POCSProjection(op, y, step=1.0)
    x = torch.zeros(1, 1, 8, 8, dtype=F64)
    once = dc(x, 3)
    assert dc.normaliser == pytest.approx(largest, rel=1e-3)  # power iteration = ||A||^2
    assert torch.allclose(once, x + op.adjoint(y - op.forward(x)) / dc.normaliser, atol=1e-12)
    residuals = [float(residual(op, y, x))]
    for _ in range(5):
        x = dc(x, 3)
        residuals.append(float(residual(op, y, x)))
    assert all(b < a for a, b in zip(residuals, residuals[1:]))
    assert isinstance(hard_projection(op, y), POCSProjection)
    with pytest.raises(ValueError, match=r"step must be in \(0, 2\)"):
        POCSProjection(op, y, step=2.5)


def test_xt_projection_targets_the_noised_measurement(mri):
    op, mask, _, y = mri
    process = DiscreteVP.from_schedule("linear", 100)
    x = crandn(2, 1, 16, 16, seed=8)
    alpha, sigma = (float(v) for v in process.alpha_sigma(40))
    mean_only = KSpaceReplacement(op, y, space="xt", process=process, measurement_noise=False)
    assert torch.allclose(fft2c(mean_only(x, 40))[..., mask], alpha * y[..., mask], atol=1e-12)
    noisy = KSpaceReplacement(op, y, space="xt", process=process, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    z = torch.complex(torch.randn(x.shape, generator=g, dtype=F64), torch.randn(x.shape, generator=g, dtype=F64))
    expected = alpha * y + sigma * op.forward(z)
    assert torch.allclose(fft2c(noisy(x, 40))[..., mask], expected[..., mask], atol=1e-12)
    assert torch.allclose(fft2c(noisy(x, process.t_clean))[..., mask], y[..., mask], atol=1e-12)  # clean: y
    with pytest.raises(ValueError, match="space='xt' needs the diffusion process"):
        KSpaceReplacement(op, y, space="xt")


def test_dc_rejects_bad_measurements(mri):
    op, _, _, y = mri
    bad = y.clone()
    bad[0, 0, 0, 8] = float("nan")
    with pytest.raises(MeasurementError, match="case_3.h5: k-space contains 1 non-finite"):
        KSpaceReplacement(op, bad, source="case_3.h5")
    with pytest.raises(MeasurementError, match="disagrees with mask shape"):
        hard_projection(op, y[..., :12])
    with pytest.raises(TypeError, match="use POCSProjection for CT"):
        KSpaceReplacement(ParallelBeamCT((8, 8), parallel_beam_angles(4)), torch.zeros(1, 1, 4, 12))


# ------------------------------------------------------------------------------------------------
# DPS and MCG
# ------------------------------------------------------------------------------------------------
def test_dps_gradient_closed_form(mri):
    op, _, _, y = mri
    x = complex_to_channels(crandn(2, 1, 16, 16, seed=9))
    grad = dps_gradient(x, lambda v: 0.5 * v, op, y, normalise=False)
    z = channels_to_complex(0.5 * x)
    expected = complex_to_channels(2 * 0.5 * op.adjoint(op.forward(z) - y))  # chain rule through 0.5 x
    assert torch.allclose(grad, expected, atol=1e-10)
    normalised = dps_gradient(x, lambda v: 0.5 * v, op, y)
    norms = measurement_loss(op, y, 0.5 * x).sqrt()
    assert torch.allclose(normalised, expected / norms[:, None, None, None], atol=1e-10)


def test_dps_guidance_is_the_likelihood_gradient_through_the_model(mri):
    op, _, _, y = mri
    process = DiscreteVP.from_schedule("linear", 100)

    def model(x, t_net, cond):  # eps prediction 0.1 x: x0_hat = (1 - 0.1 sigma) x / alpha
        return 0.1 * x

    guidance = DPSGuidance(op, y, model, process, "eps", normalise=False)
    x = complex_to_channels(crandn(2, 1, 16, 16, seed=10))
    t_net = process.model_time(torch.tensor([30, 30]), dtype=F64)
    alpha, sigma = (float(v) for v in process.alpha_sigma(30))
    c = (1 - 0.1 * sigma) / alpha
    z = channels_to_complex(c * x)
    expected = -complex_to_channels(2 * c * op.adjoint(op.forward(z) - y))
    assert torch.allclose(guidance(x, t_net, None), expected, atol=1e-10)


def test_dps_and_mcg_run_inside_ddim_and_end_on_the_measurement(mri):
    op, mask, _, y = mri
    process = DiscreteVP.from_schedule("linear", 100)
    sampler = DDIMSampler(process, "eps")
    g = torch.Generator().manual_seed(0)
    out = sample(sampler, zero_model, (2, 2, 16, 16), num_steps=5, generator=g, dtype=F64,
                 **dps_hooks(op, y, zero_model, process, "eps", scale=0.5))
    free = sample(sampler, zero_model, (2, 2, 16, 16), num_steps=5, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert float(residual(op, y, out.sample).mean()) < float(residual(op, y, free.sample).mean())
    hooks = mcg_hooks(op, y, zero_model, process, "eps", scale=0.5, generator=torch.Generator().manual_seed(1))
    assert set(hooks) == {"classifier_grad", "classifier_scale", "consistency_xt"}
    out = sample(sampler, zero_model, (2, 2, 16, 16), num_steps=5, generator=g, dtype=F64, **hooks)
    k = fft2c(channels_to_complex(out.sample))
    assert torch.allclose(k[..., mask], y[..., mask], rtol=0, atol=1e-12)  # MCG's last projection uses y itself


# ------------------------------------------------------------------------------------------------
# inside real samplers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_hard_dc_inside_ddim_leaves_measured_samples_exact(mri, dtype, tol):
    op, mask, _, y = mri
    y = y.to(torch.complex128 if dtype == F64 else torch.complex64)
    process = DiscreteVP.from_schedule("cosine", 100)
    sampler = DDIMSampler(process, "eps")
    calls = []

    def hook(x0, t):
        calls.append(t)
        return dc(x0, t)

    dc = KSpaceReplacement(op, y)
    out = sample(sampler, zero_model, (2, 2, 16, 16), num_steps=4, consistency=hook, dtype=dtype,
                 generator=torch.Generator().manual_seed(0))
    assert len(calls) == 4 and out.sample.dtype == dtype
    k = fft2c(channels_to_complex(out.sample))
    scale = float(k.abs().max())  # float32: FFT rounding relative to the whole k-space, not just y
    assert torch.allclose(k[..., mask], y[..., mask], rtol=0, atol=tol * scale)


def test_score_mri_predictor_corrector_with_xt_projection(mri):
    op, mask, _, y = mri
    process = VESDE(sigma_min=0.01, sigma_max=5.0)
    sampler = PredictorCorrectorSampler(process, "score", num_steps=4)

    def gaussian_score(x, t_net, cond):  # exact score of N(0, I) data under VE noise (t_net = log sigma)
        return -x / (1 + torch.exp(2 * t_net.to(x.dtype)))[:, None, None, None]

    hooks = projection_hooks(op, y, space="xt", process=process, generator=torch.Generator().manual_seed(2))
    out = sample(sampler, gaussian_score, (2, 2, 16, 16), generator=torch.Generator().manual_seed(0), dtype=F64, **hooks)
    k = fft2c(channels_to_complex(out.sample))
    assert torch.allclose(k[..., mask], y[..., mask], rtol=0, atol=1e-12)


def test_pocs_inside_ddim_for_sparse_view_ct():
    op = ParallelBeamCT((12, 12), parallel_beam_angles(8))
    truth = torch.zeros(1, 1, 12, 12, dtype=F64)
    truth[..., 3:9, 4:8] = 1.0
    y = op.forward(truth)
    sampler = DDIMSampler(DiscreteVP.from_schedule("linear", 100), "eps")
    t0, x_t0 = warm_start_state(sampler.process, warm_start_image(op, y), 30, noise=0)
    free = sample(sampler, zero_model, start_at=(t0, x_t0), num_steps=6)
    dc = sample(sampler, zero_model, start_at=(t0, x_t0), num_steps=6, consistency=POCSProjection(op, y, iterations=3))
    assert float(residual(op, y, dc.sample)) < 0.5 * float(residual(op, y, free.sample))


# ------------------------------------------------------------------------------------------------
# warm start
# ------------------------------------------------------------------------------------------------
def test_warm_start_images(mri):
    op, mask, truth, y = mri
    zero_filled = warm_start_image(op, y)
    assert torch.allclose(zero_filled, complex_to_channels(ifft2c(mask * fft2c(truth))), atol=1e-12)
    ct = ParallelBeamCT((10, 10), parallel_beam_angles(20))
    image = torch.rand(1, 1, 10, 10, dtype=F64)
    assert torch.allclose(warm_start_image(ct, ct.forward(image), "hann"), ct.fbp(ct.forward(image), "hann"))


def test_warm_start_state_forwards_to_t0():
    process = DiscreteVP.from_schedule("linear", 100)
    x = torch.rand(2, 2, 8, 8, dtype=F64)
    noise = torch.randn(2, 2, 8, 8, dtype=F64)
    t0, x_t0 = warm_start_state(process, x, 40, noise)
    alpha, sigma = (float(v) for v in process.alpha_sigma(40))
    assert t0 == 40.0 and torch.allclose(x_t0, alpha * x + sigma * noise)
    assert torch.equal(warm_start_state(process, x, 40, 5)[1], warm_start_state(process, x, 40, 5)[1])
    assert not torch.equal(warm_start_state(process, x, 40, 5)[1], warm_start_state(process, x, 40, 6)[1])
    with pytest.raises(ValueError, match=r"t0 must lie in \(-1, 99\]"):
        warm_start_state(process, x, 150, noise)
    with pytest.raises(MeasurementError, match="noise has shape"):
        warm_start_state(process, x, 40, noise[:1])


# ------------------------------------------------------------------------------------------------
# precision and real (magnitude) priors: the complex measurement keeps its imaginary part
# ------------------------------------------------------------------------------------------------
def test_match_precision_keeps_complex_and_follows_the_sample():
    from nndiff.tasks.operators import match_precision

    y = crandn(1, 1, 4, 4)  # complex128
    assert match_precision(y, torch.zeros(1, dtype=torch.float32)).dtype == torch.complex64
    assert match_precision(y, torch.zeros(1, dtype=torch.bfloat16)).dtype == torch.complex64  # autocast samples
    assert match_precision(y.to(torch.complex64), torch.zeros(1, dtype=F64)).dtype == torch.complex128
    kept = match_precision(y, torch.zeros(1, dtype=torch.float32))
    torch.testing.assert_close(kept, y.to(torch.complex64))  # imaginary part intact
    assert match_precision(y.real, torch.zeros(1, dtype=torch.complex64)).dtype == torch.float32  # CT: real stays real


@pytest.mark.filterwarnings("error:Casting complex values to real:UserWarning")
@pytest.mark.parametrize("shape,dims", [((16, 16), 1), ((15, 17), 1), ((16, 16), 2), ((15, 17), 2)])
def test_real_prior_replacement_enforces_hermitian_measurement_in_float32(shape, dims):
    """A real image's k-space is Hermitian: the exact projection for a 1-channel prior keeps the real
    float32 sample real and makes its measured k-space equal the complex measurement (even / odd sizes)."""
    from nndiff.tasks.data_consistency import RealKSpaceReplacement
    from nndiff.tasks.operators import RealImageOperator, mirror_kspace

    g = torch.Generator().manual_seed(2)
    truth = torch.rand(2, 1, *shape, generator=g)
    mask = undersampling_mask(shape, 4, 0.125, "random", dims, seed=3)
    y = SingleCoilMRI(mask).forward(truth.to(torch.complex64))
    assert float(y.imag.abs().max()) > 0.1
    op = RealImageOperator(SingleCoilMRI(mask))
    dc = hard_projection(op, y)
    assert isinstance(dc, RealKSpaceReplacement)
    x = 0.8 * truth + 0.05 * torch.randn(truth.shape, generator=g)
    out = dc(x, 0)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert float(residual(op, y, out).max()) < 1e-5
    assert float(residual(op, y, x).min()) > 0.1
    # frequencies neither measured nor mirrors of measured ones keep the prior's values
    free = ~(mask | mirror_kspace(mask))
    torch.testing.assert_close(fft2c(out.to(torch.complex64))[..., free], fft2c(x.to(torch.complex64))[..., free],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(dc(out, 0), out, rtol=0, atol=1e-5)  # idempotent


def test_real_prior_replacement_of_complex_measurement_is_the_least_squares_projection():
    """Non-Hermitian y (complex object, real prior): no real image matches it; the result equals the
    limit of POCS steps x + Re(A^H (y - A x)) started at x (the nearest least-squares real image)."""
    from nndiff.tasks.operators import RealImageOperator

    mask = undersampling_mask((12, 12), 3, 0.25, "random", 2, seed=4)
    inner = SingleCoilMRI(mask)
    y = inner.forward(crandn(1, 1, 12, 12, seed=5))
    op = RealImageOperator(inner)
    x = torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(6), dtype=F64)
    out = hard_projection(op, y)(x, 0)
    pocs = x
    for _ in range(80):  # contracts by 1/2 per step on the frequencies whose mirror is unmeasured
        pocs = pocs + op.adjoint(y - op.forward(pocs))
    torch.testing.assert_close(out, pocs, rtol=0, atol=1e-10)
    gradient = op.adjoint(op.forward(out) - y)  # normal equations of min ||A x - y||
    assert float(gradient.abs().max()) < 1e-12
    assert float(residual(op, y, out)) > 0.1  # the imaginary object cannot be matched by a real image


def test_real_image_operator_is_adjoint_consistent_and_refuses_real_operators():
    from nndiff.tasks.operators import RealImageOperator

    op = RealImageOperator(SingleCoilMRI(undersampling_mask((8, 10), 2, 0.25, "random", 1, seed=1)))
    x = torch.randn(1, 1, 8, 10, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = crandn(1, 1, 8, 10, seed=2)
    lhs = torch.vdot(op.forward(x).flatten(), y.flatten()).real  # real inner product on the real image space
    assert float(lhs) == pytest.approx(float((x * op.adjoint(y)).sum()), rel=1e-10)
    assert op.forward(x.float()).dtype == torch.complex64 and op.forward(x).dtype == torch.complex128
    with pytest.raises(TypeError, match="complex-image operator"):
        RealImageOperator(ParallelBeamCT((8, 8), parallel_beam_angles(4)))
