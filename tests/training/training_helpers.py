"""Tiny synthetic preprocessed datasets, plans and a tiny trainer for the Trainer-base tests.

Nothing here depends on the planning, preprocessing, network or diffusion modules.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nndiff.training import Trainer, per_sample

DATASET = "Dataset901_Tiny"
PLANS_NAME = "nnDiffPlans"


def write_case(folder: Path, name: str, data: np.ndarray, seg: np.ndarray | None = None,
               target: np.ndarray | None = None, metadata: dict | None = None) -> None:
    """Write CASE.npz (+ CASE.json) in the preprocessed layout."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"data": data.astype(np.float32)}
    if seg is not None:
        arrays["seg"] = seg.astype(np.int16)
    if target is not None:
        arrays["target"] = target.astype(np.float32)
    np.savez_compressed(folder / f"{name}.npz", **arrays)
    case_json: dict[str, Any] = {"shape_after_crop": list(data.shape[1:])}
    if metadata is not None:
        case_json["metadata"] = metadata
    (folder / f"{name}.json").write_text(json.dumps(case_json))


def make_dataset(root: Path, num_cases: int = 8, shape=(4, 12, 12), channels: int = 1, seed: int = 0,
                 identifier: str = f"{PLANS_NAME}_2d", with_seg: bool = False) -> Path:
    """preprocessed/Dataset901_Tiny with ``num_cases`` cases; two cases per subject (metadata.json)."""
    rng = np.random.default_rng(seed)
    dataset_dir = root / DATASET
    folder = dataset_dir / identifier
    for i in range(num_cases):
        data = rng.uniform(-1, 1, size=(channels, *shape)).astype(np.float32)
        seg = (data[:1] > 0).astype(np.int16) if with_seg else None
        write_case(folder, f"case_{i:02d}", data, seg=seg)
    metadata = {f"case_{i:02d}": {"subject": f"s{i // 2}"} for i in range(num_cases)}
    (dataset_dir / "metadata.json").write_text(json.dumps(metadata))
    return dataset_dir


def make_plans(spatial_dims: int = 2, patch_size=(8, 8), batch_size: int = 2, **training: Any) -> dict:
    block = {"num_iterations_per_epoch": 3, "num_epochs": 3, "initial_lr": 1e-2, "warmup_iterations": 2,
             "ema_decay": 0.9, "num_val_cases": 3, "augmentation": "none", "progress_every_epochs": 100}
    block.update(training)
    name = "2d" if spatial_dims == 2 else "3d_fullres"
    return {
        "dataset_name": DATASET,
        "plans_name": PLANS_NAME,
        "normalization": {"images": [{"channel": 0, "scheme": "none"}]},
        "configurations": {
            name: {"data_identifier": f"{PLANS_NAME}_2d", "spatial_dims": spatial_dims,
                   "patch_size": list(patch_size), "batch_size": batch_size, "training": block,
                   "reasons": {"patch_size": "tiny test"}},
        },
    }


def with_training(plans: dict, **training: Any) -> dict:
    out = copy.deepcopy(plans)
    for configuration in out["configurations"].values():
        configuration["training"].update(training)
    return out


class TinyTrainer(Trainer):
    """A 2-layer conv denoiser (dropout included, so the global torch RNG matters on resume).

    ``nan_at_iteration``: make the loss NaN at that (1-based) iteration.
    """

    nan_at_iteration: int | None = None

    def build_network(self) -> nn.Module:
        conv = nn.Conv2d if self.spec.spatial_dims == 2 else nn.Conv3d
        return nn.Sequential(conv(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Dropout(0.2),
                             conv(4, 1, 3, padding=1))

    def compute_loss(self, network, batch, *, train, generators=None):
        x = batch["data"]
        n = x.shape[0]
        noise = per_sample(lambda k, g: torch.randn((k, *x.shape[1:]), generator=g, device=x.device),
                           generators, n)
        sigma = per_sample(lambda k, g: torch.rand((k,), generator=g, device=x.device), generators, n)
        sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
        loss = ((network(x + sigma * noise) - x) ** 2).mean()
        if train and self.nan_at_iteration is not None and self.iteration + 1 == self.nan_at_iteration:
            loss = loss * float("nan")
        return loss, {"sigma": sigma.mean()}


def make_trainer(cls: type, plans: dict, dataset_dir: Path, out: Path, fold: int | str = 0, **kwargs: Any):
    configuration = next(iter(plans["configurations"]))
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("seed", 7)
    return cls(plans, configuration, fold, dataset_dir, output_dir=out, **kwargs)
