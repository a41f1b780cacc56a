"""Image-quality metrics (known values, masks), body mask, uncertainty-error correlation and the
classical denoising baselines."""
from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
import torch

from nndiff.errors import NnDiffError
from nndiff.evaluation.image_quality import (
    ImageQualityError,
    body_mask,
    denoising_baselines,
    image_quality,
    mae,
    nl_means_baseline,
    nmse,
    psnr,
    ssim,
    ssim_map,
    tv_baseline,
    uncertainty_error_correlation,
)
from nndiff.evaluation.ssim import ssim as module_ssim


def disc(n: int = 32, radius: float = 0.6) -> np.ndarray:
    yy, xx = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    return (xx**2 + yy**2 < radius**2).astype(np.float64)


def phantom(n: int = 32) -> np.ndarray:
    """Piecewise-smooth 2D phantom in [0, 1]: disc, inner ellipse, gentle ramp."""
    yy, xx = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    return 0.8 * disc(n) + 0.2 * (((xx - 0.2) / 0.3) ** 2 + ((yy + 0.1) / 0.2) ** 2 < 1) + 0.05 * (xx + 1) / 2


# --------------------------------------------------------------------------------------------------
# known values
# --------------------------------------------------------------------------------------------------
def test_identical_images(rng):
    x = rng.random((1, 32, 32)) * 1000 - 500
    assert psnr(x, x, 1000.0) == math.inf
    assert ssim(x, x, 1000.0) == pytest.approx(1.0)
    assert nmse(x, x) == 0.0 and mae(x, x) == 0.0
    assert image_quality(x, x, 1000.0) == {"psnr": math.inf, "ssim": pytest.approx(1.0), "mae": 0.0, "nmse": 0.0}


@pytest.mark.parametrize("offset,data_range", [(0.1, 1.0), (25.0, 4095.0)])
def test_constant_offset_gives_analytic_psnr_and_mae(rng, offset, data_range):
    x = rng.random((2, 16, 16)) * data_range
    assert psnr(x + offset, x, data_range) == pytest.approx(20 * math.log10(data_range / offset), abs=1e-9)
    assert mae(x - offset, x) == pytest.approx(offset)


def test_nmse_known_values(rng):
    x = rng.random((1, 16, 16)) + 0.5
    assert nmse(np.zeros_like(x), x) == pytest.approx(1.0)
    assert nmse(2 * x, x) == pytest.approx(1.0)
    assert nmse(1.1 * x, x) == pytest.approx(0.01)
    assert nmse(torch.from_numpy(0.9 * x), torch.from_numpy(x)) == pytest.approx(0.01)  # torch tensors too


def test_ssim_equals_the_ssim_module_and_its_map_mean(rng):
    x = rng.random((2, 24, 20))
    y = x + 0.2 * rng.random(x.shape)
    expected = module_ssim(x, y, 1.2)
    assert ssim(x, y, 1.2) == pytest.approx(expected, abs=1e-12)
    assert ssim_map(x, y, 1.2).shape == (2, 14, 10)
    assert ssim(x, y, 1.2, mask=np.ones((24, 20), bool)) == pytest.approx(expected, abs=1e-12)
    vol_x, vol_y = rng.random((1, 12, 13, 14)), rng.random((1, 12, 13, 14))
    assert ssim(vol_x, vol_y, 1.0) == pytest.approx(module_ssim(vol_x, vol_y, 1.0), abs=1e-12)
    layout_2d = ssim(x[:, None], y[:, None], 1.2, mask=np.ones((1, 1, 24, 20), bool))  # (C, 1, Y, X)
    assert layout_2d == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------------
def test_masked_metrics_only_use_masked_voxels(rng):
    reference = rng.random((1, 32, 32)) + 1.0
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    prediction = reference + 0.05
    spoiled = prediction.copy()
    spoiled[:, ~mask] = 1e6  # changes outside the mask must not matter
    for metric in (mae, nmse):
        assert metric(spoiled, reference, mask) == pytest.approx(metric(prediction, reference, mask))
    assert psnr(spoiled, reference, 2.0, mask) == pytest.approx(20 * math.log10(2.0 / 0.05))
    inside = (spoiled[:, mask] - reference[:, mask]) ** 2
    assert nmse(spoiled, reference, mask) == pytest.approx(inside.sum() / (reference[:, mask] ** 2).sum())
    assert psnr(spoiled, reference, 2.0) < 0  # unmasked, the spoiled border dominates


def test_masked_ssim_uses_window_centres_inside_the_mask(rng):
    reference = phantom()
    prediction = reference + 0.02 * rng.standard_normal(reference.shape)
    mask = np.zeros((32, 32), bool)
    mask[10:22, 10:22] = True
    spoiled = prediction.copy()
    spoiled[:2, :] = 5.0  # farther than the window radius (5) from every masked centre
    a = ssim(prediction[None], reference[None], 1.0, mask)
    assert ssim(spoiled[None], reference[None], 1.0, mask) == pytest.approx(a, abs=1e-12)
    values = ssim_map(prediction[None], reference[None], 1.0)[0]
    assert a == pytest.approx(values[5:17, 5:17].mean())  # valid map index = centre - 5
    border_only = np.zeros((32, 32), bool)
    border_only[:3] = True
    with pytest.raises(ImageQualityError, match="border"):
        ssim(prediction[None], reference[None], 1.0, border_only)


