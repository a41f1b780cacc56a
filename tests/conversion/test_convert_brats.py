"""BraTS conversion on tiny replicas of the 2021 and 2023 case-folder layouts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nndiff.dataset import load_dataset, read_images, read_label, verify_integrity
from nndiff.dataset.examples import properties_3d
from nndiff.dataset.io import write_image
from nndiff.dataset_conversion import brats
from nndiff.errors import NnDiffError
from nndiff.run.plan_and_preprocess import plan_and_preprocess_entry

SHAPE = (12, 16, 16)  # (Z, Y, X), 1 mm
TUMOUR_SLICES = (5, 6, 7)
SUFFIX_2021 = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}
SUFFIX_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}


def _brain() -> np.ndarray:
    z, y, x = np.indices(SHAPE)
    return ((y - 7.5) / 6.5) ** 2 + ((x - 7.5) / 6.5) ** 2 <= 1.0  # a cylinder: brain on every slice


def _seg(enhancing: int) -> np.ndarray:
    seg = np.zeros(SHAPE, np.uint8)
    seg[5:8, 5:10, 5:10] = 2  # oedema
    seg[6, 6:9, 6:9] = 1  # necrosis
    seg[6, 7, 7] = enhancing  # 4 in 2021, 3 in 2023
    return seg


def _write_case(root: Path, case_id: str, scheme: str, seg: np.ndarray | None, skip: tuple[str, ...] = ()) -> None:
    props = properties_3d((1.0, 1.0, 1.0), SHAPE)
    rng = np.random.default_rng(len(case_id) + sum(map(ord, case_id)))
    suffixes, sep = (SUFFIX_2021, "_") if scheme == "2021" else (SUFFIX_2023, "-")
    for n, modality in enumerate(brats.MODALITIES):
        if modality in skip:
            continue
        image = np.where(_brain(), rng.normal(100.0 + 50 * n, 5.0, SHAPE), 0.0).astype(np.float32)
        write_image(image[None], props, root / case_id / f"{case_id}{sep}{suffixes[modality]}.nii.gz")
    if seg is not None:
        write_image(seg[None], props, root / case_id / f"{case_id}{sep}seg.nii.gz")


def make_brats_source(root: Path) -> Path:
    source = root / "TrainingData"
    for i in range(3):
        _write_case(source, f"BraTS2021_{i:05d}", "2021", _seg(4))
    _write_case(source / "validation", "BraTS2021_00099", "2021", None)  # nested, no seg
    _write_case(source, "BraTS-GLI-00007-000", "2023", _seg(3))
    _write_case(source, "BraTS-GLI-00007-001", "2023", _seg(3))
    return source


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_brats_source(tmp_path_factory.mktemp("brats"))


def _plan(raw: Path, dataset_id: int, config: str) -> None:
    roots = ["--raw", str(raw), "--preprocessed", str(raw.parent / "pre"), "-q"]
    assert plan_and_preprocess_entry(["-d", str(dataset_id), "-c", config, *roots]) == 0


def test_segmentation_regions_label_values_and_subjects(source, tmp_path):
    assert brats.main(["-i", str(source), "-o", str(tmp_path / "raw"), "-d", "41", "-q"]) == 0
    dataset = load_dataset(tmp_path / "raw" / "Dataset041_BraTS")
    assert verify_integrity(dataset, full=True) == []
    assert dataset.channel_names == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert dataset.labels == brats.REGION_LABELS and dataset.json["regions_class_order"] == [1, 2, 3]
    assert len(dataset.cases) == 5 and list(dataset.test_cases) == ["BraTS2021_00099"]
    subjects = dataset.subjects()
    assert subjects["BraTS-GLI-00007-000"] == subjects["BraTS-GLI-00007-001"] == "BraTS-GLI-00007"
    assert subjects["BraTS2021_00001"] == "BraTS2021_00001"
    for case_id in ("BraTS2021_00000", "BraTS-GLI-00007-000"):  # ET 4 (2021) and 3 (2023) both -> 3
        label, _ = read_label(dataset.cases[case_id].label)
        assert label[0, 6, 7, 7] == 3 and label[0, 6, 6, 6] == 2 and label[0, 5, 5, 5] == 1
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3}
    image, _ = read_images(dataset.cases["BraTS-GLI-00007-000"].images)
    assert image[3].max() > 230.0  # channel 3 is FLAIR (t2f), the brightest in the replica
    _plan(tmp_path / "raw", 41, "3d_fullres")


def test_anomaly_detection_slices_follow_the_margin_rule(source, tmp_path):
    folder = brats.convert_brats(source, tmp_path / "raw", 42, task="anomaly_detection", healthy_margin_mm=3.0)
    dataset = load_dataset(folder)
    assert verify_integrity(dataset, full=True) == []
    healthy = dataset.healthy()
    # Tumour on slices 5..7; 3 mm margin: healthy 0..2 and 10..11; 3, 4, 8, 9 dropped.
    z_of = {int(c.rsplit("_z", 1)[1]): h for c, h in healthy.items() if c.startswith("BraTS2021_00001_")}
    assert z_of == {0: True, 1: True, 2: True, 5: False, 6: False, 7: False, 10: True, 11: True}
    assert not any(c.startswith("BraTS2021_00099") for c in healthy)  # no seg: skipped
    image, props = read_images(dataset.cases["BraTS2021_00001_z006"].images)
    assert props.spatial_dims == 2 and image.shape == (4, 1, 16, 16)
    mask, _ = read_label(dataset.cases["BraTS2021_00001_z006"].label)
    assert mask.sum() == 25 and read_label(dataset.cases["BraTS2021_00001_z000"].label)[0].sum() == 0
    assert dataset.subjects()["BraTS-GLI-00007-001_z000"] == "BraTS-GLI-00007"
    _plan(tmp_path / "raw", 42, "2d")


def test_slice_classification_and_geometry():
    tumour = np.zeros((10, 4, 4), bool)
    tumour[4, 1, 1] = True
    brain = np.ones((10, 4, 4), bool)
    brain[9] = False
    kept = brats.classify_slices(tumour, brain, spacing_z=2.0, healthy_margin_mm=4.0, min_brain_fraction=0.1)
    assert kept == {0: True, 1: True, 2: True, 4: False, 6: True, 7: True, 8: True}
    props = properties_3d((2.0, 1.0, 0.5), (10, 4, 4))
    assert brats.slice_properties(props, 3).origin[:2] == pytest.approx(props.origin[:2])
    assert brats.slice_properties(props, 3).spacing == (999.0, 1.0, 0.5)


def test_translation_target_missing_cases_and_allow_missing(source, tmp_path):
    incomplete = make_brats_source(tmp_path / "src")
    (incomplete / "BraTS2021_00002" / "BraTS2021_00002_t2.nii.gz").unlink()
    with pytest.raises(NnDiffError, match=r"BraTS2021_00002_t2.nii.gz does not exist.*--allow_missing"):
        brats.convert_brats(incomplete, tmp_path / "raw", 43, task="translation", target="flair")
    assert not (tmp_path / "raw" / "Dataset043_BraTSToFLAIR").exists()
    folder = brats.convert_brats(incomplete, tmp_path / "raw", 43, task="translation", target="t2f",
                                 allow_missing=True)
    dataset = load_dataset(folder)
    assert verify_integrity(dataset, full=True) == []
    assert dataset.channel_names == {"0": "T1", "1": "T1ce", "2": "T2"}
    assert dataset.target_names == {"0": "FLAIR"} and dataset.json["allow_missing_channels"] is True
    assert dataset.cases["BraTS2021_00002"].images[2] is None
    _plan(tmp_path / "raw", 43, "3d_fullres")
    # Without missing inputs the flag is not set; a case lacking the target is a test case.
    source_copy = make_brats_source(tmp_path / "src2")
    (source_copy / "BraTS2021_00001" / "BraTS2021_00001_t1ce.nii.gz").unlink()
    dataset = load_dataset(brats.convert_brats(source_copy, tmp_path / "raw", 44, task="translation"))
    assert "allow_missing_channels" not in dataset.json
    assert list(dataset.test_cases) == ["BraTS2021_00001"]
    assert "BraTS2021_00099" in dataset.cases  # no seg is needed for translation


def test_bad_inputs_fail_clearly(source, tmp_path):
    incomplete = make_brats_source(tmp_path / "src")
    (incomplete / "BraTS-GLI-00007-001" / "BraTS-GLI-00007-001-t1c.nii.gz").unlink()
    with pytest.raises(NnDiffError, match="BraTS-GLI-00007-001-t1c.nii.gz does not exist: case BraTS-GLI-00007-001 "
                                          "lacks T1ce"):
        brats.convert_brats(incomplete, tmp_path / "raw", 45)
    with pytest.raises(NnDiffError, match="translation only"):
        brats.convert_brats(source, tmp_path / "raw", 45, allow_missing=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NnDiffError, match="no BraTS case folder found"):
        brats.convert_brats(tmp_path / "empty", tmp_path / "raw", 45)
    with pytest.raises(NnDiffError, match=r"label values \[7\]"):
        brats.convert_labels(np.array([0, 1, 7]), Path("x_seg.nii.gz"))
