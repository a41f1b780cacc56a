"""IXI converter: pairs per subject, skipped subjects reported, target resampled onto the source grid."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nndiff.dataset import load_dataset, read_images, verify_integrity
from nndiff.dataset_conversion import ixi
from nndiff.errors import NnDiffError
from nndiff.run.plan_and_preprocess import plan_and_preprocess_entry
from nndiff.utils.files import load_json


def _volume(path: Path, array: np.ndarray, spacing=(1.2, 0.9, 0.9), origin=(-10.0, 5.0, 2.0)) -> np.ndarray:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return array


def _blob(seed: int, shape=(8, 12, 12)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return 100.0 * (z**2 + y**2 + x**2 < 0.6) + rng.uniform(0, 5, shape)


@pytest.fixture()
def ixi_source(tmp_path):
    src = tmp_path / "IXI"
    arrays = {
        "IXI002-Guys-0828-T1": _volume(src / "T1" / "IXI002-Guys-0828-T1.nii.gz", _blob(0)),
        # Other grid (as real IXI T2): resampled onto the T1 grid, not registered.
        "IXI002-Guys-0828-T2": _volume(src / "T2" / "IXI002-Guys-0828-T2.nii.gz", _blob(1, (6, 10, 10)),
                                       spacing=(1.6, 1.1, 1.1), origin=(-10.0, 5.0, 2.0)),
        "IXI012-HH-1211-T1": _volume(src / "T1" / "IXI012-HH-1211-T1.nii.gz", _blob(2)),
        "IXI012-HH-1211-T2": _volume(src / "T2" / "IXI012-HH-1211-T2.nii.gz", _blob(3)),
        "IXI012-HH-1211-PD": _volume(src / "PD" / "IXI012-HH-1211-PD.nii.gz", _blob(4)),
        "IXI013-IOP-0001-T1": _volume(src / "T1" / "IXI013-IOP-0001-T1.nii.gz", _blob(5)),
        "IXI014-HH-1212-T1": _volume(src / "T1" / "IXI014-HH-1212-T1.nii.gz", _blob(6)),
        "IXI014-HH-1212-T2": _volume(src / "T2" / "IXI014-HH-1212-T2.nii.gz", _blob(7)),
    }
    (src / "IXI.xls").write_text("not an image")  # the demographics sheet beside the images is ignored
    return src, arrays


def test_pairs_skips_and_geometry(tmp_path, ixi_source):
    src, arrays = ixi_source
    folder = ixi.convert_ixi(src, tmp_path / "raw", 21)
    dataset = load_dataset(folder)
    assert verify_integrity(dataset, full=True) == []
    assert dataset.task == "translation"
    assert dataset.json["channel_names"] == {"0": "T1"} and dataset.json["target_names"] == {"0": "T2"}
    assert sorted(dataset.cases) == ["IXI002", "IXI012", "IXI014"]
    record = load_json(folder / ixi.CONVERSION_RECORD)
    assert record["skipped"] == {"IXI013": ["T2"]}
    assert record["target_resampled"] == ["IXI002"] and record["registered"] is False
    metadata = load_json(folder / "metadata.json")
    assert metadata["IXI012"] == {"subject": "IXI012", "site": "HH"}
    image, props = read_images(dataset.cases["IXI012"].images)
    target, _ = read_images(dataset.cases["IXI012"].targets)
    np.testing.assert_allclose(image[0], arrays["IXI012-HH-1211-T1"], atol=1e-4)
    np.testing.assert_allclose(target[0], arrays["IXI012-HH-1211-T2"], atol=1e-4)  # same grid: untouched
    assert props.spacing == pytest.approx((0.9, 0.9, 1.2)) and props.origin == pytest.approx((-10.0, 5.0, 2.0))
    # Resampled target: on the T1 grid; the voxel at the shared origin keeps the T2 value there.
    target2, props2 = read_images(dataset.cases["IXI002"].targets)
    assert target2.shape == (1, 8, 12, 12) and props2.spacing == pytest.approx((0.9, 0.9, 1.2))
    assert target2[0, 0, 0, 0] == pytest.approx(arrays["IXI002-Guys-0828-T2"][0, 0, 0], abs=1e-3)
    # The dataset plans and preprocesses.
    code = plan_and_preprocess_entry(["-d", "21", "--raw", str(tmp_path / "raw"),
                                      "--preprocessed", str(tmp_path / "pre"), "-np", "1"])
    assert code == 0
    assert (tmp_path / "pre" / folder.name / "nnDiffPlans.json").is_file()


def test_pd_target_and_cli(tmp_path, ixi_source, capsys):
    src, arrays = ixi_source
    assert ixi.main(["-i", str(src), "-o", str(tmp_path / "raw"), "-d", "22", "--source", "T2",
                     "--target", "PD", "-q"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder.name == "Dataset022_IXIT2toPD"
    assert sorted(load_dataset(folder).cases) == ["IXI012"]
    assert load_json(folder / ixi.CONVERSION_RECORD)["skipped"] == {
        "IXI002": ["PD"], "IXI013": ["PD", "T2"], "IXI014": ["PD"]}


def test_no_subject_with_both_contrasts_is_an_error(tmp_path):
    src = tmp_path / "IXI"
    _volume(src / "IXI013-IOP-0001-T1.nii.gz", _blob(5))
    with pytest.raises(NnDiffError, match="no subject has both T1 and T2.*1 subject"):
        ixi.convert_ixi(src, tmp_path / "raw", 23)
    assert not (tmp_path / "raw" / "Dataset023_IXIT1toT2").exists()
    with pytest.raises(NnDiffError, match="no IXI files"):
        (tmp_path / "empty").mkdir()
        ixi.convert_ixi(tmp_path / "empty", tmp_path / "raw", 23)
    with pytest.raises(NnDiffError, match="does not exist"):
        ixi.convert_ixi(tmp_path / "missing", tmp_path / "raw", 23)
    with pytest.raises(NnDiffError, match="both T1"):
        ixi.convert_ixi(src, tmp_path / "raw", 23, "T1", "T1")
