"""Unit tests of the single steps: crop rule, normalization schemes, resampling, transpose, complex."""
from __future__ import annotations

import numpy as np
import pytest
from preprocessing_helpers import config, edge_aligned_coordinates, gaussian_blob, make_plans, norm_entry

from nndiff.dataset.examples import properties_2d, properties_3d
from nndiff.errors import PlansError
from nndiff.preprocessing import invert_case, preprocess_case
from nndiff.preprocessing import normalization as norm
from nndiff.preprocessing.cropping import bbox_from_mask, channel_background_values, crop, nonzero_mask, uncrop
from nndiff.preprocessing.layout import from_real_channels, to_real_channels, transpose_array
from nndiff.preprocessing.resampling import (
    DATA_DEFAULTS,
    LABEL_DEFAULTS,
    ResamplingSettings,
    coarse_axis,
    compute_new_shape,
    resample,
    settings_from_config,
)

# --------------------------------------------------------------------------- cropping


def test_background_is_corner_minimum_else_zero():
    ct = np.full((1, 4, 6, 6), -1024.0)
    ct[0, 1:3, 2:4, 1:5] = 40.0
    mr = np.zeros((1, 4, 6, 6))
    mr[0, 1:3, 1:5, 2:4] = 300.0
    no_background = np.arange(144, dtype=float).reshape(1, 4, 6, 6) - 10  # corners differ
    assert channel_background_values(np.concatenate([ct, mr, no_background])) == [-1024.0, 0.0, 0.0]


def test_crop_box_covers_every_channel_and_uncrop_restores_exactly():
    images = np.full((2, 5, 8, 8), -1024.0)
    images[1] = 0.0
    images[0, 2, 3:5, 1:3] = 100.0
    images[1, 1, 6, 6] = 7.0  # second channel extends the box
    background = channel_background_values(images)
    box = bbox_from_mask(nonzero_mask(images, background))
    assert box == [[1, 3], [3, 7], [1, 7]]
    restored = uncrop(crop(images, box), box, images.shape[1:], background)
    np.testing.assert_array_equal(restored, images)


def test_constant_image_is_not_cropped():
    assert bbox_from_mask(np.zeros((3, 4, 5), dtype=bool)) == [[0, 3], [0, 4], [0, 5]]


# --------------------------------------------------------------------------- normalization


@pytest.mark.parametrize(
    "entry",
    [
        norm_entry(0, "ct_window", clip_low=-1000.0, clip_high=1000.0),
        norm_entry(0, "dataset_percentile", clip_low=-3.0, clip_high=5.0),
        norm_entry(0, "rgb"),
        norm_entry(0, "scale_only", scale=250.0),
        norm_entry(0, "none"),
    ],
    ids=lambda e: e["scheme"],
)
def test_scheme_inverse_is_exact_inside_the_window(entry):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1500, 1500, size=4096)
    bounds = norm.window(entry)
    y = norm.normalize(x, entry)
    back = norm.denormalize(y.astype(np.float32), entry)
    if bounds is None:
        np.testing.assert_allclose(back, x, rtol=1e-6)
        return
    lo, hi = bounds
    assert y.min() >= -1.0 and y.max() <= 1.0
    inside = (x >= lo) & (x <= hi)
    np.testing.assert_allclose(back[inside], x[inside], atol=1e-6 * (hi - lo), rtol=0)
    np.testing.assert_allclose(back[~inside], np.clip(x[~inside], lo, hi), atol=1e-6 * (hi - lo), rtol=0)
    clipped, total = norm.clip_counts(x, entry)
    assert (clipped, total) == (int((~inside).sum()), x.size)


def test_window_maps_to_minus_one_and_one():
    entry = norm_entry(0, "ct_window", clip_low=-1000.0, clip_high=1000.0)
    np.testing.assert_allclose(norm.normalize(np.array([-1000.0, 0.0, 1000.0]), entry), [-1.0, 0.0, 1.0])


