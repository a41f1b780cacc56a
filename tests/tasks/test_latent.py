"""Latent diffusion (LatentDiffusionTrainer, LatentGenerationPredictor) on a tiny 2D dataset whose plan
is forced to contain a latent configuration (CPU, a few iterations, 32² images)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nndiff.dataset.examples import make_example_dataset
from nndiff.dataset.io import read_images
from nndiff.errors import NnDiffError
from nndiff.networks.autoencoder import build_autoencoder, measure_scale_factor, weights_sha256
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
from nndiff.planning import configurations, resolve_configuration
from nndiff.tasks import latent
from nndiff.tasks.latent import (
    AUTOENCODER_INFO,
    LatentDiffusionTrainer,
    autoencoder_fold_dir,
    encode_case,
    network_block,
    read_autoencoder_record,
)
from nndiff.tasks.latent_predictor import LatentGenerationPredictor
from nndiff.training import load_checkpoint
from nndiff.training.checkpoint import CHECKPOINT_FORMAT, FINAL, save_checkpoint
from nndiff.training.data import list_cases, load_case
from nndiff.training.api import load_plans
from nndiff.utils.files import load_json, save_json

DATASET_ID = 851
TINY = "tiny_latent"
#: Small diffusion UNet and autoencoder; factors 4 so 32² images give 8² latents.
TINY_OVERRIDES = {
    "network": {"model_channels": 8, "channel_mult": [1, 2], "strides": [[2, 2]], "num_res_blocks": 1,
                "attention_levels": [1], "num_head_channels": 8, "norm_groups": 4},
    "patch_size": [8, 8],
    "batch_size": 2,
    "training": {"num_iterations_per_epoch": 2, "num_epochs": 2, "num_val_cases": 2, "warmup_iterations": 1,
                 "augmentation": "none", "progress_every_epochs": 100},
    "diffusion": {"num_sampling_steps": 3},
    "autoencoder": {"downsampling_factors": [4, 4], "channel_multipliers": [1, 2, 2], "base_channels": 8,
                    "num_res_blocks": 1, "norm_groups": 4, "patch_size": [32, 32], "batch_size": 2,
                    "training": {"num_iterations_per_epoch": 2, "num_epochs": 1, "num_val_cases": 2,
                                 "warmup_iterations": 1, "augmentation": "none"}},
}


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[Paths, dict]:
    """2D example → plan with the latent rule forced (any image is 'large') → tiny latent configuration."""
    root = tmp_path_factory.mktemp("latent")
    paths = Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")
    make_example_dataset("2d_grey_png", paths.raw, DATASET_ID)
    location = locate_dataset(DATASET_ID, paths)
    extract_fingerprint_step(location)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configurations, "LATENT_LARGE_IMAGE_VOXELS", {2: 1, 3: 1})
        plans = plan_step(location)
    assert plans["configurations"]["2d_latent"]["trainable"] is True
    plans["configurations"][TINY] = {"inherits_from": "2d_latent", **TINY_OVERRIDES}
    save_json(plans, location.plans_file())
    preprocess_step(location, configurations=["2d"])
    return paths, plans


def _pre(paths: Paths) -> Path:
    return next(p for p in paths.preprocessed.iterdir() if p.is_dir())


def _configuration(plans: dict) -> dict:
    return resolve_configuration(plans, TINY)


def _fake_autoencoder_stage(paths: Paths, plans: dict, fold: int, seed: int) -> Path:
    """A finished autoencoder stage written by hand (randomly initialised weights, measured scale
    factor), as 'pointing to an autoencoder' would provide one; returns its fold folder."""
    config = _configuration(plans)
    block = config["autoencoder"]
    torch.manual_seed(seed)
    ae = build_autoencoder(network_block(block), 1, 2)
    pre = _pre(paths)
    folder = pre / config["data_identifier"]
    images = [load_case(folder / f"{c}.npz").data[:, 0] for c in list_cases(folder)[:4]]
    scale = measure_scale_factor(ae, images)
    fold_dir = autoencoder_fold_dir(paths.results / pre.name, "nnDiffPlans", TINY, fold)
    fold_dir.mkdir(parents=True, exist_ok=True)
    weights = ae.state_dict()
    save_checkpoint({"format": CHECKPOINT_FORMAT, "ema_weights": weights, "network_weights": weights,
                     "latent_scale_factor": scale},
                    fold_dir / FINAL)
    save_json({"latent_scale_factor": scale, "weights_sha256": weights_sha256(weights)}, fold_dir / AUTOENCODER_INFO)
    return fold_dir


def _trainer(paths: Paths, plans: dict, out: Path, **kwargs) -> LatentDiffusionTrainer:
    pre = _pre(paths)
    return LatentDiffusionTrainer(load_plans(pre), TINY, 0, pre, output_dir=out, device="cpu", num_workers=0,
                                  seed=5, **kwargs)


def test_plan_forced_latent_configuration_is_trainable(planned):
    _, plans = planned
    config = plans["configurations"]["2d_latent"]
    assert config["status"].startswith("trainable (two stages")
    assert config["data_identifier"] == plans["configurations"]["2d"]["data_identifier"]
    assert config["autoencoder"]["in_channels"] == 1 and config["diffusion"]["clip_x0"] is None
    assert config["training"]["augmentation"] == "none"
    # the planner's block builds (stage-only keys filtered) and our tiny override too
    build_autoencoder(network_block(config["autoencoder"]), 1, 2)


def test_encode_case_shapes_2d_slices_and_3d_padding():
    block = {"downsampling_factors": [2, 4, 4], "latent_channels": 4, "base_channels": 8,
             "channel_multipliers": [1, 2, 2], "norm_groups": 4, "patch_size": [8, 16, 16], "in_channels": 1}
    ae = build_autoencoder(network_block(block), 1, 3).eval()
    data = np.random.default_rng(0).normal(size=(1, 7, 15, 16)).astype(np.float32)
    z = encode_case(ae, data, block, 3, 2.0, torch.device("cpu"), 10**6)
    assert z.shape == (4, 4, 4, 4)  # ceil(7/2), ceil(15/4), 16/4
    padded = np.full((1, 8, 16, 16), data.min(), np.float32)
    padded[:, :7, :15] = data
    with torch.no_grad():
        expected = ae.encode(torch.from_numpy(padded)[None])[0][0].numpy() * 2.0
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-5)
    block2d = {**block, "downsampling_factors": [4, 4], "patch_size": [16, 16]}
    ae2 = build_autoencoder(network_block(block2d), 1, 2).eval()
    z2 = encode_case(ae2, np.zeros((1, 3, 16, 16), np.float32) + 0.5, block2d, 2, 1.0, torch.device("cpu"),
                     10**6, slice_batch=2)
    assert z2.shape == (4, 3, 4, 4)


def test_sliding_window_encode_used_above_max_decode_voxels(monkeypatch):
    block = {"downsampling_factors": [4, 4], "latent_channels": 4, "base_channels": 8, "channel_multipliers": [1, 2, 2],
             "norm_groups": 4, "patch_size": [16, 16], "in_channels": 1}
    ae = build_autoencoder(network_block(block), 1, 2).eval()
    calls = []
    import nndiff.networks.autoencoder_windows as ae_module
    original = ae_module.sliding_window_encode
    monkeypatch.setattr(ae_module, "sliding_window_encode",
                        lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    z = encode_case(ae, np.zeros((1, 1, 32, 32), np.float32), block, 2, 1.0, torch.device("cpu"), 256)
    assert z.shape == (4, 1, 8, 8) and calls == [[16, 16]]  # 32² > 256 voxels → windows of the AE patch


def test_train_on_existing_autoencoder_records_hash_and_scale(planned, tmp_path):
    paths, plans = planned
    fold_dir = _fake_autoencoder_stage(paths, plans, 0, seed=1)
    record = read_autoencoder_record(fold_dir)
    out = paths.results / _pre(paths).name / f"LatentDiffusionTrainer__nnDiffPlans__{TINY}" / "fold_0"
    trainer = _trainer(paths, plans, out)
    trainer.run_training()
    state = load_checkpoint(out / FINAL)
    assert state["extra"]["autoencoder"]["weights_hash"] == record.weights_hash
    assert state["extra"]["autoencoder"]["latent_scale_factor"] == pytest.approx(record.scale_factor)
    assert state["iteration"] == 4 and all(math.isfinite(v) for v in state["history"]["train_loss"])
    # latents cached under the model folder, keyed by the autoencoder hash, scaled by the factor
    cache = out.parent / "latents_cache" / record.weights_hash[:16]
    assert trainer.data_folder == cache and load_json(cache / "cache.json")["weights_hash"] == record.weights_hash
    case = list_cases(cache)[0]
    latent_data = load_case(cache / f"{case}.npz").data
    pixel = load_case(trainer.pixel_folder / f"{case}.npz").data
    ae = latent.load_autoencoder(record, trainer.configuration, torch.device("cpu"))
    with torch.no_grad():
        mean = ae.encode(torch.from_numpy(pixel[:, 0])[None])[0][0].numpy()
    np.testing.assert_allclose(latent_data[:, 0], mean * record.scale_factor, rtol=1e-4, atol=1e-5)
    assert latent_data.shape == (4, 1, 8, 8)


def test_resume_matches_uninterrupted_and_refuses_other_autoencoder(planned, tmp_path):
    paths, plans = planned
    _fake_autoencoder_stage(paths, plans, 0, seed=1)

    def run(out: Path, **kwargs) -> dict:
        _trainer(paths, plans, out).run_training(**kwargs)
        return load_checkpoint(out / "checkpoint_latest.pth")

    # model folders beside the autoencoder stage (results/DatasetXXX/<name>/fold_0) share its fold folder
    dataset_results = paths.results / _pre(paths).name
    full = run(dataset_results / "Full" / "fold_0")
    _trainer(paths, plans, dataset_results / "Split" / "fold_0").run_training(stop_after_iterations=3)
    resumed = run(dataset_results / "Split" / "fold_0", continue_training=True)
    assert resumed["iteration"] == full["iteration"] == 4
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]
    for key, value in full["network_weights"].items():
        assert torch.equal(value, resumed["network_weights"][key]), key

    # another autoencoder in the fold folder: --continue is refused, naming both hashes and the fix
    old = resumed["extra"]["autoencoder"]["weights_hash"]
    new = read_autoencoder_record(_fake_autoencoder_stage(paths, plans, 0, seed=2)).weights_hash
    assert new != old
    with pytest.raises(NnDiffError) as err:
        _trainer(paths, plans, dataset_results / "Split" / "fold_0").run_training(continue_training=True)
    message = str(err.value)
    assert old in message and new in message and "Fix: retrain" in message and "point to the right" in message


def test_latent_generation_round_trip_and_hash_check_at_prediction(planned, tmp_path):
    paths, plans = planned
    fold_dir = _fake_autoencoder_stage(paths, plans, 0, seed=3)
    pre = _pre(paths)
    model_dir = paths.results / pre.name / f"LatentDiffusionTrainer__nnDiffPlans__{TINY}"
    _trainer(paths, plans, model_dir / "fold_0").run_training()

    predictor = LatentGenerationPredictor.from_model_folder(model_dir, folds=(0,), device="cpu",
                                                            preprocessed_dir=pre)
    assert predictor.generation_shape("patch") == [32, 32]
    written = predictor.generate_to_folder(tmp_path / "samples", 2, seed=0)
    assert [p.name for p in written] == ["sample_0000.png", "sample_0001.png"]
    image, props = read_images([written[0]])
    assert image.shape == (1, 1, 32, 32) and props.spatial_dims == 2
    assert np.isfinite(image).all() and 0 <= image.min() and image.max() <= 255  # original PNG units
    again = predictor.generate_to_folder(tmp_path / "again", 2, seed=0)
    assert np.array_equal(read_images([again[0]])[0], image)

    # sliding-window decoding when the output exceeds max_decode_voxels: same images within 40 dB
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = predictor.decode(latents, 0)
    predictor.configuration["max_decode_voxels"] = 16 * 16
    windowed = predictor.decode(latents, 0)
    mse = float(((whole - windowed) ** 2).mean())
    peak = float(whole.max() - whole.min())
    assert 10 * math.log10(peak**2 / max(mse, 1e-20)) >= 40

    # a different autoencoder in the fold folder is refused at prediction
    recorded = load_checkpoint(model_dir / "fold_0" / FINAL)["extra"]["autoencoder"]["weights_hash"]
    other = read_autoencoder_record(_fake_autoencoder_stage(paths, plans, 0, seed=4)).weights_hash
    with pytest.raises(NnDiffError, match=f"{recorded}.*{other}"):
        LatentGenerationPredictor.from_model_folder(model_dir, folds=(0,), device="cpu", preprocessed_dir=pre)
    assert fold_dir.is_dir()


def test_latent_refused_for_other_families(planned):
    _, plans = planned
    other = {**plans, "task": "translation"}
    with pytest.raises(NnDiffError, match="latent not supported for translation"):
        LatentDiffusionTrainer(other, TINY, 0, _pre(planned[0]), output_dir=Path("unused"), device="cpu")
    assert latent.latent_trainer_for(plans, _configuration(plans), TINY) == "LatentDiffusionTrainer"
    assert latent.latent_trainer_for(plans, resolve_configuration(plans, "2d"), "2d") is None
    from nndiff.run.train import default_trainer  # what nndiff_train / nndiff_plan_and_train use without -tr

    assert default_trainer(plans, TINY) == "LatentDiffusionTrainer" and default_trainer(plans, "2d") == "GenerationTrainer"
    with pytest.raises(NnDiffError, match="latent not supported for translation"):
        default_trainer(other, TINY)


def test_pixel_trainers_refuse_latent_configurations(planned):
    """A pixel-space trainer picked with -tr on a latent configuration stops with the fix."""
    from nndiff.errors import PlansError
    from nndiff.tasks.generation import GenerationTrainer

    paths, plans = planned
    with pytest.raises(PlansError, match="latent configuration.*GenerationTrainer does not train.*LatentDiffusionTrainer"):
        GenerationTrainer(plans, TINY, 0, _pre(paths), output_dir=Path("unused"), device="cpu")
    GenerationTrainer(plans, "2d", 0, _pre(paths), output_dir=Path("unused"), device="cpu")  # pixel: accepted


def test_latent_cache_reuses_unchanged_cases_and_drops_removed_ones(planned, tmp_path):
    import shutil

    paths, plans = planned
    record = read_autoencoder_record(_fake_autoencoder_stage(paths, plans, 0, seed=6))
    config = _configuration(plans)
    pixel = tmp_path / "pixel"
    shutil.copytree(_pre(paths) / config["data_identifier"], pixel)
    ae = latent.load_autoencoder(record, config, torch.device("cpu"))

    def build() -> Path:
        return latent.build_latent_cache(ae, record, pixel, tmp_path / "cache", config["autoencoder"], 2,
                                         torch.device("cpu"), latent.decode_limit(config))

    folder = build()
    cases = list_cases(folder)
    stamps = {c: (folder / f"{c}.npz").stat().st_mtime_ns for c in cases}
    assert cases == list_cases(pixel) and build() == folder
    assert {c: (folder / f"{c}.npz").stat().st_mtime_ns for c in cases} == stamps  # nothing re-encoded
    # a re-preprocessed case is re-encoded, a removed one leaves the cache
    data = np.load(pixel / f"{cases[0]}.npz")
    np.savez(pixel / f"{cases[0]}.npz", **{k: data[k] for k in data.files})
    (pixel / f"{cases[1]}.npz").unlink()
    build()
    assert (folder / f"{cases[0]}.npz").stat().st_mtime_ns != stamps[cases[0]]
    assert (folder / f"{cases[2]}.npz").stat().st_mtime_ns == stamps[cases[2]]
    assert list_cases(folder) == [c for c in cases if c != cases[1]]


def test_3d_latent_train_and_generate_anisotropic_factors(tmp_path, monkeypatch):
    """3D: volumes padded and encoded with factors 2×4×4, latent patches, samples decoded to full size."""
    paths = Paths(raw=tmp_path / "raw", preprocessed=tmp_path / "pre", results=tmp_path / "res")
    make_example_dataset("3d_mr", paths.raw, DATASET_ID + 1)
    location = locate_dataset(DATASET_ID + 1, paths)
    extract_fingerprint_step(location)
    monkeypatch.setattr(configurations, "LATENT_LARGE_IMAGE_VOXELS", {2: 1, 3: 1})
    plans = plan_step(location)
    plans["configurations"][TINY] = {
        "inherits_from": "3d_latent", **TINY_OVERRIDES, "patch_size": [4, 4, 4],
        "network": {**TINY_OVERRIDES["network"], "strides": [[2, 2, 2]]},
        "autoencoder": {**TINY_OVERRIDES["autoencoder"], "downsampling_factors": [2, 4, 4],
                        "patch_size": [16, 16, 16]}}
    save_json(plans, location.plans_file())
    preprocess_step(location, configurations=[TINY])
    plans = load_json(location.plans_file())  # preprocessing recorded the clip fractions
    config = resolve_configuration(plans, TINY)
    torch.manual_seed(0)
    ae = build_autoencoder(network_block(config["autoencoder"]), 1, 3)
    pixel = location.preprocessed_dir / config["data_identifier"]
    scale = measure_scale_factor(ae, [load_case(pixel / f"{c}.npz").data for c in list_cases(pixel)[:2]])
    dataset_results = paths.results / location.name
    fold_dir = autoencoder_fold_dir(dataset_results, "nnDiffPlans", TINY, 0)
    fold_dir.mkdir(parents=True)
    save_checkpoint({"format": CHECKPOINT_FORMAT, "ema_weights": ae.state_dict()}, fold_dir / FINAL)
    save_json({"latent_scale_factor": scale, "weights_hash": weights_sha256(ae.state_dict())},
              fold_dir / AUTOENCODER_INFO)
    model_dir = dataset_results / f"LatentDiffusionTrainer__nnDiffPlans__{TINY}"
    trainer = LatentDiffusionTrainer(plans, TINY, 0, location.preprocessed_dir, output_dir=model_dir / "fold_0",
                                     device="cpu", num_workers=0)
    trainer.run_training()
    shape = load_case(pixel / f"{list_cases(pixel)[0]}.npz").data.shape[1:]
    latent_shape = load_case(trainer.data_folder / f"{list_cases(pixel)[0]}.npz").data.shape
    assert latent_shape == (4, *[math.ceil(s / f) for s, f in zip(shape, (2, 4, 4))])
    predictor = LatentGenerationPredictor.from_model_folder(model_dir, folds=(0,), device="cpu",
                                                            preprocessed_dir=location.preprocessed_dir)
    assert predictor.generation_shape("patch") == [8, 16, 16]
    written = predictor.generate_to_folder(tmp_path / "samples", 1, seed=0, shape="median")
    image, props = read_images(written)
    assert image.shape[1:] == tuple(config["median_image_size_in_voxels"]) and np.isfinite(image).all()
    assert props.spatial_dims == 3


def test_plan_train_both_stages_predict(planned, tmp_path):
    """Round trip through the public API: no autoencoder yet → the latent trainer trains the fold's
    autoencoder stage (few iterations), then the diffusion model; the predictor writes samples."""
    from nndiff.training.api import train_fold

    paths, plans = planned
    results = Paths(raw=paths.raw, preprocessed=paths.preprocessed, results=tmp_path / "results")
    ae_dir = autoencoder_fold_dir(results.results / _pre(paths).name, "nnDiffPlans", TINY, 0)
    # a time limit stops the autoencoder stage after one iteration: no diffusion training yet
    first = train_fold(DATASET_ID, TINY, 0, results, trainer=LatentDiffusionTrainer, device="cpu", num_workers=0,
                       time_limit_s=0.0)
    assert (ae_dir / "checkpoint_latest.pth").is_file() and not (ae_dir / AUTOENCODER_INFO).exists()
    assert first.iteration == 0 and not (first.output_dir / "checkpoint_latest.pth").exists()
    # the next call finishes the autoencoder stage, then trains the diffusion model
    trainer = train_fold(DATASET_ID, TINY, 0, results, trainer=LatentDiffusionTrainer, device="cpu", num_workers=0,
                         continue_training=True)
    assert trainer.iteration == trainer.total_iterations == 4
    info = load_json(ae_dir / AUTOENCODER_INFO)
    ae_state = load_checkpoint(ae_dir / FINAL)
    assert ae_state["trainer_class"] == "AutoencoderTrainer" and ae_state["iteration"] == 2  # planned tiny length
    assert math.isfinite(info["latent_scale_factor"]) and info["latent_scale_factor"] > 0
    extra = load_checkpoint(trainer.output_dir / FINAL)["extra"]["autoencoder"]
    assert extra["weights_hash"] == info["weights_sha256"]
    assert extra["latent_scale_factor"] == pytest.approx(info["latent_scale_factor"])
    predictor = LatentGenerationPredictor.from_trained(DATASET_ID, TINY, results, trainer="LatentDiffusionTrainer",
                                                       folds=(0,), device="cpu")
    written = predictor.generate_to_folder(tmp_path / "out", 1, seed=1, shape="median")
    image, _ = read_images(written)
    assert image.shape == (1, 1, 32, 32) and np.isfinite(image).all()
    # export the latent model alone (-tr): its autoencoder stage travels with it, and the installed
    # copy predicts the same sample
    from nndiff.run.model_sharing import export_model_to_zip, install_model_from_zip

    manifest = export_model_to_zip(results.results, DATASET_ID, tmp_path / "latent.zip",
                                   trainers=["LatentDiffusionTrainer"], preprocessed_root=paths.preprocessed)
    assert sorted(m["trainer"] for m in manifest["models"]) == ["AutoencoderTrainer", "LatentDiffusionTrainer"]
    installed = Paths(raw=paths.raw, preprocessed=paths.preprocessed, results=tmp_path / "installed")
    install_model_from_zip(tmp_path / "latent.zip", installed.results)
    assert (autoencoder_fold_dir(installed.results / _pre(paths).name, "nnDiffPlans", TINY, 0) / AUTOENCODER_INFO).is_file()
    again = LatentGenerationPredictor.from_trained(DATASET_ID, TINY, installed, trainer="LatentDiffusionTrainer",
                                                   folds=(0,), device="cpu")
    copy, _ = read_images(again.generate_to_folder(tmp_path / "out2", 1, seed=1, shape="median"))
    np.testing.assert_array_equal(copy, image)
