"""Denoising family end to end (plan -> train -> predict with both strategies -> evaluate) on a tiny
clean-only MR dataset (Rician picked from the modality) and a paired one; degradation choice, warm
start timing, bad inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nndiff.dataset import load_dataset
from nndiff.dataset.examples import properties_2d
from nndiff.dataset.io import read_images, write_image
from nndiff.diffusion.config import DiffusionConfig, build_process
from nndiff.diffusion.options import Degradation
from nndiff.errors import DatasetError, NnDiffError, PlansError
from nndiff.inference import predictor_class_for
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
from nndiff.tasks.degradations import DegradationError, matching_timestep
from nndiff.tasks.denoising import (
    AffineNormalization,
    DenoisingTrainer,
    DegradationSetting,
    affine_normalization,
    ct_projector,
    degradation_from_plan,
    degrade_normalised,
)
from nndiff.tasks.denoising_predictor import DenoisingPredictor, warm_start_steps
from nndiff.training.api import train_fold
from nndiff.utils.files import load_json, save_json

TINY = {"inherits_from": "2d",
        "network": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [],
                    "num_head_channels": 8, "norm_groups": 4, "dropout": 0.0, "strides": [[2, 2]]},
        "training": {"num_iterations_per_epoch": 2, "num_epochs": 1, "num_val_cases": 1, "warmup_iterations": 1,
                     "augmentation": "none", "progress_every_epochs": 1},
        "diffusion": {"num_sampling_steps": 4}}


def _paths(root: Path) -> Paths:
    return Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")


def _phantom(rng: np.random.Generator, shape=(16, 16)) -> np.ndarray:
    """A bright disc with a darker inner blob on a zero background (magnitude-MR-like), max 200."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    cy, cx = rng.uniform(6, 10, size=2)
    image = 150.0 * (((yy - cy) ** 2 + (xx - cx) ** 2) < rng.uniform(20, 40))
    image += 50.0 * np.exp(-((yy - cy - 1) ** 2 + (xx - cx) ** 2) / 4.0)
    return image


def _write(array: np.ndarray, path: Path) -> None:
    write_image(np.clip(np.round(array), 0, 255)[None, None].astype(np.uint8), properties_2d(shape=(16, 16)), path)


def _dataset(root: Path, dataset_id: int, n: int, paired: bool, seed: int = 0, folder: str = "Tr") -> Path:
    rng = np.random.default_rng(seed)
    dataset = root / f"Dataset{dataset_id:03d}_Denoise"
    for i in range(n):
        clean = _phantom(rng)
        if paired:
            noisy = np.hypot(clean + 10 * rng.standard_normal(clean.shape), 10 * rng.standard_normal(clean.shape))
            _write(noisy, dataset / f"images{folder}" / f"case_{i:03d}_0000.png")
            _write(clean, dataset / f"targets{folder}" / f"case_{i:03d}_0000.png")
        else:
            _write(clean, dataset / f"images{folder}" / f"case_{i:03d}_0000.png")
    data = {"name": "Denoise", "task": "denoising", "channel_names": {"0": "T1"}, "numTraining": n,
            "file_ending": ".png"}
    if paired:
        data["target_names"] = {"0": "T1_clean"}
    else:  # the schema requires the block for clean-only data (the modality rule is unit-tested above)
        data["degradation"] = {"type": "rician", "level": [0.02, 0.12]}
    save_json(data, dataset / "dataset.json")
    return dataset


def _prepare_and_train(paths: Paths, dataset_id: int) -> Path:
    location = locate_dataset(dataset_id, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    plans["configurations"]["tiny"] = TINY
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=["2d"])
    train_fold(dataset_id, "tiny", 0, paths, trainer="DenoisingTrainer", device="cpu", num_workers=0)
    return paths.results / location.name / "DenoisingTrainer__nnDiffPlans__tiny"


