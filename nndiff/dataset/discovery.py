"""Case discovery in a raw dataset folder (``imagesTr``, ``labelsTr``, ``targetsTr``, ``*Ts``).

Naming follows nnU-Net v2: images and targets ``{CASE}_{XXXX}{file_ending}`` (``XXXX`` = channel
index), labels ``{CASE}{file_ending}``. nnU-Net's explicit ``"dataset"`` listing in dataset.json
is honoured too. Discovery only lists files: nothing is opened, so it is cheap and needs no
SimpleITK. Every naming defect becomes a :class:`~nndiff.dataset.schema.Problem`.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nndiff.dataset.io import SIDECAR_ENDINGS, file_ending_of, is_supported_ending
from nndiff.dataset.schema import Problem

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class Case:
    """One case: its channel files, optional label map and optional target files.

    ``images`` holds one path per image *file* in channel order; ``None`` marks a channel that is
    missing (only with ``allow_missing_channels``). With nnU-Net's RGB exception one file holds
    the three channels R, G, B, so ``images`` has a single entry.
    """

    identifier: str
    images: list[Path | None]
    label: Path | None = None
    targets: list[Path] = field(default_factory=list)

    def existing_images(self) -> list[Path]:
        """Image files that exist (skips channels missing under ``allow_missing_channels``)."""
        return [p for p in self.images if p is not None]

    def all_files(self) -> list[Path]:
        """Every file of the case: images, label, targets."""
        return self.existing_images() + ([self.label] if self.label else []) + list(self.targets)


@dataclass
class SplitLayout:
    """What a split (Tr or Ts) must contain, derived from dataset.json."""

    split: str  # "Tr" or "Ts"
    file_ending: str
    files_per_case: int  # image files per case (1 for an RGB natural image holding 3 channels)
    num_targets: int
    labels_required: bool  # every case needs a label file
    targets_required: bool
    allow_missing_channels: bool


def visible_files(folder: Path) -> list[Path]:
    """Sorted regular files of ``folder`` that are not hidden (dot files, e.g. .DS_Store, temp files)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _is_sidecar(path: Path, file_ending: str) -> bool:
    return path.suffix.lower() == ".json" and file_ending.lower() in SIDECAR_ENDINGS


def _split_name(path: Path, file_ending: str) -> tuple[str, str]:
    """(stem, ending) where ending is the dataset's ending when the name has it."""
    name = path.name
    ending = file_ending if name.endswith(file_ending) else file_ending_of(name)
    return name[: len(name) - len(ending)] if ending else name, ending


def _stray_or_wrong_ending(path: Path, ending: str, file_ending: str, folder_name: str) -> Problem:
    if is_supported_ending(ending):
        return Problem(str(path), f"has the ending {ending!r} but dataset.json 'file_ending' is {file_ending!r}",
                       f"convert it to {file_ending} (all files of a dataset share one format) or fix file_ending")
    return Problem(str(path), f"is a stray file, not a {file_ending} image",
                   f"remove it from {folder_name}/")


def scan_channel_folder(folder: Path, file_ending: str, num_channels: int,
                        what: str) -> tuple[dict[str, dict[int, Path]], list[Problem]]:
    """Map case -> {channel index: file} for ``{CASE}_{XXXX}{ending}`` files in ``folder``.

    Problems: names without the ``_XXXX`` suffix, wrong or foreign endings, the same case and
    channel present twice (e.g. two endings), channel indices beyond ``num_channels``.
    ``what`` is "channel" or "target" (used in messages).
    """
    problems: list[Problem] = []
    groups: dict[tuple[str, int], list[tuple[Path, str]]] = defaultdict(list)
    for path in visible_files(folder):
        if _is_sidecar(path, file_ending):
            continue
        stem, ending = _split_name(path, file_ending)
        match = _CHANNEL_SUFFIX.match(stem)
        if ending != file_ending and (not is_supported_ending(ending) or not match):
            problems.append(_stray_or_wrong_ending(path, ending, file_ending, folder.name))
            continue
        if not match:
            problems.append(Problem(str(path), f"does not follow the naming {{CASE}}_{{XXXX}}{file_ending} "
                                    f"(XXXX = 4-digit {what} index)",
                                    f"rename it, e.g. to {stem}_0000{file_ending}"))
            continue
        groups[(match.group("case"), int(match.group("channel")))].append((path, ending))
    found: dict[str, dict[int, Path]] = defaultdict(dict)
    for (case, channel), entries in sorted(groups.items()):
        if len(entries) > 1:
            names = ", ".join(p.name for p, _ in entries)
            problems.append(Problem(str(folder / f"{case}_{channel:04d}"),
                                    f"duplicate case id '{case}' ({what} {channel:04d}): found {names}",
                                    f"keep exactly one file per case and {what}, with the ending {file_ending}"))
            continue
        path, ending = entries[0]
        if ending != file_ending:
            problems.append(_stray_or_wrong_ending(path, ending, file_ending, folder.name))
            continue
        if channel >= num_channels:
            problems.append(Problem(str(path), f"has {what} index {channel:04d} but dataset.json declares "
                                    f"{num_channels} {what}(s)",
                                    f"remove the file or declare the {what} in dataset.json"))
            continue
        found[case][channel] = path
    problems += _case_collisions(found.keys(), folder)
    return dict(found), problems


