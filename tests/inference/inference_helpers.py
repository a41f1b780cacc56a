"""Shared fixtures for the Predictor-base tests: a planned and preprocessed example CT dataset
(rotated direction, non-zero origin, HU), hand-made checkpoints in the trainer's format, and
dummy family predictors whose "sampling" is a fixed function of the input plus seeded noise."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import torch

from nndiff.dataset.examples import make_example_dataset
from nndiff.inference import Predictor, register_predictor
from nndiff.networks import build_network
from nndiff.planning import resolve_configuration
from nndiff.run.plan_and_preprocess import plan_and_preprocess_entry
from nndiff.training.checkpoint import CHECKPOINT_FORMAT, FINAL, plans_hash, save_checkpoint
from nndiff.utils.files import load_json, save_json

DATASET_ID = 3
TRAINER = "GenerationTrainer"
PLANS = "nnDiffPlans"
#: A small network so checkpoints are tiny and load fast (the block only has to be valid).
TINY_NETWORK = {"model_channels": 8, "norm_groups": 4, "num_head_channels": 8, "num_res_blocks": 1}


def make_planned_ct(root: Path) -> tuple[Path, Path, dict]:
    """raw + preprocessed example CT dataset; returns (raw dataset dir, preprocessed dir, plans)."""
    raw = make_example_dataset("3d_ct", root / "raw", DATASET_ID, seed=DATASET_ID)
    code = plan_and_preprocess_entry(["-d", str(DATASET_ID), "--raw", str(root / "raw"),
                                      "--preprocessed", str(root / "pre")])
    assert code == 0
    pre = root / "pre" / raw.name
    plans = load_json(pre / f"{PLANS}.json")
    for configuration in plans["configurations"].values():
        configuration["network"].update(TINY_NETWORK)
    save_json(plans, pre / f"{PLANS}.json")
    return raw, pre, plans


def write_checkpoint(model_dir: Path, plans: dict, configuration: str, fold: int | str = 0,
                     network_seed: int = 1, ema_seed: int = 2, hash_plans: dict | None = None) -> Path:
    """``model_dir/fold_N/checkpoint_final.pth`` with the keys the Trainer writes (raw and EMA
    weights from different seeds so the choice between them is visible)."""
    resolved = resolve_configuration(plans, configuration)
    hashed = hash_plans if hash_plans is not None else plans
    state = {
        "format": CHECKPOINT_FORMAT, "nndiff_version": "test", "trainer_class": TRAINER,
        "plans_hash": plans_hash(hashed, resolve_configuration(hashed, configuration)),
        "plans_name": PLANS, "configuration": configuration, "fold": str(fold), "iteration": 1,
        "epoch": 0, "total_iterations": 1,
        "network_weights": build_network(resolved["network"], seed=network_seed).state_dict(),
        "ema_weights": build_network(resolved["network"], seed=ema_seed).state_dict(),
    }
    path = model_dir / f"fold_{fold}" / FINAL
    save_checkpoint(state, path)
    return path


def model_dir_for(results: Path, dataset_name: str, configuration: str) -> Path:
    return results / dataset_name / f"{TRAINER}__{PLANS}__{configuration}"


def copy_inputs(raw: Path, target: Path, cases: Sequence[str]) -> Path:
    """Copy some raw cases' image files into an input folder (``{CASE}_{XXXX}{ending}``)."""
    target.mkdir(parents=True, exist_ok=True)
    for case in cases:
        for path in (raw / "imagesTr").glob(f"{case}_*"):
            shutil.copy(path, target / path.name)
    return target


class EchoPredictor(Predictor):
    """Dummy family: the output is the preprocessed input (2D configurations through
    ``map_slices``) plus ``noise_scale`` times Gaussian noise from the case's generator; samples
    are uniform in [-1, 1]."""

    noise_scale: float = 0.0

    def predict_case(self, data, case, generator):
        noise = torch.randn(data.shape, generator=generator, device=data.device)
        out = self.map_slices(lambda batch: batch * 1.0, data) if self.is_2d else data.clone()
        return out + self.noise_scale * noise

    def generate(self, num_samples, generator, shape):
        channels = len(self.dataset_json["channel_names"])
        return torch.rand((num_samples, channels, *shape), generator=generator, device=self.device) * 2 - 1


#: Trainer name under which the CLI tests register EchoPredictor (no family uses it).
ECHO_TRAINER = "EchoTrainer"
register_predictor(trainers=(ECHO_TRAINER,))(EchoPredictor)