@pytest.fixture(scope="module")
def clean_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("denoise_clean")
    paths = _paths(root)
    _dataset(paths.raw, 81, 4, paired=False)
    model_dir = _prepare_and_train(paths, 81)
    heldout = _dataset(root / "heldout", 81, 2, paired=False, seed=9)
    return {"paths": paths, "model_dir": model_dir, "heldout": heldout,
            "pre": paths.preprocessed / model_dir.parent.name}


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    root = tmp_path_factory.mktemp("denoise_paired")
    paths = _paths(root)
    _dataset(paths.raw, 82, 4, paired=True)
    model_dir = _prepare_and_train(paths, 82)
    heldout = _dataset(root / "heldout", 82, 2, paired=True, seed=9)
    return {"paths": paths, "model_dir": model_dir, "heldout": heldout,
            "pre": paths.preprocessed / model_dir.parent.name}


# ----------------------------------------------------------------------------------------------
# Mechanics
# ----------------------------------------------------------------------------------------------
def test_degradation_comes_from_the_plan():
    config = {"degradation": {"type": "poisson", "level": [0.005, 0.02], "ct": True, "source": "modality"}}
    setting = degradation_from_plan(config, {"degradation": "first image channel is CT"}, "plans")
    assert setting == DegradationSetting(Degradation.POISSON, (0.005, 0.02), "first image channel is CT", True)
    assert degradation_from_plan({"degradation": {"type": "rician", "level": [0.1, 0.1]}}, None, "p").ct is False


@pytest.mark.parametrize("block,match", [
    (None, "no valid 'degradation' block.*re-run nndiff_plan_and_preprocess"),
    ({"type": "speckle", "level": [0.1, 0.1]}, "'speckle'"),
    ({"type": "rician", "level": [0.2, 0.1]}, r"level' must be \[low, high\]"),
    ({"type": "gaussian", "level": [0.1, 0.1], "ct": True}, "ct true with type 'gaussian'"),
])
def test_bad_planned_degradation_is_a_clear_error(block, match):
    with pytest.raises(PlansError, match=match):
        degradation_from_plan({"degradation": block}, None, "configuration '2d' of x/nnDiffPlans.json")


def test_low_dose_ct_through_the_projector_adds_noise_that_grows_with_lower_dose():
    maps = [AffineNormalization(1000.0, 0.0, False)]  # normalised = HU / 1000
    clean = torch.zeros(2, 1, 16, 16)
    clean[:, :, 4:12, 4:12] = 0.04  # 40 HU soft tissue in air-free water background 0 HU
    ct = ct_projector([16, 16], [1.0, 1.0])
    errors = []
    for level in (0.005, 0.05):  # 40000 and 400 photons per ray
        setting = DegradationSetting(Degradation.POISSON, (level, level), "test", True)
        noisy = degrade_normalised(clean, maps, setting, torch.Generator().manual_seed(0), ct)
        assert noisy.shape == clean.shape and torch.isfinite(noisy).all()
        errors.append(float((noisy - clean).std()))
    assert errors[1] > 3 * errors[0]  # 100x fewer photons: about 10x the noise
    with pytest.raises(PlansError, match="no projector"):
        degrade_normalised(clean, maps, DegradationSetting(Degradation.POISSON, (0.01, 0.01), "t", True), None)


def test_affine_normalization_matches_the_plan_maps():
    window = affine_normalization({"scheme": "dataset_percentile", "params": {"clip_low": 0.0, "clip_high": 200.0}})
    assert window == AffineNormalization(100.0, 100.0, True)
    x = torch.tensor([-10.0, 0.0, 50.0, 200.0, 300.0])
    assert torch.allclose(window.to_model(x), torch.tensor([-1.0, -1.0, -0.5, 1.0, 1.0]))
    assert torch.allclose(window.to_original(torch.tensor([-0.5])), torch.tensor([50.0]))
    scale = affine_normalization({"scheme": "scale_only", "params": {"scale": 4.0}})
    assert scale.to_model(torch.tensor([-8.0])).item() == -2.0  # no clip


