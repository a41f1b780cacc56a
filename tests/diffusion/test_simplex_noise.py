"""Simplex noise: single-octave values against the ``opensimplex`` package (oracle), the octave sum
as documented, per-sample normalisation, determinism and the ``make_noise`` factory."""
from __future__ import annotations

import math

import numpy as np
import opensimplex
import pytest
import torch

from nndiff.diffusion import simplex
from nndiff.diffusion.noise import GaussianNoise, NoiseFn, SimplexNoise, make_noise, standardize
from nndiff.diffusion.options import NoiseType
from nndiff.diffusion.simplex import (
    fractal_simplex,
    octave_amplitudes,
    octave_scales,
    opensimplex2,
    opensimplex3,
    opensimplex_permutation,
    random_permutations,
)

# Seeds include a negative one and one beyond int64 (opensimplex wraps it like a C int64).
SEEDS = [0, 3, -123456789, 2**64 + 7]


def reference(seed: int, dims: int, points: np.ndarray) -> np.ndarray:
    """opensimplex's public API (module-level seed + noise2/noise3) at each point."""
    opensimplex.seed(seed)
    evaluate = opensimplex.noise2 if dims == 2 else opensimplex.noise3
    return np.array([evaluate(*map(float, p)) for p in points])


def ours(seed: int, points: np.ndarray) -> np.ndarray:
    coords = torch.from_numpy(points).to(torch.float64)
    evaluate = opensimplex2 if points.shape[1] == 2 else opensimplex3
    return evaluate(*coords.T, opensimplex_permutation(seed)).numpy()


