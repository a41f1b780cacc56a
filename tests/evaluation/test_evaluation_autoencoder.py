"""nndiff_evaluate_autoencoder / evaluate_autoencoder: held-out reconstruction quality of a fold's
autoencoder (PSNR, SSIM in original units on the configuration's grid, encode + decode seconds).

Exact answers: an autoencoder whose decode(encode(x)) is x (space-to-depth and back) gives an
infinite PSNR and SSIM 1; one that scales the normalised image by 0.9 gives the PSNR computed here by
hand from the raw PNG files; a random AutoencoderKL loaded through the real loader gives the PSNR and
SSIM (scikit-image as the oracle) of encoding and decoding the hand-normalised images."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nndiff.dataset.examples import make_example_dataset, properties_2d
from nndiff.dataset.io import read_images, write_image
from nndiff.errors import NnDiffError
from nndiff.evaluation.autoencoder import (AUTOENCODER_EVALUATION, evaluate_autoencoder, reconstruct_case,
                                           reconstruction_metrics)
from nndiff.networks.autoencoder import build_autoencoder, weights_sha256
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step
from nndiff.planning import resolve_configuration
from nndiff.run.evaluate_autoencoder import evaluate_autoencoder_entry
from nndiff.tasks import autoencoder as autoencoder_module
from nndiff.tasks.latent import network_block
from nndiff.training.checkpoint import CHECKPOINT_FORMAT, FINAL, plans_hash, save_checkpoint
from nndiff.utils.files import load_json, save_json

DATASET_ID = 871
LATENT = "tiny_latent"
#: 2D latent configuration on the `2d` grid: no crop (so the grid is the raw image), factors 4.
AE_BLOCK = {"downsampling_factors": [4, 4], "latent_channels": 4, "base_channels": 8, "norm_groups": 4,
            "channel_multipliers": [1, 2, 2], "patch_size": [16, 16], "batch_size": 2, "in_channels": 1}
TEST_SHAPE = (30, 29)  # not multiples of 4: padding and cropping back are exercised


class SpaceToDepth(nn.Module):
    """Test autoencoder: the 'latent' is the image folded into channels (factor blocks), decoding
    unfolds it and multiplies by ``gain``; gain 1 reconstructs exactly. Records decode batch sizes."""

    def __init__(self, factors, gain: float = 1.0) -> None:
        super().__init__()
        self.factors, self.gain, self.decoded = [int(f) for f in factors], gain, []

    def latents_for_diffusion(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *sizes = x.shape
        split = [v for s, f in zip(sizes, self.factors) for v in (s // f, f)]
        dims = len(sizes)
        x = x.reshape(n, c, *split).permute(0, 1, *[3 + 2 * i for i in range(dims)], *[2 + 2 * i for i in range(dims)])
        return x.reshape(n, c * math.prod(self.factors), *[s // f for s, f in zip(sizes, self.factors)])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.decoded.append(z.shape[0])
        n, _, *sizes = z.shape
        dims = len(sizes)
        c = z.shape[1] // math.prod(self.factors)
        x = z.reshape(n, c, *self.factors, *sizes)
        order = [v for i in range(dims) for v in (2 + dims + i, 2 + i)]
        x = x.permute(0, 1, *order).reshape(n, c, *[s * f for s, f in zip(sizes, self.factors)])
        return x * self.gain


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[Paths, dict, Path]:
    """2D example → plan + a hand-made latent configuration; two held-out 30×29 PNGs inside the window."""
    root = tmp_path_factory.mktemp("ae_eval")
    paths = Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")
    make_example_dataset("2d_grey_png", paths.raw, DATASET_ID, num_cases=4)
    location = locate_dataset(DATASET_ID, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    plans["configurations"][LATENT] = {"inherits_from": "2d", "crop_to_nonzero": False, "trainable": False,
                                       "autoencoder": dict(AE_BLOCK), "max_decode_voxels": 4096}
    plans["configurations"]["tiny_latent_windows"] = {"inherits_from": LATENT, "max_decode_voxels": 256}
    save_json(plans, location.plans_file("nnDiffPlans"))
    lo, hi = _window(plans)
    rng = np.random.default_rng(0)
    test_dir = root / "heldout"
    for i in range(2):  # values strictly inside the dataset window, so nothing is clipped
        image = rng.integers(int(lo) + 10, int(hi) - 10, size=TEST_SHAPE).astype(np.uint8)
        write_image(image[None, None], properties_2d(shape=TEST_SHAPE), test_dir / f"held_{i}_0000.png")
    return paths, plans, test_dir


def _results(paths: Paths) -> Path:
    return paths.results / locate_dataset(DATASET_ID, paths).raw_dir.name


def _window(plans: dict) -> tuple[float, float]:
    params = plans["normalization"]["images"][0]["params"]  # dataset_percentile of the grey PNG example
    return float(params["clip_low"]), float(params["clip_high"])


def _write_stage(paths: Paths, plans: dict, configuration: str, fold: int, seed: int = 0) -> tuple[Path, nn.Module]:
    """A finished autoencoder stage in the layout AutoencoderTrainer writes (random weights)."""
    torch.manual_seed(seed)
    block = resolve_configuration(plans, configuration)["autoencoder"]
    ae = build_autoencoder(network_block(block), 1, 2).eval()
    ae.set_scale_factor(0.5)
    weights = {k: v.clone() for k, v in ae.state_dict().items()}
    digest = weights_sha256(weights)
    fold_dir = _results(paths) / f"AutoencoderTrainer__nnDiffPlans__{configuration}" / f"fold_{fold}"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "ema_weights": weights, "network_weights": weights,
                     "latent_scale_factor": 0.5, "weights_sha256": digest}, fold_dir / FINAL)
    save_json({"checkpoint": FINAL, "weights": "ema_weights", "weights_sha256": digest, "latent_scale_factor": 0.5,
               "checkpoints": {FINAL: {"latent_scale_factor": 0.5, "weights_sha256": digest, "iteration": 4}},
               "in_channels": 1, "spatial_dims": 2, "autoencoder": dict(block), "configuration": configuration,
               "plans_hash": plans_hash(plans, resolve_configuration(plans, configuration)), "fold": str(fold)},
              fold_dir / "autoencoder.json")
    return fold_dir, ae


def _cli(paths: Paths, *args: str) -> int:
    return evaluate_autoencoder_entry([*args, "--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed),
                                       "--results", str(paths.results), "-device", "cpu", "-q"])


def _raw_images(test_dir: Path) -> dict[str, np.ndarray]:
    return {p.name[:-len("_0000.png")]: read_images([p])[0][0, 0].astype(np.float64)
            for p in sorted(test_dir.glob("*.png"))}


def test_exact_and_scaled_autoencoders_give_the_hand_computed_numbers(planned, tmp_path, monkeypatch, capsys):
    paths, plans, test_dir = planned
    _write_stage(paths, plans, LATENT, 0)
    fake = SpaceToDepth([4, 4])
    monkeypatch.setattr(autoencoder_module, "load_trained_autoencoder", lambda *a, **k: (fake, {}))

    assert _cli(paths, "-d", str(DATASET_ID), "-c", LATENT, "-f", "0", "-i", str(test_dir),
                "-o", str(tmp_path / "exact.json")) == 0
    exact = load_json(tmp_path / "exact.json")
    assert "inf" in capsys.readouterr().out  # the table shows the infinite PSNR
    assert exact["num_cases"] == exact["num_exact_cases"] == 2
    for case in exact["per_case"].values():
        assert case["exact"] is True and case["mse"] == 0.0 and case["psnr"] is None  # infinite → null
        assert case["ssim"] == pytest.approx(1.0, abs=1e-12)
        assert case["shape"] == [1, *TEST_SHAPE] and case["padded_shape"] == [32, 32]
        assert case["latent_shape"] == [8, 8] and case["sliding_window"] is False
        assert case["encode_decode_seconds"] > 0
    assert exact["mean"]["ssim"] == pytest.approx(1.0, abs=1e-12) and exact["mean"]["psnr"] is None

    # decode(encode(x)) = 0.9 x in normalised units: error in original units = 0.1 (raw - window centre)
    fake.gain = 0.9
    assert _cli(paths, "-d", str(DATASET_ID), "-c", LATENT, "-f", "0", "-i", str(test_dir),
                "-o", str(tmp_path / "scaled.json")) == 0
    scaled = load_json(tmp_path / "scaled.json")
    lo, hi = _window(plans)
    expected_psnr = []
    for name, raw in _raw_images(test_dir).items():
        data_range = raw.max() - raw.min()
        error = 0.1 * (raw - (lo + hi) / 2)
        expected = 10 * math.log10(data_range**2 / np.mean(error**2))
        case = scaled["per_case"][name]
        assert case["data_range"] == [pytest.approx(data_range, rel=1e-6)]
        assert case["psnr"] == pytest.approx(expected, rel=1e-5) and case["exact"] is False
        assert 0 < case["ssim"] < 1
        expected_psnr.append(expected)
    assert scaled["mean"]["psnr"] == pytest.approx(np.mean(expected_psnr), rel=1e-5)


def test_trained_stage_matches_encoding_by_hand_and_sliding_windows(planned):
    """Real loader and AutoencoderKL; expected numbers from normalising, padding, encoding and decoding
    the raw PNGs by hand, PSNR with numpy and SSIM with scikit-image."""
    from skimage.metrics import structural_similarity

    paths, plans, test_dir = planned
    fold_dir, ae = _write_stage(paths, plans, LATENT, 0, seed=3)
    summary = evaluate_autoencoder(DATASET_ID, LATENT, 0, paths, input_dir=test_dir, device="cpu")
    assert load_json(fold_dir / AUTOENCODER_EVALUATION) == summary  # default: inside the fold folder
    assert summary["weights_sha256"] == load_json(fold_dir / "autoencoder.json")["weights_sha256"]
    assert summary["plans_hash_matches"] is True and summary["settings"]["max_decode_voxels"] == 4096
    lo, hi = _window(plans)
    for name, raw in _raw_images(test_dir).items():
        x = np.full((32, 32), -1.0 + 2 * (raw.min() - lo) / (hi - lo))  # end padding with the minimum
        x[:TEST_SHAPE[0], :TEST_SHAPE[1]] = 2 * (raw - lo) / (hi - lo) - 1
        with torch.no_grad():
            mean, _ = ae.encode(torch.from_numpy(x.astype(np.float32))[None, None])
            y = ae.decode(mean)[0, 0, :TEST_SHAPE[0], :TEST_SHAPE[1]].double().numpy()
        recon = lo + (np.clip(y, -1, 1) + 1) * (hi - lo) / 2
        data_range = raw.max() - raw.min()
        case = summary["per_case"][name]
        assert case["psnr"] == pytest.approx(10 * math.log10(data_range**2 / np.mean((recon - raw) ** 2)), abs=1e-3)
        oracle = structural_similarity(recon, raw, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False)
        assert case["ssim"] == pytest.approx(oracle, abs=1e-4)
        assert case["sliding_window"] is False

    # above max_decode_voxels (256 < 32²): sliding-window encode and decode, same numbers within 0.05 dB
    _write_stage(paths, plans, "tiny_latent_windows", 0, seed=3)
    windows = evaluate_autoencoder(DATASET_ID, "tiny_latent_windows", 0, paths, input_dir=test_dir, device="cpu")
    for name, case in windows["per_case"].items():
        assert case["sliding_window"] is True
        assert case["psnr"] == pytest.approx(summary["per_case"][name]["psnr"], abs=0.05)


def test_2d_configuration_of_3d_data_goes_slice_by_slice_and_3d_pads_every_axis():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(1, 5, 12, 10)).astype(np.float32)
    config2d = {"spatial_dims": 2, "max_decode_voxels": 2 * 144,  # two padded 12×12 slices per batch
                "autoencoder": {"downsampling_factors": [4, 4], "patch_size": [16, 16], "batch_size": 1}}
    fake = SpaceToDepth([4, 4])
    recon, info = reconstruct_case(fake, data, config2d)
    np.testing.assert_array_equal(recon, data)
    assert fake.decoded == [2, 2, 1] and info["padded_shape"] == [12, 12] and info["latent_shape"] == [3, 3]
    assert info["sliding_window"] is False

    config3d = {"spatial_dims": 3, "max_decode_voxels": 10**6,
                "autoencoder": {"downsampling_factors": [2, 4, 4], "patch_size": [4, 16, 16], "batch_size": 1}}
    fake3d = SpaceToDepth([2, 4, 4], gain=0.5)
    recon3d, info3d = reconstruct_case(fake3d, data, config3d)
    np.testing.assert_allclose(recon3d, 0.5 * data, rtol=1e-6)
    assert fake3d.decoded == [1] and info3d["padded_shape"] == [6, 12, 12] and info3d["latent_shape"] == [3, 3, 3]

    # SSIM per slice for 2D (mean over slices) vs one 3D SSIM; PSNR from the reference's range
    reference = rng.uniform(0, 100, size=(1, 3, 16, 16))
    noisy = reference + rng.normal(0, 5, size=reference.shape)
    from nndiff.evaluation.image_quality import ssim as ssim_metric

    per_slice = reconstruction_metrics(noisy, reference, 2)
    assert per_slice["ssim"] == pytest.approx(np.mean([ssim_metric(noisy[:, z:z + 1], reference[:, z:z + 1],
                                                                   float(np.ptp(reference))) for z in range(3)]))
    volume = reconstruction_metrics(noisy, reference, 3)
    assert volume["ssim_window"] == 3  # 11 taps shrunk to the 3-slice axis
    assert volume["psnr"] == per_slice["psnr"] == pytest.approx(
        10 * math.log10(np.ptp(reference) ** 2 / np.mean((noisy - reference) ** 2)))


def test_clear_errors(planned, tmp_path, capsys):
    paths, plans, test_dir = planned
    _write_stage(paths, plans, LATENT, 0)
    base = ["-d", str(DATASET_ID), "-i", str(test_dir)]

    def error(*args: str) -> str:
        assert _cli(paths, *base, *args) == 2
        return capsys.readouterr().err

    message = error("-c", "2d", "-f", "0")
    assert "not a latent configuration" in message and LATENT in message and "Fix: pass a latent" in message
    message = error("-c", LATENT, "-f", "3")
    assert "fold_3" in message and "not been trained" in message and "-tr AutoencoderTrainer" in message
    unfinished = _results(paths) / f"AutoencoderTrainer__nnDiffPlans__{LATENT}" / "fold_4"
    unfinished.mkdir()
    message = error("-c", LATENT, "-f", "4")
    assert str(unfinished / "autoencoder.json") in message and "--continue" in message
    (tmp_path / "empty").mkdir()
    message = error("-c", LATENT, "-f", "0", "-i", str(tmp_path / "empty"))  # the later -i wins
    assert str(tmp_path / "empty") in message and "holds no" in message and "Fix:" in message
    # without -i: the raw dataset's imagesTs, which this example does not have
    assert evaluate_autoencoder_entry(["-d", str(DATASET_ID), "-c", LATENT, "-f", "0", "--raw", str(paths.raw),
                                       "--results", str(paths.results), "--preprocessed", str(paths.preprocessed),
                                       "-device", "cpu"]) == 2
    message = capsys.readouterr().err
    assert "imagesTs" in message and "-i" in message
    with pytest.raises(NnDiffError, match="no configuration 'nope'"):
        evaluate_autoencoder(DATASET_ID, "nope", 0, paths, input_dir=test_dir, device="cpu")
