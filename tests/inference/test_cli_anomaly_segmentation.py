"""nndiff_predict / nndiff_evaluate_folder for anomaly-detection and segmentation models (issue 6):
the family flags reach the predictor and are recorded, --calibrate_threshold stores the threshold that
prediction then uses, --num_samples absent keeps the planned K, misplaced flags are refused, and the
predictions go through the folder evaluation. The tiny trained models are the fixtures of
tests/tasks/test_anomaly_predictor.py and tests/tasks/test_segmentation.py (imported, not copied)."""
from __future__ import annotations

import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks"))  # the family test modules

from test_anomaly_predictor import DATASET as ANOMALY_ID  # noqa: E402
from test_anomaly_predictor import _model_dir, trained  # noqa: E402,F401  (module fixture)
from test_segmentation import _roots as _segmentation_roots  # noqa: E402
from test_segmentation import shapes_model  # noqa: E402,F401  (module fixture)

from nndiff.dataset.io import read_images, write_image  # noqa: E402
from nndiff.inference.cli import predict_entry  # noqa: E402
from nndiff.run.evaluate import evaluate_folder_entry  # noqa: E402
from nndiff.tasks.anomaly_predictor import THRESHOLD_FILE, load_threshold  # noqa: E402
from nndiff.utils.files import load_json  # noqa: E402

SEGMENTATION_ID = 81  # shapes_model's dataset


def _exit_code(entry, argv: list, capsys) -> tuple[int, str]:
    """Exit code and stderr of a CLI entry (argparse errors raise SystemExit(2))."""
    try:
        code = entry([str(a) for a in argv])
    except SystemExit as err:
        code = err.code
    return code, capsys.readouterr().err


def _anomaly_argv(trained, out: Path, trainer: str, *extra) -> list[str]:
    paths, _, inputs = trained
    return [str(a) for a in ["-i", inputs, "-o", out, "-d", ANOMALY_ID, "-c", "tiny", "-tr", trainer,
                             "-device", "cpu", *extra, "--raw", paths.raw, "--preprocessed", paths.preprocessed,
                             "--results", paths.results, "-q"]]


def _segmentation_argv(model: dict, out: Path, trainer: str, *extra) -> list[str]:
    return [str(a) for a in ["-i", model["test"] / "imagesTs", "-o", out, "-d", SEGMENTATION_ID, "-c", "tiny",
                             "-tr", trainer, "-device", "cpu", *extra, *_segmentation_roots(model["paths"]), "-q"]]


# ----------------------------------------------------------------------------------------------
# anomaly detection
# ----------------------------------------------------------------------------------------------
def test_calibrate_predict_and_evaluate_anomaly_maps(trained, tmp_path, capsys):
    paths, raw, inputs = trained
    model_dir = _model_dir(paths, "AnomalyDDPMTrainer")
    out = tmp_path / "anoddpm"
    try:
        assert predict_entry(_anomaly_argv(trained, out, "AnomalyDDPMTrainer", "--anomaly_strategy", "anoddpm",
                                           "--start_fraction", "0.2", "--smoothing_sigma", "0.5", "--num_samples",
                                           "2", "--calibrate_threshold", inputs, raw / "labelsTr")) == 0
        printed = capsys.readouterr().out
        stored = load_threshold(model_dir, "anoddpm")
        assert stored is not None and "anomaly threshold (anoddpm, dice on 2 case(s))" in printed
        info = load_json(out / "prediction_info.json")
        assert info["strategy"] == "anoddpm" and info["start_fraction"] == 0.2 and info["smoothing_sigma"] == 0.5
        assert info["num_reconstructions"] == 2  # --num_samples = reconstructions averaged into the map
        assert info["thresholds"]["case_001"] == {"threshold": stored, "source": THRESHOLD_FILE}
        amap, _ = read_images([out / "case_001.nii.gz"])
        mask, _ = read_images([out / "case_001_mask.png"])
        assert ((amap >= stored) == (mask > 0)).all()
    finally:
        (model_dir / THRESHOLD_FILE).unlink(missing_ok=True)  # the other tests expect no stored threshold

    reference = tmp_path / "labels"
    reference.mkdir()
    shutil.copy(raw / "labelsTr" / "case_001.png", reference / "case_001.png")
    lesion, props = read_images([raw / "labelsTr" / "case_001.png"])
    write_image(np.zeros_like(lesion), props, reference / "case_000.png")  # the healthy case: an empty mask
    assert evaluate_folder_entry([str(a) for a in [reference, out, "--dataset_json", raw / "dataset.json",
                                                   "--images", inputs, "-q"]]) == 0
    summary = load_json(out / "summary.json")
    assert summary["task"] == "anomaly_detection" and summary["num_cases"] == 2
    row = summary["methods"]["anoddpm"]
    assert row["operating_point"] == "predicted masks" and 0 <= row["pixel_auroc"] <= 1
    assert "zscore_baseline" in summary["methods"]  # healthy imagesTr + the test images of --images


