"""The synthetic example datasets: layout, determinism, geometry and speed."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from nndiff.dataset.examples import CT_DIRECTION, CT_ORIGIN, EXAMPLE_KINDS, make_example_dataset
from nndiff.dataset.io import read_file, read_images, read_label


@pytest.mark.parametrize("kind", EXAMPLE_KINDS)
def test_example_layout_and_speed(kind: str, tmp_path: Path) -> None:
    start = time.perf_counter()
    folder = make_example_dataset(kind, tmp_path, 7, num_cases=4)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"{kind} took {elapsed:.2f} s"
    assert folder.name.startswith("Dataset007_")
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert dataset_json["numTraining"] == 4
    ending = dataset_json["file_ending"]
    images = sorted(p for p in (folder / "imagesTr").iterdir() if p.name.endswith(ending))
    channels_per_file = 3 if len(dataset_json["channel_names"]) == 3 else 1
    assert len(images) == 4 * len(dataset_json["channel_names"]) // channels_per_file


def test_examples_are_deterministic(tmp_path: Path) -> None:
    a = make_example_dataset("3d_ct", tmp_path / "a", 1, num_cases=2, seed=3)
    b = make_example_dataset("3d_ct", tmp_path / "b", 1, num_cases=2, seed=3)
    c = make_example_dataset("3d_ct", tmp_path / "c", 1, num_cases=2, seed=4)
    arr_a, _ = read_file(a / "imagesTr" / "case_001_0000.nii.gz")
    arr_b, _ = read_file(b / "imagesTr" / "case_001_0000.nii.gz")
    arr_c, _ = read_file(c / "imagesTr" / "case_001_0000.nii.gz")
    np.testing.assert_array_equal(arr_a, arr_b)
    assert not np.array_equal(arr_a, arr_c)


def test_ct_example_geometry_and_units(tmp_path: Path) -> None:
    folder = make_example_dataset("3d_ct", tmp_path, 3, num_cases=1)
    arr, props = read_images([folder / "imagesTr" / "case_000_0000.nii.gz"])
    assert arr.shape == (1, 12, 24, 24)
    np.testing.assert_allclose(props.spacing, (3.0, 0.8, 0.8), rtol=1e-6)
    np.testing.assert_allclose(props.origin, CT_ORIGIN, atol=1e-5)
    np.testing.assert_allclose(props.direction, CT_DIRECTION, atol=1e-6)
    assert arr.min() == -1024 and 900 < arr.max() <= 1500
    assert (arr < -500).any() and ((arr > -200) & (arr < 200)).any()  # air/lung and soft tissue


def test_rgb_example_is_one_file_three_channels(tmp_path: Path) -> None:
    folder = make_example_dataset("2d_rgb_png", tmp_path, 2, num_cases=1)
    arr, props = read_images([folder / "imagesTr" / "case_000_0000.png"])
    assert arr.shape == (3, 1, 32, 32) and props.is_rgb
    assert props.spacing == (999.0, 1.0, 1.0)
    assert not np.array_equal(arr[0], arr[1])


def test_complex_example_has_sidecar_spacing(tmp_path: Path) -> None:
    folder = make_example_dataset("complex_npy", tmp_path, 6, num_cases=1)
    assert (folder / "imagesTr" / "case_000.json").is_file()
    arr, props = read_images([folder / "imagesTr" / "case_000_0000.npy"])
    assert arr.dtype == np.complex64 and props.is_complex
    assert props.spacing == (999.0, 0.5, 0.5)
    assert np.abs(np.angle(arr[arr != 0])).max() > 0.1  # phase is not trivial


def test_seg_example_labels(tmp_path: Path) -> None:
    folder = make_example_dataset("nnunet_seg", tmp_path, 5, num_cases=2)
    label, _ = read_label(folder / "labelsTr" / "case_000.nii.gz")
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    assert (folder / "imagesTs" / "case_002_0001.nii.gz").is_file()
    assert json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["labels"] == {"background": 0, "a": 1, "b": 2}


def test_existing_folder_is_not_overwritten(tmp_path: Path) -> None:
    make_example_dataset("2d_grey_png", tmp_path, 1, num_cases=1)
    with pytest.raises(FileExistsError):
        make_example_dataset("2d_grey_png", tmp_path, 1, num_cases=1)
    with pytest.raises(ValueError, match="valid kinds"):
        make_example_dataset("nope", tmp_path, 2)
