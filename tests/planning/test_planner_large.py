"""Planner acceptance on large synthetic fingerprints (no image data): 512×512×300 CT at
0.7×0.7×2.5 mm, 240×240×155 MR at 1 mm, 2048² X-ray."""
from __future__ import annotations

import math
import re

import pytest
from planning_fixtures import (
    CT_FG,
    CT_WHOLE,
    MR_FG,
    ct_fingerprint,
    dataset_json,
    fingerprint,
    mr_fingerprint,
    xray_fingerprint,
)

from nndiff.planning import plan_experiment
from nndiff.planning.constants import MAX_DATASET_FRACTION_PER_BATCH, MIN_BATCH_SIZE, TARGET_UTILIZATION
from nndiff.planning.decision import fmt_shape
from nndiff.planning.memory import per_sample_and_static_gib
from nndiff.planning.topology import shape_divisor

TARGETS = (8.0, 24.0, 64.0)
FINGERPRINTS = {
    "ct": (ct_fingerprint, dataset_json(channel_names={"0": "CT"})),
    "mr": (mr_fingerprint, dataset_json(channel_names={"0": "T1"})),
    "xray": (xray_fingerprint, dataset_json(channel_names={"0": "xray"})),
}


@pytest.fixture(scope="module")
def plans() -> dict[tuple[str, float], dict]:
    """Every fingerprint planned at every target once (about 40 ms each)."""
    return {(kind, t): plan_experiment(make(), spec, gpu_memory_target_gib=t)
            for kind, (make, spec) in FINGERPRINTS.items() for t in TARGETS}


def _trainable(plan: dict) -> dict[str, dict]:
    return {n: c for n, c in plan["configurations"].items() if c["trainable"]}


@pytest.mark.parametrize("kind", list(FINGERPRINTS))
def test_patch_and_batch_grow_with_the_memory_target(plans, kind):
    # configurations planned at every target (MR's latent one is not needed at 64 GiB)
    for name in [n for n in _trainable(plans[(kind, 8.0)]) if all(n in plans[(kind, t)]["configurations"]
                                                                   for t in TARGETS)]:
        seen = []
        for t in TARGETS:
            c = plans[(kind, t)]["configurations"][name]
            seen.append((tuple(c["patch_size"]), c["batch_size"], math.prod(c["patch_size"]) * c["batch_size"]))
        assert len({(p, b) for p, b, _ in seen}) == 3, f"{kind}/{name}: {seen}"
        voxels_per_step = [v for _, _, v in seen]
        assert voxels_per_step[0] < voxels_per_step[1] < voxels_per_step[2], f"{kind}/{name}: {seen}"
        patch_voxels = [math.prod(p) for p, _, _ in seen]
        assert patch_voxels == sorted(patch_voxels), f"{kind}/{name}: patch shrank as the target grew"


@pytest.mark.parametrize("kind", list(FINGERPRINTS))
@pytest.mark.parametrize("target", TARGETS)
def test_estimate_fits_the_budget_and_one_more_sample_would_not(plans, kind, target):
    for name, c in _trainable(plans[(kind, target)]).items():
        budget = TARGET_UTILIZATION * target
        assert c["estimated_vram_gib"] <= budget + 1e-3, (kind, target, name)
        per_sample, fixed = per_sample_and_static_gib(c["network"], c["patch_size"])
        reason = c["reasons"]["batch_size"]
        if "limited by memory" in reason:
            assert fixed + (c["batch_size"] + 1) * per_sample > budget, (kind, target, name)
        else:  # a small latent grid at a large target: the 5 % dataset cap binds before memory
            assert "limited by the 5 % dataset cap" in reason and f"cap {c['batch_size']};" in reason, reason
            assert fixed + c["batch_size"] * per_sample <= budget, (kind, target, name)


@pytest.mark.parametrize("kind", list(FINGERPRINTS))
def test_patch_is_divisible_by_the_total_stride_and_not_larger_than_the_image(plans, kind):
    for t in TARGETS:
        for name, c in plans[(kind, t)]["configurations"].items():
            net = c["network"]
            divisor = shape_divisor(net["strides"], net["spatial_dims"])
            assert all(p % d == 0 for p, d in zip(c["patch_size"], divisor)), (name, c["patch_size"], divisor)
            median = (c["autoencoder"]["latent_median_shape"] if "autoencoder" in c
                      else c["median_image_size_in_voxels"])
            assert all(p <= math.ceil(m / d) * d for p, m, d in zip(c["patch_size"], median, divisor))
            assert len(c["patch_size"]) == net["spatial_dims"] == c["spatial_dims"]


