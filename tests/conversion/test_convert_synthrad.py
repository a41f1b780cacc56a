"""SynthRAD2023 converter: MR/CBCT -> CT pairs in HU, masks kept, patients without CT, bad grids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nndiff.dataset import load_dataset, read_images, read_label, verify_integrity
from nndiff.dataset_conversion import synthrad
from nndiff.errors import NnDiffError
from nndiff.run.plan_and_preprocess import plan_and_preprocess_entry
from nndiff.utils.files import load_json

SPACING = (1.0, 1.0, 2.5)  # SimpleITK order (x, y, z)


def _write(path: Path, array: np.ndarray, spacing=SPACING) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-20.0, -30.0, 40.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _patient(folder: Path, seed: int, modality: str = "mr", with_ct: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (6, 12, 12)
    mask = np.zeros(shape, np.uint8)
    mask[:, 2:10, 3:11] = 1
    ct = np.where(mask > 0, rng.integers(-100, 1200, shape), -1024).astype(np.int16)  # HU, as released
    image = (mask * rng.uniform(50, 500, shape)).astype(np.float32)
    _write(folder / f"{modality}.nii.gz", image)
    _write(folder / "mask.nii.gz", mask)
    if with_ct:
        _write(folder / "ct.nii.gz", ct)
    return {"image": image, "ct": ct, "mask": mask}


def test_task1_mr_to_ct(tmp_path):
    task1 = tmp_path / "Task1"
    arrays = {pid: _patient(task1 / anatomy / pid, n) for n, (anatomy, pid) in enumerate(
        [("brain", "1BA001"), ("brain", "1BA005"), ("pelvis", "1PA001"), ("pelvis", "1PC004")])}
    folder = synthrad.convert_synthrad(task1, tmp_path / "raw", 31)
    assert folder.name == "Dataset031_SynthRAD2023MRtoCT"
    dataset = load_dataset(folder)
    assert verify_integrity(dataset, full=True) == []
    assert dataset.json["channel_names"] == {"0": "MR"} and dataset.json["target_names"] == {"0": "CT"}
    assert sorted(dataset.cases) == sorted(arrays)
    metadata = load_json(folder / "metadata.json")
    assert metadata["1PA001"] == {"subject": "1PA001", "anatomy": "pelvis", "body_mask": "masksTr/1PA001.nii.gz"}
    target, props = read_images(dataset.cases["1BA005"].targets)
    np.testing.assert_array_equal(target[0], arrays["1BA005"]["ct"])  # HU unchanged
    assert target.min() == -1024
    assert props.spacing == pytest.approx((2.5, 1.0, 1.0)) and props.origin == pytest.approx((-20.0, -30.0, 40.0))
    mask, _ = read_label(folder / metadata["1BA001"]["body_mask"])
    np.testing.assert_array_equal(mask[0], arrays["1BA001"]["mask"])
    code = plan_and_preprocess_entry(["-d", "31", "--raw", str(tmp_path / "raw"),
                                      "--preprocessed", str(tmp_path / "pre"), "-np", "1"])
    assert code == 0
    plans = load_json(tmp_path / "pre" / folder.name / "nnDiffPlans.json")
    assert plans["normalization"]["targets"][0]["scheme"] != plans["normalization"]["images"][0]["scheme"]


def test_task2_cbct_and_patients_without_ct(tmp_path, capsys):
    task2 = tmp_path / "Task2"
    _patient(task2 / "pelvis" / "2PA001", 0, "cbct")
    _patient(task2 / "pelvis" / "2PA002", 1, "cbct")
    _patient(task2 / "brain" / "2BA010", 2, "cbct", with_ct=False)
    with pytest.raises(NnDiffError, match="2BA010 has no ct.nii.gz.*--no_ct_to_test"):
        synthrad.convert_synthrad(task2, tmp_path / "raw", 32)
    assert not (tmp_path / "raw" / "Dataset032_SynthRAD2023CBCTtoCT").exists()
    assert synthrad.main(["-i", str(task2), "-o", str(tmp_path / "raw"), "-d", "32", "--no_ct_to_test", "-q"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    dataset = load_dataset(folder)
    assert dataset.json["channel_names"] == {"0": "CBCT"}
    assert sorted(dataset.cases) == ["2PA001", "2PA002"] and sorted(dataset.test_cases) == ["2BA010"]
    assert (folder / "masksTs" / "2BA010.nii.gz").is_file()


def test_bad_inputs(tmp_path):
    task1 = tmp_path / "Task1"
    _patient(task1 / "brain" / "1BA001", 0)
    _write(task1 / "brain" / "1BA001" / "ct.nii.gz", np.zeros((6, 12, 12), np.int16), spacing=(1.0, 1.0, 3.0))
    with pytest.raises(NnDiffError, match="ct.nii.gz: not on the grid.*spacing"):
        synthrad.convert_synthrad(task1, tmp_path / "raw", 33)
    _patient(task1 / "brain" / "2BA001", 1, "cbct")
    with pytest.raises(NnDiffError, match="both mr.nii.gz and cbct.nii.gz"):
        synthrad.convert_synthrad(task1, tmp_path / "raw", 33)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NnDiffError, match="no mr.nii.gz or cbct.nii.gz"):
        synthrad.convert_synthrad(tmp_path / "empty", tmp_path / "raw", 33)
