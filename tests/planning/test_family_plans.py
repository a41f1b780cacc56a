"""The same images planned as different families get what each family needs (issue 5).

Reconstruction: no crop, no resampling, scale-only normalization, a data-consistency sampler with a
warm start. Translation: conditioning channels (2× with allow_missing_channels). Denoising: paired
vs clean-only channels and, clean-only, the degradation chosen by modality or dataset.json.
Segmentation and anomaly detection as before.
"""
from __future__ import annotations

import numpy as np
import pytest
from planning_fixtures import CT_FG, CT_WHOLE, MAG_WHOLE, MR_FG, MR_WHOLE, dataset_json, fingerprint

from nndiff.dataset.io import ImageProperties
from nndiff.errors import PlansError
from nndiff.planning import plan_experiment
from nndiff.planning.diffusion import DEFAULT_CT_LEVELS, DEFAULT_DEGRADATION_LEVELS
from nndiff.preprocessing.case import invert_case, preprocess_case

#: Per-case spacings differ, so a family that resamples changes the grid of the odd case.
SPACINGS = [[1.0, 1.0, 1.0]] * 9 + [[1.0, 1.5, 1.5]]
IMAGE = ("T1", "mr", "image")


def _fp(task: str, channels=(IMAGE,), props=((MR_FG, MR_WHOLE),), **kw) -> dict:
    return fingerprint((16, 16, 16), (1.0, 1.0, 1.0), 10, channels=channels, props=props, task=task,
                       spacings=SPACINGS, **kw)


def _plan(task: str, channels=(IMAGE,), props=((MR_FG, MR_WHOLE),), fp_kw=None, **spec) -> dict:
    spec.setdefault("channel_names", {"0": channels[0][0]})
    if task == "segmentation":
        spec.setdefault("labels", {"background": 0, "tumour": 1})
    return plan_experiment(_fp(task, channels, props, **(fp_kw or {})), dataset_json(task, **spec))


def _net(plan: dict, name: str = "3d_fullres") -> tuple[int, int, int]:
    net = plan["configurations"][name]["network"]
    return net["in_channels"], net["cond_channels"], net["out_channels"]


def _properties(spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> ImageProperties:
    return ImageProperties(spacing=spacing, origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()),
                           spatial_dims=3, shape=shape, num_channels=1, dtype="float32")


# --------------------------------------------------------------------------- reconstruction


def test_reconstruction_keeps_the_measurement_grid_and_plans_data_consistency():
    plan = _plan("reconstruction", props=((MAG_WHOLE, MAG_WHOLE),))
    entry = plan["normalization"]["images"][0]
    assert entry["scheme"] == "scale_only" and set(entry["params"]) == {"scale"}  # no offset, no clip
    for name, config in plan["configurations"].items():
        assert config["crop_to_nonzero"] is False, name
        assert config["resample"] is False, name
        assert "measurement grid" in config["reasons"]["resample"]
        assert config["diffusion"]["clip_x0"] is None
        sampling = config["sampling"]
        assert sampling["data_consistency"] is True
        assert sampling["warm_start"] == "adjoint" and 0 < sampling["start_fraction"] < 1
        assert _net(plan, name)[1] == 0  # conditioned through data consistency, not channels
        assert "degradation" not in config


def test_reconstruction_preprocessing_neither_crops_nor_resamples_and_inverts_exactly():
    plan = _plan("reconstruction", props=((MAG_WHOLE, MAG_WHOLE),))
    generation = _plan("generation", props=((MAG_WHOLE, MAG_WHOLE),))
    rng = np.random.default_rng(0)
    image = np.zeros((1, 8, 12, 12), np.float32)
    image[:, 2:6, 3:9, 3:9] = rng.uniform(0.5, 1.0, (1, 4, 6, 6))  # zero border a crop would remove
    props = _properties((1.0, 1.5, 1.5), (8, 12, 12))  # finer planned spacing: resampling would upsample
    arrays, case_json = preprocess_case(image, props, plan, "3d_fullres")
    assert arrays["data"].shape == (1, 8, 12, 12)
    assert case_json["spacing_after_resampling"] == case_json["spacing_before_resampling"]
    assert case_json["bbox"] == [[0, 8], [0, 12], [0, 12]]
    scale = plan["normalization"]["images"][0]["params"]["scale"]
    np.testing.assert_allclose(arrays["data"], image / scale, rtol=1e-6)  # linear: x / scale only
    restored, _ = invert_case(arrays["data"], case_json, plan, "3d_fullres")
    np.testing.assert_allclose(restored, image, rtol=1e-6, atol=1e-7)
    resampled, _ = preprocess_case(image, props, generation, "3d_fullres")
    assert generation["configurations"]["3d_fullres"]["resample"] is True
    assert resampled["data"].shape != (1, 8, 12, 12)  # the same case under another family is resampled


# --------------------------------------------------------------------------- translation


def test_translation_conditions_on_the_images_and_doubles_them_for_missing_channels():
    channels = (IMAGE, ("T2", "mr", "image"), ("CT", "ct", "target"))
    props = ((MR_FG, MR_WHOLE), (MR_FG, MR_WHOLE), (CT_FG, CT_WHOLE))
    plain = _plan("translation", channels, props)
    masked = _plan("translation", channels, props, allow_missing_channels=True)
    for name in ("2d", "3d_fullres"):
        assert _net(plain, name) == (1, 2, 1)
        assert _net(masked, name) == (1, 4, 1)
        reason = masked["configurations"][name]["reasons"]["network.channels"]
        assert "2 availability mask channel(s)" in reason and "cond_channels 4" in reason
        assert masked["configurations"][name]["resample"] is True
        assert masked["configurations"][name]["crop_to_nonzero"] is True
        assert "degradation" not in masked["configurations"][name]
    assert plain["normalization"]["targets"][0]["produced"] is True


