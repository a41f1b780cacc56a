"""Patch/slice sampling, padding, augmentation and loader determinism (no training)."""
from __future__ import annotations

import numpy as np
import pytest

from nndiff.errors import NnDiffError
from nndiff.training.data import (BatchStream, CaseStore, SamplingSpec, build_validation_set, crop_with_padding,
                                  extraction_size, generate_batch, list_cases, load_case, validation_batches)
from training_helpers import write_case


def _contains_slice_crop(volume: np.ndarray, patch: np.ndarray) -> bool:
    """Whether ``patch`` (C, Y, X) equals some (z, y0, x0) crop of ``volume`` (C, Z, Y, X)."""
    _, z, y, x = volume.shape
    py, px = patch.shape[1:]
    return any(np.array_equal(volume[:, k, i:i + py, j:j + px], patch)
               for k in range(z) for i in range(y - py + 1) for j in range(x - px + 1))


@pytest.fixture()
def volume_store(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(2, 5, 10, 12)).astype(np.float32)
    write_case(tmp_path, "vol", data, seg=(data[:1] > 0), target=2 * data)
    return CaseStore(tmp_path), data


def test_2d_slices_of_3d_data_have_slice_shape_and_content(volume_store):
    store, volume = volume_store
    spec = SamplingSpec((8, 8), 2)
    batch = generate_batch(store, ["vol"], spec, batch_size=4, seed=0, iteration=3)
    assert batch["data"].shape == (4, 2, 8, 8) and batch["data"].dtype == np.float32
    assert batch["seg"].shape == (4, 1, 8, 8) and batch["seg"].dtype == np.int16
    assert batch["target"].shape == (4, 2, 8, 8)
    assert batch["keys"] == ["vol"] * 4 and batch["iteration"] == 3
    for i in range(4):
        assert _contains_slice_crop(volume, batch["data"][i])
        # seg and target are cut at the same place as the image
        np.testing.assert_array_equal(batch["seg"][i, 0], batch["data"][i, 0] > 0)
        np.testing.assert_array_equal(batch["target"][i], 2 * batch["data"][i])


def test_3d_patch_pads_small_axes_with_channel_minimum_and_centres_the_image(tmp_path):
    data = np.arange(3 * 6 * 20, dtype=np.float32).reshape(1, 3, 6, 20) + 5.0
    write_case(tmp_path, "small", data, seg=np.ones((1, 3, 6, 20)))
    store = CaseStore(tmp_path)
    batch = generate_batch(store, ["small"], SamplingSpec((4, 8, 8), 3), batch_size=3, seed=0, iteration=0)
    assert batch["data"].shape == (3, 1, 4, 8, 8) and batch["seg"].shape == (3, 1, 4, 8, 8)
    starts_x = set()
    for patch, seg in zip(batch["data"][:, 0], batch["seg"][:, 0]):
        # z: 3 voxels in 4 -> image at z 0..2, padding at z 3; y: 6 in 8 -> padding at y 0 and 7
        assert np.all(patch[3] == 5.0) and np.all(patch[:, 0] == 5.0) and np.all(patch[:, 7] == 5.0)
        assert np.all(seg[3] == 0) and np.all(seg[:3, 1:7] == 1)
        inner = patch[:3, 1:7]
        x0 = int(inner[0, 0, 0] - 5.0) % 20
        np.testing.assert_array_equal(inner, data[0, :, :, x0:x0 + 8])
        starts_x.add(x0)
    assert len(starts_x) > 1  # x (20 > 8) is sampled at random positions


def test_crop_with_padding_outside_and_per_channel_values():
    array = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    out = crop_with_padding(array, (-2, 3), (3, 3), np.array([-1.0, -2.0], np.float32))
    np.testing.assert_array_equal(out[0, :2], -1.0)
    np.testing.assert_array_equal(out[1, :, 1:], -2.0)
    np.testing.assert_array_equal(out[:, 2, 0], array[:, 0, 3])
    assert np.all(crop_with_padding(array, (10, 10), (2, 2), 0.5) == 0.5)


def test_batches_are_a_function_of_seed_and_iteration(volume_store):
    store, _ = volume_store
    spec = SamplingSpec((8, 8), 2, "mild")
    first = generate_batch(store, ["vol"], spec, 4, seed=5, iteration=11, transform=_transform(spec))
    again = generate_batch(store, ["vol"], spec, 4, seed=5, iteration=11, transform=_transform(spec))
    other_iteration = generate_batch(store, ["vol"], spec, 4, seed=5, iteration=12, transform=_transform(spec))
    other_seed = generate_batch(store, ["vol"], spec, 4, seed=6, iteration=11, transform=_transform(spec))
    for key in ("data", "seg", "target"):
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["data"], other_iteration["data"])
    assert not np.array_equal(first["data"], other_seed["data"])
    # the global numpy stream is untouched by augmentation
    np.random.seed(0)
    expected = np.random.random()
    np.random.seed(0)
    generate_batch(store, ["vol"], spec, 4, seed=5, iteration=11, transform=_transform(spec))
    assert np.random.random() == expected


