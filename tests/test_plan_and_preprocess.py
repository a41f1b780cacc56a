"""End-to-end tests of the plan-and-preprocess commands on the example datasets."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nndiff.dataset.examples import make_example_dataset
from nndiff.run.plan_and_preprocess import (
    extract_fingerprint_entry,
    plan_and_preprocess_entry,
    plan_experiment_entry,
    preprocess_entry,
)


def _roots(tmp_path: Path) -> list[str]:
    return ["--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pre")]


def _run_all(tmp_path: Path, kind: str, dataset_id: int, *extra: str) -> tuple[Path, dict, dict]:
    folder = make_example_dataset(kind, tmp_path / "raw", dataset_id, seed=dataset_id)
    code = plan_and_preprocess_entry(["-d", str(dataset_id), *_roots(tmp_path), *extra])
    assert code == 0
    pre = tmp_path / "pre" / folder.name
    plans = json.loads((pre / "nnDiffPlans.json").read_text(encoding="utf-8"))
    fingerprint = json.loads((pre / "dataset_fingerprint.json").read_text(encoding="utf-8"))
    return pre, plans, fingerprint


def _has_number(text: str) -> bool:
    return re.search(r"\d", text) is not None


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Plan and preprocess every example kind once; tests below compare the plans."""
    root = tmp_path_factory.mktemp("pp")
    kinds = {"2d_grey_png": 1, "2d_rgb_png": 2, "3d_ct": 3, "3d_mr": 4, "nnunet_seg": 5,
             "complex_npy": 6, "translation": 7}
    return {kind: _run_all(root, kind, i) for kind, i in kinds.items()}


def test_every_kind_preprocesses_each_trainable_configuration(planned):
    for kind, (pre, plans, _) in planned.items():
        for name, config in plans["configurations"].items():
            if config.get("trainable", True) and "inherits_from" not in config:
                folder = pre / config["data_identifier"]
                assert folder.is_dir(), f"{kind}: {name} not preprocessed"
                assert list(folder.glob("*.npz")), f"{kind}: {name} has no cases"
                assert len(list(folder.glob("*.npz"))) == len(list(folder.glob("*.json")))


def test_2d_data_gets_only_2d_and_3d_data_gets_3d(planned):
    assert "3d_fullres" not in planned["2d_grey_png"][1]["configurations"]
    assert "2d" in planned["2d_grey_png"][1]["configurations"]
    for kind in ("3d_ct", "3d_mr"):
        assert {"2d", "3d_fullres"} <= set(planned[kind][1]["configurations"])


def test_ct_and_mr_normalization_differ(planned):
    ct = planned["3d_ct"][1]["normalization"]["images"][0]
    mr = planned["3d_mr"][1]["normalization"]["images"][0]
    assert ct["scheme"] == "ct_window" and mr["scheme"] != "ct_window"
    assert ct["params"]["clip_low"] < 0 < ct["params"]["clip_high"]
    rgb = planned["2d_rgb_png"][1]["normalization"]["images"]
    assert len(rgb) == 3 and {c["scheme"] for c in rgb} == {"rgb"}


def test_reconstruction_and_translation_normalization_roles(planned):
    recon = planned["complex_npy"][1]["normalization"]["images"]
    assert {c["scheme"] for c in recon} == {"scale_only"}
    translation = planned["translation"][1]["normalization"]
    assert {c["scheme"] for c in translation["images"]} == {"per_image_percentile"}
    assert translation["targets"] and translation["targets"][0]["scheme"] in {"ct_window", "dataset_percentile"}


def test_every_decision_has_a_reason_with_numbers(planned):
    for kind, (_, plans, _) in planned.items():
        for name, config in plans["configurations"].items():
            if "inherits_from" in config:
                continue
            reasons = config["reasons"]
            for key in ("patch_size", "batch_size", "spacing"):
                assert key in reasons and _has_number(reasons[key]), f"{kind}/{name}: {key}"
        for entry in plans["normalization"]["images"]:
            assert entry["reason"], kind


def test_anisotropic_ct_keeps_low_resolution_axis_first(planned):
    _, plans, fingerprint = planned["3d_ct"]
    spacing = plans["configurations"]["3d_fullres"]["spacing"]
    assert spacing[0] == max(spacing), "the coarse axis should come first after transpose"
    assert fingerprint["anisotropy"] > 3


