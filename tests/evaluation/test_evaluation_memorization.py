"""Memorization check: nearest training case by SSIM and L2, near-copy rate."""
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from evaluation_helpers import smooth_images
from nndiff.evaluation.memorization import NEAR_COPY_SSIM, memorization_check


def make_case(rng, copies=(3, 17, 29), train_count=40, fresh=5, shape=(24, 24), noise=2.0):
    training = smooth_images(rng, train_count, shape, offset=50.0)
    near = training[list(copies)] + noise * rng.standard_normal((len(copies), 1, *shape))
    samples = np.concatenate([near, smooth_images(rng, fresh, shape, offset=50.0)])
    return samples, training


def test_near_copies_are_found_with_their_source(rng):
    samples, training = make_case(rng)
    data_range = float(training.max() - training.min())
    result = memorization_check(samples, training, data_range, candidates=8)
    assert NEAR_COPY_SSIM == 0.95 and result.threshold == 0.95
    assert result.near_copy_indices == [0, 1, 2]
    assert result.nearest_ssim_index[:3] == [3, 17, 29]
    assert result.nearest_l2_index[:3] == [3, 17, 29]
    assert result.near_copy_rate == pytest.approx(3 / 8)
    assert min(result.nearest_ssim[:3]) >= 0.95 > max(result.nearest_ssim[3:])
    # Noise std 2 on top of the copy: RMSE to the source is ~2 (400 pixels: ±10 %).
    np.testing.assert_allclose(result.nearest_l2_rmse[:3], 2.0, rtol=0.1)


def test_ssim_nearest_matches_skimage_brute_force(rng):
    samples, training = make_case(rng, copies=(1,), train_count=8, fresh=3, shape=(16, 16), noise=20.0)
    data_range = 300.0
    result = memorization_check(samples, training, data_range, candidates=None)
    for i, sample in enumerate(samples):
        scores = [structural_similarity(sample[0], train[0], data_range=data_range, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False) for train in training]
        assert result.nearest_ssim_index[i] == int(np.argmax(scores))
        assert result.nearest_ssim[i] == pytest.approx(max(scores), abs=1e-10)
        l2 = [np.sqrt(np.mean((sample - train) ** 2)) for train in training]
        assert result.nearest_l2_index[i] == int(np.argmin(l2))
        assert result.nearest_l2_rmse[i] == pytest.approx(min(l2), rel=1e-10)


def test_candidate_search_never_beats_exhaustive_and_agrees_on_copies(rng):
    samples, training = make_case(rng, train_count=60, fresh=10)
    data_range = float(training.max() - training.min())
    fast = memorization_check(samples, training, data_range, candidates=4)
    full = memorization_check(samples, training, data_range, candidates=None)
    assert np.all(np.array(full.nearest_ssim) >= np.array(fast.nearest_ssim) - 1e-12)
    assert fast.near_copy_indices == full.near_copy_indices == [0, 1, 2]
    assert fast.nearest_ssim[:3] == pytest.approx(full.nearest_ssim[:3], abs=1e-12)


def test_3d_volumes_and_shape_mismatch(rng):
    training = smooth_images(rng, 6, (12, 12, 12))
    samples = np.concatenate([training[2:3], smooth_images(rng, 2, (12, 12, 12))])
    result = memorization_check(samples, training, 600.0)
    assert result.near_copy_indices == [0] and result.nearest_ssim[0] == pytest.approx(1.0, abs=1e-12)
    assert set(result.to_json()) >= {"nearest_ssim_index", "near_copy_rate", "nearest_l2_index"}
    with pytest.raises(ValueError, match="differs from training shape"):
        memorization_check(samples[:, :, :8], training, 600.0)
