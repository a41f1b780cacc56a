"""Round trip: preprocess a raw example dataset, invert every stored case, compare with the raw files.

Exactness: where no resampling happens the inverse must reproduce every voxel inside the clip
window to 1e-4 of the image's largest magnitude (float32 storage of values in [-1, 1] allows
~6e-8 of the window width), voxels the window clipped come back as the window edge, and the
geometry (shape, spacing, origin, direction) is identical.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from preprocessing_helpers import config, make_plans, norm_entry

from nndiff.dataset import load_dataset, make_example_dataset
from nndiff.dataset.io import read_images, read_label
from nndiff.preprocessing import invert_case, load_case, preprocess_dataset

EXACT_RTOL = 1e-4


def _preprocess(tmp_path: Path, kind: str, plans: dict, name: str, num_cases: int = 2):
    folder = make_example_dataset(kind, tmp_path / "raw", 1, num_cases=num_cases, seed=3)
    dataset = load_dataset(folder)
    fractions = preprocess_dataset(dataset, plans, [name], tmp_path / "pre")
    return dataset, tmp_path / "pre" / f"nnDiffPlans_{name}", fractions


def _assert_geometry_equal(props, original_props) -> None:
    assert tuple(props.shape) == tuple(original_props.shape)
    assert props.spacing == original_props.spacing
    assert props.origin == original_props.origin
    assert props.direction == original_props.direction
    assert props.spatial_dims == original_props.spatial_dims


def _assert_exact_in_window(restored: np.ndarray, original: np.ndarray, lo: float, hi: float) -> None:
    """Exact inside [lo, hi]; a clipped voxel is the window edge or (outside the crop box) itself."""
    assert restored.shape == original.shape
    scale = max(1.0, float(np.abs(original).max()))
    inside = (original >= lo) & (original <= hi)
    assert inside.mean() > 0.5, "test data should mostly lie inside the window"
    err = np.abs(restored.astype(np.float64) - original)[inside]
    assert err.max() <= EXACT_RTOL * scale, err.max()
    outside = ~inside
    edge = np.where(original[outside] < lo, lo, hi)
    ok = np.isclose(restored[outside], edge, atol=EXACT_RTOL * scale) | (restored[outside] == original[outside])
    assert ok.all()


def _round_trip(dataset, folder: Path, plans: dict, name: str, check) -> int:
    checked = 0
    for identifier, case in dataset.cases.items():
        arrays, case_json = load_case(folder, identifier)
        assert arrays["data"].dtype == np.float32
        restored, props = invert_case(arrays["data"], case_json, plans, name, kind="data")
        original, original_props = read_images(case.images)
        _assert_geometry_equal(props, original_props)
        check(restored, original, case_json)
        checked += 1
    return checked


def test_2d_grey_png_exact_with_clip_window(tmp_path):
    lo, hi = 15.0, 200.0
    plans = make_plans([norm_entry(0, "dataset_percentile", clip_low=lo, clip_high=hi)],
                       configurations={"2d": config([1.0, 1.0], spatial_dims=2)})
    dataset, folder, fractions = _preprocess(tmp_path, "2d_grey_png", plans, "2d")
    assert _round_trip(dataset, folder, plans, "2d",
                       lambda r, o, _: _assert_exact_in_window(r, o, lo, hi)) == 2
    assert 0.0 < fractions["images"]["0"] < 0.5  # the window clips the dark background and the bright blob


def test_2d_rgb_exact(tmp_path):
    plans = make_plans([norm_entry(c, "rgb") for c in range(3)],
                       configurations={"2d": config([1.0, 1.0], spatial_dims=2)})
    dataset, folder, fractions = _preprocess(tmp_path, "2d_rgb_png", plans, "2d")
    arrays, _ = load_case(folder, sorted(dataset.cases)[0])
    assert arrays["data"].shape[0] == 3 and arrays["data"].min() >= -1 and arrays["data"].max() <= 1

    def check(restored, original, _):
        assert restored.shape[0] == 3
        np.testing.assert_allclose(restored, original, atol=EXACT_RTOL * 255, rtol=0)
        assert restored.min() >= 0 and restored.max() <= 255

    assert _round_trip(dataset, folder, plans, "2d", check) == 2
    assert fractions["images"] == {"0": 0.0, "1": 0.0, "2": 0.0}


def test_anisotropic_ct_in_hu_exact_with_transpose(tmp_path):
    lo, hi = -1000.0, 1600.0  # -1024 air padding lies outside: clipped inside the box, restored outside
    spacing = [3.0, 0.800000011920929, 0.800000011920929]  # the example's (z, y, x) in float32
    forward = [0, 2, 1]
    plans = make_plans([norm_entry(0, "ct_window", clip_low=lo, clip_high=hi)], transpose=forward,
                       configurations={"3d_fullres": config([spacing[a] for a in forward])})
    dataset, folder, _ = _preprocess(tmp_path, "3d_ct", plans, "3d_fullres")
    identifier = sorted(dataset.cases)[0]
    arrays, case_json = load_case(folder, identifier)
    assert case_json["images"]["background"] == [-1024.0]
    assert case_json["shape_after_crop"] != case_json["shape_before_crop"], "the air padding is cropped"
    assert case_json["shape_after_resampling"] == case_json["shape_after_crop"]
    original, _ = read_images(dataset.cases[identifier].images)
    assert list(arrays["data"].shape[1:]) == case_json["shape_after_crop"]
    assert case_json["shape_before_crop"] == [original.shape[1 + a] for a in forward]

    def check(restored, original, case_json):
        _assert_exact_in_window(restored, original, lo, hi)
        bbox_mask = np.zeros(original.shape[1:], dtype=bool)
        box = case_json["bbox"]  # transposed axes; map back to the raw axis order
        raw_box = [box[forward.index(a)] for a in range(3)]
        bbox_mask[tuple(slice(a, b) for a, b in raw_box)] = True
        # outside the box the padding value -1024 comes back exactly, although it is outside the window
        assert np.all(restored[0][~bbox_mask] == -1024.0)

    assert _round_trip(dataset, folder, plans, "3d_fullres", check) == 2


def test_isotropic_mr_exact_with_transpose(tmp_path):
    lo, hi = 0.0, 500.0
    plans = make_plans([norm_entry(0, "dataset_percentile", clip_low=lo, clip_high=hi)],
                       transpose=[1, 2, 0], configurations={"3d_fullres": config([1.0, 1.0, 1.0])})
    dataset, folder, fractions = _preprocess(tmp_path, "3d_mr", plans, "3d_fullres")
    assert _round_trip(dataset, folder, plans, "3d_fullres",
                       lambda r, o, _: _assert_exact_in_window(r, o, lo, hi)) == 2
    assert 0.0 < fractions["images"]["0"] < 0.5  # the bright core (~600) is clipped


def test_complex_npy_exact_as_real_imag_pairs(tmp_path):
    plans = make_plans([norm_entry(0, "scale_only", scale=300.0)],
                       configurations={"2d": config([0.5, 0.5], spatial_dims=2, crop=False)})
    dataset, folder, fractions = _preprocess(tmp_path, "complex_npy", plans, "2d")
    arrays, case_json = load_case(folder, sorted(dataset.cases)[0])
    assert arrays["data"].shape[0] == 2 and case_json["images"]["is_complex"]
    assert case_json["images"]["layout"] == "real_imag_pairs"

    def check(restored, original, _):
        assert restored.dtype == np.complex64 and np.iscomplexobj(original)
        scale = float(np.abs(original).max())
        assert np.abs(restored - original).max() <= EXACT_RTOL * scale

    assert _round_trip(dataset, folder, plans, "2d", check) == 2
    assert fractions["images"]["0"] == 0.0  # scale_only never clips


def test_translation_targets_and_per_image_inputs(tmp_path):
    plans = make_plans([norm_entry(0, "per_image_percentile", low_percentile=0.5, high_percentile=99.5)],
                       targets=[norm_entry(0, "ct_window", clip_low=-1024.0, clip_high=1500.0)],
                       configurations={"3d_fullres": config([2.0, 1.0, 1.0])})
    dataset, folder, fractions = _preprocess(tmp_path, "translation", plans, "3d_fullres")
    assert set(fractions) == {"images", "targets"}
    for identifier, case in dataset.cases.items():
        arrays, case_json = load_case(folder, identifier)
        values = case_json["images"]["normalization"][0]["image_values"]
        assert values["hi"] > values["lo"]
        restored, _ = invert_case(arrays["data"], case_json, plans, "3d_fullres", kind="data")
        original, _ = read_images(case.images)
        _assert_exact_in_window(restored, original, values["lo"], values["hi"])
        target, target_props = invert_case(arrays["target"], case_json, plans, "3d_fullres", kind="target")
        original_target, original_target_props = read_images(case.targets)
        _assert_geometry_equal(target_props, original_target_props)
        scale = float(np.abs(original_target).max())
        assert np.abs(target - original_target).max() <= EXACT_RTOL * scale


def test_label_maps_round_trip_exactly_without_resampling(tmp_path):
    plans = make_plans([norm_entry(c, "dataset_percentile", clip_low=0.0, clip_high=1500.0) for c in range(2)],
                       configurations={"3d_fullres": config([2.0, 1.0, 1.0])})
    dataset, folder, _ = _preprocess(tmp_path, "nnunet_seg", plans, "3d_fullres")
    for identifier, case in dataset.cases.items():
        arrays, case_json = load_case(folder, identifier)
        assert arrays["seg"].dtype == np.int16
        restored, props = invert_case(arrays["seg"], case_json, plans, "3d_fullres", kind="seg")
        original, original_props = read_label(case.label)
        _assert_geometry_equal(props, original_props)
        assert restored.dtype == original.dtype
        np.testing.assert_array_equal(restored, original)


@pytest.mark.parametrize("kind", ["seg", "data"])
def test_invert_rejects_an_array_of_the_wrong_shape(tmp_path, kind):
    plans = make_plans([norm_entry(0, "dataset_percentile", clip_low=0.0, clip_high=255.0)],
                       configurations={"2d": config([1.0, 1.0], spatial_dims=2)})
    dataset, folder, _ = _preprocess(tmp_path, "2d_grey_png", plans, "2d", num_cases=1)
    arrays, case_json = load_case(folder, sorted(dataset.cases)[0])
    with pytest.raises(ValueError, match="shape"):
        invert_case(arrays["data"][:, :, 1:], case_json, plans, "2d", kind=kind)
