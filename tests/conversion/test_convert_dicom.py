"""DICOM series -> NIfTI cases: geometry, PatientID subjects, Modality channel name, clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nndiff.dataset import load_dataset, read_images, verify_integrity
from nndiff.dataset_conversion import dicom
from nndiff.errors import NnDiffError
from nndiff.run.plan_and_preprocess import plan_and_preprocess_entry
from nndiff.utils.process_locale import preserves_locale

SHAPE = (8, 12, 10)  # (Z, Y, X)
SPACING = (0.8, 0.7, 2.5)  # SimpleITK order x, y, z
ORIGIN = (-40.0, 12.5, 100.0)


@preserves_locale  # GDCM's writer switches the C locale for the whole test worker
def write_series(folder: Path, patient: str, modality: str, uid: str, number: int, seed: int,
                 skip_slice: int | None = None) -> np.ndarray:
    """One series, one file per slice, with the tags a scanner writes (positions, orientation, ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.random.default_rng(seed).integers(-200, 800, SHAPE).astype(np.int16)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(SHAPE[0]):
        if z == skip_slice:
            continue
        slice_image = image[:, :, z]
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {"0010|0020": patient, "0008|0060": modality, "0020|000d": f"1.2.826.0.1.{seed}",
                "0020|000e": uid, "0020|0011": str(number), "0008|103e": f"{modality} series {number}",
                "0020|0032": "\\".join(f"{v:.4f}" for v in position), "0020|0037": "1\\0\\0\\0\\1\\0",
                "0020|0013": str(z + 1), "0018|0050": str(SPACING[2]),
                "0008|0018": f"{uid}.{z + 1}"}
        for key, value in tags.items():
            slice_image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"S{number:02d}IM{z:04d}.dcm"))
        writer.Execute(slice_image)
    return volume


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("dicom") / "export"
    volumes = {  # case id -> voxels
        "P001_00": write_series(root / "P001" / "study" / "mixed", "P001", "CT", "1.2.826.0.1.1.1", 2, 1),
        "P001_01": write_series(root / "P001" / "study" / "mixed", "P001", "CT", "1.2.826.0.1.1.2", 5, 2),
        "P002_00": write_series(root / "P002" / "a" / "b" / "c", "P002", "CT", "1.2.826.0.1.2.1", 1, 3),
        "P-003_00": write_series(root / "P003", "P^003", "CT", "1.2.826.0.1.3.1", 1, 4),
    }
    write_series(root / "P004" / "mr", "P004", "MR", "1.2.826.0.1.4.1", 1, 5)
    return root, volumes


def test_series_become_cases_with_geometry_subjects_and_channel_name(source, tmp_path):
    root, volumes = source
    argv = ["-i", str(root), "-o", str(tmp_path / "raw"), "-d", "51", "--modality", "CT", "-q"]
    assert dicom.main(argv) == 0
    folder = tmp_path / "raw" / "Dataset051_DICOMCT"
    dataset = load_dataset(folder)
    assert verify_integrity(dataset, full=True) == []
    assert dataset.task == "generation" and dataset.channel_names == {"0": "CT"}
    # Two series in one folder are two cases; '^' (DICOM name separator) is not kept in case ids.
    assert sorted(dataset.cases) == ["P-003_00", "P001_00", "P001_01", "P002_00"]
    assert dataset.subjects() == {"P001_00": "P001", "P001_01": "P001", "P002_00": "P002", "P-003_00": "P^003"}
    assert dataset.metadata["P001_01"]["series_instance_uid"] == "1.2.826.0.1.1.2"
    assert dataset.metadata["P002_00"]["source"] == "P002/a/b/c"
    for case_id, volume in volumes.items():
        image, props = read_images(dataset.cases[case_id].images)
        np.testing.assert_array_equal(image[0], volume)
        assert props.spacing == pytest.approx(tuple(reversed(SPACING)), rel=1e-4)
        assert props.origin == pytest.approx(ORIGIN, abs=1e-3)
        assert props.direction == pytest.approx(tuple(np.eye(3).ravel()))
    roots = ["--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pre"), "-q"]
    assert plan_and_preprocess_entry(["-d", "51", "-c", "3d_fullres", *roots]) == 0
    plans = (tmp_path / "pre" / folder.name / "nnDiffPlans.json").read_text(encoding="utf-8")
    assert "ct_window" in plans  # the Modality tag drove CT normalisation


def test_mixed_modalities_and_tasks_without_their_data_are_refused(source, tmp_path):
    root, _ = source
    with pytest.raises(NnDiffError, match=r"several modalities \['CT', 'MR'\].*--modality"):
        dicom.convert_dicom(root, tmp_path, 52)
    with pytest.raises(NnDiffError, match="segmentation needs label maps"):
        dicom.convert_dicom(root, tmp_path, 52, task="segmentation")
    folder = dicom.convert_dicom(root / "P004", tmp_path, 53, task="denoising")
    dataset = load_dataset(folder)
    assert dataset.task == "denoising" and dataset.channel_names == {"0": "MR"}


def test_empty_folder_and_missing_slice_fail_clearly(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("not an image")
    assert dicom.main(["-i", str(tmp_path / "empty"), "-o", str(tmp_path / "raw"), "-d", "54"]) == 2
    assert "no DICOM series found" in capsys.readouterr().err
    write_series(tmp_path / "gap" / "s1", "P9", "CT", "1.2.826.0.1.9.1", 1, 9, skip_slice=4)
    with pytest.raises(NnDiffError, match=r"gap/s1: series 1.2.826.0.1.9.1 has uneven slice spacing"):
        dicom.convert_dicom(tmp_path / "gap", tmp_path / "raw", 55)
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
