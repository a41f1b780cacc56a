"""Convert BraTS (2021 and later) case folders into an nnDiff raw dataset.

Source layouts (one folder per case, skull-stripped, co-registered, 1 mm, 240x240x155)::

    BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz          (BraTS 2021)
    BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz    (BraTS 2023+)

Case folders are found at any depth below ``-i``. Channels are always ``T1, T1ce, T2, FLAIR``
(0..3; 2023's t1n, t1c, t2w, t2f are the same sequences). ``subject``: the case id (2021), the
id without the time-point suffix (2023, ``BraTS-GLI-00000``).

Tasks:

* ``segmentation``: label maps converted as nnU-Net's BraTS example does (value 1 = oedema,
  2 = necrosis / non-enhancing core, 3 = enhancing tumour; BraTS stores 1 = NCR, 2 = ED and
  4 (2021) or 3 (2023) = ET), trained as the challenge's regions whole tumour [1, 2, 3],
  tumour core [2, 3] and enhancing tumour [3] with ``regions_class_order`` [1, 2, 3]. Cases
  without a seg file (validation data) go to ``imagesTs/``.
* ``anomaly_detection``: 2D axial slices (all four channels). A slice is a *lesion* slice when it
  holds a tumour voxel (``healthy: false``, binary mask ``tumour`` = 1 in ``labelsTr/``); it is
  *healthy* (``healthy: true``, all-zero mask) when it holds no tumour voxel **and** lies at least
  ``healthy_margin_mm`` (default 5 mm) from the nearest tumour slice; slices in between are
  dropped (partial-volume tumour borders). Slices whose brain area (any channel non-zero) is below
  ``min_brain_fraction`` of the case's largest are dropped. Cases without seg are skipped.
* ``translation``: missing-modality synthesis: the three other modalities -> ``--target``. A case
  lacking only the target goes to ``imagesTs/`` (BraSyn's validation layout).

A missing modality file is an error naming the file, except under ``--allow_missing``
(translation only): input modalities may be missing and ``allow_missing_channels`` is set.
"""
from __future__ import annotations

import argparse
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nndiff.dataset.io import ImageProperties, read_file, read_images, write_image
from nndiff.dataset_conversion.common import (
    converter_parser,
    dataset_folder_name,
    dataset_json,
    dataset_writer,
    require_input,
    run_converter,
    write_case_image,
    write_dataset_files,
)
from nndiff.errors import NnDiffError

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("segmentation", "anomaly_detection", "translation")
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
CHANNEL_NAMES: dict[str, str] = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
#: File suffix of each modality (and the seg) per naming scheme.
SUFFIXES: dict[str, dict[str, str]] = {
    "2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}
#: --target accepts either year's spelling.
TARGET_ALIASES: dict[str, str] = {"t1": "t1", "t1n": "t1", "t1ce": "t1ce", "t1c": "t1ce", "t2": "t2",
                                  "t2w": "t2", "flair": "flair", "t2f": "flair"}
ENDING = ".nii.gz"
#: BraTS label value -> nnU-Net's (1 ED, 2 NCR, 3 ET); 4 is 2021's ET, 3 is 2023's.
LABEL_MAP: dict[int, int] = {0: 0, 1: 2, 2: 1, 3: 3, 4: 3}
REGION_LABELS: dict[str, Any] = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                                 "enhancing tumor": [3]}
REGIONS_CLASS_ORDER: list[int] = [1, 2, 3]
REFERENCE = ("Baid et al., The RSNA-ASNR-MICCAI BraTS 2021 Benchmark, arXiv:2107.02314; "
             "Menze et al., IEEE TMI 2015")
LICENCE = "see the BraTS data use agreement of the release (Synapse)"
_CASE_2023 = re.compile(r"^(?P<subject>BraTS-[A-Za-z]+-\d+)-\d+$")


@dataclass(frozen=True)
class BratsCase:
    """One case folder: its id, subject, naming scheme, the files that exist (None: missing)."""

    case_id: str
    subject: str
    scheme: str
    folder: Path
    images: dict[str, Path | None]
    seg: Path | None

    def expected(self, key: str) -> Path:
        """The path the file of ``key`` (a modality or ``seg``) has in this case's scheme."""
        return self.folder / f"{self.case_id}{SUFFIXES[self.scheme][key]}{ENDING}"