def scan_label_folder(folder: Path, file_ending: str) -> tuple[dict[str, Path], list[Problem]]:
    """Map case -> label file for ``{CASE}{ending}`` files in ``folder``."""
    problems: list[Problem] = []
    groups: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for path in visible_files(folder):
        if _is_sidecar(path, file_ending):
            continue
        stem, ending = _split_name(path, file_ending)
        if ending != file_ending and not is_supported_ending(ending):
            problems.append(_stray_or_wrong_ending(path, ending, file_ending, folder.name))
            continue
        groups[stem].append((path, ending))
    found: dict[str, Path] = {}
    for case, entries in sorted(groups.items()):
        if len(entries) > 1:
            names = ", ".join(p.name for p, _ in entries)
            problems.append(Problem(str(folder / case), f"duplicate case id '{case}': found {names}",
                                    f"keep exactly one label file per case, with the ending {file_ending}"))
            continue
        path, ending = entries[0]
        if ending != file_ending:
            problems.append(_stray_or_wrong_ending(path, ending, file_ending, folder.name))
            continue
        found[case] = path
    problems += _case_collisions(found.keys(), folder)
    return found, problems


def _case_collisions(case_ids: Any, folder: Path) -> list[Problem]:
    """Case ids that differ only in letter case collide on macOS/Windows file systems."""
    by_lower: dict[str, list[str]] = defaultdict(list)
    for case in case_ids:
        by_lower[case.lower()].append(case)
    return [Problem(str(folder), f"duplicate case ids {sorted(ids)} differ only in letter case",
                    "rename one of them; they collide on case-insensitive file systems")
            for ids in by_lower.values() if len(ids) > 1]


def rgb_layout(root: Path, file_ending: str, num_channels: int) -> bool:
    """nnU-Net's RGB exception: a natural image format, 3 channels, only ``_0000`` files present."""
    from nndiff.dataset.schema import is_natural_ending

    if num_channels != 3 or not is_natural_ending(file_ending):
        return False
    suffixes = {f"_0001{file_ending}", f"_0002{file_ending}"}
    for split in ("Tr", "Ts"):
        for path in visible_files(root / f"images{split}"):
            if any(path.name.endswith(s) for s in suffixes):
                return False
    return True


@dataclass
class SplitResult:
    """Complete cases of a split, the ids of incomplete ones, and the problems found."""

    cases: dict[str, Case]
    incomplete: list[str]
    problems: list[Problem]


def discover_split(root: Path, layout: SplitLayout) -> SplitResult:
    """Cases of one split (``imagesTr``/``labelsTr``/``targetsTr`` or the ``Ts`` folders)."""
    split = layout.split
    images_dir, labels_dir, targets_dir = (root / f"images{split}", root / f"labels{split}",
                                           root / f"targets{split}")
    images, problems = scan_channel_folder(images_dir, layout.file_ending, layout.files_per_case, "channel")
    labels, label_problems = scan_label_folder(labels_dir, layout.file_ending)
    problems += label_problems
    targets: dict[str, dict[int, Path]] = {}
    if layout.num_targets:
        targets, target_problems = scan_channel_folder(targets_dir, layout.file_ending, layout.num_targets,
                                                       "target")
        problems += target_problems
    cases: dict[str, Case] = {}
    incomplete: list[str] = []
    for case_id, channels in images.items():
        case, case_problems = _assemble_case(case_id, channels, labels.get(case_id),
                                             targets.get(case_id, {}), layout, root)
        problems += case_problems
        if case is not None:
            cases[case_id] = case
        else:
            incomplete.append(case_id)
    for case_id in sorted(set(labels) - set(images)):
        problems.append(Problem(str(labels[case_id]), f"label of case '{case_id}' which has no images in "
                                f"{images_dir.name}/", f"add the images or remove the stray label file"))
    for case_id in sorted(set(targets) - set(images)):
        for path in targets[case_id].values():
            problems.append(Problem(str(path), f"target of case '{case_id}' which has no images in "
                                    f"{images_dir.name}/", "add the images or remove the stray target file"))
    return SplitResult(cases, incomplete, problems)


