"""allow_missing_channels through fingerprint, planning and preprocessing (issue 5, translation).

A case lacking a channel file is accepted only with the flag; its missing channel adds no
statistics, does not shape the crop box, is stored as zeros (not normalized) and is listed in
CASE.json under "missing_channels"; present channels still invert exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from preprocessing_helpers import config, make_plans, norm_entry

from nndiff.dataset import ImageProperties, load_dataset, make_example_dataset, read_images, verify_integrity
from nndiff.dataset.io import write_image
from nndiff.errors import DatasetError
from nndiff.fingerprint import extract_fingerprint
from nndiff.fingerprint.extractor import analyze_case, assemble_fingerprint
from nndiff.planning import plan_experiment
from nndiff.preprocessing import CaseFiles, invert_case, load_case, preprocess_case, preprocess_dataset
from nndiff.preprocessing.case_io import MISSING_CHANNELS_KEY

CONFIG = "3d_fullres"


def _two_channel_translation(tmp_path: Path, allow_missing: bool = True) -> Path:
    """The translation example (T1 → CT, 8×16×16) plus a T2-like channel 1 (values ≥ 100), with
    case_001's channel 1 file deleted."""
    folder = make_example_dataset("translation", tmp_path, 61, num_cases=3, seed=3)
    for t1 in sorted((folder / "imagesTr").glob("*_0000.nii.gz")):
        images, props = read_images([t1])
        write_image((2.0 * images + 100.0).astype(np.float32), props,
                    t1.with_name(t1.name.replace("_0000", "_0001")))
    (folder / "imagesTr" / "case_001_0001.nii.gz").unlink()
    spec = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    spec["channel_names"] = {"0": "T1", "1": "T2"}
    if allow_missing:
        spec["allow_missing_channels"] = True
    (folder / "dataset.json").write_text(json.dumps(spec))
    return folder


def test_missing_channel_is_refused_without_the_flag(tmp_path):
    folder = _two_channel_translation(tmp_path, allow_missing=False)
    with pytest.raises(DatasetError, match="case_001_0001.nii.gz: is missing.*allow_missing_channels"):
        load_dataset(folder)


def test_case_files_refuse_missing_channels_unless_allowed(tmp_path):
    dataset = load_dataset(_two_channel_translation(tmp_path))
    case = dataset.cases["case_001"]
    with pytest.raises(DatasetError, match=r"case case_001: image channel\(s\) \[1\] are missing.*allow_missing"):
        CaseFiles.from_case(case)
    assert CaseFiles.from_case(case, allow_missing=True).missing_channels == [1]
    case.images = [None, None]
    with pytest.raises(DatasetError, match="add at least one channel file"):
        CaseFiles.from_case(case, allow_missing=True)


def test_missing_target_stays_an_error_with_the_flag(tmp_path):
    folder = _two_channel_translation(tmp_path)
    (folder / "targetsTr" / "case_002_0000.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case_002_0000.nii.gz: is missing \(target 0000 of case 'case_002'\)"):
        load_dataset(folder)


