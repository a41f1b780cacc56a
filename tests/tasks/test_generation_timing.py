"""prediction_timing.json: time per sample, sampler and steps, device and (CUDA) peak memory of every
generation run, pixel and latent, through the Python API and nndiff_predict. Untrained tiny networks:
what is under test is the record, not the samples."""
from __future__ import annotations

import logging

import pytest
import torch

from nndiff.dataset.examples import make_example_dataset
from nndiff.inference.cli import predict_entry
from nndiff.networks.autoencoder import build_autoencoder, weights_sha256
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step
from nndiff.planning import configurations, resolve_configuration
from nndiff.tasks import generation_predictor
from nndiff.tasks.generation_predictor import PREDICTION_TIMING, GenerationPredictor, peak_memory_gib
from nndiff.tasks.latent import AutoencoderRecord, network_block
from nndiff.tasks.latent_predictor import LatentGenerationPredictor
from nndiff.training.checkpoint import CHECKPOINT_FORMAT, plans_hash, save_checkpoint
from nndiff.utils.files import load_json, save_json

DATASET_ID = 872
NETWORK = {"model_channels": 8, "channel_mult": [1, 2], "strides": [[2, 2]], "num_res_blocks": 1,
           "attention_levels": [], "num_head_channels": 8, "norm_groups": 4}
PIXEL = {"inherits_from": "2d", "network": NETWORK, "patch_size": [16, 16], "batch_size": 2,
         "diffusion": {"num_sampling_steps": 3}}
LATENT = {"inherits_from": "2d_latent", "network": NETWORK, "patch_size": [8, 8], "batch_size": 2,
          "diffusion": {"num_sampling_steps": 2},
          "autoencoder": {"downsampling_factors": [4, 4], "channel_multipliers": [1, 2, 2], "base_channels": 8,
                          "num_res_blocks": 1, "norm_groups": 4, "patch_size": [32, 32], "batch_size": 2}}


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[Paths, dict, dict]:
    """Grey PNG example planned with the latent rule forced, plus a tiny pixel and a tiny latent configuration."""
    root = tmp_path_factory.mktemp("timing")
    paths = Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")
    make_example_dataset("2d_grey_png", paths.raw, DATASET_ID, num_cases=4)
    location = locate_dataset(DATASET_ID, paths)
    extract_fingerprint_step(location)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configurations, "LATENT_LARGE_IMAGE_VOXELS", {2: 1, 3: 1})
        plans = plan_step(location)
    plans["configurations"]["tiny"] = PIXEL
    plans["configurations"]["tiny_latent"] = LATENT
    save_json(plans, location.plans_file("nnDiffPlans"))
    return paths, plans, load_json(location.raw_dir / "dataset.json")


def _pixel(plans: dict, dataset_json: dict, **kwargs) -> GenerationPredictor:
    torch.manual_seed(0)
    network = GenerationPredictor.build_network(resolve_configuration(plans, "tiny")).eval()
    return GenerationPredictor(plans, "tiny", dataset_json, [network], device="cpu", **kwargs)


def test_pixel_generation_writes_the_timing_file_and_logs_seconds_per_sample(planned, tmp_path, caplog):
    _, plans, dataset_json = planned
    predictor = _pixel(plans, dataset_json)
    with caplog.at_level(logging.INFO, logger="nndiff.tasks.generation_predictor"):
        written = predictor.generate_to_folder(tmp_path, 3, seed=0)
    timing = load_json(tmp_path / PREDICTION_TIMING)
    assert timing["predictor"] == "GenerationPredictor" and timing["configuration"] == "tiny"
    assert timing["num_samples"] == 3 and timing["shape"] == [16, 16] and timing["batch_size"] == 2
    assert timing["latent"] is False and timing["latent_shape"] is None
    assert timing["sampler"] == predictor.diffusion.sampler.value and timing["num_steps"] == 3
    assert timing["device"] == "cpu" and timing["device_name"] is None and timing["autocast"] == "fp32"
    assert timing["peak_memory_reserved_gib"] is None and timing["peak_memory_allocated_gib"] is None
    assert 0 < timing["generate_seconds"] <= timing["total_seconds"]
    assert timing["seconds_per_sample"] == pytest.approx(timing["total_seconds"] / 3)
    assert timing["generate_seconds_per_sample"] == pytest.approx(timing["generate_seconds"] / 3)
    assert timing["folds"] == ["0"] and set(timing["definitions"]) >= {"total_seconds", "peak_memory_reserved_gib"}
    lines = [r.getMessage() for r in caplog.records if "s per sample" in r.getMessage()]
    assert len(lines) == 1 and f"{timing['seconds_per_sample']:.3f} s per sample" in lines[0]
    # atomic writes leave only the samples and the two records
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in written] + ["prediction_info.json", PREDICTION_TIMING])


