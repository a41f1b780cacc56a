"""Low-dose CT (Mayo layout) converter: DICOM series pairs in HU, geometry check, held-out patients."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nndiff.dataset import load_dataset, read_images, verify_integrity
from nndiff.dataset_conversion import lowdose_ct
from nndiff.errors import NnDiffError
from nndiff.run.plan_and_preprocess import plan_and_preprocess_entry
from nndiff.utils.files import load_json
from nndiff.utils.process_locale import preserves_locale


@preserves_locale  # GDCM's writer switches the C locale for the whole test worker
def _series(folder: Path, hu: np.ndarray, prefix: str, uid: str, spacing=(0.7, 0.7), z_step=3.0,
            origin=(-170.0, -160.0)) -> None:
    """A DICOM series as the Mayo .IMA files: int16 pixels stored as HU + 1024 with RescaleIntercept -1024."""
    folder.mkdir(parents=True)
    for z, plane in enumerate(hu):
        image = sitk.GetImageFromArray(plane[None].astype(np.int16))
        image.SetSpacing((*spacing, z_step))
        tags = {"0008|0060": "CT", "0020|000e": uid, "0008|0018": f"{uid}.{z + 1}", "0020|0013": str(z + 1),
                "0020|0032": f"{origin[0]}\\{origin[1]}\\{-z * z_step}", "0020|0037": "1\\0\\0\\0\\1\\0",
                "0018|0050": str(z_step), "0028|1052": "-1024", "0028|1053": "1"}
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetImageIO("GDCMImageIO")  # .IMA is not an ending SimpleITK maps to DICOM by itself
        writer.SetFileName(str(folder / f"{prefix}.CT.0001.{z + 1:04d}.2015.12.22.IMA"))
        writer.Execute(image)


def _patient(src: Path, patient: str, seed: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    full = np.full((4, 12, 12), -1000, np.int16)
    full[:, 3:9, 2:10] = rng.integers(-50, 300, (4, 6, 8))
    quarter = np.clip(full + rng.normal(0, 40, full.shape), -1024, 3000).astype(np.int16)
    _series(src / patient / "quarter_3mm", quarter, f"{patient}_QD_3_1", f"1.2.826.0.1.{seed}.1", **kw)
    _series(src / patient / "full_3mm", full, f"{patient}_FD_3_1", f"1.2.826.0.1.{seed}.2")
    return quarter, full


def test_mayo_pairs_in_hu(tmp_path):
    src = tmp_path / "LDCT"
    arrays = {p: _patient(src, p, n) for n, p in enumerate(["L067", "L096", "L109", "L506"])}
    folder = lowdose_ct.convert_lowdose_ct(src, tmp_path / "raw", 41, test_patients=["L506"])
    assert folder.name == "Dataset041_LowDoseCT3mm"
    dataset = load_dataset(folder)
    assert verify_integrity(dataset, full=True) == []
    assert dataset.task == "denoising" and dataset.json["target_names"] == {"0": "CT"}
    assert sorted(dataset.cases) == ["L067", "L096", "L109"] and sorted(dataset.test_cases) == ["L506"]
    assert dataset.subjects()["L096"] == "L096"
    noisy, props = read_images(dataset.cases["L096"].images)
    clean, _ = read_images(dataset.cases["L096"].targets)
    # Rescale applied: the files hold HU + 1024, the dataset HU (air -1000, not 24).
    # Slices were written head first (z decreasing): GDCM sorts them by position, so z is reversed.
    np.testing.assert_array_equal(noisy[0], arrays["L096"][0][::-1])
    np.testing.assert_array_equal(clean[0], arrays["L096"][1][::-1])
    assert clean.min() == -1000
    assert props.spacing == pytest.approx((3.0, 0.7, 0.7))
    assert props.origin == pytest.approx((-170.0, -160.0, -9.0))  # first slice of the sorted series
    assert load_json(folder / lowdose_ct.CONVERSION_RECORD)["thickness"] == "3mm"
    code = plan_and_preprocess_entry(["-d", "41", "--raw", str(tmp_path / "raw"),
                                      "--preprocessed", str(tmp_path / "pre"), "-np", "1"])
    assert code == 0
    assert (tmp_path / "pre" / folder.name / "nnDiffPlans.json").is_file()


def test_pair_with_different_geometry_is_refused(tmp_path, capsys):
    src = tmp_path / "LDCT"
    _patient(src, "L067", 0)
    _patient(src, "L143", 1, spacing=(0.8, 0.8))
    code = lowdose_ct.main(["-i", str(src), "-o", str(tmp_path / "raw"), "-d", "42", "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert "L143/quarter_3mm" in err and "full_3mm differ in geometry" in err and "spacing" in err
    assert not (tmp_path / "raw" / "Dataset042_LowDoseCT3mm").exists()


def test_bad_layouts(tmp_path):
    src = tmp_path / "LDCT"
    _patient(src, "L067", 0)
    (src / "L192" / "quarter_3mm").mkdir(parents=True)
    with pytest.raises(NnDiffError, match="L192: no full_3mm folder"):
        lowdose_ct.convert_lowdose_ct(src, tmp_path / "raw", 43)
    with pytest.raises(NnDiffError, match="no quarter_1mm/full_1mm.*3mm"):
        lowdose_ct.convert_lowdose_ct(src, tmp_path / "raw", 43, thickness="1mm")
    (src / "L192").rename(tmp_path / "L192")
    (src / "L067" / "full_1mm").mkdir()
    with pytest.raises(NnDiffError, match="several slice thicknesses"):
        lowdose_ct.convert_lowdose_ct(src, tmp_path / "raw", 43)
    with pytest.raises(NnDiffError, match="no DICOM series"):
        (src / "L067" / "quarter_1mm").mkdir()
        lowdose_ct.convert_lowdose_ct(src, tmp_path / "raw", 43, thickness="1mm")
    with pytest.raises(NnDiffError, match="not patients"):
        lowdose_ct.convert_lowdose_ct(src, tmp_path / "raw", 43, thickness="3mm", test_patients=["L999"])
