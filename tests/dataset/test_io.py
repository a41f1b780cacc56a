"""Readers/writers keep geometry, dtypes and values; writes are atomic; SimpleITK stays lazy."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from nndiff.dataset.examples import CT_DIRECTION, make_example_dataset, properties_2d, properties_3d
from nndiff.dataset.io import (
    ImageProperties,
    file_ending_of,
    read_file,
    read_images,
    read_label,
    write_image,
)
from nndiff.errors import DatasetError, NnDiffError

GEOMETRY_3D = properties_3d((2.5, 0.7, 0.9), (6, 8, 10), origin=(1.5, -2.0, 30.0),
                            direction=CT_DIRECTION)


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_medical_round_trip_keeps_values_dtype_geometry(ending: str, dtype: type, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.uniform(0, 200, size=(1, 6, 8, 10))).astype(dtype)
    path = tmp_path / f"img{ending}"
    write_image(arr, GEOMETRY_3D, path)
    back, props = read_file(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_allclose(props.spacing, GEOMETRY_3D.spacing, rtol=1e-6)
    np.testing.assert_allclose(props.origin, GEOMETRY_3D.origin, atol=1e-5)
    np.testing.assert_allclose(props.direction, GEOMETRY_3D.direction, atol=1e-6)
    assert props.shape == (6, 8, 10) and props.spatial_dims == 3
    assert not [n for n in _visible(tmp_path) if n.startswith(".")], "temporary files left behind"


def test_2d_nifti_uses_999_convention(tmp_path: Path) -> None:
    props = properties_2d(spacing=(0.5, 0.25), shape=(4, 6), dtype="float32")
    arr = np.arange(24, dtype=np.float32).reshape(1, 1, 4, 6)
    write_image(arr, props, tmp_path / "a.nii.gz")
    back, p = read_images([tmp_path / "a.nii.gz"])
    assert back.shape == (1, 1, 4, 6)
    assert p.spacing == (999.0, 0.5, 0.25) and p.spatial_dims == 2
    np.testing.assert_array_equal(back, arr)


def test_png_grey_rgb_and_16_bit(tmp_path: Path) -> None:
    grey = np.arange(32 * 32, dtype=np.uint16).reshape(1, 1, 32, 32) % 251
    write_image(grey.astype(np.uint8), properties_2d(), tmp_path / "g.png")
    back, props = read_file(tmp_path / "g.png")
    assert back.dtype == np.uint8 and props.spacing == (999.0, 1.0, 1.0) and not props.is_rgb
    np.testing.assert_array_equal(back, grey)
    rgb = np.stack([grey[0], 255 - grey[0], grey[0] // 2]).astype(np.uint8)
    write_image(rgb, properties_2d(is_rgb=True), tmp_path / "c.png")
    back, props = read_images([tmp_path / "c.png"])
    assert props.is_rgb and props.num_channels == 3 and back.dtype == np.float32
    np.testing.assert_array_equal(back, rgb.astype(np.float32))
    wide = (np.arange(32 * 32).reshape(1, 1, 32, 32) * 60).astype(np.uint16)
    write_image(wide, properties_2d(dtype="uint16"), tmp_path / "w.png")
    np.testing.assert_array_equal(read_file(tmp_path / "w.png")[0], wide)


def test_png_float_is_rounded_and_clipped(tmp_path: Path) -> None:
    arr = np.array([[-3.2, 0.4, 0.6, 254.6, 300.0, 17.5]], dtype=np.float32)[None, None]
    write_image(arr, properties_2d(shape=(1, 6)), tmp_path / "f.png")
    back, _ = read_file(tmp_path / "f.png")
    np.testing.assert_array_equal(back.ravel(), [0, 0, 1, 255, 255, 18])


def test_tiff_float_and_sidecar_geometry(tmp_path: Path) -> None:
    props = properties_2d(spacing=(0.2, 0.3), shape=(5, 7), dtype="float32")
    arr = np.linspace(-1, 1, 35, dtype=np.float32).reshape(1, 1, 5, 7)
    write_image(arr, props, tmp_path / "t.tif")
    assert json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["spacing"] == [0.2, 0.3]
    back, p = read_file(tmp_path / "t.tif")
    np.testing.assert_array_equal(back, arr)
    assert p.spacing == (999.0, 0.2, 0.3)


def test_jpeg_grey_is_lossy_but_close(tmp_path: Path) -> None:
    y, x = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    arr = (4 * x + 2 * y).astype(np.uint8)[None, None]
    write_image(arr, properties_2d(), tmp_path / "j.jpg")
    back, props = read_file(tmp_path / "j.jpg")
    assert back.shape == (1, 1, 32, 32) and props.spacing == (999.0, 1.0, 1.0)
    assert np.abs(back.astype(float) - arr).mean() < 3.0  # JPEG quantisation error on a smooth ramp


def test_unit_geometry_png_writes_no_sidecar(tmp_path: Path) -> None:
    write_image(np.ones((1, 1, 4, 4), np.uint8), properties_2d(shape=(4, 4)), tmp_path / "x.png")
    assert _visible(tmp_path) == ["x.png"]


@pytest.mark.parametrize("ending", [".npy", ".npz"])
def test_numpy_complex_round_trip_with_sidecar(ending: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arr = (rng.normal(size=(1, 4, 5, 6)) + 1j * rng.normal(size=(1, 4, 5, 6))).astype(np.complex64)
    write_image(arr, GEOMETRY_3D.__class__(**{**GEOMETRY_3D.to_json(), "shape": (4, 5, 6)}),
                tmp_path / f"case_0000{ending}")
    assert (tmp_path / "case_0000.json").is_file()
    back, props = read_images([tmp_path / f"case_0000{ending}"])
    assert back.dtype == np.complex64 and props.is_complex
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_allclose(props.spacing, GEOMETRY_3D.spacing)
    np.testing.assert_allclose(props.direction, GEOMETRY_3D.direction)


def test_numpy_per_case_sidecar_and_default_spacing(tmp_path: Path) -> None:
    np.save(tmp_path / "c1_0000.npy", np.ones((3, 4, 5), np.float32))
    np.save(tmp_path / "c1_0001.npy", np.ones((3, 4, 5), np.float32))
    (tmp_path / "c1.json").write_text(json.dumps({"spacing": [4.0, 0.5, 0.5]}))
    arr, props = read_images([tmp_path / "c1_0000.npy", tmp_path / "c1_0001.npy"])
    assert arr.shape == (2, 3, 4, 5) and props.spacing == (4.0, 0.5, 0.5)
    np.save(tmp_path / "c2_0000.npy", np.ones((4, 5), np.float32))
    assert read_file(tmp_path / "c2_0000.npy")[1].spacing == (999.0, 1.0, 1.0)


def test_per_file_sidecar_wins_over_per_case(tmp_path: Path) -> None:
    np.save(tmp_path / "c_0000.npy", np.ones((3, 4, 5), np.float32))
    (tmp_path / "c.json").write_text(json.dumps({"spacing": [4.0, 0.5, 0.5]}))
    (tmp_path / "c_0000.json").write_text(json.dumps({"spacing": [2.0, 1.5, 1.5]}))
    assert read_file(tmp_path / "c_0000.npy")[1].spacing == (2.0, 1.5, 1.5)


def test_bad_sidecar_names_file_and_key(tmp_path: Path) -> None:
    np.save(tmp_path / "c_0000.npy", np.ones((3, 4, 5), np.float32))
    (tmp_path / "c.json").write_text(json.dumps({"spacing": [1.0, -1.0]}))
    with pytest.raises(DatasetError) as err:
        read_file(tmp_path / "c_0000.npy")
    assert "c.json key 'spacing'" in str(err.value) and "positive numbers" in str(err.value)


def test_read_images_rejects_mismatched_channels(tmp_path: Path) -> None:
    write_image(np.ones((1, 6, 8, 10), np.float32), GEOMETRY_3D, tmp_path / "a_0000.nii.gz")
    shifted = ImageProperties.from_json({**GEOMETRY_3D.to_json(), "origin": [9.0, 9.0, 9.0]})
    write_image(np.ones((1, 6, 8, 10), np.float32), shifted, tmp_path / "a_0001.nii.gz")
    with pytest.raises(DatasetError) as err:
        read_images([tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"])
    assert "a_0001.nii.gz" in str(err.value) and "origin" in str(err.value)


def test_read_label_integer_checks(tmp_path: Path) -> None:
    props = properties_3d((1, 1, 1), (2, 3, 4))
    write_image(np.full((1, 2, 3, 4), 2.0, np.float32), props, tmp_path / "ok.nii.gz")
    label, _ = read_label(tmp_path / "ok.nii.gz")
    assert label.dtype.kind == "i" and int(label.max()) == 2
    write_image(np.full((1, 2, 3, 4), 0.5, np.float32), props, tmp_path / "bad.nii.gz")
    with pytest.raises(DatasetError, match="non-integer"):
        read_label(tmp_path / "bad.nii.gz")


def test_corrupt_and_unsupported_files(tmp_path: Path) -> None:
    (tmp_path / "x.nii.gz").write_bytes(b"definitely not an image")
    with pytest.raises(DatasetError) as err:
        read_file(tmp_path / "x.nii.gz")
    assert "x.nii.gz" in str(err.value) and "cannot be read" in str(err.value)
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DatasetError, match="cannot be read"):
        read_file(tmp_path / "x.npy")
    with pytest.raises(DatasetError, match="unsupported ending"):
        read_file(tmp_path / "x.gif")


def test_write_errors_leave_nothing(tmp_path: Path) -> None:
    arr = np.ones((1, 6, 8, 10), np.complex64)
    with pytest.raises(NnDiffError, match="complex"):
        write_image(arr, GEOMETRY_3D, tmp_path / "c.nii.gz")
    with pytest.raises(ValueError, match="channels"):
        write_image(np.ones((2, 6, 8, 10), np.float32), GEOMETRY_3D, tmp_path / "two.nii.gz")
    assert _visible(tmp_path) == []


def test_write_replaces_existing_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "a.nii.gz"
    write_image(np.zeros((1, 6, 8, 10), np.float32), GEOMETRY_3D, path)
    write_image(np.full((1, 6, 8, 10), 7, np.float32), GEOMETRY_3D, path)
    assert read_file(path)[0].max() == 7
    assert _visible(tmp_path) == ["a.nii.gz"]


def test_properties_json_round_trip() -> None:
    again = ImageProperties.from_json(json.loads(json.dumps(GEOMETRY_3D.to_json())))
    assert again == GEOMETRY_3D
    assert GEOMETRY_3D.sitk_spacing() == (0.9, 0.7, 2.5)


def test_file_ending_of() -> None:
    assert file_ending_of("a_0000.nii.gz") == ".nii.gz"
    assert file_ending_of("a_0000.NII.GZ") == ".NII.GZ"
    assert file_ending_of("notes.txt") == ".txt"


def test_dataset_works_without_simpleitk(tmp_path: Path) -> None:
    """Training from preprocessed data must run where SimpleITK is missing: importing
    nndiff.dataset, loading dataset.json, discovery and numpy reading need no SimpleITK."""
    seg = make_example_dataset("nnunet_seg", tmp_path, 5, num_cases=2)
    npy = make_example_dataset("complex_npy", tmp_path, 6, num_cases=2)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["SimpleITK"] = None  # any import of it now raises ImportError
        import nndiff.dataset
        from nndiff.dataset import load_dataset, verify_integrity
        from nndiff.dataset.io import read_images
        from nndiff.errors import NnDiffError
        ds = load_dataset({str(seg)!r})
        assert sorted(ds.cases) == ["case_000", "case_001"], ds.cases
        verify_integrity(ds, full=False)
        npy = load_dataset({str(npy)!r})
        verify_integrity(npy, full=True)
        arr, props = read_images(npy.cases["case_000"].images)
        assert arr.dtype.kind == "c" and props.spacing == (999.0, 0.5, 0.5)
        try:
            read_images(ds.cases["case_000"].images)
        except NnDiffError as e:
            assert "SimpleITK" in str(e)
        else:
            raise AssertionError("reading NIfTI without SimpleITK must fail clearly")
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, encoding="utf-8", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"
