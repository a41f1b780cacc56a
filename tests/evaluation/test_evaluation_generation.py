"""evaluate_generation: the assembled, JSON-serialisable summary."""
import json
import logging
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from evaluation_helpers import smooth_images
from nndiff.evaluation import evaluate_generation


class MeanStdFeatures(torch.nn.Module):
    """Per-channel mean and standard deviation: a tiny, shape-agnostic feature extractor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        return torch.cat([flat.mean(2), flat.std(2)], dim=1)


@pytest.fixture
def extractor_path(tmp_path):
    path = tmp_path / "features.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(MeanStdFeatures()), str(path))
    return path


def test_full_summary_2d_is_json_and_consistent(rng, extractor_path):
    training = smooth_images(rng, 30, (24, 24), offset=-200.0)
    real = smooth_images(rng, 6, (24, 24), offset=-200.0)
    samples = np.concatenate([training[:2], smooth_images(rng, 6, (24, 24), offset=-100.0)])
    summary = evaluate_generation(samples[:, :, None], real, training, str(extractor_path))
    text = json.dumps(summary, allow_nan=False)
    assert json.loads(text) == summary
    assert summary["spatial_dims"] == 2  # (N, C, 1, Y, X) is the 2D layout
    assert (summary["num_samples"], summary["num_real_heldout"], summary["num_training"]) == (8, 6, 30)
    assert summary["skipped"] == {}
    assert summary["data_range"] == pytest.approx(float(np.ptp(np.concatenate([real, training]))))
    # Six of eight samples are shifted by +100: W1 ≈ 75 give or take the sets' own differences.
    assert 50 < summary["intensity_wasserstein1"]["mean"] < 100
    assert summary["frechet_distance"] > 0 and summary["kernel_distance"]["mean"] > 0
    assert summary["memorization"]["near_copy_indices"] == [0, 1]
    assert summary["memorization"]["near_copy_rate"] == pytest.approx(0.25)
    reference = summary["memorization_reference_real"]
    assert reference["near_copy_rate"] == 0.0  # independent real images copy nothing
    assert reference["mean_nearest_ssim"] < summary["memorization"]["mean_nearest_ssim"]
    for key in ("samples", "real_heldout"):
        assert 0 <= summary["ms_ssim_diversity"][key]["mean"] < 1


def test_identical_sets_give_zero_distances(rng, extractor_path):
    real = smooth_images(rng, 5, (16, 16))
    summary = evaluate_generation(real, real, None, extractor_path)
    assert summary["intensity_wasserstein1"]["mean"] == 0.0
    assert abs(summary["frechet_distance"]) < 1e-6
    assert summary["memorization"] is None and "memorization" in summary["skipped"]
    assert summary["ms_ssim_diversity"]["samples"] == summary["ms_ssim_diversity"]["real_heldout"]


def test_without_extractor_feature_metrics_are_skipped_with_message(rng, caplog):
    images = smooth_images(rng, 3, (16, 16))
    with caplog.at_level(logging.INFO, logger="nndiff.evaluation"):
        summary = evaluate_generation(images, images, images)
    assert summary["frechet_distance"] is None and summary["kernel_distance"] is None
    assert "feature extractor" in summary["skipped"]["frechet_distance"]
    assert "skipped frechet_distance" in caplog.text
    assert summary["memorization"]["near_copy_rate"] == 1.0


def test_3d_with_heldout_cases_of_different_shapes(rng, extractor_path):
    samples = smooth_images(rng, 3, (12, 12, 12))
    real = [smooth_images(rng, 1, (12, 14, 12))[0], smooth_images(rng, 1, (13, 12, 12))[0]]
    summary = evaluate_generation(samples, real, samples[:2], extractor_path)
    assert summary["spatial_dims"] == 3
    assert summary["ms_ssim_diversity"]["real_heldout"] is None
    assert "differ in shape" in summary["skipped"]["ms_ssim_diversity.real_heldout"]
    assert summary["ms_ssim_diversity"]["samples"]["num_pairs"] == 3
    assert summary["frechet_distance"] is not None
    assert summary["memorization"]["near_copy_indices"] == [0, 1]
    assert summary["memorization_reference_real"] is None  # held-out shapes differ from training
    json.dumps(summary, allow_nan=False)


def test_bad_inputs_are_named(rng):
    with pytest.raises(ValueError, match=r"samples\[0\]"):
        evaluate_generation([np.zeros((4, 4))], smooth_images(rng, 2, (16, 16)))
    with pytest.raises(ValueError, match="at least one"):
        evaluate_generation([], smooth_images(rng, 2, (16, 16)))


def test_single_sample_skips_pairwise_and_feature_metrics(rng, extractor_path):
    real = smooth_images(rng, 3, (16, 16))
    summary = evaluate_generation(real[:1] + 1.0, real, real, extractor_path)
    assert summary["ms_ssim_diversity"]["samples"] is None
    assert "fewer than two" in summary["skipped"]["ms_ssim_diversity.samples"]
    assert summary["frechet_distance"] is None and "at least two" in summary["skipped"]["kernel_distance"]
    expected = wasserstein_distance(real[0].ravel() + 1.0, real.ravel())
    assert summary["intensity_wasserstein1"]["mean"] == pytest.approx(expected, rel=1e-12)
    assert summary["memorization"]["nearest_ssim_index"] == [0]


@pytest.mark.parametrize("task, function", [("segmentation", "evaluate_segmentation_folders"),
                                            ("anomaly_detection", "evaluate_anomaly_folders"),
                                            ("registration", None)])
def test_generation_folder_evaluation_names_the_family_evaluation(tmp_path, task, function):
    from nndiff.errors import NnDiffError
    from nndiff.evaluation.generation_folders import evaluate_generation_folders

    with pytest.raises(NnDiffError, match=f"task is '{task}'.*generation datasets only") as info:
        evaluate_generation_folders(tmp_path, tmp_path, dataset_json={"task": task})
    assert (function or '"task": "generation"') in str(info.value)
