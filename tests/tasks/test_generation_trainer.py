"""GenerationTrainer and sample_images on tiny example datasets (CPU, a few iterations)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nndiff.dataset.examples import make_example_dataset
from nndiff.networks import NULL_LABEL, build_network
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
from nndiff.tasks.generation import ConditionEncoder, GenerationTrainer, sample_images
from nndiff.training import get_trainer_class, load_checkpoint
from nndiff.training.api import load_plans, train_fold
from nndiff.utils.files import load_json, save_json

TINY = "tiny"
#: Small network, run length and sampling: the planned defaults (64 channels, 25 steps) are for GPUs.
TINY_OVERRIDES = {
    "network": {"model_channels": 8, "channel_mult": [1, 2], "strides": None, "num_res_blocks": 1,
                "attention_levels": [1], "num_head_channels": 8, "norm_groups": 4},
    "training": {"num_iterations_per_epoch": 2, "num_epochs": 2, "num_val_cases": 2, "warmup_iterations": 1,
                 "augmentation": "none", "progress_every_epochs": 1},
    "diffusion": {"num_sampling_steps": 3},
}


def _prepare(root: Path, kind: str, dataset_id: int, parent: str) -> Paths:
    """Example dataset -> fingerprint, plan (+ a shrunk 'tiny' configuration), preprocess."""
    paths = Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")
    make_example_dataset(kind, paths.raw, dataset_id)
    location = locate_dataset(dataset_id, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    spatial_dims = plans["configurations"][parent]["spatial_dims"]
    tiny = {"inherits_from": parent, **{k: dict(v) for k, v in TINY_OVERRIDES.items()}}
    tiny["network"]["strides"] = [[2] * spatial_dims]
    plans["configurations"][TINY] = tiny
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=[parent])
    return paths


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Paths]:
    root = tmp_path_factory.mktemp("generation")
    return {"2d": _prepare(root / "a", "2d_grey_png", 801, "2d"),
            "3d": _prepare(root / "b", "3d_mr", 802, "3d_fullres"),
            "cond": _prepare(root / "c", "conditional_2d", 803, "2d")}


def _preprocessed_dir(paths: Paths) -> Path:
    return next(p for p in paths.preprocessed.iterdir() if p.is_dir())


def _trainer(paths: Paths, out: Path) -> GenerationTrainer:
    pre = _preprocessed_dir(paths)
    return GenerationTrainer(load_plans(pre), TINY, 0, pre, output_dir=out, device="cpu", num_workers=0, seed=3)


class Spy(nn.Module):
    """Records the conditions it is called with and returns zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, x, t, class_labels=None, continuous=None):
        self.calls.append({"t": t, "class_labels": class_labels, "continuous": continuous})
        return torch.zeros_like(x)


@pytest.mark.parametrize("which,dataset_id", [("2d", 801), ("3d", 802)])
def test_train_few_iterations(datasets, which, dataset_id):
    paths = datasets[which]
    trainer = train_fold(dataset_id, TINY, 0, paths, trainer="GenerationTrainer", device="cpu", num_workers=0)
    out = trainer.output_dir
    assert out.parent.name == f"GenerationTrainer__nnDiffPlans__{TINY}" and out.name == "fold_0"
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth", "progress.png"):
        assert (out / name).is_file(), name
    # progress_every_epochs 1: one grid per epoch (2 epochs of 2 iterations)
    assert sorted(p.name for p in out.glob("samples_epoch_*.png")) == ["samples_epoch_0000.png",
                                                                        "samples_epoch_0001.png"]
    state = load_checkpoint(out / "checkpoint_final.pth")
    assert state["trainer_class"] == "GenerationTrainer" and state["iteration"] == 4
    history = state["history"]  # per-epoch columns
    losses = history["train_loss"] + history["val_loss"]
    assert len(history["train_loss"]) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert get_trainer_class("GenerationTrainer") is GenerationTrainer


def test_validation_loss_is_a_function_of_the_weights(datasets, tmp_path):
    """Fixed per-case (t, noise): two validations with the same weights agree exactly; other weights differ."""
    trainer = _trainer(datasets["2d"], tmp_path / "out")
    trainer.initialize()
    first = trainer.validate()["loss"]
    torch.randn(1000)  # disturb the global RNG: validation must not depend on it
    assert trainer.validate()["loss"] == first
    with torch.no_grad():
        for p in trainer.ema_network.parameters():
            p.add_(0.01)
    assert trainer.validate()["loss"] != first