def test_cdpm_guidance_and_given_threshold(trained, tmp_path):
    out = tmp_path / "cdpm"
    assert predict_entry(_anomaly_argv(trained, out, "AnomalyCDPMTrainer", "--guidance_scale", "2",
                                       "--threshold", "0.25")) == 0
    info = load_json(out / "prediction_info.json")
    assert info["predictor"] == "AnomalyCDPMPredictor" and info["strategy"] == "cdpm"
    assert info["guidance_scale"] == 2.0 and info["num_reconstructions"] == 1  # the plan's, no --num_samples
    assert info["thresholds"]["case_000"] == {"threshold": 0.25, "source": "given"}


def test_wolleb_classifier_folder_and_scale(trained, tmp_path):
    paths, _, _ = trained
    classifier = _model_dir(paths, "AnomalyClassifierTrainer")
    out = tmp_path / "wolleb"
    assert predict_entry(_anomaly_argv(trained, out, "AnomalyDDPMTrainer", "--anomaly_strategy", "wolleb",
                                       "--classifier_dir", classifier, "--classifier_scale", "3")) == 0
    info = load_json(out / "prediction_info.json")
    assert info["strategy"] == "wolleb" and info["classifier_scale"] == 3.0
    # a classifier folder that does not exist names the folder (it reached the predictor)
    code = predict_entry(_anomaly_argv(trained, tmp_path / "w2", "AnomalyDDPMTrainer", "--anomaly_strategy",
                                       "wolleb", "--classifier_dir", tmp_path / "nope"))
    assert code == 2


@pytest.mark.parametrize("trainer, extra, expected", [
    ("AnomalyDDPMTrainer", ["--anomaly_strategy", "anoddpm", "--classifier_scale", "2"],
     r"--classifier_scale \(strategy wolleb\) do not apply: the anomaly strategy is anoddpm \(--anomaly_strategy\)"),
    ("AnomalyDDPMTrainer", ["--anomaly_strategy", "wolleb", "--guidance_scale", "2"],
     r"--guidance_scale \(strategy cdpm\) do not apply: the anomaly strategy is wolleb"),
    # no --anomaly_strategy: the strategy the loaded model was trained for decides
    ("AnomalyDDPMTrainer", ["--guidance_scale", "2"],
     r"--guidance_scale \(strategy cdpm\) do not apply: the anomaly strategy is anoddpm \(the plan's"),
    ("AnomalyCDPMTrainer", ["--classifier_dir", "x"], r"--classifier_dir \(strategy wolleb\).*strategy is cdpm"),
    ("AnomalyDDPMTrainer", ["--anomaly_strategy", "cdpm"], "strategy cdpm needs a class-conditional"),
    ("AnomalyDDPMTrainer", ["--threshold", "1", "--calibrate_threshold", "x"], "--threshold overrides the stored"),
    ("AnomalyDDPMTrainer", ["--calibrate_threshold", "a", "b", "c"], r"takes VAL_IMAGES \[VAL_LABELS\], got 3"),
    ("AnomalyDDPMTrainer", ["--calibrate_threshold", "{inputs}", "{missing}"],
     "validation lesion masks folder .*missing does not exist"),
    ("AnomalyDDPMTrainer", ["--fusion", "staple"], r"--fusion \(segmentation\).*AnomalyDDPMTrainer is an "
                                                    r"anomaly_detection model"),
    ("AnomalyDDPMTrainer", ["--shape", "median"], "--shape sets the size of generated samples"),
    ("AnomalyDDPMTrainer", ["--condition", "healthy=true"], "--condition and --guidance_scale apply to generation"),
])
def test_misplaced_anomaly_flags_are_refused(trained, tmp_path, capsys, trainer, extra, expected):
    _, _, inputs = trained
    extra = [e.format(inputs=inputs, missing=tmp_path / "missing") for e in extra]
    code, err = _exit_code(predict_entry, _anomaly_argv(trained, tmp_path / "o", trainer, *extra), capsys)
    assert code == 2 and "nnDiff error" in err, err
    assert re.search(expected, err), err
    assert not (tmp_path / "o").exists()  # refused before anything is written


