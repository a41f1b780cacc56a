"""Command-line wiring of the reconstruction and denoising families: nndiff_predict's family flags
(reach the predictor, recorded in the outputs; refused for other families, out of range, or where
they would have no effect) and nndiff_evaluate_folder's reconstruction dispatch / denoising refusal;
the family table (predictor class -> family, flags -> constructor keywords, choices) of every family,
the model-folder choice without -tr, and --shape. Anomaly detection and segmentation end to end:
test_cli_anomaly_segmentation.py."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nndiff.dataset.examples import make_example_dataset, properties_2d
from nndiff.dataset.io import read_images, write_image
from nndiff.errors import NnDiffError
from nndiff.inference.cli import (
    ANOMALY_STRATEGY_CHOICES,
    AUXILIARY_TRAINERS,
    DC_CHOICES,
    FUSION_CHOICES,
    MASK_PATTERN_CHOICES,
    STRATEGY_CHOICES,
    UNCERTAINTY_CHOICES,
    WARM_START_CONDITION_CHOICES,
    _generation_options,
    _only_trainer,
    build_parser,
    family_options,
    parse_shape,
    predict_entry,
    predictor_family,
)
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
from nndiff.run.evaluate import evaluate_folder_entry
from nndiff.training.api import train_fold
from nndiff.utils.files import load_json, save_json

#: The smallest trainable configuration (as tests/tasks/test_reconstruction.py and test_denoising.py).
TINY = {"inherits_from": "2d",
        "network": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [],
                    "num_head_channels": 8, "norm_groups": 4, "dropout": 0.0, "strides": [[2, 2]]},
        "training": {"num_iterations_per_epoch": 2, "num_epochs": 1, "num_val_cases": 1, "warmup_iterations": 1,
                     "augmentation": "none", "progress_every_epochs": 1},
        "diffusion": {"num_sampling_steps": 4}}
RECON_ID, DENOISE_ID = 91, 92


def _paths(root: Path) -> Paths:
    return Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")


def _plan_and_train(paths: Paths, dataset_id: int, trainer: str) -> None:
    location = locate_dataset(dataset_id, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    plans["configurations"]["tiny"] = TINY
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=["2d"])
    torch.manual_seed(0)
    train_fold(dataset_id, "tiny", 0, paths, trainer=trainer, device="cpu", num_workers=0)


def _roots(paths: Paths) -> list[str]:
    return ["--preprocessed", str(paths.preprocessed), "--results", str(paths.results), "-q"]


@pytest.fixture(scope="module")
def recon(tmp_path_factory) -> dict:
    """complex_npy example (32x32 complex MR slices), tiny ReconstructionTrainer prior; one fully
    sampled held-out folder (a copy of one training image)."""
    root = tmp_path_factory.mktemp("family_cli_recon")
    paths = _paths(root)
    raw = make_example_dataset("complex_npy", paths.raw, RECON_ID)
    _plan_and_train(paths, RECON_ID, "ReconstructionTrainer")
    images = root / "fully_sampled"
    images.mkdir()
    source = sorted((raw / "imagesTr").glob("*_0000.npy"))[0]
    (images / source.name).write_bytes(source.read_bytes())
    return {"paths": paths, "raw": raw, "images": images, "case": source.name[: -len("_0000.npy")]}


def _disc(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:16, :16].astype(np.float64)
    cy, cx = rng.uniform(6, 10, size=2)
    return 150.0 * (((yy - cy) ** 2 + (xx - cx) ** 2) < rng.uniform(20, 40)) + 20.0


def _write_png(array: np.ndarray, path: Path) -> None:
    write_image(np.clip(np.round(array), 0, 255)[None, None].astype(np.uint8), properties_2d(shape=(16, 16)), path)


@pytest.fixture(scope="module")
def denoise(tmp_path_factory) -> dict:
    """Clean-only denoising dataset (16x16 PNG discs, Rician), tiny DenoisingTrainer; one noisy input."""
    root = tmp_path_factory.mktemp("family_cli_denoise")
    paths = _paths(root)
    rng = np.random.default_rng(0)
    dataset = paths.raw / f"Dataset{DENOISE_ID:03d}_Denoise"
    for i in range(3):
        _write_png(_disc(rng), dataset / "imagesTr" / f"case_{i:03d}_0000.png")
    save_json({"name": "Denoise", "task": "denoising", "channel_names": {"0": "T1"}, "numTraining": 3,
               "file_ending": ".png", "degradation": {"type": "rician", "level": [0.02, 0.1]}},
              dataset / "dataset.json")
    _plan_and_train(paths, DENOISE_ID, "DenoisingTrainer")
    inputs = root / "noisy"
    clean = _disc(rng)
    _write_png(np.hypot(clean + 8 * rng.standard_normal(clean.shape), 8 * rng.standard_normal(clean.shape)),
               inputs / "case_900_0000.png")
    return {"paths": paths, "raw": dataset, "inputs": inputs}


def _exit_code(entry, argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of a CLI entry (argparse errors raise SystemExit(2))."""
    try:
        code = entry(argv)
    except SystemExit as err:
        code = err.code
    return code, capsys.readouterr().err


