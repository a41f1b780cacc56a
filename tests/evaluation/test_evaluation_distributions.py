"""Wasserstein-1, Fréchet and kernel distances; TorchScript feature extractors."""
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.stats import wasserstein_distance

from nndiff.errors import NnDiffError
from nndiff.evaluation.distributions import (
    extract_features,
    frechet_distance,
    intensity_wasserstein,
    kernel_distance,
    load_feature_extractor,
    mmd2_unbiased,
    wasserstein1,
)


class FlattenFeatures(torch.nn.Module):
    """Features = the pixels themselves, so images can carry chosen feature vectors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class PooledConvFeatures(torch.nn.Module):
    """A tiny CNN feature extractor with fixed weights; works for 2D (B, C, Y, X) inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def save_scripted(module: torch.nn.Module, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
        torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


def closed_form_fid(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy.linalg.sqrtm (the oracle; the library uses eigenvalues)."""
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))


def gaussian_with_exact_moments(rng, mean, cov, count):
    """``count`` vectors whose sample mean and (N-1) covariance equal ``mean`` and ``cov`` exactly."""
    z = rng.standard_normal((count, len(mean)))
    z -= z.mean(0)
    whiten = np.linalg.cholesky(np.cov(z, rowvar=False))
    z = z @ np.linalg.inv(whiten).T  # now sample covariance is the identity
    return z @ np.linalg.cholesky(cov).T + mean


def test_wasserstein_exact_path_matches_scipy_and_shift(rng):
    a, b = rng.random(500), rng.normal(0.3, 0.5, 700)
    assert wasserstein1(a, b) == pytest.approx(wasserstein_distance(a, b), rel=1e-12)
    assert wasserstein1(a, a + 7.25) == pytest.approx(7.25, abs=1e-12)


def test_wasserstein_quantile_path_is_deterministic_and_close(rng):
    a, b = rng.random(40_000), rng.normal(0.5, 0.2, 30_000)
    approx = wasserstein1(a, b, max_values=2000)
    assert approx == wasserstein1(a, b, max_values=2000)
    # Quantile-function L1 on 2000 mid-point levels: the discretisation error is below a few
    # quantile-step widths (range ~1.6 / 2000 levels), far under 5e-3.
    assert approx == pytest.approx(wasserstein_distance(a, b), abs=5e-3)
    assert wasserstein1(a, a + 3.0, max_values=1000) == pytest.approx(3.0, abs=1e-12)


def test_intensity_wasserstein_per_channel(rng):
    real = [rng.normal(0, 1, (2, 8, 8)) for _ in range(4)]
    generated = [np.stack([image[0], image[1] + 5.0]) for image in real]
    result = intensity_wasserstein(generated, real)
    assert result["per_channel"] == pytest.approx([0.0, 5.0], abs=1e-12)
    assert result["mean"] == pytest.approx(2.5, abs=1e-12)
    with pytest.raises(ValueError, match="channel counts"):
        intensity_wasserstein(generated, [image[:1] for image in real])


def test_fid_identical_sets_is_zero(rng):
    features = rng.standard_normal((50, 6)) @ rng.standard_normal((6, 6))
    assert abs(frechet_distance(features, features)) < 1e-8


def test_fid_shifted_gaussians_match_closed_form_through_scripted_model(rng, tmp_path):
    mu1, mu2 = np.zeros(4), np.array([1.0, -2.0, 0.5, 0.0])
    a = rng.standard_normal((4, 4))
    cov1 = a @ a.T + 0.5 * np.eye(4)
    cov2 = np.diag([2.0, 0.5, 1.0, 3.0])
    x = gaussian_with_exact_moments(rng, mu1, cov1, 300)
    y = gaussian_with_exact_moments(rng, mu2, cov2, 200)
    extractor = load_feature_extractor(save_scripted(FlattenFeatures(), tmp_path / "flat.pt"))
    # Images (1, 2, 2) whose pixels are the feature vectors.
    fx = extract_features(extractor, list(x.reshape(-1, 1, 2, 2)), batch_size=64)
    fy = extract_features(extractor, list(y.reshape(-1, 1, 2, 2)), batch_size=64)
    np.testing.assert_allclose(fx, x, atol=1e-6)  # float32 round trip through the model
    expected = closed_form_fid(mu1, cov1, mu2, cov2)
    assert frechet_distance(fx, fy) == pytest.approx(expected, rel=1e-5)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_extract_features_batches_mixed_shapes(rng, tmp_path):
    extractor = load_feature_extractor(save_scripted(PooledConvFeatures(), tmp_path / "cnn.pt"))
    images = [rng.random((1, 12, 12)) for _ in range(3)] + [rng.random((1, 16, 10))] + [rng.random((1, 12, 12))]
    features = extract_features(extractor, images, batch_size=2)
    assert features.shape == (5, 6)
    one_by_one = np.concatenate([extract_features(extractor, [image]) for image in images])
    np.testing.assert_allclose(features, one_by_one, rtol=1e-5, atol=1e-7)


def test_exported_program_extractor_equals_scripted(rng, tmp_path):
    module = PooledConvFeatures()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(module, (torch.rand(3, 1, 12, 12),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "cnn.pt2"))
    exported = load_feature_extractor(tmp_path / "cnn.pt2")
    scripted = load_feature_extractor(save_scripted(module, tmp_path / "cnn.pt"))
    images = list(rng.random((5, 1, 12, 12)))
    np.testing.assert_allclose(extract_features(exported, images), extract_features(scripted, images),
                               rtol=1e-5, atol=1e-7)


def test_load_feature_extractor_errors(tmp_path):
    with pytest.raises(NnDiffError, match="does not exist"):
        load_feature_extractor(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(NnDiffError, match="not a TorchScript model"):
        load_feature_extractor(bad)
    bad_export = tmp_path / "bad.pt2"
    bad_export.write_bytes(b"not a program")
    with pytest.raises(NnDiffError, match="not a torch.export program"):
        load_feature_extractor(bad_export)


def brute_force_mmd2(x, y):
    def k(u, v):
        return (u @ v / len(u) + 1.0) ** 3
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_mmd2_unbiased_matches_brute_force(rng):
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((7, 3)) + 0.5
    assert mmd2_unbiased(x, y) == pytest.approx(brute_force_mmd2(x, y), rel=1e-12)


def test_kernel_distance_same_vs_shifted(rng):
    x, y = rng.standard_normal((400, 4)), rng.standard_normal((400, 4))
    shifted = y + 1.0
    same = kernel_distance(x, y, num_subsets=20, subset_size=200)
    moved = kernel_distance(x, shifted, num_subsets=20, subset_size=200)
    assert same == kernel_distance(x, y, num_subsets=20, subset_size=200)  # seeded
    # Same law: the unbiased estimate averages to 0; its subset-mean spread is ~std/sqrt(20).
    assert abs(same["mean"]) < 3 * same["std"] / np.sqrt(20) + 1e-3
    # Shifting every coordinate by 1 gives a population MMD^2 of order 1; the estimate is far from 0.
    assert moved["mean"] > 0.5 and moved["mean"] > 20 * abs(same["mean"])
    whole = kernel_distance(x[:30], y[:30], subset_size=1000)
    assert whole["num_subsets"] == 1 and whole["subset_size"] == 30
    assert whole["mean"] == pytest.approx(mmd2_unbiased(x[:30], y[:30]), rel=1e-12)


@pytest.mark.parametrize("size,count", [(1000, 37), (5000, 1000), (777, 777), (10, 3)])
def test_subsampling_quantiles_equal_numpys_inverted_cdf(size, count):
    from nndiff.evaluation.distributions import _quantiles

    values = np.random.default_rng(size).normal(size=size)
    levels = (np.arange(count) + 0.5) / count
    assert np.array_equal(_quantiles(values, count), np.quantile(values, levels, method="inverted_cdf"))
