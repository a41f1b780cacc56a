"""Trainer base: data loading, optimisation, EMA, checkpoints, logging (no diffusion math).

See ``documentation/training.md``. Families subclass :class:`Trainer` and register it with
:func:`register_trainer`.
"""
from nndiff.training.checkpoint import BEST, FINAL, LATEST, load_checkpoint, plans_hash
from nndiff.training.config import TrainingSettings, parse_training_settings, total_iterations
from nndiff.training.progress import image_grid, save_image_grid
from nndiff.training.registry import (ENTRY_POINT_GROUP, TRAINERS, available_trainers, get_trainer_class,
                                      register_trainer)
from nndiff.training.splits import load_or_create_splits, make_grouped_splits
from nndiff.planning import resolve_configuration
from nndiff.training.trainer import Trainer, per_sample

__all__ = [
    "BEST", "ENTRY_POINT_GROUP", "FINAL", "LATEST", "TRAINERS", "Trainer", "TrainingSettings",
    "available_trainers", "get_trainer_class", "image_grid", "load_checkpoint", "load_or_create_splits",
    "make_grouped_splits", "parse_training_settings", "per_sample", "plans_hash", "register_trainer",
    "resolve_configuration", "save_image_grid", "total_iterations",
]
