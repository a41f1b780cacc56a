"""Convert IXI (per-subject T1 / T2 / PD NIfTI files) into an nnDiff translation dataset.

Source layout (the IXI downloads unpacked into one folder, or one folder per contrast)::

    SRC/IXI002-Guys-0828-T1.nii.gz
    SRC/IXI002-Guys-0828-T2.nii.gz
    SRC/IXI002-Guys-0828-PD.nii.gz
    SRC/IXI012-HH-1211-T1.nii.gz   ...   (or SRC/T1/..., SRC/T2/..., searched recursively)

One case per subject that has both ``--source`` and ``--target``: ``imagesTr/IXI002_0000.nii.gz``
(source contrast, its own geometry) and ``targetsTr/IXI002_0000.nii.gz``. Subjects lacking either
contrast are skipped and listed in ``ixi_conversion.json``; none left is an error.

Real IXI T2/PD volumes are **not registered** to T1 (other grid, other orientation, patient motion
between scans). This converter does not register: a target on a different grid is resampled onto
the source's grid through the two headers' world coordinates (linear interpolation, zero outside),
because nnDiff needs the channels and targets of a case on one grid. Register the contrasts first
(e.g. with ANTs/elastix) for voxel-accurate pairs; T2 and PD of one IXI subject share a grid.
"""
from __future__ import annotations

import argparse
import logging
import re
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

CONTRASTS: tuple[str, ...] = ("T1", "T2", "PD")
#: IXI file names: IXI<number>-<site>-<scan id>-<contrast>.nii[.gz]
IXI_FILE = re.compile(r"^(IXI\d+)-([A-Za-z]+)-(\d+)-(T1|T2|PD|MRA|DTI(?:-\d+)?)\.nii(?:\.gz)?$")
CONVERSION_RECORD = "ixi_conversion.json"
REFERENCE = "IXI dataset, https://brain-development.org/ixi-dataset/"
LICENCE = "CC BY-SA 3.0"


@dataclass(frozen=True)
class IxiSubject:
    """One IXI subject: id (``IXI002``), site (Guys, HH, IOP) and its contrast files."""

    subject: str
    site: str
    files: dict[str, Path]