def _assemble_case(case_id: str, channels: dict[int, Path], label: Path | None,
                   targets: dict[int, Path], layout: SplitLayout,
                   root: Path) -> tuple[Case | None, list[Problem]]:
    problems: list[Problem] = []
    split, ending = layout.split, layout.file_ending
    missing = [c for c in range(layout.files_per_case) if c not in channels]
    if missing and not layout.allow_missing_channels:
        for c in missing:
            problems.append(Problem(str(root / f"images{split}" / f"{case_id}_{c:04d}{ending}"),
                                    f"is missing (case '{case_id}' has channels "
                                    f"{sorted(f'{k:04d}' for k in channels)})",
                                    "add the channel file, remove the case, or set "
                                    "\"allow_missing_channels\": true in dataset.json"))
    if layout.labels_required and label is None:
        problems.append(Problem(str(root / f"labels{split}" / f"{case_id}{ending}"),
                                f"is missing (label of case '{case_id}')",
                                f"add the label map or remove the case from images{split}/"))
    missing_targets = [t for t in range(layout.num_targets) if t not in targets]
    if layout.targets_required:
        for t in missing_targets:
            problems.append(Problem(str(root / f"targets{split}" / f"{case_id}_{t:04d}{ending}"),
                                    f"is missing (target {t:04d} of case '{case_id}')",
                                    f"add the target file or remove the case from images{split}/"))
    if problems:
        return None, problems
    case_targets = [targets[t] for t in range(layout.num_targets)] if not missing_targets else []
    return Case(case_id, [channels.get(c) for c in range(layout.files_per_case)], label,
                case_targets), []


def cases_from_listing(root: Path, listing: Any, num_files: int,
                       num_targets: int) -> tuple[dict[str, Case], list[Problem]]:
    """nnU-Net v2's explicit ``"dataset"`` key: ``{case: {"images": [...], "label": ...}}``.

    Relative paths are relative to the dataset folder. nnDiff also reads ``"targets": [...]``.
    """
    where = "dataset.json key 'dataset'"
    if not isinstance(listing, dict) or not listing:
        return {}, [Problem(where, "must be an object {case: {\"images\": [...], \"label\": ...}}",
                            "fix the listing or remove the key to use imagesTr/ discovery")]
    problems: list[Problem] = []
    cases: dict[str, Case] = {}

    def resolve(p: Any, entry: str) -> Path | None:
        if not isinstance(p, str):
            problems.append(Problem(entry, f"must be a file path, found {p!r}", "give the path as a string"))
            return None
        path = Path(p) if Path(p).is_absolute() else root / p
        if not path.is_file():
            problems.append(Problem(str(path), f"is listed in {entry} but does not exist",
                                    "fix the path or add the file"))
            return None
        return path

    for case_id, spec in listing.items():
        entry = f"{where} entry '{case_id}'"
        if not isinstance(spec, dict) or not isinstance(spec.get("images"), list):
            problems.append(Problem(entry, "must hold an 'images' list", 'write {"images": ["imagesTr/x_0000.nii.gz"]}'))
            continue
        if len(spec["images"]) != num_files:
            problems.append(Problem(f"{entry} key 'images'", f"lists {len(spec['images'])} files, "
                                    f"dataset.json declares {num_files} channel file(s)",
                                    "list one file per channel"))
            continue
        images = [resolve(p, f"{entry} key 'images'") for p in spec["images"]]
        label = resolve(spec["label"], f"{entry} key 'label'") if "label" in spec else None
        raw_targets = spec.get("targets", [])
        targets = [resolve(p, f"{entry} key 'targets'") for p in raw_targets]
        if num_targets and len(raw_targets) != num_targets:
            problems.append(Problem(f"{entry} key 'targets'", f"lists {len(raw_targets)} targets, "
                                    f"dataset.json declares {num_targets}", "list one file per target"))
            continue
        if all(p is not None for p in images + targets):
            cases[case_id] = Case(case_id, list(images), label, [t for t in targets if t is not None])
    return cases, problems
