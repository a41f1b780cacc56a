"""``nndiff_export_submission``: pack a folder of nnDiff predictions the way a challenge takes it.

Formats (sources in documentation/benchmarking.md):

- ``fastmri``: one HDF5 per volume, dataset ``reconstruction`` (slices, H, W) float32, centre-cropped
  to the challenge size (``--crop``, default 320 320), as fastMRI's ``save_reconstructions`` writes.
- ``brats``: one label NIfTI per case, named ``{CASE}.nii.gz``; labels mapped to the BraTS values of
  ``--year`` (2021: 0/1 NCR/2 ED/4 ET; 2023: 0/1 NCR/2 ED/3 ET) from dataset.json's label names.
- ``synthrad``: one sCT ``images/synthetic-ct/{PATIENT}.mha`` per patient in HU, float32, clipped
  to [-1024, 3000] as the SynthRAD2023 metrics do.
- ``msd``: ``TaskXX_Name/{CASE}.nii.gz`` label maps with the task's case names and label values.
- ``generic``: ``predictions.zip`` of the folder as it is.

Every package gets ``manifest.json`` (format, files with SHA-256, nnDiff / Python / library
versions, the command line, and the prediction's ``prediction_info.json``: model, seeds, plans hash).

Console-script line for setup.py: ``nndiff_export_submission=nndiff.run.submission:main``.
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import re
import shutil
import sys
import zipfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from nndiff.errors import NnDiffError
from nndiff.run.common import add_verbosity_flags, configure_logging, run_cli
from nndiff.utils.files import load_json, save_json

FORMATS = ("fastmri", "brats", "synthrad", "msd", "generic")
MANIFEST = "manifest.json"
PREDICTION_INFO = "prediction_info.json"
FASTMRI_CROP = (320, 320)
SYNTHRAD_HU_RANGE = (-1024.0, 3000.0)
SYNTHRAD_PATIENT = re.compile(r"^[12][BP][A-E]\d{3}$")  # task 1/2, Brain/Pelvis, centre, number
BRATS_2021_CASE = re.compile(r"^BraTS2021_\d{5}$")
BRATS_2023_CASE = re.compile(r"^BraTS-[A-Z]+-\d{5}-\d{3}$")
BRATS_SHAPE_XYZ = (240, 240, 155)
MSD_TASK = re.compile(r"^Task(\d{2})_\w+$")
#: Case-name prefix of each MSD task (the names of its imagesTs files).
MSD_PREFIXES = {"01": "BRATS_", "02": "la_", "03": "liver_", "04": "hippocampus_", "05": "prostate_",
                "06": "lung_", "07": "pancreas_", "08": "hepaticvessel_", "09": "spleen_", "10": "colon_"}


# --------------------------------------------------------------------------- reading predictions
def prediction_files(folder: Path) -> dict[str, Path]:
    """``{case: file}`` of the prediction images in ``folder`` (not sidecars, _std maps or subfolders)."""
    from nndiff.dataset.io import file_ending_of, is_supported_ending, strip_ending

    if not folder.is_dir():
        raise NnDiffError(f"prediction folder {folder} does not exist. Fix: pass nndiff_predict's -o folder with -i")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix == ".json":
            continue
        ending = file_ending_of(path)
        case = strip_ending(path, ending) if is_supported_ending(ending) else path.name
        if case.endswith("_std") or case.endswith("_complex"):
            continue  # uncertainty maps and complex copies are not part of a submission
        found[case] = path
    if not found:
        raise NnDiffError(f"{folder} holds no prediction images. Fix: pass nndiff_predict's output folder")
    return found


def _single_channel(path: Path) -> tuple[np.ndarray, Any]:
    from nndiff.dataset.io import read_file

    array, props = read_file(path)
    if array.shape[0] != 1:
        raise NnDiffError(f"{path}: {array.shape[0]} channels; a submission takes one image per case. "
                          "Fix: export single-target predictions")
    return array[0], props


def _integer_labels(path: Path, array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise NnDiffError(f"{path}: holds non-integer values (e.g. {array[array != np.round(array)].flat[0]:g}); "
                          "a label submission takes integer label maps. Fix: export the segmentation, not "
                          "probabilities or images")
    return array.astype(np.int64)


# --------------------------------------------------------------------------- formats
def center_crop(volume: np.ndarray, size: tuple[int, int], path: Path) -> np.ndarray:
    """Centre crop of the last two axes (fastMRI's rule: start at (dim - size) // 2)."""
    h, w = volume.shape[-2:]
    if h < size[0] or w < size[1]:
        raise NnDiffError(f"{path}: slices are {h}x{w}, smaller than the fastMRI crop {size[0]}x{size[1]}. "
                          "Fix: reconstruct at the full k-space size, or pass the challenge's --crop")
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return volume[..., top:top + size[0], left:left + size[1]]


def export_fastmri(files: dict[str, Path], out: Path, options: argparse.Namespace) -> list[Path]:
    import h5py

    written = []
    for case, path in files.items():
        volume, _ = _single_channel(path)  # (slices, H, W); a 2D prediction is one slice
        if np.iscomplexobj(volume):
            volume = np.abs(volume)  # the leaderboard scores magnitude images
        cropped = center_crop(volume, tuple(options.crop), path).astype(np.float32)
        target = out / f"{case}.h5"
        with h5py.File(target, "w") as f:
            f.create_dataset("reconstruction", data=cropped)
        written.append(target)
    return written


def _brats_class(name: str) -> str:
    """BraTS class of a dataset.json label / region name: NCR, ED or ET (error otherwise)."""
    text = name.lower().replace("_", " ").replace("-", " ")
    if "necro" in text or "ncr" in text or "non enhanc" in text or "core" in text:
        return "NCR"
    if "enhanc" in text or text in ("et",):
        return "ET"
    if "edema" in text or "oedema" in text or "whole" in text or text in ("ed",):
        return "ED"
    raise NnDiffError(f"dataset.json label {name!r} is not a BraTS class (necrosis/NCR, edema/ED, enhancing/ET, "
                      "or the regions whole tumor / tumor core / enhancing tumor). Fix: rename it in dataset.json")


def brats_mapping(dataset: dict, year: int, source: Path) -> dict[int, int]:
    """nnDiff label value -> BraTS value, from label names (region datasets: via regions_class_order)."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise NnDiffError(f"{source} has no 'labels'. Fix: pass the dataset.json the model was trained on")
    et = 4 if year == 2021 else 3
    values = {"NCR": 1, "ED": 2, "ET": et}
    foreground = [(n, v) for n, v in labels.items() if v != 0 and v != [0]]
    mapping = {0: 0}
    if any(isinstance(v, list) for _, v in foreground):
        order = dataset.get("regions_class_order")
        if not isinstance(order, list) or len(order) != len(foreground):
            raise NnDiffError(f"{source}: region labels need 'regions_class_order' with one value per region")
        for (name, _), value in zip(foreground, order):
            mapping[int(value)] = values[_brats_class(name)]
    else:
        for name, value in foreground:
            mapping[int(value)] = values[_brats_class(name)]
    return mapping


def _geometry_xyz(props: Any) -> tuple[int, ...]:
    return tuple(reversed(props.shape))


def export_brats(files: dict[str, Path], out: Path, options: argparse.Namespace) -> list[Path]:
    from nndiff.dataset.io import write_image

    dataset = _dataset_json(options)
    mapping = brats_mapping(dataset, options.year, options.dataset_json)
    pattern = BRATS_2021_CASE if options.year == 2021 else BRATS_2023_CASE
    example = "BraTS2021_00000" if options.year == 2021 else "BraTS-GLI-00000-000"
    written = []
    for case, path in files.items():
        if not pattern.match(case):
            raise NnDiffError(f"{path}: case name {case!r} is not a BraTS {options.year} id (e.g. {example}). "
                              "Fix: keep the challenge's case names when converting, or choose the right --year")
        labels, props = _single_channel(path)
        if _geometry_xyz(props) != BRATS_SHAPE_XYZ:
            raise NnDiffError(f"{path}: size {_geometry_xyz(props)} (x, y, z), but BraTS labels are "
                              f"{BRATS_SHAPE_XYZ} in the challenge's 1 mm SRI-24 space. Fix: predict on the "
                              "challenge images without resampling")
        labels = _integer_labels(path, labels)
        unknown = sorted(set(np.unique(labels).tolist()) - set(mapping))
        if unknown:
            raise NnDiffError(f"{path}: label value(s) {unknown} not in {options.dataset_json} labels "
                              f"{sorted(mapping)}. Fix: pass the dataset.json of the model that predicted them")
        mapped = np.zeros_like(labels, dtype=np.uint8)
        for value, brats in mapping.items():
            mapped[labels == value] = brats
        target = out / f"{case}.nii.gz"
        write_image(mapped[None], replace(props, dtype="uint8"), target)
        written.append(target)
    return written


def export_synthrad(files: dict[str, Path], out: Path, options: argparse.Namespace) -> list[Path]:
    from nndiff.dataset.io import write_image

    folder = out / "images" / "synthetic-ct"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for case, path in files.items():
        if not SYNTHRAD_PATIENT.match(case):
            raise NnDiffError(f"{path}: {case!r} is not a SynthRAD patient id (e.g. 1BA001: task 1/2, B(rain)/"
                              "P(elvis), centre A-E, number). Fix: keep the patient ids when converting")
        sct, props = _single_channel(path)
        if props.spatial_dims != 3:
            raise NnDiffError(f"{path}: a 2D image; SynthRAD takes one 3D sCT volume per patient")
        hu = np.clip(sct.astype(np.float32), *SYNTHRAD_HU_RANGE)
        target = folder / f"{case}.mha"
        write_image(hu[None], replace(props, dtype="float32"), target)
        written.append(target)
    return written


def export_msd(files: dict[str, Path], out: Path, options: argparse.Namespace) -> list[Path]:
    from nndiff.dataset.io import write_image

    match = MSD_TASK.match(options.task or "")
    if match is None or match.group(1) not in MSD_PREFIXES:
        raise NnDiffError(f"--task {options.task!r} is not an MSD task folder name (Task01_BrainTumour ... "
                          "Task10_Colon). Fix: pass e.g. --task Task04_Hippocampus")
    prefix = MSD_PREFIXES[match.group(1)]
    allowed = {int(v) for v in _dataset_json(options).get("labels", {}).values() if not isinstance(v, list)}
    folder = out / options.task
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for case, path in files.items():
        if not case.startswith(prefix):
            raise NnDiffError(f"{path}: {case!r} is not a {options.task} case name ({prefix}NNN). Fix: keep the "
                              "imagesTs names of the task when predicting")
        labels, props = _single_channel(path)
        labels = _integer_labels(path, labels)
        unknown = sorted(set(np.unique(labels).tolist()) - allowed)
        if unknown:
            raise NnDiffError(f"{path}: label value(s) {unknown} not in {options.dataset_json} labels "
                              f"{sorted(allowed)}")
        target = folder / f"{case}.nii.gz"
        write_image(labels.astype(np.uint8)[None], replace(props, dtype="uint8"), target)
        written.append(target)
    return written


def export_generic(files: dict[str, Path], out: Path, options: argparse.Namespace) -> list[Path]:
    target = out / "predictions.zip"
    source = options.input
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(source).as_posix())
    return [target]


EXPORTERS: dict[str, Callable[[dict[str, Path], Path, argparse.Namespace], list[Path]]] = {
    "fastmri": export_fastmri, "brats": export_brats, "synthrad": export_synthrad, "msd": export_msd,
    "generic": export_generic,
}


def _dataset_json(options: argparse.Namespace) -> dict:
    if options.dataset_json is None:
        raise NnDiffError(f"--format {options.format} needs --dataset_json (the label names and values of the "
                          "model's dataset). Fix: pass raw/DatasetXXX_Name/dataset.json")
    if not Path(options.dataset_json).is_file():
        raise NnDiffError(f"--dataset_json {options.dataset_json} does not exist")
    return load_json(options.dataset_json)


# --------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    import nndiff

    versions = {"nndiff": nndiff.__version__, "python": platform.python_version(), "numpy": np.__version__}
    for module in ("torch", "SimpleITK", "h5py"):
        try:
            versions[module] = str(__import__(module).__version__)
        except (ImportError, AttributeError):
            versions[module] = "not installed"
    return versions


def write_manifest(out: Path, written: list[Path], options: argparse.Namespace, argv: Sequence[str]) -> dict:
    """manifest.json: what was packed from what, with which code and model (prediction_info.json)."""
    info_file = options.input / PREDICTION_INFO
    manifest = {
        "format": options.format, "created": datetime.now(timezone.utc).isoformat(),
        "command": "nndiff_export_submission " + " ".join(argv), "source": str(options.input),
        "versions": _versions(),
        "prediction_info": load_json(info_file) if info_file.is_file() else None,
        "files": {p.relative_to(out).as_posix(): _sha256(p) for p in written},
    }
    if manifest["prediction_info"] is None:
        manifest["note"] = f"no {PREDICTION_INFO} in {options.input}: model, seeds and plans hash unknown"
    save_json(manifest, out / MANIFEST)
    return manifest


# --------------------------------------------------------------------------- CLI
def submission_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nndiff_export_submission",
                                description="Pack nnDiff predictions as a challenge submission with a "
                                            "reproducibility manifest (documentation/benchmarking.md).")
    p.add_argument("-i", dest="input", type=Path, required=True, metavar="PRED", help="nndiff_predict output folder")
    p.add_argument("-o", dest="output", type=Path, required=True, metavar="OUT", help="package folder (new or empty)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--dataset_json", type=Path, default=None, metavar="FILE",
                   help="the model's dataset.json (brats, msd: label names and values)")
    p.add_argument("--year", type=int, choices=(2021, 2023), default=2023,
                   help="brats: label convention and case names (2021: ET=4; 2023 and later: ET=3; default 2023)")
    p.add_argument("--task", default=None, metavar="TaskXX_Name", help="msd: the task folder name")
    p.add_argument("--crop", type=int, nargs=2, default=list(FASTMRI_CROP), metavar=("H", "W"),
                   help="fastmri: centre crop (default 320 320, the knee leaderboard size)")
    add_verbosity_flags(p)
    return p


def export_submission(options: argparse.Namespace, argv: Sequence[str] = ()) -> list[Path]:
    """Python API: write the package into ``options.output``; returns the files written (manifest last)."""
    out = options.output
    if out.exists() and any(out.iterdir()):
        raise NnDiffError(f"{out} is not empty. Fix: choose a new folder (a package never mixes runs)")
    files = prediction_files(options.input)
    # Build beside OUT and rename at the end: a failed export leaves no half package behind.
    partial = out.with_name(f".{out.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        written = EXPORTERS[options.format](files, partial, options)
        write_manifest(partial, written, options, argv)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return [out / p.relative_to(partial) for p in written] + [out / MANIFEST]


def _body(argv: Sequence[str] | None) -> None:
    args = submission_parser().parse_args(argv)
    configure_logging(args)
    written = export_submission(args, list(argv) if argv is not None else sys.argv[1:])
    print(f"wrote {len(written)} file(s) to {args.output}")


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``nndiff_export_submission``."""
    return run_cli(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
