"""MNI152 conversion: valid raw datasets, train/held-out gap, geometry, labels, no download, CLI.

nilearn is a test dependency here: it is imported at module level on purpose, so a missing
nilearn fails this module instead of skipping it.
"""
from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import nilearn  # noqa: F401  (must fail, not skip, when absent)
import numpy as np
import pytest
import SimpleITK as sitk

from nndiff.dataset import load_dataset, read_images, read_label, verify_integrity
from nndiff.dataset_conversion import mni152
from nndiff.dataset_conversion.mni152 import (
    CONVERSION_RECORD,
    TISSUE_LABELS,
    convert_mni152,
    load_mni152,
    nifti_geometry,
    plan_slice_split,
)
from nndiff.errors import NnDiffError
from nndiff.utils.files import load_json

GAP = 10
_SLICE_ID = re.compile(r"^mni152_axial_(\d{3})$")


@pytest.fixture(scope="module")
def volumes_2mm():
    """Template at 2 mm, loaded with every network connection refused (proves: no download)."""
    mni152.load_mni152.cache_clear()
    original = socket.socket.connect

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test: the template must come from package files")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    try:
        vol = load_mni152(2)
    finally:
        socket.socket.connect = original  # type: ignore[method-assign]
    return vol


@pytest.fixture(scope="module")
def axial_2d(tmp_path_factory, volumes_2mm):
    raw = tmp_path_factory.mktemp("raw")
    return convert_mni152(raw, 7, mode="2d_slices", axis="axial", resolution=2, gap=GAP)


def test_template_files_come_from_the_nilearn_package(volumes_2mm):
    package_dir = Path(nilearn.__file__).parent.resolve()
    assert set(volumes_2mm.sources) == {"t1", "gm", "wm"}
    for path in volumes_2mm.sources.values():
        assert Path(path).resolve().is_relative_to(package_dir), path
        assert Path(path).is_file()
    assert volumes_2mm.properties.shape == (95, 117, 99)
    assert volumes_2mm.t1.shape == volumes_2mm.gm.shape == volumes_2mm.brain.shape == (95, 117, 99)
    assert 0.0 <= volumes_2mm.t1.min() and 200.0 < volumes_2mm.t1.max() <= 255.0  # 8-bit units
    assert not volumes_2mm.t1.flags.writeable  # cached: nobody may change it


def test_2d_dataset_passes_full_integrity_check(axial_2d):
    dataset = load_dataset(axial_2d)
    assert verify_integrity(dataset, full=True) == []
    assert dataset.task == "generation"
    assert dataset.channel_names == {"0": "T1"}
    record = load_json(axial_2d / CONVERSION_RECORD)
    train, heldout = record["slices"]["train_slabs"], record["slices"]["heldout"]
    assert len(dataset.cases) == sum(len(s) for s in train) == dataset.json["numTraining"]
    assert len(dataset.test_cases) == len(heldout) > 0
    # Each training slice's subject is its slab: slabs are contiguous, at least 5 for 5-fold CV.
    subjects = dataset.subjects()
    assert len(train) >= 5
    for n, slab in enumerate(train):
        assert slab == list(range(slab[0], slab[-1] + 1))
        for index in slab:
            assert subjects[f"mni152_axial_{index:03d}"] == f"slab_{n:02d}"


def _indices(case_ids) -> list[int]:
    return sorted(int(_SLICE_ID.match(c).group(1)) for c in case_ids)


