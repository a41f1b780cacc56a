"""Family differences, inherits_from, the family hook, errors, determinism and explain()."""
from __future__ import annotations

import copy
import json

import pytest
from planning_fixtures import (
    CT_FG,
    CT_WHOLE,
    MAG_WHOLE,
    MR_FG,
    MR_WHOLE,
    ct_fingerprint,
    dataset_json,
    fingerprint,
    mr_fingerprint,
)

import nndiff.tasks
from nndiff.diffusion.options import (
    Guidance,
    LossWeighting,
    NoiseType,
    NormalizationScheme,
    Parameterization,
    Process,
    Sampler,
    Schedule,
    TimestepSpacing,
    parse_option,
)
from nndiff.errors import PlansError
from nndiff.planning import Decision, explain, plan_experiment, resolve_configuration

DIFFUSION_KEYS = {"process", "num_train_timesteps", "schedule", "snr_shift", "parameterization", "loss_weighting",
                  "min_snr_gamma", "noise_type", "noise_params", "sampler", "num_sampling_steps", "timestep_spacing",
                  "clip_x0", "guidance", "guidance_scale", "condition_dropout"}
NETWORK_KEYS = {"architecture", "spatial_dims", "in_channels", "cond_channels", "out_channels", "model_channels",
                "channel_mult", "strides", "num_res_blocks", "attention_levels", "num_head_channels", "norm_groups",
                "dropout", "num_classes", "num_continuous_conditions"}


def _small_2d(task: str, channels=(("grey", "other", "image"),), props=((MR_FG, MR_WHOLE),), **kw) -> dict:
    return fingerprint((1, 32, 32), (999.0, 1.0, 1.0), 300, channels=channels, props=props, spatial_dims=2,
                       task=task, **kw)


def _small_3d(task: str, channels, props) -> dict:
    return fingerprint((16, 16, 16), (1.0, 1.0, 1.0), 300, channels=channels, props=props, task=task)


def _only(plan: dict, name: str = "2d") -> dict:
    return plan["configurations"][name]


def test_diffusion_block_keys_and_spellings_for_every_family():
    cases = {
        "generation": _small_2d("generation"),
        "anomaly_detection": _small_2d("anomaly_detection"),
        "denoising": _small_2d("denoising"),
        "reconstruction": _small_2d("reconstruction", props=((MAG_WHOLE, MAG_WHOLE),), is_complex=True),
        "translation": _small_3d("translation", (("T1", "mr", "image"), ("CT", "ct", "target")),
                                 ((MR_FG, MR_WHOLE), (CT_FG, CT_WHOLE))),
        "segmentation": _small_3d("segmentation", (("T2", "mr", "image"),), ((MR_FG, MR_WHOLE),)),
    }
    for task, fp in cases.items():
        spec = dataset_json(task, labels={"background": 0, "a": 1}) if task == "segmentation" else dataset_json(task)
        plan = plan_experiment(fp, spec)
        for name, c in plan["configurations"].items():
            d = c["diffusion"]
            assert set(d) == DIFFUSION_KEYS, (task, name)
            assert set(c["network"]) == NETWORK_KEYS
            parse_option(Process, d["process"])
            parse_option(Schedule, d["schedule"])
            parse_option(Parameterization, d["parameterization"])
            parse_option(LossWeighting, d["loss_weighting"])
            parse_option(Sampler, d["sampler"])
            parse_option(TimestepSpacing, d["timestep_spacing"])
            parse_option(NoiseType, d["noise_type"])
            parse_option(Guidance, d["guidance"])
            assert (d["process"], d["num_train_timesteps"], d["parameterization"]) == ("vp_discrete", 1000, "v")
            assert (d["loss_weighting"], d["min_snr_gamma"]) == ("min_snr", 5.0)
            for entry in plan["normalization"]["images"] + plan["normalization"]["targets"]:
                parse_option(NormalizationScheme, entry["scheme"])


