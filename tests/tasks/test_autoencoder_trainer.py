"""AutoencoderTrainer on tiny example datasets (CPU, a few iterations): training, exact resume,
adversarial switch, scale factor and autoencoder.json, loading with the weights hash."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nndiff.dataset.examples import make_example_dataset
from nndiff.errors import NnDiffError, PlansError
from nndiff.networks.autoencoder import AutoencoderKL, AutoencoderVQ, weights_sha256
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
# Until nndiff.training.registry lists nndiff.tasks.autoencoder, importing the module registers the trainer.
from nndiff.tasks.autoencoder import (AUTOENCODER_JSON, AutoencoderTrainer, PatchDiscriminator,
                                      load_trained_autoencoder, psnr_per_sample, ssim_torch)
from nndiff.training import get_trainer_class, load_checkpoint
from nndiff.training.api import load_plans
from nndiff.utils.files import load_json, save_json

LATENT = "tiny_latent"
TINY_TRAINING = {"num_iterations_per_epoch": 2, "num_epochs": 2, "num_val_cases": 2, "warmup_iterations": 1,
                 "augmentation": "none", "progress_every_epochs": 100}
AE_2D = {"downsampling_factors": [4, 4], "latent_channels": 4, "base_channels": 8, "norm_groups": 4,
         "patch_size": [16, 16], "batch_size": 2}
AE_3D = {"downsampling_factors": [2, 4, 4], "latent_channels": 4, "base_channels": 8, "norm_groups": 4,
         "channel_multipliers": [1, 1, 2], "patch_size": [8, 16, 16], "batch_size": 1}


def _prepare(root: Path, kind: str, dataset_id: int, parent: str, ae_block: dict) -> Path:
    """Example dataset -> plan (+ a hand-made latent configuration on the parent's data) -> preprocess."""
    paths = Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")
    make_example_dataset(kind, paths.raw, dataset_id)
    location = locate_dataset(dataset_id, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    plans["configurations"][LATENT] = {"inherits_from": parent, "autoencoder": dict(ae_block),
                                       "training": dict(TINY_TRAINING), "trainable": False}
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=[parent])
    return next(p for p in paths.preprocessed.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("autoencoder")
    return {"2d": _prepare(root / "a", "2d_grey_png", 811, "2d", AE_2D),
            "3d": _prepare(root / "b", "3d_mr", 812, "3d_fullres", AE_3D)}


def _trainer(pre: Path, out: Path, plans: dict | None = None, **kwargs) -> AutoencoderTrainer:
    return AutoencoderTrainer(plans or load_plans(pre), LATENT, 0, pre, output_dir=out, device="cpu",
                              num_workers=0, seed=7, **kwargs)


@pytest.mark.parametrize("which", ["2d", "3d"])
def test_trains_and_measures_the_scale_factor(datasets, tmp_path, which):
    trainer = _trainer(datasets[which], tmp_path / "out")
    trainer.run_training()
    out = trainer.output_dir
    assert isinstance(trainer.network, AutoencoderKL)
    assert trainer.spec.patch_size == tuple((AE_2D if which == "2d" else AE_3D)["patch_size"])
    state = load_checkpoint(out / "checkpoint_final.pth")
    assert state["trainer_class"] == "AutoencoderTrainer" and state["iteration"] == 4
    history = state["history"]
    assert all(math.isfinite(v) and v > 0 for v in history["train_loss"] + history["val_loss"])
    assert all(math.isfinite(v) for v in history["val_psnr"])
    # Scale factor: 1/std of the EMA model's latents of the training images, stored in the weights.
    info = load_json(out / AUTOENCODER_JSON)
    factor = info["latent_scale_factor"]
    assert state["latent_scale_factor"] == factor
    assert float(state["ema_weights"]["latent_scale_factor"]) == pytest.approx(factor, rel=1e-6)
    assert info["weights_sha256"] == weights_sha256(state["ema_weights"]) == state["weights_sha256"]
    assert set(info["checkpoints"]) == {"checkpoint_final.pth", "checkpoint_best.pth"}
    model, _ = load_trained_autoencoder(out)
    images = [torch.from_numpy(np.ascontiguousarray(img))[None] for img in trainer.scale_factor_images()]
    assert len(images) == len(info["scale_factor_images"]) == (
        len(trainer.train_cases) if which == "3d" else min(64, sum(trainer.store[c].data.shape[1]
                                                                   for c in trainer.train_cases)))
    with torch.no_grad():
        latents = torch.cat([model.encode(img)[0].flatten() for img in images]).double()
    assert factor == pytest.approx(1.0 / float(latents.std(unbiased=False)), rel=1e-4)
    assert model.scale_factor() == pytest.approx(factor, rel=1e-6)
    assert get_trainer_class("AutoencoderTrainer") is AutoencoderTrainer


def test_resume_is_exact(datasets, tmp_path):
    """Stop after 3 of 4 iterations and --continue == uninterrupted (weights, history, scale factor)."""
    pre = datasets["2d"]

    def run(out: Path, **kwargs) -> AutoencoderTrainer:
        trainer = _trainer(pre, out)
        trainer.run_training(**kwargs)
        return trainer

    run(tmp_path / "a")
    stopped = run(tmp_path / "b", stop_after_iterations=3)
    assert stopped.iteration == 3 and not (tmp_path / "b" / AUTOENCODER_JSON).exists()
    run(tmp_path / "b", continue_training=True)
    a = load_checkpoint(tmp_path / "a" / "checkpoint_final.pth")
    b = load_checkpoint(tmp_path / "b" / "checkpoint_final.pth")
    for key in ("network_weights", "ema_weights"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["history"]["train_loss"] == b["history"]["train_loss"]
    assert a["history"]["val_loss"] == b["history"]["val_loss"]
    assert load_json(tmp_path / "a" / AUTOENCODER_JSON)["weights_sha256"] == \
        load_json(tmp_path / "b" / AUTOENCODER_JSON)["weights_sha256"]


def test_adversarial_switch_trains_and_resumes(datasets, tmp_path):
    pre = datasets["2d"]
    plans = load_plans(pre)
    plans["configurations"][LATENT]["autoencoder"].update(adversarial=True, adversarial_start_fraction=0.5)

    def run(out: Path, **kwargs) -> AutoencoderTrainer:
        trainer = _trainer(pre, out, plans)
        trainer.run_training(**kwargs)
        return trainer

    full = run(tmp_path / "a")
    assert isinstance(full.discriminator, PatchDiscriminator) and full.adversarial_start == 2
    state = load_checkpoint(tmp_path / "a" / "checkpoint_final.pth")
    history = state["history"]
    # Epoch 0 (iterations 0, 1) is the warm-up; epoch 1 trains with the adversarial terms.
    assert math.isfinite(history["train_adv_g"][1]) and math.isfinite(history["train_adv_d"][1])
    # The discriminator was trained only after the warm-up: its optimizer took 2 steps.
    steps = [s["step"] for s in state["extra"]["discriminator_optimizer"]["state"].values()]
    assert steps and all(int(s) == 2 for s in steps)
    # Resume restores the discriminator and its optimizer exactly.
    run(tmp_path / "b", stop_after_iterations=3)
    run(tmp_path / "b", continue_training=True)
    resumed = load_checkpoint(tmp_path / "b" / "checkpoint_final.pth")
    for k, v in state["extra"]["discriminator_weights"].items():
        assert torch.equal(v, resumed["extra"]["discriminator_weights"][k]), k
    assert all(torch.equal(v, resumed["ema_weights"][k]) for k, v in state["ema_weights"].items())


def test_vq_variant_trains(datasets, tmp_path):
    pre = datasets["2d"]
    plans = load_plans(pre)
    plans["configurations"][LATENT]["autoencoder"].update(vq=True, codebook_size=16)
    trainer = _trainer(pre, tmp_path / "out", plans, iterations=2)
    trainer.run_training()
    assert isinstance(trainer.network, AutoencoderVQ)
    state = load_checkpoint(tmp_path / "out" / "checkpoint_final.pth")
    assert "train_vq" in state["history"] and math.isfinite(state["latent_scale_factor"])


def test_load_refuses_a_changed_or_unexpected_hash(datasets, tmp_path):
    trainer = _trainer(datasets["2d"], tmp_path / "out", iterations=2)
    trainer.run_training()
    out = trainer.output_dir
    info = load_json(out / AUTOENCODER_JSON)
    model, _ = load_trained_autoencoder(out, expected_sha256=info["weights_sha256"])
    assert not model.training
    with pytest.raises(NnDiffError, match="not the .* the latent model was trained with"):
        load_trained_autoencoder(out, expected_sha256="0" * 64)
    state = load_checkpoint(out / "checkpoint_final.pth")
    state["ema_weights"]["decoder.conv_in.bias"] += 1.0
    torch.save(state, out / "checkpoint_final.pth")
    with pytest.raises(NnDiffError, match="differs from"):
        load_trained_autoencoder(out)


def test_plan_errors_name_the_configuration(datasets, tmp_path):
    pre = datasets["2d"]
    plans = load_plans(pre)
    with pytest.raises(PlansError, match="has no 'autoencoder' block"):
        AutoencoderTrainer(plans, "2d", 0, pre, output_dir=tmp_path, device="cpu")
    plans["configurations"][LATENT]["autoencoder"]["patch_size"] = [16, 10]
    with pytest.raises(PlansError, match="multiple of downsampling_factors"):
        _trainer(pre, tmp_path, plans)


def test_loss_helpers():
    x = torch.rand(2, 1, 16, 16)
    assert torch.allclose(ssim_torch(x, x, torch.ones(2)), torch.ones(2))
    assert float(ssim_torch(x, torch.rand(2, 1, 16, 16), torch.ones(2)).mean()) < 0.5
    noisy = x + 0.01 * torch.randn_like(x)
    expected = 10 * torch.log10((x.flatten(1).amax(1) - x.flatten(1).amin(1)) ** 2 /
                                ((noisy - x) ** 2).flatten(1).mean(1))
    assert torch.allclose(psnr_per_sample(noisy, x), expected, rtol=1e-4)
    y = torch.rand(1, 1, 8, 16, 16, requires_grad=True)
    ssim_torch(y, torch.rand(1, 1, 8, 16, 16), torch.ones(1)).sum().backward()
    assert y.grad is not None and float(y.grad.abs().sum()) > 0


def test_autoencoder_training_block_sets_the_run_length(datasets, tmp_path):
    pre = datasets["2d"]
    plans = load_plans(pre)
    block = plans["configurations"][LATENT]["autoencoder"]
    block["training"] = {"num_epochs": 3}
    assert _trainer(pre, tmp_path, plans).total_iterations == 6       # 3 epochs x 2 iterations
    assert _trainer(pre, tmp_path, plans, iterations=5).total_iterations == 5   # --iterations still caps
    del block["patch_size"], block["batch_size"]                      # default: the source's (2d) patch/batch
    source = plans["configurations"]["2d"]
    trainer = _trainer(pre, tmp_path, plans)
    assert list(trainer.spec.patch_size) == source["patch_size"] and trainer.batch_size == source["batch_size"]


@pytest.mark.parametrize("max_decode_voxels", [None, 10**9])
def test_scale_factor_follows_the_plans_one_pass_limit(datasets, tmp_path, monkeypatch, max_decode_voxels):
    """3D training volumes above the one-pass limit (default: AE patch × batch) are encoded for the
    scale factor in sliding windows; a plan whose ``max_decode_voxels`` holds them encodes them whole."""
    import nndiff.networks.autoencoder as module

    pre = datasets["3d"]
    plans = load_plans(pre)
    if max_decode_voxels is not None:
        plans["configurations"][LATENT]["max_decode_voxels"] = max_decode_voxels
    calls = []
    real = module.sliding_window_encode
    monkeypatch.setattr(module, "sliding_window_encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = _trainer(pre, tmp_path / "out", plans)
    trainer.run_training()
    images = len(trainer.scale_factor_picks())
    # Two checkpoints (final, best) get their factor measured, each over the picked volumes.
    assert len(calls) == (0 if max_decode_voxels else 2 * images)


def test_scale_factor_images_are_padded_with_the_channel_minimum(datasets, tmp_path):
    """Padding to multiples of the factors uses each channel's minimum, as the latent cache does."""
    trainer = _trainer(datasets["2d"], tmp_path / "out")
    trainer.ae_config = type(trainer.ae_config)(**{**trainer.ae_config.__dict__, "downsampling_factors": (5, 5)})
    for (case, z), image in zip(trainer.scale_factor_picks(), trainer.scale_factor_images()):
        source = trainer.store[case].data[:, z]
        assert all(n % 5 == 0 for n in image.shape[1:])
        ys, xs = source.shape[1:]
        np.testing.assert_array_equal(image[:, :ys, :xs], source)
        for channel, low in zip(image, source.reshape(source.shape[0], -1).min(axis=1)):
            assert (channel[ys:] == low).all() and (channel[:, xs:] == low).all()
