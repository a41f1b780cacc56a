"""Fingerprint extraction on the example datasets and on arrays built here."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from nndiff.dataset import load_dataset, make_example_dataset
from nndiff.dataset.examples import properties_3d
from nndiff.dataset.io import read_images, write_image
from nndiff.fingerprint import (
    FOREGROUND_LABEL,
    FOREGROUND_NONZERO,
    analyze_case,
    assemble_fingerprint,
    extract_fingerprint,
)
from nndiff.fingerprint import extractor
from nndiff.utils.files import load_json, save_json

ARCHITECTURE_FIELDS = (
    "spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
    "median_relative_size_after_cropping", "dataset_name", "task", "num_cases", "spatial_dims",
    "shapes_before_crop", "channels", "intensity_properties_per_channel",
    "target_intensity_properties_per_channel", "target_foreground_intensity_properties_per_channel",
    "foreground_definition", "is_rgb", "is_complex", "median_spacing", "median_shape", "anisotropy",
    "label_statistics", "dataset_size", "warnings",
)
STAT_KEYS = {"mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5"}


def _fingerprint(tmp_path, kind, dataset_id=1, num_cases=3, **kwargs):
    folder = make_example_dataset(kind, tmp_path / "raw", dataset_id, num_cases=num_cases, seed=dataset_id)
    dataset = load_dataset(folder)
    return dataset, extract_fingerprint(dataset, **kwargs)


def test_ct_fingerprint_fields_geometry_and_nonzero_foreground(tmp_path):
    dataset, fp = _fingerprint(tmp_path, "3d_ct")
    for field in ARCHITECTURE_FIELDS:
        assert field in fp, field
    assert fp["num_cases"] == 3 and fp["spatial_dims"] == 3 and fp["task"] == "generation"
    assert fp["channels"] == [{"index": 0, "name": "CT", "modality": "ct", "role": "image"}]
    assert fp["median_spacing"] == pytest.approx([3.0, 0.8, 0.8])
    assert fp["anisotropy"] == pytest.approx(3.75)
    assert fp["foreground_definition"] == FOREGROUND_NONZERO
    assert fp["shapes_before_crop"] == [[12, 24, 24]] * 3
    assert all(s[0] == 12 and s[1] < 24 for s in fp["shapes_after_crop"])  # air padding cropped in-plane
    assert 0 < fp["median_relative_size_after_cropping"] < 1
    fg, whole = fp["foreground_intensity_properties_per_channel"]["0"], fp["intensity_properties_per_channel"]["0"]
    assert set(fg) == STAT_KEYS and set(whole) == STAT_KEYS
    assert whole["min"] == -1024.0 and fg["min"] > -1024.0  # the padding value is background
    # exact statistics: with all voxels sampled they equal numpy's on the raw data
    voxels = np.concatenate([read_images(c.images)[0].ravel() for c in dataset.cases.values()]).astype(np.float64)
    assert whole["mean"] == pytest.approx(voxels.mean(), rel=1e-12)
    assert whole["std"] == pytest.approx(voxels.std(), rel=1e-9)
    assert whole["percentile_99_5"] == pytest.approx(np.percentile(voxels, 99.5), rel=1e-6)
    assert whole["median"] == pytest.approx(np.median(voxels), rel=1e-6)
    assert fp["warnings"] == []
    assert fp["dataset_size"] == {"num_cases": 3, "total_voxels": 3 * 12 * 24 * 24,
                                  "bytes_float32": 3 * 12 * 24 * 24 * 4}


def test_segmentation_uses_label_foreground_and_counts_classes(tmp_path):
    dataset, fp = _fingerprint(tmp_path, "nnunet_seg")
    assert fp["foreground_definition"] == FOREGROUND_LABEL
    assert [c["modality"] for c in fp["channels"]] == ["mr", "mr"]
    stats = fp["label_statistics"]
    assert set(stats) == {"background", "a", "b"}
    assert sum(s["voxel_fraction"] for s in stats.values()) == pytest.approx(1.0)
    assert stats["b"]["num_cases_present"] == 3 and stats["b"]["voxel_fraction"] < stats["a"]["voxel_fraction"]
    from nndiff.dataset.io import read_label

    labelled = []
    for case in dataset.cases.values():
        image = read_images(case.images)[0]
        labelled.append(image[0][read_label(case.label)[0][0] > 0])
    labelled = np.concatenate(labelled)
    fg = fp["foreground_intensity_properties_per_channel"]["0"]
    assert fg["mean"] == pytest.approx(labelled.mean(), rel=1e-9)
    assert fg["min"] == pytest.approx(labelled.min())


def test_anomaly_masks_do_not_define_the_foreground(tmp_path):
    _, fp = _fingerprint(tmp_path, "anomaly_2d", num_cases=4)
    assert fp["foreground_definition"] == FOREGROUND_NONZERO
    assert fp["spatial_dims"] == 2 and fp["anisotropy"] == 1.0
    assert set(fp["label_statistics"]) == {"background", "lesion"}


def test_rgb_complex_and_translation_flags(tmp_path):
    _, rgb = _fingerprint(tmp_path, "2d_rgb_png", dataset_id=2)
    assert rgb["is_rgb"] and not rgb["is_complex"]
    assert [c["modality"] for c in rgb["channels"]] == ["microscopy_rgb"] * 3
    assert set(rgb["intensity_properties_per_channel"]) == {"0", "1", "2"}
    assert rgb["target_intensity_properties_per_channel"] == {}

    complex_dataset, cplx = _fingerprint(tmp_path, "complex_npy", dataset_id=3)
    assert cplx["is_complex"] and cplx["spatial_dims"] == 2
    assert cplx["median_spacing"] == [999.0, 0.5, 0.5]
    magnitudes = np.concatenate([np.abs(read_images(c.images)[0]).ravel()
                                 for c in complex_dataset.cases.values()]).astype(np.float64)
    assert cplx["intensity_properties_per_channel"]["0"]["max"] == pytest.approx(magnitudes.max())
    assert cplx["intensity_properties_per_channel"]["0"]["mean"] == pytest.approx(magnitudes.mean(), rel=1e-9)
    assert cplx["dataset_size"]["bytes_float32"] == 3 * 32 * 32 * 2 * 4  # real/imag pairs

    _, translation = _fingerprint(tmp_path, "translation", dataset_id=4)
    roles = [(c["role"], c["modality"]) for c in translation["channels"]]
    assert roles == [("image", "mr"), ("target", "ct")]
    target = translation["target_intensity_properties_per_channel"]["0"]
    assert target["min"] < -1000 and target["max"] > 1000
    assert translation["target_foreground_intensity_properties_per_channel"]["0"]["min"] > -1024


def test_ct_without_negative_values_is_warned_about(tmp_path, caplog):
    folder = make_example_dataset("3d_ct", tmp_path / "raw", 5, num_cases=2, seed=0)
    for path in sorted((folder / "imagesTr").iterdir()):
        image, props = read_images([path])
        write_image(image + 1024.0, props, path)  # raw stored values: rescale intercept not applied
    with caplog.at_level(logging.WARNING):
        fp = extract_fingerprint(load_dataset(folder))
    assert len(fp["warnings"]) == 1 and "CT" in fp["warnings"][0] and "no negative" in fp["warnings"][0]
    assert "no negative values" in caplog.text


def test_missing_channel_name_modality_is_other(tmp_path):
    folder = make_example_dataset("3d_mr", tmp_path / "raw", 6, num_cases=2, seed=0)
    spec = load_json(folder / "dataset.json")
    spec["channel_names"] = {"0": "noNorm"}
    save_json(spec, folder / "dataset.json")
    fp = extract_fingerprint(load_dataset(folder))
    assert fp["channels"][0]["modality"] == "other"


# --------------------------------------------------------------------------- seeded sampling


@pytest.fixture
def small_sample_budget(monkeypatch):
    """Force sampling (the example cases are smaller than the real budget, which takes every voxel)."""
    monkeypatch.setattr(extractor, "MAX_SAMPLES_TOTAL", 3 * 500)


def test_sampling_is_deterministic_under_the_seed(tmp_path, small_sample_budget):
    folder = make_example_dataset("3d_mr", tmp_path / "raw", 7, num_cases=3, seed=0)
    dataset = load_dataset(folder)
    first = extract_fingerprint(dataset, seed=11)
    assert first["sampling"]["max_samples_per_case"] == 500
    assert extract_fingerprint(dataset, seed=11) == first
    other = extract_fingerprint(dataset, seed=12)
    key = "intensity_properties_per_channel"
    assert other[key]["0"]["median"] != first[key]["0"]["median"]  # a different sample was drawn
    assert other[key]["0"]["mean"] == first[key]["0"]["mean"]  # exact statistics do not sample


def test_two_processes_give_the_same_fingerprint_as_one(tmp_path, small_sample_budget):
    folder = make_example_dataset("translation", tmp_path / "raw", 8, num_cases=3, seed=0)
    dataset = load_dataset(folder)
    assert extract_fingerprint(dataset, num_processes=2) == extract_fingerprint(dataset, num_processes=1)


# --------------------------------------------------------------------------- arrays only


def test_analyze_case_on_arrays_with_minus_1024_background():
    image = np.full((1, 4, 8, 8), -1024.0, dtype=np.float32)
    image[0, 1:3, 2:6, 3:5] = np.arange(16, dtype=np.float32).reshape(2, 4, 2) * 10
    props = properties_3d((2.0, 1.0, 1.0), (4, 8, 8))
    stats = analyze_case(image, props, identifier="x")
    assert stats.shape_after_crop == [2, 4, 2]
    fg = stats.images[0].foreground.summary()
    assert fg["min"] == 0.0 and fg["max"] == 150.0 and stats.images[0].foreground.count == 16
    fp = assemble_fingerprint([stats], {"0": "CT"})
    assert fp["median_relative_size_after_cropping"] == pytest.approx(16 / 256)
    assert fp["warnings"] == []  # -1024 is negative: a plausible CT


def test_statistics_merge_equals_direct_computation():
    from nndiff.fingerprint.statistics import PartialStats, merge_all

    rng = np.random.default_rng(0)
    parts = [rng.normal(loc=i * 100, scale=i + 1, size=50 + 7 * i) for i in range(5)]
    merged = merge_all([PartialStats.from_values(p, 10**6, rng) for p in parts]).summary()
    allv = np.concatenate(parts)
    assert merged["mean"] == pytest.approx(allv.mean(), rel=1e-12)
    assert merged["std"] == pytest.approx(allv.std(), rel=1e-10)
    assert merged["median"] == pytest.approx(np.median(allv), rel=1e-6)
    assert (merged["min"], merged["max"]) == (allv.min(), allv.max())


def test_empty_foreground_falls_back_to_whole_image_statistics_with_a_warning():
    image = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)
    label = np.zeros((1, 1, 8, 8), dtype=np.uint8)
    stats = analyze_case(image, properties_3d((999.0, 1.0, 1.0), (1, 8, 8)), label=label, identifier="x")
    fp = assemble_fingerprint([stats], {"0": "grey"}, labels={"background": 0, "a": 1},
                              foreground_definition=FOREGROUND_LABEL)
    assert fp["foreground_intensity_properties_per_channel"]["0"] == fp["intensity_properties_per_channel"]["0"]
    assert fp["foreground_intensity_properties_per_channel"]["0"]["max"] == 63.0
    assert any("no foreground voxels" in w for w in fp["warnings"])
    assert fp["label_statistics"]["background"]["voxel_fraction"] == 1.0
    assert fp["label_statistics"]["a"]["num_cases_present"] == 0