@pytest.mark.parametrize("flag, value, expected", [
    ("--anomaly_strategy", "anogan", "invalid choice: 'anogan'"),
    ("--start_fraction", "0", r"must be \(0, 1\], got 0"),
    ("--start_fraction", "1.5", r"must be \(0, 1\], got 1.5"),
    ("--classifier_scale", "-1", "must be >= 0, got -1"),
    ("--smoothing_sigma", "nan", "must be >= 0"),
    ("--threshold", "inf", "must be a finite number, got inf"),
    ("--fusion", "vote", "invalid choice: 'vote'"),
    ("--uncertainty", "mutual_information", "invalid choice: 'mutual_information'"),
])
def test_bad_values_exit_2_naming_the_flag(flag, value, expected, tmp_path, capsys):
    code, err = _exit_code(predict_entry, ["-i", tmp_path, "-o", tmp_path / "o", "-d", "1", "-c", "2d", flag, value],
                           capsys)
    assert code == 2 and f"argument {flag}" in err and re.search(expected, err), err


def test_anomaly_flags_need_input(tmp_path, capsys):
    code, err = _exit_code(predict_entry, ["-o", tmp_path / "g", "-d", "1", "-c", "2d", "--anomaly_strategy", "cdpm",
                                           "--fusion", "mean"], capsys)
    assert code == 2 and "--anomaly_strategy, --fusion apply to prediction with -i" in err


# ----------------------------------------------------------------------------------------------
# segmentation
# ----------------------------------------------------------------------------------------------
def test_segmentation_planned_ensemble_flags_and_evaluation(shapes_model, tmp_path, capsys):
    from nndiff.training.api import load_plans

    planned = load_plans(shapes_model["pre"])["configurations"]["2d"]["sampling"]["num_ensemble_samples"]
    assert planned > 1
    diffusion, baseline = tmp_path / "diffusion", tmp_path / "baseline"
    # no --num_samples: the plan's K, not 1
    assert predict_entry(_segmentation_argv(shapes_model, diffusion, "SegmentationDiffusionTrainer", "--fusion",
                                            "staple", "--uncertainty", "variance")) == 0
    info = load_json(diffusion / "prediction_info.json")
    assert info["num_samples"] == planned
    assert info["fusion"] == "staple" and info["uncertainty"] == "variance"
    assert info["uncertainty_range"] == [0.0, 0.25]
    assert predict_entry(_segmentation_argv(shapes_model, baseline, "SegmentationBaselineTrainer")) == 0
    assert load_json(baseline / "prediction_info.json")["num_samples"] == 1

    test = shapes_model["test"]
    capsys.readouterr()
    assert evaluate_folder_entry([str(a) for a in [test / "labelsTs", diffusion, "--dataset_json",
                                                   shapes_model["paths"].raw / "Dataset081_Shapes" / "dataset.json",
                                                   "--baseline", baseline]]) == 0
    summary = load_json(diffusion / "summary.json")
    assert summary["task"] == "segmentation" and len(summary["metric_per_case"]) == 2
    assert 0 <= summary["foreground_mean"]["Dice"] <= 1
    assert "deterministic_baseline" in summary and summary["comparison"] in capsys.readouterr().out


def test_segmentation_explicit_num_samples_and_entropy_range(shapes_model, tmp_path):
    out = tmp_path / "k2"
    assert predict_entry(_segmentation_argv(shapes_model, out, "SegmentationDiffusionTrainer", "--num_samples",
                                            "2")) == 0
    info = load_json(out / "prediction_info.json")
    assert info["num_samples"] == 2 and info["fusion"] == "mean" and info["uncertainty"] == "entropy"
    assert info["uncertainty_range"] == pytest.approx([0.0, math.log(3)])


@pytest.mark.parametrize("trainer, extra, expected", [
    ("SegmentationBaselineTrainer", ["--fusion", "mean"], "--fusion combines several samples.*deterministic"),
    ("SegmentationBaselineTrainer", ["--uncertainty", "variance"], "variance.*K = 1"),
    ("SegmentationDiffusionTrainer", ["--threshold", "0.5"],
     r"--threshold \(anomaly_detection\).*SegmentationDiffusionTrainer is a segmentation model"),
    ("SegmentationDiffusionTrainer", ["--guidance_scale", "2"], "--guidance_scale apply to generation"),
])
def test_misplaced_segmentation_flags_are_refused(shapes_model, tmp_path, capsys, trainer, extra, expected):
    code, err = _exit_code(predict_entry, _segmentation_argv(shapes_model, tmp_path / "o", trainer, *extra), capsys)
    assert code == 2 and re.search(expected, err), err
    assert not (tmp_path / "o").exists()
