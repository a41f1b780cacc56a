"""Forward operators for reconstruction: FFT, masks, MRI (single / multi-coil), sensitivities, CT."""
from __future__ import annotations

import math

import pytest
import torch

from nndiff.errors import NnDiffError
from nndiff.tasks.operators import (
    MaskPattern,
    MeasurementError,
    MultiCoilMRI,
    ParallelBeamCT,
    SingleCoilMRI,
    calibration_region,
    channels_to_complex,
    complex_to_channels,
    estimate_sensitivity_maps,
    expand_mask,
    fft2c,
    ifft2c,
    mask_acceleration,
    parallel_beam_angles,
    rss,
    sensitivity_combine,
    undersampling_mask,
)

F64 = torch.float64
C128 = torch.complex128
ALL_MASKS = [(p, d) for p in MaskPattern for d in (1, 2)]


def crandn(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64))


def inner(a: torch.Tensor, b: torch.Tensor) -> complex:
    return complex(torch.vdot(b.flatten(), a.flatten()))  # <a, b> = sum a conj(b)


def assert_adjoint(op, x: torch.Tensor, y: torch.Tensor) -> None:
    lhs, rhs = inner(op.forward(x), y), inner(x, op.adjoint(y))
    assert abs(lhs - rhs) <= 1e-5 * max(abs(lhs), 1e-12), (lhs, rhs)


