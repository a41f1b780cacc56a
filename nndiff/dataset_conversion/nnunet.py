"""Convert an nnU-Net v2 raw dataset into an nnDiff raw dataset (add a task, subjects).

Source layout (nnU-Net v2, documentation/dataset_format.md of nnU-Net)::

    Dataset004_Hippocampus/
    ├── dataset.json      "channel_names", "labels", "numTraining", "file_ending"
    │                     (optionally "regions_class_order", or a "dataset" listing of the files)
    ├── imagesTr/         {CASE}_{XXXX}{file_ending}
    ├── labelsTr/         {CASE}{file_ending}
    ├── imagesTs/         (optional)
    └── labelsTs/         (optional)

The layouts are the same, so files are copied unchanged (with their sidecar JSONs); what is added
is dataset.json ``"task"`` and ``metadata.json`` with a ``subject`` per case (the case id, or the
first group of ``--subject_regex`` on it, e.g. ``^(patient\\d+)_`` for several scans per patient).
A ``"dataset"`` file listing is resolved into the standard folders.

Tasks: ``segmentation`` (labels required), ``generation`` (labels and ``labelsTr/`` dropped),
``anomaly_detection`` (labels kept as lesion masks; ``healthy`` = the label map is all background).
"""
from __future__ import annotations

import argparse
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from nndiff.dataset.discovery import Case, SplitLayout, cases_from_listing, discover_split, rgb_layout
from nndiff.dataset.io import find_sidecar, read_label
from nndiff.dataset.schema import channel_names_of
from nndiff.dataset_conversion.common import (
    converter_parser,
    dataset_folder_name,
    dataset_json,
    dataset_writer,
    require_input,
    run_converter,
    write_dataset_files,
)
from nndiff.errors import DatasetError, NnDiffError
from nndiff.utils.files import load_json

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("segmentation", "generation", "anomaly_detection")
#: nnU-Net keys carried over unchanged (others, e.g. overwrite_image_reader_writer, are dropped).
KEPT_KEYS: tuple[str, ...] = ("description", "reference", "licence", "release")
_REQUIRED_KEYS: tuple[str, ...] = ("channel_names", "file_ending")


def read_nnunet_json(folder: Path) -> dict[str, Any]:
    """The source dataset.json, with the keys every nnU-Net v2 dataset has checked."""
    path = require_input(folder / "dataset.json", "an nnU-Net v2 dataset.json",
                         "pass the DatasetXXX_Name folder itself (the one holding dataset.json and imagesTr/)")
    data = load_json(path)
    if "channel_names" not in data and "modality" in data:
        data["channel_names"] = data["modality"]  # nnU-Net v1 spelling, accepted by v2 as well
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise NnDiffError(f"{path}: keys {missing} are missing; an nnU-Net v2 dataset.json has channel_names, "
                          "labels, numTraining and file_ending. Fix: add them (nnU-Net's dataset_format.md)")
    return data


def source_cases(folder: Path, data: dict[str, Any], need_labels: bool) -> tuple[dict[str, Case], dict[str, Case]]:
    """(training cases, test cases) of the source, found as nnDiff finds them (same naming rules)."""
    ending = data["file_ending"]
    num_channels = len(channel_names_of(data))
    files_per_case = 1 if rgb_layout(folder, ending, num_channels) else num_channels
    train_layout = SplitLayout("Tr", ending, files_per_case, 0, need_labels, False, False)
    if "dataset" in data:
        train, problems = cases_from_listing(folder, data["dataset"], files_per_case, 0)
    else:
        found = discover_split(folder, train_layout)
        train, problems = found.cases, found.problems
    test = discover_split(folder, SplitLayout("Ts", ending, files_per_case, 0, False, False, False))
    problems = list(problems) + list(test.problems)
    if problems:
        raise DatasetError([(p.where, p.problem, p.fix) for p in problems])
    if not train:
        raise NnDiffError(f"{folder / 'imagesTr'}: no training case found. Fix: pass an nnU-Net v2 dataset folder")
    return train, test.cases


def subject_of(case_id: str, pattern: re.Pattern[str] | None) -> str:
    """The case id, or the first group of ``pattern`` searched in it (the whole id if it does not match)."""
    if pattern is None:
        return case_id
    match = pattern.search(case_id)
    if match is None:
        logger.warning("case %s does not match --subject_regex %r: it is its own subject", case_id, pattern.pattern)
        return case_id
    return match.group(1) if pattern.groups else match.group(0)


