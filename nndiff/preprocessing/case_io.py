"""Reading one raw case (picklable file lists for worker processes) and storing a preprocessed case."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nndiff.errors import DatasetError
from nndiff.utils.files import atomic_path, load_json, save_json

CASE_ARRAY_KEYS = ("data", "seg", "target")
#: CASE.json key listing the image channels a case lacks (dataset.json ``allow_missing_channels``):
#: stored as zeros, not normalized; trainers and predictors ignore their values. Defined here, in
#: the package that writes it, so readers import it without pulling in the training stack.
MISSING_CHANNELS_KEY = "missing_channels"


@dataclass(frozen=True)
class CaseFiles:
    """The files of one raw case as plain strings, so the record pickles cheaply to workers.

    ``images`` has one entry per channel file; ``None`` marks a channel the case lacks (only
    with dataset.json ``allow_missing_channels``).
    """

    identifier: str
    images: tuple[str | None, ...]
    label: str | None = None
    targets: tuple[str, ...] = field(default_factory=tuple)

    @property
    def missing_channels(self) -> list[int]:
        """Indices of the channels this case lacks."""
        return [i for i, p in enumerate(self.images) if p is None]

    @classmethod
    def from_case(cls, case: Any, allow_missing: bool = False) -> "CaseFiles":
        """Build from an ``nndiff.dataset.Case``; a missing channel is a clear error unless
        ``allow_missing`` (and a case with no channel at all is always one)."""
        missing = [i for i, p in enumerate(case.images) if p is None]
        if missing and (not allow_missing or len(missing) == len(case.images)):
            fix = ("add at least one channel file or remove the case" if allow_missing else
                   "add the missing channel files, or set \"allow_missing_channels\": true in dataset.json "
                   "(translation and paired denoising)")
            raise DatasetError([(f"case {case.identifier}", f"image channel(s) {missing} are missing", fix)])
        return cls(
            identifier=str(case.identifier),
            images=tuple(None if p is None else str(p) for p in case.images),
            label=None if case.label is None else str(case.label),
            targets=tuple(str(p) for p in case.targets),
        )


@dataclass
class RawCase:
    """Arrays and geometry of one raw case (``targets`` and ``label`` optional).

    ``missing_channels``: image channels the case lacks; their rows of ``images`` are zeros.
    """

    identifier: str
    images: np.ndarray
    properties: Any  # nndiff.dataset.io.ImageProperties
    label: np.ndarray | None = None
    targets: np.ndarray | None = None
    target_properties: Any = None
    missing_channels: tuple[int, ...] = ()


def _read_images_zero_filled(files: CaseFiles) -> tuple[np.ndarray, Any]:
    """Present channels as read; a missing channel is a zero array on the present channels' grid
    (same shape and dtype, so geometry and stacking stay those of the case)."""
    from nndiff.dataset.io import read_images

    present = [i for i, p in enumerate(files.images) if p is not None]
    arrays, properties = read_images([files.images[i] for i in present])
    if len(present) == len(files.images):
        return arrays, properties
    full = np.zeros((len(files.images), *arrays.shape[1:]), dtype=arrays.dtype)
    full[present] = arrays
    properties.num_channels = len(files.images)
    return full, properties


def read_case(files: CaseFiles) -> RawCase:
    """Read images (missing channels zero-filled), label and targets with ``nndiff.dataset.io``."""
    from nndiff.dataset.io import read_images, read_label

    images, properties = _read_images_zero_filled(files)
    label = read_label(files.label)[0] if files.label is not None else None
    targets, target_properties = (read_images(list(files.targets)) if files.targets else (None, None))
    return RawCase(files.identifier, images, properties, label, targets, target_properties,
                   tuple(files.missing_channels))


def case_files_of(dataset: Any) -> list[CaseFiles]:
    """Picklable file lists of every training case, sorted by identifier (deterministic order)."""
    allow_missing = bool(getattr(dataset, "allow_missing_channels", False))
    return [CaseFiles.from_case(dataset.cases[k], allow_missing) for k in sorted(dataset.cases)]


def save_case(folder: str | Path, identifier: str, arrays: dict[str, np.ndarray], case_json: dict) -> None:
    """Write ``CASE.npz`` (uncompressed: training reads it often) and ``CASE.json``, each atomically."""
    folder = Path(folder)
    unknown = set(arrays) - set(CASE_ARRAY_KEYS)
    if unknown:
        raise ValueError(f"unknown case arrays {sorted(unknown)}; allowed: {CASE_ARRAY_KEYS}")
    with atomic_path(folder / f"{identifier}.npz") as tmp:
        with open(tmp, "wb") as f:  # a file object stops numpy from appending another ".npz"
            np.savez(f, **arrays)
    save_json(case_json, folder / f"{identifier}.json")


def load_case(folder: str | Path, identifier: str) -> tuple[dict[str, np.ndarray], dict]:
    """Read back what :func:`save_case` wrote: ``({"data", "seg"?, "target"?}, case_json)``."""
    folder = Path(folder)
    with np.load(folder / f"{identifier}.npz", allow_pickle=False) as npz:
        arrays = {k: np.asarray(npz[k]) for k in npz.files}
    return arrays, load_json(folder / f"{identifier}.json")