def find_ixi_subjects(source: Path) -> dict[str, IxiSubject]:
    """All IXI subjects under ``source`` (recursive), keyed by subject id; duplicates are an error."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(source.rglob("IXI*.nii*")):
        match = IXI_FILE.match(path.name)
        if not match:
            continue
        subject, site, _, contrast = match.groups()
        entry = found.setdefault(subject, {"site": site, "files": {}})
        if contrast in entry["files"]:
            raise NnDiffError(f"{path}: subject {subject} has two {contrast} files ({entry['files'][contrast]}). "
                              "Fix: keep one copy per subject and contrast")
        entry["files"][contrast] = path
    return {s: IxiSubject(s, e["site"], e["files"]) for s, e in found.items()}


def resample_onto(array: np.ndarray, props: ImageProperties, reference: ImageProperties) -> np.ndarray:
    """``array`` (Z, Y, X) with geometry ``props`` resampled onto ``reference``'s grid in world
    coordinates (linear, zero outside): header geometry only, no registration."""
    import SimpleITK as sitk  # noqa: PLC0415  (lazy, as nndiff.dataset.io)

    moving = _sitk_image(array, props)
    fixed = _sitk_image(np.zeros(reference.shape, np.float32), reference)
    out = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _sitk_image(array: np.ndarray, props: ImageProperties) -> Any:
    import SimpleITK as sitk  # noqa: PLC0415

    image = sitk.GetImageFromArray(np.asarray(array, np.float32))
    image.SetSpacing(props.sitk_spacing())
    image.SetOrigin(props.origin)
    image.SetDirection(props.direction)
    return image


def _read_volume(path: Path) -> tuple[np.ndarray, ImageProperties]:
    array, props = read_file(path)
    return array[0].astype(np.float32), props


def convert_ixi(source: str | Path, raw_root: str | Path, dataset_id: int, source_contrast: str = "T1",
                target_contrast: str = "T2", name: str | None = None) -> Path:
    """Write the IXI translation dataset ``source_contrast -> target_contrast``; returns its folder."""
    source = require_input(Path(source), "a folder of IXI NIfTI files (IXI002-Guys-0828-T1.nii.gz, ...)",
                           "pass -i with the unpacked IXI folder")
    for contrast in (source_contrast, target_contrast):
        if contrast not in CONTRASTS:
            raise NnDiffError(f"unknown IXI contrast {contrast!r}. Fix: use one of {list(CONTRASTS)}")
    if source_contrast == target_contrast:
        raise NnDiffError(f"--source and --target are both {source_contrast}. Fix: pick two different contrasts")
    subjects = find_ixi_subjects(source)
    if not subjects:
        raise NnDiffError(f"{source} holds no IXI files named like IXI002-Guys-0828-T1.nii.gz. Fix: pass -i with "
                          "the folder the IXI tar files were unpacked into")
    pairs = {s: v for s, v in subjects.items() if {source_contrast, target_contrast} <= set(v.files)}
    skipped = {s: sorted(set((source_contrast, target_contrast)) - set(v.files))
               for s, v in subjects.items() if s not in pairs}
    for subject, missing in sorted(skipped.items()):
        logger.warning("IXI subject %s skipped: no %s file", subject, " / ".join(missing))
    if not pairs:
        raise NnDiffError(f"{source}: no subject has both {source_contrast} and {target_contrast} "
                          f"({len(skipped)} subject(s) skipped for a missing contrast). Fix: add the missing "
                          "contrast files or choose other --source/--target")
    name = name or f"IXI{source_contrast}to{target_contrast}"
    with dataset_writer(raw_root, dataset_id, name) as folder:
        metadata, resampled = _write_pairs(folder, pairs, source_contrast, target_contrast)
        dataset = dataset_json(task="translation", channel_names={0: source_contrast},
                               target_names={0: target_contrast}, num_training=len(pairs), file_ending=".nii.gz",
                               name=name, reference=REFERENCE, licence=LICENCE,
                               description=f"IXI {source_contrast} -> {target_contrast}; targets resampled onto "
                                           "the source grid by header geometry, not registered")
        write_dataset_files(folder, dataset, {c: c for c in pairs}, metadata)
        save_json({"source": str(source), "source_contrast": source_contrast, "target_contrast": target_contrast,
                   "cases": sorted(pairs), "skipped": skipped, "target_resampled": resampled,
                   "registered": False}, folder / CONVERSION_RECORD)
    logger.info("IXI: %d case(s), %d subject(s) skipped", len(pairs), len(skipped))
    return Path(raw_root) / dataset_folder_name(dataset_id, name)


def _write_pairs(folder: Path, pairs: dict[str, IxiSubject], src: str,
                 tgt: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Write each subject's source image and target (resampled onto the source grid if needed)."""
    metadata: dict[str, dict[str, Any]] = {}
    resampled: list[str] = []
    for case_id, subject in sorted(pairs.items()):
        image, props = _read_volume(subject.files[src])
        target, target_props = _read_volume(subject.files[tgt])
        if geometry_differences(props, target_props) or target.shape != image.shape:
            target = resample_onto(target, target_props, props)
            resampled.append(case_id)
        write_case_image(folder, "imagesTr", case_id, 0, image, props, ".nii.gz")
        write_case_image(folder, "targetsTr", case_id, 0, target, props, ".nii.gz")
        metadata[case_id] = {"site": subject.site}
    return metadata, resampled


def convert_parser() -> argparse.ArgumentParser:
    """Arguments of ``nndiff_convert_ixi``."""
    p = converter_parser("nndiff_convert_ixi", "Convert IXI T1/T2/PD NIfTI files into an nnDiff translation "
                         "dataset (one case per subject having both contrasts).")
    p.add_argument("--source", choices=CONTRASTS, default="T1", help="input contrast (default T1)")
    p.add_argument("--target", choices=CONTRASTS, default="T2", help="target contrast (default T2)")
    return p


def _convert(args: argparse.Namespace, raw_root: Path) -> Path:
    return convert_ixi(args.input, raw_root, args.dataset_id, args.source, args.target, args.name)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``nndiff_convert_ixi``; returns the exit code."""
    return run_converter(convert_parser(), _convert, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
