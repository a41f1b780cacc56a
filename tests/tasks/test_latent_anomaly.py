"""Latent anomaly detection (LatentAnomalyDDPMTrainer, LatentAnomalyPredictor) on the anomaly_2d example
(32² PNG, lesions in the odd cases) with the latent rule forced, so the plan has a 2d_latent configuration."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nndiff.dataset.examples import make_example_dataset
from nndiff.dataset.io import read_images
from nndiff.errors import NnDiffError, PlansError
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
from nndiff.planning import configurations
from nndiff.tasks import latent_anomaly_predictor
from nndiff.tasks.anomaly import LATENT_NOISE_REASON, LatentAnomalyDDPMTrainer
from nndiff.tasks.latent_anomaly_predictor import LatentAnomalyPredictor, resample_mask
from nndiff.tasks.latent import AUTOENCODER_INFO, autoencoder_fold_dir
from nndiff.training import load_checkpoint
from nndiff.training.api import train_fold
from nndiff.utils.files import load_json, save_json

DATASET = 871
TINY = "tiny_latent"
# The tiny latent configuration of the latent-generation tests (32² images, factors 4 → 8² latents).
from test_latent import TINY_OVERRIDES  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_anomaly")
    paths = Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")
    raw = make_example_dataset("anomaly_2d", paths.raw, DATASET)
    location = locate_dataset(DATASET, paths)
    extract_fingerprint_step(location)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configurations, "LATENT_LARGE_IMAGE_VOXELS", {2: 1, 3: 1})
        plans = plan_step(location)
    plans["configurations"][TINY] = {"inherits_from": "2d_latent", **TINY_OVERRIDES}
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=["2d"])
    from nndiff.run.train import default_trainer

    trainer = train_fold(DATASET, TINY, 0, paths, trainer=default_trainer(plans, TINY), device="cpu", num_workers=0)
    inputs = root / "inputs"
    inputs.mkdir()
    for case in ("case_000", "case_001"):  # healthy, diseased
        shutil.copy(raw / "imagesTr" / f"{case}_0000.png", inputs / f"{case}_0000.png")
    return paths, raw, plans, trainer, inputs


def test_plan_latent_anomaly_configuration(trained):
    from nndiff.run.train import default_trainer

    _, _, plans, _, _ = trained
    config = plans["configurations"]["2d_latent"]
    assert config["diffusion"]["noise_type"] == "gaussian" and config["diffusion"]["noise_params"] == {}
    assert config["reasons"]["diffusion.noise_type"] == LATENT_NOISE_REASON
    assert config["anomaly"]["latent_resample_quantile"] == 0.9
    assert "anomaly.latent_resample_quantile" in config["reasons"]
    assert plans["configurations"]["2d"]["diffusion"]["noise_type"] == "simplex"  # pixel configs keep simplex
    assert default_trainer(plans, "2d_latent") == "LatentAnomalyDDPMTrainer"
    assert default_trainer(plans, "2d") == "AnomalyDDPMTrainer"


def test_both_stages_learn_healthy_cases_only(trained):
    paths, raw, _, trainer, _ = trained
    assert isinstance(trainer, LatentAnomalyDDPMTrainer)
    metadata = load_json(raw / "metadata.json")
    fold_dir = autoencoder_fold_dir(trainer.output_dir.parent.parent, "nnDiffPlans", TINY, 0)
    ae_cases = load_json(fold_dir / AUTOENCODER_INFO)["train_cases"]
    assert ae_cases and all(metadata[c]["healthy"] for c in ae_cases)
    assert trainer.train_cases and all(metadata[c]["healthy"] for c in trainer.train_cases)
    extra = load_checkpoint(trainer.output_dir / "checkpoint_final.pth")["extra"]
    assert extra["anomaly"]["strategy"] == "anoddpm" and extra["anomaly"]["latent"] is True
    assert extra["anomaly"]["num_healthy_training_cases"] == len(trainer.train_cases)
    assert extra["autoencoder"]["weights_hash"] == load_json(fold_dir / AUTOENCODER_INFO)["weights_sha256"]


def test_predict_writes_maps_masks_and_reconstructions(trained, tmp_path):
    paths, raw, _, _, inputs = trained
    predictor = LatentAnomalyPredictor.from_trained(DATASET, TINY, paths, trainer="LatentAnomalyDDPMTrainer",
                                                    folds=(0,), device="cpu")
    assert predictor.strategy == "anoddpm" and predictor.resample_quantile == 0.9
    predictor.predict_from_folder(inputs, tmp_path)
    for case in ("case_000", "case_001"):
        source, source_props = read_images([inputs / f"{case}_0000.png"])
        amap, map_props = read_images([tmp_path / f"{case}.nii.gz"])
        mask, _ = read_images([tmp_path / f"{case}_mask.png"])
        recon, _ = read_images([tmp_path / f"{case}_reconstruction.png"])
        assert amap.shape == mask.shape == recon.shape == source.shape
        assert np.isfinite(amap).all() and (amap >= 0).all()
        assert set(np.unique(mask)) <= {0, 1}
        assert tuple(map_props.spacing) == tuple(source_props.spacing)
    info = load_json(tmp_path / "prediction_info.json")
    assert info["latent"] is True and info["resample_quantile"] == 0.9
    assert set(info["case_scores"]) == {"case_000", "case_001"}


def test_map_is_zero_when_the_healthy_reconstruction_equals_the_autoencoders(trained, monkeypatch):
    """The map compares with decode(z0), not with the input: a latent model that returns z0 unchanged
    gives an all-zero map even though the (untrained) autoencoder does not reproduce the input."""
    paths, _, _, _, inputs = trained
    predictor = LatentAnomalyPredictor.from_trained(DATASET, TINY, paths, trainer="LatentAnomalyDDPMTrainer",
                                                    folds=(0,), device="cpu")
    monkeypatch.setattr(predictor, "reconstruct_latents", lambda z0, generator: z0)
    maps = predictor.anomaly_maps(inputs)
    assert all(np.abs(m).max() == 0 for m in maps.values())
    source, _ = read_images([inputs / "case_000_0000.png"])
    case = next(predictor.prepared_cases(inputs))
    pair = predictor.predict_case(torch.from_numpy(case.data), case, torch.Generator().manual_seed(0))
    assert pair.shape[0] == 2 * case.data.shape[0]
    assert not torch.allclose(pair[1], torch.from_numpy(case.data).float(), atol=1e-3)  # AE error is not zero


def test_masked_resampling_holds_the_unmasked_latents(trained, monkeypatch):
    paths, _, _, _, _ = trained
    predictor = LatentAnomalyPredictor.from_trained(DATASET, TINY, paths, trainer="LatentAnomalyDDPMTrainer",
                                                    folds=(0,), device="cpu")
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    held = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    held[..., :4] = True  # resample the left half only
    monkeypatch.setattr(latent_anomaly_predictor, "resample_mask", lambda a, b, q: held)
    out = predictor.reconstruct_latents(z0, torch.Generator().manual_seed(0))
    keep = ~held.expand_as(z0)
    torch.testing.assert_close(out[keep], z0[keep], atol=1e-5, rtol=0)
    assert (out[~keep] - z0[~keep]).abs().max() > 1e-3  # the masked half was redrawn


def test_resample_mask_marks_the_largest_change_with_a_margin():
    z0 = torch.zeros(1, 2, 6, 6)
    z1 = z0.clone()
    z1[0, :, 2, 3] = 5.0
    mask = resample_mask(z0, z1, quantile=0.99)
    expected = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    expected[0, 0, 1:4, 2:5] = True
    assert torch.equal(mask, expected)
    assert not resample_mask(z0, z1, quantile=1.0).any()
    volume = torch.zeros(1, 1, 4, 4, 4)
    moved = volume.clone()
    moved[0, 0, 0, 0, 0] = 1.0
    assert resample_mask(volume, moved, 0.99).sum() == 8  # corner voxel dilated inside the volume


def test_other_strategies_and_bad_quantiles_are_refused(trained):
    paths, _, plans, _, _ = trained
    with pytest.raises(NnDiffError, match="not available in latent space.*anoddpm"):
        LatentAnomalyPredictor.from_trained(DATASET, TINY, paths, trainer="LatentAnomalyDDPMTrainer", folds=(0,),
                                            device="cpu", strategy="cdpm")
    with pytest.raises(NnDiffError, match=r"resample_quantile must be in \(0, 1\]"):
        LatentAnomalyPredictor.from_trained(DATASET, TINY, paths, trainer="LatentAnomalyDDPMTrainer", folds=(0,),
                                            device="cpu", resample_quantile=0.0)
    from nndiff.tasks.anomaly import AnomalyCDPMTrainer

    pre = next(p for p in paths.preprocessed.iterdir() if p.is_dir())
    with pytest.raises(PlansError, match="LatentAnomalyDDPMTrainer for anomaly detection"):
        AnomalyCDPMTrainer(plans, TINY, 0, pre, output_dir=Path(paths.results) / "x", device="cpu", num_workers=0)


def test_cli_calibrates_and_predicts_a_latent_anomaly_model(trained, tmp_path, capsys):
    """nndiff_predict finds the latent predictor from the trainer name; calibration stores a threshold;
    a strategy other than anoddpm is refused with the fix."""
    from nndiff.inference.cli import predict_entry
    from nndiff.tasks.anomaly_predictor import THRESHOLD_FILE, load_threshold

    paths, raw, _, trainer, inputs = trained
    model_dir = trainer.output_dir.parent

    def argv(out: Path, *extra) -> list[str]:
        return [str(a) for a in ["-i", inputs, "-o", out, "-d", DATASET, "-c", TINY, "-tr", "LatentAnomalyDDPMTrainer",
                                 "-device", "cpu", *extra, "--raw", paths.raw, "--preprocessed", paths.preprocessed,
                                 "--results", paths.results, "-q"]]

    try:
        assert predict_entry(argv(tmp_path / "out", "--calibrate_threshold", inputs, raw / "labelsTr")) == 0
        stored = load_threshold(model_dir, "anoddpm")
        assert stored is not None
        info = load_json(tmp_path / "out" / "prediction_info.json")
        assert info["latent"] is True and info["thresholds"]["case_001"]["source"] == THRESHOLD_FILE
    finally:
        (model_dir / THRESHOLD_FILE).unlink(missing_ok=True)
    assert predict_entry(argv(tmp_path / "bad", "--anomaly_strategy", "cdpm")) != 0
    assert "not available in latent space" in capsys.readouterr().err


def test_3d_volumes_with_anisotropic_factors(tmp_path):
    """3D: the 3d_mr example as an anomaly-detection dataset (no labels, no flags → healthy), factors
    2×4×4 and a latent patch smaller than the latent: both stages train, the predictor writes a map,
    a mask and a reconstruction of each volume with its geometry."""
    from nndiff.run.train import default_trainer

    paths = Paths(raw=tmp_path / "raw", preprocessed=tmp_path / "pre", results=tmp_path / "res")
    raw = make_example_dataset("3d_mr", paths.raw, DATASET + 1)
    dataset_json = load_json(raw / "dataset.json")
    save_json({**dataset_json, "task": "anomaly_detection"}, raw / "dataset.json")
    location = locate_dataset(DATASET + 1, paths)
    extract_fingerprint_step(location)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configurations, "LATENT_LARGE_IMAGE_VOXELS", {2: 1, 3: 1})
        plans = plan_step(location)
    plans["configurations"][TINY] = {
        "inherits_from": "3d_latent", **TINY_OVERRIDES, "patch_size": [4, 4, 4],
        "network": {**TINY_OVERRIDES["network"], "strides": [[2, 2, 2]]},
        "autoencoder": {**TINY_OVERRIDES["autoencoder"], "downsampling_factors": [2, 4, 4],
                        "patch_size": [16, 16, 16]}}
    save_json(plans, location.plans_file())
    preprocess_step(location, configurations=[TINY])
    assert default_trainer(plans, TINY) == "LatentAnomalyDDPMTrainer"
    trainer = train_fold(DATASET + 1, TINY, 0, paths, trainer="LatentAnomalyDDPMTrainer", device="cpu",
                         num_workers=0)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = sorted((raw / "imagesTr").iterdir())[0]
    shutil.copy(source, inputs / source.name)
    predictor = LatentAnomalyPredictor.from_model_folder(trainer.output_dir.parent, folds=(0,), device="cpu")
    predictor.predict_from_folder(inputs, tmp_path / "out")
    case = source.name[: -len("_0000" + dataset_json["file_ending"])]
    image, props = read_images([source])
    amap, map_props = read_images([tmp_path / "out" / f"{case}.nii.gz"])
    recon, _ = read_images([tmp_path / "out" / f"{case}_reconstruction{dataset_json['file_ending']}"])
    assert amap.shape == recon.shape == image.shape and props.spatial_dims == 3
    assert np.allclose(map_props.spacing, props.spacing) and np.isfinite(amap).all() and (amap >= 0).all()