def _recon_argv(recon: dict, out: Path, *extra: str) -> list[str]:
    return ["-i", str(recon["images"]), "-o", str(out), "-d", str(RECON_ID), "-c", "tiny", "-device", "cpu",
            *extra, *_roots(recon["paths"])]


# ----------------------------------------------------------------------------------------------
# reconstruction: predict --simulate -> evaluate_folder
# ----------------------------------------------------------------------------------------------
def test_simulate_predict_then_evaluate_folder(recon, tmp_path, capsys):
    out = tmp_path / "pred"
    assert predict_entry(_recon_argv(recon, out, "--simulate", "--acceleration", "4", "--mask_pattern",
                                     "equispaced", "--center_fraction", "0.1", "--dc", "projection")) == 0
    case = recon["case"]
    recon_image, props = read_images([out / f"{case}.npy"])
    reference, ref_props = read_images([recon["images"] / f"{case}_0000.npy"])
    assert recon_image.shape == reference.shape and props.spacing == ref_props.spacing
    assert (out / "baseline" / f"{case}.npy").is_file()
    info = load_json(out / "reconstruction_info.json")
    assert info["dc"] == "projection" and info["warm_start"] is True  # the plan's warm start
    row = info["cases"][case]
    assert row["mask_pattern"] == "equispaced" and row["center_fraction"] == 0.1
    assert row["acceleration"] == pytest.approx(4.0, rel=0.1)
    prediction_info = load_json(out / "prediction_info.json")
    assert prediction_info["mode"] == "simulate" and prediction_info["acceleration"] == 4.0
    capsys.readouterr()

    dataset_json = str(recon["raw"] / "dataset.json")
    assert evaluate_folder_entry([str(recon["images"]), str(out), "--dataset_json", dataset_json,
                                  "--crop", "24", "24", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "baseline (zero-filled/FBP)" in printed and "PSNR gain over baseline" in printed
    summary = load_json(out / "summary.json")
    assert summary["crop"] == [24, 24] and summary["num_cases"] == 1
    assert set(summary["mean"]) >= {"reconstruction", "baseline", "psnr_gain_over_baseline", "dc_residual"}
    assert np.isfinite(summary["mean"]["baseline"]["psnr"])
    assert summary["mean"]["dc_residual"] < 1e-3  # hard projection keeps the measured samples

    # flags that mean nothing for reconstruction evaluation are refused, not ignored
    for flag in (["--max_pairs", "5"], ["--data_range", "2"], ["--no_training"]):
        code, err = _exit_code(evaluate_folder_entry, [str(recon["images"]), str(out), "--dataset_json",
                                                       dataset_json, *flag], capsys)
        assert code == 2 and flag[0] in err and "'reconstruction'" in err


def test_dps_without_warm_start_reaches_the_predictor(recon, tmp_path):
    out = tmp_path / "dps"
    assert predict_entry(_recon_argv(recon, out, "--simulate", "--dc", "dps", "--dc_scale", "0.5",
                                     "--no_warm_start", "--steps", "2")) == 0
    info = load_json(out / "reconstruction_info.json")
    assert info["dc"] == "dps" and info["warm_start"] is False
    assert np.isfinite(info["cases"][recon["case"]]["dc_residual"])


def test_family_options_map_flags_to_constructor_keywords():
    from nndiff.tasks.denoising_predictor import DenoisingPredictor
    from nndiff.tasks.reconstruction_predictor import ReconstructionPredictor

    parser = build_parser()
    base = ["-i", "x", "-o", "y", "-d", "1", "-c", "2d"]
    args = parser.parse_args([*base, "--simulate", "--acceleration", "8", "--dc", "mcg", "--dc_scale", "0.5",
                              "--no_warm_start"])
    # simulation settings go to predict_simulated, not the constructor
    assert family_options(args, ReconstructionPredictor, "ReconstructionTrainer") == {
        "dc": "mcg", "dc_scale": 0.5, "warm_start": False}
    assert family_options(parser.parse_args(base), ReconstructionPredictor, "ReconstructionTrainer") == {}
    args = parser.parse_args([*base, "--strategy", "warm_start", "--warm_start_condition", "noisy",
                              "--noise_sigma", "0.2"])
    assert family_options(args, DenoisingPredictor, "DenoisingTrainer") == {
        "strategy": "warm_start", "warm_start_condition": "noisy", "noise_sigma": 0.2}


def test_choices_match_the_predictors():
    from nndiff.tasks import anomaly_predictor, segmentation_predictor
    from nndiff.tasks.denoising_predictor import STRATEGIES, WARM_START_CONDITIONS
    from nndiff.tasks.latent import AUTOENCODER_TRAINER
    from nndiff.tasks.operators import MaskPattern
    from nndiff.tasks.reconstruction_predictor import DC_MODES

    assert DC_CHOICES == DC_MODES and STRATEGY_CHOICES == STRATEGIES
    assert WARM_START_CONDITION_CHOICES == WARM_START_CONDITIONS
    assert MASK_PATTERN_CHOICES == tuple(p.value for p in MaskPattern)
    assert ANOMALY_STRATEGY_CHOICES == anomaly_predictor.STRATEGIES
    assert FUSION_CHOICES == segmentation_predictor.FUSIONS
    assert UNCERTAINTY_CHOICES == segmentation_predictor.UNCERTAINTIES
    assert set(AUXILIARY_TRAINERS) == {AUTOENCODER_TRAINER, anomaly_predictor.CLASSIFIER_TRAINER}


def test_predictor_family_of_every_registered_predictor():
    from nndiff.inference import predictor_class_for

    expected = {"GenerationTrainer": "generation", "TranslationTrainer": "translation",
                "DenoisingTrainer": "denoising", "ReconstructionTrainer": "reconstruction",
                "AnomalyDDPMTrainer": "anomaly_detection", "AnomalyCDPMTrainer": "anomaly_detection",
                "SegmentationDiffusionTrainer": "segmentation", "SegmentationBaselineTrainer": "segmentation",
                "LatentDiffusionTrainer": "generation"}
    assert {trainer: predictor_family(predictor_class_for(trainer)) for trainer in expected} == expected


def test_anomaly_and_segmentation_flags_map_to_constructor_keywords():
    from nndiff.tasks.anomaly_predictor import AnomalyPredictor
    from nndiff.tasks.segmentation_predictor import SegmentationPredictor

    parser = build_parser()
    base = ["-i", "x", "-o", "y", "-d", "1", "-c", "2d"]
    args = parser.parse_args([*base, "--anomaly_strategy", "wolleb", "--start_fraction", "0.3", "--classifier_dir",
                              "clf", "--classifier_scale", "5", "--smoothing_sigma", "0", "--threshold", "0.7",
                              "--num_samples", "3"])
    assert family_options(args, AnomalyPredictor, "AnomalyDDPMTrainer") == {
        "strategy": "wolleb", "start_fraction": 0.3, "classifier_dir": "clf", "classifier_scale": 5.0,
        "smoothing_sigma": 0.0, "threshold": 0.7, "num_reconstructions": 3}
    args = parser.parse_args([*base, "--guidance_scale", "2", "--calibrate_threshold", "val", "labels"])
    # --calibrate_threshold is a step of the command, not a constructor keyword
    assert family_options(args, AnomalyPredictor, "AnomalyCDPMTrainer") == {"guidance_scale": 2.0}
    args = parser.parse_args([*base, "--fusion", "staple", "--uncertainty", "variance"])
    assert family_options(args, SegmentationPredictor, "SegmentationDiffusionTrainer") == {
        "fusion": "staple", "uncertainty": "variance"}


def _model_folders(results: Path, *trainers: str) -> Path:
    for trainer in trainers:
        (results / f"{trainer}__nnDiffPlans__2d_latent").mkdir(parents=True)
    return results


def test_model_folder_choice_skips_autoencoder_and_classifier_stages(tmp_path):
    results = _model_folders(tmp_path / "a", "AutoencoderTrainer", "LatentDiffusionTrainer")
    assert _only_trainer(results, "nnDiffPlans", "2d_latent") == "LatentDiffusionTrainer"
    results = _model_folders(tmp_path / "b", "AnomalyClassifierTrainer", "AnomalyDDPMTrainer")
    assert _only_trainer(results, "nnDiffPlans", "2d_latent") == "AnomalyDDPMTrainer"
    # the autoencoder alone (diffusion stage not trained yet) is no model to predict with
    results = _model_folders(tmp_path / "c", "AutoencoderTrainer")
    with pytest.raises(NnDiffError, match=r"no trained models .*\(AutoencoderTrainer: a stage of another model"):
        _only_trainer(results, "nnDiffPlans", "2d_latent")
    results = _model_folders(tmp_path / "d", "AnomalyClassifierTrainer", "AnomalyDDPMTrainer", "AnomalyCDPMTrainer")
    with pytest.raises(NnDiffError, match="several trained models .*: AnomalyCDPMTrainer, AnomalyDDPMTrainer "
                                          r"\(AnomalyClassifierTrainer.*choose one with -tr"):
        _only_trainer(results, "nnDiffPlans", "2d_latent")


def test_shape_flag_parsing_and_generation_keyword(tmp_path, capsys):
    assert parse_shape(None) is None and parse_shape(["median"]) == "median" and parse_shape(["patch"]) == "patch"
    assert parse_shape(["12", "40", "32"]) == [12, 40, 32]
    for bad in (["big"], ["0", "8"], ["median", "8"]):
        with pytest.raises(NnDiffError, match="--shape .*expected 'patch', 'median' or positive integer sizes"):
            parse_shape(bad)

    class Shaped:
        def generate_to_folder(self, output_dir, num_samples, seed=0, shape="patch"):
            return []

    args = build_parser().parse_args(["-o", "y", "-d", "1", "-c", "3d_latent", "--shape", "median"])
    assert _generation_options(Shaped(), args) == {"shape": "median"}
    assert _generation_options(Shaped(), build_parser().parse_args(["-o", "y", "-d", "1", "-c", "2d"])) == {}
    code, err = _exit_code(predict_entry, ["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-d", "1", "-c", "2d",
                                           "--shape", "8", "8"], capsys)
    assert code == 2 and "--shape sets the size of generated samples" in err


# ----------------------------------------------------------------------------------------------
# denoising
# ----------------------------------------------------------------------------------------------
def test_denoising_warm_start_strategy_is_recorded(denoise, tmp_path):
    out = tmp_path / "ws"
    argv = ["-i", str(denoise["inputs"]), "-o", str(out), "-d", str(DENOISE_ID), "-c", "tiny", "-device", "cpu",
            "--strategy", "warm_start", "--warm_start_condition", "noisy", "--noise_sigma", "0.1",
            *_roots(denoise["paths"])]
    assert predict_entry(argv) == 0
    assert (out / "case_900.png").is_file()
    info = load_json(out / "prediction_info.json")
    assert info["predictor"] == "DenoisingPredictor" and info["strategy"] == "warm_start"
    assert info["warm_start_condition"] == "noisy"
    assert info["warm_starts"]["case_900"]["sigma"] == pytest.approx(0.1)


def test_denoising_datasets_are_refused_by_evaluate_folder(denoise, tmp_path, capsys):
    code, err = _exit_code(evaluate_folder_entry, [str(tmp_path), str(tmp_path), "--dataset_json",
                                                   str(denoise["raw"] / "dataset.json")], capsys)
    assert code == 2 and "'denoising'" in err and "evaluate_denoising" in err


# ----------------------------------------------------------------------------------------------
# refusals: exit code 2, the flag named
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, expected", [
    (["-tr", "GenerationTrainer", "--dc", "dps"], r"--dc \(reconstruction\).*is a generation model"),
    (["-tr", "TranslationTrainer", "--simulate"], r"--simulate \(reconstruction\).*is a translation model"),
    (["--strategy", "warm_start"], r"--strategy \(denoising\).*ReconstructionTrainer is a reconstruction model"),
    (["--acceleration", "4"], "--acceleration set how measurements are simulated and need --simulate"),
    (["--mask_pattern", "random", "--num_views", "30"], "--mask_pattern, --num_views .*need --simulate"),
    (["--dc_scale", "2"], "--dc_scale sets the gradient step.*projection"),
    (["--noise_sigma", "0.1"], "--noise_sigma only act in the warm-start strategy"),
    (["--simulate", "--num_views", "30"], r"--num_views do not apply.*MRI \(mri_cartesian\)"),
])
def test_misplaced_family_flags_are_refused(recon, tmp_path, capsys, extra, expected):
    code, err = _exit_code(predict_entry, _recon_argv(recon, tmp_path / "o", *extra), capsys)
    assert code == 2, err
    assert "nnDiff error" in err
    assert re.search(expected, err), err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_family_flags_need_input_and_foreign_family_for_denoising(denoise, recon, tmp_path, capsys):
    code, err = _exit_code(predict_entry, ["-o", str(tmp_path / "g"), "-d", str(RECON_ID), "-c", "tiny",
                                           "--dc", "mcg", *_roots(recon["paths"])], capsys)
    assert code == 2 and "--dc apply to prediction with -i" in err
    code, err = _exit_code(predict_entry, ["-i", str(denoise["inputs"]), "-o", str(tmp_path / "d"), "-d",
                                           str(DENOISE_ID), "-c", "tiny", "--simulate", "--dc", "dps",
                                           *_roots(denoise["paths"])], capsys)
    assert code == 2 and "--simulate (reconstruction), --dc (reconstruction)" in err
    assert "DenoisingTrainer is a denoising model" in err