def test_ct_is_anisotropic_coarse_axis_keeps_stride_one_first(plans):
    plan = plans[("ct", 8.0)]
    assert plan["transpose_forward"] == [0, 1, 2]
    assert plan["target_spacing"] == [2.5, 0.7, 0.7]
    net = plan["configurations"]["3d_fullres"]["network"]
    assert net["strides"][0] == [1, 2, 2]
    assert all(s[1:] == [2, 2] for s in net["strides"][:3])
    assert "anisotropy 3.57 > 3" in plan["reasons"]["target_spacing"]
    assert "axis [0] keeps stride 1" in plan["configurations"]["3d_fullres"]["reasons"]["network"]
    mr_net = plans[("mr", 8.0)]["configurations"]["3d_fullres"]["network"]
    assert mr_net["strides"][0] == [2, 2, 2], "isotropic data is pooled on every axis from the start"


def test_transpose_moves_the_coarse_axis_first():
    # same CT as the fixture, but the 2.5 mm axis is last in array order
    fp = fingerprint((512, 512, 300), (0.7, 0.7, 2.5), 500)
    plan = plan_experiment(fp, dataset_json())
    assert plan["transpose_forward"] == [2, 0, 1]
    assert plan["transpose_backward"] == [1, 2, 0]
    assert plan["original_median_spacing_after_transp"] == [2.5, 0.7, 0.7]
    assert plan["original_median_shape_after_transp"] == [300.0, 512.0, 512.0]
    reference = plan_experiment(ct_fingerprint(), dataset_json())
    for name in ("2d", "3d_fullres", "3d_latent"):
        got, ref = plan["configurations"][name], reference["configurations"][name]
        for key in ("spacing", "median_image_size_in_voxels", "patch_size", "batch_size", "network"):
            assert got[key] == ref[key], (name, key)
    assert "moved first: transpose_forward [2, 0, 1]" in plan["reasons"]["transpose_forward"]


def test_anisotropic_axis_uses_the_10th_percentile_of_its_spacings():
    spacings = [[1.25, 0.7, 0.7]] * 30 + [[2.5, 0.7, 0.7]] * 70  # median 2.5 → anisotropy 3.57
    plan = plan_experiment(fingerprint((300, 512, 512), (2.5, 0.7, 0.7), 100, spacings=spacings), dataset_json())
    assert plan["target_spacing"] == [1.25, 0.7, 0.7]
    assert "10th percentile of its spacings, 1.25 mm" in plan["reasons"]["target_spacing"]
    # 70 cases of 300 slices at 2.5 mm become 600 slices at 1.25 mm: the median shape follows
    assert plan["configurations"]["3d_fullres"]["median_image_size_in_voxels"] == [600, 512, 512]
    iso = [[1.0, 1.0, 1.0]] * 50 + [[1.2, 1.0, 1.0]] * 51
    plan = plan_experiment(fingerprint((155, 240, 240), (1.0, 1.0, 1.0), 101, spacings=iso,
                                       channels=(("T1", "mr", "image"),)), dataset_json())
    assert plan["target_spacing"] == [1.2, 1.0, 1.0], "not anisotropic → plain median"
    assert "anisotropy 1.2 ≤ 3 → median spacing" in plan["reasons"]["target_spacing"]


def test_2d_and_3d_configurations(plans):
    xray = plans[("xray", 8.0)]
    assert set(xray["configurations"]) == {"2d", "2d_latent"}
    c2d = xray["configurations"]["2d"]
    assert c2d["spacing"] == [0.15, 0.15] and c2d["median_image_size_in_voxels"] == [2048, 2048]
    assert c2d["network"]["spatial_dims"] == 2 and xray["transpose_forward"] == [0, 1, 2]
    assert xray["target_spacing"][0] == 999.0
    for kind in ("ct", "mr"):
        plan = plans[(kind, 8.0)]
        assert {"2d", "3d_fullres"} <= set(plan["configurations"])
        assert plan["configurations"]["2d"]["spacing"] == plan["target_spacing"][1:]
        assert plan["configurations"]["2d"]["network"]["spatial_dims"] == 2
        assert plan["configurations"]["3d_fullres"]["network"]["spatial_dims"] == 3
        assert plan["configurations"]["3d_fullres"]["spacing"] == plan["target_spacing"]


