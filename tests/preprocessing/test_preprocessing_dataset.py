"""Dataset-level preprocessing: folders, skipped configurations, atomicity, worker processes."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from preprocessing_helpers import config, make_plans, norm_entry

from nndiff.dataset import load_dataset, make_example_dataset
from nndiff.errors import DatasetError, PlansError
from nndiff.preprocessing import load_case, preprocess_dataset


def _mr_plans(**configurations):
    return make_plans([norm_entry(0, "dataset_percentile", clip_low=0.0, clip_high=500.0)],
                      configurations=configurations)


@pytest.fixture
def mr_dataset(tmp_path):
    return load_dataset(make_example_dataset("3d_mr", tmp_path / "raw", 4, num_cases=3, seed=1))


def test_writes_one_folder_per_configuration_and_skips_untrainable(mr_dataset, tmp_path, caplog):
    plans = _mr_plans(**{
        "3d_fullres": config([1.0, 1.0, 1.0]),
        "2d": config([1.0, 1.0], spatial_dims=2),
        "3d_latent": {**config([1.0, 1.0, 1.0]), "trainable": False, "status": "planned, not trainable yet",
                      "data_identifier": "nnDiffPlans_3d_fullres"},
    })
    with caplog.at_level(logging.INFO, logger="nndiff.preprocessing"):
        fractions = preprocess_dataset(mr_dataset, plans, ["3d_fullres", "2d", "3d_latent"], tmp_path / "pre")
    assert "skipping configuration 3d_latent" in caplog.text
    for name in ("3d_fullres", "2d"):
        folder = tmp_path / "pre" / f"nnDiffPlans_{name}"
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{c}{ext}" for c in mr_dataset.cases for ext in (".npz", ".json"))
    assert sorted(p.name for p in (tmp_path / "pre").iterdir()) == ["nnDiffPlans_2d", "nnDiffPlans_3d_fullres"]
    assert set(fractions) == {"images"} and 0.0 < fractions["images"]["0"] < 1.0


def test_clip_fraction_is_the_fraction_of_voxels_outside_the_window(mr_dataset, tmp_path):
    from nndiff.dataset.io import read_images

    plans = _mr_plans(full=config([1.0, 1.0, 1.0], crop=False))
    fractions = preprocess_dataset(mr_dataset, plans, ["full"], tmp_path / "pre")
    images = [read_images(case.images)[0] for case in mr_dataset.cases.values()]
    expected = sum(int(((x < 0) | (x > 500)).sum()) for x in images) / sum(x.size for x in images)
    assert fractions["images"]["0"] == pytest.approx(expected, abs=0)


def test_a_failing_case_leaves_no_folder(mr_dataset, tmp_path):
    victim = sorted(mr_dataset.cases.values(), key=lambda c: c.identifier)[-1].images[0]
    victim.write_bytes(b"not an image")
    plans = _mr_plans(**{"3d_fullres": config([1.0, 1.0, 1.0])})
    with pytest.raises(DatasetError, match=victim.name):
        preprocess_dataset(mr_dataset, plans, ["3d_fullres"], tmp_path / "pre")
    assert list((tmp_path / "pre").iterdir()) == []  # neither the folder nor a temporary one


def test_a_failure_keeps_the_previous_complete_folder(mr_dataset, tmp_path):
    plans = _mr_plans(**{"3d_fullres": config([1.0, 1.0, 1.0])})
    preprocess_dataset(mr_dataset, plans, ["3d_fullres"], tmp_path / "pre")
    folder = tmp_path / "pre" / "nnDiffPlans_3d_fullres"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    sorted(mr_dataset.cases.values(), key=lambda c: c.identifier)[0].images[0].write_bytes(b"broken")
    with pytest.raises(DatasetError):
        preprocess_dataset(mr_dataset, plans, ["3d_fullres"], tmp_path / "pre")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in (tmp_path / "pre").iterdir()] == ["nnDiffPlans_3d_fullres"]


def test_inherited_configuration_that_changes_spacing_needs_its_own_folder(mr_dataset, tmp_path):
    plans = _mr_plans(**{"3d_fullres": config([1.0, 1.0, 1.0], data_identifier="nnDiffPlans_3d_fullres")})
    plans["configurations"]["coarse"] = {"inherits_from": "3d_fullres", "spacing": [2.0, 2.0, 2.0]}
    with pytest.raises(PlansError, match="coarse.*data_identifier"):
        preprocess_dataset(mr_dataset, plans, ["coarse"], tmp_path / "pre")
    plans["configurations"]["coarse"]["data_identifier"] = "nnDiffPlans_coarse"
    preprocess_dataset(mr_dataset, plans, ["coarse"], tmp_path / "pre")
    arrays, case_json = load_case(tmp_path / "pre" / "nnDiffPlans_coarse", sorted(mr_dataset.cases)[0])
    assert case_json["spacing_after_resampling"] == [2.0, 2.0, 2.0]
    assert arrays["data"].shape[1] < case_json["shape_after_crop"][0]


def test_two_worker_processes_write_the_same_files_as_one(mr_dataset, tmp_path):
    plans = _mr_plans(**{"3d_fullres": config([0.8, 0.8, 0.8])})
    one = preprocess_dataset(mr_dataset, plans, ["3d_fullres"], tmp_path / "a", num_processes=1)
    two = preprocess_dataset(mr_dataset, plans, ["3d_fullres"], tmp_path / "b", num_processes=2)
    assert one == two
    for identifier in mr_dataset.cases:
        a_arrays, a_json = load_case(tmp_path / "a" / "nnDiffPlans_3d_fullres", identifier)
        b_arrays, b_json = load_case(tmp_path / "b" / "nnDiffPlans_3d_fullres", identifier)
        assert a_json == b_json
        np.testing.assert_array_equal(a_arrays["data"], b_arrays["data"])
