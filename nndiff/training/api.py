"""Python API behind ``nndiff_train``: find the preprocessed dataset and plans, run one fold.

Works from the preprocessed root alone (no raw data, no SimpleITK), so a GPU machine only needs
``preprocessed/DatasetXXX_Name`` and the results root.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from nndiff.errors import NnDiffError
from nndiff.paths import Paths
from nndiff.training.registry import get_trainer_class
from nndiff.training.splits import parse_fold
from nndiff.training.trainer import DEFAULT_SEED, Trainer
from nndiff.utils.files import load_json

DEFAULT_PLANS = "nnDiffPlans"


def find_preprocessed_dataset(preprocessed_root: Path, dataset: str | int) -> Path:
    """``preprocessed_root/DatasetXXX_Name`` for ``4``, ``Dataset004`` or ``Dataset004_Name``."""
    text = str(dataset).strip()
    match = re.fullmatch(r"(?:Dataset)?(\d+)(?:_.*)?", text)
    if match is None:
        raise NnDiffError(f"dataset {dataset!r} is not an id (4), 'Dataset004' or 'Dataset004_Name'")
    if "_" in text and (preprocessed_root / text).is_dir():
        return preprocessed_root / text
    prefix = f"Dataset{int(match.group(1)):03d}_"
    found = sorted(p for p in preprocessed_root.glob(f"{prefix}*") if p.is_dir()) if preprocessed_root.is_dir() else []
    if not found:
        raise NnDiffError(f"no preprocessed dataset {prefix}* in {preprocessed_root}. "
                          f"Fix: run nndiff_plan_and_preprocess -d {int(match.group(1))} first")
    if len(found) > 1:
        raise NnDiffError(f"several preprocessed datasets match {dataset!r}: {', '.join(p.name for p in found)}. "
                          "Fix: give the full folder name")
    return found[0]


def load_plans(preprocessed_dataset_dir: Path, plans_name: str = DEFAULT_PLANS) -> dict:
    path = preprocessed_dataset_dir / f"{plans_name}.json"
    if not path.is_file():
        raise NnDiffError(f"plans file {path} not found. Fix: run nndiff_plan_experiment (or check -p PLANS)")
    return load_json(path)


def raw_metadata(paths: Paths, dataset_name: str) -> dict | None:
    """The raw dataset's ``metadata.json`` (case -> {key: value}) when the raw root is set and has it.

    Optional: training from preprocessed data alone reads the copies in the preprocessed folder.
    """
    if paths.raw is None:
        return None
    path = paths.raw / dataset_name / "metadata.json"
    return load_json(path) if path.is_file() else None


def train_fold(dataset: str | int, configuration: str, fold: int | str, paths: Paths, *,
               trainer: str | type[Trainer], plans_name: str = DEFAULT_PLANS, epochs: int | None = None,
               iterations: int | None = None, continue_training: bool = False, device: str = "auto",
               num_workers: int | None = None, seed: int = DEFAULT_SEED,
               stop_after_iterations: int | None = None, time_limit_s: float | None = None,
               command: Sequence[str] | None = None) -> Trainer:
    """Train one fold into ``results/DatasetXXX_Name/<Trainer>__<Plans>__<config>/fold_N`` and
    return the trainer (its ``output_dir`` holds the checkpoints). ``command``: the command line
    that started the run, recorded in ``debug.json`` (model export puts it in the manifest)."""
    preprocessed_dir = find_preprocessed_dataset(paths.require("preprocessed"), dataset)
    plans = load_plans(preprocessed_dir, plans_name)
    trainer_class = get_trainer_class(trainer) if isinstance(trainer, str) else trainer
    instance = trainer_class(plans, configuration, parse_fold(fold), preprocessed_dir, paths.require("results"),
                             device=device, epochs=epochs, iterations=iterations, seed=seed,
                             num_workers=num_workers, metadata=raw_metadata(paths, preprocessed_dir.name))
    instance.command = list(command) if command is not None else None
    instance.run_training(continue_training=continue_training, stop_after_iterations=stop_after_iterations,
                          time_limit_s=time_limit_s)
    return instance
