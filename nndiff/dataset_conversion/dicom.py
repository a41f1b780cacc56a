"""Convert folders of DICOM series into an nnDiff raw dataset (NIfTI with the series' geometry).

Source: any folder tree holding DICOM files; a folder may hold several series (told apart by
SeriesInstanceUID through GDCM, as ``SimpleITK.ImageSeriesReader.GetGDCMSeriesIDs`` does). Every
series is one case with one channel: ``{PatientID}_{NN}_0000.nii.gz`` (``NN`` counts the patient's
series in SeriesNumber order). Spacing, origin and direction come from the series as SimpleITK
reads it (slice positions sorted along the slice normal, rescale slope/intercept applied).
A one-slice series (radiographs, single slices) is written as a 2D image.

dataset.json: ``channel_names {"0": Modality}`` (the DICOM Modality tag, ``PT`` spelt ``PET`` so that
nnDiff recognises it); all series must share it (``--modality`` keeps only one).
metadata.json: ``subject`` = PatientID (cases of one patient stay in one fold), plus
``series_instance_uid``, ``series_description`` and ``source`` (folder relative to ``-i``).

Refused with a clear message: a folder tree without DICOM series; a series whose slice positions
are not evenly spaced (missing slices, mixed acquisitions); mixed modalities without ``--modality``;
tasks that need data DICOM series do not carry (labels, targets, acquisition model).
"""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nndiff.utils.process_locale import preserves_locale
from nndiff.dataset_conversion.common import (
    converter_parser,
    dataset_folder_name,
    dataset_json,
    dataset_writer,
    require_input,
    run_converter,
    write_dataset_files,
)
from nndiff.diffusion.options import TaskFamily
from nndiff.errors import NnDiffError

logger = logging.getLogger(__name__)

#: Families a bare image series can feed (the others need labels, targets or an acquisition model).
TASKS: tuple[str, ...] = ("generation", "denoising", "anomaly_detection")
_NEEDS = {"segmentation": "label maps", "translation": "paired target images",
          "reconstruction": "an acquisition model (k-space or sinograms)"}
ENDING = ".nii.gz"
TAG_PATIENT_ID = "0010|0020"
TAG_MODALITY = "0008|0060"
TAG_SERIES_UID = "0020|000e"
TAG_SERIES_NUMBER = "0020|0011"
TAG_SERIES_DESCRIPTION = "0008|103e"
TAG_POSITION = "0020|0032"
#: DICOM Modality values renamed to the names nnDiff's modality detection knows.
MODALITY_NAMES: dict[str, str] = {"PT": "PET", "DX": "XRAY", "CR": "XRAY"}
#: Largest relative deviation of a slice gap from the median gap before the series is refused.
SPACING_RTOL = 0.01


def _sitk() -> Any:
    import SimpleITK  # noqa: N813  (lazy: only converters and io need it)

    return SimpleITK


@dataclass
class Series:
    """One DICOM series: its folder, files (GDCM order), tags and the image read from it."""

    folder: Path
    files: list[str]
    patient_id: str
    modality: str
    uid: str
    number: int
    description: str
    image: Any


def _tag(reader: Any, key: str, default: str = "") -> str:
    return reader.GetMetaData(0, key).strip() if reader.HasMetaDataKey(0, key) else default


def check_slice_spacing(reader: Any, image: Any, folder: Path) -> None:
    """Refuse a series whose slice positions along the normal are not evenly spaced."""
    n = image.GetDepth()
    if n < 3:
        return
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    positions = []
    for i in range(n):
        if not reader.HasMetaDataKey(i, TAG_POSITION):
            return  # no positions: SimpleITK sorted by other means, nothing to compare
        positions.append(float(np.dot(normal, [float(v) for v in reader.GetMetaData(i, TAG_POSITION).split("\\")])))
    gaps = np.diff(np.sort(positions))
    median = float(np.median(gaps))
    if median <= 0 or np.max(np.abs(gaps - median)) > SPACING_RTOL * median:
        raise NnDiffError(f"{folder}: series {_tag(reader, TAG_SERIES_UID)} has uneven slice spacing (gaps "
                          f"{gaps.min():.3g}..{gaps.max():.3g} mm, median {median:.3g}): missing slices or mixed "
                          "acquisitions. Fix: restore the missing files or split the series")


@preserves_locale  # GDCM may switch the C locale (nndiff/utils/process_locale.py)
def read_series(folder: Path, uid: str) -> Series:
    """Read one series of ``folder`` with its tags; slice spacing checked."""
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    files = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise NnDiffError(f"{folder}: series {uid} cannot be read ({str(e).strip().splitlines()[-1][:200]}). "
                          "Fix: check that its files are complete DICOM images") from None
    check_slice_spacing(reader, image, folder)
    if image.GetDimension() == 3 and image.GetDepth() == 1:
        image = image[:, :, 0]  # one slice: a 2D image
    number = _tag(reader, TAG_SERIES_NUMBER, "0")
    return Series(folder, files, _tag(reader, TAG_PATIENT_ID, "anonymous") or "anonymous",
                  _tag(reader, TAG_MODALITY, "OT").upper(), uid, int(number) if number.lstrip("-").isdigit() else 0,
                  _tag(reader, TAG_SERIES_DESCRIPTION), image)