def test_latent_configuration_for_large_images_is_planned_and_trainable(plans):
    for kind, name, source in (("ct", "3d_latent", "3d_fullres"), ("xray", "2d_latent", "2d")):
        for t in TARGETS:
            plan = plans[(kind, t)]
            latent = plan["configurations"][name]
            assert latent["trainable"] is True and latent["status"].startswith("trainable (two stages")
            assert latent["data_identifier"] == plan["configurations"][source]["data_identifier"]
            assert "autoencoder patch" in latent["reasons"]["status"]
            assert "25 %" in latent["reasons"]["trainable"] and "voxels" in latent["reasons"]["trainable"]
            assert latent["network"]["in_channels"] == latent["autoencoder"]["latent_channels"] == 4
    assert plans[("ct", 8.0)]["configurations"]["3d_latent"]["autoencoder"]["downsampling_factors"] == [2, 4, 4]
    assert plans[("xray", 8.0)]["configurations"]["2d_latent"]["autoencoder"]["downsampling_factors"] == [8, 8]


def test_latent_rule_follows_patch_coverage_and_image_size():
    # MR 155×240×240 (8.9 M voxels ≥ 128³): latent at every target, the reason names both tests
    for target in (8.0, 64.0):
        mr = plan_experiment(mr_fingerprint(), dataset_json(channel_names={"0": "T1"}), gpu_memory_target_gib=target)
        assert "3d_latent" in mr["configurations"]
        assert "≥ 2.1e+06" in mr["reasons"]["configurations"]
    # 40×200×200 (1.6 M voxels < 128³): latent only while the patch covers < 25 %
    mid = fingerprint((40, 200, 200), (1.0, 1.0, 1.0), 300, channels=(("T1", "mr", "image"),))
    low = plan_experiment(mid, dataset_json(channel_names={"0": "T1"}), gpu_memory_target_gib=2.0)
    high = plan_experiment(mid, dataset_json(channel_names={"0": "T1"}), gpu_memory_target_gib=64.0)
    assert "< 2.1e+06" in low["reasons"]["configurations"]
    assert ("3d_latent" in low["configurations"]) == ("< 25 %" in low["reasons"]["configurations"])
    assert "3d_latent" not in high["configurations"] and "≥ 25 %" in high["reasons"]["configurations"]
    small = plan_experiment(fingerprint((64, 64, 64), (1.0, 1.0, 1.0), 300, channels=(("T1", "mr", "image"),)),
                            dataset_json(channel_names={"0": "T1"}), gpu_memory_target_gib=24.0)
    assert set(small["configurations"]) == {"2d", "3d_fullres"}
    assert "≥ 25 %" in small["reasons"]["configurations"]
    slices = plan_experiment(fingerprint((1, 256, 256), (999.0, 1.0, 1.0), 300, spatial_dims=2,
                                         channels=(("T1", "mr", "image"),)), dataset_json(), gpu_memory_target_gib=8.0)
    assert set(slices["configurations"]) == {"2d"}


def test_ct_and_mr_normalization_differ(plans):
    ct = plans[("ct", 8.0)]["normalization"]["images"][0]
    mr = plans[("mr", 8.0)]["normalization"]["images"][0]
    assert ct["scheme"] == "ct_window" and ct["produced"] is True
    # union of foreground and whole-image ranges: the air (whole-image p0.5) stays inside the window
    assert ct["params"] == {"clip_low": CT_WHOLE["percentile_00_5"], "clip_high": CT_FG["percentile_99_5"]}
    assert "[-1024, 1600] HU" in ct["reason"] and "[-950, 1600]" in ct["reason"]
    assert mr["scheme"] == "dataset_percentile"
    # union of whole-image [0, 1500] and foreground [50, 1800] percentile ranges
    assert mr["params"] == {"clip_low": 0.0, "clip_high": MR_FG["percentile_99_5"]}
    assert "[0, 1800]" in mr["reason"] and "whole-image and foreground" in mr["reason"]
    # [0, 1800] contains the whole-image 0.5-99.5 % range and starts at the minimum → ≤ 0.5 %
    assert mr["clip_fraction_upper_bound"] == pytest.approx(0.005)
    assert ct["clip_fraction_upper_bound"] == pytest.approx(0.005)  # widened window: only the tails
    for entry in (ct, mr):
        assert entry["clip_fraction"] is None  # measured by preprocessing