def test_heldout_slab_is_contiguous_and_separated_by_the_gap(axial_2d, volumes_2mm):
    dataset = load_dataset(axial_2d)
    train, heldout = _indices(dataset.cases), _indices(dataset.test_cases)
    assert heldout == list(range(heldout[0], heldout[-1] + 1))
    distance = min(abs(t - h) for t in train for h in heldout)
    assert distance - 1 >= GAP  # at least GAP slices lie strictly between train and held-out
    assert load_json(axial_2d / CONVERSION_RECORD)["slices"]["min_train_heldout_distance"] == distance
    # The indices in the names are the template's: the written pixels are those slices.
    for case_id, case in list(dataset.test_cases.items())[:2] + list(dataset.cases.items())[:2]:
        index = int(_SLICE_ID.match(case_id).group(1))
        image, _ = read_images(case.images)
        np.testing.assert_allclose(image[0, 0], volumes_2mm.t1[index, ::-1], rtol=0, atol=1e-4)
        # Skipped slices hold little brain; kept ones at least 10 % of the largest slice's area.
        area = volumes_2mm.brain.sum(axis=(1, 2))
        assert area[index] >= 0.1 * area.max()


def test_2d_slice_geometry_is_preserved(axial_2d, volumes_2mm):
    dataset = load_dataset(axial_2d)
    case_id = sorted(dataset.cases)[0]
    image, props = read_images(dataset.cases[case_id].images)
    index = int(_SLICE_ID.match(case_id).group(1))
    assert props.spatial_dims == 2
    assert props.spacing == pytest.approx((999.0, 2.0, 2.0))
    assert image.shape == (1, 1, 117, 99)
    # Rows flipped for display (anterior up); every pixel keeps its world (x, y) position.
    assert props.direction == pytest.approx((-1.0, 0.0, 0.0, 1.0))
    volume = _sitk_volume(volumes_2mm)
    written = sitk.ReadImage(str(dataset.cases[case_id].images[0]))
    for row, col in ((0, 0), (116, 98), (40, 7)):
        world = volume.TransformIndexToPhysicalPoint((col, 116 - row, index))
        assert written.TransformIndexToPhysicalPoint((col, row)) == pytest.approx(world[:2])
        assert image[0, 0, row, col] == pytest.approx(volumes_2mm.t1[index, 116 - row, col], abs=1e-4)


def _sitk_volume(vol) -> sitk.Image:
    """The whole template grid as a SimpleITK image (for index -> world comparisons)."""
    image = sitk.GetImageFromArray(np.zeros(vol.properties.shape, np.float32))
    image.SetSpacing(vol.properties.sitk_spacing())
    image.SetOrigin(vol.properties.origin)
    image.SetDirection(vol.properties.direction)
    return image


def test_nifti_geometry_matches_simpleitk_on_the_template_file(volumes_2mm):
    reader = sitk.ImageFileReader()
    reader.SetFileName(volumes_2mm.sources["t1"])
    reader.ReadImageInformation()
    import nibabel

    spacing, origin, direction = nifti_geometry(nibabel.load(volumes_2mm.sources["t1"]).affine)
    assert spacing == pytest.approx(tuple(reversed(reader.GetSpacing())))
    assert origin == pytest.approx(reader.GetOrigin())
    assert direction == pytest.approx(reader.GetDirection())
    # The 2 mm grid keeps the 1 mm file's origin and direction.
    assert volumes_2mm.properties.origin == pytest.approx(reader.GetOrigin())
    assert volumes_2mm.properties.spacing == pytest.approx((2.0, 2.0, 2.0))


def test_3d_segmentation_dataset(tmp_path, volumes_2mm):
    folder = convert_mni152(tmp_path, 8, mode="3d", resolution=2, task="segmentation", gap=GAP)
    dataset = load_dataset(folder)
    assert verify_integrity(dataset, full=True) == []
    assert dataset.labels == TISSUE_LABELS
    record = load_json(folder / CONVERSION_RECORD)
    assert len(dataset.cases) == len(record["slices"]["train_slabs"]) >= 2
    assert all(len(slab) <= mni152.DEFAULT_3D_SLAB_SIZE for slab in record["slices"]["train_slabs"])
    assert len(dataset.test_cases) == 1
    seen: set[int] = set()
    full = _sitk_volume(volumes_2mm)
    for case_id, case in dataset.cases.items():
        slices = record["cases"][case_id]["slices"]
        image, props = read_images(case.images)
        label, _ = read_label(case.label)
        np.testing.assert_allclose(image[0], volumes_2mm.t1[slices[0]:slices[-1] + 1], atol=1e-4)
        seen |= set(np.unique(label).tolist())
        assert props.spacing == pytest.approx((2.0, 2.0, 2.0))
        # The slab's first voxel sits where that voxel sits in the whole template.
        assert props.origin == pytest.approx(full.TransformIndexToPhysicalPoint((0, 0, slices[0])))
    assert seen == {0, 1, 2, 3}


