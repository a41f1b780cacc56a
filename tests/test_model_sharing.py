"""nndiff_export_model_to_zip / nndiff_install_pretrained_model_from_zip on a tiny trained 2D model:
round trip with identical samples, manifest contents, tampering, zip-slip, missing manifest, clashes."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nndiff.dataset.examples import make_example_dataset
from nndiff.dataset.io import read_file
from nndiff.inference.cli import predict_entry
from nndiff.run.model_sharing import (
    MANIFEST,
    export_entry,
    export_model_to_zip,
    install_entry,
    install_model_from_zip,
    safe_member_name,
)
from nndiff.run.plan_and_preprocess import plan_and_preprocess_entry
from nndiff.run.train import train_entry
from nndiff.utils.files import load_json, save_json

TINY = {
    "inherits_from": "2d",
    "network": {"model_channels": 8, "channel_mult": [1, 2], "strides": [[2, 2]], "num_res_blocks": 1,
                "attention_levels": [1], "num_head_channels": 8, "norm_groups": 4},
    "training": {"num_iterations_per_epoch": 2, "num_epochs": 1, "num_val_cases": 2, "warmup_iterations": 1,
                 "augmentation": "none", "progress_every_epochs": 1},
    "diffusion": {"num_sampling_steps": 2},
}
DATASET = "Dataset821_Grey2D"
MODEL = "GenerationTrainer__nnDiffPlans__tiny"


def _roots(root: Path) -> list[str]:
    return ["--raw", str(root / "raw"), "--preprocessed", str(root / "pre"), "--results", str(root / "res")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A raw + preprocessed 2D dataset with a 'tiny' configuration trained 2 iterations (fold 0)."""
    root = tmp_path_factory.mktemp("sharing")
    make_example_dataset("2d_grey_png", root / "raw", 821, num_cases=6)
    assert plan_and_preprocess_entry(["-d", "821", "-c", "2d", *_roots(root)]) == 0
    plans_file = root / "pre" / DATASET / "nnDiffPlans.json"
    plans = load_json(plans_file)
    plans["configurations"]["tiny"] = TINY
    save_json(plans, plans_file)
    assert train_entry(["821", "tiny", "0", "--iterations", "2", "-device", "cpu", *_roots(root)]) == 0
    return root


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zip") / "model.zip"
    assert export_entry(["-d", "821", "-o", str(out), "--results", str(trained / "res"),
                         "--preprocessed", str(trained / "pre")]) == 0
    return out


def _generate(results: Path, out: Path, extra: list[str]) -> list[np.ndarray]:
    assert predict_entry(["-o", str(out), "-d", "821", "-c", "tiny", "--num_samples", "2", "--seed", "5",
                          "-device", "cpu", "--results", str(results), *extra]) == 0
    return [read_file(p)[0] for p in sorted(out.glob("sample_*"))]


def test_manifest_lists_files_hashes_seeds_and_plans_hash(exported):
    with zipfile.ZipFile(exported) as archive:
        manifest = json.loads(archive.read(MANIFEST))
        names = set(archive.namelist())
    prefix = f"{DATASET}/{MODEL}"
    for name in ("nnDiffPlans.json", "dataset.json", "dataset_fingerprint.json", "fold_0/checkpoint_final.pth",
                 "fold_0/debug.json"):
        assert f"{prefix}/{name}" in manifest["files"] and f"{prefix}/{name}" in names, name
    assert set(manifest["files"]) == names - {MANIFEST}
    assert all(len(v["sha256"]) == 64 for v in manifest["files"].values())
    (model,) = manifest["models"]
    assert model["configuration"] == "tiny" and model["trainer"] == "GenerationTrainer"
    assert len(model["plans_hash"]) == 64 and model["folds"]["0"]["seed"] is not None
    assert model["folds"]["0"]["iterations"] == {"checkpoint_final.pth": 2}
    assert "training_command" in model["folds"]["0"]  # None until the trainer records its command line


