"""Anomaly-detection evaluation: thresholds, pixel/case metrics, z-score baseline, folder evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nndiff.dataset.io import ImageProperties, read_images, read_label, write_image
from nndiff.errors import DatasetError, NnDiffError
from nndiff.evaluation.anomaly import (average_precision, case_auroc, case_score, dice_at_threshold,
                                       dice_optimal_threshold, evaluate_anomaly_folders, evaluate_anomaly_maps,
                                       fit_zscore_baseline, format_anomaly_table, otsu_threshold, pixel_auprc,
                                       pixel_auroc, roc_auc, subsample_voxels, zscore_map)


def _dice(prediction: np.ndarray, mask: np.ndarray) -> float:
    return 2.0 * np.logical_and(prediction, mask).sum() / (prediction.sum() + mask.sum())


def test_dice_optimal_threshold_known_answer():
    # Case 1: lesion values 0.8, 0.9; case 2: lesion 0.85 with a healthy 0.3. Threshold 0.8 is perfect.
    maps = [np.array([[0.1, 0.2], [0.8, 0.9]]), np.array([0.3, 0.85])]
    masks = [np.array([[0, 0], [1, 1]]), np.array([0, 1])]
    threshold, dice = dice_optimal_threshold(maps, masks)
    # Between the last kept value (0.8) and the next smaller one (0.3): '>' and '>=' agree.
    assert threshold == pytest.approx(0.55)
    assert dice == pytest.approx(1.0)


def test_dice_optimal_threshold_matches_brute_force(rng):
    maps = [rng.normal(size=(8, 8)) for _ in range(3)]
    masks = [(m + rng.normal(scale=0.8, size=m.shape)) > 1.0 for m in maps]
    threshold, dice = dice_optimal_threshold(maps, masks)
    pooled_map, pooled_mask = np.concatenate([m.ravel() for m in maps]), np.concatenate([k.ravel() for k in masks])
    brute = max(_dice(pooled_map >= t, pooled_mask) for t in np.unique(pooled_map))
    assert dice == pytest.approx(brute)
    assert _dice(pooled_map >= threshold, pooled_mask) == pytest.approx(dice)
    assert _dice(pooled_map > threshold, pooled_mask) == pytest.approx(dice)
    assert 0 < dice < 1


def test_dice_optimal_threshold_ties_and_empty_masks():
    # Tied values are predicted together: {0.5, 0.5} with one lesion -> Dice 2/3 at 0.5, not 1.
    threshold, dice = dice_optimal_threshold([np.array([0.5, 0.5, 0.1])], [np.array([1, 0, 0])])
    assert (threshold, dice) == (pytest.approx(0.3), pytest.approx(2 / 3))
    # No lesion anywhere: the empty prediction (threshold above the maximum) is perfect.
    threshold, dice = dice_optimal_threshold([np.array([0.2, 0.7])], [np.zeros(2)])
    assert threshold > 0.7 and dice == 1.0
    # Everything is lesion: the threshold falls below the smallest value.
    threshold, dice = dice_optimal_threshold([np.array([0.2, 0.7])], [np.ones(2)])
    assert threshold < 0.2 and dice == 1.0


def test_dice_optimal_threshold_bad_input():
    with pytest.raises(NnDiffError, match="shape"):
        dice_optimal_threshold([np.zeros((2, 2))], [np.zeros((2, 3))])
    with pytest.raises(NnDiffError, match="NaN"):
        dice_optimal_threshold([np.array([np.nan, 1.0])], [np.array([0, 1])])
    with pytest.raises(NnDiffError, match="2 anomaly map"):
        dice_optimal_threshold([np.zeros(2), np.zeros(2)], [np.zeros(2)])


def test_otsu_threshold_bimodal(rng):
    low, high = rng.normal(0.0, 1.0, 500), rng.normal(10.0, 1.0, 500)
    threshold = otsu_threshold(np.concatenate([low, high]))
    # Between the modes, splitting the sample into its two components (up to one 256-bin histogram step).
    assert 2.0 < threshold < 8.0
    assert (low < threshold).mean() > 0.99 and (high >= threshold).mean() > 0.99
    assert otsu_threshold(np.full(5, 2.5)) == 2.5
    with pytest.raises(NnDiffError, match="empty"):
        otsu_threshold(np.array([]))


# --------------------------------------------------------------------------- ranking metrics
def test_auroc_perfect_reversed_and_sklearn(rng):
    from sklearn.metrics import average_precision_score, roc_auc_score

    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    perfect = mask.astype(float) + 0.01 * rng.random((8, 8))
    assert pixel_auroc([perfect], [mask]) == pytest.approx(1.0)
    assert pixel_auroc([-perfect], [mask]) == pytest.approx(0.0)
    assert pixel_auprc([perfect], [mask]) == pytest.approx(1.0)
    scores = np.round(rng.normal(size=300), 1)  # rounded: many ties
    labels = rng.random(300) < 0.3
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores))
    assert roc_auc(scores, np.zeros(300)) is None and average_precision(scores, np.zeros(300)) is None


def test_subsample_is_deterministic_and_bounded(rng):
    scores, labels = rng.random(1000), rng.random(1000) < 0.5
    first, second = subsample_voxels(scores, labels, 100), subsample_voxels(scores, labels, 100)
    assert first[0].size == 100 and np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert subsample_voxels(scores, labels, None)[0].size == 1000


def test_case_scores_and_case_auroc():
    amap = np.zeros(200)
    amap[:2] = [10.0, 4.0]  # top 1 % of 200 voxels = 2 voxels
    assert case_score(amap) == pytest.approx(7.0)
    assert case_score(amap, "max") == 10.0
    with pytest.raises(NnDiffError, match="unknown case score"):
        case_score(amap, "median")
    assert case_auroc([0.1, 0.2, 0.9, 0.8], [False, False, True, True]) == 1.0
    assert case_auroc([0.1, 0.2], [False, False]) is None


def test_dice_at_threshold():
    amap, mask = np.array([0.1, 0.6, 0.9, 0.4]), np.array([0, 1, 1, 1])
    # map >= 0.5 predicts {0.6, 0.9}: TP 2, 2 predicted, 3 true -> 4 / 5.
    assert dice_at_threshold([amap], [mask], 0.5) == pytest.approx(0.8)


# --------------------------------------------------------------------------- z-score baseline
def test_zscore_baseline_finds_a_bright_lesion(rng):
    healthy = [rng.normal(100.0, 5.0, (1, 12, 12)) for _ in range(6)]
    test = rng.normal(100.0, 5.0, (1, 12, 12))
    test[0, 4:7, 4:7] += 60.0
    mask = np.zeros((12, 12), bool)
    mask[4:7, 4:7] = True
    stats = fit_zscore_baseline(healthy)
    assert stats.voxelwise and stats.mean.shape == (1, 12, 12)
    amap = zscore_map(test, stats)
    assert amap.shape == (12, 12)
    assert pixel_auroc([amap], [mask]) > 0.95
    global_stats = fit_zscore_baseline(healthy + [rng.normal(100.0, 5.0, (1, 10, 12))])
    assert not global_stats.voxelwise and global_stats.mean.shape == (1,)
    assert pixel_auroc([zscore_map(test, global_stats)], [mask]) > 0.95
    with pytest.raises(NnDiffError, match="healthy"):
        fit_zscore_baseline([])
    with pytest.raises(NnDiffError, match="shape"):
        zscore_map(rng.normal(size=(1, 10, 10)), stats)


def test_evaluate_anomaly_maps_rows():
    masks = [np.array([[0, 1], [1, 0]]), np.zeros((2, 2))]
    maps = [np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([[0.1, 0.2], [0.3, 0.1]])]
    row = evaluate_anomaly_maps(maps, masks, case_ids=["a", "b"], threshold=0.5)
    assert row["pixel_auroc"] == 1.0 and row["best_dice"] == 1.0 and row["dice_at_threshold"] == 1.0
    assert row["case_auroc"] == 1.0 and row["operating_point"] == "threshold"
    assert [c["anomalous"] for c in row["metric_per_case"]] == [True, False]
    json.dumps(row, allow_nan=False)


# --------------------------------------------------------------------------- folders
PROPS_2D = dict(spacing=(999.0, 1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0), spatial_dims=2)


def _write(path: Path, array: np.ndarray) -> None:
    """A 2D single-channel image ``(Y, X)`` as nii.gz."""
    props = ImageProperties(shape=(1, *array.shape), **PROPS_2D)
    write_image(np.asarray(array)[None, None], props, path)


def _anomaly_dataset(root: Path, rng: np.random.Generator) -> Path:
    """Healthy training slices; test slices with a bright square lesion (two cases) or none (one)."""
    (root / "imagesTr").mkdir(parents=True)
    for kind in ("imagesTs", "labelsTs", "labelsTr", "pred"):
        (root / kind).mkdir()
    json.dump({"name": "Toy", "task": "anomaly_detection", "channel_names": {"0": "T1"}, "labels":
               {"background": 0, "lesion": 1}, "numTraining": 5, "file_ending": ".nii.gz"},
              open(root / "dataset.json", "w"))
    for index in range(5):
        _write(root / "imagesTr" / f"tr_{index}_0000.nii.gz", rng.normal(100.0, 5.0, (16, 16)))
        _write(root / "labelsTr" / f"tr_{index}.nii.gz", np.zeros((16, 16), np.uint8))
    for index, lesion in enumerate((True, True, False)):
        image, mask = rng.normal(100.0, 5.0, (16, 16)), np.zeros((16, 16), np.uint8)
        if lesion:
            mask[3 + index:8 + index, 5:9] = 1
            image[mask == 1] += 50.0
        _write(root / "imagesTs" / f"ts_{index}_0000.nii.gz", image)
        _write(root / "labelsTs" / f"ts_{index}.nii.gz", mask)
        amap = mask * 2.0 + 0.1 * rng.random((16, 16))  # a near-perfect strategy
        _write(root / "pred" / f"ts_{index}.nii.gz", amap.astype(np.float32))
        _write(root / "pred" / f"ts_{index}_mask.nii.gz", (amap > 1.0).astype(np.uint8))
    return root


def test_folder_evaluation_with_baseline(tmp_path, rng):
    root = _anomaly_dataset(tmp_path / "Dataset001_Toy", rng)
    summary = evaluate_anomaly_folders(root / "labelsTs", root / "pred", dataset_json=root / "dataset.json",
                                       output_file=tmp_path / "summary.json")
    assert summary["num_cases"] == 3 and summary["num_anomalous_cases"] == 2
    strategy, baseline = summary["methods"]["pred"], summary["methods"]["zscore_baseline"]
    assert strategy["pixel_auroc"] == 1.0 and strategy["dice_at_threshold"] == 1.0
    assert strategy["operating_point"] == "predicted masks"
    assert 0.5 < baseline["pixel_auroc"] < 1.0 and baseline["num_healthy_training"] == 5
    assert summary["settings"]["baseline_statistics"] == "voxelwise"
    assert json.loads((tmp_path / "summary.json").read_text())["methods"].keys() == {
        "pred", "zscore_baseline", "zscore_baseline_global"}
    # beside voxel-wise statistics, the global-statistics z-score row (slices of different anatomy)
    healthy = [read_images(sorted((root / "imagesTr").glob(f"tr_{i}_*"))[:1])[0] for i in range(5)]
    tests = [read_images([root / "imagesTs" / f"ts_{i}_0000.nii.gz"])[0][:, 0] for i in range(3)]
    stats = fit_zscore_baseline(healthy, voxelwise=False)
    expected = evaluate_anomaly_maps([np.squeeze(zscore_map(image, stats)) for image in tests],
                                     [np.squeeze(read_label(root / "labelsTs" / f"ts_{i}.nii.gz")[0]) for i in range(3)],
                                     case_ids=[f"ts_{i}" for i in range(3)])
    assert summary["methods"]["zscore_baseline_global"]["pixel_auroc"] == pytest.approx(expected["pixel_auroc"])
    assert summary["methods"]["zscore_baseline_global"]["pixel_auroc"] != pytest.approx(baseline["pixel_auroc"])
    table = format_anomaly_table(summary)
    assert "| pred | 1.0000 |" in table and "| zscore_baseline |" in table and "| zscore_baseline_global |" in table


def test_folder_evaluation_of_strategy_subfolders_and_missing_map(tmp_path, rng):
    root = _anomaly_dataset(tmp_path / "Dataset001_Toy", rng)
    strategies = tmp_path / "strategies"
    strategies.mkdir()
    (root / "pred").rename(strategies / "anoddpm")
    (strategies / "anoddpm" / "ts_0_mask.nii.gz").unlink()  # no masks: the stored threshold is used
    json.dump({"strategies": {"anoddpm": {"threshold": 1.0, "method": "dice"}}},
              open(strategies / "anoddpm" / "anomaly_threshold.json", "w"))
    summary = evaluate_anomaly_folders(root / "labelsTs", strategies, dataset_json=root / "dataset.json",
                                       images_dir=tmp_path / "absent")
    row = summary["methods"]["anoddpm"]
    assert row["operating_point"] == "threshold" and row["threshold"] == 1.0 and row["dice_at_threshold"] == 1.0
    assert "zscore_baseline" in summary["skipped"] and "zscore_baseline" not in summary["methods"]
    (strategies / "anoddpm" / "ts_2.nii.gz").unlink()
    with pytest.raises(DatasetError, match="ts_2.nii.gz: anomaly map missing"):
        evaluate_anomaly_folders(root / "labelsTs", strategies / "anoddpm", dataset_json=root / "dataset.json")


def test_task_folder_dispatch(tmp_path, rng):
    from nndiff.evaluation.folders import evaluate_task_folders

    root = _anomaly_dataset(tmp_path / "Dataset001_Toy", rng)
    summary, table = evaluate_task_folders("anomaly_detection", root / "labelsTs", root / "pred",
                                           dataset_json=root / "dataset.json", output_file=tmp_path / "s.json")
    assert summary["task"] == "anomaly_detection" and (tmp_path / "s.json").is_file()
    assert table.splitlines()[3].startswith("| pred |") and "| zscore_baseline |" in table
    with pytest.raises(NnDiffError, match="segmentation datasets only"):
        evaluate_task_folders("anomaly_detection", root / "labelsTs", root / "pred",
                              dataset_json=root / "dataset.json", baseline=root / "pred")
    with pytest.raises(NnDiffError, match="not 'generation'"):
        evaluate_task_folders("generation", root / "labelsTs", root / "pred", dataset_json=root / "dataset.json")