def test_per_image_percentile_uses_the_image_values():
    entry = norm_entry(0, "per_image_percentile", low_percentile=1.0, high_percentile=99.0)
    x = np.linspace(0.0, 100.0, 1001)
    values = norm.per_image_values(x, entry)
    assert values == pytest.approx({"lo": 1.0, "hi": 99.0})
    y = norm.normalize(x, entry, values)
    assert y.min() == -1.0 and y.max() == 1.0
    with pytest.raises(ValueError, match="per_image_percentile"):
        norm.denormalize(y, entry)  # without the stored values there is no inverse


@pytest.mark.parametrize("entry, message", [
    (norm_entry(0, "ct_window", clip_low=100.0, clip_high=-100.0), "empty"),
    (norm_entry(0, "dataset_percentile"), "clip_low"),
    ({"channel": 0, "scheme": "zscore", "params": {}}, "zscore"),
])
def test_bad_normalization_entries_are_plans_errors(entry, message):
    with pytest.raises(PlansError, match=message):
        norm.normalize(np.zeros(3), entry)


# --------------------------------------------------------------------------- resampling


def test_new_shape_keeps_length_one_axes():
    assert compute_new_shape([1, 32, 32], [999.0, 1.0, 1.0], [1.0, 0.5, 2.0]) == [1, 64, 16]
    assert compute_new_shape([12, 24, 24], [3.0, 0.8, 0.8], [1.5, 0.8, 1.6]) == [24, 24, 12]


def test_separate_axis_rule():
    assert coarse_axis([3.0, 0.8, 0.8], [3.0, 0.8, 0.8], DATA_DEFAULTS) == 0  # 3.75 > 3
    assert coarse_axis([0.8, 0.8, 2.0], [0.8, 0.8, 2.0], DATA_DEFAULTS) is None  # 2.5 <= 3
    assert coarse_axis([1.0, 1.0, 1.0], [0.5, 0.5, 2.0], DATA_DEFAULTS) == 2  # the new spacing decides
    assert coarse_axis([3.0, 3.0, 0.8], [3.0, 3.0, 0.8], DATA_DEFAULTS) is None  # two coarse axes
    forced = ResamplingSettings(force_separate_z=False)
    assert coarse_axis([3.0, 0.8, 0.8], [3.0, 0.8, 0.8], forced) is None


def test_settings_from_plans_block():
    block = {"resampling": {"data": {"order": 1, "separate_z_anisotropy_threshold": 2.0},
                            "seg": {"order": 0, "per_label": True}}}
    assert settings_from_config(block, "data") == ResamplingSettings(order=1, order_z=0,
                                                                    separate_z_anisotropy_threshold=2.0)
    assert settings_from_config(block, "target").order == 1  # targets follow the data block
    assert settings_from_config(block, "seg").order == 0
    assert settings_from_config({}, "seg") == LABEL_DEFAULTS


def test_cubic_resampling_reproduces_a_smooth_field_on_the_edge_aligned_grid():
    """Upsampled values equal the analytic blob at the new voxel centres (edge-aligned grids).

    The blob (sigma 3 voxels) is smooth, so cubic interpolation error is ~4e-3 of its peak; a
    grid misaligned by half a voxel would be off by ~4e-2.
    """
    shape, sigma = (16, 16, 16), (3.0, 3.0, 3.0)
    volume = gaussian_blob(shape, sigma)[None]
    new_shape = compute_new_shape(shape, [1.0] * 3, [0.6] * 3)
    up = resample(volume, new_shape, [1.0] * 3, [0.6] * 3, DATA_DEFAULTS)
    coords = [edge_aligned_coordinates(o, n) for o, n in zip(shape, new_shape)]
    expected = gaussian_blob(shape, sigma, coords=coords)
    assert np.abs(up[0] - expected).max() < 1e-2


def test_coarse_axis_is_resampled_with_nearest_neighbour():
    volume = np.random.default_rng(1).normal(size=(1, 4, 8, 8))
    out = resample(volume, [8, 8, 8], [3.0, 0.8, 0.8], [1.5, 0.8, 0.8], DATA_DEFAULTS)
    for k in range(8):  # every new slice is an exact copy of one original slice (order_z = 0)
        assert any(np.allclose(out[0, k], volume[0, j], atol=1e-6) for j in range(4))


