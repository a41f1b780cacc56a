"""Reconstruction family: plan -> train (prior) -> predict (simulate / .npz + sidecar, data consistency)
-> evaluate on a tiny complex MR dataset; random phase; hard DC exactness; bad inputs; CT smoke."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nndiff.dataset.examples import make_example_dataset
from nndiff.errors import NnDiffError, PlansError
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
from nndiff.tasks.reconstruction import ReconstructionTrainer, apply_phase, random_phase_enabled, smooth_random_phase
from nndiff.training.api import train_fold
from nndiff.utils.files import save_json

TINY = {"inherits_from": "2d",
        "network": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [],
                    "num_head_channels": 8, "norm_groups": 4, "dropout": 0.0, "strides": [[2, 2]]},
        "training": {"num_iterations_per_epoch": 2, "num_epochs": 2, "num_val_cases": 2, "warmup_iterations": 1,
                     "augmentation": "none", "progress_every_epochs": 1},
        "diffusion": {"num_sampling_steps": 4}}
DATASET_ID = 81


def _paths(root: Path) -> Paths:
    return Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")


@pytest.fixture(scope="module")
def mri_model(tmp_path_factory) -> dict:
    """complex_npy example (32x32 complex MR slices), planned with a tiny configuration, trained briefly."""
    root = tmp_path_factory.mktemp("recon")
    paths = _paths(root)
    raw = make_example_dataset("complex_npy", paths.raw, DATASET_ID)
    location = locate_dataset(DATASET_ID, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    plans["configurations"]["tiny"] = TINY
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=["2d"])
    torch.manual_seed(0)
    trainer = train_fold(DATASET_ID, "tiny", 0, paths, trainer="ReconstructionTrainer", device="cpu", num_workers=0)
    pre = next(p for p in paths.preprocessed.iterdir() if p.is_dir())
    return {"paths": paths, "raw": raw, "trainer": trainer, "pre": pre, "plans": plans,
            "model_dir": trainer.output_dir.parent}


# ----------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------
def test_trainer_learns_complex_prior(mri_model):
    trainer = mri_model["trainer"]
    assert isinstance(trainer, ReconstructionTrainer)
    assert trainer.stored_channels == 2 and not trainer.random_phase  # complex data: real/imag stored
    assert (trainer.output_dir / "checkpoint_final.pth").is_file()
    assert list(trainer.output_dir.glob("samples_epoch_*.png"))


def test_smooth_random_phase_is_seeded_smooth_and_keeps_magnitude():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    phase = smooth_random_phase((2, 1, 16, 16), g1)
    assert torch.equal(phase, smooth_random_phase((2, 1, 16, 16), g2))
    assert not torch.allclose(phase[0], phase[1])
    # smooth: neighbouring pixels differ by far less than the range
    assert float(phase.diff(dim=-1).abs().max()) < 0.5
    magnitude = torch.rand(2, 1, 16, 16)
    phased = apply_phase(magnitude, phase)
    assert phased.shape == (2, 2, 16, 16)
    torch.testing.assert_close(torch.sqrt(phased[:, 0] ** 2 + phased[:, 1] ** 2), magnitude[:, 0])
    # not Hermitian-symmetric any more: the imaginary part is not zero
    assert float(phased[:, 1].abs().max()) > 0.01


def test_random_phase_setting():
    config = {"network": {"in_channels": 2}}
    assert random_phase_enabled(config, 1) is True  # auto: doubled channels
    assert random_phase_enabled({"network": {"in_channels": 1}}, 1) is False
    assert random_phase_enabled({"network": {"in_channels": 2}, "reconstruction": {"random_phase": False}}, 1) is False
    with pytest.raises(PlansError, match="in_channels"):
        random_phase_enabled({"network": {"in_channels": 1}, "reconstruction": {"random_phase": True}}, 1)
    with pytest.raises(PlansError, match="in_channels 3"):
        random_phase_enabled({"network": {"in_channels": 3}}, 1)


# ----------------------------------------------------------------------------------------------
# predictor + evaluation
# ----------------------------------------------------------------------------------------------
def _predictor(mri_model, **kwargs):
    from nndiff.tasks.reconstruction_predictor import ReconstructionPredictor

    return ReconstructionPredictor.from_model_folder(mri_model["model_dir"], device="cpu",
                                                     preprocessed_dir=mri_model["pre"], **kwargs)


def _test_images(mri_model, tmp_path, count=2) -> Path:
    folder = tmp_path / "fully_sampled"
    folder.mkdir()
    for src in sorted((mri_model["raw"] / "imagesTr").glob("*_0000.npy"))[:count]:
        (folder / src.name).write_bytes(src.read_bytes())
    return folder


def test_simulate_predict_and_evaluate(mri_model, tmp_path):
    from nndiff.dataset.io import read_images
    from nndiff.evaluation.reconstruction import evaluate_reconstruction
    from nndiff.inference import predictor_class_for
    from nndiff.tasks.reconstruction_predictor import ReconstructionPredictor

    assert predictor_class_for("ReconstructionTrainer") is ReconstructionPredictor
    images = _test_images(mri_model, tmp_path)
    out = tmp_path / "out"
    predictor = _predictor(mri_model)
    assert predictor.warm_start and predictor.dc == "projection"
    predictor.predict_simulated(images, out, seed=1, num_mc_samples=2, acceleration=4.0)
    recon, props = read_images([out / "case_000.npy"])
    reference, ref_props = read_images([images / "case_000_0000.npy"])
    assert recon.shape == reference.shape and props.spacing == ref_props.spacing
    assert (out / "case_000_std.npy").is_file() and (out / "baseline" / "case_000.npy").is_file()
    info = json.loads((out / "reconstruction_info.json").read_text(encoding="utf-8"))
    assert info["cases"]["case_000"]["acceleration"] == pytest.approx(4.0, rel=0.05)
    summary = evaluate_reconstruction(out, images, output_file=out / "summary.json")
    assert set(summary["mean"]) >= {"reconstruction", "baseline"}
    for key in ("psnr", "ssim", "nmse"):
        assert np.isfinite(summary["mean"]["reconstruction"][key])
    assert summary["mean"]["dc_residual"] < 1e-3  # hard projection: measured samples kept
    assert (out / "summary.json").is_file()


def _npz_case(mri_model, folder: Path, name="knee", acceleration=4.0, sidecar=True, **overrides) -> tuple[Path, np.ndarray]:
    """A single-coil measurement of a training image (complex), as {name}.npz (+ sidecar)."""
    from nndiff.tasks.operators import fft2c, undersampling_mask

    stored = np.load(sorted((mri_model["raw"] / "imagesTr").glob("*_0000.npy"))[0])
    image = stored.reshape(stored.shape[-2:])
    mask = undersampling_mask(image.shape, acceleration, 0.08, "random", seed=5).numpy()[0]  # (W,) fastMRI columns
    kspace = (fft2c(torch.from_numpy(image)).numpy() * mask).astype(np.complex64)
    arrays = {"kspace": kspace, "mask": mask.astype(np.float32), **overrides}
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{name}.npz", **arrays)
    if sidecar:
        (folder / f"{name}.json").write_text(json.dumps({"spacing": [0.5, 0.5]}))
    return folder / f"{name}.npz", image


def test_npz_case_hard_dc_keeps_measured_kspace(mri_model, tmp_path):
    """Hard DC: the written complex reconstruction (original units) has exactly the measured k-space
    samples (to float32 rounding, relative 1e-5 of the k-space norm)."""
    from nndiff.dataset.io import read_images
    from nndiff.tasks.operators import fft2c

    path, _ = _npz_case(mri_model, tmp_path / "in")
    out = tmp_path / "out"
    _predictor(mri_model).predict_from_folder(path.parent, out, seed=0)
    data = np.load(path)
    measured = data["mask"].astype(bool)
    recon = np.load(out / "knee_complex.npy")[0]  # (H, W) complex, original units
    k = fft2c(torch.from_numpy(recon)).numpy()
    error = np.abs(k[:, measured] - data["kspace"][:, measured]).max()
    assert error <= 1e-5 * np.abs(data["kspace"]).max()
    assert not np.allclose(k[:, ~measured], 0)  # the prior filled the unmeasured columns
    magnitude, props = read_images([out / "knee.npy"])
    assert magnitude.shape == (1, 1, 32, 32) and props.spacing[1:] == (0.5, 0.5)
    np.testing.assert_allclose(magnitude[0, 0], np.abs(recon), rtol=1e-5, atol=1e-3)


def test_dps_runs_from_noise_and_unknown_dc_is_refused(mri_model, tmp_path):
    path, _ = _npz_case(mri_model, tmp_path / "in")
    out = tmp_path / "out"
    _predictor(mri_model, dc="dps", warm_start=False).predict_from_folder(path.parent, out, seed=0)
    info = json.loads((out / "reconstruction_info.json").read_text(encoding="utf-8"))
    assert info["dc"] == "dps" and np.isfinite(info["cases"]["knee"]["dc_residual"])
    with pytest.raises(NnDiffError, match="unknown data consistency"):
        _predictor(mri_model, dc="magic")


def test_bad_inputs_name_file_and_problem(mri_model, tmp_path):
    from nndiff.tasks.operators import MeasurementError

    predictor = _predictor(mri_model)
    path, _ = _npz_case(mri_model, tmp_path / "nosidecar", sidecar=False)
    with pytest.raises(NnDiffError, match=r"knee\.npz.*sidecar knee\.json is missing"):
        predictor.predict_from_folder(path.parent, tmp_path / "o1")
    path, _ = _npz_case(mri_model, tmp_path / "shape", mask=np.ones(20, dtype=np.float32))
    with pytest.raises(MeasurementError, match=r"knee\.npz.*disagrees with mask shape"):
        predictor.predict_from_folder(path.parent, tmp_path / "o2")
    kspace = np.full((32, 32), np.nan, dtype=np.complex64)
    path, _ = _npz_case(mri_model, tmp_path / "nan", kspace=kspace)
    with pytest.raises(MeasurementError, match=r"knee\.npz.*non-finite"):
        predictor.predict_from_folder(path.parent, tmp_path / "o3")
    path, _ = _npz_case(mri_model, tmp_path / "acc", mask=np.full(32, 2.0, dtype=np.float32))
    with pytest.raises(MeasurementError, match=r"knee\.npz.*acceleration below 1"):
        predictor.predict_from_folder(path.parent, tmp_path / "o4")
    with pytest.raises(MeasurementError, match="acceleration must be >= 1"):
        predictor.predict_simulated(_test_images(mri_model, tmp_path, 1), tmp_path / "o5", acceleration=0.5)
    with pytest.raises(NnDiffError, match="holds no"):
        predictor.predict_from_folder(tmp_path / "empty_missing", tmp_path / "o6")


def test_ct_sparse_view_simulate_smoke(tmp_path):
    """Sparse-view CT: a real 1-channel prior, POCS data consistency and an FBP warm start."""
    from nndiff.dataset.examples import properties_2d
    from nndiff.dataset.io import read_images, write_image
    from nndiff.tasks.reconstruction_predictor import ReconstructionPredictor

    paths = _paths(tmp_path)
    raw = paths.raw / "Dataset082_CTRecon"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16] - 7.5
    for i in range(4):
        image = (np.hypot(yy, xx) < 6 + rng.uniform(-1, 1)) * 100.0 + (np.hypot(yy - 2, xx) < 2) * 300.0
        write_image(image.astype(np.float32)[None, None], properties_2d(shape=(16, 16), dtype="float32"),
                    raw / "imagesTr" / f"ct_{i:03d}_0000.npy")
    save_json({"task": "reconstruction", "channel_names": {"0": "CT"}, "numTraining": 4, "file_ending": ".npy",
               "reconstruction": {"operator": "ct_parallel", "num_views": 6}}, raw / "dataset.json")
    location = locate_dataset(82, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    plans["configurations"]["tiny"] = {**TINY, "training": {**TINY["training"], "num_val_cases": 1}}
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=["2d"])
    trainer = train_fold(82, "tiny", 0, paths, trainer="ReconstructionTrainer", device="cpu", num_workers=0)
    pre = next(p for p in paths.preprocessed.iterdir() if p.is_dir())
    predictor = ReconstructionPredictor.from_model_folder(trainer.output_dir.parent, device="cpu", preprocessed_dir=pre)
    assert predictor.in_channels == 1
    out = tmp_path / "out"
    predictor.predict_simulated(raw / "imagesTr", out, seed=0)
    recon, _ = read_images([out / "ct_000.npy"])
    assert recon.shape == (1, 1, 16, 16) and np.isfinite(recon).all()
    info = json.loads((out / "reconstruction_info.json").read_text(encoding="utf-8"))
    assert info["cases"]["ct_000"]["num_views"] == 6 and np.isfinite(info["cases"]["ct_000"]["dc_residual"])


def test_prediction_fold_ensemble_reconstructs_per_fold_and_stacks_folds_times_samples(mri_model, tmp_path):
    import shutil

    model_dir = tmp_path / mri_model["model_dir"].name
    shutil.copytree(mri_model["model_dir"], model_dir)
    shutil.copytree(model_dir / "fold_0", model_dir / "fold_1")  # same weights, independent noise per fold
    two = _predictor({**mri_model, "model_dir": model_dir}, folds=(0, 1))
    assert two.fold_ensemble == "prediction" and two.ensembles_predictions
    case_file, _ = _npz_case(mri_model, tmp_path / "meas")
    case = two.measurement_case(case_file)
    result = two.reconstruct_case(case, seed=3, num_samples=2)
    assert result["samples"].shape[0] == 4  # 2 folds x 2 samples, fold-major
    for fold in (0, 1):
        with two.active_folds([fold]):
            alone = two.reconstruct_with(case, two.fold_generator(3, case.identifier, fold), 2)
        torch.testing.assert_close(result["samples"][2 * fold:2 * fold + 2], alone["samples"])
    assert not torch.equal(result["samples"][0], result["samples"][2])  # folds drew different noise
    # the predictor ran every network call inside the per-fold loop: no step fallback recorded
    out = tmp_path / "out"
    two.predict_from_folder(case_file.parent, out, seed=3)
    info = json.loads((out / "prediction_info.json").read_text(encoding="utf-8"))
    assert info["fold_ensemble"] == "prediction" and "fold_ensemble_note" not in info
    assert not (out / f"{case_file.stem}_std.npy").exists()  # K = 1: mean over folds, no std map


# ----------------------------------------------------------------------------------------------
# Real (magnitude) prior with an MRI operator: the complex measurement keeps its imaginary part
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def magnitude_model(tmp_path_factory) -> dict:
    """Real 16x16 'T1' slices (planned 1 channel, no random phase), a tiny prior trained briefly."""
    from nndiff.dataset.examples import properties_2d
    from nndiff.dataset.io import write_image

    paths = _paths(tmp_path_factory.mktemp("magnitude"))
    raw = paths.raw / "Dataset083_MagRecon"
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:16, :16] - 7.5
    for i in range(4):
        head = (np.hypot(yy / 1.2, xx) < 6 + rng.uniform(-0.5, 0.5)) * 200.0
        image = head + (np.hypot(yy - rng.uniform(-2, 2), xx - 1) < 2.5) * 150.0
        write_image(image.astype(np.float32)[None, None], properties_2d(shape=(16, 16), dtype="float32"),
                    raw / "imagesTr" / f"mr_{i:03d}_0000.npy")
    save_json({"task": "reconstruction", "channel_names": {"0": "T1"}, "numTraining": 4, "file_ending": ".npy",
               "reconstruction": {"operator": "mri_cartesian", "acceleration": 4.0, "center_fraction": 0.125}},
              raw / "dataset.json")
    location = locate_dataset(83, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    plans["configurations"]["tiny"] = {**TINY, "training": {**TINY["training"], "num_val_cases": 1}}
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=["2d"])
    trainer = train_fold(83, "tiny", 0, paths, trainer="ReconstructionTrainer", device="cpu", num_workers=0)
    pre = next(p for p in paths.preprocessed.iterdir() if p.is_dir())
    return {"raw": raw, "pre": pre, "model_dir": trainer.output_dir.parent}


def _oracle_model(predictor, reference: torch.Tensor, shrink: float):
    """A prior whose x0 prediction is always ``shrink`` x the reference (network units), in the
    plan's parameterization: an imperfect oracle, so data consistency has work to do."""
    from nndiff.diffusion._tensor import per_sample
    from nndiff.diffusion.parameterization import from_x0_eps

    def model(x: torch.Tensor, t_net: torch.Tensor, cond=None) -> torch.Tensor:
        alpha, sigma = (c.to(x.dtype) for c in predictor.process.alpha_sigma_from_model_time(t_net))
        x0 = (shrink * reference).to(x).expand_as(x)
        eps = (x - per_sample(alpha, x) * x0) / per_sample(sigma, x)
        return from_x0_eps(x0, eps, alpha, sigma, predictor.diffusion.parameterization)

    return model


