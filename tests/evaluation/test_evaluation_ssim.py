"""SSIM / MS-SSIM against scikit-image and independent numpy computations."""
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from nndiff.evaluation.ssim import (
    MS_SSIM_WEIGHTS,
    ms_ssim,
    ms_ssim_diversity,
    ms_ssim_num_scales,
    ms_ssim_pairs,
    ms_ssim_weights,
    pair_indices,
    small_image_window,
    ssim,
    ssim_pairs,
)

from evaluation_helpers import smooth_images


def skimage_ssim(x, y, data_range, channel_axis=None):
    return structural_similarity(x, y, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, channel_axis=channel_axis)


@pytest.mark.parametrize("shape", [(32, 32), (11, 29), (16, 16, 16), (12, 15, 13)])
def test_ssim_matches_skimage_2d_and_3d(rng, shape):
    x = smooth_images(rng, 1, shape, offset=-500.0)[0, 0]  # HU-like offset tests float64 handling
    for noise in (1.0, 30.0, 200.0):
        y = x + noise * rng.standard_normal(shape)
        data_range = float(max(x.max(), y.max()) - min(x.min(), y.min()))
        expected = skimage_ssim(x, y, data_range)
        assert ssim(x[None], y[None], data_range) == pytest.approx(expected, abs=1e-10)


def test_ssim_multichannel_is_channel_mean_like_skimage(rng):
    x = rng.random((3, 24, 20))
    y = x + 0.1 * rng.standard_normal(x.shape)
    assert ssim(x, y, 2.0) == pytest.approx(skimage_ssim(x, y, 2.0, channel_axis=0), abs=1e-10)


def test_ssim_pairs_batch_equals_single_calls_and_2d_with_z_axis(rng):
    a, b = rng.random((7, 1, 16, 16)), rng.random((7, 1, 16, 16))
    batched = ssim_pairs(a, b, 1.0, batch_size=3)
    singles = [ssim(a[i], b[i], 1.0) for i in range(7)]
    np.testing.assert_allclose(batched, singles, rtol=0, atol=1e-12)
    # (C, 1, Y, X) is the project's 2D layout: treated as 2D, not as a too-thin volume.
    assert ssim(a[0][:, None], b[0][:, None], 1.0) == pytest.approx(singles[0], abs=1e-12)


def test_ssim_identical_is_one_and_small_image_error_names_the_window(rng):
    x = rng.random((1, 12, 12))
    assert ssim(x, x, 1.0) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ssim(x[:, :8], x[:, :8], 1.0)


@pytest.mark.parametrize("shape, scales", [((32, 32), 2), ((176, 200), 5), ((175, 400), 4), ((10, 64), 0),
                                           ((16, 16, 16), 1), ((11, 11), 1), ((1000, 1000), 5)])
def test_ms_ssim_scale_rule(shape, scales):
    assert ms_ssim_num_scales(shape) == scales


def test_ms_ssim_weights_are_renormalised_prefixes():
    for count in range(1, 6):
        weights = ms_ssim_weights(count)
        assert sum(weights) == pytest.approx(1.0, abs=1e-12)
        ratios = np.array(weights) / np.array(MS_SSIM_WEIGHTS[:count])
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-12)


def _numpy_ssim_and_cs(x, y, data_range):
    """Independent 2D SSIM/cs (scipy Gaussian filter, border cropped), for the MS-SSIM oracle."""
    def filt(image):
        return gaussian_filter(image, 1.5, truncate=3.5)[5:-5, 5:-5]
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    cs = (2 * cxy + c2) / (vx + vy + c2)
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    return (lum * cs).mean(), cs.mean()


def test_ms_ssim_two_scales_matches_numpy_oracle(rng):
    x = smooth_images(rng, 1, (32, 32), sigma=1.0)[0, 0]
    y = x + 40 * rng.standard_normal(x.shape)
    data_range = 600.0
    _, cs0 = _numpy_ssim_and_cs(x, y, data_range)
    pool = lambda im: im.reshape(16, 2, 16, 2).mean((1, 3))  # noqa: E731
    s1, _ = _numpy_ssim_and_cs(pool(x), pool(y), data_range)
    w = ms_ssim_weights(2)
    expected = max(cs0, 0) ** w[0] * max(s1, 0) ** w[1]
    assert ms_ssim(x[None], y[None], data_range) == pytest.approx(expected, rel=1e-10)


def test_ms_ssim_single_scale_3d_equals_clamped_ssim(rng):
    x = smooth_images(rng, 1, (16, 16, 16))[0]
    y = x + 50 * rng.standard_normal(x.shape)
    assert ms_ssim(x, y, 800.0) == pytest.approx(max(ssim(x, y, 800.0), 0.0), abs=1e-12)


def test_ms_ssim_small_images_do_not_crash(rng):
    x, y = rng.random((4, 1, 8, 8)), rng.random((4, 1, 8, 8))
    win, sigma = small_image_window((8, 8))
    assert (win, sigma) == (7, pytest.approx(1.5 * 7 / 11))
    values = ms_ssim_pairs(x, y, 1.0)
    np.testing.assert_allclose(values, np.clip(ssim_pairs(x, y, 1.0, win, sigma), 0, None), atol=1e-12)
    assert ms_ssim(x[0], x[0], 1.0) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="too small"):
        ms_ssim(x[0, :, :2], y[0, :, :2], 1.0)


def test_pair_indices_all_pairs_and_seeded_subset():
    pairs = pair_indices(5, None)
    assert len(pairs) == 10 and np.all(pairs[:, 0] < pairs[:, 1])
    subset = pair_indices(30, 50, seed=3)
    assert len(subset) == 50 and len({tuple(p) for p in subset}) == 50
    np.testing.assert_array_equal(subset, pair_indices(30, 50, seed=3))


def test_diversity_orders_sets_by_variety(rng):
    base = smooth_images(rng, 1, (32, 32))
    copies = np.repeat(base, 6, axis=0)
    noisy_copies = copies + 10 * rng.standard_normal(copies.shape)
    varied = smooth_images(rng, 6, (32, 32))
    same = ms_ssim_diversity(copies, 600.0)
    assert same["mean"] == pytest.approx(1.0, abs=1e-12) and same["num_pairs"] == 15
    assert same["num_scales"] == 2
    near = ms_ssim_diversity(noisy_copies, 600.0)["mean"]
    far = ms_ssim_diversity(varied, 600.0)["mean"]
    assert far < near < 1.0
    with pytest.raises(ValueError, match="at least two"):
        ms_ssim_diversity(base, 1.0)