def test_reconstruction_is_scale_only_uncropped_and_data_consistent():
    fp = _small_2d("reconstruction", channels=(("MR", "mr", "image"),), props=((MAG_WHOLE, MAG_WHOLE),),
                   is_complex=True)
    plan = plan_experiment(fp, dataset_json("reconstruction"))
    entry = plan["normalization"]["images"][0]
    assert entry["scheme"] == "scale_only" and entry["params"] == {"scale": MAG_WHOLE["percentile_99_5"]}
    assert "99.5th percentile of the magnitudes" in entry["reason"] and "1.25" in entry["reason"]
    c = _only(plan)
    assert c["network"]["in_channels"] == c["network"]["out_channels"] == 2  # real/imaginary pair
    assert c["network"]["cond_channels"] == 0
    assert c["crop_to_nonzero"] is False
    assert c["diffusion"]["clip_x0"] is None
    assert c["sampling"]["data_consistency"] is True and c["sampling"]["start_fraction"] == 0.5


def test_anomaly_detection_uses_simplex_noise_and_partial_diffusion():
    plan = plan_experiment(_small_2d("anomaly_detection"), dataset_json("anomaly_detection"))
    d = _only(plan)["diffusion"]
    assert d["noise_type"] == "simplex"
    # the family hook (nndiff.tasks.anomaly.plan_overrides) sizes the simplex field to the patch:
    # first-octave size = smallest patch side / 4, octaves halve it down to 2 voxels
    patch = _only(plan)["patch_size"]
    params = d["noise_params"]
    assert params["persistence"] == 0.8 and params["frequency"] == min(patch) / 4
    assert params["frequency"] / 2 ** (params["octaves"] - 1) >= 2 > params["frequency"] / 2 ** params["octaves"]
    assert d["sampler"] == "ddpm" and _only(plan)["sampling"]["start_fraction"] == 0.25
    generation = plan_experiment(_small_2d("generation"), dataset_json("generation"))
    assert _only(generation)["diffusion"]["noise_type"] == "gaussian"
    assert _only(generation)["diffusion"]["noise_params"] == {}
    assert _only(generation)["diffusion"]["sampler"] == "dpm_solver_pp_2m"


def test_translation_conditions_on_the_images_and_produces_the_targets():
    fp = _small_3d("translation", (("T1", "mr", "image"), ("T2", "mr", "image"), ("CT", "ct", "target")),
                   ((MR_FG, MR_WHOLE), (MR_FG, MR_WHOLE), (CT_FG, CT_WHOLE)))
    plan = plan_experiment(fp, dataset_json("translation"))
    for name in ("2d", "3d_fullres"):
        net = plan["configurations"][name]["network"]
        assert (net["in_channels"], net["cond_channels"], net["out_channels"]) == (1, 2, 1)
    assert [e["scheme"] for e in plan["normalization"]["images"]] == ["per_image_percentile"] * 2
    assert all(not e["produced"] for e in plan["normalization"]["images"])
    target = plan["normalization"]["targets"][0]
    assert target["produced"] and target["scheme"] == "ct_window"
    assert target["params"] == {"clip_low": -1024.0, "clip_high": 1600.0}
    assert plan["configurations"]["3d_fullres"]["diffusion"]["sampler"] == "ddim"


def test_denoising_paired_and_clean_only():
    clean = plan_experiment(_small_2d("denoising"), dataset_json("denoising", degradation={"type": "gaussian", "level": 0.1}))
    net = _only(clean)["network"]
    assert (net["in_channels"], net["cond_channels"]) == (1, 1)
    assert clean["normalization"]["images"][0]["scheme"] == "dataset_percentile"
    paired = plan_experiment(_small_2d("denoising", channels=(("noisy", "mr", "image"), ("clean", "mr", "target")),
                                       props=((MR_FG, MR_WHOLE), (MR_FG, MR_WHOLE))), dataset_json("denoising"))
    assert paired["normalization"]["images"][0]["scheme"] == "per_image_percentile"
    assert paired["normalization"]["targets"][0]["scheme"] == "dataset_percentile"


def test_segmentation_diffuses_one_hot_labels_conditioned_on_images():
    fp = _small_3d("segmentation", (("T2", "mr", "image"), ("ADC", "mr", "image")), ((MR_FG, MR_WHOLE),) * 2)
    plan = plan_experiment(fp, dataset_json("segmentation", labels={"background": 0, "a": 1, "b": 2}))
    c = plan["configurations"]["3d_fullres"]
    assert (c["network"]["in_channels"], c["network"]["cond_channels"], c["network"]["out_channels"]) == (3, 2, 3)
    assert c["diffusion"]["sampler"] == "ddim" and c["diffusion"]["num_sampling_steps"] == 10
    assert c["sampling"]["label_encoding"] == "one_hot"
    assert {e["scheme"] for e in plan["normalization"]["images"]} == {"per_image_percentile"}
    with pytest.raises(PlansError, match="labels"):
        plan_experiment(fp, dataset_json("segmentation"))