def test_allow_missing_channels_is_refused_where_images_cannot_be_completed():
    for task, extra in (("generation", {}), ("reconstruction", {}), ("segmentation", {}),
                        ("denoising", {"degradation": {"type": "gaussian", "level": 0.1}})):
        with pytest.raises(PlansError, match="'allow_missing_channels' is true.*Fix: remove the key"):
            _plan(task, allow_missing_channels=True, **extra)
    # false is the same as absent
    assert _net(_plan("generation", allow_missing_channels=False)) == (1, 0, 1)


# --------------------------------------------------------------------------- denoising


def test_denoising_paired_vs_clean_only_channels():
    paired = _plan("denoising", (("noisy", "mr", "image"), ("clean", "mr", "target")),
                   ((MR_FG, MR_WHOLE), (MR_FG, MR_WHOLE)))
    assert _net(paired) == (1, 1, 1)
    assert "degradation" not in paired["configurations"]["3d_fullres"]
    paired_missing = _plan("denoising", (("noisy", "mr", "image"), ("clean", "mr", "target")),
                           ((MR_FG, MR_WHOLE), (MR_FG, MR_WHOLE)), allow_missing_channels=True)
    assert _net(paired_missing) == (1, 2, 1)
    clean_only = _plan("denoising")
    assert _net(clean_only) == (1, 1, 1)  # clean image diffused, degraded copy as condition
    assert clean_only["configurations"]["3d_fullres"]["degradation"]["type"] == "rician"


@pytest.mark.parametrize("name, modality, props, complex_, expected", [
    ("T1", "mr", (MR_FG, MR_WHOLE), False, ("rician", False)),
    ("MR", "mr", (MAG_WHOLE, MAG_WHOLE), True, ("gaussian", False)),
    ("CT", "ct", (CT_FG, CT_WHOLE), False, ("poisson", True)),
    ("PET", "pet", (MR_FG, MR_WHOLE), False, ("poisson", False)),
    ("xray", "xray", (MR_FG, MR_WHOLE), False, ("gaussian", False)),
])
def test_clean_only_degradation_follows_the_modality(name, modality, props, complex_, expected):
    plan = _plan("denoising", ((name, modality, "image"),), (props,), fp_kw={"is_complex": complex_})
    kind, ct = expected
    levels = DEFAULT_CT_LEVELS if ct else DEFAULT_DEGRADATION_LEVELS[kind]
    for config in plan["configurations"].values():
        assert config["degradation"] == {"type": kind, "level": levels, "ct": ct, "source": "modality"}
        reason = config["reasons"]["degradation"]
        assert f"first image channel is {modality}" in reason and f"{kind}" in reason
        assert all(f"{v:g}" in reason for v in levels)  # the numbers are in the reason
    if ct:
        assert "photons per ray" in plan["configurations"]["2d"]["reasons"]["degradation"]


def test_dataset_json_degradation_overrides_the_modality():
    fixed = _plan("denoising", degradation={"type": "gaussian", "level": 0.05})
    assert fixed["configurations"]["2d"]["degradation"] == {"type": "gaussian", "level": [0.05, 0.05],
                                                            "ct": False, "source": "dataset.json"}
    assert "dataset.json key 'degradation' says gaussian" in fixed["configurations"]["2d"]["reasons"]["degradation"]
    ct = _plan("denoising", ((("CT", "ct", "image")),), ((CT_FG, CT_WHOLE),), degradation={"type": "poisson"})
    assert ct["configurations"]["2d"]["degradation"] == {"type": "poisson", "level": DEFAULT_CT_LEVELS,
                                                         "ct": True, "source": "dataset.json"}
    ranged = _plan("denoising", degradation={"type": "rician", "level": [0.02, 0.1]})
    assert ranged["configurations"]["2d"]["degradation"]["level"] == [0.02, 0.1]
    with pytest.raises(PlansError, match="dataset.json key 'degradation'.*speckle"):
        _plan("denoising", degradation={"type": "speckle", "level": 0.1})
    with pytest.raises(PlansError, match="dataset.json key 'degradation' 'level'.*\\[0.2, 0.1\\]"):
        _plan("denoising", degradation={"type": "rician", "level": [0.2, 0.1]})


# --------------------------------------------------------------------------- segmentation, anomaly


def test_segmentation_and_anomaly_detection_are_unchanged():
    seg = _plan("segmentation")
    assert _net(seg) == (2, 1, 2)  # one-hot labels conditioned on the image
    anomaly = _plan("anomaly_detection")
    assert _net(anomaly) == (1, 0, 1)
    assert anomaly["configurations"]["3d_fullres"]["diffusion"]["noise_type"] == "simplex"
    for plan in (seg, anomaly):
        for config in plan["configurations"].values():
            assert config["resample"] is True and config["crop_to_nonzero"] is True
            assert "degradation" not in config
            assert "resampled to the configuration's spacing" in config["reasons"]["resample"]