def test_tissue_label_map_rule():
    gm = np.array([0.6, 0.2, 0.1, 0.9])
    wm = np.array([0.3, 0.7, 0.1, 0.0])
    brain = np.array([True, True, True, False])
    # CSF = 1 - GM - WM: 0.1, 0.1, 0.8 -> GM, WM, CSF; outside the brain: background.
    assert mni152.tissue_label_map(gm, wm, brain).tolist() == [2, 3, 1, 0]


def test_png_slices_store_rounded_8bit_values(tmp_path, volumes_2mm):
    folder = convert_mni152(tmp_path, 9, axis="sagittal", resolution=2, file_ending=".png",
                            task="segmentation", heldout_position="end")
    dataset = load_dataset(folder)
    assert verify_integrity(dataset, full=True) == []
    case_id, case = sorted(dataset.test_cases.items())[0]
    index = int(case_id.rsplit("_", 1)[1])
    image, props = read_images(case.images)
    assert props.spacing == pytest.approx((999.0, 2.0, 2.0))  # from the sidecar
    assert image.shape == (1, 1, 95, 117)  # (Z, Y) of the sagittal plane
    np.testing.assert_array_equal(image[0, 0], np.round(volumes_2mm.t1[::-1, :, index]))  # superior up
    # "end": the held-out slab is the last kept slab, one gap before it.
    record = load_json(folder / CONVERSION_RECORD)["slices"]
    assert max(s for slab in record["train_slabs"] for s in slab) < min(record["heldout"])
    assert len(record["gap"]) == GAP


def test_npz_slices_read_back_without_simpleitk(tmp_path, volumes_2mm, monkeypatch):
    nifti = convert_mni152(tmp_path / "nii", 9, resolution=2, task="segmentation")
    folder = convert_mni152(tmp_path / "npz", 9, resolution=2, task="segmentation", file_ending=".npz")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # a GPU machine without SimpleITK
    dataset = load_dataset(folder)
    assert verify_integrity(dataset, full=True) == []
    case_id, case = sorted(dataset.test_cases.items())[0]
    image, props = read_images(case.images)
    monkeypatch.undo()
    reference, ref_props = read_images(load_dataset(nifti).test_cases[case_id].images)
    np.testing.assert_array_equal(image, reference)  # float32 values, not rounded
    assert props.spacing == pytest.approx(ref_props.spacing) and props.origin == pytest.approx(ref_props.origin)


def _cube_mask(num_slices: int = 60) -> np.ndarray:
    brain = np.zeros((num_slices, 8, 8), bool)
    brain[5:55, 2:6, 2:6] = True  # slices 5..54 hold brain
    return brain


def test_slice_split_layout_on_a_synthetic_mask():
    split = plan_slice_split(_cube_mask(), "axial", gap=10, heldout_fraction=0.2)
    assert split.skipped == list(range(0, 5)) + list(range(55, 60))
    assert split.heldout == list(range(25, 35))  # 10 = 0.2 * 50, centred
    assert split.gap == list(range(15, 25)) + list(range(35, 45))
    assert split.train == list(range(5, 15)) + list(range(45, 55))
    assert len(split.train_slabs) >= 5 and split.min_distance() == 11
    assert plan_slice_split(_cube_mask(), gap=4, slab_size=3).train_slabs[0] == [5, 6, 7]


def test_slice_split_without_room_for_training_fails_clearly():
    with pytest.raises(NnDiffError, match="no training slices left"):
        plan_slice_split(_cube_mask(), gap=30, heldout_fraction=0.5)
    with pytest.raises(NnDiffError, match="unknown axis"):
        plan_slice_split(_cube_mask(), axis="oblique")


