"""nndiff_find_best_configuration on two tiny trained configurations of one 2D dataset: ranking by
the checkpoints' validation losses, criterion, diffusion-difference note, fold selection, and
instructions whose commands parse with (and run through) the real nndiff_predict parser."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch

from nndiff.dataset.examples import make_example_dataset
from nndiff.inference.cli import build_parser as predict_parser
from nndiff.inference.cli import predict_entry
from nndiff.run.evaluate import evaluate_folder_parser
from nndiff.run.find_best import INSTRUCTIONS_FILE, RESULT_FILE, find_best_configuration, find_best_entry
from nndiff.run.plan_and_preprocess import plan_and_preprocess_entry
from nndiff.run.train import train_entry
from nndiff.training.checkpoint import save_checkpoint
from nndiff.utils.files import load_json, save_json

NETWORK = {"model_channels": 8, "channel_mult": [1, 2], "strides": [[2, 2]], "num_res_blocks": 1,
           "attention_levels": [1], "num_head_channels": 8, "norm_groups": 4}
TRAINING = {"num_iterations_per_epoch": 1, "num_epochs": 2, "num_val_cases": 2, "warmup_iterations": 1,
            "augmentation": "none", "progress_every_epochs": 1}
CONFIGS = {
    "tiny_a": {"inherits_from": "2d", "network": NETWORK, "training": TRAINING, "diffusion": {"num_sampling_steps": 2}},
    # a training-side diffusion key differs: the result must say the losses are not comparable
    "tiny_b": {"inherits_from": "2d", "network": NETWORK, "training": TRAINING,
               "diffusion": {"num_sampling_steps": 2, "min_snr_gamma": 4.0}},
}
DATASET = "Dataset831_Grey2D"


def _roots(root: Path) -> list[str]:
    return ["--raw", str(root / "raw"), "--preprocessed", str(root / "pre"), "--results", str(root / "res")]


def _model(root: Path, config: str) -> Path:
    return root / "res" / DATASET / f"GenerationTrainer__nnDiffPlans__{config}"


def _set_val_losses(root: Path, config: str, losses: list[float]) -> None:
    """Replace the recorded validation-loss history (to make the expected winner certain)."""
    path = _model(root, config) / "fold_0" / "checkpoint_final.pth"
    state = torch.load(path, weights_only=True)
    state["history"]["val_loss"] = losses
    save_checkpoint(state, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("find_best")
    make_example_dataset("2d_grey_png", root / "raw", 831, num_cases=6)
    assert plan_and_preprocess_entry(["-d", "831", "-c", "2d", *_roots(root)]) == 0
    plans_file = root / "pre" / DATASET / "nnDiffPlans.json"
    plans = load_json(plans_file)
    plans["configurations"].update(CONFIGS)
    save_json(plans, plans_file)
    for config in CONFIGS:
        assert train_entry(["831", config, "0", "-device", "cpu", *_roots(root)]) == 0
    return root


def test_ranks_by_recorded_validation_loss(trained):
    recorded = {}
    for config in CONFIGS:
        history = torch.load(_model(trained, config) / "fold_0" / "checkpoint_final.pth", weights_only=True)["history"]
        assert len(history["val_loss"]) == 2
        recorded[config] = history["val_loss"]
    result = find_best_configuration(trained / "res", 831, preprocessed_root=trained / "pre", write=False)
    by_config = {s["configuration"]: s for s in result["ranking"]}
    for config, losses in recorded.items():
        assert by_config[config]["score"] == pytest.approx(losses[-1])
        assert by_config[config]["best_val_loss"]["0"] == pytest.approx(min(losses))
    assert result["best"]["configuration"] == min(recorded, key=lambda c: recorded[c][-1])
    assert result["folds"] == ["0"]


def test_picks_lower_loss_and_criterion_best(trained):
    _set_val_losses(trained, "tiny_a", [0.5, 0.9])
    _set_val_losses(trained, "tiny_b", [0.7, 0.8])
    final = find_best_configuration(trained / "res", 831, preprocessed_root=trained / "pre", write=False)
    assert final["best"]["configuration"] == "tiny_b"
    assert [s["configuration"] for s in final["ranking"]] == ["tiny_b", "tiny_a"]
    best = find_best_configuration(trained / "res", 831, criterion="best", preprocessed_root=trained / "pre",
                                   write=False)
    assert best["best"]["configuration"] == "tiny_a" and best["best"]["score"] == pytest.approx(0.5)
    (note,) = best["diffusion_differences"]
    assert "min_snr_gamma" in note and "not on the same scale" in note


def test_instructions_parse_and_run(trained, tmp_path, capsys):
    _set_val_losses(trained, "tiny_a", [0.5, 0.4])
    _set_val_losses(trained, "tiny_b", [0.7, 0.8])
    assert find_best_entry(["-d", "831", "--criterion", "best", *_roots(trained)[2:]]) == 0
    out = capsys.readouterr().out
    text = (trained / "res" / DATASET / INSTRUCTIONS_FILE).read_text(encoding="utf-8")
    assert out == text and "GenerationTrainer__nnDiffPlans__tiny_a" in text.splitlines()[0]
    assert load_json(trained / "res" / DATASET / RESULT_FILE)["best"]["configuration"] == "tiny_a"
    commands = [shlex.split(line.strip()) for line in text.splitlines() if line.strip().startswith("nndiff_")]
    predict = next(c for c in commands if c[0] == "nndiff_predict")
    evaluate = next(c for c in commands if c[0] == "nndiff_evaluate_folder")
    args = predict_parser().parse_args(predict[1:])
    assert (args.configuration, args.trainer, args.folds, args.checkpoint) == ("tiny_a", "GenerationTrainer", ["0"],
                                                                               "checkpoint_best.pth")
    assert evaluate_folder_parser().parse_args(evaluate[1:]).d == "831"
    # the command runs as written (output folder and sample count filled in)
    argv = [str(tmp_path / "out") if a == "OUTPUT_FOLDER" else a for a in predict[1:]]
    argv[argv.index("--num_samples") + 1] = "1"
    assert predict_entry([*argv, "-device", "cpu", *_roots(trained)[2:]]) == 0
    assert (tmp_path / "out" / "sample_0000.png").is_file()


def test_fold_selection_and_errors(trained, capsys):
    roots = _roots(trained)[2:]
    assert find_best_entry(["-d", "831", "-f", "1", *roots]) == 2
    assert "no trained model has all of fold(s) 1" in capsys.readouterr().err
    assert find_best_entry(["-d", "831", "-c", "nope", *roots]) == 2
    assert "no trained model with -c nope" in capsys.readouterr().err
    only_a = find_best_configuration(trained / "res", 831, configurations=["tiny_a"],
                                     preprocessed_root=trained / "pre", write=False)
    assert [s["configuration"] for s in only_a["ranking"]] == ["tiny_a"] and not only_a["diffusion_differences"]