def _has_number(text: str) -> bool:
    return re.search(r"\d", text) is not None


@pytest.mark.parametrize("kind", list(FINGERPRINTS))
def test_every_decision_has_a_reason_with_its_numbers(plans, kind):
    plan = plans[(kind, 24.0)]
    for key, reason in plan["reasons"].items():
        assert _has_number(reason), (key, reason)
    for entry in plan["normalization"]["images"]:
        assert _has_number(entry["reason"]), entry
    for name, c in plan["configurations"].items():
        reasons = c["reasons"]
        for key in c:
            if key in ("reasons", "data_identifier"):
                continue
            assert key in reasons, f"{name}: no reason for {key}"
            assert _has_number(reasons[key]), f"{name}.{key}: {reasons[key]}"
        for sub in ("process", "schedule", "parameterization", "loss_weighting", "noise_type", "sampler", "clip_x0"):
            assert _has_number(reasons[f"diffusion.{sub}"]), (name, sub)
        assert fmt_shape(c["patch_size"]) in reasons["patch_size"]
        assert "24 GiB" in reasons["patch_size"]
        assert f"batch {c['batch_size']}" in reasons["batch_size"]
        assert str(c["network"]["strides"]) in reasons["network"]
        assert f"{c['estimated_vram_gib']:.2f} GiB" in reasons["estimated_vram_gib"]
    median = plan["original_median_spacing_after_transp"]
    quoted = median[1:] if kind == "xray" else median  # 2D: the in-plane spacing, not the dummy 999
    assert fmt_shape(quoted) in plan["reasons"]["transpose_forward"]


def test_reason_quotes_median_shape_spacing_and_anisotropy(plans):
    reason = plans[("ct", 8.0)]["configurations"]["3d_fullres"]["reasons"]["patch_size"]
    assert "median image 300×512×512 at 2.5×0.7×0.7 mm" in reason
    assert "8 GiB × 0.85 = 6.80 GiB budget" in reason
    assert "2.5×0.7×0.7 mm" in plans[("ct", 8.0)]["reasons"]["target_spacing"]


def test_snr_shift_grows_with_patch_size(plans):
    xray = plans[("xray", 64.0)]["configurations"]["2d"]
    side = xray["patch_size"]
    assert xray["diffusion"]["schedule"] == "cosine"
    # the diffusion core divides the SNR by snr_shift² (shift_snr): (d/64)² for a d×d patch (Hoogeboom et al.)
    assert xray["diffusion"]["snr_shift"] ** 2 == pytest.approx((side[0] / 64) * (side[1] / 64))
    assert xray["diffusion"]["snr_shift"] == pytest.approx(side[0] / 64)  # square patch
    ct = plans[("ct", 24.0)]["configurations"]["3d_fullres"]
    assert ct["diffusion"]["snr_shift"] ** 2 == pytest.approx(max(1.0, math.prod(s / 64 for s in ct["patch_size"])))
    assert plans[("xray", 8.0)]["configurations"]["2d"]["diffusion"]["snr_shift"] < xray["diffusion"]["snr_shift"]


def test_dataset_cap_limits_the_batch_of_small_datasets():
    fp = mr_fingerprint(num_cases=2)
    plan = plan_experiment(fp, dataset_json(channel_names={"0": "T1"}), gpu_memory_target_gib=64.0)
    c = plan["configurations"]["2d"]
    dataset_voxels = 2 * 155 * 240 * 240
    expected = max(MIN_BATCH_SIZE, int(MAX_DATASET_FRACTION_PER_BATCH * dataset_voxels // math.prod(c["patch_size"])))
    assert c["batch_size"] == expected
    assert "limited by the 5 % dataset cap" in c["reasons"]["batch_size"]
    tiny = plan_experiment(fingerprint((1, 32, 32), (999.0, 1.0, 1.0), 3, spatial_dims=2), dataset_json())
    assert tiny["configurations"]["2d"]["batch_size"] == MIN_BATCH_SIZE
    assert "clamped up to the minimum 2" in tiny["configurations"]["2d"]["reasons"]["batch_size"]
