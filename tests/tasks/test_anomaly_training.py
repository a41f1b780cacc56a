"""Anomaly detection, training side: healthy rule, plan hook, the three trainers, NoisyClassifier."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import nndiff.tasks
from nndiff.diffusion.noise import SimplexNoise
from nndiff.errors import NnDiffError, PlansError
from nndiff.networks.classifier import NoisyClassifier, build_classifier
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
from nndiff.dataset.examples import make_example_dataset
from nndiff.tasks.anomaly import (CLASS_MAP, AnomalyCDPMTrainer, AnomalyClassifierTrainer, AnomalyDDPMTrainer,
                                  anomaly_settings, classify_cases, decide_simplex, healthy_cases,
                                  healthy_cases_in_folder, load_noisy_classifier, plan_overrides,
                                  require_diseased, require_healthy, sample_t_below)
from nndiff.training import get_trainer_class, load_checkpoint
from nndiff.training.api import load_plans
from nndiff.utils.files import load_json, save_json

TINY = "tiny"
TINY_OVERRIDES = {
    "patch_size": [16, 16],
    "network": {"model_channels": 8, "channel_mult": [1, 2], "strides": [[2, 2]], "num_res_blocks": 1,
                "attention_levels": [1], "num_head_channels": 8, "norm_groups": 4, "dropout": 0.0},
    "training": {"num_iterations_per_epoch": 2, "num_epochs": 2, "num_val_cases": 4, "warmup_iterations": 1,
                 "augmentation": "none", "progress_every_epochs": 100},
    "diffusion": {"num_sampling_steps": 2},
}


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def anomaly_dataset(tmp_path_factory) -> Path:
    """anomaly_2d example (even cases healthy, odd ones with a bright lesion and its mask), planned
    through the family hook and preprocessed, plus a shrunk 'tiny' configuration."""
    root = tmp_path_factory.mktemp("anomaly")
    paths = Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")
    make_example_dataset("anomaly_2d", paths.raw, 861)
    location = locate_dataset(861, paths)
    extract_fingerprint_step(location)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(nndiff.tasks.PLAN_HOOKS, "anomaly_detection", "nndiff.tasks.anomaly:plan_overrides")
        plans = plan_step(location)
    plans["configurations"][TINY] = {"inherits_from": "2d", **json.loads(json.dumps(TINY_OVERRIDES))}
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=["2d"])
    return location.preprocessed_dir


def make_trainer(cls, pre: Path, out: Path, **kwargs):
    kwargs.setdefault("seed", 3)
    return cls(load_plans(pre), TINY, 0, pre, output_dir=out, device="cpu", num_workers=0, **kwargs)


def train_and_resume(cls, pre: Path, out: Path) -> dict:
    """2 iterations, stop; --continue to the end (4). Returns the final checkpoint."""
    make_trainer(cls, pre, out).run_training(stop_after_iterations=2)
    assert load_checkpoint(out / "checkpoint_latest.pth")["iteration"] == 2
    resumed = make_trainer(cls, pre, out)
    resumed.run_training(continue_training=True)
    state = load_checkpoint(out / "checkpoint_final.pth")
    assert state["trainer_class"] == cls.__name__ and state["iteration"] == 4
    assert all(math.isfinite(v) for v in state["history"]["train_loss"] + state["history"]["val_loss"])
    return state


# ----------------------------------------------------------------------------------------------
# Healthy rule
# ----------------------------------------------------------------------------------------------
def test_healthy_rule_metadata_then_label_then_default():
    lesion = np.zeros((1, 1, 4, 4), np.int16)
    lesion[0, 0, 1, 1] = 1
    empty = np.zeros_like(lesion)
    metadata = {"a": {"healthy": False}, "b": {"healthy": True, "subject": "s"}, "c": {"subject": "t"}}
    labels = {"a": empty, "b": lesion, "c": lesion, "d": empty}
    verdicts = classify_cases(["a", "b", "c", "d", "e"], metadata, labels)
    # metadata wins over the label; then the mask; no metadata and no label → healthy
    assert verdicts == {"a": (False, "metadata"), "b": (True, "metadata"), "c": (False, "label"),
                        "d": (True, "label"), "e": (True, "default")}
    assert healthy_cases(["x", "y"], None, None) == {"x": True, "y": True}
    read: list[str] = []
    lazy = healthy_cases(["a", "c"], metadata, lambda case: read.append(case) or lesion)
    assert lazy == {"a": False, "c": False} and read == ["c"]  # labels only read where metadata is silent


@pytest.mark.parametrize("value", ["false", 0, 1, None])
def test_healthy_rule_refuses_non_boolean(value):
    with pytest.raises(NnDiffError) as err:
        healthy_cases(["case_7"], {"case_7": {"healthy": value}}, metadata_file="/data/metadata.json")
    text = str(err.value)
    assert "/data/metadata.json" in text and "case_7" in text and "true or" in text


def test_healthy_rule_on_preprocessed_folder(anomaly_dataset):
    folder = anomaly_dataset / "nnDiffPlans_2d"
    metadata = load_json(anomaly_dataset / "metadata.json")
    by_metadata = healthy_cases_in_folder(folder, metadata)
    assert {c: h for c, (h, _) in by_metadata.items()} == {f"case_{i:03d}": i % 2 == 0 for i in range(10)}
    # Without metadata the masks decide: lesion masks → diseased, cases without a label → healthy.
    by_labels = healthy_cases_in_folder(folder, {})
    assert {c: h for c, (h, _) in by_labels.items()} == {c: h for c, (h, _) in by_metadata.items()}
    assert {s for _, s in by_labels.values()} == {"label", "default"}


def test_require_healthy_and_diseased_messages():
    verdicts = {"a": True, "b": True}
    assert require_healthy(verdicts, ["a", "b"], "anoddpm") == ["a", "b"]
    with pytest.raises(NnDiffError, match="needs healthy training cases.*Fix: mark cases in metadata.json"):
        require_healthy({"a": False}, ["a"], "anoddpm")
    with pytest.raises(NnDiffError, match="none of the 2 training case.*is diseased.*use strategy anoddpm"):
        require_diseased(verdicts, ["a", "b"], "cdpm")


# ----------------------------------------------------------------------------------------------
# Plan hook
# ----------------------------------------------------------------------------------------------
def test_plan_hook_adds_anomaly_block_and_simplex_octaves(anomaly_dataset):
    plans = load_plans(anomaly_dataset)
    config = plans["configurations"]["2d"]
    assert config["patch_size"] == [32, 32]
    # 32 / 4 = 8-voxel first octave, halved down to 2 voxels: 3 octaves
    assert config["diffusion"]["noise_params"]["frequency"] == 8.0
    assert config["diffusion"]["noise_params"]["octaves"] == 3
    assert "side 32 / 4" in config["reasons"]["diffusion.noise_type"]
    settings = anomaly_settings(config)
    assert settings["strategy"] == "anoddpm" and settings["map_smoothing_sigma"] == 1.0
    assert all(f"anomaly.{key}" in config["reasons"] for key in config["anomaly"])
    assert config["sampling"]["start_fraction"] == 0.25  # t_λ stays where the planner put it
    assert decide_simplex([256, 256]).value == (64.0, 6)  # AnoDDPM's own setting at its image size
    assert plan_overrides({}, {"configurations": {"x": {"inherits_from": "2d"}}}) == \
        {"configurations": {"x": {"inherits_from": "2d"}}}


def test_anomaly_settings_errors_name_the_key():
    with pytest.raises(PlansError, match=r"anomaly.strategy = 'magic' must be one of anoddpm, wolleb, cdpm"):
        anomaly_settings({"anomaly": {"strategy": "magic"}})
    with pytest.raises(PlansError, match=r"anomaly.octaves: unknown key"):
        anomaly_settings({"anomaly": {"octaves": 3}})
    with pytest.raises(PlansError, match=r"condition_dropout = 1.5 must be in \[0, 1\)"):
        anomaly_settings({"anomaly": {"condition_dropout": 1.5}})


# ----------------------------------------------------------------------------------------------
# AnoDDPM
# ----------------------------------------------------------------------------------------------
def test_anoddpm_trains_on_healthy_cases_with_simplex_noise_and_resumes(anomaly_dataset, tmp_path):
    assert get_trainer_class("AnomalyDDPMTrainer") is AnomalyDDPMTrainer
    trainer = make_trainer(AnomalyDDPMTrainer, anomaly_dataset, tmp_path / "probe")
    trainer.initialize()
    assert trainer.train_cases and all(int(c[-3:]) % 2 == 0 for c in trainer.train_cases)
    assert any(int(c[-3:]) % 2 for c in trainer.val_cases)  # validation keeps diseased cases
    assert isinstance(trainer.noise_fn, SimplexNoise) and trainer.noise_fn.octaves == 3

    # Simplex noise in a batched step: one independent standardised field per sample.
    drawn = []
    original = trainer.noise_fn
    trainer.noise_fn = lambda shape, **kw: drawn.append(original(shape, **kw)) or drawn[-1]
    batch = trainer.make_batch({"keys": trainer.train_cases[:2] * 2,
                                "data": np.zeros((4, 1, 16, 16), np.float32)})
    loss, _ = trainer.compute_loss(trainer.network, batch, train=True)
    noise = drawn[-1]
    assert torch.isfinite(loss) and noise.shape == (4, 1, 16, 16)
    assert torch.allclose(noise.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-5)
    assert not torch.allclose(noise[0], noise[1], atol=1e-3)

    state = train_and_resume(AnomalyDDPMTrainer, anomaly_dataset, tmp_path / "run")
    assert state["extra"]["anomaly"]["strategy"] == "anoddpm"
    assert state["extra"]["anomaly"]["num_healthy_training_cases"] == len(trainer.train_cases)


def test_anoddpm_refuses_fold_without_healthy_cases(anomaly_dataset, tmp_path):
    all_diseased = {f"case_{i:03d}": {"healthy": False} for i in range(10)}
    trainer = make_trainer(AnomalyDDPMTrainer, anomaly_dataset, tmp_path / "x", metadata=all_diseased)
    with pytest.raises(NnDiffError, match="strategy anoddpm needs healthy training cases"):
        trainer.initialize()


# ----------------------------------------------------------------------------------------------
# CDPM
# ----------------------------------------------------------------------------------------------
def test_cdpm_labels_dropout_checkpoint_and_resume(anomaly_dataset, tmp_path):
    trainer = make_trainer(AnomalyCDPMTrainer, anomaly_dataset, tmp_path / "probe")
    trainer.initialize()
    assert trainer.network.config.num_classes == 2
    assert trainer.diffusion.condition_dropout == pytest.approx(0.1)
    keys = sorted(trainer.train_cases)
    batch = trainer.make_batch({"keys": keys, "data": np.zeros((len(keys), 1, 16, 16), np.float32)})
    expected = [CLASS_MAP["healthy"] if int(k[-3:]) % 2 == 0 else CLASS_MAP["diseased"] for k in keys]
    assert batch["class_labels"].tolist() == expected

    state = train_and_resume(AnomalyCDPMTrainer, anomaly_dataset, tmp_path / "run")
    extra = state["extra"]
    assert extra["anomaly"]["class_map"] == {"healthy": 0, "diseased": 1}
    assert extra["conditions"]["categorical"] == [["healthy", [True, False]]]
    assert extra["anomaly"]["network"]["num_classes"] == 2
    resumed = make_trainer(AnomalyCDPMTrainer, anomaly_dataset, tmp_path / "again")
    resumed.initialize()
    resumed.load_extra_state(extra)  # labels survive a resume
    assert resumed.make_batch({"keys": keys, "data": np.zeros((len(keys), 1, 16, 16), np.float32)}
                              )["class_labels"].tolist() == expected


@pytest.mark.parametrize("cls", [AnomalyCDPMTrainer, AnomalyClassifierTrainer])
def test_two_class_strategies_refuse_data_without_diseased_cases(anomaly_dataset, tmp_path, cls):
    all_healthy = {f"case_{i:03d}": {"healthy": True} for i in range(10)}
    trainer = make_trainer(cls, anomaly_dataset, tmp_path / "x", metadata=all_healthy)
    with pytest.raises(NnDiffError, match="needs healthy and diseased training cases.*is diseased"):
        trainer.initialize()


# ----------------------------------------------------------------------------------------------
# Noisy classifier
# ----------------------------------------------------------------------------------------------
NET = {"architecture": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 1, "model_channels": 8,
       "channel_mult": [1, 2], "strides": [[2, 2]], "num_res_blocks": 1, "attention_levels": [1],
       "num_head_channels": 8, "norm_groups": 4, "num_classes": 3, "cond_channels": 2}


@pytest.mark.parametrize("dims,pooling", [(2, "attention"), (3, "mean"), (3, "attention")])
def test_noisy_classifier_shapes_and_input_gradient(dims, pooling):
    block = {**NET, "spatial_dims": dims, "strides": [[2] * dims]}
    model = build_classifier({"network": block, "pooling": pooling}, seed=0)
    assert isinstance(model, NoisyClassifier) and model.classifier_config["pooling"] == pooling
    x = torch.randn(3, 1, *([8] * dims), requires_grad=True)
    logits = model(x, torch.tensor([0.0, 10.0, 999.0]))
    assert logits.shape == (3, 2)
    torch.log_softmax(logits, 1)[:, 0].sum().backward()  # classifier guidance needs d log p / d x_t
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    rebuilt = build_classifier(model.classifier_config, seed=0)
    torch.testing.assert_close(rebuilt(x.detach(), torch.tensor(5.0)), model(x.detach(), torch.tensor(5.0)))
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(1, 1, *([7] * dims)), torch.tensor(1.0))


def test_classifier_trainer_trains_resumes_and_loads(anomaly_dataset, tmp_path):
    state = train_and_resume(AnomalyClassifierTrainer, anomaly_dataset, tmp_path / "run")
    assert "val_accuracy" in state["history"]
    extra = state["extra"]["anomaly"]
    assert extra["strategy"] == "wolleb" and extra["class_map"] == CLASS_MAP and extra["noise_type"] == "simplex"
    assert extra["class_weights"] == pytest.approx([1.0, 1.0], abs=0.5)
    model = load_noisy_classifier(state)
    assert model(torch.zeros(2, 1, 32, 32), torch.tensor(10.0)).shape == (2, 2)
    with pytest.raises(NnDiffError, match="holds no noisy classifier"):
        load_noisy_classifier(load_checkpoint(tmp_path / "run" / "checkpoint_final.pth") | {"trainer_class": "X"})
    # Its own results folder, named after the trainer like every trainer's.
    trainer = AnomalyClassifierTrainer(load_plans(anomaly_dataset), TINY, 0, anomaly_dataset, tmp_path / "results",
                                       device="cpu")
    assert trainer.output_dir.parent.name == f"AnomalyClassifierTrainer__nnDiffPlans__{TINY}"


def test_sample_t_below_stays_in_range():
    from nndiff.diffusion.config import build_process
    process = build_process({"process": "vp_discrete", "num_train_timesteps": 1000})
    t = sample_t_below(process, 5000, 0.1, torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.int64 and int(t.min()) == 0 and int(t.max()) == 99


def write_case(folder: Path, name: str, data: np.ndarray) -> None:
    """CASE.npz + CASE.json in the preprocessed layout (images only)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"{name}.npz", data=data.astype(np.float32))
    (folder / f"{name}.json").write_text(json.dumps({"shape_after_crop": list(data.shape[1:])}))