def test_clip_fraction_recorded_in_plan(planned):
    for entry in planned["3d_ct"][1]["normalization"]["images"]:
        # the window must keep the air the model has to produce: only the percentile tails clip
        assert 0.0 <= entry["clip_fraction"] < 0.02


def test_metadata_copied_for_training_without_raw_root(planned):
    """The Trainer reads metadata.json from the preprocessed folder (grouped splits by subject)."""
    pre = planned["2d_grey_png"][0]
    copied = json.loads((pre / "metadata.json").read_text(encoding="utf-8"))
    raw = json.loads((pre.parents[1] / "raw" / pre.name / "metadata.json").read_text(encoding="utf-8"))
    assert copied == raw and all("subject" in v for v in copied.values())


def test_fingerprint_rerun_is_reused_and_clean_recomputes(tmp_path):
    folder = make_example_dataset("3d_mr", tmp_path / "raw", 9, num_cases=3, seed=0)
    args = ["-d", "9", *_roots(tmp_path)]
    assert extract_fingerprint_entry(args) == 0
    fp_file = tmp_path / "pre" / folder.name / "dataset_fingerprint.json"
    first_mtime = fp_file.stat().st_mtime_ns
    assert extract_fingerprint_entry(args) == 0
    assert fp_file.stat().st_mtime_ns == first_mtime
    assert extract_fingerprint_entry([*args, "--clean"]) == 0
    assert fp_file.stat().st_mtime_ns != first_mtime


def test_separate_steps_and_inherited_configuration(tmp_path, capsys):
    folder = make_example_dataset("2d_grey_png", tmp_path / "raw", 11, num_cases=3, seed=0)
    args = ["-d", "11", *_roots(tmp_path)]
    assert extract_fingerprint_entry(args) == 0
    assert plan_experiment_entry([*args, "--explain"]) == 0
    out = capsys.readouterr().out
    assert "patch_size" in out
    plans_file = tmp_path / "pre" / folder.name / "nnDiffPlans.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    plans["configurations"]["2d_small"] = {"inherits_from": "2d", "batch_size": 2}
    plans_file.write_text(json.dumps(plans))
    # re-planning keeps the user's configuration; preprocessing it works
    assert plan_experiment_entry(args) == 0
    assert "2d_small" in json.loads(plans_file.read_text(encoding="utf-8"))["configurations"]
    assert preprocess_entry([*args, "-c", "2d_small"]) == 0


def test_unknown_configuration_is_a_clear_error(tmp_path, capsys):
    make_example_dataset("2d_grey_png", tmp_path / "raw", 12, num_cases=3, seed=0)
    args = ["-d", "12", *_roots(tmp_path)]
    assert plan_and_preprocess_entry([*args, "--no_pp"]) == 0
    assert preprocess_entry([*args, "-c", "3d_fullres"]) == 2
    err = capsys.readouterr().err
    assert "3d_fullres" in err and "available" in err


