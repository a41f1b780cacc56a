"""AnomalyPredictor: partial diffusion with exact models, anomaly maps, thresholds, and the three
strategies end to end on tiny models trained for 3 iterations (CPU)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nndiff.dataset.examples import make_example_dataset
from nndiff.dataset.io import read_images
from nndiff.diffusion.parameterization import from_x0_eps
from nndiff.errors import NnDiffError
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
from nndiff.tasks.anomaly_predictor import (
    THRESHOLD_FILE,
    AnomalyCDPMPredictor,
    AnomalyPredictor,
    anomaly_map,
    calibrate_threshold,
    case_score,
    classifier_model_folder,
    dynamic_normalization,
    gaussian_smooth,
    healthy_log_prob,
    load_threshold,
    save_threshold,
)
from nndiff.training.api import train_fold
from nndiff.utils.files import load_json, save_json

DATASET = 861
TINY = {
    "network": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [],
                "num_head_channels": 8, "norm_groups": 4, "strides": [[2, 2]]},
    "training": {"num_iterations_per_epoch": 3, "num_epochs": 1, "num_val_cases": 1, "warmup_iterations": 1,
                 "augmentation": "none", "progress_every_epochs": 100},
    "diffusion": {"num_sampling_steps": 8},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """anomaly_2d example (32² PNG, lesions in the odd cases): DDPM, CDPM and classifier, 3 iterations each."""
    root = tmp_path_factory.mktemp("anomaly")
    paths = Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")
    raw = make_example_dataset("anomaly_2d", paths.raw, DATASET)
    location = locate_dataset(DATASET, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    plans["configurations"]["tiny"] = {"inherits_from": "2d", **{k: dict(v) for k, v in TINY.items()}}
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=["2d"])
    for trainer in ("AnomalyDDPMTrainer", "AnomalyCDPMTrainer", "AnomalyClassifierTrainer"):
        train_fold(DATASET, "tiny", 0, paths, trainer=trainer, device="cpu", num_workers=0)
    inputs = root / "inputs"
    inputs.mkdir()
    for case in ("case_000", "case_001"):  # healthy, diseased
        shutil.copy(raw / "imagesTr" / f"{case}_0000.png", inputs / f"{case}_0000.png")
    return paths, raw, inputs


def _model_dir(paths: Paths, trainer: str) -> Path:
    return next(paths.results.iterdir()) / f"{trainer}__nnDiffPlans__tiny"


def _bare(paths: Paths, cls=AnomalyPredictor, **kwargs) -> AnomalyPredictor:
    """A predictor on the tiny plan without networks (exact models are passed to reconstruct_batch)."""
    location = locate_dataset(DATASET, paths)
    plans = load_json(location.plans_file("nnDiffPlans"))
    dataset_json = load_json(next(paths.raw.iterdir()) / "dataset.json")
    return cls(plans, "tiny", dataset_json, [], device="cpu", **kwargs)


def _oracle(predictor: AnomalyPredictor, x0: torch.Tensor):
    """The exact eps-model of data concentrated at ``x0``: its x0 prediction is ``x0`` at every t."""
    process = predictor.process

    def model(x: torch.Tensor, t_net: torch.Tensor, cond=None) -> torch.Tensor:
        alpha, sigma = process.alpha_sigma_from_model_time(t_net)
        a, s = alpha.to(x).view(-1, 1, 1, 1), sigma.to(x).view(-1, 1, 1, 1)
        return from_x0_eps(x0, (x - a * x0) / s, alpha.to(x), sigma.to(x), predictor.diffusion.parameterization)

    return model


def _lowpass(x: torch.Tensor, keep: int = 4) -> torch.Tensor:
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))
    c = x.shape[-1] // 2
    return spectrum[..., c - keep:c + keep, c - keep:c + keep]


def _image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    return (0.5 * torch.cos(2 * xx) * torch.sin(yy) + 0.05 * torch.randn(32, 32, generator=g))[None, None]


# ----------------------------------------------------------------------------------------------
# Mechanics with exact models (no training needed beyond the fixture's plan)
# ----------------------------------------------------------------------------------------------
def test_partial_diffusion_with_the_exact_model_keeps_low_frequencies(trained):
    paths, _, _ = trained
    predictor = _bare(paths, strategy="anoddpm", start_fraction=0.1)
    assert predictor.diffusion.noise_type.value == "simplex" and predictor.start_time() == 100.0
    x = _image()
    out = predictor.reconstruct_batch(x, torch.Generator().manual_seed(0), _oracle(predictor, x))
    assert torch.allclose(_lowpass(out), _lowpass(x), atol=1e-3)
    # a model that knows only the healthy image removes the lesion: the map peaks inside it
    lesion = torch.zeros_like(x)
    lesion[..., 10:14, 18:22] = 1.0
    out = predictor.reconstruct_batch(x + lesion, torch.Generator().manual_seed(0), _oracle(predictor, x))
    amap = anomaly_map((x + lesion)[0], out[0], 1.0)
    peak = np.unravel_index(int(amap.argmax()), amap.shape)
    assert 9 <= peak[1] <= 14 and 17 <= peak[2] <= 22
    assert float(amap[0, 10:14, 18:22].mean()) > 5 * float(amap[0, :6, :6].mean())


def test_ddim_encoding_and_decoding_with_the_exact_model_returns_the_input(trained):
    paths, _, _ = trained
    predictor = _bare(paths, strategy="wolleb", classifier=nn.Linear(1, 2), classifier_scale=0.0)
    assert predictor.start_fraction == 0.5  # the plan's anomaly.encode_fraction
    x = _image(1)
    out = predictor.reconstruct_batch(x, torch.Generator().manual_seed(0), _oracle(predictor, x))
    assert torch.allclose(out, x, atol=1e-3)


def test_anomaly_map_of_an_identical_reconstruction_is_zero():
    x = torch.rand(2, 8, 16, 16)  # (C, Z, Y, X)
    amap = anomaly_map(x, x.clone(), [1.0, 2.0, 2.0])
    assert amap.shape == (1, 8, 16, 16) and float(amap.abs().max()) == 0.0
    # channels are summed, K reconstructions averaged; smoothing keeps constants and the total mass
    recon = torch.stack([x + 1.0, x - 3.0])
    assert torch.allclose(anomaly_map(x, recon, 0.0), torch.full((1, 8, 16, 16), 4.0))
    spike = torch.zeros(1, 1, 15, 15)
    spike[..., 7, 7] = 1.0
    smooth = gaussian_smooth(spike, 1.5)
    assert smooth.sum().item() == pytest.approx(1.0, abs=1e-5) and smooth[..., 7, 7] < 0.2
    assert case_score(np.arange(1000.0), 0.01) == pytest.approx(994.5)


def test_identical_reconstruction_writes_zero_map_and_geometry(trained, tmp_path, monkeypatch):
    paths, raw, inputs = trained
    predictor = AnomalyPredictor.from_model_folder(_model_dir(paths, "AnomalyDDPMTrainer"), device="cpu",
                                                   threshold=0.5)
    monkeypatch.setattr(predictor, "predict_case", lambda data, case, generator: data.clone())
    written = predictor.predict_from_folder(inputs, tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["case_000.nii.gz", "case_000_mask.png", "case_000_reconstruction.png",
                     "case_001.nii.gz", "case_001_mask.png", "case_001_reconstruction.png"]
    source, source_props = read_images([inputs / "case_001_0000.png"])
    amap, map_props = read_images([tmp_path / "case_001.nii.gz"])
    mask, _ = read_images([tmp_path / "case_001_mask.png"])
    recon, recon_props = read_images([tmp_path / "case_001_reconstruction.png"])
    assert amap.shape == mask.shape == recon.shape == source.shape
    assert float(np.abs(amap).max()) == 0.0 and not mask.any()
    # the input as the network saw it, in original units (uint8 grey, clipped to the plan's window)
    case = predictor.prepare_case(source, source_props, "case_001")
    seen, _ = predictor.invert(case.data, case.case_json)
    assert np.abs(recon.astype(float) - seen).max() <= 0.5 and np.abs(recon.astype(float) - source).mean() < 1.0
    for props in (map_props, recon_props):
        assert props.spacing == pytest.approx(source_props.spacing) and props.origin == pytest.approx(source_props.origin)


def test_dynamic_normalization_shrinks_only_out_of_range_predictions():
    hook = dynamic_normalization(torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0]))
    x0 = torch.stack([torch.linspace(-0.5, 0.5, 16), torch.linspace(-3.0, 1.0, 16)]).view(2, 1, 4, 4)
    out = hook(x0, 10.0)
    assert torch.equal(out[0], x0[0])
    assert float(out[1].min()) == pytest.approx(-1.0) and float(out[1].max()) <= 1.0
    assert torch.allclose(out[1], x0[1] / 3.0)  # an affine shrink: relative contrast kept


def test_threshold_file_round_trip(tmp_path):
    assert load_threshold(tmp_path, "anoddpm") is None
    save_threshold(tmp_path, "anoddpm", 0.25, "dice")
    save_threshold(tmp_path, "cdpm", 3.0, "otsu")
    assert load_threshold(tmp_path, "anoddpm") == 0.25 and load_threshold(tmp_path, "cdpm") == 3.0
    content = load_json(tmp_path / THRESHOLD_FILE)
    content["strategies"]["cdpm"]["threshold"] = "high"
    save_json(content, tmp_path / THRESHOLD_FILE)
    with pytest.raises(NnDiffError, match="strategies.cdpm.threshold"):
        load_threshold(tmp_path, "cdpm")


def test_bad_options_are_refused(trained):
    paths, _, _ = trained
    with pytest.raises(NnDiffError, match="unknown anomaly strategy 'anogan'"):
        _bare(paths, strategy="anogan")
    with pytest.raises(NnDiffError, match="start_fraction"):
        _bare(paths, start_fraction=1.5)
    with pytest.raises(NnDiffError, match="num_reconstructions"):
        _bare(paths, num_reconstructions=0)


# ----------------------------------------------------------------------------------------------
# Trained tiny models, end to end
# ----------------------------------------------------------------------------------------------
def test_wolleb_without_a_classifier_names_the_missing_model_folder(trained, tmp_path):
    paths, _, _ = trained
    ddpm = _model_dir(paths, "AnomalyDDPMTrainer")
    assert classifier_model_folder(ddpm) == ddpm.parent / "AnomalyClassifierTrainer__nnDiffPlans__tiny"
    missing = tmp_path / "AnomalyClassifierTrainer__nnDiffPlans__tiny"
    with pytest.raises(NnDiffError, match=f"{missing}.*does not exist.*-tr AnomalyClassifierTrainer"):
        AnomalyPredictor.from_model_folder(ddpm, device="cpu", strategy="wolleb", classifier_dir=missing)
    with pytest.raises(NnDiffError, match="classifier"):
        _bare(paths, strategy="wolleb")


def test_wolleb_classifier_uses_the_diffusion_checkpoint_name(trained, tmp_path):
    # Found on the GPU: a time-limited training writes checkpoint_latest.pth only, and the classifier was
    # always read from checkpoint_final.pth, so -chk checkpoint_latest.pth could not predict with wolleb.
    paths, _, _ = trained
    results = tmp_path / "results"
    copies = {t: shutil.copytree(_model_dir(paths, t), results / _model_dir(paths, t).name)
              for t in ("AnomalyCDPMTrainer", "AnomalyClassifierTrainer")}
    classifier_dir, cdpm = copies["AnomalyClassifierTrainer"], copies["AnomalyCDPMTrainer"]
    classifier_fold = classifier_dir / "fold_0"
    (classifier_fold / "checkpoint_final.pth").unlink()  # as after a time-limited training
    preprocessed = locate_dataset(DATASET, paths).preprocessed_dir
    predictor = AnomalyCDPMPredictor.from_model_folder(cdpm, device="cpu", strategy="wolleb",
                                                       checkpoint="checkpoint_latest.pth",
                                                       preprocessed_dir=preprocessed)
    reference = torch.load(classifier_fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    for name, value in predictor.classifier.state_dict().items():
        torch.testing.assert_close(value, reference["ema_weights"][name])
    with pytest.raises(NnDiffError, match=r"checkpoint_final.pth does not exist.*holds: checkpoint_best.pth, checkpoint_latest.pth.*-chk"):
        AnomalyCDPMPredictor.from_model_folder(cdpm, device="cpu", strategy="wolleb", preprocessed_dir=preprocessed)
    explicit = AnomalyCDPMPredictor.from_model_folder(cdpm, device="cpu", strategy="wolleb",
                                                      preprocessed_dir=preprocessed, classifier_dir=classifier_dir,
                                                      classifier_checkpoint="checkpoint_latest.pth")
    assert explicit.classifier is not None


@pytest.mark.parametrize("trainer,strategy", [("AnomalyDDPMTrainer", "anoddpm"), ("AnomalyCDPMTrainer", "cdpm"),
                                              ("AnomalyCDPMTrainer", "wolleb")])
def test_strategies_end_to_end(trained, tmp_path, trainer, strategy):
    paths, _, inputs = trained
    cls = AnomalyCDPMPredictor if trainer == "AnomalyCDPMTrainer" else AnomalyPredictor
    kwargs = {} if strategy != "wolleb" else {"strategy": "wolleb"}
    predictor = cls.from_model_folder(_model_dir(paths, trainer), device="cpu", **kwargs)
    assert predictor.strategy == strategy  # anoddpm / cdpm: the trained strategy is the default
    written = predictor.predict_from_folder(inputs, tmp_path, seed=3, num_mc_samples=2 if strategy == "anoddpm" else 1)
    assert len(written) == 6
    source, source_props = read_images([inputs / "case_001_0000.png"])
    amap, props = read_images([tmp_path / "case_001.nii.gz"])
    mask, _ = read_images([tmp_path / "case_001_mask.png"])
    recon, _ = read_images([tmp_path / "case_001_reconstruction.png"])
    assert amap.shape == mask.shape == recon.shape == source.shape
    assert np.isfinite(amap).all() and amap.min() >= 0 and amap.max() > 0
    assert set(np.unique(mask)) <= {0, 1}
    assert props.spacing == pytest.approx(source_props.spacing)
    info = load_json(tmp_path / "prediction_info.json")
    assert info["strategy"] == strategy and set(info["case_scores"]) == {"case_000", "case_001"}
    assert info["thresholds"]["case_001"]["source"] == "otsu_per_case"
    if strategy == "anoddpm":
        assert info["num_reconstructions"] == 2


def test_calibrated_threshold_is_stored_and_used(trained, tmp_path):
    paths, raw, inputs = trained
    model_dir = _model_dir(paths, "AnomalyDDPMTrainer")
    predictor = AnomalyPredictor.from_model_folder(model_dir, device="cpu")
    entry = calibrate_threshold(predictor, inputs, masks_dir=raw / "labelsTr")
    assert entry["method"] == "dice" and entry["num_cases"] == 2
    assert load_threshold(model_dir, "anoddpm") == pytest.approx(entry["threshold"])
    predictor.predict_from_folder(inputs, tmp_path)
    info = load_json(tmp_path / "prediction_info.json")
    assert info["thresholds"]["case_001"] == {"threshold": entry["threshold"], "source": THRESHOLD_FILE}
    amap, _ = read_images([tmp_path / "case_001.nii.gz"])
    mask, _ = read_images([tmp_path / "case_001_mask.png"])
    assert np.array_equal(mask > 0, amap >= entry["threshold"])
    (model_dir / THRESHOLD_FILE).unlink()
    assert calibrate_threshold(predictor, inputs)["method"] == "otsu"
    (model_dir / THRESHOLD_FILE).unlink()


def test_threshold_calibrated_with_other_settings_is_flagged(trained, caplog):
    """The calibration records the map settings; a prediction with another smoothing or t_λ uses the
    stored threshold with a warning naming the change, and says so in its threshold source."""
    paths, raw, inputs = trained
    model_dir = _model_dir(paths, "AnomalyDDPMTrainer")
    try:
        calibrated = AnomalyPredictor.from_model_folder(model_dir, device="cpu", smoothing_sigma=1.0)
        entry = calibrate_threshold(calibrated, inputs, masks_dir=raw / "labelsTr")
        stored = load_json(model_dir / THRESHOLD_FILE)["strategies"]["anoddpm"]["settings"]
        assert stored == calibrated.map_settings() and stored["smoothing_sigma"] == 1.0
        amap = np.zeros((1, 1, 4, 4), np.float32)
        assert calibrated.threshold_for(amap) == (entry["threshold"], THRESHOLD_FILE)
        other = AnomalyPredictor.from_model_folder(model_dir, device="cpu", smoothing_sigma=2.0, start_fraction=0.1)
        with caplog.at_level("WARNING"):
            threshold, source = other.threshold_for(amap)
            other.threshold_for(amap)
        assert threshold == entry["threshold"]
        assert "smoothing_sigma: 1.0 → 2.0" in source and "start_fraction" in source
        assert sum("re-run --calibrate_threshold" in r.getMessage() for r in caplog.records) == 1  # warned once
    finally:
        (model_dir / THRESHOLD_FILE).unlink(missing_ok=True)


def test_registered_for_the_anomaly_diffusion_trainers():
    from nndiff.inference.registry import PREDICTORS

    assert PREDICTORS["AnomalyDDPMTrainer"] is AnomalyPredictor
    assert PREDICTORS["AnomalyCDPMTrainer"] is AnomalyCDPMPredictor
    assert "AnomalyClassifierTrainer" not in PREDICTORS  # a classifier only guides; it predicts nothing


def test_classifier_guidance_accepts_any_image_size():
    # Found on MNI152 slices (64 x 87 at a 64² patch): the sampler hands the classifier the whole
    # image, whose size need not be a multiple of the classifier's stride product.
    from nndiff.networks.classifier import build_classifier

    net = {"architecture": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 1, "model_channels": 8,
           "channel_mult": [1, 2, 2], "strides": [[2, 2], [2, 2]], "num_res_blocks": 1, "attention_levels": [],
           "num_head_channels": 8, "norm_groups": 4}
    classifier = build_classifier({"network": net, "pooling": "attention"}, seed=0).eval()
    log_prob = healthy_log_prob(classifier)
    t = torch.tensor([100.0, 100.0])
    x = torch.randn(2, 1, 13, 22, requires_grad=True)
    out = log_prob(x, t, None)
    assert out.shape == (2,) and bool(torch.all(out <= 0))
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all() and x.grad[:, :, -1, -1].abs().sum() > 0
    padded = torch.nn.functional.pad(x.detach(), (0, 2, 0, 3), mode="replicate")  # to 16 x 24
    expected = torch.log_softmax(classifier(padded, t).float(), dim=-1)[:, 0]
    torch.testing.assert_close(log_prob(x.detach(), t, None), expected)
    fits = torch.randn(2, 1, 16, 24)  # already divisible: the classifier sees it unchanged
    torch.testing.assert_close(log_prob(fits, t, None), torch.log_softmax(classifier(fits, t).float(), -1)[:, 0])