def _toy_dataset(root: Path) -> tuple[Path, dict]:
    """16×16 cases: smooth background; diseased cases have a bright 4×4 blob at a random place."""
    rng = np.random.default_rng(0)
    dataset_dir = root / "Dataset862_Toy"
    folder = dataset_dir / "nnDiffPlans_2d"
    metadata = {}
    for i in range(16):
        image = rng.normal(-0.5, 0.05, size=(1, 1, 16, 16))
        if i % 2:
            y, x = rng.integers(2, 10, size=2)
            image[..., y:y + 4, x:x + 4] = 0.9
        write_case(folder, f"toy_{i:02d}", image)
        metadata[f"toy_{i:02d}"] = {"healthy": i % 2 == 0}
    (dataset_dir / "metadata.json").write_text(json.dumps(metadata))
    plans = {"dataset_name": dataset_dir.name, "plans_name": "nnDiffPlans",
             "configurations": {"2d": {
                 "data_identifier": "nnDiffPlans_2d", "spatial_dims": 2, "patch_size": [16, 16], "batch_size": 8,
                 "network": {**NET, "cond_channels": 0, "num_classes": None},
                 "diffusion": {"process": "vp_discrete", "num_train_timesteps": 1000, "schedule": "cosine",
                               "noise_type": "gaussian"},
                 "anomaly": {"classifier_max_t_fraction": 0.05, "classifier_pooling": "mean"},
                 "training": {"num_iterations_per_epoch": 30, "num_epochs": 1, "num_val_cases": 16,
                              "initial_lr": 3e-3, "warmup_iterations": 2, "ema_decay": 0.5,
                              "augmentation": "none", "progress_every_epochs": 100}}}}
    return dataset_dir, plans


def test_classifier_separates_a_toy_set(tmp_path):
    dataset_dir, plans = _toy_dataset(tmp_path)
    trainer = AnomalyClassifierTrainer(plans, "2d", "all", dataset_dir, output_dir=tmp_path / "out", device="cpu",
                                       num_workers=0, seed=1)
    trainer.initialize()
    untrained_loss = trainer.validate()["loss"]
    trainer.run_training()
    history = trainer.history.state()
    # 16 fixed balanced cases (chance 0.5) at t < 50 of 1000: the trained classifier separates them.
    assert history["val_accuracy"][-1] >= 0.9
    assert history["val_loss"][-1] < 0.5 * untrained_loss