def test_degrade_normalised_adds_rician_noise_in_original_units():
    maps = [AffineNormalization(100.0, 100.0, True)]
    clean = torch.full((64, 1, 16, 16), 0.0)  # 100 in original units, max 100
    setting = DegradationSetting(Degradation.RICIAN, (0.1, 0.1), "test")
    noisy = degrade_normalised(clean, maps, setting, torch.Generator().manual_seed(0))
    original = noisy * 100.0 + 100.0
    # |100 + 10 n1 + i 10 n2|: E[M^2] = 100^2 + 2 * 10^2
    assert float((original ** 2).mean()) == pytest.approx(100.0 ** 2 + 200.0, rel=0.01)
    poisson = DegradationSetting(Degradation.POISSON, (0.1, 0.1), "test")
    with pytest.raises(DegradationError, match="non-negative.*-100.*'degradation'"):
        degrade_normalised(torch.full((1, 1, 4, 4), -2.0), maps, poisson, None)


def test_warm_start_steps_scale_with_t0():
    assert warm_start_steps(999.0, 0.0, 999.0, 50) == 50
    assert warm_start_steps(99.9, 0.0, 999.0, 50) == 5
    assert warm_start_steps(0.0, 0.0, 999.0, 50) == 1


def test_paired_case_missing_its_target_is_an_integrity_error(tmp_path):
    folder = _dataset(tmp_path, 83, 3, paired=True)
    (folder / "targetsTr" / "case_001_0000.png").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset(folder)
    assert "case_001" in str(err.value) and "target" in str(err.value)


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------
def test_clean_only_training_records_the_rician_choice(clean_only):
    debug = load_json(clean_only["model_dir"] / "fold_0" / "debug.json")
    assert debug["trainer_class"] == "DenoisingTrainer" and debug["denoising_mode"] == "clean_only"
    assert debug["degradation"] == {"type": "rician", "level": [0.02, 0.12], "ct": False,
                                    "reason": debug["degradation"]["reason"]}
    assert "dataset.json key 'degradation'" in debug["degradation"]["reason"]
    log = "".join(p.read_text(encoding="utf-8") for p in (clean_only["model_dir"] / "fold_0").glob("*.txt"))
    assert "rician" in log
    assert predictor_class_for("DenoisingTrainer") is DenoisingPredictor


@pytest.mark.parametrize("strategy", ["conditional", "warm_start"])
def test_predict_both_strategies_monte_carlo_with_geometry(clean_only, tmp_path, strategy):
    predictor = DenoisingPredictor.from_model_folder(clean_only["model_dir"], device="cpu",
                                                     preprocessed_dir=clean_only["pre"], strategy=strategy)
    assert predictor.output_kind == "data"
    out = tmp_path / strategy
    written = predictor.predict_from_folder(clean_only["heldout"] / "imagesTr", out, seed=3, num_mc_samples=2)
    assert sorted(p.name for p in written) == ["case_000.png", "case_000_std.png", "case_001.png", "case_001_std.png"]
    source, source_props = read_images([clean_only["heldout"] / "imagesTr" / "case_000_0000.png"])
    for name in ("case_000.png", "case_000_std.png"):
        array, props = read_images([out / name])
        assert array.shape == source.shape and np.allclose(props.spacing, source_props.spacing)
    info = load_json(out / "prediction_info.json")
    assert info["strategy"] == strategy and info["num_mc_samples"] == 2
    if strategy == "warm_start":
        assert set(info["warm_starts"]) == {"case_000", "case_001"}
        assert all(v["sigma"] > 0 for v in info["warm_starts"].values())


@pytest.mark.parametrize("strategy", ["conditional", "warm_start"])
def test_conditional_samples_share_sampler_runs(clean_only, strategy):
    """K = 4 samples of a one-slice case: the conditional strategy runs them as one sampler batch of
    4 (as translation: every network call holds the 4 samples); the warm start keeps one run per
    sample (calls hold one sample's windows)."""
    predictor = DenoisingPredictor.from_model_folder(clean_only["model_dir"], device="cpu",
                                                     preprocessed_dir=clean_only["pre"], strategy=strategy)
    predictor.batch_size = 4
    shapes: list[tuple[int, ...]] = []
    predictor.networks[0].register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    images, props = read_images([clean_only["heldout"] / "imagesTr" / "case_000_0000.png"])
    case = predictor.prepare_case(images, props, "case_000")
    samples = predictor._run_case(case, seed=2, num_samples=4)
    assert samples.shape[0] == 4 and torch.isfinite(samples).all()
    assert predictor.batches_samples() == (strategy == "conditional")
    if strategy == "conditional":
        assert {s[0] for s in shapes} == {4}