def test_rgb_channels_use_the_rgb_scheme():
    fp = _small_2d("generation", channels=tuple((c, "microscopy_rgb", "image") for c in "RGB"),
                   props=((MR_FG, MR_WHOLE),) * 3, is_rgb=True)
    plan = plan_experiment(fp, dataset_json())
    assert [e["scheme"] for e in plan["normalization"]["images"]] == ["rgb"] * 3
    assert _only(plan)["network"]["in_channels"] == 3


def test_conditions_set_classes_continuous_inputs_and_guidance():
    spec = dataset_json(conditions={"sex": {"type": "categorical", "values": ["F", "M"]},
                                    "site": {"type": "categorical", "values": ["a", "b", "c"]},
                                    "age": "continuous"})
    plan = plan_experiment(_small_2d("generation"), spec)
    c = _only(plan)
    assert c["network"]["num_classes"] == 6 and c["network"]["num_continuous_conditions"] == 1
    assert "num_classes 6" in c["reasons"]["network.conditioning"]
    d = c["diffusion"]
    assert (d["guidance"], d["guidance_scale"], d["condition_dropout"]) == ("classifier_free", 2.0, 0.1)
    unconditional = _only(plan_experiment(_small_2d("generation"), dataset_json()))["diffusion"]
    assert (unconditional["guidance"], unconditional["condition_dropout"]) == ("none", 0.0)
    with pytest.raises(PlansError, match="conditions.sex"):
        plan_experiment(_small_2d("generation"), dataset_json(conditions={"sex": {"type": "categorical"}}))


def test_plan_is_json_serialisable_deterministic_and_leaves_inputs_untouched():
    fp, spec = ct_fingerprint(), dataset_json()
    fp_copy, spec_copy = copy.deepcopy(fp), copy.deepcopy(spec)
    first = plan_experiment(fp, spec)
    second = plan_experiment(fp, spec)
    assert json.dumps(first) == json.dumps(second)
    assert json.loads(json.dumps(first)) == first
    assert fp == fp_copy and spec == spec_copy
    assert first["task"] == "generation" and first["plans_name"] == "nnDiffPlans"
    other = plan_experiment(fp, spec, plans_name="nnDiffPlansBig")
    assert other["configurations"]["2d"]["data_identifier"] == "nnDiffPlansBig_2d"


def test_inherits_from_resolves_with_nested_overrides():
    plan = plan_experiment(mr_fingerprint(num_cases=300), dataset_json(channel_names={"0": "T1"}))
    plan["configurations"]["2d_small"] = {"inherits_from": "2d", "batch_size": 2,
                                          "network": {"model_channels": 32, "channel_mult": [1, 2]}}
    plan["configurations"]["2d_tiny"] = {"inherits_from": "2d_small", "patch_size": [64, 64]}
    plan = json.loads(json.dumps(plan))  # as stored in nnDiffPlans.json
    base = resolve_configuration(plan, "2d")
    tiny = resolve_configuration(plan, "2d_tiny")
    assert "inherits_from" not in tiny
    assert tiny["patch_size"] == [64, 64] and tiny["batch_size"] == 2
    assert tiny["network"]["model_channels"] == 32 and tiny["network"]["channel_mult"] == [1, 2]
    assert tiny["network"]["strides"] == base["network"]["strides"]  # merged key by key
    assert tiny["diffusion"] == base["diffusion"] and tiny["data_identifier"] == base["data_identifier"]
    assert "overridden by configuration '2d_small'" in tiny["reasons"]["batch_size"]
    assert "network.model_channels" in tiny["reasons"]["network"]
    assert "overridden by configuration '2d_tiny'" in tiny["reasons"]["patch_size"]
    assert base["reasons"]["batch_size"] in tiny["reasons"]["batch_size"]
    assert resolve_configuration(plan, "2d") == base and base["batch_size"] == plan["configurations"]["2d"]["batch_size"]
    text = explain(plan)
    assert "Configuration '2d_tiny' (inherits_from '2d_small', overrides: patch_size)" in text


