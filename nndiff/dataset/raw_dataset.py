"""``RawDataset``, ``load_dataset`` and ``find_dataset_folder``.

``load_dataset`` reads ``dataset.json`` and ``metadata.json``, discovers the cases and runs every
cheap check (no image is opened, nothing is written, SimpleITK is not imported). All problems are
collected and raised together as one :class:`nndiff.errors.DatasetError`.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nndiff.dataset import metadata as meta
from nndiff.dataset import schema
from nndiff.dataset.discovery import Case, SplitLayout, cases_from_listing, discover_split, rgb_layout
from nndiff.dataset.schema import Problem
from nndiff.diffusion.options import TaskFamily
from nndiff.errors import DatasetError

logger = logging.getLogger(__name__)

DATASET_FOLDER = re.compile(r"^Dataset(?P<id>\d{3})_(?P<name>.+)$")


@dataclass
class RawDataset:
    """A validated raw dataset. ``cases`` are the training cases, ``test_cases`` those of imagesTs.

    ``channel_names``/``target_names`` keep dataset.json's ``{"0": name}`` form (ordered by index).
    ``is_rgb`` marks nnU-Net's RGB exception (one natural-image file holds channels R, G, B).
    ``conditions`` is in the long form ``{name: {"type": ..., ["values": [...]]}}``.
    """

    root: Path
    name: str
    dataset_id: int | None
    json: dict[str, Any]
    task: TaskFamily
    channel_names: dict[str, str]
    target_names: dict[str, str]
    labels: dict[str, Any] | None
    file_ending: str
    cases: dict[str, Case]
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)
    reconstruction: dict[str, Any] | None = None
    degradation: dict[str, Any] | None = None
    allow_missing_channels: bool = False
    test_cases: dict[str, Case] = field(default_factory=dict)
    is_rgb: bool = False

    @property
    def num_channels(self) -> int:
        """Number of image channels (3 for an RGB dataset although each case has one file)."""
        return len(self.channel_names)

    @property
    def num_targets(self) -> int:
        return len(self.target_names)

    @property
    def files_per_case(self) -> int:
        """Image files per case: 1 for RGB, else the number of channels."""
        return 1 if self.is_rgb else self.num_channels

    def label_values(self) -> set[int]:
        """Every integer value a label map may hold (empty without labels)."""
        return schema.label_values(self.labels) if self.labels else set()

    def subjects(self) -> dict[str, str]:
        """Training case -> subject (the case id itself where metadata gives none)."""
        return {c: str(self.metadata.get(c, {}).get("subject", c)) for c in self.cases}

    def healthy(self) -> dict[str, bool | None]:
        """Training case -> ``healthy`` flag from metadata (``None`` when not given)."""
        return {c: self.metadata.get(c, {}).get("healthy") for c in self.cases}


def parse_dataset_folder_name(name: str) -> tuple[int | None, str]:
    """``Dataset004_Name`` -> ``(4, "Name")``; other names -> ``(None, name)``."""
    match = DATASET_FOLDER.match(name)
    return (int(match.group("id")), match.group("name")) if match else (None, name)


def find_dataset_folder(raw_root: str | Path, spec: int | str) -> Path:
    """Resolve ``"4"``, ``4``, ``"Dataset004"`` or ``"Dataset004_Name"`` to a folder in ``raw_root``.

    Raises :class:`DatasetError` if ``raw_root`` is missing, or no folder or several folders
    carry that id (listing what is there).
    """
    root = Path(raw_root)
    if not root.is_dir():
        raise DatasetError([(root, "the raw data folder does not exist",
                             "pass --raw DIR or set nnDiff_raw to the folder holding DatasetXXX_Name/")])
    text = str(spec).strip()
    candidates = sorted(p.name for p in root.iterdir() if p.is_dir() and DATASET_FOLDER.match(p.name))
    if DATASET_FOLDER.match(text):
        if (root / text).is_dir():
            return root / text
        raise DatasetError([(root / text, "does not exist",
                             f"check the name; datasets in {root}: {', '.join(candidates) or 'none'}")])
    match = re.fullmatch(r"(?:Dataset)?(\d{1,3})", text)
    if not match:
        raise DatasetError([(f"dataset {text!r}", "is neither an id (4, 004, Dataset004) nor a folder "
                             "name (Dataset004_Name)", "pass the dataset id or its full folder name")])
    dataset_id = int(match.group(1))
    hits = [c for c in candidates if parse_dataset_folder_name(c)[0] == dataset_id]
    if not hits:
        raise DatasetError([(root, f"holds no dataset with id {dataset_id} (Dataset{dataset_id:03d}_*)",
                             f"check --raw / nnDiff_raw and the id; found: {', '.join(candidates) or 'none'}")])
    if len(hits) > 1:
        raise DatasetError([(root, f"holds several datasets with id {dataset_id}: {', '.join(hits)}",
                             "rename one so that ids are unique, or pass the full folder name")])
    return root / hits[0]


def load_dataset(raw_dataset_dir: str | Path) -> RawDataset:
    """Parse and cheaply validate a raw dataset folder; raise :class:`DatasetError` with every problem.

    Checks: dataset.json syntax, keys, task, channel/target names, labels, file ending,
    conditions, reconstruction and degradation blocks; file naming, endings, duplicates, missing
    channel/label/target files; ``numTraining`` against the files; metadata.json fields and
    declared conditions. Opens no image and writes nothing.
    """
    root = Path(raw_dataset_dir)
    if not root.is_dir():
        raise DatasetError([(root, "is not a folder", "pass the path of a DatasetXXX_Name folder")])
    data, problems = schema.load_dataset_json(root / "dataset.json")
    if data is None:
        raise DatasetError(problems)
    problems = [_prefix(p, root) for p in schema.check_dataset_json(data)]
    if _blocks_discovery(data, problems):
        raise DatasetError(problems)
    dataset, discovery_problems = _discover(root, data)
    problems += discovery_problems
    if problems:
        raise DatasetError(problems)
    assert dataset is not None
    _log_metadata_notes(dataset)
    return dataset


def _prefix(problem: Problem, root: Path) -> Problem:
    """Qualify ``dataset.json key ...`` with the dataset path so messages stand alone."""
    if problem.where.startswith("dataset.json"):
        return Problem(str(root / problem.where), problem.problem, problem.fix)
    return problem


def _blocks_discovery(data: dict[str, Any], problems: list[Problem]) -> bool:
    """Discovery needs a valid task, file_ending and channel/target names; without them stop early."""
    blocking = ("task", "file_ending", "channel_names", "target_names")
    return any(f"key '{key}'" in p.where for p in problems for key in blocking)


def _discover(root: Path, data: dict[str, Any]) -> tuple[RawDataset | None, list[Problem]]:
    task = TaskFamily(data["task"])
    channel_names = {str(k): v for k, v in schema.channel_names_of(data).items()}
    target_names = {str(k): v for k, v in (data.get("target_names") or {}).items()}
    file_ending = data["file_ending"]
    allow_missing = bool(data.get("allow_missing_channels", False))
    is_rgb = rgb_layout(root, file_ending, len(channel_names))
    files_per_case = 1 if is_rgb else len(channel_names)
    problems: list[Problem] = []
    has_labels_dir = (root / "labelsTr").is_dir()
    problems += _layout_problems(root, data, task, has_labels_dir)
    labels_required = (task == TaskFamily.SEGMENTATION
                       or (has_labels_dir and task != TaskFamily.ANOMALY_DETECTION))
    train_layout = SplitLayout("Tr", file_ending, files_per_case, len(target_names), labels_required,
                               targets_required=bool(target_names), allow_missing_channels=allow_missing)
    if "dataset" in data:
        cases, split_problems = cases_from_listing(root, data["dataset"], files_per_case, len(target_names))
        num_found = len(data["dataset"]) if isinstance(data["dataset"], dict) else 0
    else:
        train = discover_split(root, train_layout)
        cases, split_problems = train.cases, train.problems
        num_found = len(train.cases) + len(train.incomplete)
    problems += split_problems
    test_layout = SplitLayout("Ts", file_ending, files_per_case, len(target_names), False, False, allow_missing)
    test = discover_split(root, test_layout)
    test_cases = test.cases
    problems += test.problems
    problems += _num_training_problems(root, data, num_found)
    metadata, meta_problems = meta.load_metadata(root)
    problems += meta_problems
    metadata_path = root / meta.METADATA_FILE
    problems += meta.check_reserved_fields(metadata, metadata_path)
    conditions = schema.normalized_conditions(data)
    problems += meta.check_conditions_present(metadata, conditions, sorted(cases), metadata_path)
    if problems:
        return None, problems
    name = root.name
    dataset_id, _ = parse_dataset_folder_name(name)
    return RawDataset(
        root=root, name=name, dataset_id=dataset_id, json=data, task=task,
        channel_names=dict(sorted(channel_names.items(), key=lambda kv: int(kv[0]))),
        target_names=dict(sorted(target_names.items(), key=lambda kv: int(kv[0]))),
        labels=data.get("labels"), file_ending=file_ending, cases=cases, metadata=metadata,
        conditions=conditions, reconstruction=data.get("reconstruction"),
        degradation=data.get("degradation"), allow_missing_channels=allow_missing,
        test_cases=test_cases, is_rgb=is_rgb,
    ), []


def _layout_problems(root: Path, data: dict[str, Any], task: TaskFamily, has_labels_dir: bool) -> list[Problem]:
    """Folders that must (or must not) exist given dataset.json."""
    problems = []
    if "dataset" not in data and not (root / "imagesTr").is_dir():
        problems.append(Problem(str(root / "imagesTr"), "is missing",
                                "put the training images in imagesTr/ as {CASE}_{XXXX}" + data["file_ending"]))
    if task == TaskFamily.SEGMENTATION and "dataset" not in data and not has_labels_dir:
        problems.append(Problem(str(root / "labelsTr"), "is missing; the segmentation task needs label maps",
                                "put one label map per case in labelsTr/ as {CASE}" + data["file_ending"]))
    if has_labels_dir and "labels" not in data:
        problems.append(Problem(str(root / "dataset.json key 'labels'"),
                                "is missing although labelsTr/ exists",
                                'declare the label values, e.g. "labels": {"background": 0, "lesion": 1}'))
    if data.get("target_names") and "dataset" not in data and not (root / "targetsTr").is_dir():
        problems.append(Problem(str(root / "targetsTr"), "is missing although dataset.json declares target_names",
                                "put the targets in targetsTr/ as {CASE}_{XXXX}" + data["file_ending"]))
    if (root / "targetsTr").is_dir() and not data.get("target_names"):
        problems.append(Problem(str(root / "dataset.json key 'target_names'"),
                                "is missing although targetsTr/ exists",
                                'declare the targets, e.g. "target_names": {"0": "CT"}'))
    return problems


def _num_training_problems(root: Path, data: dict[str, Any], found: int) -> list[Problem]:
    """``numTraining`` must equal the number of training case ids found (complete or not)."""
    n = data.get("numTraining")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return []  # already reported by the schema check
    if found == 0 and "dataset" not in data and not (root / "imagesTr").is_dir():
        return []  # the missing folder is reported by _layout_problems
    if found == 0:
        return [Problem(str(root / "imagesTr"), "holds no training cases",
                        "add images named {CASE}_{XXXX}" + data["file_ending"])]
    if found != n:
        return [Problem(str(root / "dataset.json key 'numTraining'"),
                        f"is {n} but {found} training cases were found",
                        f"set numTraining to {found}, or add/remove cases")]
    return []


def _log_metadata_notes(dataset: RawDataset) -> None:
    stray = meta.unknown_cases(dataset.metadata, list(dataset.cases) + list(dataset.test_cases))
    if stray:
        logger.warning("%s: metadata.json has entries for %d unknown case(s) (ignored): %s",
                       dataset.name, len(stray), ", ".join(stray[:10]))
    if dataset.target_names and dataset.task not in (TaskFamily.TRANSLATION, TaskFamily.DENOISING):
        logger.warning("%s: target_names are declared but task %s does not use targets",
                       dataset.name, dataset.task)