def test_round_trip_gives_identical_samples(trained, exported, tmp_path):
    # the installed folder carries its own plans: no preprocessed root on the receiving side
    new_results = tmp_path / "results"
    assert install_entry([str(exported), "--results", str(new_results)]) == 0
    installed = new_results / DATASET / MODEL
    assert (installed / "fold_0" / "checkpoint_final.pth").is_file()
    state = torch.load(installed / "fold_0" / "checkpoint_final.pth", weights_only=True)
    assert state["iteration"] == 2
    original = _generate(trained / "res", tmp_path / "a", ["--preprocessed", str(trained / "pre")])
    shipped = _generate(new_results, tmp_path / "b", [])
    assert len(original) == 2
    for left, right in zip(original, shipped):
        np.testing.assert_array_equal(left, right)
    # installing the same zip again is a no-op, not a clash
    assert install_model_from_zip(exported, new_results) == [installed]


def _rewrite(source: Path, target: Path, change) -> Path:
    """Copy a zip member by member, letting ``change(name, data)`` return new bytes (or None to drop)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = change(info.filename, src.read(info.filename))
            if data is not None:
                dst.writestr(info.filename, data)
    return target


def test_tampered_file_is_named(exported, tmp_path, capsys):
    debug = f"{DATASET}/{MODEL}/fold_0/debug.json"
    bad = _rewrite(exported, tmp_path / "bad.zip", lambda n, d: d + b" " if n == debug else d)
    results = tmp_path / "res"
    assert install_entry([str(bad), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert debug in err and "sha256" in err
    assert not (results / DATASET).exists()  # nothing installed from a bad zip


def test_missing_manifest_and_unlisted_member_refused(exported, tmp_path):
    no_manifest = _rewrite(exported, tmp_path / "a.zip", lambda n, d: None if n == MANIFEST else d)
    with pytest.raises(Exception, match="has no manifest.json"):
        install_model_from_zip(no_manifest, tmp_path / "res")
    extra = tmp_path / "b.zip"
    shutil.copy(exported, extra)
    with zipfile.ZipFile(extra, "a") as archive:
        archive.writestr(f"{DATASET}/{MODEL}/fold_0/extra.pth", b"x")
    with pytest.raises(Exception, match="does not list.*extra.pth"):
        install_model_from_zip(extra, tmp_path / "res")


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil", "a/../../evil", "C:/evil", "a\\..\\evil"])
def test_zip_slip_member_refused(exported, tmp_path, name):
    with pytest.raises(Exception, match="outside the results folder"):
        safe_member_name(name)
    evil = tmp_path / "evil.zip"
    shutil.copy(exported, evil)
    with zipfile.ZipFile(evil, "a") as archive:
        archive.writestr(name, b"x")
    with pytest.raises(Exception, match="outside the results folder"):
        install_model_from_zip(evil, tmp_path / "res" / "inner")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "res" / "evil.txt").exists()


def test_existing_different_model_needs_overwrite(exported, tmp_path, capsys):
    results = tmp_path / "res"
    target = results / DATASET / MODEL
    target.mkdir(parents=True)
    (target / "nnDiffPlans.json").write_text("{}")
    assert install_entry([str(exported), "--results", str(results)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert install_entry([str(exported), "--results", str(results), "--overwrite"]) == 0
    assert (target / "fold_0" / "checkpoint_final.pth").is_file()


def test_export_errors(trained, tmp_path, capsys):
    res = ["--results", str(trained / "res")]
    for argv, message in ((["-c", "nope"], "no trained model with -c nope"),
                          (["-f", "3"], "no fold(s) 3"),
                          (["-chk", "checkpoint_x.pth"], "checkpoint_x.pth does not exist")):
        assert export_entry(["-d", "821", "-o", str(tmp_path / "m.zip"), *argv, *res]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "m.zip").exists()
    with pytest.raises(Exception, match="must end in .zip"):
        export_model_to_zip(trained / "res", 821, tmp_path / "m.tar")