def test_missing_nilearn_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn", None)
    with pytest.raises(NnDiffError, match="pip install nilearn"):
        mni152._nilearn()


def test_cli_writes_a_dataset_and_refuses_a_taken_id(tmp_path, volumes_2mm, capsys):
    assert mni152.main(["-o", str(tmp_path), "-d", "12", "--mode", "3d", "--resolution", "2", "-q"]) == 0
    folder = tmp_path / "Dataset012_MNI152Axial3D"
    assert capsys.readouterr().out.strip() == str(folder)
    assert load_dataset(folder).json["numTraining"] >= 2
    # Same id, other name: refused with exit code 2, the existing dataset untouched.
    assert mni152.main(["-o", str(tmp_path), "-d", "12", "--resolution", "2", "-q"]) == 2
    assert "already holds dataset id 12" in capsys.readouterr().err
    assert not (tmp_path / "Dataset012_MNI152Axial2D").exists()


def test_fingerprint_and_plan_accept_the_2d_dataset(axial_2d):
    from nndiff.fingerprint import extract_fingerprint
    from nndiff.planning import plan_experiment

    dataset = load_dataset(axial_2d)
    fingerprint = extract_fingerprint(dataset, num_processes=1)
    assert fingerprint["spatial_dims"] == 2
    assert fingerprint["channels"][0]["modality"] == "mr"
    plans = plan_experiment(fingerprint, dataset.json)
    assert plans["target_spacing"] == pytest.approx([999.0, 2.0, 2.0])
    assert list(plans["configurations"]) == ["2d"]
    # The window covers the template's 8-bit range (not a 0..1 rescaled one).
    assert 150.0 < plans["normalization"]["images"][0]["params"]["clip_high"] <= 255.0


# --------------------------------------------------------------------------- image-conditioned tasks


def _fingerprint_and_plan(folder: Path) -> tuple[dict, dict]:
    from nndiff.fingerprint import extract_fingerprint
    from nndiff.planning import plan_experiment

    dataset = load_dataset(folder)
    assert verify_integrity(dataset, full=True) == []
    fingerprint = extract_fingerprint(dataset, num_processes=1)
    return fingerprint, plan_experiment(fingerprint, dataset.json)


def test_t2_like_contrast_formula():
    gm = np.array([0.0, 1.0, 0.0, 0.5, 0.9])
    wm = np.array([0.0, 0.0, 1.0, 0.5, 0.0])
    brain = np.array([True, True, True, True, False])
    # CSF, GM, WM, GM/WM mix, outside the brain.
    expected = [255.0, 0.55 * 255, 0.3 * 255, (0.5 * 0.55 + 0.5 * 0.3) * 255, 0.0]
    np.testing.assert_allclose(mni152.t2_like_contrast(gm, wm, brain), expected, rtol=1e-6)


def test_translation_dataset_has_t2_like_targets_and_plans_conditioning(tmp_path, volumes_2mm):
    folder = convert_mni152(tmp_path, 13, resolution=2, task="translation")
    assert folder.name == "Dataset013_MNI152Axial2DT2like"
    dataset = load_dataset(folder)
    assert dataset.json["target_names"] == {"0": "T2w-like"}
    case_id, case = sorted(dataset.cases.items())[3]
    index = int(_SLICE_ID.match(case_id).group(1))
    target, _ = read_images(case.targets)
    expected = mni152.t2_like_contrast(volumes_2mm.gm, volumes_2mm.wm, volumes_2mm.brain)[index, ::-1]
    np.testing.assert_allclose(target[0, 0], expected, atol=1e-3)
    # Voxel check against the formula: CSF-rich voxels bright, WM-rich voxels dark, outside 0.
    gm, wm = volumes_2mm.gm[index, ::-1], volumes_2mm.wm[index, ::-1]
    brain = volumes_2mm.brain[index, ::-1]
    row, col = np.unravel_index(np.argmax(np.where(brain, wm, -1.0)), wm.shape)
    assert target[0, 0, row, col] == pytest.approx(
        255 * (max(0.0, 1 - gm[row, col] - wm[row, col]) + 0.55 * gm[row, col] + 0.3 * wm[row, col]), abs=1e-3)
    assert np.all(target[0, 0][~brain] == 0)
    assert len(dataset.test_cases) > 0 and all(c.targets for c in dataset.test_cases.values())
    _, plans = _fingerprint_and_plan(folder)
    assert plans["configurations"]["2d"]["network"]["cond_channels"] == 1


