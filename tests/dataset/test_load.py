"""load_dataset / find_dataset_folder on valid datasets: what a RawDataset holds."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from nndiff.dataset import (
    EXAMPLE_KINDS,
    find_dataset_folder,
    load_dataset,
    make_example_dataset,
    read_images,
    verify_integrity,
)
from nndiff.diffusion.options import TaskFamily
from nndiff.errors import DatasetError

EXPECTED_TASK = {
    "2d_grey_png": "generation", "2d_rgb_png": "generation", "3d_ct": "generation",
    "3d_mr": "generation", "nnunet_seg": "segmentation", "complex_npy": "reconstruction",
    "translation": "translation", "anomaly_2d": "anomaly_detection", "denoising_2d": "denoising",
    "conditional_2d": "generation",
}


@pytest.mark.parametrize("kind", EXAMPLE_KINDS)
def test_every_example_loads_and_passes_full_check(kind: str, tmp_path: Path) -> None:
    folder = make_example_dataset(kind, tmp_path, 12, num_cases=3)
    ds = load_dataset(folder)
    assert ds.task == TaskFamily(EXPECTED_TASK[kind])
    assert sorted(ds.cases) == ["case_000", "case_001", "case_002"]
    assert ds.dataset_id == 12 and ds.name == folder.name
    assert verify_integrity(ds, full=True) == []
    for case in ds.cases.values():
        assert len(case.images) == ds.files_per_case
        assert len(case.targets) == ds.num_targets


def test_rgb_exception(tmp_path: Path) -> None:
    ds = load_dataset(make_example_dataset("2d_rgb_png", tmp_path, 2, num_cases=2))
    assert ds.is_rgb and ds.num_channels == 3 and ds.files_per_case == 1
    arr, _ = read_images(ds.cases["case_000"].images)
    assert arr.shape[0] == ds.num_channels


def test_nnunet_v2_dataset_fields(tmp_path: Path) -> None:
    ds = load_dataset(make_example_dataset("nnunet_seg", tmp_path, 5, num_cases=3))
    assert ds.channel_names == {"0": "T2", "1": "ADC"}
    assert ds.label_values() == {0, 1, 2}
    case = ds.cases["case_001"]
    assert [p.name for p in case.images] == ["case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    assert case.label is not None and case.label.name == "case_001.nii.gz"
    assert list(ds.test_cases) == ["case_003"] and ds.test_cases["case_003"].label is not None


def test_translation_targets(tmp_path: Path) -> None:
    ds = load_dataset(make_example_dataset("translation", tmp_path, 7, num_cases=2))
    assert ds.target_names == {"0": "CT"}
    assert ds.cases["case_000"].targets[0].parent.name == "targetsTr"


def test_subjects_and_healthy_from_metadata(tmp_path: Path) -> None:
    ds = load_dataset(make_example_dataset("2d_grey_png", tmp_path, 1, num_cases=4))
    assert ds.subjects() == {"case_000": "subject_00", "case_001": "subject_00",
                             "case_002": "subject_01", "case_003": "subject_01"}
    ds = load_dataset(make_example_dataset("anomaly_2d", tmp_path, 8, num_cases=4))
    assert ds.healthy() == {"case_000": True, "case_001": False, "case_002": True, "case_003": False}
    assert ds.cases["case_000"].label is None and ds.cases["case_001"].label is not None


def test_conditions_long_form(tmp_path: Path) -> None:
    ds = load_dataset(make_example_dataset("conditional_2d", tmp_path, 10, num_cases=2))
    assert ds.conditions == {"shape": {"type": "categorical", "values": ["disk", "square"]},
                             "size": {"type": "continuous"}}
    assert ds.metadata["case_001"]["shape"] == "square"


def test_blocks_are_exposed(tmp_path: Path) -> None:
    ds = load_dataset(make_example_dataset("complex_npy", tmp_path, 6, num_cases=2))
    assert ds.reconstruction is not None and ds.reconstruction["operator"] == "mri_cartesian"
    ds = load_dataset(make_example_dataset("denoising_2d", tmp_path, 9, num_cases=2))
    assert ds.degradation == {"type": "gaussian", "level": 0.1}


def test_explicit_dataset_listing(tmp_path: Path) -> None:
    """nnU-Net v2's "dataset" key lists files explicitly (relative to the dataset folder)."""
    folder = make_example_dataset("nnunet_seg", tmp_path, 5, num_cases=2)
    (folder / "elsewhere").mkdir()
    for name in ("case_000_0000.nii.gz", "case_000_0001.nii.gz"):
        (folder / "imagesTr" / name).rename(folder / "elsewhere" / name)
    data = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    data["numTraining"] = 1
    data["dataset"] = {"x": {"images": ["elsewhere/case_000_0000.nii.gz", "elsewhere/case_000_0001.nii.gz"],
                             "label": "labelsTr/case_000.nii.gz"}}
    (folder / "dataset.json").write_text(json.dumps(data))
    ds = load_dataset(folder)
    assert list(ds.cases) == ["x"] and ds.cases["x"].images[1].name == "case_000_0001.nii.gz"
    verify_integrity(ds, full=True)