def test_body_mask_keeps_largest_component_and_fills_holes():
    image = np.full((32, 32), -1000.0)
    body = disc(32, 0.7)
    image[body > 0] = 40.0
    lung = disc(32, 0.3) > 0
    image[lung] = -900.0  # enclosed air: a hole to fill
    image[1:3, 1:3] = 200.0  # a bright speck outside the body (table, noise)
    mask = body_mask(image)
    assert np.array_equal(mask, body > 0)
    volume = np.stack([image] * 6)
    assert np.array_equal(body_mask(volume), np.stack([body > 0] * 6))
    assert not body_mask(np.zeros((8, 8))).any()  # nothing above the threshold
    assert body_mask(image, threshold=100.0).sum() == 4  # explicit threshold: only the speck remains
    with pytest.raises(ImageQualityError, match="single channel"):
        body_mask(np.zeros((1, 2, 8, 8)))


def test_mask_errors_name_the_problem(rng):
    x = rng.random((1, 16, 16))
    with pytest.raises(ImageQualityError, match="does not broadcast"):
        mae(x, x, np.ones((3, 3), bool))
    with pytest.raises(ImageQualityError, match="selects no voxel"):
        mae(x, x, np.zeros((16, 16), bool))
    with pytest.raises(ImageQualityError, match="differs from reference shape"):
        mae(x, x[:, :8])
    with pytest.raises(ImageQualityError, match="data_range"):
        psnr(x, x + 1, 0.0)
    with pytest.raises(ImageQualityError, match="zero everywhere"):
        nmse(x, np.zeros_like(x))
    assert issubclass(ImageQualityError, NnDiffError)


# --------------------------------------------------------------------------------------------------
# uncertainty calibration
# --------------------------------------------------------------------------------------------------
def test_uncertainty_error_correlation(rng):
    reference = rng.random((1, 16, 16))
    error = rng.random((1, 16, 16))
    prediction = reference + error
    assert uncertainty_error_correlation(3 * error + 1, prediction, reference) == pytest.approx(1.0)
    assert uncertainty_error_correlation(-error, prediction, reference) == pytest.approx(-1.0)
    assert uncertainty_error_correlation(np.ones_like(error), prediction, reference) is None
    unrelated = rng.random((1, 16, 16))
    assert abs(uncertainty_error_correlation(unrelated, prediction, reference)) < 0.2
    mask = np.zeros((16, 16), bool)
    mask[:8] = True
    std = error.copy()
    std[:, ~mask] = rng.random(int((~mask).sum()))  # only right inside the mask
    assert uncertainty_error_correlation(std, prediction, reference, mask) == pytest.approx(1.0)
    assert uncertainty_error_correlation(std, prediction, reference) < 0.9


# --------------------------------------------------------------------------------------------------
# classical baselines
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given_sigma", [True, False])
def test_baselines_improve_psnr_at_five_percent_2d(rng, given_sigma):
    clean = phantom()[None]
    noisy = clean + 0.05 * rng.standard_normal(clean.shape)
    before = psnr(noisy, clean, 1.0)
    outputs = denoising_baselines(noisy, 0.05 if given_sigma else None)
    assert set(outputs) == {"nl_means", "total_variation"}
    for name, output in outputs.items():
        assert output.shape == noisy.shape
        assert psnr(output, clean, 1.0) > before + 3.0, name


def test_baselines_in_3d_and_original_units(rng):
    clean = np.full((1, 16, 16, 16), -1000.0)
    clean[:, 4:12, 4:12, 4:12] = 1000.0  # HU-like range 2000
    noisy = clean + 100.0 * rng.standard_normal(clean.shape)  # 5 % of the range
    before = psnr(noisy, clean, 2000.0)
    assert psnr(nl_means_baseline(noisy), clean, 2000.0) > before + 3.0
    assert psnr(tv_baseline(noisy), clean, 2000.0) > before + 3.0
    two_d_layout = noisy[:, :1]  # (C, 1, Y, X) stays 2D and keeps its shape
    assert tv_baseline(two_d_layout).shape == (1, 1, 16, 16)


def test_baselines_without_scikit_image_raise_an_install_hint(monkeypatch):
    real_import = builtins.__import__

    def no_skimage(name, *args, **kwargs):
        if name == "skimage" or name.startswith("skimage."):
            raise ImportError("No module named 'skimage'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_skimage)
    with pytest.raises(NnDiffError, match="pip install scikit-image"):
        tv_baseline(np.zeros((1, 8, 8)), 0.1)


def test_baseline_sigma_must_be_positive():
    with pytest.raises(ImageQualityError, match="sigma"):
        tv_baseline(np.zeros((1, 8, 8)), -1.0)
    with pytest.raises(ImageQualityError, match="pass sigma"):
        nl_means_baseline(np.zeros((1, 8, 8)))  # noise-free: the estimate is 0
