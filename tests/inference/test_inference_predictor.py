"""Predictor base: model-folder loading, geometry and units of outputs, generated geometry,
plans-hash refusal, Monte-Carlo mean/std, seeding."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from inference_helpers import (
    EchoPredictor,
    copy_inputs,
    make_planned_ct,
    model_dir_for,
    write_checkpoint,
)
from nndiff.dataset.io import read_images
from nndiff.errors import DatasetError, NnDiffError
from nndiff.inference import Predictor, find_input_cases, seed_for
from nndiff.inference.files import monte_carlo_summary
from nndiff.networks import build_network
from nndiff.paths import Paths
from nndiff.planning import resolve_configuration
from nndiff.training import Trainer
from nndiff.utils.files import load_json, save_json

CASES = ["case_000", "case_001"]
CONFIGURATIONS = ["2d", "3d_fullres"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Planned CT example, one fold-0 checkpoint per configuration, an input folder of 2 cases."""
    root = tmp_path_factory.mktemp("inference")
    raw, pre, plans = make_planned_ct(root)
    model_dirs = {}
    for configuration in CONFIGURATIONS:
        model_dirs[configuration] = model_dir_for(root / "results", pre.name, configuration)
        write_checkpoint(model_dirs[configuration], plans, configuration)
    inputs = copy_inputs(raw, root / "inputs", CASES)
    return {"root": root, "raw": raw, "pre": pre, "plans": plans, "model_dirs": model_dirs, "inputs": inputs}


def _load(setup, configuration, **kwargs) -> EchoPredictor:
    return EchoPredictor.from_model_folder(setup["model_dirs"][configuration], device="cpu",
                                           preprocessed_dir=setup["pre"], **kwargs)


def _window(plans):
    params = plans["normalization"]["images"][0]["params"]
    return params["clip_low"], params["clip_high"]


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_outputs_carry_input_geometry_and_original_units(setup, configuration, tmp_path):
    predictor = _load(setup, configuration)
    written = predictor.predict_from_folder(setup["inputs"], tmp_path / "out", seed=0)
    assert sorted(p.name for p in written) == [f"{c}.nii.gz" for c in CASES]
    lo, hi = _window(setup["plans"])
    for case in CASES:
        original, props_in = read_images([setup["inputs"] / f"{case}_0000.nii.gz"])
        output, props_out = read_images([tmp_path / "out" / f"{case}.nii.gz"])
        assert output.shape == original.shape
        np.testing.assert_allclose(props_out.spacing, props_in.spacing, rtol=1e-6)
        np.testing.assert_allclose(props_out.origin, props_in.origin, atol=1e-5)
        np.testing.assert_allclose(props_out.direction, props_in.direction, atol=1e-6)
        assert props_in.direction[1] != 0.0  # the example is rotated: geometry is really carried
        # the echo output is the input after the CT window: HU back within float32 round-off
        np.testing.assert_allclose(output, np.clip(original.astype(np.float64), lo, hi), atol=0.02)
    assert (tmp_path / "out" / "prediction_info.json").is_file()


def test_predict_arrays_in_memory(setup):
    predictor = _load(setup, "3d_fullres")
    original, props = read_images([setup["inputs"] / "case_000_0000.nii.gz"])
    output, out_props = predictor.predict_arrays(original, props, "case_000")
    lo, hi = _window(setup["plans"])
    np.testing.assert_allclose(output, np.clip(original.astype(np.float64), lo, hi), atol=0.02)
    assert out_props.origin == props.origin


@pytest.mark.parametrize("configuration, dims, shape, spacing", [
    ("2d", 2, (1, 20, 24), (999.0, 0.8, 0.8)),
    ("3d_fullres", 3, (12, 20, 24), (3.0, 0.8, 0.8)),
])
def test_generated_outputs_have_documented_geometry(setup, configuration, dims, shape, spacing, tmp_path):
    predictor = _load(setup, configuration)
    assert predictor.batch_size == 2  # the plan's batch size: 3 samples take two batches
    written = predictor.generate_to_folder(tmp_path / "gen", 3, seed=4)
    assert [p.name for p in written] == [f"sample_{i:04d}.nii.gz" for i in range(3)]
    lo, hi = _window(setup["plans"])
    sizes = predictor.generation_shape("patch")
    expected = torch.cat([predictor.generate(n, predictor.make_generator(4, f"sample_{s:04d}"), sizes)
                          for s, n in ((0, 2), (2, 1))]).numpy()
    for i, path in enumerate(written):
        array, props = read_images([path])
        assert props.spatial_dims == dims
        assert array.shape == (1, *shape)
        np.testing.assert_allclose(props.spacing, spacing, rtol=1e-6)
        assert props.origin == (0.0,) * dims
        np.testing.assert_allclose(props.direction, np.eye(dims).ravel())
        hu = (expected[i].astype(np.float64) + 1) / 2 * (hi - lo) + lo
        np.testing.assert_allclose(array.reshape(hu.shape), hu, atol=0.02)