def test_denoising_dataset_is_clean_only_and_plans_rician(tmp_path, volumes_2mm):
    folder = convert_mni152(tmp_path, 14, resolution=2, task="denoising")
    dataset = load_dataset(folder)
    assert dataset.task == "denoising"
    assert "degradation" not in dataset.json and "target_names" not in dataset.json
    assert not (folder / "targetsTr").exists()
    _, plans = _fingerprint_and_plan(folder)
    assert plans["configurations"]["2d"]["degradation"]["type"] == "rician"


def test_reconstruction_dataset_plans_the_measurement_grid_and_refuses_3d(tmp_path, volumes_2mm):
    folder = convert_mni152(tmp_path, 15, resolution=2, task="reconstruction")
    dataset = load_dataset(folder)
    assert dataset.json["reconstruction"] == {"operator": "mri_cartesian", "acceleration": 4,
                                              "center_fraction": 0.08, "mask_type": "random", "num_coils": 1}
    _, plans = _fingerprint_and_plan(folder)
    assert plans["normalization"]["images"][0]["scheme"] == "scale_only"
    config = plans["configurations"]["2d"]
    assert config["resample"] is False and config["crop_to_nonzero"] is False
    assert config["sampling"]["data_consistency"] is True
    with pytest.raises(NnDiffError, match="needs mode 2d_slices"):
        convert_mni152(tmp_path, 16, mode="3d", resolution=2, task="reconstruction")
    assert not list(tmp_path.glob("Dataset016_*"))


# --------------------------------------------------------------------------- anomaly detection


@pytest.fixture(scope="module")
def anomaly_2d(tmp_path_factory, volumes_2mm):
    raw = tmp_path_factory.mktemp("raw_anomaly")
    return convert_mni152(raw, 17, resolution=2, task="anomaly_detection", gap=GAP, seed=5)


def _anomaly_parts(folder: Path) -> tuple[list[int], list[int], list[int]]:
    """(healthy training, lesioned training, held-out) slice indices, read from the written dataset."""
    dataset = load_dataset(folder)
    subjects = dataset.subjects()
    healthy = _indices(c for c in dataset.cases if subjects[c].startswith("slab_"))
    lesioned = _indices(c for c in dataset.cases if subjects[c].startswith("lesioned_"))
    assert len(healthy) + len(lesioned) == len(dataset.cases)
    return healthy, lesioned, _indices(dataset.test_cases)


def _slice_arrays(case) -> tuple[np.ndarray, np.ndarray]:
    image, _ = read_images(case.images)
    label, _ = read_label(case.label)
    return image[0, 0], np.asarray(label).reshape(image.shape[2:])


def test_anomaly_dataset_passes_integrity_and_plans_simplex_partial_diffusion(anomaly_2d):
    assert anomaly_2d.name == "Dataset017_MNI152Axial2DAnomaly"
    dataset = load_dataset(anomaly_2d)
    assert dataset.task == "anomaly_detection"
    assert dataset.labels == {"background": 0, "lesion": 1}
    assert dataset.channel_names == {"0": "T1"}
    assert all(case.label is not None for case in list(dataset.cases.values()) + list(dataset.test_cases.values()))
    fingerprint, plans = _fingerprint_and_plan(anomaly_2d)
    assert fingerprint["spatial_dims"] == 2
    config = plans["configurations"]["2d"]
    assert config["diffusion"]["noise_type"] == "simplex"
    assert 0.0 < config["sampling"]["start_fraction"] < 1.0  # partial diffusion (AnoDDPM's t_lambda)
    assert config["anomaly"]["strategy"] == "anoddpm"
    record = load_json(anomaly_2d / CONVERSION_RECORD)
    assert record["lesions"]["model"] == mni152.LESION_MODEL
    assert record["lesions"]["seed"] == 5
    assert record["lesions"]["wm_intensity"] == pytest.approx(mni152.wm_intensity(mni152.load_mni152(2)))