def test_warm_start_begins_at_the_matching_timestep_of_a_known_sigma(clean_only):
    sigma = 0.1
    predictor = DenoisingPredictor.from_model_folder(clean_only["model_dir"], device="cpu",
                                                     preprocessed_dir=clean_only["pre"], strategy="warm_start",
                                                     noise_sigma=sigma)
    process = build_process(DiffusionConfig.from_dict(predictor.configuration["diffusion"]))
    expected = matching_timestep(sigma, process)
    seen: list[float] = []
    network = predictor.networks[0]
    network.register_forward_hook(lambda module, args, out: seen.append(float(args[1].flatten()[0])))
    images, props = read_images([clean_only["heldout"] / "imagesTr" / "case_000_0000.png"])
    predictor.predict_arrays(images, props, "case_000", seed=1)
    assert predictor.warm_starts["case_000"] == {"sigma": sigma, "t0": float(expected)}
    first = process.model_time(torch.tensor([expected], dtype=torch.float64))
    assert seen[0] == pytest.approx(float(first.flatten()[0]), abs=1e-4)
    steps = warm_start_steps(expected, process.t_min, process.t_max, 4)
    assert len(sorted(set(seen))) == steps < 4 and max(seen) == seen[0]  # (several windows per step)
    with pytest.raises(NnDiffError, match="unknown denoising strategy 'fast'.*conditional, warm_start"):
        predictor.strategy = "fast"


def test_paired_mode_trains_and_predicts_both_strategies(paired, tmp_path):
    debug = load_json(paired["model_dir"] / "fold_0" / "debug.json")
    assert debug["denoising_mode"] == "paired" and debug["degradation"] is None
    for strategy in ("conditional", "warm_start"):
        predictor = DenoisingPredictor.from_model_folder(paired["model_dir"], device="cpu",
                                                         preprocessed_dir=paired["pre"], strategy=strategy,
                                                         warm_start_condition="noisy")
        assert predictor.output_kind == "target"
        images, props = read_images([paired["heldout"] / "imagesTr" / "case_000_0000.png"])
        out, out_props = predictor.predict_arrays(images, props, "case_000", seed=2)
        assert out.shape == images.shape and np.isfinite(out).all()


def test_evaluate_denoising_table_with_baselines(clean_only, tmp_path):
    from nndiff.evaluation.denoising import evaluate_denoising, photon_levels

    predictor = DenoisingPredictor.from_model_folder(clean_only["model_dir"], device="cpu",
                                                     preprocessed_dir=clean_only["pre"])
    cases = [(f"case_{i:03d}", *read_images([clean_only["heldout"] / "imagesTr" / f"case_{i:03d}_0000.png"]))
             for i in range(2)]
    summary = evaluate_denoising(predictor, cases, tmp_path / "eval", levels=(0.05, 0.1), num_samples=2, seed=1)
    assert summary == load_json(tmp_path / "eval" / "summary.json")
    assert set(summary["levels"]) == {"0.05", "0.1"}
    mean = summary["levels"]["0.1"]["mean"]
    assert set(mean) == {"noisy", "conditional", "warm_start", "nl_means", "total_variation"}
    # noisier input -> lower PSNR; the classical baselines beat the noisy input
    assert mean["noisy"]["psnr"] < summary["levels"]["0.05"]["mean"]["noisy"]["psnr"]
    assert mean["total_variation"]["psnr_gain"] > 0
    row = summary["levels"]["0.1"]["per_case"]["case_000"]
    assert row["warm_start"]["psnr_gain"] == pytest.approx(row["warm_start"]["psnr"] - row["noisy"]["psnr"])
    assert photon_levels([1e4]) == pytest.approx((0.01,))
    with pytest.raises(DegradationError, match="speckle"):
        evaluate_denoising(predictor, cases, tmp_path / "bad", degradation="speckle")
