"""Convert a Medical Segmentation Decathlon task folder into an nnDiff raw dataset.

Source layout (http://medicaldecathlon.com, Antonelli et al., Nat. Commun. 2022)::

    Task01_BrainTumour/
    ├── dataset.json      "modality": {"0": "FLAIR", ...}, "labels": {"0": "background", ...},
    │                     "training": [{"image": "./imagesTr/BRATS_001.nii.gz",
    │                                   "label": "./labelsTr/BRATS_001.nii.gz"}, ...],
    │                     "test": ["./imagesTs/BRATS_485.nii.gz", ...]
    ├── imagesTr/         one NIfTI per case; 4D (x, y, z, channel) when there are several modalities
    ├── labelsTr/
    └── imagesTs/

What is written: each 4D image split into ``{CASE}_{XXXX}.nii.gz`` (one file per channel, geometry
of the first three axes), labels copied unchanged, ``channel_names`` from ``"modality"``, labels
in nnU-Net v2 form ``{"background": 0, ...}``, ``subject`` = case id. Only the files that
dataset.json lists are read, so the macOS ``._*`` resource files of the public archives are ignored.

Tasks: ``segmentation`` (labels required), ``generation`` (labels dropped),
``anomaly_detection`` (labels kept as lesion masks; ``healthy`` = the label map has no foreground).
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

from nndiff.dataset_conversion.common import (
    converter_parser,
    dataset_folder_name,
    dataset_json,
    dataset_writer,
    require_input,
    run_converter,
    write_dataset_files,
)
from nndiff.errors import NnDiffError
from nndiff.utils.files import load_json

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("segmentation", "generation", "anomaly_detection")
FILE_ENDING = ".nii.gz"
REFERENCE = "Antonelli et al., The Medical Segmentation Decathlon, Nat. Commun. 13, 4128 (2022)"
LICENCE = "CC-BY-SA 4.0 (Medical Segmentation Decathlon)"


def _sitk() -> Any:
    import SimpleITK  # noqa: N813  (lazy: only converters and io need it)

    return SimpleITK


def read_msd_json(task_folder: Path) -> dict[str, Any]:
    """The task's dataset.json with the keys this converter needs checked."""
    path = require_input(task_folder / "dataset.json", "an MSD dataset.json in the task folder",
                         "pass the TaskXX_Name folder itself (the one holding dataset.json and imagesTr/)")
    data = load_json(path)
    for key in ("modality", "training"):
        if key not in data:
            raise NnDiffError(f"{path}: key '{key}' is missing; an MSD dataset.json has 'modality', "
                              "'labels', 'training' and 'test'. Fix: restore the file from the archive")
    if not isinstance(data["modality"], dict) or not data["modality"]:
        raise NnDiffError(f"{path}: 'modality' must map channel index to name, found {data['modality']!r}")
    return data


def channel_names_from_modality(modality: dict[str, str]) -> dict[str, str]:
    """MSD ``{"0": "FLAIR", ...}`` -> nnDiff ``channel_names`` (keys re-checked to be 0..n-1)."""
    keys = sorted(int(k) for k in modality)
    if keys != list(range(len(keys))):
        raise NnDiffError(f"dataset.json 'modality' keys {keys} are not 0..{len(keys) - 1}")
    return {str(k): str(modality[str(k)]) for k in keys}


def nnunet_v2_labels(msd_labels: dict[str, str]) -> dict[str, int]:
    """MSD ``{"0": "background", "1": "edema"}`` -> ``{"background": 0, "edema": 1}``.

    Value 0 is always called ``background`` (nnU-Net v2); repeated names get the value appended.
    """
    labels: dict[str, int] = {}
    for key in sorted(msd_labels, key=int):
        value = int(key)
        name = "background" if value == 0 else str(msd_labels[key])
        if name in labels:
            name = f"{name}_{value}"
        labels[name] = value
    if 0 not in labels.values():
        labels = {"background": 0, **labels}
    return labels


def _listed_path(task_folder: Path, entry: str, what: str) -> Path:
    path = task_folder / entry
    return require_input(path, what, "check the file list of dataset.json against the task folder")


def case_id_of(path: Path) -> str:
    """``.../BRATS_001.nii.gz`` -> ``BRATS_001``."""
    name = path.name
    return name[: -len(FILE_ENDING)] if name.endswith(FILE_ENDING) else path.stem


def split_channels(image_path: Path, num_channels: int) -> list[Any]:
    """The channel volumes of an MSD image (a 3D image is one channel, a 4D one is split on axis 4)."""
    sitk = _sitk()
    image = sitk.ReadImage(str(image_path))
    if image.GetDimension() == 3:
        # Some writers store channels as vector components of a 3D image instead of a 4th axis.
        found = image.GetNumberOfComponentsPerPixel()
        volumes = [sitk.VectorIndexSelectionCast(image, c) for c in range(found)] if found > 1 else [image]
    elif image.GetDimension() == 4:
        size = list(image.GetSize())
        found = size[3]
        # Extract with size 0 on the 4th axis drops it and keeps the 3D part of the geometry.
        volumes = [sitk.Extract(image, size[:3] + [0], [0, 0, 0, c]) for c in range(found)]
    else:
        raise NnDiffError(f"{image_path}: {image.GetDimension()}D image; MSD images are 3D or 4D")
    if found != num_channels:
        raise NnDiffError(f"{image_path}: {found} channel(s) but dataset.json 'modality' names "
                          f"{num_channels}. Fix: make 'modality' list every channel of the 4D images")
    return volumes


