"""nndiff_export_submission: each format read back the way the challenge's evaluation reads it
(h5py keys/shapes/dtypes, SimpleITK label values and sizes, file names), manifests, user errors."""
import json
import zipfile

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from nndiff.dataset.examples import properties_2d, properties_3d
from nndiff.dataset.io import write_image
from nndiff.run.submission import MANIFEST, main


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _write(folder, name, array, props):
    folder.mkdir(parents=True, exist_ok=True)
    write_image(array[None], props, folder / name)


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def _manifest(out):
    return json.loads((out / MANIFEST).read_text(encoding="utf-8"))


def test_fastmri_h5_reconstruction_center_cropped(tmp_path, capsys, rng):
    pred = tmp_path / "pred"
    volume = rng.random((3, 330, 324)).astype(np.float32)
    _write(pred, "file1000000.nii.gz", volume, properties_3d((3.0, 0.5, 0.5), volume.shape))
    _write(pred, "file1000000_std.nii.gz", volume, properties_3d((3.0, 0.5, 0.5), volume.shape))  # not packed
    (pred / "prediction_info.json").write_text(json.dumps({"seed": 5, "plans_sha256": "abc"}))
    code, err = _run(["-i", pred, "-o", tmp_path / "sub", "--format", "fastmri"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["file1000000.h5", MANIFEST]
    with h5py.File(tmp_path / "sub" / "file1000000.h5", "r") as f:
        assert list(f.keys()) == ["reconstruction"]
        recon = f["reconstruction"][()]
    assert recon.shape == (3, 320, 320) and recon.dtype == np.float32
    np.testing.assert_array_equal(recon, volume[:, 5:325, 2:322])
    manifest = _manifest(tmp_path / "sub")
    assert manifest["prediction_info"] == {"seed": 5, "plans_sha256": "abc"}
    assert set(manifest["files"]) == {"file1000000.h5"} and manifest["versions"]["nndiff"]
    assert "--format fastmri" in manifest["command"]


def test_fastmri_refuses_small_slices(tmp_path, capsys):
    pred = tmp_path / "pred"
    _write(pred, "file1.nii.gz", np.zeros((2, 300, 320), np.float32), properties_3d((1.0, 1.0, 1.0), (2, 300, 320)))
    code, err = _run(["-i", pred, "-o", tmp_path / "sub", "--format", "fastmri"], capsys)
    assert code == 2 and "file1.nii.gz" in err and "smaller than the fastMRI crop 320x320" in err
    assert not (tmp_path / "sub").exists() and not (tmp_path / ".sub.partial").exists()


BRATS_LABELS = {"background": 0, "edema": 1, "necrosis": 2, "enhancing tumour": 3}
BRATS_REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


def _brats_prediction(tmp_path, name="BraTS-GLI-00012-000"):
    labels = np.zeros((155, 240, 240), np.uint8)
    labels[70:80, 100:120, 100:120] = 1
    labels[72:78, 105:115, 105:115] = 2
    labels[74:76, 108:112, 108:112] = 3
    _write(tmp_path / "pred", f"{name}.nii.gz", labels, properties_3d((1.0, 1.0, 1.0), labels.shape, dtype="uint8"))
    return labels


@pytest.mark.parametrize("year, labels_json, et", [(2023, BRATS_LABELS, 3), (2021, BRATS_REGIONS, 4)])
def test_brats_label_values_and_names(tmp_path, capsys, year, labels_json, et):
    name = "BraTS-GLI-00012-000" if year == 2023 else "BraTS2021_00012"
    labels = _brats_prediction(tmp_path, name)
    dataset = {"labels": labels_json, "task": "segmentation"}
    if year == 2021:
        dataset["regions_class_order"] = [1, 2, 3]
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    code, err = _run(["-i", tmp_path / "pred", "-o", tmp_path / "sub", "--format", "brats", "--year", year,
                      "--dataset_json", tmp_path / "dataset.json"], capsys)
    assert code == 0, err
    image = sitk.ReadImage(str(tmp_path / "sub" / f"{name}.nii.gz"))
    assert image.GetSize() == (240, 240, 155)
    out = sitk.GetArrayFromImage(image)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1, 2, et}
    # nnDiff 1 = edema -> BraTS 2 (ED), 2 = necrosis -> 1 (NCR), 3 = enhancing -> ET
    for ours, brats in ((0, 0), (1, 2), (2, 1), (3, et)):
        assert np.all(out[labels == ours] == brats)


def test_brats_errors(tmp_path, capsys):
    _brats_prediction(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": BRATS_LABELS}))
    argv = ["-i", tmp_path / "pred", "-o", tmp_path / "sub", "--format", "brats"]
    code, err = _run(argv, capsys)
    assert code == 2 and "needs --dataset_json" in err
    code, err = _run(argv + ["--dataset_json", tmp_path / "dataset.json", "--year", "2021"], capsys)
    assert code == 2 and "'BraTS-GLI-00012-000' is not a BraTS 2021 id" in err
    probabilities = np.full((155, 240, 240), 0.5, np.float32)
    _write(tmp_path / "pred", "BraTS-GLI-00012-000.nii.gz", probabilities,
           properties_3d((1.0, 1.0, 1.0), probabilities.shape, dtype="float32"))
    code, err = _run(argv + ["--dataset_json", tmp_path / "dataset.json"], capsys)
    assert code == 2 and "BraTS-GLI-00012-000.nii.gz" in err and "non-integer values" in err


def test_synthrad_mha_in_hu(tmp_path, capsys, rng):
    sct = rng.uniform(-1500, 3500, size=(6, 10, 12)).astype(np.float32)
    props = properties_3d((2.5, 1.0, 1.0), sct.shape, dtype="float32")
    _write(tmp_path / "pred", "1BA001.nii.gz", sct, props)
    _write(tmp_path / "pred", "2PC017.nii.gz", sct, props)
    code, err = _run(["-i", tmp_path / "pred", "-o", tmp_path / "sub", "--format", "synthrad"], capsys)
    assert code == 0, err
    folder = tmp_path / "sub" / "images" / "synthetic-ct"
    assert sorted(p.name for p in folder.iterdir()) == ["1BA001.mha", "2PC017.mha"]
    image = sitk.ReadImage(str(folder / "1BA001.mha"))
    out = sitk.GetArrayFromImage(image)
    assert out.dtype == np.float32 and out.shape == sct.shape
    np.testing.assert_allclose(out, np.clip(sct, -1024, 3000))
    assert image.GetSpacing() == pytest.approx((1.0, 1.0, 2.5))
    assert set(_manifest(tmp_path / "sub")["files"]) == {"images/synthetic-ct/1BA001.mha",
                                                          "images/synthetic-ct/2PC017.mha"}
    _write(tmp_path / "pred2", "patient7.nii.gz", sct, props)
    code, err = _run(["-i", tmp_path / "pred2", "-o", tmp_path / "sub2", "--format", "synthrad"], capsys)
    assert code == 2 and "'patient7' is not a SynthRAD patient id" in err


def test_msd_task_folder_and_labels(tmp_path, capsys):
    labels = np.zeros((8, 10, 12), np.uint8)
    labels[2:5, 3:6, 4:8] = 1
    labels[3, 4, 5] = 2
    _write(tmp_path / "pred", "hippocampus_005.nii.gz", labels, properties_3d((1.0, 1.0, 1.0), labels.shape,
                                                                               dtype="uint8"))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "Anterior": 1, "Posterior": 2}}))
    argv = ["-i", tmp_path / "pred", "--format", "msd", "--dataset_json", tmp_path / "dataset.json"]
    code, err = _run(argv + ["-o", tmp_path / "sub", "--task", "Task04_Hippocampus"], capsys)
    assert code == 0, err
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "sub" / "Task04_Hippocampus" /
                                                    "hippocampus_005.nii.gz")))
    np.testing.assert_array_equal(out, labels)
    code, err = _run(argv + ["-o", tmp_path / "sub2", "--task", "Task09_Spleen"], capsys)
    assert code == 2 and "not a Task09_Spleen case name (spleen_NNN)" in err
    code, err = _run(argv + ["-o", tmp_path / "sub3", "--task", "Hippocampus"], capsys)
    assert code == 2 and "not an MSD task folder name" in err


def test_generic_zip_and_non_empty_output(tmp_path, capsys):
    pred = tmp_path / "pred"
    _write(pred, "sample_0000.png", np.zeros((1, 8, 8), np.uint8), properties_2d(shape=(8, 8)))
    (pred / "prediction_info.json").write_text("{}")
    code, err = _run(["-i", pred, "-o", tmp_path / "sub", "--format", "generic"], capsys)
    assert code == 0, err
    with zipfile.ZipFile(tmp_path / "sub" / "predictions.zip") as archive:
        assert sorted(archive.namelist()) == ["prediction_info.json", "sample_0000.png"]
    code, err = _run(["-i", pred, "-o", tmp_path / "sub", "--format", "generic"], capsys)
    assert code == 2 and "is not empty" in err
