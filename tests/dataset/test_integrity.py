"""One test per dataset defect: the error names the file or key, the problem, and a fix.

Every defect is raised as one DatasetError before anything is written; ``_check`` also asserts
that neither loading nor the full check touched the dataset tree.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nndiff.dataset import load_dataset, make_example_dataset, verify_integrity, write_image
from nndiff.dataset.examples import properties_2d
from nndiff.dataset.io import ImageProperties, read_file
from nndiff.errors import DatasetError


def _tree(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def _check(folder: Path, where: str, problem: str, full: bool = False) -> DatasetError:
    """Load (and with ``full`` verify) ``folder``; assert one problem names ``where`` and ``problem``."""
    before = _tree(folder.parent)
    with pytest.raises(DatasetError) as info:
        ds = load_dataset(folder)
        verify_integrity(ds, full=full)
    assert _tree(folder.parent) == before, "checks must not write anything"
    err = info.value
    hits = [p for p in err.problems if where in p[0] and problem in p[1]]
    assert hits, f"no problem with where~{where!r} and problem~{problem!r} in:\n{err}"
    assert all(fix for _, _, fix in hits)
    assert where in str(err) and problem in str(err)
    return err


def _edit_json(folder: Path, **changes: Any) -> None:
    path = folder / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture
def seg(tmp_path: Path) -> Path:
    return make_example_dataset("nnunet_seg", tmp_path, 5, num_cases=3)


@pytest.fixture
def grey(tmp_path: Path) -> Path:
    return make_example_dataset("2d_grey_png", tmp_path, 1, num_cases=4)


def _seg_props(folder: Path) -> ImageProperties:
    return read_file(folder / "imagesTr" / "case_000_0000.nii.gz")[1]


# ----------------------------------------------------------------------------- dataset.json


def test_malformed_json(seg: Path) -> None:
    (seg / "dataset.json").write_text('{"task": "segmentation",, }')
    _check(seg, "dataset.json", "not valid JSON")


def test_missing_dataset_json(seg: Path) -> None:
    (seg / "dataset.json").unlink()
    _check(seg, "dataset.json", "is missing")


def test_incomplete_dataset_json(seg: Path) -> None:
    _edit_json(seg, file_ending=None, numTraining=None)
    err = _check(seg, "dataset.json key 'file_ending'", "is missing")
    assert any("numTraining" in w for w, _, _ in err.problems), "all problems are collected"


def test_missing_task(seg: Path) -> None:
    _edit_json(seg, task=None)
    err = _check(seg, "key 'task'", "is missing")
    assert "segmentation" in err.problems[0][2]  # the fix lists the valid tasks


def test_unknown_task(seg: Path) -> None:
    _edit_json(seg, task="superresolution")
    err = _check(seg, "key 'task'", "unknown task 'superresolution'")
    assert "generation" in str(err) and "anomaly_detection" in str(err)


def test_channel_names_not_consecutive(seg: Path) -> None:
    _edit_json(seg, channel_names={"0": "T2", "2": "ADC"})
    _check(seg, "key 'channel_names'", "consecutive")


def test_unsupported_file_ending(seg: Path) -> None:
    _edit_json(seg, file_ending=".gif")
    _check(seg, "key 'file_ending'", "not a supported image format")


def test_labels_without_background(seg: Path) -> None:
    _edit_json(seg, labels={"a": 1, "b": 2})
    _check(seg, "key 'labels'", "no background label")


def test_labels_bad_value(seg: Path) -> None:
    _edit_json(seg, labels={"background": 0, "a": -1, "b": 2})
    _check(seg, "key 'labels' entry 'a'", "non-negative integer")


def test_segmentation_needs_labels(seg: Path) -> None:
    _edit_json(seg, labels=None)
    _check(seg, "key 'labels'", "is missing")


def test_translation_needs_target_names(tmp_path: Path) -> None:
    folder = make_example_dataset("translation", tmp_path, 7, num_cases=2)
    _edit_json(folder, target_names=None)
    _check(folder, "key 'target_names'", "is missing")


def test_clean_only_denoising_without_degradation_block_is_valid(tmp_path: Path) -> None:
    # the degradation is then chosen from the modality (nndiff.tasks.denoising.decide_degradation)
    folder = make_example_dataset("denoising_2d", tmp_path, 9, num_cases=2)
    _edit_json(folder, degradation=None)
    verify_integrity(load_dataset(folder), full=True)


def test_allow_missing_channels_must_be_bool(seg: Path) -> None:
    _edit_json(seg, allow_missing_channels="yes")
    _check(seg, "key 'allow_missing_channels'", "true or false")


# ----------------------------------------------------------------------------- files


def test_num_training_disagrees(seg: Path) -> None:
    _edit_json(seg, numTraining=5)
    err = _check(seg, "key 'numTraining'", "is 5 but 3 training cases were found")
    assert "set numTraining to 3" in str(err)


def test_missing_channel_file(seg: Path) -> None:
    (seg / "imagesTr" / "case_001_0001.nii.gz").unlink()
    _check(seg, "case_001_0001.nii.gz", "is missing")


def test_missing_label_file(seg: Path) -> None:
    (seg / "labelsTr" / "case_002.nii.gz").unlink()
    _check(seg, "labelsTr/case_002.nii.gz", "is missing")


def test_missing_target_file(tmp_path: Path) -> None:
    folder = make_example_dataset("translation", tmp_path, 7, num_cases=2)
    (folder / "targetsTr" / "case_001_0000.nii.gz").unlink()
    _check(folder, "targetsTr/case_001_0000.nii.gz", "is missing")


def test_missing_images_folder(seg: Path) -> None:
    for p in (seg / "imagesTr").iterdir():
        p.unlink()
    (seg / "imagesTr").rmdir()
    _check(seg, "imagesTr", "is missing")


def test_duplicate_case_with_two_endings(seg: Path) -> None:
    src = seg / "imagesTr" / "case_000_0000.nii.gz"
    (seg / "imagesTr" / "case_000_0000.nrrd").write_bytes(src.read_bytes())
    _check(seg, "case_000_0000", "duplicate case id 'case_000'")


def test_duplicate_case_ids_differing_in_letter_case(seg: Path) -> None:
    for c in range(2):
        src = seg / "imagesTr" / f"case_000_{c:04d}.nii.gz"
        (seg / "imagesTr" / f"CASE_000_{c:04d}.nii.gz").write_bytes(src.read_bytes())
    (seg / "labelsTr" / "CASE_000.nii.gz").write_bytes((seg / "labelsTr" / "case_000.nii.gz").read_bytes())
    _edit_json(seg, numTraining=4)
    _check(seg, "imagesTr", "differ only in letter case")


def test_wrong_file_ending(seg: Path) -> None:
    path = seg / "imagesTr" / "case_002_0001.nii.gz"
    arr, props = read_file(path)
    path.unlink()
    write_image(arr, props, seg / "imagesTr" / "case_002_0001.mha")
    _check(seg, "case_002_0001.mha", "has the ending '.mha' but dataset.json 'file_ending' is '.nii.gz'")


def test_stray_file(seg: Path) -> None:
    (seg / "imagesTr" / "notes.txt").write_text("hello")
    _check(seg, "imagesTr/notes.txt", "stray file")


def test_badly_named_image(seg: Path) -> None:
    (seg / "imagesTr" / "case_000_0000.nii.gz").rename(seg / "imagesTr" / "case_000.nii.gz")
    _check(seg, "imagesTr/case_000.nii.gz", "does not follow the naming {CASE}_{XXXX}.nii.gz")


def test_channel_index_beyond_declared(seg: Path) -> None:
    src = seg / "imagesTr" / "case_000_0000.nii.gz"
    (seg / "imagesTr" / "case_000_0002.nii.gz").write_bytes(src.read_bytes())
    _check(seg, "case_000_0002.nii.gz", "declares 2 channel(s)")


def test_label_without_images(seg: Path) -> None:
    (seg / "labelsTr" / "ghost.nii.gz").write_bytes((seg / "labelsTr" / "case_000.nii.gz").read_bytes())
    _check(seg, "labelsTr/ghost.nii.gz", "has no images")


def test_labels_folder_without_labels_key(tmp_path: Path) -> None:
    folder = make_example_dataset("anomaly_2d", tmp_path, 8, num_cases=4)
    _edit_json(folder, labels=None)
    _check(folder, "key 'labels'", "labelsTr/ exists")


def test_files_removed_after_loading(seg: Path) -> None:
    ds = load_dataset(seg)
    (seg / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(DatasetError, match="case_001.nii.gz: of case 'case_001' no longer exists"):
        verify_integrity(ds)


# ----------------------------------------------------------------------------- file contents (full)


def test_corrupt_file(seg: Path) -> None:
    path = seg / "imagesTr" / "case_001_0000.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 40))
    _check(seg, "case_001_0000.nii.gz", "cannot be read", full=True)


def test_truncated_file(seg: Path) -> None:
    path = seg / "labelsTr" / "case_000.nii.gz"
    path.write_bytes(path.read_bytes()[:60])
    _check(seg, "labelsTr/case_000.nii.gz", "cannot be read", full=True)


def test_cheap_check_does_not_open_files(seg: Path) -> None:
    (seg / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"junk")
    verify_integrity(load_dataset(seg), full=False)  # only the full check reads images


def test_shape_mismatch_between_channels(seg: Path) -> None:
    props = _seg_props(seg)
    small = ImageProperties.from_json({**props.to_json(), "shape": [8, 16, 15]})
    write_image(np.ones((1, 8, 16, 15), np.float32), small, seg / "imagesTr" / "case_002_0001.nii.gz")
    _check(seg, "case_002_0001.nii.gz", "does not match case_002_0000.nii.gz of case 'case_002': shape",
           full=True)


def test_spacing_mismatch_label(seg: Path) -> None:
    label, props = read_file(seg / "labelsTr" / "case_001.nii.gz")
    other = ImageProperties.from_json({**props.to_json(), "spacing": [2.0, 1.1, 1.0]})
    write_image(label, other, seg / "labelsTr" / "case_001.nii.gz")
    _check(seg, "labelsTr/case_001.nii.gz", "spacing", full=True)


def test_origin_mismatch_target(tmp_path: Path) -> None:
    folder = make_example_dataset("translation", tmp_path, 7, num_cases=2)
    arr, props = read_file(folder / "targetsTr" / "case_000_0000.nii.gz")
    moved = ImageProperties.from_json({**props.to_json(), "origin": [0.0, -8.0, 6.0]})
    write_image(arr, moved, folder / "targetsTr" / "case_000_0000.nii.gz")
    _check(folder, "targetsTr/case_000_0000.nii.gz", "origin", full=True)


def test_direction_mismatch(seg: Path) -> None:
    arr, props = read_file(seg / "imagesTr" / "case_000_0001.nii.gz")
    flipped = ImageProperties.from_json({**props.to_json(), "direction": [-1, 0, 0, 0, -1, 0, 0, 0, 1]})
    write_image(arr, flipped, seg / "imagesTr" / "case_000_0001.nii.gz")
    _check(seg, "case_000_0001.nii.gz", "direction", full=True)


def test_geometry_within_tolerance_passes(seg: Path) -> None:
    arr, props = read_file(seg / "labelsTr" / "case_000.nii.gz")
    nudged = ImageProperties.from_json({**props.to_json(),
                                        "spacing": [2.0 * (1 + 1e-5), 1.0, 1.0],
                                        "origin": [5.0 + 1e-5, -3.0, 12.0]})
    write_image(arr, nudged, seg / "labelsTr" / "case_000.nii.gz")
    verify_integrity(load_dataset(seg), full=True)


def test_label_without_sidecar_mismatches_image_sidecar(tmp_path: Path) -> None:
    folder = make_example_dataset("anomaly_2d", tmp_path, 8, num_cases=2)
    (folder / "imagesTr" / "case_001.json").write_text(json.dumps({"spacing": [0.5, 0.5]}))
    err = _check(folder, "labelsTr/case_001.png", "spacing", full=True)
    assert "sidecar JSON" in str(err)


def test_nan_values(tmp_path: Path) -> None:
    # .npy here: SimpleITK's NIfTI reader itself turns NaN/Inf into 0 (nifti1_io), so NIfTI
    # files can never show them (documented in dataset_format.md).
    folder = make_example_dataset("complex_npy", tmp_path, 6, num_cases=2)
    path = folder / "imagesTr" / "case_001_0000.npy"
    arr = np.load(path)
    arr[3, 4] = np.nan
    arr[3, 5] = complex(np.inf, 0)
    np.save(path, arr)
    _check(folder, "case_001_0000.npy", "contains 2 NaN/Inf value(s)", full=True)


def test_inf_values_in_nrrd(tmp_path: Path) -> None:
    folder = make_example_dataset("3d_mr", tmp_path, 4, num_cases=2)
    _edit_json(folder, file_ending=".nrrd")
    for case in ("case_000", "case_001"):
        old = folder / "imagesTr" / f"{case}_0000.nii.gz"
        arr, props = read_file(old)
        if case == "case_001":
            arr[0, 3, 4, 5] = -np.inf
        write_image(arr, props, folder / "imagesTr" / f"{case}_0000.nrrd")
        old.unlink()
    _check(folder, "case_001_0000.nrrd", "contains 1 NaN/Inf value(s)", full=True)


def test_constant_image(seg: Path) -> None:
    props = _seg_props(seg)
    write_image(np.full((1, 8, 16, 16), 7.0, np.float32), props, seg / "imagesTr" / "case_000_0001.nii.gz")
    _check(seg, "case_000_0001.nii.gz", "is constant (every voxel = 7.0)", full=True)


def test_all_zero_image(grey: Path) -> None:
    write_image(np.zeros((1, 1, 32, 32), np.uint8), properties_2d(), grey / "imagesTr" / "case_003_0000.png")
    _check(grey, "case_003_0000.png", "is all zero", full=True)


def test_all_zero_label_is_fine(seg: Path) -> None:
    label, props = read_file(seg / "labelsTr" / "case_000.nii.gz")
    write_image(np.zeros_like(label), props, seg / "labelsTr" / "case_000.nii.gz")
    verify_integrity(load_dataset(seg), full=True)


def test_undeclared_label_values(seg: Path) -> None:
    label, props = read_file(seg / "labelsTr" / "case_002.nii.gz")
    label[0, 0, 0, :3] = 5
    write_image(label, props, seg / "labelsTr" / "case_002.nii.gz")
    _check(seg, "labelsTr/case_002.nii.gz", "holds label values [5] that dataset.json 'labels' does not declare",
           full=True)


def test_rgb_file_where_grey_expected(grey: Path) -> None:
    rgb = np.full((3, 1, 32, 32), 100, np.uint8)
    rgb[0, 0, :5] = 10
    write_image(rgb, properties_2d(is_rgb=True), grey / "imagesTr" / "case_002_0000.png")
    _check(grey, "case_002_0000.png", "has 3 colour components", full=True)


def test_mixed_2d_and_3d(tmp_path: Path) -> None:
    folder = make_example_dataset("3d_mr", tmp_path, 4, num_cases=2)
    props = properties_2d(shape=(16, 16), dtype="float32")
    write_image(np.arange(256, dtype=np.float32).reshape(1, 1, 16, 16), props,
                folder / "imagesTr" / "case_001_0000.nii.gz")
    _check(folder, "Dataset004_MR3D", "mixes 2D and 3D", full=True)


def test_full_check_in_parallel_reports_the_same(seg: Path) -> None:
    (seg / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"junk")
    with pytest.raises(DatasetError) as err:
        verify_integrity(load_dataset(seg), full=True, num_processes=2)
    assert "case_001_0000.nii.gz: cannot be read" in str(err.value)


def test_declared_but_unused_label_is_a_warning(seg: Path) -> None:
    _edit_json(seg, labels={"background": 0, "a": 1, "b": 2, "c": 3})
    assert verify_integrity(load_dataset(seg), full=True) == [
        "label values [3] are declared in dataset.json but occur in no label map"]


# ----------------------------------------------------------------------------- metadata and conditions


@pytest.fixture
def cond(tmp_path: Path) -> Path:
    return make_example_dataset("conditional_2d", tmp_path, 10, num_cases=4)


def _edit_metadata(folder: Path, case: str, **changes: Any) -> None:
    path = folder / "metadata.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            data[case].pop(key, None)
        else:
            data[case][key] = value
    path.write_text(json.dumps(data))


def test_condition_missing_for_a_case(cond: Path) -> None:
    _edit_metadata(cond, "case_002", size=None)
    _check(cond, "metadata.json case 'case_002' key 'size'", "is missing (declared continuous condition)")


def test_case_missing_from_metadata(cond: Path) -> None:
    data = json.loads((cond / "metadata.json").read_text(encoding="utf-8"))
    del data["case_001"]
    (cond / "metadata.json").write_text(json.dumps(data))
    _check(cond, "metadata.json case 'case_001'", "has no entry")


def test_metadata_file_missing_with_conditions(cond: Path) -> None:
    (cond / "metadata.json").unlink()
    _check(cond, "metadata.json", "is missing but dataset.json declares conditions")


def test_categorical_value_not_declared(cond: Path) -> None:
    _edit_metadata(cond, "case_000", shape="triangle")
    _check(cond, "case 'case_000' key 'shape'", "'triangle' is not among the declared values")


def test_continuous_value_not_a_number(cond: Path) -> None:
    _edit_metadata(cond, "case_003", size="large")
    _check(cond, "case 'case_003' key 'size'", "must be a finite number")


def test_condition_with_unknown_type(cond: Path) -> None:
    _edit_json(cond, conditions={"shape": {"type": "ordinal"}})
    _check(cond, "key 'conditions' entry 'shape'", "has type 'ordinal'")


def test_condition_uses_reserved_name(cond: Path) -> None:
    _edit_json(cond, conditions={"subject": "categorical"})
    _check(cond, "key 'conditions' entry 'subject'", "reserved metadata key")


def test_malformed_metadata_json(grey: Path) -> None:
    (grey / "metadata.json").write_text("{not json")
    _check(grey, "metadata.json", "not valid JSON")


def test_healthy_must_be_boolean(tmp_path: Path) -> None:
    folder = make_example_dataset("anomaly_2d", tmp_path, 8, num_cases=4)
    _edit_metadata(folder, "case_001", healthy="no")
    _check(folder, "case 'case_001' key 'healthy'", "must be true or false")


def test_subject_must_be_identifier(grey: Path) -> None:
    _edit_metadata(grey, "case_001", subject=[1, 2])
    _check(grey, "case 'case_001' key 'subject'", "non-empty string or an integer")


# ----------------------------------------------------------------------------- reconstruction / degradation


@pytest.fixture
def recon(tmp_path: Path) -> Path:
    return make_example_dataset("complex_npy", tmp_path, 6, num_cases=2)


def _recon_block(**changes: Any) -> dict[str, Any]:
    block = {"operator": "mri_cartesian", "acceleration": 4.0, "center_fraction": 0.08,
             "mask_type": "random", "num_coils": 1}
    block.update(changes)
    return block


@pytest.mark.parametrize(
    ("changes", "key", "problem"),
    [
        ({"acceleration": 0.5}, "acceleration", "must be a number >= 1"),
        ({"center_fraction": 0.0}, "center_fraction", "strictly between 0 and 1"),
        ({"center_fraction": 1.2}, "center_fraction", "strictly between 0 and 1"),
        ({"center_fraction": 0.4}, "center_fraction", "exceeds 1/acceleration"),
        ({"mask_type": "spiral"}, "mask_type", "unknown mask type 'spiral'"),
        ({"num_coils": 0}, "num_coils", "integer >= 1"),
        ({"operator": "pet_listmode"}, "operator", "unknown operator 'pet_listmode'"),
    ],
)
def test_reconstruction_block_inconsistent(recon: Path, changes: dict[str, Any], key: str, problem: str) -> None:
    _edit_json(recon, reconstruction=_recon_block(**changes))
    _check(recon, f"key 'reconstruction' key '{key}'", problem)


def test_reconstruction_block_unknown_key(recon: Path) -> None:
    _edit_json(recon, reconstruction=_recon_block(accel=4))
    _check(recon, "key 'reconstruction'", "unknown keys ['accel']")


def test_ct_reconstruction_block(recon: Path) -> None:
    _edit_json(recon, reconstruction={"operator": "ct_parallel", "num_views": 0})
    _check(recon, "key 'reconstruction' key 'num_views'", "integer >= 1")
    _edit_json(recon, reconstruction={"operator": "ct_parallel", "num_views": 60, "angle_range": 180})
    load_dataset(recon)


def test_reconstruction_task_needs_block(recon: Path) -> None:
    _edit_json(recon, reconstruction=None)
    _check(recon, "key 'reconstruction'", "is missing")


@pytest.mark.parametrize(
    ("block", "key", "problem"),
    [
        ({"type": "speckle", "level": 0.1}, "type", "unknown degradation type 'speckle'"),
        ({"type": "gaussian", "level": 0}, "level", "must be a positive number"),
        ({"type": "rician", "level": -0.2}, "level", "must be a positive number"),
        ({"type": "poisson", "level": [0.3, 0.1]}, "level", "must be a positive number"),
    ],
)
def test_degradation_block_invalid(tmp_path: Path, block: dict[str, Any], key: str, problem: str) -> None:
    folder = make_example_dataset("denoising_2d", tmp_path, 9, num_cases=2)
    _edit_json(folder, degradation=block)
    _check(folder, f"key 'degradation' key '{key}'", problem)


def test_degradation_level_range_is_valid(tmp_path: Path) -> None:
    folder = make_example_dataset("denoising_2d", tmp_path, 9, num_cases=2)
    _edit_json(folder, degradation={"type": "poisson", "level": [0.05, 0.2]})
    assert load_dataset(folder).degradation == {"type": "poisson", "level": [0.05, 0.2]}


def test_many_defects_reported_at_once(seg: Path) -> None:
    _edit_json(seg, numTraining=3, labels={"a": 1})
    (seg / "imagesTr" / "notes.txt").write_text("x")
    (seg / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset(seg)
    text = str(err.value)
    assert "notes.txt" in text and "case_002.nii.gz" in text and "background" in text
    assert len(err.value.problems) >= 3
