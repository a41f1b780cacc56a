"""Trainer base: exact resume, NaN stop, atomic checkpoints, refusal on mismatch, outputs."""
from __future__ import annotations

import math
import re

import pytest
import torch

from nndiff.errors import NnDiffError, PlansError
from nndiff.training import BEST, FINAL, LATEST, load_checkpoint
from nndiff.training import checkpoint as ckpt_module
from training_helpers import TinyTrainer, make_dataset, make_plans, make_trainer, with_training


@pytest.fixture()
def dataset(tmp_path):
    return make_dataset(tmp_path / "preprocessed")


def _assert_same_state(a: TinyTrainer, b: TinyTrainer) -> None:
    for x, y in ((a.network, b.network), (a.ema_network, b.ema_network)):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys()
        for key in sx:
            assert torch.equal(sx[key], sy[key]), key
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for index in oa["state"]:
        for key, value in oa["state"][index].items():
            assert torch.equal(value, ob["state"][index][key]), (index, key)


@pytest.mark.parametrize("stop_after", [4, 6])  # mid-epoch and at an epoch boundary
def test_resume_equals_uninterrupted_run(dataset, tmp_path, stop_after):
    plans = make_plans(augmentation="mild", checkpoint_every_epochs=1)
    straight = make_trainer(TinyTrainer, plans, dataset, tmp_path / "straight")
    straight.run_training()

    first = make_trainer(TinyTrainer, plans, dataset, tmp_path / "resumed")
    first.run_training(stop_after_iterations=stop_after)
    assert first.iteration == stop_after
    assert not (tmp_path / "resumed" / FINAL).exists()
    assert load_checkpoint(tmp_path / "resumed" / LATEST)["iteration"] == stop_after

    resumed = make_trainer(TinyTrainer, plans, dataset, tmp_path / "resumed")
    resumed.run_training(continue_training=True)
    assert resumed.iteration == straight.iteration == 9
    _assert_same_state(straight, resumed)
    for key in straight.history.columns:
        if key != "epoch_time_s":
            assert straight.history.columns[key] == resumed.history.columns[key], key
    assert resumed.best_val_loss == straight.best_val_loss
    # the final checkpoints hold the same weights, loadable with weights_only=True
    a = torch.load(tmp_path / "straight" / FINAL, weights_only=True)
    b = torch.load(tmp_path / "resumed" / FINAL, weights_only=True)
    for key in a["ema_weights"]:
        assert torch.equal(a["ema_weights"][key], b["ema_weights"][key])


def test_checkpoint_content(dataset, tmp_path):
    trainer = make_trainer(TinyTrainer, make_plans(), dataset, tmp_path / "out")
    trainer.run_training()
    state = torch.load(tmp_path / "out" / FINAL, weights_only=True)
    assert state["trainer_class"] == "TinyTrainer" and state["plans_hash"] == trainer.plans_hash
    assert state["iteration"] == 9 and state["epoch"] == 3 and state["loader_state"] == {"seed": 7, "next_iteration": 9}
    assert state["grad_scaler_state"] is None
    assert set(state["rng_state"]) == {"python", "numpy", "torch_cpu", "torch_cuda"}
    assert set(state["network_weights"]) == set(trainer.network.state_dict())
    assert not torch.equal(state["network_weights"]["0.weight"], state["ema_weights"]["0.weight"])
    best = torch.load(tmp_path / "out" / BEST, weights_only=True)
    assert best["best_val_loss"] == min(trainer.history.columns["val_loss"])


def test_nan_loss_stops_with_clear_error_and_writes_nothing_for_that_step(dataset, tmp_path):
    plans = make_plans(num_iterations_per_epoch=2)
    trainer = make_trainer(TinyTrainer, plans, dataset, tmp_path / "out")
    trainer.nan_at_iteration = 5
    with pytest.raises(NnDiffError) as info:
        trainer.run_training()
    message = str(info.value)
    assert "loss is nan at iteration 5" in message
    assert "lower initial_lr" in message and "check the preprocessed data" in message
    assert "checkpoint_latest.pth" in message
    latest = load_checkpoint(tmp_path / "out" / LATEST)
    assert latest["iteration"] == 4 and trainer.iteration == 4
    for key, value in trainer.network.state_dict().items():  # weights not updated by the bad step
        assert torch.equal(value, latest["network_weights"][key])
    assert not (tmp_path / "out" / FINAL).exists()
    assert not list((tmp_path / "out").glob(".*.tmp"))
    log = next((tmp_path / "out").glob("training_log_*.txt")).read_text(encoding="utf-8")
    assert "ERROR: training stopped: the loss is nan" in log