def test_overwrite_reader_and_unknown_keys_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = make_example_dataset("3d_mr", tmp_path, 4, num_cases=2)
    data = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    data["overwrite_image_reader_writer"] = "SimpleITKIO"
    data["chanel_names"] = {"0": "x"}
    (folder / "dataset.json").write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="nndiff.dataset"):
        load_dataset(folder)
    assert "overwrite_image_reader_writer" in caplog.text and "ignored" in caplog.text
    assert "chanel_names" in caplog.text


def test_legacy_modality_key(tmp_path: Path) -> None:
    folder = make_example_dataset("3d_mr", tmp_path, 4, num_cases=2)
    data = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    data["modality"] = data.pop("channel_names")
    (folder / "dataset.json").write_text(json.dumps(data))
    assert load_dataset(folder).channel_names == {"0": "T1"}


def test_allow_missing_channels(tmp_path: Path) -> None:
    folder = make_example_dataset("nnunet_seg", tmp_path, 5, num_cases=2)
    (folder / "imagesTr" / "case_001_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match="case_001_0001.nii.gz: is missing"):
        load_dataset(folder)
    data = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    data["allow_missing_channels"] = True
    (folder / "dataset.json").write_text(json.dumps(data))
    ds = load_dataset(folder)
    assert ds.cases["case_001"].images[1] is None
    verify_integrity(ds, full=True)


def test_hidden_files_and_sidecars_are_not_cases(tmp_path: Path) -> None:
    folder = make_example_dataset("complex_npy", tmp_path, 6, num_cases=2)
    (folder / "imagesTr" / ".DS_Store").write_text("x")
    assert sorted(load_dataset(folder).cases) == ["case_000", "case_001"]


@pytest.mark.parametrize("spec", ["3", 3, "003", "Dataset003", "Dataset003_CT3D"])
def test_find_dataset_folder(spec: object, tmp_path: Path) -> None:
    folder = make_example_dataset("3d_ct", tmp_path, 3, num_cases=1)
    make_example_dataset("3d_mr", tmp_path, 4, num_cases=1)
    assert find_dataset_folder(tmp_path, spec) == folder  # type: ignore[arg-type]


def test_find_dataset_folder_errors(tmp_path: Path) -> None:
    make_example_dataset("3d_ct", tmp_path, 3, num_cases=1)
    with pytest.raises(DatasetError) as err:
        find_dataset_folder(tmp_path, 7)
    assert "no dataset with id 7" in str(err.value) and "Dataset003_CT3D" in str(err.value)
    make_example_dataset("3d_mr", tmp_path, 3, num_cases=1, name="Other")
    with pytest.raises(DatasetError) as err:
        find_dataset_folder(tmp_path, "3")
    assert "several datasets with id 3" in str(err.value) and "Dataset003_Other" in str(err.value)
    assert find_dataset_folder(tmp_path, "Dataset003_Other").name == "Dataset003_Other"
    with pytest.raises(DatasetError, match="does not exist"):
        find_dataset_folder(tmp_path / "nope", 3)
    with pytest.raises(DatasetError, match="neither an id"):
        find_dataset_folder(tmp_path, "banana")


def test_loading_writes_nothing(tmp_path: Path) -> None:
    folder = make_example_dataset("translation", tmp_path, 7, num_cases=2)
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    verify_integrity(load_dataset(folder), full=True, num_processes=2)
    after = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    assert before == after
    assert np.isfinite(read_images(load_dataset(folder).cases["case_000"].targets)[0]).all()