def test_inherits_from_errors_name_the_configuration():
    plan = {"configurations": {"a": {"inherits_from": "b"}, "b": {"inherits_from": "a"},
                               "c": {"inherits_from": "missing"}, "d": {"inherits_from": "c"}}}
    with pytest.raises(PlansError, match="'a'.*cycle: a → b → a"):
        resolve_configuration(plan, "a")
    with pytest.raises(PlansError, match="'c' inherits_from unknown configuration 'missing'"):
        resolve_configuration(plan, "c")
    with pytest.raises(PlansError, match="needed by 'd'"):
        resolve_configuration(plan, "d")
    with pytest.raises(PlansError, match="'zzz' is not in the plans"):
        resolve_configuration(plan, "zzz")


def test_family_hook_is_called_last(monkeypatch):
    seen = {}

    def overrides(fp, plans):
        seen["configs"] = sorted(plans["configurations"])
        seen["has_normalization"] = bool(plans["normalization"]["images"])
        plans["configurations"]["2d"]["diffusion"]["num_sampling_steps"] = 7

    monkeypatch.setattr(nndiff.tasks, "plan_hook", lambda task: overrides if task == "anomaly_detection" else None)
    plan = plan_experiment(_small_2d("anomaly_detection"), dataset_json("anomaly_detection"))
    assert seen == {"configs": ["2d"], "has_normalization": True}
    assert _only(plan)["diffusion"]["num_sampling_steps"] == 7
    untouched = plan_experiment(_small_2d("generation"), dataset_json("generation"))
    assert _only(untouched)["diffusion"]["num_sampling_steps"] == 25

    monkeypatch.setattr(nndiff.tasks, "plan_hook", lambda task: lambda fp, plans: {**plans, "extra": 1})
    assert plan_experiment(_small_2d("generation"), dataset_json())["extra"] == 1
    monkeypatch.setattr(nndiff.tasks, "plan_hook", lambda task: lambda fp, plans: {**plans, "bad": object()})
    with pytest.raises(PlansError, match="plan_overrides"):
        plan_experiment(_small_2d("generation"), dataset_json())


def test_plan_hook_registry(monkeypatch):
    assert nndiff.tasks.plan_hook("generation") is None
    monkeypatch.setitem(nndiff.tasks.PLAN_HOOKS, "generation", "json:dumps")
    assert nndiff.tasks.plan_hook("generation") is json.dumps
    with pytest.raises(ValueError, match="task"):
        nndiff.tasks.plan_hook("painting")


def test_user_errors_name_the_field():
    spec = dataset_json()
    for field in ("spacings", "shapes_after_crop", "spatial_dims", "channels"):
        fp = ct_fingerprint(num_cases=3)
        del fp[field]
        with pytest.raises(PlansError, match=f"'{field}'"):
            plan_experiment(fp, spec)
    fp = ct_fingerprint(num_cases=3)
    del fp["foreground_intensity_properties_per_channel"]
    with pytest.raises(PlansError, match="foreground intensity properties"):
        plan_experiment(fp, spec)
    with pytest.raises(PlansError, match="'task'"):
        plan_experiment(ct_fingerprint(num_cases=3), dataset_json("painting"))
    for bad in (0, -8.0, float("nan")):
        with pytest.raises(PlansError, match="GiB"):
            plan_experiment(ct_fingerprint(num_cases=3), spec, gpu_memory_target_gib=bad)
    with pytest.raises(PlansError, match="target"):
        plan_experiment(_small_2d("translation"), dataset_json("translation"))


def test_explain_lists_every_decision():
    plan = plan_experiment(ct_fingerprint(), dataset_json())
    text = explain(plan)
    for name, c in plan["configurations"].items():
        assert f"Configuration '{name}'" in text
        for reason in c["reasons"].values():
            assert reason in text
    for reason in plan["reasons"].values():
        assert reason in text
    assert plan["normalization"]["images"][0]["reason"] in text
    for name, c in plan["configurations"].items():
        assert f"    patch_size = {json.dumps(c['patch_size'], separators=(', ', ': '))}" in text


def test_decision_requires_a_reason():
    assert Decision(3, "because 3").value == 3
    with pytest.raises(ValueError):
        Decision(3, " ")