# ---------------------------------------------------------------------------------------------
# Single octave against the oracle
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("seed", SEEDS)
def test_single_octave_matches_opensimplex_at_random_points(seed, dims):
    rng = np.random.default_rng(abs(seed) % 1000)
    points = rng.uniform(-300.0, 300.0, size=(1500, dims))
    np.testing.assert_allclose(ours(seed, points), reference(seed, dims, points), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_single_octave_matches_opensimplex_on_a_grid_with_ties(dims):
    # Grid points put many samples exactly on cell boundaries and on the case decisions' ties
    # (xins == yins on the diagonal), where the reference's tie order decides the vertex set.
    axis = np.arange(-6, 10) / 4.0
    grid = np.stack(np.meshgrid(*([axis] * dims), indexing="ij"), axis=-1).reshape(-1, dims)
    np.testing.assert_allclose(ours(7, grid), reference(7, dims, grid), rtol=0, atol=1e-6)


def test_random_points_exercise_every_3d_case():
    # Guards the oracle test above: each of the 24 vertex lists (both tetrahedra, the octahedron
    # and every extra-vertex choice) must occur among its points.
    rng = np.random.default_rng(abs(SEEDS[0]) % 1000)
    p = torch.from_numpy(rng.uniform(-300.0, 300.0, size=(1500, 3)))
    skewed = p + p.sum(dim=1, keepdim=True) * simplex.STRETCH_3D
    inside = skewed - torch.floor(skewed)
    cases = simplex._cases_3d(inside[:, 0], inside[:, 1], inside[:, 2], inside.sum(dim=1))
    assert set(cases.tolist()) == set(range(24))


def test_permutation_from_seed_is_a_permutation_and_seed_dependent():
    tables = [opensimplex_permutation(seed) for seed in SEEDS]
    for table in tables:
        assert sorted(table.tolist()) == list(range(256))
    assert len({tuple(t.tolist()) for t in tables}) == len(SEEDS)


@pytest.mark.parametrize("dims", [2, 3])
def test_float32_evaluation_is_close_to_float64(dims):
    # Training computes in float32; coordinates up to ~320 occur (offset < 256 plus the grid).
    generator = torch.Generator().manual_seed(1)
    points = (torch.rand((20000, dims), generator=generator) * 384 - 64).to(torch.float32)
    perm = random_permutations(1, generator=generator)[0]
    evaluate = opensimplex2 if dims == 2 else opensimplex3
    exact = evaluate(*points.double().T, perm)
    approx = evaluate(*points.T, perm)
    assert approx.dtype == torch.float32
    # Worst case: float32 rounding of skewed coordinates near 320 (~3e-5 units) times the
    # noise's steepest slope, plus a 3D case flip at a near-tie (< 3e-5).
    assert (approx.double() - exact).abs().max().item() < 2e-4


def test_one_table_per_row():
    perm = torch.stack([opensimplex_permutation(1), opensimplex_permutation(2)])
    x = torch.tensor([[0.3, 1.7], [0.3, 1.7]], dtype=torch.float64)
    y = torch.tensor([[2.2], [2.2]], dtype=torch.float64)
    z = torch.full((2, 1), -0.4, dtype=torch.float64)
    both = opensimplex3(x, y, z, perm)
    for row, seed in enumerate([1, 2]):
        single = opensimplex3(x[row], y[row], z[row], opensimplex_permutation(seed))
        assert torch.equal(both[row], single)
    assert not torch.allclose(both[0], both[1])
    with pytest.raises(ValueError, match="leading dimension of 2"):
        opensimplex3(x[:, :1].T, y.T, z.T, perm)


# ---------------------------------------------------------------------------------------------
# Octaves
# ---------------------------------------------------------------------------------------------
def test_octave_scales_and_amplitudes_follow_anoddpm():
    # AnoDDPM: coordinate = index / frequency, frequency halves and amplitude *= persistence per octave.
    assert octave_scales(6, 64.0) == [1 / 64, 2 / 64, 4 / 64, 8 / 64, 16 / 64, 32 / 64]
    assert octave_scales(3, 10.0, lacunarity=3.0) == [1 / 10, 3 / 10, 9 / 10]
    assert octave_amplitudes(4, 0.8) == [1.0, 0.8, 0.6400000000000001, 0.5120000000000001]
    noise = SimplexNoise()
    assert (noise.octaves, noise.persistence, noise.frequency, noise.lacunarity) == (6, 0.8, 64.0, 2.0)
    assert noise.scales == octave_scales(6, 64.0) and noise.amplitudes == octave_amplitudes(6, 0.8)


def manual_octave_sum(spatial, perm, offsets, scales, amplitudes, spacing):
    """The documented definition, written out with the single-octave functions."""
    spacing = spacing or [1.0] * len(spatial)
    axes = [torch.arange(n, dtype=torch.float64) * s for n, s in zip(spatial, spacing)]
    grid_xyz = list(reversed(torch.meshgrid(*axes, indexing="ij")))  # noise x is the last array axis
    total = torch.zeros((perm.shape[0], *spatial), dtype=torch.float64)
    for row in range(perm.shape[0]):
        for k, (scale, amplitude) in enumerate(zip(scales, amplitudes)):
            # A 2D grid in 3D noise: the plane z = offset_z.
            coords = [
                grid_xyz[a] * scale + offsets[row, k, a] if a < len(grid_xyz)
                else torch.full(spatial, offsets[row, k, a].item(), dtype=torch.float64)
                for a in range(offsets.shape[2])
            ]
            evaluate = opensimplex2 if len(coords) == 2 else opensimplex3
            total[row] += amplitude * evaluate(*coords, perm[row])
    return total


@pytest.mark.parametrize(
    "spatial, noise_dims, spacing",
    [((9, 11), 2, None), ((9, 11), 3, None), ((5, 6, 7), 3, None), ((5, 6, 7), 3, (2.5, 1.0, 0.5))],
)
def test_fractal_sum_is_the_documented_weighted_octave_sum(spatial, noise_dims, spacing):
    generator = torch.Generator().manual_seed(5)
    perm = random_permutations(2, generator=generator)
    offsets = torch.rand((2, 3, noise_dims), generator=generator, dtype=torch.float64) * 256
    scales, amplitudes = octave_scales(3, 4.0, 2.0), octave_amplitudes(3, 0.7)
    expected = manual_octave_sum(spatial, perm, offsets, scales, amplitudes, spacing)
    # A small chunk size splits rows and fields across chunks: results must not depend on it.
    for chunk in (7, 1 << 16):
        got = fractal_simplex(
            spatial, perm, offsets, scales=scales, amplitudes=amplitudes, spacing=spacing,
            dtype=torch.float64, max_chunk_points=chunk,
        )
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_simplex_noise_is_the_standardised_octave_sum_of_its_drawn_parameters():
    noise = SimplexNoise(octaves=3, persistence=0.6, frequency=5.0, spacing=(2.0, 1.0, 1.0))
    shape = (2, 2, 4, 5, 6)
    got = noise(shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    perm, offsets = noise.draw_parameters(4, 3, generator=torch.Generator().manual_seed(11))
    raw = manual_octave_sum(shape[2:], perm, offsets, noise.scales, noise.amplitudes, noise.spacing)
    torch.testing.assert_close(got, standardize(raw).reshape(shape), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# SimplexNoise as a NoiseFn
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "noise, shape",
    [
        (SimplexNoise(), (3, 2, 32, 32)),
        (SimplexNoise(planar_2d=False, frequency=8.0), (3, 2, 32, 32)),
        (SimplexNoise(frequency=8.0), (2, 2, 16, 16, 16)),
    ],
    ids=["2d-planar", "2d-native", "3d"],
)
def test_zero_mean_unit_variance_per_sample_and_channel(noise, shape):
    out = noise(shape, generator=torch.Generator().manual_seed(0))
    assert out.shape == shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    flat = out.double().reshape(shape[0] * shape[1], -1)
    # Exact standardisation up to float32 rounding of the stored values.
    assert flat.mean(dim=1).abs().max().item() < 1e-6
    assert (flat.var(dim=1, correction=0) - 1).abs().max().item() < 1e-5


def test_deterministic_under_a_seed_and_different_for_other_seeds():
    noise = SimplexNoise(frequency=4.0)
    shape = (2, 1, 32, 32)
    a = noise(shape, generator=torch.Generator().manual_seed(42))
    b = noise(shape, generator=torch.Generator().manual_seed(42))
    c = noise(shape, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    # Independent standardised fields: mean squared difference 2 - 2r; at this size and frequency
    # the chance correlation r has a standard deviation of ~0.05 (measured over 200 seeds), so the
    # bound (r < 0.75) fails only if the fields are not independent.
    assert (a - c).square().mean().item() > 0.5
    torch.manual_seed(42)
    d = noise(shape)
    torch.manual_seed(42)
    assert torch.equal(d, noise(shape))  # the global generator when none is given


def test_each_sample_and_channel_gets_its_own_field():
    out = SimplexNoise(frequency=4.0)((3, 2, 32, 32), generator=torch.Generator().manual_seed(3))
    fields = out.reshape(6, -1)  # same bound as above: 2 - 2r > 0.5
    for i in range(6):
        for j in range(i + 1, 6):
            assert (fields[i] - fields[j]).square().mean().item() > 0.5


def test_frequency_sets_the_feature_size():
    # Larger frequency (= feature size in voxels) gives smoother noise: neighbouring voxels agree more.
    def lag1_correlation(noise):
        out = noise((4, 1, 32, 32), generator=torch.Generator().manual_seed(0)).double()
        return (out[..., 1:] * out[..., :-1]).mean().item()

    smooth = lag1_correlation(SimplexNoise(octaves=1, frequency=16.0))
    rough = lag1_correlation(SimplexNoise(octaves=1, frequency=1.0))
    # One octave with feature size 16 voxels varies little over one voxel (> 0.95); at size 1
    # neighbours are nearly unrelated (|r| < 0.5; the kernel spans ~1.4 units).
    assert smooth > 0.95
    assert abs(rough) < 0.5


def test_dtype_and_device_follow_the_arguments():
    noise = SimplexNoise(octaves=2, frequency=4.0)
    out = noise((1, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    assert noise((1, 1, 8, 8), dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(4, 4), (1, 1, 4), (1, 1, 1, 1), (1, 0, 4, 4), (1, 1, 2, 2, 2, 2)])
def test_bad_shapes_are_rejected(shape):
    with pytest.raises(ValueError, match="simplex noise needs"):
        SimplexNoise()(shape)


def test_spacing_must_match_the_spatial_dims():
    with pytest.raises(ValueError, match="spacing"):
        SimplexNoise(spacing=(1.0, 1.0, 1.0))((1, 1, 8, 8))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"octaves": 0}, "octaves"),
        ({"octaves": 2.0}, "octaves"),
        ({"persistence": 0.0}, "persistence"),
        ({"frequency": -1.0}, "frequency"),
        ({"lacunarity": math.inf}, "lacunarity"),
        ({"spacing": (1.0, 0.0)}, "spacing"),
    ],
)
def test_invalid_parameters_are_rejected(params, message):
    with pytest.raises(ValueError, match=message):
        SimplexNoise(**params)