def test_generation_shape_options(setup):
    predictor = _load(setup, "3d_fullres")
    assert predictor.generation_shape("median") == [12, 19, 22]
    assert predictor.generation_shape([4, 8, 8]) == [4, 8, 8]
    with pytest.raises(NnDiffError, match="3D samples"):
        predictor.generation_shape([8, 8])
    with pytest.raises(NnDiffError, match="unknown generation shape"):
        predictor.generation_shape("largest")


def test_same_seed_same_outputs_other_seed_differs(setup, tmp_path):
    predictor = _load(setup, "3d_fullres")
    predictor.noise_scale = 0.1
    results = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        predictor.predict_from_folder(setup["inputs"], tmp_path / name, seed=seed)
        predictor.generate_to_folder(tmp_path / f"g{name}", 2, seed=seed)
        results[name] = [read_images([tmp_path / name / f"{c}.nii.gz"])[0] for c in CASES]
        results[name] += [read_images([tmp_path / f"g{name}" / "sample_0001.nii.gz"])[0]]
    for a, b, c in zip(results["a"], results["b"], results["c"]):
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)
    # a case's noise depends on (seed, case id) only, not on the other cases of the folder
    alone = copy_inputs(setup["raw"], tmp_path / "alone", ["case_001"])
    predictor.predict_from_folder(alone, tmp_path / "d", seed=5)
    assert np.array_equal(read_images([tmp_path / "d" / "case_001.nii.gz"])[0], results["a"][1])
    assert seed_for(5, "case_001") != seed_for(5, "case_000") != seed_for(6, "case_000")


def test_plans_hash_mismatch_is_refused(setup, tmp_path):
    plans = setup["plans"]
    changed = {**plans, "gpu_memory_target_gib": 24.0}
    model_dir = model_dir_for(tmp_path / "results", setup["pre"].name, "3d_fullres")
    write_checkpoint(model_dir, plans, "3d_fullres", hash_plans=changed)
    with pytest.raises(NnDiffError, match="trained with other plans"):
        EchoPredictor.from_model_folder(model_dir, device="cpu", preprocessed_dir=setup["pre"])


def test_ema_weights_by_default_raw_weights_on_request(setup):
    network_block = resolve_configuration(setup["plans"], "3d_fullres")["network"]
    ema = build_network(network_block, seed=2).state_dict()
    raw = build_network(network_block, seed=1).state_dict()
    for use_ema, expected in ((True, ema), (False, raw)):
        predictor = _load(setup, "3d_fullres", use_ema=use_ema)
        loaded = predictor.networks[0].state_dict()
        assert len(predictor.networks) == 1 and not predictor.networks[0].training
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not torch.equal(ema["input_conv.weight"], raw["input_conv.weight"])


def test_one_network_per_fold_and_model_fn_averages(setup, tmp_path):
    model_dir = model_dir_for(tmp_path / "results", setup["pre"].name, "3d_fullres")
    for fold, seed in ((0, 10), (1, 11)):
        write_checkpoint(model_dir, setup["plans"], "3d_fullres", fold=fold, ema_seed=seed)
    predictor = EchoPredictor.from_model_folder(model_dir, folds=(0, 1), device="cpu",
                                                preprocessed_dir=setup["pre"])
    assert len(predictor.networks) == 2
    x = torch.randn(1, 1, 12, 20, 24, generator=torch.Generator().manual_seed(0))
    t = torch.full((1,), 500.0)
    with torch.no_grad():
        mean = (predictor.networks[0](x, t) + predictor.networks[1](x, t)) / 2
        assert torch.allclose(predictor.model_fn()(x, t, None), mean, atol=1e-6)
    with pytest.raises(NnDiffError, match="fold_all does not exist"):
        EchoPredictor.from_model_folder(model_dir, folds="all", device="cpu", preprocessed_dir=setup["pre"])