def test_anomaly_slabs_are_disjoint_and_separated_by_the_gap(anomaly_2d):
    healthy, lesioned, heldout = _anomaly_parts(anomaly_2d)
    assert healthy and lesioned and heldout
    assert lesioned == list(range(lesioned[0], lesioned[-1] + 1))  # one contiguous slab
    assert heldout == list(range(heldout[0], heldout[-1] + 1))
    for a, b in ((healthy, lesioned), (healthy, heldout), (lesioned, heldout)):
        assert min(abs(i - j) for i in a for j in b) - 1 >= GAP  # >= GAP slices strictly between
    record = load_json(anomaly_2d / CONVERSION_RECORD)["slices"]
    assert sorted(i for slab in record["lesioned_slabs"] for i in slab) == lesioned
    assert record["min_lesioned_heldout_distance"] >= GAP + 1
    assert record["min_healthy_lesioned_distance"] >= GAP + 1
    assert not set(record["gap"]) & set(healthy + lesioned + heldout)


def test_anomaly_cross_validation_folds_see_healthy_and_lesioned_cases(anomaly_2d):
    from nndiff.training.splits import make_grouped_splits

    dataset = load_dataset(anomaly_2d)
    healthy = dataset.healthy()
    splits = make_grouped_splits(list(dataset.cases), dataset.subjects())
    assert len(splits) == 5
    for fold in splits:  # Wolleb and CDPM need both kinds in every fold's training cases
        assert {healthy[c] for c in fold["train"]} == {True, False}


def test_lesions_lie_inside_the_brain_and_only_where_the_mask_says(anomaly_2d, volumes_2mm):
    dataset = load_dataset(anomaly_2d)
    lesions = load_json(anomaly_2d / CONVERSION_RECORD)["lesions"]["cases"]
    num_lesioned = 0
    for case_id, case in list(dataset.cases.items()) + list(dataset.test_cases.items()):
        index = int(_SLICE_ID.match(case_id).group(1))
        image, mask = _slice_arrays(case)
        template = volumes_2mm.t1[index, ::-1]
        changed = np.abs(image - template) > 1e-3
        if not mask.any():
            assert not changed.any(), case_id  # lesion-free: the template slice itself
            assert case_id not in lesions
            continue
        num_lesioned += 1
        assert set(np.unique(mask).tolist()) == {0, 1}
        assert not (mask.astype(bool) & ~volumes_2mm.brain[index, ::-1]).any(), case_id
        assert not (changed & ~mask.astype(bool)).any(), case_id  # nothing changes outside the mask
        assert changed.sum() >= 0.8 * mask.sum(), case_id  # the mask is the change (up to 8-bit clipping)
        assert 1 <= len(lesions[case_id]) <= 3
        assert 0.0 <= image.min() and image.max() <= 255.0
        signs = {np.sign(b["contrast"]) for b in lesions[case_id]}
        assert len(signs) == 1 and all(0.3 <= abs(b["contrast"]) <= 0.6 for b in lesions[case_id])
        direction = np.sign(image - template)[changed]
        assert set(np.unique(direction).tolist()) == signs  # hyper- or hypointense, as recorded
    assert num_lesioned == len(lesions) > 0


