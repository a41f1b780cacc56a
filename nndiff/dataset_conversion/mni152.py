"""Convert the MNI152 T1 template shipped inside ``nilearn`` into an nnDiff raw dataset.

The template (ICBM 2009a nonlinear symmetric, skull-stripped, 1 mm, 197x233x189) and its grey
and white matter probability maps are package files of nilearn: loading them needs no network.
This gives the demo and the tests a real, averaged brain MRI without any download.

Modes:

* ``2d_slices``: every slice along ``axis`` that holds enough brain is one case (a 2D image);
  metadata.json gives each slice a ``subject`` = the id of its slab of neighbouring slices, so
  cross-validation never splits near-duplicate neighbours across train and validation.
* ``3d``: every training slab is one 3D case (a sub-volume of consecutive slices).

Tasks: ``generation`` (T1 images), ``segmentation`` (+ tissue labels), ``translation`` (T1 -> a
T2-weighted-like contrast computed from the tissue maps, :func:`t2_like_contrast`), ``denoising``
(clean-only T1; the degradation is simulated in training), ``reconstruction`` (T1 magnitude
slices as fully sampled images + single-coil 4x Cartesian MRI acquisition model; 2D only) and
``anomaly_detection`` (healthy training slices, a lesioned training slab and a held-out slab with
synthetic lesions on some of its slices, :func:`insert_lesions`; 2D only).

Held-out split (both modes): one contiguous slab of slices goes to ``imagesTs/``. Adjacent slices
are near duplicates, so ``gap`` slices on each side of the held-out slab are written nowhere;
every training slice is at least ``gap + 1`` slices away from every held-out slice (a distance of
more than ``gap``). The exact slice indices of each part are written to
``mni152_conversion.json`` in the dataset folder.

Intensities are the template's original 8-bit scale (0..255): nilearn rescales the template to
0..1 and we undo that. Geometry (spacing, origin, direction) is the template's, converted from
NIfTI/RAS to SimpleITK/LPS conventions (documentation/architecture.md).
"""
from __future__ import annotations

import argparse
import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nndiff.dataset.io import ImageProperties
from nndiff.dataset_conversion.common import check_dataset_id_free, write_case_image
# TEMPLATE_MAX_VALUE: the template file stores 8-bit values; nilearn divides them by their maximum (255).
from nndiff.dataset_conversion.lesions import LESION_MODEL, TEMPLATE_MAX_VALUE, insert_lesions
from nndiff.dataset_conversion.slice_split import (AXES, DEFAULT_LESIONED_FRACTION, SliceSplit,
                                                   plan_anomaly_split, plan_slice_split)
from nndiff.diffusion.options import TaskFamily, parse_option
from nndiff.errors import NnDiffError
from nndiff.utils.files import atomic_directory, save_json

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("2d_slices", "3d")
RESOLUTIONS: tuple[int, ...] = (1, 2)
#: Task families this converter can write (the others need data the template does not have).
SUPPORTED_TASKS: tuple[TaskFamily, ...] = (TaskFamily.GENERATION, TaskFamily.SEGMENTATION,
                                            TaskFamily.TRANSLATION, TaskFamily.DENOISING,
                                            TaskFamily.RECONSTRUCTION, TaskFamily.ANOMALY_DETECTION)
#: Folder name suffix per task (generation has none).
TASK_SUFFIX: dict[TaskFamily, str] = {TaskFamily.SEGMENTATION: "Seg", TaskFamily.TRANSLATION: "T2like",
                                      TaskFamily.DENOISING: "Denoise", TaskFamily.RECONSTRUCTION: "Recon",
                                      TaskFamily.ANOMALY_DETECTION: "Anomaly"}
#: Relative T2-weighted brightness of each tissue: CSF bright, GM intermediate, WM dark.
T2_LIKE_WEIGHTS: dict[str, float] = {"CSF": 1.0, "GM": 0.55, "WM": 0.3}
TARGET_NAME = "T2w-like"
#: Acquisition model of the reconstruction task: single-coil Cartesian MRI, 4x random 1D mask.
RECONSTRUCTION_BLOCK: dict[str, Any] = {"operator": "mri_cartesian", "acceleration": 4,
                                        "center_fraction": 0.08, "mask_type": "random", "num_coils": 1}
