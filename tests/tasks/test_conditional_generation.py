"""Acceptance (issue 4): class- and metadata-conditioned generation with classifier-free guidance.

A synthetic 16x16 dataset whose classes differ visibly — a bright disc (240) or a dark disc (0) —
on a background whose grey level is a continuous metadata value (``level``, 30..130). A tiny UNet
is trained briefly on CPU through the normal pipeline (fingerprint, plan, preprocess,
``train_fold``), then the :class:`GenerationPredictor` samples each class and two metadata values
from the command line's Python API. Conditional samples must separate by class (disc mean) and
follow the metadata (background mean), with the plan's guidance scale and without guidance.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from nndiff.dataset.examples import properties_2d
from nndiff.dataset.io import read_images, write_image
from nndiff.inference import predictor_class_for
from nndiff.inference.cli import predict_entry
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
from nndiff.training.api import train_fold
from nndiff.utils.files import load_json, save_json

DATASET_ID = 821
SIZE = 16
DISC = {"bright": 240.0, "dark": 0.0}
LEVELS = (30.0, 130.0)
NUM_CASES = 24
#: A small network trained long enough to learn the two conditions (CPU, one thread).
CONFIG = {
    "inherits_from": "2d",
    "batch_size": 16,
    "network": {"model_channels": 16, "channel_mult": [1, 2], "strides": [[2, 2]], "num_res_blocks": 1,
                "attention_levels": [], "num_head_channels": 16, "norm_groups": 8},
    "training": {"num_iterations_per_epoch": 100, "num_epochs": 3, "num_val_cases": 2, "warmup_iterations": 20,
                 "initial_lr": 2e-3, "ema_decay": 0.99, "augmentation": "none", "progress_every_epochs": 100},
    "diffusion": {"num_sampling_steps": 10},
}


def _image(rng: np.random.Generator, tone: str, level: float) -> np.ndarray:
    """16x16 uint8: background ``level``, a centred disc (radius 4-5, jitter 1) of the class' grey value."""
    y, x = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    cy, cx = SIZE / 2 - 0.5 + rng.uniform(-1, 1, size=2)
    disc = (y - cy) ** 2 + (x - cx) ** 2 <= rng.uniform(4.0, 5.0) ** 2
    image = np.full((SIZE, SIZE), level)
    image[disc] = DISC[tone]
    image += rng.normal(0, 3.0, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def make_tone_dataset(raw_root: Path) -> Path:
    """Raw dataset ``Dataset821_Tone``: categorical ``tone`` (bright/dark disc), continuous ``level``."""
    folder = raw_root / f"Dataset{DATASET_ID:03d}_Tone"
    rng = np.random.default_rng(0)
    props = properties_2d(shape=(SIZE, SIZE))
    metadata = {}
    for i in range(NUM_CASES):
        tone, level = ("bright", "dark")[i % 2], float(np.round(rng.uniform(*LEVELS), 1))
        write_image(_image(rng, tone, level)[None, None], props, folder / "imagesTr" / f"case_{i:03d}_0000.png")
        metadata[f"case_{i:03d}"] = {"subject": f"s{i:02d}", "tone": tone, "level": level}
    save_json(metadata, folder / "metadata.json")
    save_json({"name": "Tone", "task": "generation", "channel_names": {"0": "grey"}, "numTraining": NUM_CASES,
               "file_ending": ".png",
               "conditions": {"tone": {"type": "categorical", "values": ["bright", "dark"]},
                              "level": {"type": "continuous"}}}, folder / "dataset.json")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tone")
    paths = Paths(raw=root / "raw", preprocessed=root / "pre", results=root / "results")
    make_tone_dataset(paths.raw)
    location = locate_dataset(DATASET_ID, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    plans["configurations"]["small"] = CONFIG
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=["2d"])
    start = time.perf_counter()
    trainer = train_fold(DATASET_ID, "small", 0, paths, trainer="GenerationTrainer", device="cpu", num_workers=0)
    print(f"training: {time.perf_counter() - start:.1f} s")
    return trainer.output_dir.parent, plans, paths


def _centre_and_border(path: Path) -> tuple[float, float]:
    """Mean of the central 4x4 (inside every disc) and of the 2-pixel border (always background)."""
    image = read_images([path])[0][0, 0].astype(np.float64)
    border = np.ones_like(image, dtype=bool)
    border[2:-2, 2:-2] = False
    return float(image[6:10, 6:10].mean()), float(image[border].mean())


def _generate(model_dir: Path, out: Path, tone: str, level: float, guidance_scale: float | None, n: int = 8):
    predictor = predictor_class_for("GenerationTrainer").from_model_folder(model_dir, device="cpu")
    files = predictor.generate_to_folder(out, n, seed=1, conditions={"tone": tone, "level": level},
                                         guidance_scale=guidance_scale)
    return np.array([_centre_and_border(p) for p in files]), load_json(out / "prediction_info.json")


def test_samples_separate_by_class_and_follow_metadata(trained, tmp_path):
    model_dir, plans, _ = trained
    assert plans["configurations"]["2d"]["diffusion"]["guidance"] == "classifier_free"
    planned_scale = plans["configurations"]["2d"]["diffusion"]["guidance_scale"]
    for scale in (None, 1.0):  # the plan's scale (classifier-free guidance) and no guidance
        stats = {(tone, level): _generate(model_dir, tmp_path / f"{tone}_{level}_{scale}", tone, level, scale)
                 for tone in DISC for level in LEVELS}
        info = stats["bright", LEVELS[0]][1]
        assert info["guidance_scale"] == (planned_scale if scale is None else 1.0)
        assert info["conditions"]["sample_0007"] == {"tone": "bright", "level": LEVELS[0]}
        centre = {key: value[0][:, 0] for key, value in stats.items()}
        border = {key: value[0][:, 1] for key, value in stats.items()}
        bright = np.concatenate([centre["bright", lv] for lv in LEVELS])
        dark = np.concatenate([centre["dark", lv] for lv in LEVELS])
        # Class: every bright-disc sample is brighter in the centre than every dark-disc sample,
        # and the gap between class means is many within-class standard deviations.
        spread = max(bright.std(), dark.std(), 1.0)
        assert bright.min() > dark.max(), (bright, dark)
        assert bright.mean() - dark.mean() > 100 and bright.mean() - dark.mean() > 6 * spread, (bright, dark)
        # Metadata: the background follows ``level`` (30 vs 130) for both classes.
        for tone in DISC:
            low, high = border[tone, LEVELS[0]], border[tone, LEVELS[1]]
            assert high.mean() - low.mean() > 50, (tone, low, high)
            assert high.min() > low.max(), (tone, low, high)


def test_command_line_conditions(trained, tmp_path, capsys):
    """``nndiff_predict`` without -i: --condition for every sample, --guidance_scale, errors exit 2."""
    _, _, paths = trained
    common = ["-d", str(DATASET_ID), "-c", "small", "--num_samples", "2", "-device", "cpu", "--preprocessed",
              str(paths.preprocessed), "--results", str(paths.results), "-q"]
    assert predict_entry(["-o", str(tmp_path / "a"), "--condition", "tone=dark", "--condition", "level=130",
                          "--guidance_scale", "1.5", *common]) == 0
    info = load_json(tmp_path / "a" / "prediction_info.json")
    assert info["guidance_scale"] == 1.5
    assert info["conditions"] == {f"sample_{i:04d}": {"tone": "dark", "level": 130.0} for i in range(2)}
    for path in sorted((tmp_path / "a").glob("sample_*.png")):
        centre, border = _centre_and_border(path)
        assert centre < 60 < 90 < border  # dark disc (0) on a bright background (130)
    assert predict_entry(["-o", str(tmp_path / "b"), "--condition", "tone=grey", "--condition", "level=x",
                          *common]) == 2
    err = capsys.readouterr().err
    assert "tone='grey' is not a value of tone; use one of bright, dark" in err
    assert "level='x' is not a finite number" in err
    assert predict_entry(["-o", str(tmp_path / "c"), "--condition", "tone=dark", *common]) == 2
    assert "missing condition(s) level" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
