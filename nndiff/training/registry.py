"""Trainer registry: name -> class, extendable through the ``nndiff.trainers`` entry-point group.

Family modules register their trainers with :func:`register_trainer`. Lookup by name
(:func:`get_trainer_class`) tries, in order: the :data:`TRAINERS` dict; the family modules in
:data:`TRAINER_MODULES` (imported on demand, which registers their trainers; a module that does
not exist yet is skipped); entry points of the group ``nndiff.trainers`` declared by other
installed packages::

    # setup.py of an extension package
    entry_points={"nndiff.trainers": ["MyTrainer = my_package.trainers:MyTrainer"]}

No recursive search through packages: what can be found is listed here.
"""
from __future__ import annotations

import importlib
import logging
from importlib import metadata
from typing import Callable, TypeVar

from nndiff.errors import NnDiffError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "nndiff.trainers"

#: Registered trainer classes by name.
TRAINERS: dict[str, type] = {}

#: Modules imported on a lookup miss; each registers its trainers when imported.
TRAINER_MODULES: tuple[str, ...] = (
    "nndiff.tasks.generation",
    "nndiff.tasks.translation",
    "nndiff.tasks.denoising",
    "nndiff.tasks.reconstruction",
    "nndiff.tasks.anomaly",
    "nndiff.tasks.segmentation",
    "nndiff.tasks.autoencoder",
    "nndiff.tasks.latent",
)

T = TypeVar("T", bound=type)


def register_trainer(cls: T | None = None, *, name: str | None = None) -> T | Callable[[T], T]:
    """Class decorator: ``@register_trainer`` or ``@register_trainer(name="Alias")``.

    Registering a different class under a taken name is refused (it would silently change
    which trainer an existing results folder belongs to).
    """

    def add(klass: T) -> T:
        from nndiff.training.trainer import Trainer

        key = name or klass.__name__
        if not (isinstance(klass, type) and issubclass(klass, Trainer)):
            raise TypeError(f"{klass!r} is not a subclass of nndiff.training.Trainer")
        existing = TRAINERS.get(key)
        if existing is not None and existing is not klass:
            raise ValueError(f"trainer name {key!r} is already registered for {existing.__module__}.{existing.__qualname__}")
        TRAINERS[key] = klass
        return klass

    return add if cls is None else add(cls)


def _import_family_modules() -> None:
    for module in TRAINER_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # the module exists but one of its imports is missing: a real bug
                raise
            logger.debug("trainer module %s not present", module)


def _entry_point_trainers() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_trainers() -> list[str]:
    """Names of every trainer that :func:`get_trainer_class` can find."""
    _import_family_modules()
    return sorted(set(TRAINERS) | set(_entry_point_trainers()))


def get_trainer_class(name: str) -> type:
    """The trainer class called ``name`` (registry, family modules, then entry points)."""
    if name in TRAINERS:
        return TRAINERS[name]
    _import_family_modules()
    if name in TRAINERS:
        return TRAINERS[name]
    entry_points = _entry_point_trainers()
    if name in entry_points:
        klass = entry_points[name].load()
        register_trainer(klass, name=name)
        return klass
    known = ", ".join(sorted(set(TRAINERS) | set(entry_points))) or "none registered"
    raise NnDiffError(f"unknown trainer {name!r}. Available: {known}. Fix: use one of these with -tr, or "
                      f"register yours with @register_trainer or the '{ENTRY_POINT_GROUP}' entry-point group")