def test_linear_per_label_resampling_keeps_labels_and_blocks():
    seg = np.zeros((1, 1, 8, 8), dtype=np.int16)
    seg[0, 0, 2:6, 2:4] = 1
    seg[0, 0, 2:6, 4:6] = 2
    up = resample(seg, [1, 16, 16], [999.0, 1.0, 1.0], [999.0, 0.5, 0.5], LABEL_DEFAULTS, is_seg=True)
    assert up.dtype == np.int16 and set(np.unique(up)) == {0, 1, 2}
    back = resample(up, [1, 8, 8], [999.0, 0.5, 0.5], [999.0, 1.0, 1.0], LABEL_DEFAULTS, is_seg=True)
    np.testing.assert_array_equal(back, seg)


# --------------------------------------------------------------------------- layout


def test_complex_pairs_and_transpose_round_trip():
    rng = np.random.default_rng(2)
    z = (rng.normal(size=(2, 3, 4, 5)) + 1j * rng.normal(size=(2, 3, 4, 5))).astype(np.complex64)
    real, is_complex = to_real_channels(z)
    assert is_complex and real.shape == (4, 3, 4, 5)
    np.testing.assert_array_equal(real[2], z[1].real)
    np.testing.assert_array_equal(real[3], z[1].imag)
    np.testing.assert_array_equal(from_real_channels(real, True), z)
    moved = transpose_array(real, [2, 0, 1])
    assert moved.shape == (4, 5, 3, 4)
    np.testing.assert_array_equal(transpose_array(moved, [1, 2, 0]), real)


# --------------------------------------------------------------------------- whole case, in memory


def test_resampled_round_trip_is_within_interpolation_error_and_keeps_geometry():
    """Isotropic 1 mm → 0.6 mm and back: smooth content returns within 5e-3 of its peak (measured
    ~4e-4; a wrong grid or order would give > 1e-2); shape and geometry are the original ones."""
    shape = (16, 16, 16)
    volume = (1000.0 * gaussian_blob(shape, (3.0, 3.0, 3.0)))[None].astype(np.float32)
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    props = properties_3d((1.0, 1.0, 1.0), shape, origin=(-8.0, 2.0, 5.0), direction=direction)
    plans = make_plans([norm_entry(0, "dataset_percentile", clip_low=0.0, clip_high=1000.0)],
                       configurations={"fine": config([0.6, 0.6, 0.6], crop=False)})
    arrays, case_json = preprocess_case(volume, props, plans, "fine")
    assert list(arrays["data"].shape) == [1, 27, 27, 27]
    restored, restored_props = invert_case(arrays["data"], case_json, plans, "fine")
    assert restored.shape == volume.shape and restored_props.origin == props.origin
    assert restored_props.spacing == props.spacing and restored_props.direction == direction
    assert np.abs(restored - volume).max() < 5e-3 * 1000.0


def test_anisotropic_upsampling_along_z_round_trips_exactly():
    """3 mm slices → 1.5 mm by nearest neighbour (separate z), then back: every slice survives."""
    rng = np.random.default_rng(3)
    volume = rng.uniform(-900, 900, size=(1, 6, 12, 12)).astype(np.float32)
    props = properties_3d((3.0, 0.8, 0.8), (6, 12, 12))
    plans = make_plans([norm_entry(0, "ct_window", clip_low=-1000.0, clip_high=1000.0)],
                       configurations={"z": config([1.5, 0.8, 0.8])})
    arrays, case_json = preprocess_case(volume, props, plans, "z")
    assert arrays["data"].shape == (1, 12, 12, 12)
    restored, _ = invert_case(arrays["data"], case_json, plans, "z")
    np.testing.assert_allclose(restored, volume, atol=1e-4 * 1000, rtol=0)


def test_2d_configuration_of_3d_data_keeps_the_slice_axis():
    volume = np.ones((1, 5, 8, 8), dtype=np.float32)
    props = properties_3d((2.5, 1.0, 1.0), (5, 8, 8))
    plans = make_plans([norm_entry(0, "none")], configurations={"2d": config([0.5, 0.5], spatial_dims=2)})
    arrays, case_json = preprocess_case(volume, props, plans, "2d")
    assert arrays["data"].shape == (1, 5, 16, 16)
    assert case_json["spacing_after_resampling"] == [2.5, 0.5, 0.5]