def _scheme_of(folder: Path) -> str | None:
    for scheme, suffixes in SUFFIXES.items():
        if any((folder / f"{folder.name}{s}{ENDING}").is_file() for s in suffixes.values()):
            return scheme
    return None


def subject_of(case_id: str) -> str:
    """2023: ``BraTS-GLI-00000-001`` -> ``BraTS-GLI-00000`` (time points of one patient); else the id."""
    match = _CASE_2023.match(case_id)
    return match.group("subject") if match else case_id


def find_cases(source: Path) -> list[BratsCase]:
    """Every BraTS case folder below ``source`` (any depth), sorted by case id."""
    require_input(source, "a folder of BraTS case folders", "pass the unpacked training data folder")
    folders = [source] + sorted(p for p in source.rglob("*") if p.is_dir())
    cases = []
    for folder in folders:
        scheme = _scheme_of(folder)
        if scheme is None:
            continue
        case = BratsCase(folder.name, subject_of(folder.name), scheme, folder, {}, None)
        images = {m: case.expected(m) if case.expected(m).is_file() else None for m in MODALITIES}
        seg = case.expected("seg") if case.expected("seg").is_file() else None
        cases.append(BratsCase(case.case_id, case.subject, scheme, folder, images, seg))
    if not cases:
        raise NnDiffError(f"{source}: no BraTS case folder found (expected e.g. BraTS2021_00000/"
                          "BraTS2021_00000_flair.nii.gz or BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz). "
                          "Fix: pass the folder that holds the case folders")
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise NnDiffError(f"{source}: case folders {duplicates} occur more than once. Fix: keep one copy")
    return sorted(cases, key=lambda c: c.case_id)


def require_modalities(case: BratsCase, needed: Sequence[str]) -> None:
    """Error naming the first missing file of ``needed`` modalities."""
    for m in needed:
        if case.images[m] is None:
            raise NnDiffError(f"{case.expected(m)} does not exist: case {case.case_id} lacks {CHANNEL_NAMES[m]}. "
                              "Fix: add the file, remove the case folder, or (translation only) pass "
                              "--allow_missing")


def convert_labels(seg: np.ndarray, path: Path) -> np.ndarray:
    """BraTS label values -> nnU-Net's BraTS values (LABEL_MAP); unknown or mixed schemes are errors."""
    values = set(np.unique(seg).astype(int).tolist())
    unknown = sorted(values - set(LABEL_MAP))
    if unknown:
        raise NnDiffError(f"{path}: label values {unknown} are not BraTS labels (0, 1, 2 and 4 or 3). "
                          "Fix: check that this is a BraTS segmentation")
    if {3, 4} <= values:
        raise NnDiffError(f"{path}: holds both 3 and 4; BraTS uses 4 (2021) or 3 (2023) for enhancing tumour")
    lookup = np.zeros(max(LABEL_MAP) + 1, np.uint8)
    for source, target in LABEL_MAP.items():
        lookup[source] = target
    return lookup[seg.astype(np.int64)]


# --------------------------------------------------------------------------- segmentation


def _write_segmentation(cases: list[BratsCase], out: Path) -> tuple[dict[str, str], int]:
    subjects: dict[str, str] = {}
    for case in cases:
        require_modalities(case, MODALITIES)
        split = "Tr" if case.seg is not None else "Ts"
        (out / f"images{split}").mkdir(exist_ok=True)
        for c, m in enumerate(MODALITIES):
            shutil.copyfile(case.images[m], out / f"images{split}" / f"{case.case_id}_{c:04d}{ENDING}")
        if case.seg is not None:
            seg, props = read_file(case.seg)
            write_image(convert_labels(seg, case.seg), props, out / "labelsTr" / f"{case.case_id}{ENDING}")
            subjects[case.case_id] = case.subject
    return subjects, len(subjects)


# --------------------------------------------------------------------------- anomaly detection


