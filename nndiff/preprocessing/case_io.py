"""Reading one raw case (picklable file lists for worker processes) and storing a preprocessed case."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nndiff.errors import DatasetError
from nndiff.utils.files import atomic_path, load_json, save_json

CASE_ARRAY_KEYS = ("data", "seg", "target")


@dataclass(frozen=True)
class CaseFiles:
    """The files of one raw case as plain strings, so the record pickles cheaply to workers."""

    identifier: str
    images: tuple[str, ...]
    label: str | None = None
    targets: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_case(cls, case: Any) -> "CaseFiles":
        """Build from an ``nndiff.dataset.Case``; a missing channel is a clear error."""
        missing = [i for i, p in enumerate(case.images) if p is None]
        if missing:
            raise DatasetError([(
                f"case {case.identifier}",
                f"channel(s) {missing} are missing; fingerprint and preprocessing need every channel",
                "add the missing channel files (allow_missing_channels is not supported here yet)",
            )])
        return cls(
            identifier=str(case.identifier),
            images=tuple(str(p) for p in case.images),
            label=None if case.label is None else str(case.label),
            targets=tuple(str(p) for p in case.targets),
        )


@dataclass
class RawCase:
    """Arrays and geometry of one raw case (``targets`` and ``label`` optional)."""

    identifier: str
    images: np.ndarray
    properties: Any  # nndiff.dataset.io.ImageProperties
    label: np.ndarray | None = None
    targets: np.ndarray | None = None
    target_properties: Any = None


def read_case(files: CaseFiles) -> RawCase:
    """Read images, label and targets of one case with ``nndiff.dataset.io``."""
    from nndiff.dataset.io import read_images, read_label

    images, properties = read_images(list(files.images))
    label = read_label(files.label)[0] if files.label is not None else None
    targets, target_properties = (read_images(list(files.targets)) if files.targets else (None, None))
    return RawCase(files.identifier, images, properties, label, targets, target_properties)


def case_files_of(dataset: Any) -> list[CaseFiles]:
    """Picklable file lists of every training case, sorted by identifier (deterministic order)."""
    return [CaseFiles.from_case(dataset.cases[k]) for k in sorted(dataset.cases)]


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