def _compile_subject_regex(subject_regex: str | None) -> re.Pattern[str] | None:
    try:
        return re.compile(subject_regex) if subject_regex else None
    except re.error as e:
        raise NnDiffError(f"--subject_regex {subject_regex!r} is not a valid regular expression ({e}). "
                          r"Fix: e.g. '^(patient\d+)_'") from None


def _copy_with_sidecar(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    sidecar = find_sidecar(source)
    if sidecar is not None:  # numpy / natural images keep their geometry in a JSON beside them
        shutil.copyfile(sidecar, target.with_name(target.name[: -len(_ending_of(target))] + ".json"))


def _ending_of(path: Path) -> str:
    from nndiff.dataset.io import file_ending_of  # noqa: PLC0415

    return file_ending_of(path)


def _copy_case(case: Case, out: Path, split: str, ending: str, with_label: bool) -> None:
    for channel, image in enumerate(case.images):
        assert image is not None  # the source is read without allow_missing_channels
        _copy_with_sidecar(image, out / f"images{split}" / f"{case.identifier}_{channel:04d}{ending}")
    if with_label and case.label is not None:
        _copy_with_sidecar(case.label, out / f"labels{split}" / f"{case.identifier}{ending}")


def default_name(folder: Path) -> str:
    """``Dataset004_Hippocampus`` -> ``Hippocampus``."""
    match = re.match(r"^Dataset\d{3}_(.+)$", folder.name)
    return match.group(1) if match else folder.name


def convert_nnunet(source: str | Path, raw_root: str | Path, dataset_id: int, task: str = "segmentation",
                   name: str | None = None, subject_regex: str | None = None) -> Path:
    """Convert the nnU-Net v2 dataset ``source`` to ``raw_root/DatasetXXX_Name``; returns that folder."""
    folder = require_input(Path(source), "an nnU-Net v2 dataset folder", "pass the DatasetXXX_Name folder")
    if task not in TASKS:
        raise NnDiffError(f"task {task!r} is not one of {list(TASKS)} for nnU-Net data")
    data = read_nnunet_json(folder)
    keep_labels = task != "generation"
    if keep_labels and not data.get("labels"):
        raise NnDiffError(f"{folder / 'dataset.json'}: no 'labels'; task {task} needs them. "
                          "Fix: convert with --task generation")
    pattern = _compile_subject_regex(subject_regex)
    train, test = source_cases(folder, data, need_labels=task == "segmentation")
    ending = data["file_ending"]
    name = name or default_name(folder)
    extra: dict[str, dict[str, Any]] = {}
    with dataset_writer(raw_root, dataset_id, name) as out:
        for case in train.values():
            _copy_case(case, out, "Tr", ending, keep_labels)
            if task == "anomaly_detection" and case.label is not None:
                extra[case.identifier] = {"healthy": not read_label(case.label)[0].any()}
        for case in test.values():
            _copy_case(case, out, "Ts", ending, keep_labels)
        extras = {k: data[k] for k in KEPT_KEYS if k in data}
        if keep_labels and "regions_class_order" in data:
            extras["regions_class_order"] = data["regions_class_order"]
        info = dataset_json(task=task, channel_names=channel_names_of(data), num_training=len(train),
                            file_ending=ending, name=name, labels=data["labels"] if keep_labels else None,
                            **extras)
        write_dataset_files(out, info, {c: subject_of(c, pattern) for c in train}, extra)
    logger.info("converted %d training and %d test cases from %s", len(train), len(test), folder)
    return Path(raw_root) / dataset_folder_name(dataset_id, name)


def build_parser() -> argparse.ArgumentParser:
    p = converter_parser("nndiff_convert_nnunet", "nnU-Net v2 raw dataset -> nnDiff raw dataset "
                         "(adds the task and subject metadata)", tasks=TASKS, default_task="segmentation")
    p.add_argument("--subject_regex", default=None, metavar="REGEX",
                   help="regular expression on the case id whose first group is the subject "
                        "(default: each case is its own subject)")
    return p


def _convert(args: argparse.Namespace, raw_root: Path) -> Path:
    return convert_nnunet(args.input, raw_root, args.dataset_id, task=args.task, name=args.name,
                          subject_regex=args.subject_regex)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point ``nndiff_convert_nnunet``; returns the exit code."""
    return run_converter(build_parser(), _convert, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
