"""nndiff_train and nndiff_plan_and_train from the command line (tiny inherited configuration, CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nndiff.dataset.examples import make_example_dataset
from nndiff.run.plan_and_preprocess import plan_and_preprocess_entry
from nndiff.run.train import choose_configuration, default_trainer, plan_and_train_entry, train_entry
from nndiff.utils.files import load_json, save_json

TINY = {
    "inherits_from": "2d",
    "network": {"model_channels": 8, "channel_mult": [1, 2], "strides": [[2, 2]], "num_res_blocks": 1,
                "attention_levels": [1], "num_head_channels": 8, "norm_groups": 4},
    "training": {"num_iterations_per_epoch": 2, "num_epochs": 2, "num_val_cases": 2, "warmup_iterations": 1,
                 "augmentation": "none", "progress_every_epochs": 1},
    "diffusion": {"num_sampling_steps": 2},
}
MODEL = "GenerationTrainer__nnDiffPlans__tiny"


def _roots(root: Path) -> list[str]:
    return ["--raw", str(root / "raw"), "--preprocessed", str(root / "pre"), "--results", str(root / "res")]


def _add_tiny(root: Path) -> Path:
    plans_file = next((root / "pre").glob("Dataset*/nnDiffPlans.json"))
    plans = load_json(plans_file)
    plans["configurations"]["tiny"] = TINY
    save_json(plans, plans_file)
    return plans_file


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_cli")
    make_example_dataset("2d_grey_png", root / "raw", 811, num_cases=6)
    assert plan_and_preprocess_entry(["-d", "811", "-c", "2d", *_roots(root)]) == 0
    _add_tiny(root)
    return root


def test_train_then_continue(planned, capsys):
    roots = _roots(planned)
    fold_dir = planned / "res" / "Dataset811_Grey2D" / MODEL / "fold_0"
    assert train_entry(["811", "tiny", "0", "--iterations", "2", "-device", "cpu", *roots]) == 0
    assert "finished at iteration 2 of 2" in capsys.readouterr().out
    for name in ("checkpoint_final.pth", "checkpoint_best.pth", "progress.png", "debug.json"):
        assert (fold_dir / name).is_file(), name
    first = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)
    assert first["iteration"] == 2 and first["trainer_class"] == "GenerationTrainer"
    # the command line is recorded for exported model manifests
    assert load_json(fold_dir / "debug.json")["command"] == ["nndiff_train", "811", "tiny", "0", "--iterations",
                                                             "2", "-device", "cpu", *roots]

    # --continue with a larger budget goes on from iteration 2 (not from scratch)
    assert train_entry(["811", "tiny", "0", "--epochs", "2", "--continue", "-device", "cpu", *roots]) == 0
    out = capsys.readouterr().out
    assert "finished at iteration 4 of 4" in out
    log = "".join(p.read_text(encoding="utf-8") for p in fold_dir.glob("training_log_*.txt"))
    assert "continuing from" in log
    assert torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)["iteration"] == 4


def test_fold_all_and_explicit_trainer(planned):
    assert train_entry(["Dataset811", "tiny", "all", "-tr", "GenerationTrainer", "--iterations", "1",
                        "-device", "cpu", *_roots(planned)]) == 0
    assert (planned / "res" / "Dataset811_Grey2D" / MODEL / "fold_all" / "checkpoint_final.pth").is_file()


@pytest.mark.parametrize("argv,message", [
    (["899", "tiny", "0"], "no preprocessed dataset Dataset899_*"),
    (["811", "nope", "0"], "nope"),
    (["811", "tiny", "7"], "fold"),
    (["811", "tiny", "0", "--epochs", "0"], "--epochs must be positive"),
    (["811", "tiny", "0", "--time_limit", "-1"], "--time_limit must be positive"),
    (["811", "tiny", "0", "-tr", "NoSuchTrainer"], "unknown trainer 'NoSuchTrainer'"),
])
def test_user_errors_exit_2_with_message(planned, capsys, argv, message):
    assert train_entry([*argv, "-device", "cpu", *_roots(planned)]) == 2
    err = capsys.readouterr().err
    assert "nnDiff error:" in err and message in err, err
    assert not list((planned / "res").glob("*/*/fold_7"))  # nothing half-written


def test_default_trainer_by_family():
    expected = {"generation": "GenerationTrainer", "translation": "TranslationTrainer",
                "denoising": "DenoisingTrainer", "reconstruction": "ReconstructionTrainer",
                "anomaly_detection": "AnomalyDDPMTrainer", "segmentation": "SegmentationDiffusionTrainer"}
    for task, trainer in expected.items():
        assert default_trainer({"task": task}) == trainer
    from nndiff.errors import NnDiffError

    with pytest.raises(NnDiffError, match="no default trainer for task family 'registration'.*-tr"):
        default_trainer({"task": "registration"})


def test_choose_configuration_prefers_3d_fullres_for_3d_data():
    plans = {"configurations": {"2d": {"trainable": True}, "3d_fullres": {"trainable": True},
                                "3d_latent": {"trainable": False}}}
    assert choose_configuration(plans, None) == "3d_fullres"
    assert choose_configuration(plans, "2d") == "2d"
    plans["configurations"]["3d_fullres"]["trainable"] = False
    assert choose_configuration(plans, None) == "2d"
    from nndiff.errors import NnDiffError

    with pytest.raises(NnDiffError, match="'x' is not in the plans"):
        choose_configuration(plans, "x")


def test_plan_and_train_one_command(tmp_path, capsys):
    """Raw dataset -> fingerprint, plan (keeping a hand-added configuration), preprocess, train."""
    make_example_dataset("2d_grey_png", tmp_path / "raw", 812, num_cases=4)
    roots = _roots(tmp_path)
    # a first planning pass lets the user (here: the test) add a small inherited configuration
    assert plan_and_preprocess_entry(["-d", "812", "--no_pp", *roots]) == 0
    _add_tiny(tmp_path)
    assert plan_and_train_entry(["-d", "812", "-c", "tiny", "--iterations", "2", "-device", "cpu", "--explain",
                                 *roots]) == 0
    out = capsys.readouterr().out
    assert "planned and preprocessed tiny; training GenerationTrainer fold 0" in out
    assert "finished at iteration 2 of 2" in out
    assert (tmp_path / "res" / "Dataset812_Grey2D" / MODEL / "fold_0" / "checkpoint_final.pth").is_file()


def test_plan_and_train_refuses_missing_results_root_before_work(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("nnDiff_results", raising=False)
    make_example_dataset("2d_grey_png", tmp_path / "raw", 813, num_cases=4)
    code = plan_and_train_entry(["-d", "813", "--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pre")])
    assert code == 2
    assert "nnDiff_results" in capsys.readouterr().err
    assert not (tmp_path / "pre").exists()  # nothing half-done