#: .npz (with sidecar JSON geometry) is read and written without SimpleITK, e.g. on a GPU machine without it.
FILE_ENDINGS: tuple[str, ...] = (".nii.gz", ".png", ".npz")
#: Tissue classes of the segmentation mode (label value -> name in dataset.json order).
TISSUE_LABELS: dict[str, int] = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
#: Default slab thickness (slices) of a 3D case: deep enough for a 3D patch to see anatomy in
#: depth (32 mm at 2 mm); 3D mode therefore gives fewer than MIN_SLABS cases at 2 mm.
DEFAULT_3D_SLAB_SIZE = 16
CONVERSION_RECORD = "mni152_conversion.json"
#: Labels of the anomaly-detection task.
LESION_LABELS: dict[str, int] = {"background": 0, "lesion": 1}
#: Default share of the held-out slices that get lesions (anomaly detection).
DEFAULT_TEST_LESION_FRACTION = 0.5
# NIfTI stores RAS world coordinates, ITK/SimpleITK LPS: x and y change sign.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Mni152Volumes:
    """The template and its tissue maps as ``(Z, Y, X)`` arrays on one grid.

    ``t1`` is in the template's 8-bit units (0..255), ``gm``/``wm`` are probabilities (0..1),
    ``brain`` is nilearn's brain mask (bool). ``properties`` is the 3D geometry (SimpleITK order).
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    properties: ImageProperties
    sources: dict[str, str]


# --------------------------------------------------------------------------- loading


def _nilearn() -> Any:
    """Import nilearn's dataset module (the ``demo`` extra); a clear error when it is missing."""
    try:
        from nilearn import datasets  # lazy: heavy import (pandas, scikit-learn)
    except ImportError as e:
        raise NnDiffError(
            "the MNI152 conversion needs nilearn, which ships the template. Fix: pip install nilearn "
            "(or pip install nndiff[demo])"
        ) from e
    return datasets


def nifti_geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """NIfTI affine (RAS, voxel order i, j, k) -> (spacing z,y,x; origin LPS x,y,z; direction row-major).

    The array transposed to (k, j, i) is SimpleITK's (Z, Y, X); this is what SimpleITK itself
    reports when it reads the same NIfTI file.
    """
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing_ijk = np.linalg.norm(linear, axis=0)
    direction = _RAS_TO_LPS @ (linear / spacing_ijk[None, :])
    origin = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)[:3, 3]
    return (tuple(float(v) for v in spacing_ijk[::-1]), tuple(float(v) for v in origin),
            tuple(float(v) for v in direction.ravel()))


def _to_zyx(img: Any) -> np.ndarray:
    """nibabel image (i, j, k) -> float32 array (Z, Y, X) = (k, j, i)."""
    return np.ascontiguousarray(np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0))


@functools.lru_cache(maxsize=2)
def load_mni152(resolution: int = 1) -> Mni152Volumes:
    """Load the template, GM/WM maps and brain mask at ``resolution`` mm from nilearn's package files.

    Cached (nilearn resamples on every call, about a second at 2 mm); the arrays are read-only so
    that no caller can change what the next one gets.
    """
    if resolution not in RESOLUTIONS:
        raise NnDiffError(f"resolution {resolution!r} is not supported; use one of {list(RESOLUTIONS)} (mm)")
    datasets = _nilearn()
    t1_img = datasets.load_mni152_template(resolution=resolution)
    gm_img = datasets.load_mni152_gm_template(resolution=resolution)
    wm_img = datasets.load_mni152_wm_template(resolution=resolution)
    mask_img = datasets.load_mni152_brain_mask(resolution=resolution)
    spacing, origin, direction = nifti_geometry(t1_img.affine)
    t1 = _to_zyx(t1_img) * np.float32(TEMPLATE_MAX_VALUE)
    shape = tuple(int(v) for v in t1.shape)
    properties = ImageProperties(spacing=spacing, origin=origin,  # type: ignore[arg-type]
                                 direction=direction, spatial_dims=3, shape=shape)  # type: ignore[arg-type]
    arrays = {
        "t1": np.clip(t1, 0.0, TEMPLATE_MAX_VALUE),  # resampling overshoot would leave tiny negatives
        "gm": np.clip(_to_zyx(gm_img), 0.0, 1.0),
        "wm": np.clip(_to_zyx(wm_img), 0.0, 1.0),
        "brain": _to_zyx(mask_img) > 0.5,
    }
    for array in arrays.values():
        array.setflags(write=False)
    return Mni152Volumes(**arrays, properties=properties, sources=template_source_files())


