"""GenerationPredictor: samples of briefly trained tiny models (CPU) in the dataset's format, geometry
and units; registry, command line, sampler overrides, EMA, fold ensembles, condition checks."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nndiff.dataset.examples import make_example_dataset
from nndiff.dataset.io import read_images
from nndiff.errors import NnDiffError
from nndiff.inference import predictor_class_for
from nndiff.inference.cli import parse_condition_flags, predict_entry
from nndiff.networks import NULL_LABEL
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
from nndiff.tasks.generation_predictor import GenerationPredictor, validate_conditions
from nndiff.tasks.generation import ConditionEncoder
from nndiff.training import load_checkpoint, resolve_configuration
from nndiff.training.api import train_fold
from nndiff.utils.files import load_json, save_json

TRAINER = "GenerationTrainer"
#: Tiny network, two iterations, three sampling steps: what is under test is the predictor, not the model.
TINY_OVERRIDES = {
    "network": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                "num_head_channels": 8, "norm_groups": 4},
    "training": {"num_iterations_per_epoch": 2, "num_epochs": 1, "num_val_cases": 1, "warmup_iterations": 1,
                 "augmentation": "none", "progress_every_epochs": 100},
    "diffusion": {"num_sampling_steps": 3},
}


def _tiny(parent: str, spatial_dims: int) -> dict:
    tiny = {"inherits_from": parent, **{k: dict(v) for k, v in TINY_OVERRIDES.items()}}
    tiny["network"]["strides"] = [[2] * spatial_dims]
    return tiny


def _prepare(root: Path, kind: str, dataset_id: int, tiny: dict[str, str]) -> tuple[Paths, dict]:
    """Example dataset -> fingerprint, plan + tiny configurations (name -> parent), preprocess parents."""
    paths = Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")
    make_example_dataset(kind, paths.raw, dataset_id)
    location = locate_dataset(dataset_id, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    for name, parent in tiny.items():
        plans["configurations"][name] = _tiny(parent, plans["configurations"][parent]["spatial_dims"])
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=sorted(set(tiny.values())))
    return paths, plans


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """3D CT example (spacing 3 x 0.8 x 0.8, rotated direction, non-zero origin, HU): tiny 3D and 2d models."""
    paths, plans = _prepare(tmp_path_factory.mktemp("ct"), "3d_ct", 811, {"tiny3d": "3d_fullres", "tiny2d": "2d"})
    for configuration in ("tiny3d", "tiny2d"):
        train_fold(811, configuration, 0, paths, trainer=TRAINER, device="cpu", num_workers=0)
    return paths, plans


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    paths, plans = _prepare(tmp_path_factory.mktemp("png"), "2d_grey_png", 812, {"tiny": "2d"})
    train_fold(812, "tiny", 0, paths, trainer=TRAINER, device="cpu", num_workers=0)
    return paths, plans


def _model_dir(paths: Paths, configuration: str) -> Path:
    return next(paths.results.iterdir()) / f"{TRAINER}__nnDiffPlans__{configuration}"


def _load(paths: Paths, configuration: str, **kwargs) -> GenerationPredictor:
    return GenerationPredictor.from_model_folder(_model_dir(paths, configuration), device="cpu", **kwargs)


def _window(plans: dict) -> tuple[float, float]:
    params = plans["normalization"]["images"][0]["params"]
    return params["clip_low"], params["clip_high"]


def test_registered_for_the_generation_trainer():
    assert predictor_class_for(TRAINER) is GenerationPredictor


def test_3d_samples_geometry_units_and_seed(ct, tmp_path):
    paths, plans = ct
    predictor = _load(paths, "tiny3d")
    assert predictor.model_info["use_ema"] and not predictor.is_conditional
    files = predictor.generate_to_folder(tmp_path / "a", 3, seed=4)
    assert [p.name for p in files] == ["sample_0000.nii.gz", "sample_0001.nii.gz", "sample_0002.nii.gz"]
    low, high = _window(plans)
    patch = resolve_configuration(plans, "tiny3d")["patch_size"]
    arrays = []
    for path in files:
        array, props = read_images([path])
        assert props.spatial_dims == 3 and array.shape == (1, *patch)
        assert props.spacing == pytest.approx((3.0, 0.8, 0.8))  # the plan's spacing, not the raw files'
        assert props.origin == (0.0, 0.0, 0.0) and props.direction == pytest.approx(np.eye(3).ravel())
        # Original units: HU inside the plan's window (the raw images are int16 HU in -1024..1500)
        assert low - 1e-3 <= array.min() and array.max() <= high + 1e-3
        arrays.append(array)
    assert not np.array_equal(arrays[0], arrays[1])  # samples of a batch differ
    again = predictor.generate_to_folder(tmp_path / "b", 3, seed=4)
    other = predictor.generate_to_folder(tmp_path / "c", 3, seed=5)
    for a, b, c in zip(files, again, other):
        assert a.read_bytes() == b.read_bytes()
        assert not np.array_equal(read_images([a])[0], read_images([c])[0])
    info = load_json(tmp_path / "a" / "prediction_info.json")
    assert info["predictor"] == "GenerationPredictor" and info["conditions"] is None and info["guidance_scale"] is None


def test_median_shape_is_padded_for_the_network_and_cropped_back(ct, tmp_path):
    paths, plans = ct
    predictor = _load(paths, "tiny3d")
    median = resolve_configuration(plans, "tiny3d")["median_image_size_in_voxels"]
    assert any(s % 2 for s in median)  # the network (one stride 2) cannot take it as is
    (path,) = predictor.generate_to_folder(tmp_path, 1, shape="median")
    assert read_images([path])[0].shape == (1, *median)


def test_2d_configuration_of_3d_data_writes_2d_slices(ct, tmp_path):
    paths, plans = ct
    predictor = _load(paths, "tiny2d")
    files = predictor.generate_to_folder(tmp_path, 2, seed=1)
    patch = resolve_configuration(plans, "tiny2d")["patch_size"]
    low, high = _window(plans)
    for path in files:
        assert path.name.endswith(".nii.gz")
        array, props = read_images([path])
        assert props.spatial_dims == 2 and array.shape == (1, 1, *patch)
        assert props.spacing == pytest.approx((999.0, 0.8, 0.8))
        assert props.origin == (0.0, 0.0) and props.direction == pytest.approx((1.0, 0.0, 0.0, 1.0))
        assert low - 1e-3 <= array.min() and array.max() <= high + 1e-3


def test_png_dataset_writes_png_in_the_window(png, tmp_path):
    paths, plans = png
    files = _load(paths, "tiny").generate_to_folder(tmp_path, 2)
    low, high = _window(plans)
    for path in files:
        assert path.suffix == ".png"
        array, props = read_images([path])
        assert props.spatial_dims == 2 and array.shape == (1, 1, 32, 32)
        # PNG stores rounded grey values: the window edges rounded outwards
        assert math.floor(low) <= array.min() and array.max() <= math.ceil(high)


def _count_calls(predictor: GenerationPredictor) -> list[int]:
    calls = [0]
    predictor.networks[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("num_steps,sampler,expected", [(None, None, 3), (5, None, 5), (4, "ddim", 4)])
def test_planned_sampler_and_overrides(png, tmp_path, num_steps, sampler, expected):
    """The plan's step count (3 in the tiny configuration) unless overridden; one call per step
    (the DPM-Solver++ 2M and DDIM samplers are single-evaluation)."""
    paths, _ = png
    predictor = _load(paths, "tiny", num_steps=num_steps, sampler=sampler, batch_size=2)
    calls = _count_calls(predictor)
    predictor.generate_to_folder(tmp_path, 2)
    assert calls[0] == expected
    info = load_json(tmp_path / "prediction_info.json")
    assert (info["num_steps"], info["sampler"]) == (num_steps, sampler)


def test_ema_weights_by_default(png):
    paths, _ = png
    state = load_checkpoint(_model_dir(paths, "tiny") / "fold_0" / "checkpoint_final.pth")
    for use_ema, key in ((True, "ema_weights"), (False, "network_weights")):
        loaded = _load(paths, "tiny", use_ema=use_ema).networks[0].state_dict()
        assert all(torch.equal(loaded[k], state[key][k]) for k in state[key])
    assert not all(torch.equal(state["ema_weights"][k], state["network_weights"][k]) for k in state["ema_weights"])


def test_command_line_generation(png, tmp_path):
    paths, _ = png
    roots = ["--preprocessed", str(paths.preprocessed), "--results", str(paths.results), "-q"]
    assert predict_entry(["-o", str(tmp_path / "a"), "-d", "812", "-c", "tiny", "--num_samples", "2",
                          "--steps", "2", "-device", "cpu", *roots]) == 0
    info = load_json(tmp_path / "a" / "prediction_info.json")
    assert info["predictor"] == "GenerationPredictor" and info["num_steps"] == 2
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == ["sample_0000.png", "sample_0001.png"]
    # an unconditional model refuses conditions with exit code 2
    assert predict_entry(["-o", str(tmp_path / "b"), "-d", "812", "-c", "tiny", "--condition", "shape=disk",
                          "-device", "cpu", *roots]) == 2


# ----------------------------------------------------------------------------------------------
# Fold ensembles and conditions (no training: recording networks)
# ----------------------------------------------------------------------------------------------
class Recorder(nn.Module):
    """Returns ``value`` everywhere and records the conditions it sees."""

    shape_divisor = (2, 2)

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.calls: list[dict] = []

    def forward(self, x, t, class_labels=None, continuous=None):
        self.calls.append({"class_labels": class_labels, "continuous": continuous})
        return torch.full_like(x, self.value)


@pytest.fixture(scope="module")
def conditional_plans(tmp_path_factory):
    """Plans and dataset.json of the conditional_2d example (categorical shape, continuous size)."""
    root = tmp_path_factory.mktemp("cond")
    paths = Paths(raw=root / "raw", preprocessed=root / "pre", results=root / "res")
    raw = make_example_dataset("conditional_2d", paths.raw, 813)
    location = locate_dataset(813, paths)
    extract_fingerprint_step(location)
    return plan_step(location), load_json(raw / "dataset.json")


def _state(size_mean: float, size_std: float) -> dict:
    encoder = ConditionEncoder([("shape", ["disk", "square"])], [("size", size_mean, size_std)])
    return {"trainer_class": TRAINER, "extra": {"conditions": encoder.to_dict()}}


def _conditional_predictor(conditional_plans, networks, states, **kwargs) -> GenerationPredictor:
    plans, dataset_json = conditional_plans
    return GenerationPredictor(plans, "2d", dataset_json, networks, device="cpu", num_steps=2, batch_size=2,
                               checkpoint_states=states, **kwargs)


def test_fold_ensemble_averages_and_restandardises_metadata(conditional_plans, tmp_path):
    folds = [Recorder(0.2), Recorder(0.6)]
    # per-step averaging of the folds (the default, "prediction", draws samples across folds:
    # tests/inference/test_fold_ensemble.py)
    predictor = _conditional_predictor(conditional_plans, folds, [_state(6.0, 1.0), _state(5.0, 2.0)],
                                       fold_ensemble="step")
    x, t = torch.zeros(2, 1, 4, 4), torch.full((2,), 10.0)
    z0 = torch.tensor([[1.0], [math.nan]])  # size 7 for fold 0's statistics; NaN = null
    out = predictor.ensemble()(x, t, class_labels=torch.tensor([1, NULL_LABEL]), continuous=z0)
    torch.testing.assert_close(out, torch.full_like(x, 0.4))  # mean of the folds
    assert folds[0].calls[-1]["continuous"][0, 0].item() == pytest.approx(1.0)
    assert folds[1].calls[-1]["continuous"][0, 0].item() == pytest.approx((7.0 - 5.0) / 2.0)  # fold 1's statistics
    assert math.isnan(folds[1].calls[-1]["continuous"][1, 0].item())

    # generate_to_folder: encoded conditions per sample, CFG batch, conditions recorded
    rows = [{"shape": "disk", "size": 7}, {"shape": "square", "size": "5.5"}, {"shape": "square", "size": 6}]
    predictor.generate_to_folder(tmp_path, 3, conditions=rows, guidance_scale=3.0)
    labels = [call["class_labels"].tolist() for call in folds[0].calls[1:]]
    # batches of 2 then 1, each doubled with the null half for guidance, 2 steps each
    assert labels == [[0, 1, NULL_LABEL, NULL_LABEL]] * 2 + [[1, NULL_LABEL]] * 2
    sizes = folds[0].calls[-1]["continuous"][:, 0]
    assert sizes[0].item() == pytest.approx(0.0) and math.isnan(sizes[1].item())
    info = load_json(tmp_path / "prediction_info.json")
    assert info["guidance_scale"] == 3.0
    assert info["conditions"] == {"sample_0000": {"shape": "disk", "size": 7.0},
                                  "sample_0001": {"shape": "square", "size": 5.5},
                                  "sample_0002": {"shape": "square", "size": 6.0}}


def test_plan_guidance_scale_is_the_default(conditional_plans, tmp_path):
    net = Recorder(0.0)
    predictor = _conditional_predictor(conditional_plans, [net], [_state(6.0, 1.0)])
    planned = predictor.configuration["diffusion"]
    assert planned["guidance"] == "classifier_free"
    predictor.generate_to_folder(tmp_path, 1, conditions={"shape": "disk", "size": 6})
    assert load_json(tmp_path / "prediction_info.json")["guidance_scale"] == planned["guidance_scale"]
    assert len(net.calls[-1]["class_labels"]) == 2  # guided: conditional + null half
    net.calls.clear()
    predictor.generate_to_folder(tmp_path, 1, conditions={"shape": "disk", "size": 6}, guidance_scale=1)
    assert net.calls[-1]["class_labels"].tolist() == [0]  # scale 1: conditional model only
    net.calls.clear()
    predictor.generate_to_folder(tmp_path, 1)  # no conditions: null conditions, no guidance
    assert net.calls[-1]["class_labels"] is None
    assert load_json(tmp_path / "prediction_info.json")["conditions"] is None


@pytest.mark.parametrize("conditions,message", [
    ({"shape": "disk", "size": 6, "age": 3}, "unknown condition 'age'; this model's conditions are shape, size"),
    ({"shape": "circle", "size": 6}, "shape='circle' is not a value of shape; use one of disk, square"),
    ({"shape": "disk"}, "missing condition(s) size; give every condition (--condition size=VALUE)"),
    ({"shape": "disk", "size": "big"}, "size='big' is not a finite number"),
    ({"shape": "disk", "size": float("nan")}, "size=nan is not a finite number"),
    ([{"shape": "disk", "size": 6}], "1 condition rows for 2 samples"),
    ([{"shape": "disk", "size": 6}, "disk"], "sample_0001: conditions must be a mapping"),
])
def test_condition_errors_name_the_problem_and_fix(conditions, message):
    encoder = ConditionEncoder([("shape", ["disk", "square"])], [("size", 6.0, 1.0)])
    with pytest.raises(NnDiffError) as info:
        validate_conditions(encoder, conditions, 2)
    assert message in str(info.value)


def test_conditions_are_checked_before_sampling(conditional_plans, tmp_path):
    net = Recorder(0.0)
    predictor = _conditional_predictor(conditional_plans, [net], [_state(6.0, 1.0)])
    with pytest.raises(NnDiffError, match="is not a value of shape"):
        predictor.generate_to_folder(tmp_path / "x", 2, conditions={"shape": "oval", "size": 6})
    with pytest.raises(NnDiffError, match="guidance scale -1 must be a finite number >= 0"):
        predictor.generate_to_folder(tmp_path / "x", 2, conditions={"shape": "disk", "size": 6}, guidance_scale=-1)
    assert not net.calls and not (tmp_path / "x").exists()
    assert validate_conditions(ConditionEncoder([("site", [1, 2])], []), {"site": "2"}, 1) == [{"site": 2}]
    with pytest.raises(NnDiffError, match="trained without conditions"):
        validate_conditions(None, {"shape": "disk"}, 1)


def test_condition_flags():
    assert parse_condition_flags(["shape=disk", "size = 6.5"]) == {"shape": "disk", "size": "6.5"}
    assert parse_condition_flags(None) is None
    for bad in (["shape"], ["=disk"], ["shape="]):
        with pytest.raises(NnDiffError, match="is not KEY=VALUE"):
            parse_condition_flags(bad)
    with pytest.raises(NnDiffError, match="given twice"):
        parse_condition_flags(["shape=disk", "shape=square"])


def test_conditional_network_without_checkpoint_states(conditional_plans, tmp_path):
    """Built by hand without the trainer's stored encoding: unconditional samples only, conditions refused."""
    predictor = _conditional_predictor(conditional_plans, [Recorder(0.0)], [])
    assert not predictor.is_conditional
    with pytest.raises(NnDiffError, match="condition encoding is unknown.*from_model_folder"):
        predictor.generate_to_folder(tmp_path, 1, conditions={"shape": "disk", "size": 6})
    assert len(predictor.generate_to_folder(tmp_path, 1)) == 1