def _write_channels(image_path: Path, out_dir: Path, case_id: str, num_channels: int) -> None:
    sitk = _sitk()
    out_dir.mkdir(parents=True, exist_ok=True)
    for c, volume in enumerate(split_channels(image_path, num_channels)):
        sitk.WriteImage(volume, str(out_dir / f"{case_id}_{c:04d}{FILE_ENDING}"), True)


def label_has_foreground(label_path: Path) -> bool:
    """Whether the label map holds any non-zero voxel."""
    sitk = _sitk()
    return bool(sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))).any())


def _training_entries(data: dict[str, Any], task_folder: Path, need_labels: bool) -> list[tuple[Path, Path | None]]:
    entries = []
    for n, item in enumerate(data["training"]):
        if not isinstance(item, dict) or "image" not in item:
            raise NnDiffError(f"{task_folder / 'dataset.json'}: training entry {n} is {item!r}, expected "
                              '{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}')
        image = _listed_path(task_folder, item["image"], "a training image listed in dataset.json")
        label = None
        if need_labels:
            if not item.get("label"):
                raise NnDiffError(f"{task_folder / 'dataset.json'}: training entry {item['image']} has no "
                                  "label. Fix: add it, or convert with --task generation")
            label = _listed_path(task_folder, item["label"], "a label listed in dataset.json")
        entries.append((image, label))
    if not entries:
        raise NnDiffError(f"{task_folder / 'dataset.json'}: 'training' lists no case")
    return entries


def convert_msd(task_folder: str | Path, raw_root: str | Path, dataset_id: int, task: str = "segmentation",
                name: str | None = None) -> Path:
    """Convert ``task_folder`` (``TaskXX_Name``) to ``raw_root/DatasetXXX_Name``; returns that folder."""
    task_folder = Path(task_folder)
    if task not in TASKS:
        raise NnDiffError(f"task {task!r} is not one of {list(TASKS)} for MSD data")
    require_input(task_folder, "an MSD task folder (TaskXX_Name)", "pass the path of the unpacked task folder")
    data = read_msd_json(task_folder)
    channel_names = channel_names_from_modality(data["modality"])
    keep_labels = task != "generation"
    if keep_labels and not data.get("labels"):
        raise NnDiffError(f"{task_folder / 'dataset.json'}: no 'labels'; task {task} needs them. "
                          "Fix: convert with --task generation")
    name = name or default_name(task_folder)
    entries = _training_entries(data, task_folder, keep_labels)
    tests = [_listed_path(task_folder, t if isinstance(t, str) else t["image"], "a test image listed in dataset.json")
             for t in data.get("test", [])]
    subjects: dict[str, str] = {}
    extra: dict[str, dict[str, Any]] = {}
    with dataset_writer(raw_root, dataset_id, name) as out:
        for image, label in entries:
            case = case_id_of(image)
            _write_channels(image, out / "imagesTr", case, len(channel_names))
            subjects[case] = case
            if label is not None:
                (out / "labelsTr").mkdir(exist_ok=True)
                shutil.copyfile(label, out / "labelsTr" / f"{case}{FILE_ENDING}")
                if task == "anomaly_detection":
                    extra[case] = {"healthy": not label_has_foreground(label)}
        for image in tests:
            _write_channels(image, out / "imagesTs", case_id_of(image), len(channel_names))
        if task == "anomaly_detection" and not any(e["healthy"] for e in extra.values()):
            logger.warning("every MSD training case holds a lesion: none is marked healthy; anomaly "
                           "detection training needs healthy cases (e.g. 2D slices without lesion)")
        info = dataset_json(
            task=task, channel_names=channel_names, num_training=len(entries), file_ending=FILE_ENDING,
            name=name, description=str(data.get("description", "")), reference=str(data.get("reference", REFERENCE)),
            licence=str(data.get("licence", LICENCE)),
            labels=nnunet_v2_labels(data["labels"]) if keep_labels else None)
        write_dataset_files(out, info, subjects, extra)
    logger.info("converted %d training and %d test cases from %s", len(entries), len(tests), task_folder)
    return Path(raw_root) / dataset_folder_name(dataset_id, name)


def default_name(task_folder: Path) -> str:
    """``Task01_BrainTumour`` -> ``BrainTumour``."""
    parts = task_folder.name.split("_", 1)
    return parts[1] if len(parts) == 2 and parts[0].startswith("Task") else task_folder.name


def build_parser() -> argparse.ArgumentParser:
    return converter_parser("nndiff_convert_msd", "Medical Segmentation Decathlon task folder -> nnDiff raw "
                            "dataset (4D images split into channels, labels in nnU-Net v2 form)",
                            tasks=TASKS, default_task="segmentation")


def _convert(args: argparse.Namespace, raw_root: Path) -> Path:
    return convert_msd(args.input, raw_root, args.dataset_id, task=args.task, name=args.name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point ``nndiff_convert_msd``; returns the exit code."""
    return run_converter(build_parser(), _convert, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