def test_sampler_and_step_overrides_are_recorded(planned, tmp_path):
    _, plans, dataset_json = planned
    _pixel(plans, dataset_json, sampler="ddim", num_steps=2).generate_to_folder(tmp_path, 1, shape=[8, 8])
    timing = load_json(tmp_path / PREDICTION_TIMING)
    assert (timing["sampler"], timing["num_steps"], timing["shape"], timing["num_samples"]) == ("ddim", 2, [8, 8], 1)


def test_latent_generation_records_pixel_and_latent_shapes_and_decoding_time(planned, tmp_path, monkeypatch):
    _, plans, dataset_json = planned
    config = resolve_configuration(plans, "tiny_latent")
    torch.manual_seed(0)
    network = LatentGenerationPredictor.build_network(config).eval()
    predictor = LatentGenerationPredictor(plans, "tiny_latent", dataset_json, [network], device="cpu")
    block = config["autoencoder"]
    ae = build_autoencoder(network_block(block), 1, 2).eval()
    predictor.autoencoders = [ae]
    predictor.records = [AutoencoderRecord(tmp_path, weights_sha256(ae.state_dict()), 1.0)]
    # the decoder's time belongs to generate_seconds: a slow decoder shows up there
    import time as time_module

    original = ae.decode
    monkeypatch.setattr(ae, "decode", lambda z: (time_module.sleep(0.2), original(z))[1])
    predictor.generate_to_folder(tmp_path / "out", 2, seed=0)
    timing = load_json(tmp_path / "out" / PREDICTION_TIMING)
    assert timing["predictor"] == "LatentGenerationPredictor" and timing["latent"] is True
    assert timing["shape"] == [32, 32] and timing["latent_shape"] == [8, 8] and timing["num_steps"] == 2
    assert timing["generate_seconds"] >= 0.2 and timing["total_seconds"] >= timing["generate_seconds"]


def test_cuda_peak_memory_is_read_in_gib(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 2**29)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(device))
    cuda = torch.device("cuda", 0)
    assert peak_memory_gib(cuda) == {"peak_memory_reserved_gib": 3.0, "peak_memory_allocated_gib": 0.5}
    generation_predictor.reset_peak_memory(cuda)
    generation_predictor.reset_peak_memory(torch.device("cpu"))
    assert calls == [cuda]
    assert peak_memory_gib(torch.device("cpu")) == {"peak_memory_reserved_gib": None,
                                                     "peak_memory_allocated_gib": None}


def test_nndiff_predict_writes_the_timing_file(planned, tmp_path, capsys):
    """A model folder with a hand-written checkpoint (untrained weights) is enough for nndiff_predict."""
    paths, plans, _ = planned
    results = paths.results / locate_dataset(DATASET_ID, paths).raw_dir.name
    network = GenerationPredictor.build_network(resolve_configuration(plans, "tiny"))
    weights = network.state_dict()
    save_checkpoint({"format": CHECKPOINT_FORMAT, "trainer_class": "GenerationTrainer", "iteration": 0,
                     "plans_hash": plans_hash(plans, resolve_configuration(plans, "tiny")),
                     "ema_weights": weights, "network_weights": weights, "extra": {}},
                    results / "GenerationTrainer__nnDiffPlans__tiny" / "fold_0" / "checkpoint_final.pth")
    out = tmp_path / "samples"
    assert predict_entry(["-o", str(out), "-d", str(DATASET_ID), "-c", "tiny", "--num_samples", "2", "--steps", "1",
                          "-device", "cpu", "--preprocessed", str(paths.preprocessed),
                          "--results", str(paths.results)]) == 0
    timing = load_json(out / PREDICTION_TIMING)
    assert timing["num_samples"] == 2 and timing["num_steps"] == 1 and timing["device"] == "cpu"
    assert f"{timing['seconds_per_sample']:.3f} s per sample" in capsys.readouterr().err
