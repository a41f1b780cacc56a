"""Segmentation evaluation: Dice/HD95 with known answers, regions, uncertainty AUROC, summary layout,
diffusion-vs-deterministic table and the folder evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nndiff.dataset.io import ImageProperties, write_image
from nndiff.errors import DatasetError, NnDiffError
from nndiff.evaluation.segmentation import (case_metrics, class_key, compare_reports, dice,
                                            evaluate_segmentation_folders, format_segmentation_table, hd95,
                                            image_diagonal, labels_or_regions, summarize, uncertainty_auroc)


def _square(shape=(10, 10), rows=slice(2, 6), cols=slice(2, 6)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


def test_dice_and_hd95_known_answers():
    a, b = _square(), _square(cols=slice(3, 7))  # 4x4 squares shifted by one column
    assert dice(a, b) == pytest.approx(2 * 12 / 32)
    assert hd95(a, b) == pytest.approx(1.0)
    assert hd95(a, b, spacing=(1.0, 2.5)) == pytest.approx(2.5)  # the shift is along the 2.5 mm axis
    one, other = np.zeros((4, 8), bool), np.zeros((4, 8), bool)
    one[0, 0], other[0, 3] = True, True
    assert hd95(one, other, spacing=(1.0, 2.0)) == pytest.approx(6.0) and dice(one, other) == 0.0
    assert hd95(a, a) == 0.0 and dice(a, a) == 1.0


def test_empty_mask_rules():
    empty = np.zeros((3, 4), bool)
    assert dice(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    full = np.ones((3, 4), bool)
    assert dice(full, empty) == 0.0
    # Image diagonal: sqrt((3 * 2 mm)^2 + (4 * 1 mm)^2).
    assert hd95(full, empty, spacing=(2.0, 1.0)) == pytest.approx(52.0 ** 0.5) == image_diagonal((3, 4), (2.0, 1.0))


def test_hd95_3d_and_bad_input():
    a = np.zeros((6, 6, 6), bool)
    a[1:4, 1:4, 1:4] = True
    b = np.roll(a, 2, axis=0)
    assert hd95(a, b, spacing=(3.0, 1.0, 1.0)) == pytest.approx(6.0)
    with pytest.raises(NnDiffError, match="shapes"):
        hd95(a, a[0])
    with pytest.raises(NnDiffError, match="spacing"):
        hd95(a, b, spacing=(1.0, 1.0))


def test_region_labels():
    labels = {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": 3}
    classes = labels_or_regions(labels)
    assert classes == [(1, 2, 3), (2, 3), 3]
    assert [class_key(c) for c in classes] == ["(1, 2, 3)", "(2, 3)", "3"]
    reference = np.array([[0, 1, 2, 3]])
    prediction = np.array([[1, 1, 3, 0]])
    metrics = case_metrics(prediction, reference, classes)
    assert metrics["(1, 2, 3)"]["Dice"] == pytest.approx(2 * 2 / (3 + 3))  # {0,1,2} vs {1,2,3}
    assert metrics["(2, 3)"]["Dice"] == pytest.approx(2 * 1 / (1 + 2))  # {2} vs {2,3}
    assert metrics["3"]["Dice"] == 0.0 and metrics["3"]["TP"] == 0 and metrics["3"]["FP"] == 1
    with pytest.raises(DatasetError, match="labels.bad"):
        labels_or_regions({"background": 0, "bad": "one"})


def test_uncertainty_auroc():
    reference = np.array([0, 0, 1, 1, 2, 2])
    prediction = np.array([0, 1, 1, 1, 0, 2])  # errors at 1 and 4
    perfect = np.array([0.1, 0.9, 0.2, 0.1, 0.8, 0.3])
    assert uncertainty_auroc([perfect], [prediction], [reference]) == 1.0
    assert uncertainty_auroc([-perfect], [prediction], [reference]) == 0.0
    assert uncertainty_auroc([perfect], [reference], [reference]) is None  # no error at all


def test_summary_layout_and_comparison():
    classes = [1, 2]
    reference = np.array([[1, 1, 2, 0]])
    good, bad = np.array([[1, 1, 2, 0]]), np.array([[1, 0, 0, 0]])
    first = summarize([{"metrics": case_metrics(good, reference, classes)}], classes, 0.9)
    second = summarize([{"metrics": case_metrics(bad, reference, classes)}], classes, None)
    assert set(first) >= {"metric_per_case", "mean", "foreground_mean"}
    assert first["mean"]["1"]["Dice"] == 1.0 and second["mean"]["1"]["Dice"] == pytest.approx(2 / 3)
    assert second["foreground_mean"]["Dice"] == pytest.approx((2 / 3 + 0.0) / 2)
    table = compare_reports(first, second)
    assert "| 1 | 1.0000 | 0.6667 | +0.3333 |" in table
    assert "| foreground mean | 1.0000 | 0.3333 | +0.6667 |" in table
    assert "| uncertainty AUROC | 0.9000 | - |" in table
    with pytest.raises(NnDiffError, match="different labels"):
        compare_reports(first, summarize([{"metrics": case_metrics(bad, reference, [1])}], [1]))


# --------------------------------------------------------------------------- folders
def _write(path: Path, array: np.ndarray, spacing=(2.0, 1.0)) -> None:
    """A 2D single-channel image ``(Y, X)`` as nii.gz with in-plane spacing ``(y, x)``."""
    props = ImageProperties(spacing=(999.0, *spacing), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0),
                            spatial_dims=2, shape=(1, *array.shape))
    write_image(np.asarray(array)[None, None], props, path)


def _segmentation_folders(root: Path, ending: str = ".nii.gz", float_ending: str = ".nii.gz") -> Path:
    """Two cases with labels 1 and 2; 'diffusion' is perfect, 'deterministic' one row off with an
    uncertainty map that is high exactly on its errors."""
    for kind in ("labelsTs", "diffusion", "deterministic"):
        (root / kind).mkdir(parents=True)
    json.dump({"name": "Toy", "task": "segmentation", "channel_names": {"0": "T1"},
               "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2, "file_ending": ending},
              open(root / "dataset.json", "w"))
    for index in range(2):
        reference = np.zeros((12, 12), np.uint8)
        reference[2:6, 2:6], reference[7:10, 7:10] = 1, 2
        _write(root / "labelsTs" / f"c{index}{ending}", reference)
        _write(root / "diffusion" / f"c{index}{ending}", reference)  # perfect
        shifted = np.roll(reference, 1, axis=0)  # one row = 2 mm off
        _write(root / "deterministic" / f"c{index}{ending}", shifted)
        error = (shifted != reference).astype(np.float32)
        _write(root / "deterministic" / f"c{index}_uncertainty{float_ending}", error + 0.1)
    return root


def test_folder_evaluation_with_baseline(tmp_path):
    root = _segmentation_folders(tmp_path / "Dataset002_Seg")
    summary = evaluate_segmentation_folders(root / "labelsTs", root / "diffusion", dataset_json=root / "dataset.json",
                                            baseline=root / "deterministic", output_file=tmp_path / "summary.json")
    assert summary["mean"]["1"]["Dice"] == 1.0 and summary["mean"]["2"]["HD95"] == 0.0
    assert summary["uncertainty_auroc"] is None  # the diffusion folder has no uncertainty maps
    baseline = summary["deterministic_baseline"]
    assert baseline["mean"]["1"]["Dice"] == pytest.approx(2 * 12 / 32)
    assert baseline["mean"]["1"]["HD95"] == pytest.approx(2.0)  # spacing (2, 1): the row shift is 2 mm
    assert baseline["uncertainty_auroc"] == 1.0
    assert len(summary["metric_per_case"]) == 2 and summary["metric_per_case"][0]["reference_file"].endswith("c0.nii.gz")
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["foreground_mean"]["Dice"] == 1.0 and "| a (1) | 1.0000 | 0.7500 |" in written["comparison"]
    assert summary["class_names"] == {"1": "a", "2": "b"}  # dataset.json names, printed as "name (value)"
    single = {k: v for k, v in summary.items() if k != "deterministic_baseline"}
    assert "| b (2) | 1.0000 |" in format_segmentation_table(single)
    assert "diffusion" in format_segmentation_table(summary)


def test_folder_evaluation_bad_inputs(tmp_path):
    root = _segmentation_folders(tmp_path / "Dataset002_Seg")
    bad = np.zeros((12, 12), np.uint8)
    bad[0, 0] = 5
    _write(root / "diffusion" / "c1.nii.gz", bad)
    with pytest.raises(DatasetError, match=r"c1.nii.gz: prediction holds label value\(s\) \[5\]"):
        evaluate_segmentation_folders(root / "labelsTs", root / "diffusion", dataset_json=root / "dataset.json")
    _write(root / "diffusion" / "c1.nii.gz", np.zeros((12, 10), np.uint8))
    with pytest.raises(DatasetError, match=r"c1.nii.gz: shape \(12, 10\) differs from the reference's \(12, 12\)"):
        evaluate_segmentation_folders(root / "labelsTs", root / "diffusion", dataset_json=root / "dataset.json")
    (root / "diffusion" / "c1.nii.gz").unlink()
    with pytest.raises(DatasetError, match="c1.nii.gz: predicted label map missing"):
        evaluate_segmentation_folders(root / "labelsTs", root / "diffusion", dataset_json=root / "dataset.json")


def test_task_folder_dispatch(tmp_path):
    from nndiff.evaluation.folders import evaluate_task_folders

    root = _segmentation_folders(tmp_path / "Dataset002_Seg")
    summary, table = evaluate_task_folders("segmentation", root / "labelsTs", root / "diffusion",
                                           dataset_json=root / "dataset.json", baseline=root / "deterministic")
    assert summary["task"] == "segmentation" and table == summary["comparison"]
    summary, table = evaluate_task_folders("segmentation", root / "labelsTs", root / "deterministic",
                                           dataset_json=root / "dataset.json")
    assert "| b (2) | 0.6667 | 2.00 |" in table and "uncertainty AUROC: 1.0000" in table
    with pytest.raises(NnDiffError, match="anomaly detection only"):
        evaluate_task_folders("segmentation", root / "labelsTs", root / "diffusion",
                              dataset_json=root / "dataset.json", training_dir=root)


def test_png_dataset_with_npy_uncertainty(tmp_path):
    # The segmentation predictor writes float uncertainty as .npy (with a geometry sidecar) for PNG datasets.
    root = _segmentation_folders(tmp_path / "Dataset003_Png", ending=".png", float_ending=".npy")
    summary = evaluate_segmentation_folders(root / "labelsTs", root / "deterministic", dataset_json=root / "dataset.json")
    assert summary["uncertainty_auroc"] == 1.0 and summary["mean"]["1"]["Dice"] == pytest.approx(0.75)
