"""fastMRI converter: complex slices from k-space, spacing from the ISMRMRD header, measurements kept
for prediction, multi-coil combination, bad files."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from nndiff.dataset import load_dataset, read_images, verify_integrity
from nndiff.dataset_conversion import fastmri
from nndiff.errors import NnDiffError
from nndiff.run.plan_and_preprocess import plan_and_preprocess_entry
from nndiff.tasks.operators import fft2c
from nndiff.tasks.reconstruction_predictor import read_measurement
from nndiff.utils.files import load_json

H, W, CROP = 16, 12, 8
HEADER = """<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>
<encodedSpace><matrixSize><x>16</x><y>12</y><z>1</z></matrixSize>
<fieldOfView_mm><x>8.0</x><y>9.0</y><z>3.0</z></fieldOfView_mm></encodedSpace>
<reconSpace><matrixSize><x>8</x><y>8</y><z>1</z></matrixSize>
<fieldOfView_mm><x>4.0</x><y>4.0</y><z>3.0</z></fieldOfView_mm></reconSpace>
</encoding></ismrmrdHeader>"""


def _images(seed: int, slices: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    body = ((yy - H / 2) ** 2 / 30 + (xx - W / 2) ** 2 / 16 < 1).astype(np.float32)
    phase = np.exp(1j * 0.3 * xx / W)
    return np.stack([body * (1 + rng.uniform(0, 0.5, (H, W))) * phase * (s + 1) for s in range(slices)]).astype(np.complex64)


def _write(path: Path, kspace: np.ndarray, recon_key: str, mask: np.ndarray | None = None, drop: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if drop != "kspace":
            f.create_dataset("kspace", data=kspace)
        f.create_dataset(recon_key, data=np.ones((kspace.shape[0], CROP, CROP), np.float32))
        f.create_dataset("ismrmrd_header", data=np.bytes_(HEADER))
        if mask is not None:
            f.create_dataset("mask", data=mask)
        f.attrs["acquisition"] = "CORPD_FBK"
        f.attrs["patient_id"] = "abc"


def _kspace(images: np.ndarray) -> np.ndarray:
    return fft2c(torch.from_numpy(images)).numpy().astype(np.complex64)


def test_singlecoil_kspace_images_and_measurements(tmp_path):
    src = tmp_path / "singlecoil_train"
    images = {stem: _images(n) for n, stem in enumerate(["file1000001", "file1000002", "file1000003"])}
    for stem, image in images.items():
        _write(src / f"{stem}.h5", _kspace(image), "reconstruction_esc")
    mask = np.zeros(W, np.float32)
    mask[4:8] = 1
    _write(src / "file2000001.h5", _kspace(_images(9, 2)) * mask, "reconstruction_esc", mask=mask)
    folder = fastmri.convert_fastmri(src, tmp_path / "raw", 61, test_volumes=["file1000003"])
    dataset = load_dataset(folder)
    assert verify_integrity(dataset, full=True) == []
    assert dataset.json["reconstruction"] == {"operator": "mri_cartesian", "acceleration": 4.0,
                                              "center_fraction": 0.08, "mask_type": "random", "num_coils": 1}
    assert len(dataset.cases) == 6 and len(dataset.test_cases) == 3
    assert dataset.subjects()["file1000002_s001"] == "file1000002"
    image, props = read_images(dataset.cases["file1000002_s001"].images)
    assert image.dtype == np.complex64 and image.shape == (1, 1, H, W)
    np.testing.assert_allclose(image[0, 0], images["file1000002"][1], atol=1e-5)  # ifft2c inverts fft2c
    assert props.spacing == pytest.approx((999.0, 0.5, 0.75))  # FOV / matrix of the encoded space
    # The undersampled file is kept in the predictor's layout, which reads it back.
    kspace, read_mask, maps, sidecar = read_measurement(folder / "measurementsTs" / "file2000001.h5")
    assert kspace.shape == (2, 1, H, W) and maps is None and sidecar["spacing"] == [3.0, 0.5, 0.75]
    assert load_json(folder / fastmri.CONVERSION_RECORD)["measurements"] == ["file2000001"]
    code = plan_and_preprocess_entry(["-d", "61", "--raw", str(tmp_path / "raw"),
                                      "--preprocessed", str(tmp_path / "pre"), "-np", "1"])
    assert code == 0


def test_multicoil_combination_and_reconstruction_source(tmp_path, capsys):
    src = tmp_path / "multicoil_val"
    yy, xx = np.mgrid[0:H, 0:W]
    sens = np.stack([np.exp(-((yy - c) ** 2) / 200.0) * np.exp(1j * 0.1 * c) for c in (2, 8, 14)]).astype(np.complex64)
    sens /= np.sqrt((np.abs(sens) ** 2).sum(0, keepdims=True))
    for n in range(2):
        image = _images(n, 2)
        _write(src / f"file100{n}.h5", _kspace(image[:, None] * sens[None]), "reconstruction_rss")
    assert fastmri.main(["-i", str(src), "-o", str(tmp_path / "raw"), "-d", "62", "--center_fraction", "0.5",
                         "--acceleration", "2", "-q"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    dataset = load_dataset(folder)
    assert dataset.json["reconstruction"]["num_coils"] == 3
    combined, _ = read_images(dataset.cases["file1000_s001"].images)
    truth = np.abs(_images(0, 2)[1])
    inside = truth > 0
    # Combination with maps estimated from the centre: the magnitude follows the object closely.
    assert np.corrcoef(np.abs(combined[0, 0])[inside], truth[inside])[0, 1] > 0.95
    magnitude = fastmri.convert_fastmri(src, tmp_path / "raw", 63, image_source="reconstruction")
    image, props = read_images(load_dataset(magnitude).cases["file1001_s000"].images)
    assert image.shape == (1, 1, CROP, CROP) and props.spacing == pytest.approx((999.0, 0.5, 0.5))


def test_bad_files(tmp_path):
    src = tmp_path / "singlecoil_train"
    _write(src / "file1.h5", _kspace(_images(0)), "reconstruction_esc", drop="kspace")
    with pytest.raises(NnDiffError, match=r"file1.h5: no dataset \['kspace'\]"):
        fastmri.convert_fastmri(src, tmp_path / "raw", 64)
    (src / "file1.h5").unlink()
    mask = np.ones(W, np.float32)
    _write(src / "file2.h5", _kspace(_images(0)), "reconstruction_esc", mask=mask)
    with pytest.raises(NnDiffError, match="no fully sampled volume"):
        fastmri.convert_fastmri(src, tmp_path / "raw", 64)
    with pytest.raises(NnDiffError, match="not files of"):
        fastmri.convert_fastmri(src, tmp_path / "raw", 64, test_volumes=["file9"])
    with pytest.raises(NnDiffError, match="not valid XML"):
        fastmri.parse_header(b"<broken", src / "file2.h5")
    with pytest.raises(NnDiffError, match="1/acceleration"):
        fastmri.convert_fastmri(src, tmp_path / "raw", 64, center_fraction=0.5)
    assert not list(tmp_path.glob("raw/Dataset064*"))