def test_conditions_reach_network_and_dropout_rate(datasets, tmp_path):
    trainer = _trainer(datasets["cond"], tmp_path / "out")
    trainer.initialize()
    assert trainer.diffusion.condition_dropout == pytest.approx(0.1)  # planned for CFG
    metadata = load_json(_preprocessed_dir(datasets["cond"]) / "metadata.json")
    keys = sorted(metadata)
    batch = trainer.make_batch({"keys": keys, "data": np.zeros((len(keys), 1, 32, 32), np.float32)})
    expected_labels = [["disk", "square"].index(metadata[k]["shape"]) for k in keys]
    assert batch["class_labels"].tolist() == expected_labels
    sizes = np.array([metadata[c]["size"] for c in trainer.train_cases])
    expected_size = [(metadata[k]["size"] - sizes.mean()) / sizes.std() for k in keys]
    np.testing.assert_allclose(batch["continuous"][:, 0].numpy(), expected_size, rtol=1e-5)

    # Training: labels reach the network, each sample dropped with p = 0.1, label and metadata together.
    n = 4000
    big = trainer.make_batch({"keys": [keys[i % len(keys)] for i in range(n)],
                              "data": np.zeros((n, 1, 4, 4), np.float32)})
    spy = Spy()
    torch.manual_seed(0)
    loss, _ = trainer.compute_loss(spy, big, train=True)
    assert torch.isfinite(loss)
    seen = spy.calls[-1]
    dropped = seen["class_labels"] == NULL_LABEL
    assert torch.equal(dropped, torch.isnan(seen["continuous"]).any(dim=1))
    assert torch.equal(seen["class_labels"][~dropped], big["class_labels"][~dropped])
    # Binomial(4000, 0.1): sd of the rate 0.0047; 4 sd = 0.019
    assert abs(dropped.float().mean().item() - 0.1) < 0.019
    # Validation: never dropped
    trainer.compute_loss(spy, big, train=False, generators=[torch.Generator().manual_seed(i) for i in range(n)])
    assert torch.equal(spy.calls[-1]["class_labels"], big["class_labels"])

    # The sample grid cycles the classes and runs classifier-free guidance (conditional + null calls).
    trainer.ema_network = spy_grid = Spy()
    trainer.output_dir.mkdir(parents=True)
    trainer.write_sample_grid(0)
    assert (trainer.output_dir / "samples_epoch_0000.png").is_file()
    # classes cycled; planned CFG (scale 2): the null half in the same call
    assert spy_grid.calls and all(c["class_labels"].tolist() == [0, 1] * 4 + [NULL_LABEL] * 8
                                  for c in spy_grid.calls)


def test_condition_encoder_joint_index():
    dataset_json = {"conditions": {"sex": {"type": "categorical", "values": ["F", "M"]},
                                   "site": {"type": "categorical", "values": [1, 2, 3]},
                                   "age": "continuous"}}
    encoder = ConditionEncoder.from_dataset_json(dataset_json, [{"age": 40}, {"age": 60}])
    assert encoder.num_classes == 6 and encoder.num_continuous == 1
    assert encoder.class_label({"sex": "M", "site": 3}) == 1 * 3 + 2
    assert encoder.class_label({"sex": "F", "site": "2"}) == 1  # string fallback
    assert encoder.class_label({"sex": "X", "site": 1}) == NULL_LABEL
    labels, cont = encoder.encode([{"sex": "F", "site": 1, "age": 70}, {"sex": "M", "site": 2}])
    assert labels.tolist() == [0, 4]
    assert cont[0, 0].item() == pytest.approx(2.0) and math.isnan(cont[1, 0].item())
    assert ConditionEncoder.from_dict(encoder.to_dict()) == encoder


@pytest.mark.parametrize("which,parent,shape", [("2d", "2d", (3, 1, 32, 32)), ("3d", "3d_fullres", (2, 1, 16, 16, 16))])
def test_sample_images_shapes(datasets, which, parent, shape):
    from nndiff.training import resolve_configuration

    config = resolve_configuration(load_plans(_preprocessed_dir(datasets[which])), TINY)
    assert list(config["patch_size"]) == list(shape[2:])
    network = build_network(config["network"], seed=0)
    with torch.no_grad():  # non-zero output so samples depend on the network
        for p in network.parameters():
            p.add_(0.01)
    draw = lambda seed: sample_images(network, config, shape[0], generator=torch.Generator().manual_seed(seed),
                                      device="cpu")
    a, b, c = draw(1), draw(1), draw(2)
    assert a.shape == shape and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1  # the plan's clip_x0 range
    assert network.training  # mode restored
    with pytest.raises(ValueError, match="divisible"):
        sample_images(network, config, 1, generator=None, device="cpu", spatial_shape=[s + 1 for s in shape[2:]])