def test_plans_found_in_model_folder_copy_or_refused(setup, tmp_path, monkeypatch):
    monkeypatch.delenv("nnDiff_preprocessed", raising=False)
    model_dir = model_dir_for(tmp_path / "results", setup["pre"].name, "3d_fullres")
    write_checkpoint(model_dir, setup["plans"], "3d_fullres")
    with pytest.raises(NnDiffError, match="cannot find nnDiffPlans.json and dataset.json"):
        EchoPredictor.from_model_folder(model_dir, device="cpu")
    monkeypatch.setenv("nnDiff_preprocessed", str(setup["pre"].parent))
    assert EchoPredictor.from_model_folder(model_dir, device="cpu").model_info["plans_file"] == \
        str(setup["pre"] / "nnDiffPlans.json")
    monkeypatch.delenv("nnDiff_preprocessed")
    for name in ("nnDiffPlans.json", "dataset.json"):
        shutil.copy(setup["pre"] / name, model_dir / name)
    predictor = EchoPredictor.from_model_folder(model_dir, device="cpu")
    assert predictor.model_info["plans_file"] == str(model_dir / "nnDiffPlans.json")
    with pytest.raises(NnDiffError, match="not a model folder"):
        EchoPredictor.from_model_folder(model_dir / "fold_0", device="cpu")


def test_monte_carlo_mean_and_std_in_original_units(setup, tmp_path):
    predictor = _load(setup, "3d_fullres")
    original, props = read_images([setup["inputs"] / "case_000_0000.nii.gz"])
    case = predictor.prepare_case(original, props, "case_000")
    offsets = np.array([-0.1, 0.0, 0.1, 0.2])
    lo, hi = _window(setup["plans"])
    samples = [case.data + d for d in offsets]
    written = predictor.write_monte_carlo(samples, case.case_json, tmp_path, "case_000")
    assert [p.name for p in written] == ["case_000.nii.gz", "case_000_std.nii.gz"]
    mean, mean_props = read_images([written[0]])
    std, std_props = read_images([written[1]])
    expected_mean, _ = predictor.invert(case.data + offsets.mean(), case.case_json)
    # voxels whose samples all stay inside the window: std is exact, in HU
    hu, _ = predictor.invert(case.data, case.case_json)
    normalized = 2 * (hu.astype(np.float64) - lo) / (hi - lo) - 1
    inside = (normalized > -0.85) & (normalized < 0.75)
    assert inside.sum() > 100
    np.testing.assert_allclose(mean[inside], expected_mean[inside], atol=0.02)
    np.testing.assert_allclose(std[inside], offsets.std() * (hi - lo) / 2, rtol=1e-4)
    for p in (mean_props, std_props):
        np.testing.assert_allclose(p.origin, props.origin, atol=1e-5)
        np.testing.assert_allclose(p.direction, props.direction, atol=1e-6)
        np.testing.assert_allclose(p.spacing, props.spacing, rtol=1e-6)
    assert std.shape == original.shape


def test_monte_carlo_from_folder_writes_mean_and_std(setup, tmp_path):
    predictor = _load(setup, "2d")
    predictor.noise_scale = 0.05
    written = predictor.predict_from_folder(setup["inputs"], tmp_path, seed=1, num_mc_samples=3)
    assert sorted(p.name for p in written) == sorted(
        [f"{c}.nii.gz" for c in CASES] + [f"{c}_std.nii.gz" for c in CASES])
    std, _ = read_images([tmp_path / "case_000_std.nii.gz"])
    mean, _ = read_images([tmp_path / "case_000.nii.gz"])
    lo, hi = _window(setup["plans"])
    # Voxels whose mean lies >= 0.3 (6 sigma) inside the [-1, 1] window were never clipped: there
    # the population std (ddof 0) of 3 draws of N(0, s) has expectation s * E[chi_2] / sqrt(3)
    # = s * sqrt(pi / 2) / sqrt(3) = 0.7236 s and a per-voxel sd of 0.378 s; over > 1000 voxels
    # the mean is within 0.012 s (1 sd; slices share nothing) of it, so +-0.06 s is 5 sd.
    normalized = 2 * (mean.astype(np.float64) - lo) / (hi - lo) - 1
    interior = (normalized > -0.7) & (normalized < 0.7)
    assert interior.sum() > 1000
    observed = std[interior].mean() / (0.05 * (hi - lo) / 2)
    assert abs(observed - math.sqrt(math.pi / 2) / math.sqrt(3)) < 0.06


