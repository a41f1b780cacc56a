"""Convert SynthRAD2023 (MR -> CT, Task 1; CBCT -> CT, Task 2) into an nnDiff translation dataset.

Source layout (as released; ``-i`` may be ``Task1``, ``Task1/brain`` or a folder holding both
tasks' anatomy folders)::

    Task1/brain/1BA001/{mr,ct,mask}.nii.gz      Task1/pelvis/1PA001/{mr,ct,mask}.nii.gz
    Task2/brain/2BA001/{cbct,ct,mask}.nii.gz    Task2/pelvis/2PC001/{cbct,ct,mask}.nii.gz

A patient folder is any folder holding ``mr.nii.gz`` or ``cbct.nii.gz``. One case per patient
(case id and subject = the patient id, e.g. ``1BA001``): ``imagesTr/{id}_0000.nii.gz`` the MR or
CBCT, ``targetsTr/{id}_0000.nii.gz`` the CT in HU (the released values, unchanged), geometry as
released (the three files of a patient share one grid; a mismatch is an error). The body mask
goes to ``masksTr/{id}.nii.gz`` (uint8 0/1, outside the raw layout's checked folders) and its path
is ``body_mask`` in ``metadata.json``: the challenge scores MAE/PSNR/SSIM inside this mask, while
nnDiff's translation evaluation derives its own body mask from the reference CT by a threshold
(documentation/translation.md); the kept mask allows challenge-identical scoring.

Patients without ``ct.nii.gz`` (the validation/test releases) are an error unless
``--no_ct_to_test``: then they go to ``imagesTs/`` (+ ``masksTs/``), ready for prediction.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nndiff.dataset.io import ImageProperties, geometry_differences, read_file
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
from nndiff.utils.files import save_json

logger = logging.getLogger(__name__)

#: Input modality -> its file name and channel name (the name drives nnDiff's modality rules).
INPUTS: dict[str, tuple[str, str]] = {"mr": ("mr.nii.gz", "MR"), "cbct": ("cbct.nii.gz", "CBCT")}
CT_FILE = "ct.nii.gz"
MASK_FILE = "mask.nii.gz"
ANATOMIES = ("brain", "pelvis")
CONVERSION_RECORD = "synthrad_conversion.json"
REFERENCE = "Thummerer et al., SynthRAD2023 Grand Challenge dataset, Med Phys 2023; https://synthrad2023.grand-challenge.org"
LICENCE = "CC BY-NC 4.0"


@dataclass(frozen=True)
class SynthradPatient:
    """One patient folder: id (folder name), anatomy (brain/pelvis, from the parent folder) and files."""

    patient: str
    anatomy: str
    folder: Path


def find_patients(source: Path, modality: str) -> list[SynthradPatient]:
    """Patient folders under ``source`` holding the ``modality`` file, sorted by id; ids must be unique."""
    file_name = INPUTS[modality][0]
    patients = [SynthradPatient(p.parent.name, p.parent.parent.name, p.parent)
                for p in sorted(source.rglob(file_name))]
    if (source / file_name).is_file():  # -i points at one patient folder
        patients = [SynthradPatient(source.name, source.parent.name, source)]
    ids = [p.patient for p in patients]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise NnDiffError(f"{source}: patient id(s) {duplicates} occur in more than one folder. Fix: convert "
                          "Task1 and Task2 (or copies) separately")
    return patients


def detect_modality(source: Path) -> str:
    """``mr`` or ``cbct``, whichever files exist under ``source``; both or neither is an error."""
    present = [m for m, (name, _) in INPUTS.items() if next(source.rglob(name), None) is not None]
    if len(present) != 1:
        what = "both mr.nii.gz and cbct.nii.gz" if present else "no mr.nii.gz or cbct.nii.gz"
        raise NnDiffError(f"{source} holds {what} patient files. Fix: pass -i with Task1 (MR) or Task2 (CBCT), "
                          "or --source mr|cbct")
    return present[0]


def _read(path: Path) -> tuple[np.ndarray, ImageProperties]:
    array, props = read_file(path)
    return array[0], props


def _check_same_grid(patient: SynthradPatient, reference: ImageProperties, shape: tuple[int, ...],
                     other: Path, props: ImageProperties, other_shape: tuple[int, ...]) -> None:
    problems = geometry_differences(reference, props)
    if shape != other_shape:
        problems.insert(0, f"shape {other_shape} vs {shape}")
    if problems:
        raise NnDiffError(f"{other}: not on the grid of the patient's input image ({'; '.join(problems)}). "
                          f"Fix: resample it onto {patient.folder} input's grid or drop patient {patient.patient}")


def _write_patient(folder: Path, patient: SynthradPatient, modality: str, split: str) -> dict[str, Any]:
    """Write input, CT target (training) and mask of one patient; returns its metadata entry."""
    image, props = _read(patient.folder / INPUTS[modality][0])
    kind, mask_kind = ("imagesTr", "masksTr") if split == "train" else ("imagesTs", "masksTs")
    write_case_image(folder, kind, patient.patient, 0, image.astype(np.float32), props, ".nii.gz")
    if split == "train":
        ct_path = patient.folder / CT_FILE
        ct, ct_props = _read(ct_path)
        _check_same_grid(patient, props, image.shape, ct_path, ct_props, ct.shape)
        write_case_image(folder, "targetsTr", patient.patient, 0, ct.astype(np.float32), props, ".nii.gz")
    entry: dict[str, Any] = {"anatomy": patient.anatomy}
    mask_path = patient.folder / MASK_FILE
    if mask_path.is_file():
        mask, mask_props = _read(mask_path)
        _check_same_grid(patient, props, image.shape, mask_path, mask_props, mask.shape)
        write_case_image(folder, mask_kind, patient.patient, None, (mask > 0).astype(np.uint8), props, ".nii.gz")
        entry["body_mask"] = f"{mask_kind}/{patient.patient}.nii.gz"
    else:
        logger.warning("SynthRAD patient %s has no %s: no body mask kept", patient.patient, MASK_FILE)
    return entry


def convert_synthrad(source: str | Path, raw_root: str | Path, dataset_id: int, modality: str | None = None,
                     no_ct_to_test: bool = False, name: str | None = None) -> Path:
    """Write the SynthRAD2023 translation dataset (``modality`` -> CT); returns its folder."""
    source = require_input(Path(source), "a SynthRAD2023 folder (Task1/brain/1BA001/mr.nii.gz, ...)",
                           "pass -i with the unpacked Task1 or Task2 folder")
    modality = modality or detect_modality(source)
    patients = find_patients(source, modality)
    if not patients:
        raise NnDiffError(f"{source} holds no patient folder with {INPUTS[modality][0]}. Fix: pass -i with the "
                          "unpacked Task1 (MR) or Task2 (CBCT) folder")
    without_ct = [p for p in patients if not (p.folder / CT_FILE).is_file()]
    if without_ct and not no_ct_to_test:
        raise NnDiffError(f"{without_ct[0].folder}: patient {without_ct[0].patient} has no {CT_FILE} "
                          f"({len(without_ct)} patient(s) without CT). Fix: add the CT, remove the folder, or pass "
                          "--no_ct_to_test to write patients without CT to imagesTs/ for prediction")
    train = [p for p in patients if p not in without_ct]
    if not train:
        raise NnDiffError(f"{source}: no patient has {CT_FILE}, so there is nothing to train on. Fix: convert the "
                          "training release (with ct.nii.gz)")
    name = name or f"SynthRAD2023{INPUTS[modality][1]}toCT"
    with dataset_writer(raw_root, dataset_id, name) as folder:
        metadata = {p.patient: _write_patient(folder, p, modality, "train") for p in train}
        for p in without_ct:
            _write_patient(folder, p, modality, "test")
        dataset = dataset_json(task="translation", channel_names={0: INPUTS[modality][1]}, target_names={0: "CT"},
                               num_training=len(train), file_ending=".nii.gz", name=name, reference=REFERENCE,
                               licence=LICENCE, description=f"SynthRAD2023 {INPUTS[modality][1]} -> CT (HU); body "
                                                            "masks in masksTr/ (metadata body_mask)")
        write_dataset_files(folder, dataset, {p.patient: p.patient for p in train}, metadata)
        save_json({"source": str(source), "modality": modality, "train": [p.patient for p in train],
                   "test_without_ct": [p.patient for p in without_ct]}, folder / CONVERSION_RECORD)
    return Path(raw_root) / dataset_folder_name(dataset_id, name)


def convert_parser() -> argparse.ArgumentParser:
    """Arguments of ``nndiff_convert_synthrad``."""
    p = converter_parser("nndiff_convert_synthrad", "Convert SynthRAD2023 Task1 (MR->CT) or Task2 (CBCT->CT) "
                         "patient folders into an nnDiff translation dataset.")
    p.add_argument("--source", choices=list(INPUTS), default=None,
                   help="input modality (default: detected from the files)")
    p.add_argument("--no_ct_to_test", action="store_true",
                   help="write patients without ct.nii.gz to imagesTs/ instead of failing")
    return p


def _convert(args: argparse.Namespace, raw_root: Path) -> Path:
    return convert_synthrad(args.input, raw_root, args.dataset_id, args.source, args.no_ct_to_test, args.name)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``nndiff_convert_synthrad``; returns the exit code."""
    return run_converter(convert_parser(), _convert, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