@pytest.mark.parametrize("flag, value, expected", [
    ("--dc", "magic", "invalid choice: 'magic'"),
    ("--mask_pattern", "spiral", "invalid choice: 'spiral'"),
    ("--strategy", "fast", "invalid choice: 'fast'"),
    ("--warm_start_condition", "maybe", "invalid choice: 'maybe'"),
    ("--acceleration", "0.5", r"must be >= 1 \(1 = fully sampled\), got 0.5"),
    ("--acceleration", "nan", "must be >= 1"),
    ("--center_fraction", "1.5", r"must be \[0, 1\], got 1.5"),
    ("--num_views", "0", "must be >= 1, got 0"),
    ("--num_views", "2.5", "expected an integer"),
    ("--dc_scale", "0", "must be > 0, got 0"),
    ("--noise_sigma", "-1", "must be > 0, got -1"),
])
def test_bad_values_exit_2_naming_the_flag(flag, value, expected, capsys, tmp_path):
    code, err = _exit_code(predict_entry, ["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-d", "1", "-c", "2d",
                                           flag, value], capsys)
    assert code == 2
    assert f"argument {flag}" in err and re.search(expected, err), err


def test_crop_is_refused_for_generation_datasets(tmp_path, capsys):
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"task": "generation"}))
    code, err = _exit_code(evaluate_folder_entry, [str(tmp_path), str(tmp_path), "--dataset_json",
                                                   str(dataset_json), "--crop", "8", "8"], capsys)
    assert code == 2 and "--crop only apply to reconstruction datasets" in err
    code, err = _exit_code(evaluate_folder_entry, [str(tmp_path), str(tmp_path), "--dataset_json",
                                                   str(dataset_json), "--crop", "8", "0"], capsys)
    assert code == 2 and "argument --crop: must be >= 1" in err


@pytest.mark.parametrize("command", ["nndiff_predict", "nndiff_evaluate_folder"])
def test_every_flag_of_the_command_is_in_cli_md(command):
    from nndiff.run.evaluate import evaluate_folder_parser

    parser = build_parser() if command == "nndiff_predict" else evaluate_folder_parser()
    cli_md = (Path(__file__).resolve().parents[2] / "documentation" / "cli.md").read_text(encoding="utf-8")
    row = next(line for line in cli_md.splitlines() if line.startswith(f"| `{command}`"))
    shared = {"-h", "--help", "-v", "--verbose", "-q", "--quiet", "--raw", "--preprocessed", "--results"}
    flags = {option for action in parser._actions for option in action.option_strings} - shared
    missing = sorted(flag for flag in flags if not re.search(rf"{re.escape(flag)}(?![A-Za-z_])", row))
    assert not missing, f"{command} flags missing from documentation/cli.md: {missing}"