def _psnr(estimate: np.ndarray, reference: np.ndarray) -> float:
    return float(10 * np.log10(reference.max() ** 2 / np.mean((estimate - reference) ** 2)))


@pytest.mark.filterwarnings("error:Casting complex values to real:UserWarning")
def test_real_prior_projection_keeps_complex_measurement_float32(magnitude_model, monkeypatch):
    """Regression (GPU run, issue 5): a 1-channel prior's float32 samples used to cast the complex
    k-space to real (imaginary part dropped, PyTorch warned), so 'hard' DC left a relative residual
    of 0.15 and the reconstruction lost to zero-filling. With an (imperfect) oracle prior the final
    reconstruction must now match the measured k-space and beat the zero-filled image."""
    from nndiff.dataset.io import read_images
    from nndiff.tasks.operators import RealImageOperator
    from nndiff.tasks.reconstruction_predictor import ReconstructionPredictor

    predictor = ReconstructionPredictor.from_model_folder(magnitude_model["model_dir"], device="cpu",
                                                          preprocessed_dir=magnitude_model["pre"])
    assert predictor.in_channels == 1 and predictor.dc == "projection"
    images, props = read_images([magnitude_model["raw"] / "imagesTr" / "mr_000_0000.npy"])
    case = predictor.simulated_case("mr_000", images, props, predictor.simulation_settings(), 0, "mr_000")
    assert isinstance(predictor.network_operator(case.operators[0]), RealImageOperator)
    assert case.data.dtype == torch.complex64 and float(case.data.imag.abs().max()) > 1.0  # complex k-space
    reference = torch.from_numpy(images[0, 0]).float()[None, None] / predictor.scale
    monkeypatch.setattr(predictor, "_model", lambda shape: _oracle_model(predictor, reference, 0.8))
    result = predictor.reconstruct_case(case, seed=0, num_samples=1)
    assert result["samples"].dtype == torch.float32
    assert result["residual"] < 1e-4  # the measured k-space is the measurement
    measured = case.operators[0].mask > 0
    k_rec = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(result["samples"][0, 0].to(torch.complex64)),
                                              norm="ortho"))
    error = (k_rec[measured] - case.data[0, 0][measured]).abs().max()
    assert float(error) <= 1e-5 * float(case.data.abs().max())
    truth = images[0, 0]
    recon_psnr = _psnr(result["samples"][0, 0].numpy(), truth)
    zero_filled_psnr = _psnr(result["baseline"][0].abs().numpy(), truth)
    assert recon_psnr > zero_filled_psnr + 5.0, (recon_psnr, zero_filled_psnr)