def test_anomaly_healthy_flags_agree_with_the_masks(anomaly_2d):
    from nndiff.tasks.anomaly import healthy_cases

    dataset = load_dataset(anomaly_2d)
    metadata = load_json(anomaly_2d / "metadata.json")
    record = load_json(anomaly_2d / CONVERSION_RECORD)
    masks = {c: _slice_arrays(case)[1] for c, case in {**dataset.cases, **dataset.test_cases}.items()}
    for case_id, mask in masks.items():
        assert metadata[case_id]["healthy"] is (not mask.any()), case_id
    # Both healthy rules (metadata flag; else the labelsTr mask) give the same verdicts.
    train = sorted(dataset.cases)
    assert healthy_cases(train, metadata) == healthy_cases(train, None, masks) == dataset.healthy()
    # Lesioned training slab: all diseased; healthy slabs: all healthy.
    for case_id in train:
        assert metadata[case_id]["healthy"] is metadata[case_id]["subject"].startswith("slab_")
    # Held-out: lesions on round(0.5 * n) slices, all-zero masks on the others.
    heldout = _indices(dataset.test_cases)
    lesioned_test = [i for i in heldout if masks[f"mni152_axial_{i:03d}"].any()]
    assert lesioned_test == record["lesions"]["lesioned_heldout"]
    assert len(lesioned_test) == round(0.5 * len(heldout))


def test_anomaly_conversion_is_deterministic_per_seed(tmp_path, anomaly_2d, volumes_2mm):
    assert mni152.main(["-o", str(tmp_path), "-d", "18", "--resolution", "2", "--task", "anomaly_detection",
                        "--seed", "5", "-q"]) == 0
    same = tmp_path / "Dataset018_MNI152Axial2DAnomaly"
    other = convert_mni152(tmp_path, 19, resolution=2, task="anomaly_detection", seed=6)
    reference, again, changed = load_dataset(anomaly_2d), load_dataset(same), load_dataset(other)
    assert load_json(same / CONVERSION_RECORD)["lesions"] == load_json(anomaly_2d / CONVERSION_RECORD)["lesions"]
    differs = 0
    for case_id in sorted(reference.test_cases) + sorted(reference.cases)[-3:]:
        image, mask = _slice_arrays({**reference.cases, **reference.test_cases}[case_id])
        image_again, mask_again = _slice_arrays({**again.cases, **again.test_cases}[case_id])
        np.testing.assert_array_equal(image, image_again)
        np.testing.assert_array_equal(mask, mask_again)
        _, mask_other = _slice_arrays({**changed.cases, **changed.test_cases}[case_id])
        differs += int(not np.array_equal(mask, mask_other))
    assert differs > 0  # another seed places other lesions


def test_anomaly_task_refuses_3d_and_a_split_without_room(tmp_path, volumes_2mm):
    with pytest.raises(NnDiffError, match="anomaly_detection needs mode 2d_slices"):
        convert_mni152(tmp_path, 20, mode="3d", resolution=2, task="anomaly_detection")
    with pytest.raises(NnDiffError, match="no room for a lesioned slab"):
        convert_mni152(tmp_path, 21, resolution=2, task="anomaly_detection", lesioned_fraction=0.5)
    with pytest.raises(NnDiffError, match="needs held-out slices"):
        convert_mni152(tmp_path, 22, resolution=2, task="anomaly_detection", heldout_fraction=0.0)
    with pytest.raises(NnDiffError, match="test_lesion_fraction"):
        convert_mni152(tmp_path, 23, resolution=2, task="anomaly_detection", test_lesion_fraction=1.0)
    assert not list(tmp_path.glob("Dataset02*"))


def test_anomaly_split_layout_on_a_synthetic_mask():
    split = mni152.plan_anomaly_split(_cube_mask(80), gap=5, heldout_fraction=0.2, lesioned_fraction=0.2)
    # Brain on slices 5..54 (50 kept): held out 25..34, gaps 20..24 and 35..39; the runs 5..19 and
    # 40..54 are equally long, so the upper one gives the lesioned slab 40..49 and the gap 50..54.
    assert split.heldout == list(range(25, 35))
    assert split.lesioned == list(range(40, 50))
    assert split.gap == list(range(20, 25)) + list(range(35, 40)) + list(range(50, 55))
    assert split.train == list(range(5, 20))
    end = mni152.plan_anomaly_split(_cube_mask(80), gap=5, heldout_position="end", lesioned_fraction=0.2)
    # Held out at the top (45..54): the lesioned slab sits right below its gap, the healthy rest below.
    assert end.heldout == list(range(45, 55)) and end.lesioned == list(range(30, 40))
    assert end.train == list(range(5, 25))