# ---------------------------------------------------------------------------------------------
# make_noise and the protocol
# ---------------------------------------------------------------------------------------------
def test_make_noise_builds_each_type():
    assert isinstance(make_noise("gaussian"), GaussianNoise)
    noise = make_noise(NoiseType.SIMPLEX, octaves=3, persistence=0.5, frequency=16)
    assert isinstance(noise, SimplexNoise)
    assert (noise.octaves, noise.persistence, noise.frequency) == (3, 0.5, 16.0)
    rebuilt = make_noise("simplex", **noise.config)
    assert rebuilt.config == noise.config
    shape = (1, 1, 8, 8)
    assert torch.equal(
        rebuilt(shape, generator=torch.Generator().manual_seed(0)),
        noise(shape, generator=torch.Generator().manual_seed(0)),
    )


def test_make_noise_rejects_unknown_types_and_parameters():
    with pytest.raises(ValueError, match="unknown noise type 'perlin'; valid values: gaussian, simplex"):
        make_noise("perlin")
    with pytest.raises(ValueError, match=r"unknown simplex noise parameter\(s\) \['octave'\]; valid: octaves"):
        make_noise("simplex", octave=3)
    with pytest.raises(ValueError, match="gaussian noise takes no parameters"):
        make_noise("gaussian", octaves=3)


