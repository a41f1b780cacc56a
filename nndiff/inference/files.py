"""Input discovery and output writing for predictors (dataset file format, geometry kept)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from nndiff.dataset.discovery import scan_channel_folder, visible_files
from nndiff.dataset.io import NATURAL_ENDINGS, ImageProperties, write_image
from nndiff.errors import DatasetError

logger = logging.getLogger(__name__)

#: Suffix of the per-voxel standard deviation file written beside a Monte-Carlo mean.
STD_SUFFIX = "_std"


@dataclass(frozen=True)
class InputCase:
    """One case of an input folder: its id and its image files in channel order."""

    identifier: str
    files: list[Path]


def is_rgb_input(folder: Path, file_ending: str, num_channels: int) -> bool:
    """nnU-Net's RGB exception for an input folder: 3 channels in one natural image per case
    (no ``_0001``/``_0002`` files present)."""
    if num_channels != 3 or file_ending.lower() not in NATURAL_ENDINGS:
        return False
    suffixes = (f"_0001{file_ending}", f"_0002{file_ending}")
    return not any(p.name.endswith(suffixes) for p in visible_files(folder))


def find_input_cases(folder: str | Path, file_ending: str, num_channels: int) -> list[InputCase]:
    """Cases of ``folder`` named ``{CASE}_{XXXX}{file_ending}``, sorted by id.

    Every problem (wrong names or endings, missing channels, an empty folder) is reported at once
    as a :class:`DatasetError`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError([(folder, "input folder does not exist", "pass an existing folder with -i")])
    files_per_case = 1 if is_rgb_input(folder, file_ending, num_channels) else num_channels
    found, problems = scan_channel_folder(folder, file_ending, files_per_case, "channel")
    cases: list[InputCase] = []
    for identifier, channels in sorted(found.items()):
        missing = [c for c in range(files_per_case) if c not in channels]
        if missing:
            names = ", ".join(f"{identifier}_{c:04d}{file_ending}" for c in missing)
            problems.append((str(folder / identifier), f"channel file(s) missing: {names}",
                             "add the missing channel files (one per channel in dataset.json)"))
            continue
        cases.append(InputCase(identifier, [channels[c] for c in range(files_per_case)]))
    if not cases and not problems:
        problems.append((str(folder), f"holds no {{CASE}}_{{XXXX}}{file_ending} files",
                         f"put the input images there, named like case_0000{file_ending}"))
    if problems:
        raise DatasetError([tuple(p) for p in problems])  # type: ignore[misc]
    return cases


def output_paths(output_dir: Path, identifier: str, num_channels: int, file_ending: str,
                 is_rgb: bool = False, suffix: str = "") -> list[Path]:
    """``{CASE}{suffix}{ending}`` for one channel (or an RGB natural image), else one file per
    channel ``{CASE}{suffix}_{XXXX}{ending}``."""
    if num_channels == 1 or (is_rgb and num_channels == 3 and file_ending.lower() in NATURAL_ENDINGS):
        return [output_dir / f"{identifier}{suffix}{file_ending}"]
    return [output_dir / f"{identifier}{suffix}_{c:04d}{file_ending}" for c in range(num_channels)]


def write_output(array: np.ndarray, properties: ImageProperties, output_dir: Path, identifier: str,
                 file_ending: str, suffix: str = "") -> list[Path]:
    """Write ``array`` ``(C, Z, Y, X)`` with ``properties``' geometry; every file atomically."""
    paths = output_paths(output_dir, identifier, array.shape[0], file_ending, properties.is_rgb, suffix)
    if len(paths) == 1:
        write_image(array, properties, paths[0])
    else:
        for channel, path in enumerate(paths):
            write_image(array[channel:channel + 1], properties, path)
    logger.debug("wrote %s", ", ".join(p.name for p in paths))
    return paths


def monte_carlo_summary(samples: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel mean and (population, ddof = 0) standard deviation of K samples, in float64
    arithmetic, returned as float32."""
    stack = np.stack([np.asarray(s, dtype=np.float64) for s in samples])
    if stack.shape[0] < 1:
        raise ValueError("monte_carlo_summary needs at least one sample")
    return stack.mean(axis=0).astype(np.float32), stack.std(axis=0).astype(np.float32)