def _transform(spec):
    from nndiff.training.data import build_augmentation

    return build_augmentation(spec)


def test_mild_augmentation_moves_target_and_seg_with_the_image(volume_store):
    store, _ = volume_store
    spec = SamplingSpec((8, 8), 2, "mild")
    assert extraction_size(spec) > (8, 8)
    changed = 0
    for iteration in range(6):
        batch = generate_batch(store, ["vol"], spec, 8, seed=0, iteration=iteration, transform=_transform(spec))
        assert batch["data"].shape == (8, 2, 8, 8) and batch["seg"].dtype == np.int16
        # linear interpolation is linear: target (= 2 x image) stays 2 x the augmented image
        np.testing.assert_allclose(batch["target"], 2 * batch["data"], rtol=1e-5, atol=1e-5)
        assert set(np.unique(batch["seg"])) <= {0, 1}
        # linear interpolation never leaves the range of the source values
        assert batch["data"].min() >= store["vol"].data.min() - 1e-6
        assert batch["data"].max() <= store["vol"].data.max() + 1e-6
        changed += sum(not _contains_slice_crop(store["vol"].data, d) for d in batch["data"])
    # 20 % rotation and 20 % scaling per sample: 48 samples, P(no change at all) = 0.64^48 ~ 5e-10
    assert changed > 0


def test_multithreaded_stream_equals_single_threaded_from_any_start(volume_store, tmp_path):
    store, _ = volume_store
    spec = SamplingSpec((8, 8), 2, "mild")
    with BatchStream(store, ["vol"], spec, 2, seed=9, start_iteration=3, num_workers=0) as single:
        expected = [next(single) for _ in range(5)]
    with BatchStream(CaseStore(store.folder), ["vol"], spec, 2, seed=9, start_iteration=3, num_workers=2) as multi:
        got = [next(multi) for _ in range(5)]
    assert [b["iteration"] for b in got] == [3, 4, 5, 6, 7]
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a["data"], b["data"])
        np.testing.assert_array_equal(a["seg"], b["seg"])


def test_validation_set_is_fixed_and_capped(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        write_case(tmp_path, f"c{i}", rng.normal(size=(1, 3, 10, 10)))
    store = CaseStore(tmp_path)
    spec = SamplingSpec((8, 8), 2, "mild")
    items = build_validation_set(store, list_cases(tmp_path), spec, seed=1, max_cases=4)
    again = build_validation_set(CaseStore(tmp_path), list_cases(tmp_path), spec, seed=1, max_cases=4)
    assert [i.key for i in items] == ["c0", "c2", "c3", "c5"]  # evenly spread over the sorted cases
    for a, b in zip(items, again):
        np.testing.assert_array_equal(a.arrays["data"], b.arrays["data"])
        assert a.noise_seed == b.noise_seed
    assert len({i.noise_seed for i in items}) == 4
    batches = list(validation_batches(items, 3))
    assert [len(seeds) for _, seeds in batches] == [3, 1]
    assert batches[0][0]["data"].shape == (3, 1, 8, 8)


def test_bad_case_files_fail_with_their_name(tmp_path):
    with pytest.raises(NnDiffError, match="does not exist"):
        list_cases(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NnDiffError, match="no preprocessed cases"):
        list_cases(tmp_path / "empty")
    np.savez(tmp_path / "flat.npz", data=np.zeros((4, 4), np.float32))
    with pytest.raises(NnDiffError, match=r"flat\.npz.*\(C, Z, Y, X\)"):
        load_case(tmp_path / "flat.npz")
    np.savez(tmp_path / "mismatch.npz", data=np.zeros((1, 2, 4, 4), np.float32), seg=np.zeros((1, 2, 4, 5)))
    with pytest.raises(NnDiffError, match=r"mismatch\.npz.*'seg' has spatial shape"):
        load_case(tmp_path / "mismatch.npz")


def test_patch_size_must_match_spatial_dims():
    with pytest.raises(NnDiffError, match="must have 3 entries"):
        SamplingSpec((8, 8), 3)


def test_image_grid_tiles_and_scales(tmp_path):
    import torch

    from nndiff.training import image_grid, save_image_grid

    batch = np.stack([np.full((1, 4, 6), v, np.float32) for v in (-1.0, 0.0, 1.0, 5.0)])
    grid = image_grid(batch, ncols=2, pad=1)
    assert grid.shape == (2 * 5 + 1, 2 * 7 + 1) and grid.dtype == np.uint8
    assert grid[1, 1] == 0 and grid[1, 8] == 128 and grid[6, 1] == 255 and grid[6, 8] == 255  # 5.0 clipped
    volume = torch.zeros(2, 3, 5, 4, 4)
    volume[:, :, 2] = 1.0  # middle slice
    rgb = image_grid(volume, ncols=2, pad=0)
    assert rgb.shape == (4, 8, 3) and np.all(rgb == 255)
    save_image_grid(batch, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
