"""MSD conversion on a tiny replica of a Decathlon task folder (4D NIfTI, MSD dataset.json)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nndiff.dataset import load_dataset, read_images, read_label, verify_integrity
from nndiff.dataset_conversion import msd
from nndiff.errors import NnDiffError
from nndiff.run.plan_and_preprocess import plan_and_preprocess_entry
from nndiff.utils.files import load_json

SHAPE = (8, 12, 10)  # (Z, Y, X)
SPACING_XYZ = (0.9, 1.1, 2.5)
ORIGIN_XYZ = (-10.0, 5.0, 30.0)
MODALITY = {"0": "FLAIR", "1": "T1w", "2": "T2w"}


def _write_4d(path: Path, channels: np.ndarray) -> None:
    """(C, Z, Y, X) -> 4D NIfTI (x, y, z, c), as the MSD archives store multi-modal images."""
    image = sitk.JoinSeries([sitk.GetImageFromArray(c) for c in channels])  # 4D scalar image
    image.SetSpacing(SPACING_XYZ + (1.0,))
    image.SetOrigin(ORIGIN_XYZ + (0.0,))
    sitk.WriteImage(image, str(path))


def _write_label(path: Path, label: np.ndarray) -> None:
    image = sitk.GetImageFromArray(label.astype(np.uint8))
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN_XYZ)
    sitk.WriteImage(image, str(path))


def make_msd_task(root: Path, num_train: int = 4) -> Path:
    task = root / "Task01_BrainTumour"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    training = []
    for i in range(num_train):
        case = f"BRATS_{i + 1:03d}"
        image = rng.normal(100.0 + 10 * np.arange(3)[:, None, None, None], 5.0, (3,) + SHAPE).astype(np.float32)
        label = np.zeros(SHAPE, np.uint8)
        if i > 0:  # case 1 has no lesion: it is the healthy one for anomaly detection
            label[2:5, 3:7, 2:6] = 1
            label[3, 4:6, 3:5] = 3
            label[2, 3, 2] = 2
        _write_4d(task / "imagesTr" / f"{case}.nii.gz", image)
        _write_label(task / "labelsTr" / f"{case}.nii.gz", label)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    _write_4d(task / "imagesTs" / "BRATS_485.nii.gz", rng.normal(100, 5, (3,) + SHAPE).astype(np.float32))
    (task / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork")  # as in the archives
    meta = {"name": "BRATS", "description": "tiny replica", "reference": "MSD", "licence": "CC-BY-SA 4.0",
            "tensorImageSize": "4D", "modality": MODALITY,
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "numTraining": num_train, "numTest": 1, "training": training, "test": ["./imagesTs/BRATS_485.nii.gz"]}
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_msd_task(tmp_path_factory.mktemp("msd"))


def test_segmentation_conversion_splits_channels_keeps_geometry_and_plans(source, tmp_path):
    assert msd.main(["-i", str(source), "-o", str(tmp_path / "raw"), "-d", "21", "-q"]) == 0
    folder = tmp_path / "raw" / "Dataset021_BrainTumour"
    dataset = load_dataset(folder)
    assert verify_integrity(dataset, full=True) == []
    assert dataset.task == "segmentation"
    assert dataset.channel_names == MODALITY
    assert dataset.labels == {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
    assert sorted(dataset.cases) == ["BRATS_001", "BRATS_002", "BRATS_003", "BRATS_004"]
    assert list(dataset.test_cases) == ["BRATS_485"]
    assert dataset.subjects()["BRATS_002"] == "BRATS_002"
    image, props = read_images(dataset.cases["BRATS_002"].images)
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "imagesTr" / "BRATS_002.nii.gz")))
    np.testing.assert_array_equal(image, original)  # channel c of the 4D file is _000c
    assert props.spacing == pytest.approx(tuple(reversed(SPACING_XYZ)))
    assert props.origin == pytest.approx(ORIGIN_XYZ)
    label, _ = read_label(dataset.cases["BRATS_002"].label)
    assert set(np.unique(label).tolist()) == {0, 1, 2, 3}
    roots = ["--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pre"), "-q"]
    assert plan_and_preprocess_entry(["-d", "21", "-c", "3d_fullres", *roots]) == 0
    assert (tmp_path / "pre" / folder.name / "nnDiffPlans.json").is_file()


def test_generation_drops_labels_and_anomaly_marks_healthy_cases(source, tmp_path):
    generation = msd.convert_msd(source, tmp_path, 22, task="generation")
    dataset = load_dataset(generation)
    assert dataset.task == "generation" and dataset.labels is None
    assert not (generation / "labelsTr").exists()
    anomaly = msd.convert_msd(source, tmp_path, 23, task="anomaly_detection", name="BraTSAnomaly")
    dataset = load_dataset(anomaly)
    assert anomaly.name == "Dataset023_BraTSAnomaly"
    assert dataset.healthy() == {"BRATS_001": True, "BRATS_002": False, "BRATS_003": False, "BRATS_004": False}
    assert verify_integrity(dataset, full=True) == []


def test_label_and_name_helpers():
    assert msd.nnunet_v2_labels({"1": "tumour", "0": "bg", "2": "tumour"}) == {"background": 0, "tumour": 1,
                                                                                "tumour_2": 2}
    assert msd.default_name(Path("Task05_Prostate")) == "Prostate"
    with pytest.raises(NnDiffError, match="not 0..1"):
        msd.channel_names_from_modality({"0": "CT", "2": "PET"})


def test_missing_dataset_json_and_channel_mismatch_are_clear(source, tmp_path, capsys):
    empty = tmp_path / "Task09_Spleen"
    empty.mkdir()
    assert msd.main(["-i", str(empty), "-o", str(tmp_path / "raw"), "-d", "24"]) == 2
    err = capsys.readouterr().err
    assert "Task09_Spleen/dataset.json does not exist" in err and "TaskXX_Name" in err
    broken = make_msd_task(tmp_path / "broken", num_train=1)
    meta = load_json(broken / "dataset.json")
    meta["modality"] = {"0": "FLAIR", "1": "T1w"}
    (broken / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(NnDiffError, match=r"BRATS_001.nii.gz: 3 channel\(s\) but dataset.json 'modality' names 2"):
        msd.convert_msd(broken, tmp_path / "raw", 25)
    assert not (tmp_path / "raw" / "Dataset025_BrainTumour").exists()
    (broken / "labelsTr" / "BRATS_001.nii.gz").unlink()
    with pytest.raises(NnDiffError, match="labelsTr/BRATS_001.nii.gz does not exist"):
        msd.convert_msd(broken, tmp_path / "raw", 25)