@pytest.mark.filterwarnings("error:Casting complex values to real:UserWarning")
def test_real_prior_simulate_predict_enforces_measurement(magnitude_model, tmp_path):
    """The trained 1-channel prior through predict_simulated (warm start, K = 2): DC residual ~ 0."""
    from nndiff.tasks.reconstruction_predictor import ReconstructionPredictor

    predictor = ReconstructionPredictor.from_model_folder(magnitude_model["model_dir"], device="cpu",
                                                          preprocessed_dir=magnitude_model["pre"])
    out = tmp_path / "out"
    predictor.predict_simulated(magnitude_model["raw"] / "imagesTr", out, seed=2, num_mc_samples=2)
    info = json.loads((out / "reconstruction_info.json").read_text(encoding="utf-8"))
    assert set(info["cases"]) == {f"mr_{i:03d}" for i in range(4)}
    for entry in info["cases"].values():
        assert entry["dc_residual"] < 1e-4
        assert entry["acceleration"] == pytest.approx(4.0, rel=0.1)


def test_monte_carlo_samples_of_a_slice_share_sampler_runs(magnitude_model):
    """K samples of a slice run as batches of batch_size (K = 3, batch 2: two runs), not K runs of
    batch 1; each sample keeps the measurement and draws its own noise. (A run of one sample may
    stack two sliding windows per call, so the second run is counted by its work.)"""
    from nndiff.dataset.io import read_images
    from nndiff.tasks.reconstruction_predictor import ReconstructionPredictor

    predictor = ReconstructionPredictor.from_model_folder(magnitude_model["model_dir"], device="cpu",
                                                          preprocessed_dir=magnitude_model["pre"])
    batches: list[int] = []
    predictor.networks[0].register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    predictor.batch_size = 1
    images, props = read_images([magnitude_model["raw"] / "imagesTr" / "mr_001_0000.npy"])
    case = predictor.simulated_case("mr_001", images, props, predictor.simulation_settings(), 0, "mr_001")
    predictor.reconstruct_case(case, seed=1, num_samples=1)
    steps = len(batches)
    assert steps >= 1 and set(batches) == {1}
    batches.clear()
    predictor.batch_size = 2
    assert predictor.sample_chunks(3) == [2, 1] and predictor.sample_chunks(4) == [2, 2]
    result = predictor.reconstruct_case(case, seed=1, num_samples=3)
    assert batches[:steps] == [2] * steps  # samples 1-2: one run of batch 2
    assert sum(batches[steps:]) == steps and len(batches) < 3 * steps  # sample 3: same work, fewer calls than K runs
    samples = result["samples"]
    assert samples.shape == (3, 1, 16, 16) and result["residual"] < 1e-4
    assert not torch.equal(samples[0], samples[1]) and not torch.equal(samples[1], samples[2])
    for dc in ("dps", "mcg"):  # the gradient hooks work per sample of the batch too
        other = ReconstructionPredictor.from_model_folder(magnitude_model["model_dir"], device="cpu", dc=dc,
                                                          preprocessed_dir=magnitude_model["pre"], batch_size=2)
        out = other.reconstruct_case(case, seed=1, num_samples=2)
        assert out["samples"].shape == (2, 1, 16, 16) and torch.isfinite(out["samples"]).all()
        assert np.isfinite(out["residual"])