def test_sample_images_conditional_guidance(datasets):
    from nndiff.training import resolve_configuration

    config = resolve_configuration(load_plans(_preprocessed_dir(datasets["cond"])), TINY)
    spy = Spy()
    labels = torch.tensor([0, 1, 1])
    out = sample_images(spy, config, 3, generator=torch.Generator().manual_seed(0), device="cpu",
                        class_labels=labels, continuous=torch.zeros(3, 1), guidance_scale=3.0, num_steps=2)
    assert out.shape == (3, 1, 32, 32)
    # One call per step with the conditional half and the null half (label NULL, metadata NaN).
    assert spy.calls and all(len(c["class_labels"]) == 6 for c in spy.calls)
    for call in spy.calls:
        assert call["class_labels"].tolist() == [0, 1, 1] + [NULL_LABEL] * 3
        assert not torch.isnan(call["continuous"][:3]).any() and torch.isnan(call["continuous"][3:]).all()
    # The guided output is out_null + 3 (out_cond - out_null): a network whose output depends on the
    # condition gives exactly the CFG combination of the two single-condition runs.
    net = build_network({**config["network"]}, seed=0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    x, t = torch.randn(3, 1, 32, 32), torch.full((3,), 500.0)
    from nndiff.tasks.generation import _batched_cfg_model_fn
    cond = {"class_labels": labels, "continuous": torch.zeros(3, 1)}
    with torch.no_grad():
        guided = _batched_cfg_model_fn(net.eval(), 3.0)(x, t, cond)
        out_c = net(x, t, class_labels=labels, continuous=torch.zeros(3, 1))
        out_u = net(x, t)
    torch.testing.assert_close(guided, out_u + 3.0 * (out_c - out_u), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out_c, out_u)
    spy.calls.clear()
    sample_images(spy, config, 3, generator=torch.Generator().manual_seed(0), device="cpu", class_labels=labels,
                  continuous=torch.zeros(3, 1), guidance_scale=1.0, num_steps=2)
    assert all(c["class_labels"] is not None for c in spy.calls)  # scale 1: conditional model only


def test_resume_is_exact_with_dropout_and_importance_sampling(datasets, tmp_path):
    """Stop after 3 of 4 iterations and --continue == uninterrupted (family state included)."""
    paths = datasets["cond"]
    pre = _preprocessed_dir(paths)
    plans = load_plans(pre)
    plans["configurations"][TINY]["diffusion"]["importance_sampling"] = True
    plans["configurations"][TINY]["training"]["progress_every_epochs"] = 100  # plots are not under test here

    def run(out: Path, **kwargs) -> GenerationTrainer:
        trainer = GenerationTrainer(plans, TINY, 0, pre, output_dir=out, device="cpu", num_workers=0, seed=5)
        trainer.run_training(**kwargs)
        return trainer

    run(tmp_path / "a")
    run(tmp_path / "b", stop_after_iterations=3)
    resumed = run(tmp_path / "b", continue_training=True)
    assert resumed.time_sampler is not None and int(resumed.time_sampler._counts.sum()) == 4 * resumed.batch_size
    a = load_checkpoint(tmp_path / "a" / "checkpoint_final.pth")
    b = load_checkpoint(tmp_path / "b" / "checkpoint_final.pth")
    for key in ("network_weights", "ema_weights"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert torch.equal(a["extra"]["time_sampler"]["losses"], b["extra"]["time_sampler"]["losses"])
    assert a["extra"]["conditions"] == b["extra"]["conditions"]
    assert a["extra"]["conditions"]["categorical"] == [["shape", ["disk", "square"]]]
    assert ConditionEncoder.from_checkpoint(a) == resumed.conditions


@pytest.mark.parametrize("diffusion", [{}, {"parameterization": "eps", "loss_weighting": "uniform"},
                                       {"process": "ve_sde", "schedule": "geometric", "parameterization": "score",
                                        "loss_weighting": "sigma_squared", "clip_x0": None}])
def test_loss_is_the_planned_diffusion_loss(datasets, tmp_path, diffusion):
    """Validation loss == diffusion_loss on the plan's process/parameterization/weighting, with t then
    noise drawn from each case's own generator."""
    from nndiff.diffusion import build_noise, build_process, diffusion_loss

    pre = _preprocessed_dir(datasets["2d"])
    plans = load_plans(pre)
    plans["configurations"][TINY]["diffusion"].update(diffusion)
    trainer = GenerationTrainer(plans, TINY, 0, pre, output_dir=tmp_path, device="cpu", num_workers=0)
    trainer.initialize()
    x0 = torch.rand(3, 1, 32, 32) * 2 - 1
    batch = {"data": x0, "keys": ["a", "b", "c"]}
    loss, _ = trainer.compute_loss(Spy(), batch, train=False,
                                   generators=[torch.Generator().manual_seed(s) for s in range(3)])
    block = plans["configurations"]["2d"]["diffusion"] | diffusion
    process, noise_fn = build_process(block), build_noise(block)
    expected = []
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        t = process.sample_t(1, g)
        noise = noise_fn((1, 1, 32, 32), generator=g)
        expected.append(diffusion_loss(torch.zeros(1, 1, 32, 32), x0[s:s + 1], noise, t, process,
                                       block.get("parameterization", "eps"), block.get("loss_weighting", "uniform"),
                                       min_snr_gamma=block.get("min_snr_gamma", 5.0)))
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-6, atol=0)
