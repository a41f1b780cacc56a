"""Convert low-dose CT pairs in the Mayo / AAPM Low Dose CT Grand Challenge layout into a paired
nnDiff denoising dataset.

Source layout (one folder per patient, one DICOM series per dose and slice thickness)::

    SRC/L067/quarter_3mm/L067_QD_3_1.CT.0004.0001.2015....IMA   (any file names; GDCM finds the series)
    SRC/L067/full_3mm/L067_FD_3_1.CT.0002.0001.2015....IMA
    SRC/L096/quarter_3mm/...   SRC/L096/full_3mm/...

One 3D case per patient (case id and subject = the folder name): ``imagesTr/{id}_0000.nii.gz`` the
quarter-dose volume (noisy input), ``targetsTr/{id}_0000.nii.gz`` the full-dose volume (clean
target), both in HU: SimpleITK/GDCM applies RescaleSlope/RescaleIntercept while reading the series.
The two series of a patient must share shape, spacing, origin and direction (they are
reconstructions of one scan); any difference is an error naming both folders. ``--test_patients``
sends patients to ``imagesTs/`` + ``targetsTs/`` (e.g. L506, often held out in publications).
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nndiff.utils.process_locale import preserves_locale
from nndiff.dataset.io import ImageProperties, geometry_differences
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

#: Dose folder names: quarter_3mm, full_1mm, ... (dose, reconstruction slice thickness).
DOSE_FOLDER = re.compile(r"^(quarter|full)_(\w+)$")
CONVERSION_RECORD = "lowdose_ct_conversion.json"
REFERENCE = ("McCollough et al., Low-dose CT for the detection and classification of metastatic liver lesions: "
             "results of the 2016 Low Dose CT Grand Challenge, Med Phys 2017; TCIA LDCT-and-Projection-data")
LICENCE = "see the data provider's terms (TCIA / Mayo Clinic)"


def dose_folders(patient: Path) -> dict[tuple[str, str], Path]:
    """``{(dose, thickness): folder}`` of one patient folder."""
    found: dict[tuple[str, str], Path] = {}
    for sub in sorted(p for p in patient.iterdir() if p.is_dir()):
        match = DOSE_FOLDER.match(sub.name)
        if match:
            found[(match.group(1), match.group(2))] = sub
    return found


def pick_thickness(patients: dict[str, dict[tuple[str, str], Path]], thickness: str | None, source: Path) -> str:
    """The slice thickness folder suffix to convert: ``thickness`` or the only one present."""
    available = sorted({t for folders in patients.values() for (_, t) in folders})
    if thickness is not None:
        if thickness not in available:
            raise NnDiffError(f"{source}: no quarter_{thickness}/full_{thickness} folders (found {available}). "
                              "Fix: pass --thickness with one of those")
        return thickness
    if len(available) != 1:
        raise NnDiffError(f"{source} holds several slice thicknesses {available}. Fix: pick one with --thickness")
    return available[0]


@preserves_locale  # GDCM may switch the C locale (nndiff/utils/process_locale.py)
def read_dicom_series(folder: Path) -> tuple[np.ndarray, ImageProperties]:
    """The one DICOM series in ``folder`` as a (Z, Y, X) array in HU (rescale applied by GDCM) + geometry."""
    import SimpleITK as sitk  # noqa: PLC0415  (lazy, as nndiff.dataset.io)

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series) != 1:
        what = "no DICOM series" if not series else f"{len(series)} DICOM series"
        raise NnDiffError(f"{folder} holds {what}; one series per dose folder is expected. Fix: keep only that "
                          "dose's slices in the folder")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image)
    props = ImageProperties(spacing=tuple(float(s) for s in reversed(image.GetSpacing())),  # type: ignore[arg-type]
                            origin=tuple(float(o) for o in image.GetOrigin()),
                            direction=tuple(float(d) for d in image.GetDirection()), spatial_dims=3,
                            shape=tuple(int(s) for s in array.shape))  # type: ignore[arg-type]
    return _compact(array), props


def _compact(array: np.ndarray) -> np.ndarray:
    """int16 when the HU values are whole and fit (the usual case: halves the files), else float32."""
    if np.issubdtype(array.dtype, np.integer) and array.min() >= -32768 and array.max() <= 32767:
        return array.astype(np.int16)
    return array.astype(np.float32)


def check_pair_geometry(quarter: Path, q_props: ImageProperties, full: Path, f_props: ImageProperties) -> None:
    """Quarter- and full-dose series must lie on one grid (no resampling: it would blur the noise)."""
    problems = geometry_differences(q_props, f_props)
    if q_props.shape != f_props.shape:
        problems.insert(0, f"shape {q_props.shape} vs {f_props.shape}")
    if problems:
        raise NnDiffError(f"{quarter} and {full} differ in geometry ({'; '.join(problems)}). Fix: use the quarter- "
                          "and full-dose reconstructions of the same scan with the same slice thickness")


def find_patients(source: Path, thickness: str | None) -> tuple[dict[str, tuple[Path, Path]], str]:
    """``{patient: (quarter folder, full folder)}`` and the thickness chosen; a patient with one dose is an error."""
    folders = {p.name: dose_folders(p) for p in sorted(source.iterdir()) if p.is_dir()}
    folders = {k: v for k, v in folders.items() if v}
    if not folders:
        raise NnDiffError(f"{source} holds no patient folder with quarter_*/full_* DICOM folders (Mayo layout "
                          "L067/quarter_3mm, L067/full_3mm). Fix: pass -i with the folder holding the patients")
    chosen = pick_thickness(folders, thickness, source)
    pairs: dict[str, tuple[Path, Path]] = {}
    for patient, doses in folders.items():
        missing = [d for d in ("quarter", "full") if (d, chosen) not in doses]
        if len(missing) == 2:
            continue  # this patient only has other thicknesses
        if missing:
            raise NnDiffError(f"{source / patient}: no {missing[0]}_{chosen} folder, so no pair. Fix: add it or "
                              "remove the patient folder")
        pairs[patient] = (doses[("quarter", chosen)], doses[("full", chosen)])
    return pairs, chosen


def convert_lowdose_ct(source: str | Path, raw_root: str | Path, dataset_id: int, thickness: str | None = None,
                       test_patients: Sequence[str] = (), name: str | None = None) -> Path:
    """Write the paired denoising dataset (quarter -> full dose, HU); returns its folder."""
    source = require_input(Path(source), "a folder of Mayo patient folders (L067/quarter_3mm, L067/full_3mm)",
                           "pass -i with the low-dose CT folder")
    pairs, chosen = find_patients(source, thickness)
    unknown = sorted(set(test_patients) - set(pairs))
    if unknown:
        raise NnDiffError(f"--test_patients {unknown} are not patients of {source} (found {sorted(pairs)}). "
                          "Fix: name existing patient folders")
    train = [p for p in pairs if p not in test_patients]
    if not train:
        raise NnDiffError("every patient is a test patient: nothing to train on. Fix: hold out fewer patients")
    name = name or f"LowDoseCT{chosen}"
    metadata: dict[str, dict[str, Any]] = {}
    with dataset_writer(raw_root, dataset_id, name) as folder:
        for patient, (quarter, full) in pairs.items():
            split = "Ts" if patient in test_patients else "Tr"
            metadata[patient] = _write_pair(folder, patient, quarter, full, split)
        dataset = dataset_json(task="denoising", channel_names={0: "CT"}, target_names={0: "CT"},
                               num_training=len(train), file_ending=".nii.gz", name=name, reference=REFERENCE,
                               licence=LICENCE, description=f"quarter-dose (imagesTr) -> full-dose (targetsTr) CT, "
                                                            f"{chosen} slices, HU")
        write_dataset_files(folder, dataset, {p: p for p in train}, {p: metadata[p] for p in train})
        save_json({"source": str(source), "thickness": chosen, "train": train, "test": list(test_patients),
                   "series": metadata}, folder / CONVERSION_RECORD)
    return Path(raw_root) / dataset_folder_name(dataset_id, name)


def _write_pair(folder: Path, patient: str, quarter: Path, full: Path, split: str) -> dict[str, Any]:
    noisy, q_props = read_dicom_series(quarter)
    clean, f_props = read_dicom_series(full)
    check_pair_geometry(quarter, q_props, full, f_props)
    write_case_image(folder, f"images{split}", patient, 0, noisy, q_props, ".nii.gz")
    write_case_image(folder, f"targets{split}", patient, 0, clean, q_props, ".nii.gz")
    return {"quarter_dose_series": quarter.name, "full_dose_series": full.name}


def convert_parser() -> argparse.ArgumentParser:
    """Arguments of ``nndiff_convert_lowdose_ct``."""
    p = converter_parser("nndiff_convert_lowdose_ct", "Convert Mayo/AAPM low-dose CT pairs (quarter_/full_ DICOM "
                         "series per patient) into a paired nnDiff denoising dataset in HU.")
    p.add_argument("--thickness", default=None, help="slice thickness folder suffix, e.g. 3mm or 1mm "
                   "(default: the only one present)")
    p.add_argument("--test_patients", nargs="*", default=[], help="patients written to imagesTs/targetsTs")
    return p


def _convert(args: argparse.Namespace, raw_root: Path) -> Path:
    return convert_lowdose_ct(args.input, raw_root, args.dataset_id, args.thickness, args.test_patients, args.name)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``nndiff_convert_lowdose_ct``; returns the exit code."""
    return run_converter(convert_parser(), _convert, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
