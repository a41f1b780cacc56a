"""Predictor registry: which Predictor class serves a model trained by a given trainer.

A family registers its predictor for its trainer names::

    @register_predictor(trainers=("GenerationTrainer",))
    class GenerationPredictor(Predictor): ...

Lookup (:func:`predictor_class_for`) tries the registry, then imports the family modules the
trainer registry lists (``nndiff.training.registry.TRAINER_MODULES``; importing a family module
registers its predictor) and the predictor modules of :data:`PREDICTOR_MODULES` (families whose
predictor lives in its own module), then the entry-point group ``nndiff.predictors`` (name =
trainer name).
"""
from __future__ import annotations

import importlib
from importlib import metadata
from typing import Callable, Sequence, TypeVar

from nndiff.errors import NnDiffError

ENTRY_POINT_GROUP = "nndiff.predictors"
#: Predictor modules outside the trainer modules, imported on a lookup miss (importing registers them).
PREDICTOR_MODULES: tuple[str, ...] = (
    "nndiff.tasks.generation_predictor",
    "nndiff.tasks.translation_predictor",
    "nndiff.tasks.reconstruction_predictor",
    "nndiff.tasks.denoising_predictor",
    "nndiff.tasks.anomaly_predictor",
    "nndiff.tasks.segmentation_predictor",
    "nndiff.tasks.latent_predictor",
    "nndiff.tasks.latent_anomaly_predictor",
)
#: trainer class name -> predictor class.
PREDICTORS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_predictor(*, trainers: Sequence[str]) -> Callable[[T], T]:
    """Class decorator registering a Predictor subclass for models of ``trainers``.

    Registering another class for a trainer that already has one is refused (it would change how
    an existing model is run).
    """
    def add(cls: T) -> T:
        from nndiff.inference.predictor import Predictor

        if not (isinstance(cls, type) and issubclass(cls, Predictor)):
            raise TypeError(f"{cls!r} is not a subclass of nndiff.inference.Predictor")
        for trainer in trainers:
            existing = PREDICTORS.get(trainer)
            if existing is not None and existing is not cls:
                raise ValueError(f"trainer {trainer!r} already has predictor {existing.__module__}.{existing.__qualname__}")
            PREDICTORS[trainer] = cls
        return cls

    return add


def _import_family_modules() -> None:
    from nndiff.training.registry import TRAINER_MODULES

    for module in (*TRAINER_MODULES, *PREDICTOR_MODULES):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # the module exists but an import inside it fails: a real bug
                raise


def predictor_class_for(trainer: str) -> type:
    """The Predictor class registered for ``trainer`` (error lists the known trainers)."""
    if trainer not in PREDICTORS:
        _import_family_modules()
    if trainer not in PREDICTORS:
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry.name == trainer:
                PREDICTORS[trainer] = entry.load()
    if trainer not in PREDICTORS:
        raise NnDiffError(f"no predictor is registered for trainer {trainer!r}; known: "
                          f"{', '.join(sorted(PREDICTORS)) or 'none'}. Fix: check -tr, or register the family's "
                          "predictor with nndiff.inference.register_predictor")
    return PREDICTORS[trainer]