def slice_properties(props: ImageProperties, z: int) -> ImageProperties:
    """2D geometry of axial slice ``z`` (array axis 0): in-plane spacing, origin of its first pixel."""
    direction = np.asarray(props.direction, dtype=np.float64).reshape(3, 3)
    sitk_spacing = np.asarray(props.sitk_spacing())
    origin = np.asarray(props.origin) + direction @ (sitk_spacing * np.array([0.0, 0.0, z]))
    return ImageProperties(spacing=(999.0, props.spacing[1], props.spacing[2]), origin=tuple(origin[:2].tolist()),
                           direction=tuple(direction[:2, :2].ravel().tolist()), spatial_dims=2,
                           shape=(1, props.shape[1], props.shape[2]))


def classify_slices(tumour: np.ndarray, brain: np.ndarray, spacing_z: float, healthy_margin_mm: float,
                    min_brain_fraction: float) -> dict[int, bool]:
    """Axial slice index -> healthy (True) or lesion (False); slices not returned are dropped.

    ``tumour``/``brain`` are (Z, Y, X) booleans. Rules in the module docstring.
    """
    area = brain.sum(axis=(1, 2))
    enough_brain = area >= min_brain_fraction * max(int(area.max()), 1)
    tumour_slices = np.flatnonzero(tumour.any(axis=(1, 2)))
    kept: dict[int, bool] = {}
    for z in np.flatnonzero(enough_brain & (area > 0)):
        if z in tumour_slices:
            kept[int(z)] = False
            continue
        distance = np.abs(tumour_slices - z).min() * spacing_z if tumour_slices.size else np.inf
        if distance >= healthy_margin_mm:
            kept[int(z)] = True
    return kept