def test_nan_in_data_is_named_in_the_error(tmp_path):
    import numpy as np
    from training_helpers import write_case

    dataset = make_dataset(tmp_path / "preprocessed", num_cases=2)
    bad = np.zeros((1, 4, 12, 12), np.float32)
    bad[0, :, 5, 5] = np.nan
    write_case(dataset / "nnDiffPlans_2d", "case_00", bad)
    write_case(dataset / "nnDiffPlans_2d", "case_01", bad)
    trainer = make_trainer(TinyTrainer, make_plans(), dataset, tmp_path / "out", fold="all")
    with pytest.raises(NnDiffError, match=r"loss is nan at iteration 1 .*batch itself contains NaN/Inf .*case_0"):
        trainer.run_training()
    assert not any((tmp_path / "out").glob("checkpoint_*.pth"))


def test_checkpoint_write_is_atomic(dataset, tmp_path, monkeypatch):
    trainer = make_trainer(TinyTrainer, make_plans(), dataset, tmp_path / "out")
    trainer.run_training(stop_after_iterations=3)
    path = tmp_path / "out" / LATEST
    before = path.read_bytes()

    def broken_save(obj, target):
        with open(target, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer._save(LATEST)
    assert path.read_bytes() == before
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_continue_refuses_other_trainer_class_or_plans(dataset, tmp_path):
    plans = make_plans()
    make_trainer(TinyTrainer, plans, dataset, tmp_path / "out").run_training(stop_after_iterations=2)

    class OtherTrainer(TinyTrainer):
        pass

    with pytest.raises(NnDiffError, match=r"written by trainer 'TinyTrainer', this run uses 'OtherTrainer'"):
        make_trainer(OtherTrainer, plans, dataset, tmp_path / "out").run_training(continue_training=True)
    changed = with_training(plans, initial_lr=5e-3)
    with pytest.raises(NnDiffError, match="the plans changed since it was written"):
        make_trainer(TinyTrainer, changed, dataset, tmp_path / "out").run_training(continue_training=True)
    # explanation-only keys do not count: rewording a reason keeps the run resumable
    reworded = make_plans()
    reworded["configurations"]["2d"]["reasons"] = {"patch_size": "other words"}
    reworded["configurations"]["other"] = {"inherits_from": "2d", "batch_size": 4}
    trainer = make_trainer(TinyTrainer, reworded, dataset, tmp_path / "out")
    trainer.run_training(continue_training=True)
    assert trainer.iteration == 9


def test_outputs_log_progress_and_debug(dataset, tmp_path):
    plans = make_plans(progress_every_epochs=2)
    trainer = make_trainer(TinyTrainer, plans, dataset, tmp_path / "out")
    trainer.run_training()
    out = tmp_path / "out"
    assert (out / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logs = list(out.glob("training_log_*.txt"))
    assert len(logs) == 1 and re.fullmatch(r"training_log_\d{4}(_\d\d){5}\.txt", logs[0].name)
    text = logs[0].read_text(encoding="utf-8")
    assert "epoch 0: iteration 3/9" in text and "training finished after 9 iterations" in text
    import json

    debug = json.loads((out / "debug.json").read_text(encoding="utf-8"))
    assert debug["trainer_class"] == "TinyTrainer" and debug["total_iterations"] == 9
    assert debug["settings"]["ema_decay"] == 0.9 and debug["num_parameters"] > 0
    assert {"train_loss", "val_loss", "lr", "epoch_time_s", "train_sigma"} <= set(trainer.history.columns)


def test_validation_loss_uses_fixed_per_case_noise(dataset, tmp_path):
    trainer = make_trainer(TinyTrainer, make_plans(num_val_cases=3), dataset, tmp_path / "out")
    trainer.initialize()
    first = trainer.validate()["loss"]
    assert trainer.validate()["loss"] == first  # same (t, noise) every epoch
    trainer.batch_size = 1  # a case's noise does not depend on its batch neighbours
    assert trainer.validate()["loss"] == pytest.approx(first, rel=1e-6)
    assert len(trainer.validation_items) == 2  # fold 0 holds one subject of two cases


def test_epochs_and_iterations_overrides(dataset, tmp_path):
    plans = make_plans()  # 3 epochs x 3 iterations
    assert make_trainer(TinyTrainer, plans, dataset, tmp_path / "a", epochs=5).total_iterations == 15
    assert make_trainer(TinyTrainer, plans, dataset, tmp_path / "b", iterations=4).total_iterations == 4
    trainer = make_trainer(TinyTrainer, plans, dataset, tmp_path / "c", epochs=2, iterations=100)
    assert trainer.total_iterations == 6
    trainer = make_trainer(TinyTrainer, plans, dataset, tmp_path / "d", iterations=4)
    trainer.run_training()
    # a partial last epoch still ends with validation and the final checkpoint
    assert trainer.history.columns["iteration"] == [3.0, 4.0]
    assert load_checkpoint(tmp_path / "d" / FINAL)["iteration"] == 4
    # continuing a finished run with a larger budget trains on
    more = make_trainer(TinyTrainer, plans, dataset, tmp_path / "d", iterations=6)
    more.run_training(continue_training=True)
    assert more.iteration == 6


def test_fold_all_and_results_folder_layout(dataset, tmp_path):
    trainer = TinyTrainer(make_plans(), "2d", "all", dataset, tmp_path / "results", device="cpu", num_workers=0)
    assert trainer.output_dir == tmp_path / "results" / "Dataset901_Tiny" / "TinyTrainer__nnDiffPlans__2d" / "fold_all"
    trainer.run_training(stop_after_iterations=1)
    assert trainer.train_cases == trainer.val_cases and len(trainer.train_cases) == 8
    assert "validating on the training cases" in next(trainer.output_dir.glob("training_log_*.txt")).read_text(encoding="utf-8")


def test_untrainable_configuration_and_missing_data_are_refused(dataset, tmp_path):
    plans = make_plans()
    plans["configurations"]["2d"].update(trainable=False, status="latent: needs an autoencoder first")
    with pytest.raises(PlansError, match="cannot be trained: latent"):
        make_trainer(TinyTrainer, plans, dataset, tmp_path / "out")
    with pytest.raises(NnDiffError, match="preprocessed data not found"):
        make_trainer(TinyTrainer, make_plans(), tmp_path / "nowhere", tmp_path / "out").run_training()


def test_3d_configuration_trains_on_patches(tmp_path):
    dataset = make_dataset(tmp_path / "preprocessed", num_cases=4, shape=(6, 10, 10))
    plans = make_plans(spatial_dims=3, patch_size=(4, 8, 8), num_epochs=1, augmentation="mild")
    trainer = make_trainer(TinyTrainer, plans, dataset, tmp_path / "out", fold="all")
    trainer.run_training()
    assert trainer.iteration == 3 and math.isfinite(trainer.history.last("val_loss"))
    assert trainer.validation_items[0].arrays["data"].shape == (1, 4, 8, 8)


def test_train_fold_api_finds_dataset_and_plans(dataset, tmp_path):
    import json

    from nndiff.paths import Paths
    from nndiff.training.api import find_preprocessed_dataset, train_fold

    (dataset / "nnDiffPlans.json").write_text(json.dumps(make_plans()))
    (tmp_path / "raw" / dataset.name).mkdir(parents=True)
    (tmp_path / "raw" / dataset.name / "metadata.json").write_text(json.dumps({"case_03": {"age": 61}}))
    paths = Paths(raw=tmp_path / "raw", preprocessed=dataset.parent, results=tmp_path / "results")
    assert find_preprocessed_dataset(dataset.parent, "901") == dataset
    assert find_preprocessed_dataset(dataset.parent, "Dataset901") == dataset
    with pytest.raises(NnDiffError, match=r"no preprocessed dataset Dataset002_\*"):
        find_preprocessed_dataset(dataset.parent, 2)
    trainer = train_fold(901, "2d", "0", paths, trainer=TinyTrainer, iterations=2, device="cpu", num_workers=0)
    assert (trainer.output_dir / FINAL).is_file() and trainer.fold == 0
    assert trainer.output_dir.parent.name == "TinyTrainer__nnDiffPlans__2d"
    # metadata from the preprocessed folder and from the raw dataset's metadata.json
    assert trainer.case_metadata["case_03"] == {"subject": "s1", "age": 61}
    with pytest.raises(NnDiffError, match="plans file .*nnDiffPlansX.json not found"):
        train_fold(901, "2d", 0, paths, trainer=TinyTrainer, plans_name="nnDiffPlansX")


class GridTrainer(TinyTrainer):
    """Writes a sample grid at progress epochs, drawing random numbers as a sampler would."""

    def on_epoch_end(self, epoch, record):
        import numpy as np

        from nndiff.training import save_image_grid

        np.random.random(5)
        noise = torch.randn(4, 1, 8, 8)
        if self.is_progress_epoch(epoch):
            with torch.no_grad():
                save_image_grid(self.validation_network(noise), self.output_dir / f"samples_epoch{epoch}.png")


def test_epoch_end_hooks_do_not_change_training(dataset, tmp_path):
    plans = make_plans(progress_every_epochs=2)
    plain = make_trainer(TinyTrainer, plans, dataset, tmp_path / "plain")
    plain.run_training()
    grids = make_trainer(GridTrainer, plans, dataset, tmp_path / "grids")
    grids.run_training()
    assert (tmp_path / "grids" / "samples_epoch1.png").is_file()
    assert not (tmp_path / "grids" / "samples_epoch0.png").exists()
    for key, value in plain.network.state_dict().items():
        assert torch.equal(value, grids.network.state_dict()[key]), key


def test_time_limit_stops_after_the_current_iteration(dataset, tmp_path):
    trainer = make_trainer(TinyTrainer, make_plans(), dataset, tmp_path / "out")
    trainer.run_training(time_limit_s=0.0)
    assert trainer.iteration == 1
    assert load_checkpoint(tmp_path / "out" / LATEST)["iteration"] == 1
    assert "stopped after iteration 1 of 9" in next((tmp_path / "out").glob("training_log_*.txt")).read_text(encoding="utf-8")