def test_2d_image_is_never_resampled_along_its_dummy_axis():
    image = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)
    plans = make_plans([norm_entry(0, "none")], configurations={"2d": config([1.0, 0.5, 0.5])})
    arrays, case_json = preprocess_case(image, properties_2d(shape=(8, 8)), plans, "2d")
    assert arrays["data"].shape == (1, 1, 16, 16)
    assert case_json["spacing_after_resampling"][0] == 999.0


def test_case_json_holds_what_the_inverse_needs():
    image = np.zeros((1, 1, 8, 8), dtype=np.float32)
    image[0, 0, 2:5, 3:7] = 50.0
    plans = make_plans([norm_entry(0, "dataset_percentile", clip_low=0.0, clip_high=100.0)],
                       configurations={"2d": config([1.0, 1.0], spatial_dims=2)})
    arrays, case_json = preprocess_case(image, properties_2d(shape=(8, 8)), plans, "2d", identifier="c1")
    for key in ("properties", "transpose_forward", "transpose_backward", "shape_before_crop", "bbox",
                "shape_after_crop", "spacing_before_resampling", "spacing_after_resampling",
                "shape_after_resampling", "resampling", "images"):
        assert key in case_json, key
    assert case_json["bbox"] == [[0, 1], [2, 5], [3, 7]]
    assert case_json["images"]["normalization"][0]["scheme"] == "dataset_percentile"
    assert arrays["data"].shape == (1, 1, 3, 4)


def test_prediction_time_target_inverse_uses_the_plans():
    """A case preprocessed without targets (prediction) still maps a predicted target back:
    dataset-level window from the plans, padding with the window's low edge outside the box."""
    image = np.zeros((1, 1, 8, 8), dtype=np.float32)
    image[0, 0, 2:6, 2:6] = 300.0
    plans = make_plans([norm_entry(0, "per_image_percentile", low_percentile=0.5, high_percentile=99.5)],
                       targets=[norm_entry(0, "ct_window", clip_low=-1000.0, clip_high=1000.0)],
                       configurations={"2d": config([1.0, 1.0], spatial_dims=2)})
    _, case_json = preprocess_case(image, properties_2d(shape=(8, 8)), plans, "2d")
    predicted = np.full((1, 1, 4, 4), 0.5, dtype=np.float32)
    target, props = invert_case(predicted, case_json, plans, "2d", kind="target")
    assert target.shape == (1, 1, 8, 8) and props.shape == (1, 8, 8)
    np.testing.assert_allclose(target[0, 0, 2:6, 2:6], 500.0)
    assert np.all(target[0, 0, :2] == -1000.0)


def test_missing_normalization_entry_is_a_plans_error():
    plans = make_plans([], configurations={"2d": config([1.0, 1.0], spatial_dims=2)})
    with pytest.raises(PlansError, match=r"normalization\.images.*channel"):
        preprocess_case(np.ones((1, 1, 4, 4), dtype=np.float32), properties_2d(shape=(4, 4)), plans, "2d")


def test_generated_sample_maps_to_units_and_configuration_geometry():
    plans = make_plans([norm_entry(0, "ct_window", clip_low=-1000.0, clip_high=1000.0)], transpose=[2, 0, 1],
                       configurations={"3d": config([0.8, 3.0, 0.8]), "2d": config([0.8, 0.8], spatial_dims=2)})
    from nndiff.preprocessing import generated_case_json

    sample = np.zeros((1, 4, 6, 8), dtype=np.float32)
    sample[0, 0, 0, 0] = 1.0
    out, props = invert_case(sample, generated_case_json(plans, "3d", (4, 6, 8)), plans, "3d")
    assert out.shape == (1, 6, 8, 4)  # transposed back to the raw axis order
    assert props.spacing == (3.0, 0.8, 0.8) and props.origin == (0.0, 0.0, 0.0)
    assert out[0, 0, 0, 0] == 1000.0 and np.count_nonzero(out) == 1  # 0 ↦ the window centre, 0 HU
    slice_out, slice_props = invert_case(sample[:, :1], generated_case_json(plans, "2d", (6, 8)), plans, "2d")
    assert slice_out.shape == (1, 1, 6, 8) and slice_props.spatial_dims == 2
    assert slice_props.spacing == (999.0, 0.8, 0.8)
