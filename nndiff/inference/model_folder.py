"""Find and load what a trained model folder holds: plans, dataset.json and one network per fold.

A model folder is the trainer's ``results/DatasetXXX_Name/<Trainer>__<Plans>__<config>/`` (the
parent of the ``fold_N`` folders, as in nnU-Net). The trainer writes only checkpoints, logs,
``progress.png`` and ``debug.json`` there; the plans and ``dataset.json`` stay in the preprocessed
dataset folder. They are looked up in this order (first hit wins):

1. the ``preprocessed_dir`` argument (``preprocessed/DatasetXXX_Name``);
2. copies inside the model folder (``<Plans>.json`` / ``plans.json`` and ``dataset.json``), for a
   model folder that was shipped on its own;
3. ``<preprocessed root>/DatasetXXX_Name`` with the root from ``nnDiff_preprocessed``;
4. the ``data_folder`` recorded in a fold's ``debug.json`` (its parent is the dataset folder).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from nndiff.errors import NnDiffError
from nndiff.paths import resolve_paths
from nndiff.planning import resolve_configuration
from nndiff.training.checkpoint import load_checkpoint, plans_hash
from nndiff.utils.files import load_json

logger = logging.getLogger(__name__)

FOLD_PREFIX = "fold_"
DATASET_JSON = "dataset.json"


@dataclass(frozen=True)
class ModelFolderName:
    """The parts of ``<Trainer>__<Plans>__<config>``."""

    trainer: str
    plans_name: str
    configuration: str


def parse_model_folder_name(model_dir: Path) -> ModelFolderName:
    """Split the folder name into trainer, plans and configuration (refused when malformed)."""
    parts = Path(model_dir).name.split("__")
    if len(parts) != 3 or not all(parts):
        raise NnDiffError(f"{model_dir} is not a model folder: its name must be <Trainer>__<Plans>__<configuration>. "
                          "Fix: pass results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration> (the parent "
                          "of the fold_N folders)")
    return ModelFolderName(*parts)


def fold_dirs(model_dir: Path, folds: Sequence[int | str] | str) -> list[Path]:
    """``fold_N`` folders for ``folds`` (``"all"`` alone means the folder ``fold_all``; the
    tuple ``("*",)`` is not supported: name folds explicitly)."""
    model_dir = Path(model_dir)
    names = [str(folds)] if isinstance(folds, (str, int)) else [str(f) for f in folds]
    if not names:
        raise NnDiffError("no folds given. Fix: pass folds=(0,) or folds='all'")
    out = []
    for name in names:
        path = model_dir / f"{FOLD_PREFIX}{name}"
        if not path.is_dir():
            present = sorted(p.name for p in model_dir.glob(f"{FOLD_PREFIX}*") if p.is_dir())
            raise NnDiffError(f"{path} does not exist (present: {', '.join(present) or 'none'}). "
                              "Fix: train that fold or choose one of the present folds")
        out.append(path)
    return out


def _first_existing(paths: Iterable[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _debug_data_folder(model_dir: Path) -> Path | None:
    for debug in sorted(model_dir.glob(f"{FOLD_PREFIX}*/debug.json")):
        folder = load_json(debug).get("data_folder")
        if folder:
            return Path(folder).parent
    return None


def locate_plans_and_dataset_json(model_dir: Path, plans_name: str,
                                  preprocessed_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Paths of the plans JSON and ``dataset.json`` for ``model_dir`` (order in the module doc)."""
    model_dir = Path(model_dir)
    candidates: list[Path] = []
    if preprocessed_dir is not None:
        candidates.append(Path(preprocessed_dir))
    candidates.append(model_dir)
    root = resolve_paths().preprocessed
    if root is not None:
        candidates.append(root / model_dir.parent.name)
    from_debug = _debug_data_folder(model_dir)
    if from_debug is not None:
        candidates.append(from_debug)
    for folder in candidates:
        plans_file = _first_existing([folder / f"{plans_name}.json", folder / "plans.json"])
        dataset_json = folder / DATASET_JSON
        if plans_file is not None and dataset_json.is_file():
            return plans_file, dataset_json
        if preprocessed_dir is not None and folder == Path(preprocessed_dir):
            raise NnDiffError(f"{folder} holds no {plans_name}.json and dataset.json. Fix: pass the "
                              "preprocessed dataset folder the model was trained from")
    raise NnDiffError(
        f"cannot find {plans_name}.json and dataset.json for {model_dir} (looked in: "
        f"{', '.join(str(c) for c in candidates)}). Fix: set nnDiff_preprocessed (or pass "
        "preprocessed_dir) to the preprocessed root the model was trained from")


def checked_weights(path: Path, plans: dict, configuration: str, use_ema: bool,
                    map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint, refuse it when its plans hash differs from ``plans``; return
    ``(state_dict, checkpoint)`` with the EMA weights when ``use_ema`` (else the raw weights)."""
    state = load_checkpoint(path, map_location=map_location)
    expected = plans_hash(plans, resolve_configuration(plans, configuration))
    found = state.get("plans_hash")
    if found != expected:
        raise NnDiffError(
            f"checkpoint {path} was trained with other plans (plans hash {str(found)[:12]}... in the checkpoint, "
            f"{expected[:12]}... for the plans found now). Fix: restore the plans the model was trained with "
            "(nnDiffPlans.json of its preprocessed folder), or retrain with the current plans")
    key = "ema_weights" if use_ema else "network_weights"
    weights = state.get(key)
    if not isinstance(weights, dict):
        raise NnDiffError(f"checkpoint {path} has no {key}. Fix: use another checkpoint or use_ema="
                          f"{not use_ema}")
    return weights, state


def load_network(build: Any, weights: dict[str, torch.Tensor], path: Path, device: torch.device) -> nn.Module:
    """Build a network with ``build()`` and load ``weights`` strictly (a mismatch is a clear error)."""
    network = build()
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise NnDiffError(f"the weights in {path} do not fit the network the plans describe: "
                          f"{str(err).splitlines()[0]}. Fix: use the plans the model was trained with") from None
    return network.to(device).eval()


def model_folder_path(results_root: str | Path, dataset: str | int, trainer: str, configuration: str,
                      plans_name: str = "nnDiffPlans") -> Path:
    """``results_root/DatasetXXX_Name/<trainer>__<plans_name>__<configuration>`` for a dataset id
    (``4``, ``Dataset004`` or the full name), as ``nndiff_predict -d -tr -p -c`` names it."""
    from nndiff.training.api import find_preprocessed_dataset

    dataset_dir = find_preprocessed_dataset(Path(results_root), dataset)  # same DatasetXXX_ lookup
    path = dataset_dir / f"{trainer}__{plans_name}__{configuration}"
    if not path.is_dir():
        present = sorted(p.name for p in dataset_dir.iterdir() if p.is_dir() and "__" in p.name)
        raise NnDiffError(f"no trained model {path} (present: {', '.join(present) or 'none'}). "
                          "Fix: train it first, or pick -tr/-p/-c of a present model")
    return path