def test_fingerprint_plan_and_preprocessing_of_a_case_without_a_channel(tmp_path):
    folder = _two_channel_translation(tmp_path)
    dataset = load_dataset(folder)
    verify_integrity(dataset, full=True)
    fp = extract_fingerprint(dataset)
    assert fp["missing_channels"] == {"case_001": [1]}
    present = [read_images([folder / "imagesTr" / f"case_{i:03d}_0001.nii.gz"])[0] for i in (0, 2)]
    t2 = fp["intensity_properties_per_channel"]["1"]
    assert t2["min"] == pytest.approx(min(float(a.min()) for a in present))  # ≥ 100: no zeros counted
    assert t2["mean"] == pytest.approx(float(np.mean(np.concatenate([a.ravel() for a in present]))), rel=1e-6)

    plans = plan_experiment(fp, dataset.json)
    assert plans["configurations"][CONFIG]["network"]["cond_channels"] == 4  # 2 images + 2 masks
    preprocess_dataset(dataset, plans, [CONFIG], tmp_path / "pre")
    arrays, case_json = load_case(tmp_path / "pre" / f"nnDiffPlans_{CONFIG}", "case_001")
    assert case_json[MISSING_CHANNELS_KEY] == [1]
    assert arrays["data"].shape[0] == 2 and np.all(arrays["data"][1] == 0) and np.any(arrays["data"][0] != 0)
    assert case_json["images"]["normalization"][1]["missing"] is True
    assert case_json["images"]["clip_counts"][1] == [0, 0]
    assert arrays["target"].shape[1:] == arrays["data"].shape[1:]
    _, complete = load_case(tmp_path / "pre" / f"nnDiffPlans_{CONFIG}", "case_000")
    assert MISSING_CHANNELS_KEY not in complete

    # present channel inverts exactly inside its window; the missing one comes back as zeros
    restored, props = invert_case(arrays["data"], case_json, plans, CONFIG)
    raw, _ = read_images([folder / "imagesTr" / "case_001_0000.nii.gz"])
    window = case_json["images"]["normalization"][0]["image_values"]
    inside = (raw[0] > window["lo"]) & (raw[0] < window["hi"])
    np.testing.assert_allclose(restored[0][inside], raw[0][inside], rtol=1e-5, atol=1e-3)
    assert np.all(restored[1] == 0) and props.num_channels == 2 and restored.shape[1:] == raw.shape[1:]


def test_the_key_constant_is_the_one_translation_reads():
    from nndiff.tasks import translation

    assert translation.MISSING_CHANNELS_KEY == MISSING_CHANNELS_KEY


# --------------------------------------------------------------------------- unit level


def _props(shape=(4, 12, 12)) -> ImageProperties:
    return ImageProperties(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()),
                           spatial_dims=3, shape=shape, num_channels=2, dtype="float32")


def _case_with_garbage_channel(seed: int = 0) -> np.ndarray:
    """Channel 0: a block inside a zero border; channel 1: nonzero garbage everywhere (missing)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((2, 4, 12, 12), np.float32)
    images[0, 1:3, 3:8, 4:9] = rng.uniform(10, 20, (2, 5, 5))
    images[1] = rng.uniform(500, 900, (4, 12, 12))
    return images


def test_analysis_ignores_the_missing_channel():
    images = _case_with_garbage_channel()
    stats = analyze_case(images, _props(), missing_channels=[1])
    assert stats.shape_after_crop == [2, 5, 5]  # the garbage channel does not widen the box
    assert stats.images[1].whole.count == 0 and stats.images[0].whole.count == images[0].size
    with pytest.raises(DatasetError, match="image channel 1: is missing in every training case"):
        assemble_fingerprint([stats, analyze_case(images, _props(), identifier="b", missing_channels=[1])],
                             {"0": "T1", "1": "T2"})


def test_preprocess_case_stores_zeros_and_crops_by_present_channels():
    images = _case_with_garbage_channel()
    plans = make_plans([norm_entry(0, "dataset_percentile", clip_low=0.0, clip_high=20.0),
                        norm_entry(1, "dataset_percentile", clip_low=0.0, clip_high=1000.0)],
                       configurations={"c": config((1.0, 1.0, 1.0))})
    arrays, case_json = preprocess_case(images, _props(), plans, "c", missing_channels=[1])
    assert case_json["bbox"] == [[1, 3], [3, 8], [4, 9]]
    assert np.all(arrays["data"][1] == 0)  # not normalized: a window would map 0 to -1
    np.testing.assert_allclose(arrays["data"][0], images[0, 1:3, 3:8, 4:9].astype(np.float64) / 10.0 - 1.0, atol=1e-6)
    assert case_json[MISSING_CHANNELS_KEY] == [1]
    restored, _ = invert_case(arrays["data"], case_json, plans, "c")
    np.testing.assert_allclose(restored[0], images[0], rtol=1e-6)
    assert np.all(restored[1] == 0)
    for bad in ([2], [0, 1], [-1]):
        with pytest.raises(ValueError, match="missing_channels .* at least one image channel present"):
            preprocess_case(images, _props(), plans, "c", missing_channels=bad)