def test_missing_root_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("nnDiff_raw", raising=False)
    assert plan_and_preprocess_entry(["-d", "1", "--preprocessed", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--raw" in err and "nnDiff_raw" in err


def test_corrupt_dataset_writes_nothing(tmp_path, capsys):
    folder = make_example_dataset("3d_mr", tmp_path / "raw", 13, num_cases=3, seed=0)
    victim = sorted((folder / "imagesTr").iterdir())[0]
    victim.write_bytes(b"not an image")
    code = plan_and_preprocess_entry(["-d", "13", *_roots(tmp_path), "--verify_dataset_integrity"])
    assert code == 2
    err = capsys.readouterr().err
    assert victim.name in err
    assert "Traceback" not in err
    assert not (tmp_path / "pre").exists()


def test_bad_dataset_json_writes_nothing(tmp_path, capsys):
    folder = make_example_dataset("2d_grey_png", tmp_path / "raw", 14, num_cases=3, seed=0)
    spec = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    spec["task"] = "painting"
    (folder / "dataset.json").write_text(json.dumps(spec))
    assert plan_and_preprocess_entry(["-d", "14", *_roots(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "painting" in err and "task" in err
    assert not (tmp_path / "pre").exists()


def test_preprocessed_round_trip_through_cli_outputs(planned):
    """The stored case JSON suffices to invert a preprocessed case to the original grid."""
    from nndiff.dataset.io import read_images
    from nndiff.preprocessing import invert_case

    pre, plans, _ = planned["3d_mr"]
    config = plans["configurations"]["3d_fullres"]
    case_npz = sorted((pre / config["data_identifier"]).glob("*.npz"))[0]
    case_json = json.loads(case_npz.with_suffix(".json").read_text(encoding="utf-8"))
    data = np.load(case_npz)["data"]
    restored, props = invert_case(data, case_json, plans, "3d_fullres", kind="data")
    raw_folder = pre.parents[1] / "raw" / pre.name / "imagesTr"
    original, original_props = read_images(sorted(raw_folder.glob(f"{case_npz.stem}_*")))
    assert restored.shape == original.shape
    np.testing.assert_allclose(props.spacing, original_props.spacing)
    window = plans["normalization"]["images"][0]["params"]
    inside = (original >= window["clip_low"]) & (original <= window["clip_high"])
    scale = float(np.abs(original).max())
    assert np.max(np.abs(restored - original)[inside]) <= 0.05 * scale


@pytest.mark.parametrize(
    "command", ["nndiff_plan_and_preprocess", "nndiff_extract_fingerprint", "nndiff_plan_experiment",
                "nndiff_preprocess", "nndiff_demo"],
)
def test_console_script_help(command):
    result = subprocess.run([command, "--help"], capture_output=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stderr
    assert command in result.stdout


def test_console_script_runs_end_to_end(tmp_path):
    make_example_dataset("2d_grey_png", tmp_path / "raw", 15, num_cases=3, seed=0)
    result = subprocess.run(
        ["nndiff_plan_and_preprocess", "-d", "15", *_roots(tmp_path), "-np", "1", "--explain"],
        capture_output=True, encoding="utf-8", timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Dataset015" in result.stdout
    # the explanation is printed after preprocessing, so it shows the measured clip fraction
    assert "clip_fraction None" not in result.stdout and "clip_fraction 0" in result.stdout


def _drop_a_channel(folder: Path) -> str:
    victim = sorted((folder / "imagesTr").glob("*_0001.nii.gz"))[0]
    victim.unlink()
    return victim.name


def _wrong_num_training(folder: Path) -> str:
    spec = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    spec["numTraining"] = 99
    (folder / "dataset.json").write_text(json.dumps(spec))
    return "numTraining"


def _undeclared_label(folder: Path) -> str:
    spec = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    del spec["labels"]["b"]  # label value 2 still occurs in the maps
    (folder / "dataset.json").write_text(json.dumps(spec))
    return "labelsTr"


def _stray_ending(folder: Path) -> str:
    (folder / "imagesTr" / "case_000_0000.nrrd").write_bytes(b"x")
    return "case_000_0000.nrrd"


def _bad_acceleration(folder: Path) -> str:
    spec = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    spec["reconstruction"]["acceleration"] = 0.5
    (folder / "dataset.json").write_text(json.dumps(spec))
    return "acceleration"


def _nan_values(folder: Path) -> str:
    victim = sorted((folder / "imagesTr").glob("*.npy"))[0]
    array = np.load(victim)
    array.flat[3] = np.nan
    np.save(victim, array)
    return victim.name


@pytest.mark.parametrize(
    "kind, defect",
    [("nnunet_seg", _drop_a_channel), ("3d_mr", _wrong_num_training), ("nnunet_seg", _undeclared_label),
     ("nnunet_seg", _stray_ending), ("complex_npy", _bad_acceleration), ("complex_npy", _nan_values)],
)
def test_integrity_defect_stops_the_command_before_any_write(tmp_path, capsys, kind, defect):
    folder = make_example_dataset(kind, tmp_path / "raw", 20, seed=0)
    expected = defect(folder)
    code = plan_and_preprocess_entry(["-d", "20", *_roots(tmp_path), "--verify_dataset_integrity"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and "Fix:" in err and "Traceback" not in err
    assert not (tmp_path / "pre").exists()
