"""nnU-Net v2 raw dataset -> nnDiff: task added, subjects, files copied unchanged, regions kept."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nndiff.dataset import load_dataset, read_label, verify_integrity
from nndiff.dataset.examples import properties_3d
from nndiff.dataset.io import write_image
from nndiff.dataset_conversion import nnunet
from nndiff.errors import DatasetError, NnDiffError
from nndiff.run.plan_and_preprocess import plan_and_preprocess_entry

SHAPE = (8, 12, 10)
CASES = ("pat01_scan1", "pat01_scan2", "pat02_scan1", "pat03_scan1")


def make_nnunet_dataset(root: Path) -> Path:
    """Dataset004_Hippocampus as nnU-Net v2 expects it: two channels, region labels, a test case."""
    folder = root / "Dataset004_Hippocampus"
    props = properties_3d((2.0, 1.0, 1.0), SHAPE)
    rng = np.random.default_rng(1)
    for i, case in enumerate(CASES + ("pat09_test",)):
        split = "Ts" if case == "pat09_test" else "Tr"
        for c in range(2):
            write_image(rng.normal(50.0 + 20 * c, 4.0, (1,) + SHAPE).astype(np.float32), props,
                        folder / f"images{split}" / f"{case}_{c:04d}.nii.gz")
        label = np.zeros((1,) + SHAPE, np.uint8)
        if i != 1:  # pat01_scan2: nothing segmented (healthy for anomaly detection)
            label[0, 2:6, 3:8, 3:7] = 1
            label[0, 3:5, 4:6, 4:6] = 2
        write_image(label, props, folder / f"labels{split}" / f"{case}.nii.gz")
    meta = {"channel_names": {"0": "T1", "1": "T2"},
            "labels": {"background": 0, "hippocampus": [1, 2], "anterior": 2},
            "regions_class_order": [1, 2], "numTraining": len(CASES), "file_ending": ".nii.gz",
            "name": "Hippocampus", "reference": "nnU-Net replica", "overwrite_image_reader_writer": "SimpleITKIO"}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_nnunet_dataset(tmp_path_factory.mktemp("nnunet"))


def test_segmentation_copy_keeps_files_regions_and_groups_subjects(source, tmp_path):
    argv = ["-i", str(source), "-o", str(tmp_path / "raw"), "-d", "31", "--subject_regex", r"^(pat\d+)_", "-q"]
    assert nnunet.main(argv) == 0
    folder = tmp_path / "raw" / "Dataset031_Hippocampus"
    dataset = load_dataset(folder)
    assert verify_integrity(dataset, full=True) == []
    assert dataset.task == "segmentation"
    assert dataset.labels == {"background": 0, "hippocampus": [1, 2], "anterior": 2}
    assert dataset.json["regions_class_order"] == [1, 2]
    assert "overwrite_image_reader_writer" not in dataset.json
    assert dataset.subjects() == {"pat01_scan1": "pat01", "pat01_scan2": "pat01", "pat02_scan1": "pat02",
                                  "pat03_scan1": "pat03"}
    assert list(dataset.test_cases) == ["pat09_test"] and (folder / "labelsTs" / "pat09_test.nii.gz").is_file()
    for case in CASES:  # byte-identical copies
        for c in range(2):
            name = f"{case}_{c:04d}.nii.gz"
            assert (folder / "imagesTr" / name).read_bytes() == (source / "imagesTr" / name).read_bytes()
    roots = ["--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pre"), "-q"]
    assert plan_and_preprocess_entry(["-d", "31", "-c", "3d_fullres", *roots]) == 0
    assert (tmp_path / "pre" / folder.name / "nnDiffPlans.json").is_file()


def test_generation_and_anomaly_detection(source, tmp_path):
    generation = load_dataset(nnunet.convert_nnunet(source, tmp_path, 32, task="generation"))
    assert generation.labels is None and "regions_class_order" not in generation.json
    assert not (generation.root / "labelsTr").exists()
    assert generation.subjects()["pat01_scan2"] == "pat01_scan2"  # default: the case id
    anomaly = load_dataset(nnunet.convert_nnunet(source, tmp_path, 33, task="anomaly_detection", name="HippoAD"))
    assert anomaly.healthy() == {"pat01_scan1": False, "pat01_scan2": True, "pat02_scan1": False,
                                 "pat03_scan1": False}
    label, _ = read_label(anomaly.cases["pat02_scan1"].label)
    assert label.max() == 2


def test_listing_form_is_resolved_into_the_standard_folders(tmp_path):
    source = make_nnunet_dataset(tmp_path / "src")
    (source / "imagesTr").rename(source / "images")
    (source / "labelsTr").rename(source / "labels")
    meta = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    meta["dataset"] = {case: {"images": [f"images/{case}_0000.nii.gz", f"images/{case}_0001.nii.gz"],
                              "label": f"labels/{case}.nii.gz"} for case in CASES}
    (source / "dataset.json").write_text(json.dumps(meta))
    dataset = load_dataset(nnunet.convert_nnunet(source, tmp_path / "raw", 34))
    assert "dataset" not in dataset.json
    assert sorted(dataset.cases) == sorted(CASES) and dataset.cases["pat01_scan1"].label.is_file()


def test_bad_sources_fail_clearly(source, tmp_path):
    with pytest.raises(NnDiffError, match="dataset.json does not exist"):
        nnunet.convert_nnunet(tmp_path, tmp_path / "raw", 35)
    broken = make_nnunet_dataset(tmp_path / "broken")
    (broken / "labelsTr" / "pat02_scan1.nii.gz").unlink()
    with pytest.raises(DatasetError, match="pat02_scan1"):
        nnunet.convert_nnunet(broken, tmp_path / "raw", 35)
    assert not (tmp_path / "raw" / "Dataset035_Hippocampus").exists()
    with pytest.raises(NnDiffError, match="not a valid regular expression"):
        nnunet.convert_nnunet(source, tmp_path / "raw", 36, subject_regex="(pat")