def test_noise_sources_follow_the_protocol():
    shape = (2, 1, 8, 8)
    for noise in (GaussianNoise(), SimplexNoise(frequency=4.0)):
        fn: NoiseFn = noise
        out = fn(shape, generator=torch.Generator().manual_seed(0), device="cpu", dtype=torch.float32)
        assert out.shape == shape and out.dtype == torch.float32
    # GaussianNoise is unchanged: torch.randn from the same generator.
    expected = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(GaussianNoise()(shape, generator=torch.Generator().manual_seed(0)), expected)


@pytest.mark.parametrize("dims", [2, 3])
def test_extreme_tables_stay_inside_the_lookup_tables(dims):
    # Identity and reversed permutations put hash values 0 and 255 next to lattice coordinates
    # 0 and 255, the ends of the padded lookup blocks; every vertex must still read its own block.
    perm = torch.stack([torch.arange(256), torch.arange(255, -1, -1)])
    axis = torch.arange(-24, 24, dtype=torch.float64) / 3.0 + 256.0 * torch.tensor([[0.0], [1.0]])
    grids = torch.meshgrid(*([torch.arange(48)] * dims), indexing="ij")
    coords = [axis[:, g.reshape(-1)] for g in grids]  # (2, 48**dims) per axis
    evaluate = opensimplex2 if dims == 2 else opensimplex3
    both = evaluate(*coords, perm)
    for row in range(2):
        assert torch.equal(both[row], evaluate(*(c[row] for c in coords), perm[row]))
    assert both.abs().max().item() <= 1.0


def test_case_tables_use_offsets_the_padded_tables_cover():
    for table in (simplex.CASE_OFFSETS_2D, simplex.CASE_OFFSETS_3D):
        assert table.min().item() >= -1 and table.max().item() <= 2