def _write_anomaly(cases: list[BratsCase], out: Path, healthy_margin_mm: float, min_brain_fraction: float
                   ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    subjects: dict[str, str] = {}
    extra: dict[str, dict[str, Any]] = {}
    for case in cases:
        require_modalities(case, MODALITIES)
        if case.seg is None:
            logger.info("%s: no seg file, skipped (healthy slices cannot be told apart)", case.case_id)
            continue
        image, props = read_images([case.images[m] for m in MODALITIES])
        tumour = read_file(case.seg)[0][0] > 0
        slices = classify_slices(tumour, (image != 0).any(axis=0), props.spacing[0], healthy_margin_mm,
                                 min_brain_fraction)
        for z, healthy in slices.items():
            slice_id = f"{case.case_id}_z{z:03d}"
            sprops = slice_properties(props, z)
            for c in range(len(MODALITIES)):
                write_case_image(out, "imagesTr", slice_id, c, image[c, z][None], sprops, ENDING)
            write_case_image(out, "labelsTr", slice_id, None, tumour[z][None].astype(np.uint8), sprops, ENDING)
            subjects[slice_id] = case.subject
            extra[slice_id] = {"healthy": healthy}
    if not subjects:
        raise NnDiffError("no slice was written: every case lacks a seg file or has too little brain")
    return subjects, extra


# --------------------------------------------------------------------------- translation


def _write_translation(cases: list[BratsCase], out: Path, target: str, allow_missing: bool
                       ) -> tuple[dict[str, str], bool]:
    inputs = [m for m in MODALITIES if m != target]
    subjects: dict[str, str] = {}
    any_missing = False
    for case in cases:
        if not allow_missing:
            require_modalities(case, inputs)
        present = [m for m in inputs if case.images[m] is not None]
        if not present:
            raise NnDiffError(f"{case.folder}: none of the input modalities {[CHANNEL_NAMES[m] for m in inputs]} "
                              "exists. Fix: remove the case folder")
        any_missing |= len(present) < len(inputs)
        split = "Tr" if case.images[target] is not None else "Ts"
        (out / f"images{split}").mkdir(exist_ok=True)
        for c, m in enumerate(inputs):
            if case.images[m] is not None:
                shutil.copyfile(case.images[m], out / f"images{split}" / f"{case.case_id}_{c:04d}{ENDING}")
        if split == "Tr":
            (out / "targetsTr").mkdir(exist_ok=True)
            shutil.copyfile(case.images[target], out / "targetsTr" / f"{case.case_id}_0000{ENDING}")
            subjects[case.case_id] = case.subject
    if not subjects:
        raise NnDiffError(f"no case has the target {CHANNEL_NAMES[target]}: nothing to train on")
    return subjects, any_missing


# --------------------------------------------------------------------------- entry


def convert_brats(source: str | Path, raw_root: str | Path, dataset_id: int, task: str = "segmentation",
                  name: str | None = None, target: str = "t1ce", allow_missing: bool = False,
                  healthy_margin_mm: float = 5.0, min_brain_fraction: float = 0.1) -> Path:
    """Convert the BraTS case folders below ``source``; returns ``raw_root/DatasetXXX_Name``."""
    if task not in TASKS:
        raise NnDiffError(f"task {task!r} is not one of {list(TASKS)} for BraTS data")
    if allow_missing and task != "translation":
        raise NnDiffError("--allow_missing works with --task translation only (the other families "
                          "need every modality). Fix: drop it, or remove the incomplete cases")
    if target not in TARGET_ALIASES:
        raise NnDiffError(f"--target {target!r} is not one of {sorted(TARGET_ALIASES)}")
    if healthy_margin_mm < 0 or not 0 <= min_brain_fraction <= 1:
        raise NnDiffError("--healthy_margin_mm must be >= 0 and --min_brain_fraction within 0..1")
    target = TARGET_ALIASES[target]
    cases = find_cases(Path(source))
    name = name or {"segmentation": "BraTS", "anomaly_detection": "BraTSAnomaly2D",
                    "translation": f"BraTSTo{CHANNEL_NAMES[target]}"}[task]
    extra: dict[str, dict[str, Any]] = {}
    json_extra: dict[str, Any] = {"reference": REFERENCE, "licence": LICENCE}
    channels = dict(enumerate(CHANNEL_NAMES[m] for m in MODALITIES))
    with dataset_writer(raw_root, dataset_id, name) as out:
        if task == "segmentation":
            subjects, _ = _write_segmentation(cases, out)
            json_extra.update(labels=REGION_LABELS, regions_class_order=REGIONS_CLASS_ORDER)
        elif task == "anomaly_detection":
            subjects, extra = _write_anomaly(cases, out, healthy_margin_mm, min_brain_fraction)
            json_extra.update(labels={"background": 0, "tumour": 1}, healthy_margin_mm=healthy_margin_mm)
        else:
            subjects, any_missing = _write_translation(cases, out, target, allow_missing)
            channels = dict(enumerate(CHANNEL_NAMES[m] for m in MODALITIES if m != target))
            json_extra.update(target_names={0: CHANNEL_NAMES[target]})
            if any_missing:
                json_extra["allow_missing_channels"] = True
        if not subjects:
            raise NnDiffError(f"{source}: no case has a seg file, so there is no training case. "
                              "Fix: pass the training data folder")
        info = dataset_json(task=task, channel_names=channels, num_training=len(subjects), file_ending=ENDING,
                            name=name, description=f"BraTS converted for {task}", **json_extra)
        write_dataset_files(out, info, subjects, extra)
    logger.info("converted %d BraTS case folders into %d training cases", len(cases), len(subjects))
    return Path(raw_root) / dataset_folder_name(dataset_id, name)


def build_parser() -> argparse.ArgumentParser:
    p = converter_parser("nndiff_convert_brats", "BraTS 2021+ case folders -> nnDiff raw dataset "
                         "(segmentation regions, 2D anomaly detection slices, or missing-modality translation)",
                         tasks=TASKS, default_task="segmentation")
    p.add_argument("--target", default="t1ce", choices=sorted(TARGET_ALIASES),
                   help="translation: the modality to synthesise from the other three (default t1ce)")
    p.add_argument("--allow_missing", action="store_true",
                   help="translation: cases may lack input modalities (allow_missing_channels)")
    p.add_argument("--healthy_margin_mm", type=float, default=5.0,
                   help="anomaly detection: healthy slices lie at least this far from every tumour slice")
    p.add_argument("--min_brain_fraction", type=float, default=0.1,
                   help="anomaly detection: drop slices whose brain area is below this fraction of the largest")
    return p


def _convert(args: argparse.Namespace, raw_root: Path) -> Path:
    return convert_brats(args.input, raw_root, args.dataset_id, task=args.task, name=args.name, target=args.target,
                         allow_missing=args.allow_missing, healthy_margin_mm=args.healthy_margin_mm,
                         min_brain_fraction=args.min_brain_fraction)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point ``nndiff_convert_brats``; returns the exit code."""
    return run_converter(build_parser(), _convert, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
