"""Degradation simulators (target statistics, seeding, level ranges, CT projector plumbing), the
single-image noise estimator, and the noise-level -> diffusion-time match."""
from __future__ import annotations

import math

import pytest
import torch

from nndiff.diffusion.processes import VESDE, VPSDE, DiscreteVE, DiscreteVP, SubVPSDE
from nndiff.errors import NnDiffError
from nndiff.tasks.degradations import (
    MAD_TO_SIGMA,
    CTProjector,
    DegradationError,
    attenuation_to_hu,
    estimate_noise_sigma,
    gaussian_noise,
    haar_diagonal_details,
    hu_to_attenuation,
    matching_timestep,
    noise_to_signal,
    noisy_image_state,
    poisson_noise,
    rician_noise,
    sample_levels,
    simulate,
    transmission_noise,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_phantom(*shape: int) -> torch.Tensor:
    """Sum of two broad Gaussian blobs plus a ramp in [-1, 1]^d: no structure at the voxel scale."""
    axes = torch.meshgrid(*(torch.linspace(-1, 1, n, dtype=torch.float64) for n in shape), indexing="ij")
    r1 = sum((a - 0.2) ** 2 for a in axes)
    r2 = sum((a + 0.3) ** 2 for a in axes)
    return (torch.exp(-r1 / 0.3) + 0.5 * torch.exp(-r2 / 0.1) + 0.1 * axes[-1]).float()


def disc_phantom(n: int = 64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    return 0.25 + 0.75 * ((xx**2 + yy**2) < 0.5).float()  # max 1.0, min 0.25


# --------------------------------------------------------------------------------------------------
# simulators: target statistics
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", [0.02, 0.1])
def test_gaussian_std_relative_to_per_case_max(level):
    clean = torch.stack([disc_phantom(), 2.0 * disc_phantom(), 4.0 * disc_phantom()])[:, None]  # maxima 1, 2, 4
    noisy = simulate("gaussian", clean, level, gen())
    for case, maximum in enumerate((1.0, 2.0, 4.0)):
        std = float((noisy[case] - clean[case]).std())
        assert std == pytest.approx(level * maximum, rel=0.02)
    assert float((noisy - clean).mean()) == pytest.approx(0.0, abs=0.01 * level * 4)


def test_gaussian_absolute_std_with_reference_one_in_3d():
    clean = 100.0 + torch.zeros(4, 1, 16, 16, 16)
    noisy = gaussian_noise(clean, 0.5, gen(1), reference=1.0)
    assert noisy.shape == clean.shape
    assert float((noisy - clean).std()) == pytest.approx(0.5, rel=0.02)


def test_rician_zero_signal_is_rayleigh_and_second_moment_exact():
    sigma = 0.05
    zero = torch.zeros(8, 1, 64, 64)
    noisy = rician_noise(zero, sigma, gen(2), reference=1.0)
    assert torch.all(noisy >= 0)
    assert float(noisy.mean()) == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.01)
    # E[M^2] = A^2 + 2 s^2 for any signal A.
    signal = torch.full((8, 1, 64, 64), 0.3)
    magnitude = rician_noise(signal, sigma, gen(3), reference=1.0)
    assert float((magnitude**2).mean()) == pytest.approx(0.3**2 + 2 * sigma**2, rel=0.005)


def test_rician_of_complex_image_uses_its_phase():
    z = torch.polar(torch.full((4, 1, 32, 32), 1.0), torch.full((4, 1, 32, 32), 2.0))
    magnitude = rician_noise(z, 1e-6, gen(), reference=1.0)
    assert torch.allclose(magnitude, torch.ones_like(magnitude), atol=1e-5)


def test_poisson_variance_equals_mean_in_counts():
    clean = torch.full((8, 1, 64, 64), 3.0)  # any units: scaled to 50 counts per voxel
    noisy = poisson_noise(clean, 50.0, gen(4))
    counts = noisy * (50.0 / 3.0)
    assert torch.allclose(counts, counts.round(), atol=1e-3)  # whole counts
    assert float(counts.mean()) == pytest.approx(50.0, rel=0.01)
    assert float(counts.var()) == pytest.approx(50.0, rel=0.03)


def test_poisson_level_is_relative_noise_at_the_mean_and_keeps_zero_cases():
    clean = torch.stack([disc_phantom(), torch.zeros(64, 64)])[:, None]
    noisy = simulate("poisson", clean, 0.1, gen(5))  # 1 / 0.1^2 = 100 counts per voxel on average
    scale = 100.0 / float(clean[0].mean())
    inside = clean[0] == 1.0
    counts = noisy[0][inside] * scale
    assert float(counts.var() / counts.mean()) == pytest.approx(1.0, rel=0.05)
    assert torch.equal(noisy[1], clean[1])


def test_ct_transmission_noise_with_identity_projector():
    # Identity "projector": every pixel is one ray of line integral p; -log(N / I0) has mean ~p and
    # variance ~exp(p) / I0 (delta method; N ~ Poisson(I0 exp(-p)) ~ 3700 counts here).
    p, photons = 1.0, 1e4
    mu = torch.full((4, 1, 64, 64), p, dtype=torch.float64)
    noisy = transmission_noise(mu, photons, lambda x: x, lambda s: s, gen(6))
    assert float(noisy.mean()) == pytest.approx(p, abs=2e-3)
    assert float(noisy.var()) == pytest.approx(math.exp(p) / photons, rel=0.05)


def test_ct_reconstruct_is_applied_to_the_noisy_sinogram():
    # Two identical "views" averaged by the reconstruction: half the variance of one view.
    project = lambda x: torch.stack([x, x], dim=2)  # noqa: E731  (N, C, 2, H, W)
    reconstruct = lambda s: s.mean(dim=2)  # noqa: E731
    mu = torch.full((4, 1, 64, 64), 0.5, dtype=torch.float64)
    noisy = transmission_noise(mu, 1e4, project, reconstruct, gen(7))
    assert noisy.shape == mu.shape
    assert float(noisy.var()) == pytest.approx(math.exp(0.5) / 1e4 / 2, rel=0.05)


def test_ct_low_dose_through_simulate_works_in_hu():
    ct = CTProjector(project=lambda x: x, reconstruct=lambda s: s, pixel_mm=10.0)
    hu = torch.full((4, 1, 32, 32), 0.0, dtype=torch.float64)  # water: mu = 0.019 * 10 = 0.19 per pixel
    low, high = simulate("poisson", hu, 0.01, gen(8), ct=ct), simulate("poisson", hu, 0.03, gen(8), ct=ct)
    assert float(low.mean()) == pytest.approx(0.0, abs=5.0)
    # level 0.01 -> 1e4 photons; HU noise std = 1000 / mu_pixel * sqrt(exp(mu) / I0)
    expected = 1000 / 0.19 * math.sqrt(math.exp(0.19) / 1e4)
    assert float(low.std()) == pytest.approx(expected, rel=0.05)
    assert float(high.std()) > 2.5 * float(low.std())


def test_hu_attenuation_round_trip_and_air_clip():
    hu = torch.tensor([-1000.0, 0.0, 1000.0, 3000.0], dtype=torch.float64)
    assert torch.allclose(attenuation_to_hu(hu_to_attenuation(hu, 0.7), 0.7), hu)
    assert float(hu_to_attenuation(torch.tensor(-1200.0))) == 0.0


# --------------------------------------------------------------------------------------------------
# seeding, levels, devices
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gaussian", "rician", "poisson"])
def test_seeded_determinism(kind):
    clean = disc_phantom(32)[None, None].repeat(2, 1, 1, 1)
    a, b = simulate(kind, clean, [0.02, 0.1], gen(9)), simulate(kind, clean, [0.02, 0.1], gen(9))
    c = simulate(kind, clean, [0.02, 0.1], gen(10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_level_ranges_are_sampled_within_bounds_per_case():
    levels = sample_levels([0.02, 0.1], 200, gen(11))
    assert levels.shape == (200,)
    assert float(levels.min()) >= 0.02 and float(levels.max()) <= 0.1
    assert float(levels.max() - levels.min()) > 0.06  # spread over the range, not a single draw
    clean = torch.zeros(6, 1, 64, 64)
    noisy = simulate("gaussian", clean, [0.05, 0.2], gen(12), reference=1.0)
    stds = noisy.flatten(1).std(dim=1)
    assert torch.all(stds > 0.05 * 0.95) and torch.all(stds < 0.2 * 1.05)
    assert float(stds.max() / stds.min()) > 1.1  # different levels per case


def test_per_case_level_tensor_and_single_image_input():
    clean = torch.zeros(2, 1, 64, 64)
    noisy = simulate("gaussian", clean, torch.tensor([0.01, 0.1]), gen(), reference=1.0)
    assert float(noisy[0].std()) == pytest.approx(0.01, rel=0.05)
    assert float(noisy[1].std()) == pytest.approx(0.1, rel=0.05)
    single = simulate("gaussian", torch.zeros(64, 64), 0.1, gen(), reference=1.0)  # one (H, W) image
    assert single.shape == (64, 64) and float(single.std()) == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize("kind,level,match", [
    ("salt", 0.1, "valid values: gaussian, rician, poisson"),
    ("gaussian", -0.1, "must be finite and > 0"),
    ("gaussian", [0.2, 0.1], "low <= high"),
    ("gaussian", [0.1, 0.2, 0.3], "low <= high"),
])
def test_bad_settings_raise_clear_errors(kind, level, match):
    with pytest.raises(DegradationError, match=match):
        simulate(kind, torch.zeros(1, 1, 8, 8), level, gen())


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(DegradationError, match="non-negative intensities.*-1"):
        simulate("poisson", -torch.ones(1, 1, 8, 8), 0.1, gen())
    ct = CTProjector(lambda x: x, lambda s: s)
    with pytest.raises(DegradationError, match="only applies to the 'poisson'"):
        simulate("rician", torch.zeros(1, 1, 8, 8), 0.1, gen(), ct=ct)
    with pytest.raises(DegradationError, match=r"shape \(3,\)"):
        gaussian_noise(torch.zeros(3, 1, 8, 8), torch.tensor([0.1, 0.2]), gen())
    assert issubclass(DegradationError, NnDiffError)


# --------------------------------------------------------------------------------------------------
# noise estimation
# --------------------------------------------------------------------------------------------------
def test_haar_diagonal_details_of_a_known_block():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    assert float(haar_diagonal_details(x, 2)) == pytest.approx((1 - 2 - 3 + 5) / 2)
    ramp = torch.arange(16.0).reshape(4, 4) + torch.arange(4.0)[:, None] * 3  # linear: no diagonal detail
    assert torch.allclose(haar_diagonal_details(ramp, 2), torch.zeros(2, 2))
    cube = torch.randn(6, 6, 6, generator=gen())
    assert haar_diagonal_details(cube, 3).shape == (3, 3, 3)


# 128^2 and 32^3 give 4096 detail coefficients: the MAD estimate's sampling error is ~2 %.
@pytest.mark.parametrize("shape", [(128, 128), (32, 32, 32)])
@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.1])
def test_noise_estimate_recovers_sigma_on_smooth_phantom(shape, sigma):
    clean = smooth_phantom(*shape)[None, None].repeat(2, 1, *(1,) * len(shape))
    noisy = simulate("gaussian", clean, sigma, gen(13), reference=1.0)
    estimate = estimate_noise_sigma(noisy)
    assert estimate.shape == (2, 1)
    assert torch.allclose(estimate, torch.full_like(estimate, sigma), rtol=0.10)


def test_noise_estimate_with_mask_ignores_rician_background():
    # Magnitude MR: the Rayleigh background biases the estimate low; a foreground mask removes it.
    clean = torch.zeros(1, 1, 128, 128)
    clean[..., 32:96, :] = 1.0  # half the image is signal (SNR 20: Rician ~ Gaussian there)
    noisy = rician_noise(clean, 0.05, gen(14), reference=1.0)
    whole = float(estimate_noise_sigma(noisy))
    inside = float(estimate_noise_sigma(noisy, mask=clean > 0))
    assert inside == pytest.approx(0.05, rel=0.1)
    assert whole < 0.9 * inside


def test_noise_estimate_needs_spatial_dims_for_ambiguous_shapes_and_a_usable_mask():
    with pytest.raises(DegradationError, match="spatial_dims=2 or 3"):
        estimate_noise_sigma(torch.zeros(4, 8, 8))
    assert estimate_noise_sigma(torch.zeros(4, 8, 8), spatial_dims=2).shape == (4,)
    with pytest.raises(DegradationError, match="no 2x2"):
        estimate_noise_sigma(torch.zeros(8, 8), mask=torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(DegradationError, match="does not broadcast"):
        estimate_noise_sigma(torch.zeros(8, 8), mask=torch.ones(3, 3, dtype=torch.bool))
    assert MAD_TO_SIGMA == pytest.approx(0.67449, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# noise level -> diffusion time
# --------------------------------------------------------------------------------------------------
PROCESSES = [DiscreteVP.from_schedule("linear"), DiscreteVP.from_schedule("cosine"), DiscreteVE.geometric(),
             VPSDE(), SubVPSDE(), VESDE()]


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.kind.value)
def test_matching_timestep_inverts_the_noise_level(process):
    times = [0.0, 17.0, 250.0, 999.0] if process.is_discrete else [process.t_min, 0.1, 0.37, 0.9]
    for t in times:
        level = float(noise_to_signal(process, t))
        found = matching_timestep(level, process)
        assert isinstance(found, float)
        assert found == pytest.approx(t, abs=0 if process.is_discrete else 1e-9)
    batch = torch.tensor([float(noise_to_signal(process, t)) for t in times], dtype=torch.float64)
    assert torch.allclose(matching_timestep(batch, process), torch.tensor(times, dtype=torch.float64), atol=1e-9)


def test_matching_timestep_rounds_up_between_discrete_levels_and_clamps():
    process = DiscreteVP.from_schedule("linear")
    between = 0.5 * float(noise_to_signal(process, 100) + noise_to_signal(process, 101))
    assert matching_timestep(between, process) == 101.0  # never less noise than the image carries
    assert matching_timestep(1e-9, process) == 0.0
    assert matching_timestep(1e9, process) == process.t_max
    assert matching_timestep(1e9, VPSDE()) == pytest.approx(1.0)
    with pytest.raises(DegradationError, match="> 0"):
        matching_timestep(0.0, process)


@pytest.mark.parametrize("process", [DiscreteVP.from_schedule("linear"), VPSDE(), VESDE()],
                         ids=lambda p: p.kind.value)
def test_noisy_image_state_follows_the_marginal(process):
    x0 = torch.zeros(4, 1, 64, 64, dtype=torch.float64)
    sigma = 0.2
    noisy = x0 + sigma * torch.randn(x0.shape, generator=gen(15), dtype=torch.float64)
    between = float(noise_to_signal(process, matching_timestep(sigma, process)))
    t0, state = noisy_image_state(process, noisy, sigma, noise=gen(16))
    assert t0 == matching_timestep(sigma, process) and between >= sigma * (1 - 1e-6)
    alpha, sigma_t = process.alpha_sigma(t0)
    assert float(state.std()) == pytest.approx(float(sigma_t), rel=0.02)  # exactly sigma_t of noise
    _, from_given = noisy_image_state(process, noisy, sigma, t0, noise=torch.zeros_like(noisy))
    assert torch.allclose(from_given, float(alpha) * noisy)  # zero top-up noise: just alpha * y