def test_monte_carlo_summary_statistics():
    samples = [np.full((1, 1, 2, 2), v, dtype=np.float32) for v in (1.0, 2.0, 4.0)]
    mean, std = monte_carlo_summary(samples)
    np.testing.assert_allclose(mean, 7 / 3, rtol=1e-6)
    np.testing.assert_allclose(std, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3),
                               rtol=1e-6)


def test_input_folder_problems_are_reported_together(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_0000.nii.gz").write_bytes(b"")
    (folder / "b.nii.gz").write_bytes(b"")
    (folder / "c_0001.nii.gz").write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        find_input_cases(folder, ".nii.gz", 2)
    text = str(info.value)
    assert "a_0001.nii.gz" in text and "b.nii.gz" in text and "c_0000.nii.gz" in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no"):
        find_input_cases(tmp_path / "empty", ".nii.gz", 1)


def test_base_hooks_are_abstract(setup):
    predictor = Predictor.from_model_folder(setup["model_dirs"]["3d_fullres"], device="cpu",
                                            preprocessed_dir=setup["pre"])
    with pytest.raises(NotImplementedError):
        predictor.generate_to_folder(setup["root"] / "never", 1)
    with pytest.raises(NotImplementedError):
        predictor.predict_from_folder(setup["inputs"], setup["root"] / "never2")


class _UNetTrainer(Trainer):
    """A real Trainer on the plan's network with a trivial loss: the checkpoint format and the
    results folder layout are the trainer's own."""

    def compute_loss(self, network, batch, *, train, generators=None):
        x = batch["data"]
        t = torch.full((x.shape[0],), 10.0, device=x.device)
        return ((network(x, t) - x) ** 2).mean(), {}


def test_loads_a_checkpoint_written_by_a_trainer_run(setup, tmp_path):
    plans = setup["plans"]
    trainer = _UNetTrainer(plans, "3d_fullres", 0, setup["pre"], tmp_path / "results", device="cpu",
                           iterations=2, num_workers=0, seed=3)
    trainer.run_training()
    model_dir = trainer.output_dir.parent
    assert model_dir.name == "_UNetTrainer__nnDiffPlans__3d_fullres"
    predictor = EchoPredictor.from_model_folder(model_dir, device="cpu", preprocessed_dir=setup["pre"])
    ema = trainer.ema_network.state_dict()
    loaded = predictor.networks[0].state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    assert predictor.model_info["trainer"] == "_UNetTrainer"
    state = predictor.checkpoint_states[0]
    assert state["trainer_class"] == "_UNetTrainer" and state["iteration"] == 2
    assert "ema_weights" not in state and "optimizer_state" not in state and "extra" in state


def test_from_trained_finds_the_model_by_dataset_trainer_and_configuration(setup):
    paths = Paths(preprocessed=setup["pre"].parent, results=setup["root"] / "results")
    predictor = EchoPredictor.from_trained("3", "3d_fullres", paths, trainer="GenerationTrainer", device="cpu")
    assert predictor.model_info["model_dir"] == str(setup["model_dirs"]["3d_fullres"])
    assert predictor.configuration_name == "3d_fullres"
    with pytest.raises(NnDiffError, match="no trained model .*present: GenerationTrainer__nnDiffPlans__2d"):
        EchoPredictor.from_trained("Dataset003", "3d_lowres", paths, trainer="GenerationTrainer", device="cpu")


def test_windowed_model_fn_matches_the_network_on_a_patch_and_covers_larger_inputs(setup):
    predictor = _load(setup, "3d_fullres")
    x = torch.randn(1, 1, 12, 20, 24, generator=torch.Generator().manual_seed(0))  # the patch size
    t = torch.full((1,), 500.0)
    with torch.no_grad():
        torch.testing.assert_close(predictor.windowed_model_fn()(x, t, None), predictor.model_fn()(x, t, None))
        big = torch.randn(1, 1, 14, 30, 24, generator=torch.Generator().manual_seed(1))
        out = predictor.windowed_model_fn()(big, t, None)
    assert out.shape == big.shape and torch.isfinite(out).all()


def test_precision_is_fp32_on_cpu_and_unknown_values_are_refused():
    from nndiff.inference.predictor import inference_autocast_dtype

    for precision in ("auto", "fp32", "bf16", "fp16"):
        assert inference_autocast_dtype(precision, torch.device("cpu")) is None
    assert inference_autocast_dtype("fp32", torch.device("cuda", 0)) is None
    assert inference_autocast_dtype("fp16", torch.device("cuda", 0)) is torch.float16
    with pytest.raises(NnDiffError, match="unknown precision"):
        inference_autocast_dtype("half", torch.device("cpu"))


def test_png_dataset_round_trip_and_generated_png(tmp_path):
    """2D data (PNG, uint8, dataset-percentile window): outputs are 2D PNGs in 0..255 units."""
    from nndiff.dataset.examples import make_example_dataset
    from nndiff.run.plan_and_preprocess import plan_and_preprocess_entry
    from inference_helpers import TINY_NETWORK

    raw = make_example_dataset("2d_grey_png", tmp_path / "raw", 1, seed=1, num_cases=5)
    assert plan_and_preprocess_entry(["-d", "1", "--raw", str(tmp_path / "raw"),
                                      "--preprocessed", str(tmp_path / "pre"), "-q"]) == 0
    pre = tmp_path / "pre" / raw.name
    plans = load_json(pre / "nnDiffPlans.json")
    plans["configurations"]["2d"]["network"].update(TINY_NETWORK)
    save_json(plans, pre / "nnDiffPlans.json")
    model_dir = model_dir_for(tmp_path / "results", pre.name, "2d")
    write_checkpoint(model_dir, plans, "2d")
    predictor = EchoPredictor.from_model_folder(model_dir, device="cpu", preprocessed_dir=pre)
    inputs = copy_inputs(raw, tmp_path / "in", ["case_000"])
    [written] = predictor.predict_from_folder(inputs, tmp_path / "out")
    assert written.name == "case_000.png"
    original, props_in = read_images([inputs / "case_000_0000.png"])
    output, props_out = read_images([written])
    lo, hi = _window(plans)
    assert props_out.spatial_dims == 2 and props_out.dtype == "uint8" and output.shape == original.shape
    assert np.abs(output - np.clip(original.astype(np.float64), lo, hi)).max() <= 0.5 + 1e-3  # uint8 rounding
    [sample] = predictor.generate_to_folder(tmp_path / "gen", 1)
    array, props = read_images([sample])
    assert sample.name == "sample_0000.png" and props.spatial_dims == 2 and array.shape == (1, 1, 32, 32)
    assert lo - 0.5 <= array.min() and array.max() <= hi + 0.5


class _ThresholdPredictor(EchoPredictor):
    """Label-map family: 1 where the normalised input is positive."""

    output_kind = "seg"

    def predict_case(self, data, case, generator):
        return (data[:1] > 0).to(torch.int64)


def test_label_map_outputs_are_inverted_as_labels(setup, tmp_path):
    predictor = _ThresholdPredictor.from_model_folder(setup["model_dirs"]["3d_fullres"], device="cpu",
                                                      preprocessed_dir=setup["pre"])
    [written] = predictor.predict_from_folder(setup["inputs"], tmp_path, seed=0)[:1]
    original, props_in = read_images([setup["inputs"] / "case_000_0000.nii.gz"])
    labels, props = read_images([written])
    lo, hi = _window(setup["plans"])
    assert np.array_equal(labels, (original > (lo + hi) / 2).astype(labels.dtype))
    assert set(np.unique(labels)) == {0, 1}
    np.testing.assert_allclose(props.direction, props_in.direction, atol=1e-6)
    with pytest.raises(NnDiffError, match="label maps"):
        predictor.predict_from_folder(setup["inputs"], tmp_path / "mc", num_mc_samples=2)
