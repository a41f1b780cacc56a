"""Read folders of images for evaluation: held-out real cases, generated samples, training cases.

Naming (documentation/evaluation.md, "Folders"):

* one image file per image when the dataset has one channel (``case_0000.png``,
  ``sample_0000.png``) or is an RGB natural-image dataset (one file holds R, G, B);
* ``{ID}_{XXXX}{ending}`` per channel otherwise (``imagesTs/case_0000.nii.gz``,
  ``case_0001.nii.gz``; predictor output ``sample_0000_0000.nii.gz``, ``sample_0000_0001...``).

``.json`` files (sidecars, ``prediction_info.json``) and hidden files are ignored; any other file
must be a readable image with the folder's single ending. Every problem of a folder is reported
at once as a :class:`~nndiff.errors.DatasetError` naming the file and the fix.

:func:`evaluate_task_folders` is the folder evaluation of the anomaly-detection and segmentation
families (nndiff.evaluation.anomaly / .segmentation), one entry point for the command line.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from nndiff.dataset.discovery import visible_files
from nndiff.dataset.io import NATURAL_ENDINGS, SUPPORTED_ENDINGS, file_ending_of, read_images
from nndiff.errors import DatasetError, NnDiffError

logger = logging.getLogger(__name__)

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
Problem = tuple[str, str, str]


@dataclass
class ImageFolder:
    """The images of one folder, channel first: ``(C, Y, X)`` (2D) or ``(C, Z, Y, X)`` (3D).

    ``identifiers[i]`` and ``files[i]`` (one path per channel file) belong to ``images[i]``.
    """

    folder: Path
    file_ending: str
    identifiers: list[str]
    files: list[list[Path]]
    images: list[np.ndarray] = field(repr=False)

    @property
    def spatial_dims(self) -> int:
        return self.images[0].ndim - 1

    @property
    def num_channels(self) -> int:
        return int(self.images[0].shape[0])

    def file_names(self) -> list[str]:
        """Every file name in image order (several per image for multi-channel data)."""
        return [path.name for paths in self.files for path in paths]


# --------------------------------------------------------------------------- listing files
def _image_files(folder: Path, role: str) -> list[Path]:
    """Image candidates of ``folder`` (``.json`` and hidden files skipped); missing/empty is an error."""
    if not folder.is_dir():
        raise DatasetError([(folder, f"{role} folder does not exist", "pass an existing folder")])
    files = [p for p in visible_files(folder) if p.suffix.lower() != ".json"]
    if not files:
        raise DatasetError([(folder, f"{role} folder holds no image files",
                             f"put the {role} images there (any format nnDiff reads, one ending per folder)")])
    return files


def folder_file_ending(files: Sequence[Path], folder: Path, role: str, expected: str | None = None) -> str:
    """The one image ending shared by ``files``; mixed, unsupported or unexpected endings are errors."""
    by_ending: dict[str, list[str]] = defaultdict(list)
    for path in files:
        by_ending[file_ending_of(path)].append(path.name)
    problems: list[Problem] = []
    unsupported = {e: n for e, n in by_ending.items() if e.lower() not in SUPPORTED_ENDINGS}
    for ending, names in unsupported.items():
        problems.append((str(folder / names[0]), f"has the unsupported ending {ending!r} "
                         f"({len(names)} such file(s) in the {role} folder)",
                         f"remove it or convert it to one of {', '.join(SUPPORTED_ENDINGS)}"))
    endings = sorted(e for e in by_ending if e not in unsupported)
    if len(endings) > 1:
        listing = "; ".join(f"{e}: {len(by_ending[e])} file(s), e.g. {by_ending[e][0]}" for e in endings)
        problems.append((str(folder), f"{role} folder mixes file endings ({listing})",
                         "keep one format per folder (the dataset's file_ending)"))
    elif endings and expected is not None and endings[0] != expected:
        problems.append((str(folder / by_ending[endings[0]][0]),
                         f"has the ending {endings[0]!r} but dataset.json 'file_ending' is {expected!r}",
                         f"convert the {role} images to {expected} or pass the matching dataset"))
    if problems:
        raise DatasetError(problems)
    return endings[0]


def files_per_image(files: Sequence[Path], file_ending: str, num_channels: int | None) -> int:
    """Files that make one image: 1 for one channel, unknown channels or nnU-Net's RGB exception
    (3 channels in one natural image, no ``_0001`` files), else ``num_channels``."""
    if num_channels is None or num_channels == 1:
        return 1
    if num_channels == 3 and file_ending.lower() in NATURAL_ENDINGS:
        if not any(p.name.endswith(f"_0001{file_ending}") for p in files):
            return 1
    return num_channels


def group_channel_files(files: Sequence[Path], file_ending: str, count: int,
                        folder: Path) -> tuple[list[str], list[list[Path]]]:
    """Group ``{ID}_{XXXX}{ending}`` files into images of ``count`` channel files (sorted by ID)."""
    if count == 1:
        return [p.name[: len(p.name) - len(file_ending)] for p in files], [[p] for p in files]
    problems: list[Problem] = []
    groups: dict[str, dict[int, Path]] = defaultdict(dict)
    for path in files:
        match = _CHANNEL_SUFFIX.match(path.name[: len(path.name) - len(file_ending)])
        if not match or int(match.group("channel")) >= count:
            problems.append((str(path), f"is not named {{ID}}_{{XXXX}}{file_ending} with a channel index "
                             f"XXXX below {count} (the dataset has {count} channels)",
                             f"write one file per channel: ID_0000{file_ending} ... ID_{count - 1:04d}{file_ending}"))
            continue
        groups[match.group("case")][int(match.group("channel"))] = path
    for identifier, channels in sorted(groups.items()):
        missing = [c for c in range(count) if c not in channels]
        if missing:
            names = ", ".join(f"{identifier}_{c:04d}{file_ending}" for c in missing)
            problems.append((str(folder / identifier), f"channel file(s) missing: {names}",
                             f"add them: each image needs all {count} channel files"))
    if problems:
        raise DatasetError(problems)
    identifiers = sorted(groups)
    return identifiers, [[groups[i][c] for c in range(count)] for i in identifiers]


# --------------------------------------------------------------------------- reading
def _read_one(paths: list[Path], num_channels: int | None) -> tuple[np.ndarray, list[Problem]]:
    """``(C, Y, X)`` or ``(C, Z, Y, X)`` float32 of one image, plus problems (complex, channel count)."""
    array, props = read_images(paths)
    problems: list[Problem] = []
    if np.iscomplexobj(array):
        problems.append((str(paths[0]), "is complex-valued; generation is evaluated on real images",
                         "evaluate magnitude images (np.abs) instead"))
    if num_channels is not None and array.shape[0] != num_channels:
        problems.append((str(paths[0]), f"has {array.shape[0]} channel(s) but dataset.json declares "
                         f"{num_channels} (channel_names)",
                         "pass the dataset these images belong to, or convert them (e.g. grey vs RGB)"))
    image = array[:, 0] if props.spatial_dims == 2 else array
    return np.asarray(image.real if np.iscomplexobj(image) else image, dtype=np.float32), problems


def load_image_folder(folder: str | Path, role: str, *, file_ending: str | None = None,
                      num_channels: int | None = None) -> ImageFolder:
    """Read every image of ``folder`` (see the module docstring for the naming).

    ``role`` names the folder in messages ("reference", "prediction", "training"). With
    ``file_ending`` / ``num_channels`` (from dataset.json) the folder must match them; without,
    each file is one image and the channels come from the files.
    """
    folder = Path(folder)
    files = _image_files(folder, role)
    ending = folder_file_ending(files, folder, role, file_ending)
    count = files_per_image(files, ending, num_channels)
    identifiers, grouped = group_channel_files(files, ending, count, folder)
    images, problems = [], []
    for paths in grouped:
        image, found = _read_one(paths, num_channels)
        images.append(image)
        problems += found
    problems += _mixed_layout_problems(images, grouped, role)
    if problems:
        raise DatasetError(problems)
    logger.info("%s: %d %s image(s) from %s", role, len(images), ending, folder)
    return ImageFolder(folder, ending, identifiers, grouped, images)


def _mixed_layout_problems(images: list[np.ndarray], files: list[list[Path]], role: str) -> list[Problem]:
    """2D and 3D images, or different channel counts, in one folder."""
    layouts = defaultdict(list)
    for image, paths in zip(images, files):
        layouts[(image.ndim - 1, image.shape[0])].append(paths[0].name)
    if len(layouts) < 2:
        return []
    listing = "; ".join(f"{dims}D with {c} channel(s): e.g. {names[0]}" for (dims, c), names in sorted(layouts.items()))
    return [(str(files[0][0].parent), f"{role} folder mixes image layouts ({listing})",
             "keep images of one dimensionality and channel count per folder")]


# --------------------------------------------------------------------------- alignment
def center_crop_or_pad(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Centre-crop or pad ``(C, *spatial)`` to ``(C, *shape)``; padding uses each channel's minimum
    (the background of medical images: air in CT, zero in MR). Odd differences put the extra
    pixel at the end."""
    if tuple(image.shape[1:]) == tuple(shape):
        return image
    if len(shape) != image.ndim - 1:
        raise ValueError(f"cannot align {image.ndim - 1}D image to shape {tuple(shape)}")
    minima = [float(channel.min()) for channel in image]  # of the whole image, before cropping
    crop = tuple(slice((n - t) // 2, (n - t) // 2 + t) if n > t else slice(None)
                 for n, t in zip(image.shape[1:], shape))
    cropped = image[(slice(None),) + crop]
    pads = [((t - n) // 2, t - n - (t - n) // 2) if n < t else (0, 0) for n, t in zip(cropped.shape[1:], shape)]
    if not any(before or after for before, after in pads):
        return np.ascontiguousarray(cropped)
    return np.stack([np.pad(channel, pads, mode="constant", constant_values=low)
                     for channel, low in zip(cropped, minima)])


def volume_slices(image: np.ndarray, identifier: str) -> tuple[list[np.ndarray], list[str]]:
    """The z slices ``(C, Y, X)`` of a ``(C, Z, Y, X)`` volume with ids ``ID:zN`` (array axis 0)."""
    return [image[:, z] for z in range(image.shape[1])], [f"{identifier}:z{z}" for z in range(image.shape[1])]


# --------------------------------------------------------------------------- family dispatch
#: Families evaluated by :func:`evaluate_task_folders` (nndiff_evaluate_folder dispatches on dataset.json task).
TASK_FOLDER_FAMILIES = ("anomaly_detection", "segmentation")


def evaluate_task_folders(task: str, reference: str | Path, prediction: str | Path, *, dataset_json: str | Path,
                          output_file: str | Path | None = None, training_dir: str | Path | None = None,
                          images_dir: str | Path | None = None,
                          baseline: str | Path | None = None) -> tuple[dict, str]:
    """``(summary, markdown table)`` of an anomaly-detection or segmentation prediction folder.

    anomaly_detection: REF = test masks (labelsTs), PRED = the predictor's output folder (or a folder
    of strategy subfolders); ``training_dir`` / ``images_dir`` feed the z-score baseline (defaults
    imagesTr / imagesTs beside dataset.json). segmentation: REF = test label maps, PRED = label maps
    (and ``{case}_uncertainty`` maps); ``baseline`` = the deterministic model's prediction folder.
    Options of the other family are refused, not ignored.
    """
    if task == "anomaly_detection":
        from nndiff.evaluation.anomaly import evaluate_anomaly_folders, format_anomaly_table

        if baseline is not None:
            raise NnDiffError("a deterministic baseline folder applies to segmentation datasets only; anomaly "
                              "detection computes its z-score baseline itself. Fix: drop the baseline folder")
        summary = evaluate_anomaly_folders(reference, prediction, dataset_json=dataset_json, images_dir=images_dir,
                                           training_dir=training_dir, output_file=output_file)
        return summary, format_anomaly_table(summary)
    if task == "segmentation":
        from nndiff.evaluation.segmentation import evaluate_segmentation_folders, format_segmentation_table

        if training_dir is not None or images_dir is not None:
            raise NnDiffError("training/test image folders apply to anomaly detection only (its z-score baseline); "
                              "segmentation compares label maps. Fix: drop them")
        summary = evaluate_segmentation_folders(reference, prediction, dataset_json=dataset_json, baseline=baseline,
                                                output_file=output_file)
        return summary, format_segmentation_table(summary)
    raise NnDiffError(f"evaluate_task_folders evaluates {', '.join(TASK_FOLDER_FAMILIES)} datasets, not {task!r}. "
                      "Fix: use nndiff_evaluate_folder, which dispatches every family")