def test_insert_lesions_on_a_synthetic_disk():
    rows, cols = np.mgrid[:32, :32]
    brain = (rows - 16) ** 2 + (cols - 16) ** 2 <= 14 ** 2
    image = np.where(brain, 100.0, 0.0).astype(np.float32)
    out, mask, blobs = mni152.insert_lesions(image, brain, (1.0, 1.0), 200.0, np.random.default_rng(3))
    again = mni152.insert_lesions(image, brain, (1.0, 1.0), 200.0, np.random.default_rng(3))
    np.testing.assert_array_equal(out, again[0])
    assert blobs == again[2]
    assert mask.any() and not (mask.astype(bool) & ~brain).any()
    # Every weight left is >= 0.05, a change of >= 3 units here: the mask is exactly the change.
    np.testing.assert_array_equal(out != image, mask.astype(bool))
    for blob in blobs:
        row, col = blob["centre_row_col"]
        assert brain[row, col] and mask[row, col]
        # Centre: the blob's full change (|contrast| x 200, soft edge almost 1 in the middle).
        assert abs(out[row, col] - 100.0) > 0.5 * abs(blob["contrast"]) * 200.0
    # A brain section too small for any blob: the blob shrinks to fit, still inside the brain.
    tiny = (rows - 16) ** 2 + (cols - 16) ** 2 <= 3 ** 2
    _, tiny_mask, tiny_blobs = mni152.insert_lesions(np.where(tiny, 100.0, 0.0), tiny, (1.0, 1.0), 200.0,
                                                     np.random.default_rng(0))
    assert tiny_mask.any() and not (tiny_mask.astype(bool) & ~tiny).any()
    assert all(max(b["semi_axes_mm"]) < 3.0 for b in tiny_blobs)
    with pytest.raises(NnDiffError, match="without brain"):
        mni152.insert_lesions(image, np.zeros_like(brain), (1.0, 1.0), 200.0, np.random.default_rng(0))


def test_anomaly_dataset_feeds_the_anomaly_evaluation(tmp_path, anomaly_2d, volumes_2mm):
    """An oracle map (|image - template slice|) scores AUROC 1 against labelsTs; the z-score baseline
    is fitted on the healthy training slices only (by metadata)."""
    from nndiff.dataset_conversion.common import write_case_image
    from nndiff.evaluation.anomaly import BASELINE_NAME, GLOBAL_BASELINE_NAME, evaluate_anomaly_folders

    dataset = load_dataset(anomaly_2d)
    for case_id, case in dataset.test_cases.items():
        image, props = read_images(case.images)
        index = int(_SLICE_ID.match(case_id).group(1))
        oracle = np.abs(image[0] - volumes_2mm.t1[index, ::-1][None])
        write_case_image(tmp_path, "oracle", case_id, None, oracle.astype(np.float32), props, ".nii.gz")
    summary = evaluate_anomaly_folders(anomaly_2d / "labelsTs", tmp_path / "oracle",
                                       dataset_json=anomaly_2d / "dataset.json")
    assert summary["num_cases"] == len(dataset.test_cases)
    assert 0 < summary["num_anomalous_cases"] < summary["num_cases"]
    assert summary["methods"]["oracle"]["pixel_auroc"] == pytest.approx(1.0)
    # Same-shaped healthy slices give voxel-wise statistics, so the global-statistics row comes too.
    assert set(summary["methods"]) == {"oracle", BASELINE_NAME, GLOBAL_BASELINE_NAME}
    for name in (BASELINE_NAME, GLOBAL_BASELINE_NAME):
        assert summary["methods"][name]["num_healthy_training"] == sum(dataset.healthy().values())