@preserves_locale  # GDCM may switch the C locale (nndiff/utils/process_locale.py)
def _series_ids(folder: Path) -> list[str]:
    """SeriesInstanceUIDs in ``folder`` (not below); ITK's "No Series were found" warning silenced."""
    sitk = _sitk()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # folders without DICOM are normal in a tree
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def find_series(source: Path) -> list[Series]:
    """Every DICOM series in ``source`` and its subfolders (any nesting)."""
    require_input(source, "a folder of DICOM series", "pass the folder holding the DICOM files")
    series = []
    for folder in [source] + sorted(p for p in source.rglob("*") if p.is_dir()):
        for uid in _series_ids(folder):
            series.append(read_series(folder, uid))
    if not series:
        raise NnDiffError(f"{source}: no DICOM series found in it or its subfolders. Fix: pass the folder "
                          "that holds the .dcm files (files without the DICM preamble are not recognised)")
    return series


def _safe(text: str) -> str:
    """PatientID as a case-id part: letters, digits and '-' only."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-") or "anonymous"


def case_ids(series: list[Series]) -> list[str]:
    """``{PatientID}_{NN}`` per series, NN counting each patient's series by SeriesNumber then UID."""
    counters: dict[str, int] = {}
    ids = {}
    for s in sorted(series, key=lambda s: (_safe(s.patient_id), s.number, s.uid)):
        patient = _safe(s.patient_id)
        ids[id(s)] = f"{patient}_{counters.get(patient, 0):02d}"
        counters[patient] = counters.get(patient, 0) + 1
    return [ids[id(s)] for s in series]


def _select_modality(series: list[Series], modality: str | None, source: Path) -> list[Series]:
    if modality is not None:
        kept = [s for s in series if s.modality == modality.upper()]
        if not kept:
            raise NnDiffError(f"{source}: no series has Modality {modality!r} "
                              f"(found {sorted({s.modality for s in series})})")
        return kept
    found = sorted({s.modality for s in series})
    if len(found) > 1:
        raise NnDiffError(f"{source}: series of several modalities {found}; a dataset has one channel name. "
                          "Fix: pass --modality to convert one of them (and run again for the others)")
    return series


def convert_dicom(source: str | Path, raw_root: str | Path, dataset_id: int, task: str = "generation",
                  name: str | None = None, modality: str | None = None) -> Path:
    """Convert every DICOM series below ``source`` (one case each); returns ``raw_root/DatasetXXX_Name``."""
    if task in _NEEDS:
        raise NnDiffError(f"task {task} needs {_NEEDS[task]}, which a DICOM series does not carry. Fix: convert "
                          f"with one of {list(TASKS)}, then add the missing parts to the raw dataset")
    if task not in TASKS:
        raise NnDiffError(f"task {task!r} is not one of {list(TASKS)}")
    source = Path(source)
    series = _select_modality(find_series(source), modality, source)
    dims = {s.image.GetDimension() for s in series}
    if len(dims) > 1:
        raise NnDiffError(f"{source}: single-slice and volume series are mixed; a dataset is 2D or 3D. "
                          "Fix: move the single-slice series to another folder")
    channel = MODALITY_NAMES.get(series[0].modality, series[0].modality)
    name = name or f"DICOM{_safe(channel).replace('-', '')}"
    ids = case_ids(series)
    sitk = _sitk()
    with dataset_writer(raw_root, dataset_id, name) as out:
        (out / "imagesTr").mkdir()
        subjects, extra = {}, {}
        for case_id, s in zip(ids, series):
            sitk.WriteImage(s.image, str(out / "imagesTr" / f"{case_id}_0000{ENDING}"), True)
            subjects[case_id] = s.patient_id
            extra[case_id] = {"series_instance_uid": s.uid, "series_description": s.description,
                              "source": str(s.folder.relative_to(source))}
        info = dataset_json(task=TaskFamily(task).value, channel_names={0: channel}, num_training=len(ids),
                            file_ending=ENDING, name=name, description=f"DICOM series from {source.name}")
        write_dataset_files(out, info, subjects, extra)
    logger.info("converted %d DICOM series of %d patients", len(ids), len(set(subjects.values())))
    return Path(raw_root) / dataset_folder_name(dataset_id, name)


def build_parser() -> argparse.ArgumentParser:
    p = converter_parser("nndiff_convert_dicom", "DICOM series folders -> nnDiff raw dataset (NIfTI with the "
                         "series' geometry, one case per series, subject = PatientID)", tasks=TASKS,
                         default_task="generation")
    p.add_argument("--modality", default=None, help="keep only series with this DICOM Modality (e.g. CT, MR)")
    return p


def _convert(args: argparse.Namespace, raw_root: Path) -> Path:
    return convert_dicom(args.input, raw_root, args.dataset_id, task=args.task, name=args.name,
                         modality=args.modality)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point ``nndiff_convert_dicom``; returns the exit code."""
    return run_converter(build_parser(), _convert, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