# ------------------------------------------------------------------------------------------------
# FFT and channel layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (1, 3, 15, 12)])
def test_fft2c_is_unitary_centred_and_inverted(shape):
    x = crandn(*shape)
    k = fft2c(x)
    assert torch.allclose(torch.linalg.vector_norm(k), torch.linalg.vector_norm(x), rtol=1e-12)  # Parseval
    assert torch.allclose(ifft2c(k), x, atol=1e-12)
    h, w = shape[-2:]
    const = torch.ones(h, w, dtype=C128)
    kc = fft2c(const)
    assert kc[h // 2, w // 2].real == pytest.approx(math.sqrt(h * w))  # DC in the centre, orthonormal scale
    kc[h // 2, w // 2] = 0
    assert kc.abs().max() < 1e-12


def test_fft2c_adjoint_and_differentiable():
    x, y = crandn(1, 1, 8, 8, seed=1), crandn(1, 1, 8, 8, seed=2)
    assert inner(fft2c(x), y) == pytest.approx(inner(x, ifft2c(y)), abs=1e-12)
    xr = torch.randn(1, 2, 6, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: torch.view_as_real(fft2c(channels_to_complex(v))), (xr,))


def test_channel_pairs_round_trip_and_layout():
    z = crandn(2, 3, 4, 5)
    ch = complex_to_channels(z)
    assert ch.shape == (2, 6, 4, 5)
    assert torch.equal(ch[:, 2], z[:, 1].real) and torch.equal(ch[:, 3], z[:, 1].imag)  # (re_c, im_c) at 2c, 2c+1
    assert torch.equal(channels_to_complex(ch), z)
    with pytest.raises(MeasurementError, match="even channel count"):
        channels_to_complex(torch.zeros(1, 3, 4, 4))


def test_rss_combination():
    coils = crandn(2, 4, 6, 6)
    expected = torch.sqrt(sum(coils[:, c].abs() ** 2 for c in range(4)))[:, None]
    assert torch.allclose(rss(coils), expected, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern,dims", ALL_MASKS)
@pytest.mark.parametrize("acceleration", [1.0, 3.0, 4.0, 8.0])
def test_mask_count_centre_and_determinism(pattern, dims, acceleration):
    shape, cf = (32, 30), 0.08
    mask = undersampling_mask(shape, acceleration, cf, pattern, dims, seed=5)
    assert mask.shape == shape and mask.dtype == torch.bool
    n = shape[1] if dims == 1 else shape[0] * shape[1]
    lines = mask[0] if dims == 1 else mask.flatten()
    assert int(lines.sum()) == round(n / acceleration)  # exact acceleration up to rounding
    if dims == 1:
        assert torch.equal(mask, mask[:1].expand(shape))  # whole phase-encode columns
        nc = round(cf * shape[1])
        start = (shape[1] - nc + 1) // 2
        assert mask[:, start:start + nc].all() and start <= shape[1] // 2 < start + nc
    else:
        rows = slice((32 - round(cf * 32) + 1) // 2, (32 - round(cf * 32) + 1) // 2 + round(cf * 32))
        cols = slice((30 - round(cf * 30) + 1) // 2, (30 - round(cf * 30) + 1) // 2 + round(cf * 30))
        assert mask[rows, cols].all()
    assert mask_acceleration(mask) == pytest.approx(mask.numel() / float(mask.sum()))
    assert torch.equal(mask, undersampling_mask(shape, acceleration, cf, pattern, dims, seed=5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(mask, undersampling_mask(shape, acceleration, cf, pattern, dims, seed=g))


@pytest.mark.parametrize("pattern,dims", ALL_MASKS)
def test_mask_seed_changes_pattern(pattern, dims):
    masks = {tuple(undersampling_mask((32, 32), 4, 0.08, pattern, dims, seed=s).flatten().tolist()) for s in range(4)}
    assert len(masks) > 1


def test_equispaced_1d_is_regular_outside_centre():
    mask = undersampling_mask((8, 64), 4, 0.0, "equispaced", 1, seed=2)[0]
    gaps = torch.diff(torch.nonzero(mask).flatten())
    assert int(mask.sum()) == 16 and set(gaps.tolist()) == {4}


def test_gaussian_density_favours_the_centre():
    mask = undersampling_mask((32, 32), 4, 0.0, "gaussian", 2, seed=0, gaussian_std=0.15)
    yy, xx = torch.meshgrid(torch.arange(32) - 16, torch.arange(32) - 16, indexing="ij")
    inner_ring = (yy**2 + xx**2) <= 8**2
    density_in = mask[inner_ring].float().mean()
    density_out = mask[~inner_ring].float().mean()
    assert density_in > 3 * density_out


@pytest.mark.parametrize("bad", [0.5, 0.0, -2.0, float("nan"), float("inf")])
def test_mask_acceleration_below_one_is_an_error(bad):
    with pytest.raises(MeasurementError, match="acceleration must be a finite number >= 1"):
        undersampling_mask((16, 16), bad)


def test_mask_argument_errors():
    with pytest.raises(MeasurementError, match="needs 8 fully sampled columns but acceleration 8 allows only 4"):
        undersampling_mask((16, 32), 8, 0.25)
    with pytest.raises(MeasurementError, match="unknown mask pattern 'poisson'.*equispaced, random, gaussian"):
        undersampling_mask((16, 16), 4, pattern="poisson")
    with pytest.raises(MeasurementError, match="center_fraction must be in"):
        undersampling_mask((16, 16), 4, 1.5)
    with pytest.raises(MeasurementError, match="no k-space sample"):
        mask_acceleration(torch.zeros(4, 4))


# ------------------------------------------------------------------------------------------------
# MRI operators
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern,dims", ALL_MASKS)
def test_single_coil_adjoint(pattern, dims):
    mask = undersampling_mask((16, 12), 4, 0.1, pattern, dims, seed=1)
    op = SingleCoilMRI(mask)
    x, y = crandn(2, 1, 16, 12, seed=1), crandn(2, 1, 16, 12, seed=2)
    assert_adjoint(op, x, y)
    k = op.forward(x)
    assert torch.equal(k[..., ~mask], torch.zeros_like(k[..., ~mask]))
    assert torch.allclose(k[..., mask], fft2c(x)[..., mask])
    assert torch.allclose(op.normal(x), ifft2c(mask * fft2c(x)))


@pytest.mark.parametrize("pattern,dims", ALL_MASKS)
def test_multi_coil_adjoint(pattern, dims):
    mask = undersampling_mask((16, 12), 3, 0.1, pattern, dims, seed=2)
    maps = crandn(2, 4, 16, 12, seed=3)
    op = MultiCoilMRI(mask, maps)
    x, y = crandn(2, 1, 16, 12, seed=4), crandn(2, 4, 16, 12, seed=5)
    assert_adjoint(op, x, y)
    expected = sum(maps[:, c:c + 1].conj() * ifft2c(mask * y[:, c:c + 1]) for c in range(4))
    assert torch.allclose(op.adjoint(y), expected, atol=1e-12)
    assert torch.allclose(op.forward(x), mask * fft2c(maps * x), atol=1e-12)


def test_fastmri_1d_mask_is_accepted():
    columns = undersampling_mask((1, 12), 4, 0.2, "random", 1, seed=0)[0]  # (W,) as fastMRI stores it
    op = SingleCoilMRI(columns.float())
    x = crandn(1, 1, 10, 12)
    assert torch.allclose(op.forward(x), columns * fft2c(x))
    op.check_measurement(crandn(1, 1, 10, 12))


def test_kspace_mask_shape_mismatch_names_shapes_and_file():
    op = SingleCoilMRI(undersampling_mask((16, 12), 4, 0.1))
    with pytest.raises(MeasurementError, match=r"case_007.h5: k-space shape \(1, 1, 16, 10\) disagrees with mask shape \(16, 12\)"):
        op.check_measurement(crandn(1, 1, 16, 10), source="case_007.h5")
    with pytest.raises(NnDiffError, match="disagrees with mask shape"):
        op.forward(crandn(1, 1, 14, 12))
    multi = MultiCoilMRI(undersampling_mask((8, 8), 2, 0.25), crandn(3, 8, 8))
    with pytest.raises(MeasurementError, match=r"k-space shape \(1, 2, 8, 8\) disagrees with sens_maps shape \(3, 8, 8\)"):
        multi.check_measurement(crandn(1, 2, 8, 8))
    with pytest.raises(MeasurementError, match="sens_maps shape"):
        MultiCoilMRI(undersampling_mask((8, 8), 2, 0.25), crandn(3, 8, 6))


def test_bad_mask_values_and_non_finite_kspace():
    with pytest.raises(MeasurementError, match="x.h5: mask values must be 0 or 1.*acceleration below 1"):
        expand_mask(torch.full((4, 4), 2.0), (1, 1, 4, 4), source="x.h5")
    with pytest.raises(MeasurementError, match="mask measures no k-space sample"):
        SingleCoilMRI(torch.zeros(4, 4))
    op = SingleCoilMRI(torch.ones(4, 4))
    y = crandn(1, 1, 4, 4)
    y[0, 0, 1, 2] = complex("nan")
    y[0, 0, 0, 0] = complex("inf")
    with pytest.raises(MeasurementError, match="scan.npz: k-space contains 2 non-finite value"):
        op.check_measurement(y, source="scan.npz")


# ------------------------------------------------------------------------------------------------
# sensitivity maps
# ------------------------------------------------------------------------------------------------
def _smooth_maps(h: int, w: int) -> torch.Tensor:
    """Two coils with sum |S|^2 = 1 and only frequencies |k| <= 2: S1 = cos(theta), S2 = sin(theta) e^{i phi}."""
    u = torch.arange(h, dtype=F64)[:, None]
    v = torch.arange(w, dtype=F64)[None, :]
    theta = 2 * math.pi * u / h + 0.3
    phi = 2 * math.pi * v / w
    s1 = torch.cos(theta).expand(h, w).to(C128)
    s2 = torch.sin(theta) * torch.exp(1j * phi)
    return torch.stack([s1, s2])[None]  # (1, 2, H, W)


def test_sensitivity_estimation_reproduces_known_maps_and_combination():
    h, w = 16, 16
    maps = _smooth_maps(h, w)
    image = torch.full((1, 1, h, w), 2.5, dtype=C128)  # positive constant: band-limited coil images
    kspace = fft2c(maps * image)
    mask = undersampling_mask((h, w), 2, 0.375, "random", 1, seed=0)  # 6 centre columns cover |k| <= 2
    est = estimate_sensitivity_maps(mask * kspace, mask)
    assert torch.allclose(est, maps, atol=1e-10)
    assert torch.allclose(rss(est), torch.ones(1, 1, h, w, dtype=F64), atol=1e-12)
    coil_images = ifft2c(kspace)
    assert torch.allclose(sensitivity_combine(coil_images, est), image, atol=1e-10)
    assert torch.allclose(rss(coil_images), image.abs(), atol=1e-10)
    assert calibration_region(mask, kspace.shape)[1].stop - calibration_region(mask, kspace.shape)[1].start >= 6


def test_sensitivity_threshold_zeroes_background_and_needs_a_centre():
    maps = _smooth_maps(16, 16)
    image = torch.zeros(1, 1, 16, 16, dtype=C128)
    image[..., 4:12, 4:12] = 1.0
    kspace = fft2c(maps * image)
    est = estimate_sensitivity_maps(kspace, torch.ones(16, 16), threshold=0.5, window="hann")
    norm = rss(est)
    assert torch.all((norm == 0) | ((norm - 1).abs() < 1e-12))
    assert norm[..., 0, 0] == 0 and norm[..., 8, 8] == pytest.approx(1.0)
    no_centre = torch.ones(16, 16)
    no_centre[:, 8] = 0
    with pytest.raises(MeasurementError, match="no fully sampled centre.*give sens_maps"):
        estimate_sensitivity_maps(kspace, no_centre)


# ------------------------------------------------------------------------------------------------
# CT
# ------------------------------------------------------------------------------------------------
def phantom(n: int) -> torch.Tensor:
    """Shepp-Logan-like ellipses (skull, brain, ventricles, two lesions) with 1-pixel soft edges."""
    grid = torch.linspace(-1, 1, n, dtype=F64)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    pixel = 2 / (n - 1)
    image = torch.zeros(n, n, dtype=F64)
    ellipses = [(1.0, 0.72, 0.95, 0, 0, 0), (-0.7, 0.6, 0.82, 0, -0.02, 0), (-0.2, 0.14, 0.34, 0.24, 0, -18),
                (-0.2, 0.18, 0.42, -0.22, 0, 18), (0.3, 0.22, 0.26, 0, 0.4, 0), (0.2, 0.1, 0.1, 0, -0.5, 0)]
    for value, a, b, x0, y0, degrees in ellipses:
        t = math.radians(degrees)
        xr = (xx - x0) * math.cos(t) + (yy - y0) * math.sin(t)
        yr = -(xx - x0) * math.sin(t) + (yy - y0) * math.cos(t)
        r = torch.sqrt((xr / a) ** 2 + (yr / b) ** 2)
        image = image + value * torch.sigmoid((1 - r) * min(a, b) / pixel * 4)
    return image


@pytest.mark.parametrize("views,shape", [(180, (16, 16)), (12, (16, 20)), (7, (9, 13))])
def test_ct_adjoint(views, shape):
    op = ParallelBeamCT(shape, parallel_beam_angles(views))
    g = torch.Generator().manual_seed(views)
    x = torch.randn(2, 1, *shape, generator=g, dtype=F64)
    y = torch.randn(2, 1, *op.sinogram_shape, generator=g, dtype=F64)
    lhs, rhs = float((op.forward(x) * y).sum()), float((x * op.adjoint(y)).sum())
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)


def test_ct_chunked_equals_whole_and_batches():
    angles = parallel_beam_angles(10)
    whole = ParallelBeamCT((12, 12), angles)
    chunked = ParallelBeamCT((12, 12), angles, chunk_points=whole.num_detectors * whole.num_ray_points * 4 * 3,
                             cache_points=0)
    assert chunked.chunk_angles == 3 and whole.cached and not chunked.cached
    x = torch.randn(3, 2, 12, 12, dtype=F64)
    s = whole.forward(x)
    assert s.shape == (3, 2, 10, whole.num_detectors)
    assert torch.allclose(chunked.forward(x), s, atol=1e-12)
    assert torch.allclose(chunked.adjoint(s), whole.adjoint(s), atol=1e-12)
    assert torch.allclose(whole.forward(x), s, atol=0) and torch.allclose(chunked.forward(x), s, atol=1e-12)  # reuse
    assert torch.allclose(whole.forward(x[1:2, 1:2]), s[1:2, 1:2], atol=1e-12)


def test_ct_projection_of_a_disc_is_its_chord_length():
    n = 32
    grid = torch.arange(n, dtype=F64) - (n - 1) / 2
    disc = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= 10.0**2).to(F64)
    op = ParallelBeamCT((n, n), parallel_beam_angles(4))
    centre_bin = (op.num_detectors - 1) // 2
    sino = op.forward(disc)
    assert torch.allclose(sino[:, centre_bin], torch.full((4,), 20.0, dtype=F64), rtol=0.08)
    mass = sino.sum(dim=1)  # every view integrates the whole image: the pixel count (316), to interpolation error
    assert torch.allclose(mass, disc.sum().expand(4), rtol=0.01)


def test_ct_is_differentiable():
    op = ParallelBeamCT((5, 6), parallel_beam_angles(3))
    x = torch.randn(1, 1, 5, 6, dtype=F64, requires_grad=True)
    y = torch.randn(1, 1, *op.sinogram_shape, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(op.forward, (x,))
    assert torch.autograd.gradcheck(op.adjoint, (y,))


def test_fbp_of_full_view_sinogram_approximates_the_phantom():
    n = 32
    image = phantom(n)[None, None]
    op = ParallelBeamCT((n, n), parallel_beam_angles(180))
    sino = op.forward(image)
    recon = op.fbp(sino)
    relative = float(torch.linalg.vector_norm(recon - image) / torch.linalg.vector_norm(image))
    assert relative < 0.15  # measured 0.126 (edges of a 32^2 phantom blur by about one pixel)
    sparse = ParallelBeamCT((n, n), parallel_beam_angles(18))
    sparse_error = torch.linalg.vector_norm(sparse.fbp(sparse.forward(image)) - image) / torch.linalg.vector_norm(image)
    assert float(sparse_error) > relative  # fewer views: streaks, worse than full view


def test_fbp_hann_on_a_smooth_image_and_errors():
    n = 24
    grid = torch.linspace(-1, 1, n, dtype=F64)
    blob = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / 0.15)[None, None]
    op = ParallelBeamCT((n, n), parallel_beam_angles(90))
    for window, bound in (("ramp", 0.05), ("hann", 0.1)):
        recon = op.fbp(op.forward(blob), window)
        assert float(torch.linalg.vector_norm(recon - blob) / torch.linalg.vector_norm(blob)) < bound
    with pytest.raises(MeasurementError, match="unknown FBP filter 'shepp'"):
        op.fbp(op.forward(blob), "shepp")
    bad = op.forward(blob)
    bad[0, 0, 3, 4] = float("nan")
    with pytest.raises(MeasurementError, match="sino.npz: sinogram contains 1 non-finite"):
        op.check_measurement(bad, source="sino.npz")
    with pytest.raises(MeasurementError, match=r"sinogram shape \(1, 1, 90, 5\) disagrees with the geometry"):
        op.adjoint(torch.zeros(1, 1, 90, 5, dtype=F64))
    with pytest.raises(MeasurementError, match="CT image has shape"):
        op.forward(torch.zeros(1, 1, 5, 5))