def template_source_files() -> dict[str, str]:
    """Paths of the template files inside the installed nilearn package (proof: no download)."""
    _nilearn()  # the clear error first, if nilearn is missing
    from nilearn.datasets import struct  # noqa: PLC0415  (lazy, see _nilearn)

    return {"t1": str(struct.MNI152_FILE_PATH), "gm": str(struct.GM_MNI152_FILE_PATH),
            "wm": str(struct.WM_MNI152_FILE_PATH)}


# --------------------------------------------------------------------------- tissue labels


def tissue_label_map(gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Hard tissue labels: 0 outside the brain mask; inside it the most probable of CSF, GM, WM.

    CSF probability = 1 - GM - WM (clipped to 0..1): inside the skull-stripped brain what is
    neither grey nor white matter is cerebrospinal fluid.
    """
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    most_probable = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.uint8) + 1
    return np.where(brain, most_probable, 0).astype(np.uint8)


def t2_like_contrast(gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """T2-weighted-like target of the translation task, in 0..255, not smoothed.

    ``255 * brain * (1.0 * CSF + 0.55 * GM + 0.3 * WM)`` with ``CSF = clip(1 - GM - WM, 0, 1)``:
    the contrast order of T2 (CSF > GM > WM), inverted against T1 (WM > GM > CSF) but with other
    ratios, so T1 -> target is learnable and not a linear map of the T1 intensities.
    """
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    w = T2_LIKE_WEIGHTS
    mixed = w["CSF"] * csf + w["GM"] * np.asarray(gm) + w["WM"] * np.asarray(wm)
    return (TEMPLATE_MAX_VALUE * np.where(brain, np.clip(mixed, 0.0, 1.0), 0.0)).astype(np.float32)


# --------------------------------------------------------------------------- synthetic lesions


def wm_intensity(vol: Mni152Volumes) -> float:
    """Typical white-matter T1 value: median of the template where P(WM) > 0.9 (222 in 8-bit units)."""
    return float(np.median(vol.t1[vol.wm > LESION_MODEL["wm_probability"]]))



def _lesioned_test_slices(heldout: Sequence[int], fraction: float, seed: int) -> list[int]:
    """``round(fraction * n)`` held-out slices drawn at random (seeded): they get lesions."""
    if not 0.0 < fraction < 1.0:
        raise NnDiffError(f"test_lesion_fraction must be in (0, 1) so the test slab has both lesioned and "
                          f"lesion-free slices, got {fraction}")
    count = min(len(heldout) - 1, max(1, int(round(fraction * len(heldout)))))
    chosen = np.random.default_rng([seed, 1]).choice(len(heldout), size=count, replace=False)
    return sorted(int(heldout[i]) for i in chosen)


# --------------------------------------------------------------------------- geometry of parts


def _take(volume: np.ndarray, axis: int, indices: Sequence[int]) -> np.ndarray:
    return np.take(volume, list(indices), axis=axis)


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` along ``axis`` as ``(1, A, B)``, rows (A) flipped: see :func:`slice_properties`."""
    return np.moveaxis(np.take(volume, [index], axis=axis), axis, 0)[:, ::-1, :]


def sub_volume_properties(props: ImageProperties, axis: int, first: int, count: int) -> ImageProperties:
    """Geometry of ``count`` consecutive slices starting at ``first`` along array ``axis``.

    The origin moves to the first voxel of the sub-volume: origin + direction @ (offset * spacing),
    in SimpleITK's (x, y, z) order (array axis ``a`` is SimpleITK axis ``2 - a``).
    """
    direction = np.asarray(props.direction).reshape(3, 3)
    offset_xyz = np.zeros(3)
    offset_xyz[2 - axis] = first * props.spacing[axis]
    origin = np.asarray(props.origin) + direction @ offset_xyz
    shape = list(props.shape)
    shape[axis] = count
    return ImageProperties(spacing=props.spacing, origin=tuple(float(v) for v in origin),
                           direction=props.direction, spatial_dims=3,
                           shape=tuple(shape))  # type: ignore[arg-type]


def slice_properties(props: ImageProperties, axis: int, index: int) -> ImageProperties:
    """2D geometry of slice ``index`` along array ``axis`` with its rows flipped (:func:`_slice`).

    The template's rows run posterior->anterior (axial) or inferior->superior (coronal,
    sagittal), so images and sample grids would show brains upside down; the slices are stored
    with the rows reversed (anterior / superior at the top) and the geometry follows, so every
    pixel keeps its world position: the origin moves to the old last row and the row direction
    changes sign. In-plane origin and 2x2 direction block come from the 3D geometry (the
    template's direction is diagonal, so the block is a valid 2D direction).
    """
    moved = sub_volume_properties(props, axis, index, 1)
    in_plane_array_axes = [a for a in range(3) if a != axis]
    in_plane_sitk = sorted(2 - a for a in in_plane_array_axes)  # (x, y) order of the 2D image
    direction = np.asarray(props.direction).reshape(3, 3)[np.ix_(in_plane_sitk, in_plane_sitk)]
    spacing = (999.0,) + tuple(props.spacing[a] for a in in_plane_array_axes)
    shape = (1,) + tuple(props.shape[a] for a in in_plane_array_axes)
    origin = np.asarray([moved.origin[i] for i in in_plane_sitk])
    # Flip the 2D y axis (array rows): the first row is now the old last one.
    origin = origin + direction[:, 1] * spacing[1] * (shape[1] - 1)
    direction[:, 1] *= -1.0
    return ImageProperties(spacing=spacing, origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
                           direction=tuple(float(v) for v in direction.ravel()), spatial_dims=2,
                           shape=shape)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- writing


def dataset_name(mode: str, axis: str, task: TaskFamily) -> str:
    """Default folder name part, e.g. ``MNI152Axial2D`` or ``MNI152Axial3DSeg``."""
    suffix = "2D" if mode == "2d_slices" else "3D"
    return f"MNI152{axis.capitalize()}{suffix}" + TASK_SUFFIX.get(task, "")


def _write_case(folder: Path, split: str, case_id: str, image: np.ndarray, label: np.ndarray | None,
                props: ImageProperties, file_ending: str, target: np.ndarray | None = None) -> None:
    """Write one case: image ``images{split}/{case}_0000``; if given, ``labels{split}/{case}`` and
    target ``targets{split}/{case}_0000``."""
    image_props = replace(props, dtype="uint8" if file_ending == ".png" else "float32")
    write_case_image(folder, f"images{split}", case_id, 0, image.astype(np.float32), image_props, file_ending)
    if target is not None:
        write_case_image(folder, f"targets{split}", case_id, 0, target.astype(np.float32), image_props, file_ending)
    if label is not None:
        write_case_image(folder, f"labels{split}", case_id, None, label.astype(np.uint8), props, file_ending)


def _slice_cases(vol: Mni152Volumes, split: SliceSplit, labels: np.ndarray | None,
                 targets: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One case per slice: training slices (subject = slab id) and held-out slices."""
    axis = AXES[split.axis]
    cases: list[dict[str, Any]] = []
    parts = [(f"slab_{n:02d}", "Tr", slab) for n, slab in enumerate(split.train_slabs)]
    parts.append(("heldout", "Ts", split.heldout))
    for subject, part_split, indices in parts:
        for index in indices:
            cases.append({
                "id": f"mni152_{split.axis}_{index:03d}", "split": part_split, "subject": subject,
                "slices": [index], "image": _slice(vol.t1, axis, index),
                "label": None if labels is None else _slice(labels, axis, index),
                "target": None if targets is None else _slice(targets, axis, index),
                "properties": slice_properties(vol.properties, axis, index),
            })
    return cases


def _anomaly_cases(vol: Mni152Volumes, split: SliceSplit, seed: int,
                   test_lesion_fraction: float) -> list[dict[str, Any]]:
    """One case per slice: healthy training (all-zero mask), lesioned training, held-out with
    lesions on a seeded ``test_lesion_fraction`` of its slices (all-zero masks on the others).

    Each slice's lesions come from its own generator seeded by (``seed``, slice index), so a case
    does not change when another one is added or removed.
    """
    axis = AXES[split.axis]
    wm_value = wm_intensity(vol)
    lesioned = set(split.lesioned) | set(_lesioned_test_slices(split.heldout, test_lesion_fraction, seed))
    parts = [(f"slab_{n:02d}", "Tr", slab) for n, slab in enumerate(split.train_slabs)]
    parts += [(f"lesioned_{n:02d}", "Tr", slab) for n, slab in enumerate(split.lesioned_slabs)]
    parts.append(("heldout", "Ts", split.heldout))
    cases: list[dict[str, Any]] = []
    for subject, part_split, indices in parts:
        for index in indices:
            props = slice_properties(vol.properties, axis, index)
            image = _slice(vol.t1, axis, index)[0]
            label, blobs = np.zeros(image.shape, np.uint8), []
            if index in lesioned:
                brain = _slice(vol.brain, axis, index)[0]
                rng = np.random.default_rng([seed, 0, index])
                image, label, blobs = insert_lesions(image, brain, props.spacing[1:], wm_value, rng)
            cases.append({
                "id": f"mni152_{split.axis}_{index:03d}", "split": part_split, "subject": subject,
                "slices": [index], "image": image[None], "label": label[None], "target": None,
                "properties": props, "healthy": index not in lesioned, "lesions": blobs,
            })
    return cases


def _slab_cases(vol: Mni152Volumes, split: SliceSplit, labels: np.ndarray | None,
                targets: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One 3D case per training slab, plus the held-out slab as one test case."""
    axis = AXES[split.axis]
    parts = [(f"mni152_{split.axis}_slab_{n:02d}", "Tr", slab) for n, slab in enumerate(split.train_slabs)]
    if split.heldout:
        parts.append((f"mni152_{split.axis}_heldout", "Ts", split.heldout))
    return [{
        "id": case_id, "split": part_split, "subject": case_id, "slices": indices,
        "image": _take(vol.t1, axis, indices),
        "label": None if labels is None else _take(labels, axis, indices),
        "target": None if targets is None else _take(targets, axis, indices),
        "properties": sub_volume_properties(vol.properties, axis, indices[0], len(indices)),
    } for case_id, part_split, indices in parts]


def _dataset_json(task: TaskFamily, num_training: int, file_ending: str, mode: str,
                  resolution: int) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "MNI152",
        "description": (f"MNI152 ICBM 2009a nonlinear symmetric T1 template shipped with nilearn, "
                        f"{resolution} mm, {mode}; intensities in the template's 8-bit units (0..255). "
                        f"Slice layout: {CONVERSION_RECORD}"),
        "reference": "Fonov et al., NeuroImage 2011 and 2009 (ICBM 2009a nonlinear symmetric); via nilearn",
        "licence": "ICBM 2009 template licence: free use with the copyright notice of the McConnell "
                   "Brain Imaging Centre kept (see nilearn documentation)",
        "task": str(task),
        "channel_names": {"0": "T1"},
        "numTraining": num_training,
        "file_ending": file_ending,
    }
    if task == TaskFamily.SEGMENTATION:
        data["labels"] = dict(TISSUE_LABELS)
    elif task == TaskFamily.TRANSLATION:
        data["target_names"] = {"0": TARGET_NAME}
        data["description"] += (f"; targets: {TARGET_NAME} = 255 * brain * (1.0 CSF + 0.55 GM + 0.3 WM), "
                                f"CSF = 1 - GM - WM, from the template's tissue maps")
    elif task == TaskFamily.RECONSTRUCTION:
        data["reconstruction"] = dict(RECONSTRUCTION_BLOCK)
    elif task == TaskFamily.ANOMALY_DETECTION:
        data["labels"] = dict(LESION_LABELS)
        data["description"] += ("; synthetic lesions (1-3 soft-edged ellipses of 3-10 mm semi-axes, +/-30-60 % "
                                "of the WM intensity, inside the brain) on the lesioned training slab and on "
                                "part of the held-out slab; metadata.json 'healthy', lesion masks in labelsTr/"
                                f"labelsTs; lesion model in {CONVERSION_RECORD}")
    # Denoising is clean-only without a 'degradation' block: the planner picks Rician for MR.
    return data


def convert_mni152(raw_root: str | Path, dataset_id: int, mode: str = "2d_slices", axis: str = "axial",
                   resolution: int = 1, gap: int = 10, heldout_fraction: float = 0.2,
                   task: str | TaskFamily = "generation", file_ending: str = ".nii.gz",
                   min_brain_fraction: float = 0.1, heldout_position: str = "center",
                   slab_size: int | None = None, name: str | None = None, seed: int = 0,
                   lesioned_fraction: float = DEFAULT_LESIONED_FRACTION,
                   test_lesion_fraction: float = DEFAULT_TEST_LESION_FRACTION) -> Path:
    """Write ``raw_root/DatasetXXX_<name>/`` from the MNI152 template and return that folder.

    ``task="generation"``: images only. ``task="segmentation"``: plus ``labelsTr``/``labelsTs``
    tissue maps (background, CSF, GM, WM; :func:`tissue_label_map`). ``"translation"``: plus
    ``targetsTr``/``targetsTs`` (:func:`t2_like_contrast`). ``"denoising"``: clean images only, no
    ``degradation`` block (the planner picks Rician noise for MR). ``"reconstruction"``: images as
    fully sampled magnitude slices plus the ``reconstruction`` block (2D only). ``"anomaly_detection"``
    (2D only): :func:`plan_anomaly_split` (``lesioned_fraction``) and :func:`insert_lesions` on the
    lesioned slab and on ``test_lesion_fraction`` of the held-out slices, seeded by ``seed``; masks
    in ``labelsTr``/``labelsTs`` (all-zero when healthy) and ``"healthy"`` in metadata.json. ``file_ending`` ``.png``
    (2D only) stores the 8-bit values (lossless at 1 mm, rounded at 2 mm). The folder is built
    under a temporary name and moved into place, replacing an earlier conversion of the same name.
    See :func:`plan_slice_split` for the slice rules (``mode="3d"``: ``slab_size`` defaults to
    ``DEFAULT_3D_SLAB_SIZE``); the chosen indices go to ``mni152_conversion.json``.
    """
    if mode not in MODES:
        raise NnDiffError(f"unknown mode {mode!r}; use one of {list(MODES)}")
    family = parse_option(TaskFamily, task, "task")
    if family not in SUPPORTED_TASKS:
        raise NnDiffError(f"task {family} is not supported by the MNI152 conversion; use one of "
                          f"{[str(t) for t in SUPPORTED_TASKS]}")
    if family == TaskFamily.RECONSTRUCTION and mode != "2d_slices":
        raise NnDiffError(f"task reconstruction needs mode 2d_slices, got mode {mode!r}: the MRI operator "
                          "undersamples 2D k-space of single slices. Fix: pass --mode 2d_slices")
    if family == TaskFamily.ANOMALY_DETECTION and mode != "2d_slices":
        raise NnDiffError(f"task anomaly_detection needs mode 2d_slices, got mode {mode!r}: lesions are placed "
                          "per slice and the held-out slab is split into lesioned and lesion-free slices. "
                          "Fix: pass --mode 2d_slices")
    if file_ending not in FILE_ENDINGS or (file_ending == ".png" and mode != "2d_slices"):
        raise NnDiffError(f"file_ending {file_ending!r} is not supported for mode {mode}; use .nii.gz, .npz"
                          + (" or .png" if mode == "2d_slices" else ""))
    if not 0 <= int(dataset_id) <= 999:
        raise NnDiffError(f"dataset id must be 0..999, got {dataset_id}")
    raw_root = Path(raw_root)
    folder_name = f"Dataset{int(dataset_id):03d}_{name or dataset_name(mode, axis, family)}"
    check_dataset_id_free(raw_root, int(dataset_id), folder_name)
    if mode == "3d" and slab_size is None:
        slab_size = DEFAULT_3D_SLAB_SIZE
    vol = load_mni152(resolution)
    if family == TaskFamily.ANOMALY_DETECTION:
        split = plan_anomaly_split(vol.brain, axis, gap, heldout_fraction, lesioned_fraction,
                                   min_brain_fraction, heldout_position, slab_size)
        cases = _anomaly_cases(vol, split, seed, test_lesion_fraction)
    else:
        split = plan_slice_split(vol.brain, axis, gap, heldout_fraction, min_brain_fraction,
                                 heldout_position, slab_size)
        labels = tissue_label_map(vol.gm, vol.wm, vol.brain) if family == TaskFamily.SEGMENTATION else None
        targets = t2_like_contrast(vol.gm, vol.wm, vol.brain) if family == TaskFamily.TRANSLATION else None
        cases = (_slice_cases if mode == "2d_slices" else _slab_cases)(vol, split, labels, targets)
    target = raw_root / folder_name
    with atomic_directory(target) as tmp:
        for case in cases:
            _write_case(tmp, case["split"], case["id"], case["image"], case["label"], case["properties"],
                        file_ending, case["target"])
        num_training = sum(case["split"] == "Tr" for case in cases)
        save_json(_dataset_json(family, num_training, file_ending, mode, resolution), tmp / "dataset.json")
        save_json({case["id"]: _metadata_entry(case) for case in cases}, tmp / "metadata.json")
        record = _conversion_record(vol, split, cases, mode, resolution, gap, heldout_fraction,
                                    min_brain_fraction, heldout_position)
        if family == TaskFamily.ANOMALY_DETECTION:
            record["lesions"] = _lesion_record(vol, cases, seed, lesioned_fraction, test_lesion_fraction)
        save_json(record, tmp / CONVERSION_RECORD)
    logger.info("MNI152 %s (%s, %d mm): %d training and %d held-out cases in %s", mode, axis, resolution,
                num_training, len(cases) - num_training, target)
    return target


def _metadata_entry(case: dict[str, Any]) -> dict[str, Any]:
    """metadata.json entry: the subject, and for anomaly detection the healthy flag (agrees with the mask)."""
    entry: dict[str, Any] = {"subject": case["subject"]}
    if "healthy" in case:
        entry["healthy"] = bool(case["healthy"])
    return entry


def _lesion_record(vol: Mni152Volumes, cases: list[dict[str, Any]], seed: int, lesioned_fraction: float,
                   test_lesion_fraction: float) -> dict[str, Any]:
    """The lesion model, its parameters and every blob placed, per case."""
    return {
        "model": dict(LESION_MODEL), "seed": seed, "wm_intensity": wm_intensity(vol),
        "lesioned_fraction": lesioned_fraction, "test_lesion_fraction": test_lesion_fraction,
        "lesioned_heldout": [c["slices"][0] for c in cases if c["split"] == "Ts" and not c["healthy"]],
        "cases": {c["id"]: c["lesions"] for c in cases if c["lesions"]},
    }


def _conversion_record(vol: Mni152Volumes, split: SliceSplit, cases: list[dict[str, Any]], mode: str,
                       resolution: int, gap: int, heldout_fraction: float, min_brain_fraction: float,
                       heldout_position: str) -> dict[str, Any]:
    """What was written where and why, for people and for the demo's evaluation."""
    import nilearn  # noqa: PLC0415  (already imported by load_mni152)

    return {
        "source": {"package": "nilearn", "version": nilearn.__version__, "files": vol.sources,
                   "resolution_mm": resolution, "volume_shape_zyx": list(vol.properties.shape)},
        "parameters": {"mode": mode, "gap": gap, "heldout_fraction": heldout_fraction,
                       "min_brain_fraction": min_brain_fraction, "heldout_position": heldout_position},
        "slices": split.to_json(),
        "cases": {case["id"]: {"split": case["split"], "subject": case["subject"], "slices": case["slices"],
                               **({"healthy": case["healthy"]} if "healthy" in case else {})}
                  for case in cases},
    }


# --------------------------------------------------------------------------- command line


def convert_parser() -> argparse.ArgumentParser:
    """Arguments of ``nndiff_convert_mni152``."""
    p = argparse.ArgumentParser(
        prog="nndiff_convert_mni152",
        description="Write the MNI152 T1 template shipped with nilearn as an nnDiff raw dataset "
                    "(2D slices or 3D slabs, a held-out slab separated by a gap).",
    )
    p.add_argument("-o", "--output", type=Path, default=None, metavar="RAW",
                   help="raw data root (default: $nnDiff_raw)")
    p.add_argument("-d", "--dataset_id", type=int, required=True, help="dataset id (0..999)")
    p.add_argument("--mode", choices=MODES, default="2d_slices")
    p.add_argument("--axis", choices=list(AXES), default="axial")
    p.add_argument("--resolution", type=int, choices=RESOLUTIONS, default=1, help="mm (default 1)")
    p.add_argument("--task", choices=[str(t) for t in SUPPORTED_TASKS], default="generation",
                   help="segmentation: + tissue labels; translation: + T2w-like targets; denoising: "
                   "clean-only; reconstruction: + 4x Cartesian MRI block (2d_slices only); anomaly_detection: "
                   "healthy + lesioned training slabs, held-out slab with synthetic lesions (2d_slices only)")
    p.add_argument("--gap", type=int, default=10, help="slices dropped on each side of the held-out slab")
    p.add_argument("--heldout_fraction", type=float, default=0.2)
    p.add_argument("--heldout_position", choices=("center", "end"), default="center")
    p.add_argument("--min_brain_fraction", type=float, default=0.1,
                   help="skip slices whose brain area is below this fraction of the largest slice's")
    p.add_argument("--slab_size", type=int, default=None,
                   help="slices per training slab (subject); default: 2d_slices --gap "
                   "(fewer if that gives < 5 slabs), 3d 16")
    p.add_argument("--file_ending", choices=FILE_ENDINGS, default=".nii.gz")
    p.add_argument("--name", default=None, help="dataset name (default e.g. MNI152Axial2D)")
    p.add_argument("--seed", type=int, default=0, help="anomaly_detection: seed of the synthetic lesions")
    p.add_argument("--lesioned_fraction", type=float, default=DEFAULT_LESIONED_FRACTION,
                   help="anomaly_detection: share of the kept slices in the lesioned training slab")
    p.add_argument("--test_lesion_fraction", type=float, default=DEFAULT_TEST_LESION_FRACTION,
                   help="anomaly_detection: share of the held-out slices that get lesions")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def _convert_body(argv: Sequence[str] | None) -> None:
    from nndiff.paths import resolve_paths  # noqa: PLC0415
    from nndiff.run.common import configure_logging  # noqa: PLC0415

    args = convert_parser().parse_args(argv)
    configure_logging(args)
    raw_root = resolve_paths(raw=args.output).raw
    if raw_root is None:
        raise NnDiffError("no raw data root. Fix: pass -o RAW or set nnDiff_raw")
    folder = convert_mni152(raw_root, args.dataset_id, mode=args.mode, axis=args.axis,
                            resolution=args.resolution, gap=args.gap, heldout_fraction=args.heldout_fraction,
                            task=args.task, file_ending=args.file_ending,
                            min_brain_fraction=args.min_brain_fraction,
                            heldout_position=args.heldout_position, slab_size=args.slab_size, name=args.name,
                            seed=args.seed, lesioned_fraction=args.lesioned_fraction,
                            test_lesion_fraction=args.test_lesion_fraction)
    print(folder)  # the CLI's result: the dataset folder, for scripts


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``nndiff_convert_mni152``; returns the exit code."""
    from nndiff.run.common import run_cli  # noqa: PLC0415

    return run_cli(_convert_body, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
