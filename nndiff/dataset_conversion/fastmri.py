"""Convert fastMRI single-/multi-coil HDF5 volumes into an nnDiff reconstruction dataset.

Source layout (one HDF5 file per volume, as released: ``singlecoil_train/``, ``multicoil_val/``, ...)::

    SRC/file1000001.h5   kspace (slices, H, W) or (slices, coils, H, W) complex64,
                         reconstruction_esc (single coil) / reconstruction_rss (slices, 320, 320),
                         ismrmrd_header (XML: encodedSpace / reconSpace matrixSize and fieldOfView_mm),
                         attrs: acquisition, max, norm, patient_id, ...
    SRC/file1000002.h5   test / challenge files also hold ``mask`` (W,) (undersampled k-space)

Training images (``--image_source kspace``, default): per slice the **complex image from the
k-space** by the centred inverse FFT (``nndiff.tasks.operators.ifft2c``), at the k-space size,
stored as complex64 ``.npy`` with a sidecar for the spacing. Multi-coil slices are combined with
coil sensitivities estimated from the k-space centre (``center_fraction`` of the columns), the
way the predictor estimates them from measured k-space without ``sens_maps``. Why not the
released reconstruction: it is a magnitude (the phase is gone) cropped to 320 x 320, while the
predictor reconstructs the full k-space grid through the MRI operator; a prior trained on the
same grid and domain as the operator's image needs no crop or phase guess. ``--image_source
reconstruction`` writes the released magnitude (``reconstruction_esc`` / ``_rss``) as ``.nii.gz``
instead (for generation-style use; its grid differs from the k-space's).

One case per slice: ``imagesTr/{stem}_s{NNN}_0000.npy`` (subject = file stem, ``slice`` in
metadata.json). Files with a ``mask`` (undersampled) are not training data: they are copied to
``measurementsTs/{stem}.h5`` (``kspace``, ``mask``) with ``{stem}.json`` (``{"spacing": [z, y, x]}``),
the input ``nndiff_predict`` reads for reconstruction. ``--test_volumes`` sends fully sampled
volumes' slices to ``imagesTs/`` (simulate-mode evaluation).

Spacing: ``fieldOfView_mm / matrixSize`` of the encoded space (x along the k-space rows H, y along
the columns W, z = slice thickness); reconstruction images use the recon space.
"""
from __future__ import annotations

import argparse
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nndiff.dataset.io import ImageProperties
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

IMAGE_SOURCES = ("kspace", "reconstruction")
RECONSTRUCTION_KEYS = ("reconstruction_esc", "reconstruction_rss")
ISMRMRD_NS = "{http://www.ismrm.org/ISMRMRD}"
MEASUREMENTS = "measurementsTs"
CONVERSION_RECORD = "fastmri_conversion.json"
REFERENCE = "Zbontar et al., fastMRI: An Open Dataset and Benchmarks for Accelerated MRI, arXiv:1811.08839"
LICENCE = "fastMRI Dataset Sharing Agreement (NYU Langone Health)"


@dataclass(frozen=True)
class Geometry:
    """Pixel spacing (mm) of the encoded (k-space) grid and the recon grid, and the slice thickness."""

    encoded: tuple[float, float]
    recon: tuple[float, float]
    thickness: float


def _h5py() -> Any:
    try:
        import h5py  # noqa: PLC0415  (lazy: only this converter and the predictor need it)
    except ImportError as err:
        raise NnDiffError("the fastMRI conversion needs h5py. Fix: pip install h5py") from err
    return h5py


def _space(root: ET.Element, name: str, path: Path) -> tuple[list[float], list[float]]:
    """(matrix x, y, z), (fov x, y, z) of ``encodedSpace`` / ``reconSpace`` in the ISMRMRD header."""
    space = root.find(f"{ISMRMRD_NS}encoding/{ISMRMRD_NS}{name}")
    if space is None:
        raise NnDiffError(f"{path}: ismrmrd_header has no encoding/{name}. Fix: use the released fastMRI file")
    try:
        matrix = [float(space.find(f"{ISMRMRD_NS}matrixSize/{ISMRMRD_NS}{a}").text) for a in "xyz"]  # type: ignore[union-attr,arg-type]
        fov = [float(space.find(f"{ISMRMRD_NS}fieldOfView_mm/{ISMRMRD_NS}{a}").text) for a in "xyz"]  # type: ignore[union-attr,arg-type]
    except (AttributeError, TypeError, ValueError) as err:
        raise NnDiffError(f"{path}: ismrmrd_header {name} lacks matrixSize/fieldOfView_mm x, y, z ({err}). "
                          "Fix: use the released fastMRI file") from None
    return matrix, fov


def parse_header(xml: bytes | str, path: Path) -> Geometry:
    """Spacing from the ISMRMRD header: fieldOfView_mm / matrixSize of encoded and recon space."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise NnDiffError(f"{path}: ismrmrd_header is not valid XML ({err})") from None
    enc_matrix, enc_fov = _space(root, "encodedSpace", path)
    rec_matrix, rec_fov = _space(root, "reconSpace", path)
    if min(enc_matrix + rec_matrix + enc_fov + rec_fov) <= 0:
        raise NnDiffError(f"{path}: ismrmrd_header has a non-positive matrix size or field of view")
    return Geometry(encoded=(enc_fov[0] / enc_matrix[0], enc_fov[1] / enc_matrix[1]),
                    recon=(rec_fov[0] / rec_matrix[0], rec_fov[1] / rec_matrix[1]),
                    thickness=enc_fov[2] / enc_matrix[2])


@dataclass
class FastmriVolume:
    """What the converter reads from one file (arrays in memory: one volume at a time)."""

    path: Path
    kspace: np.ndarray
    geometry: Geometry
    mask: np.ndarray | None
    reconstruction: np.ndarray | None
    attrs: dict[str, Any]

    @property
    def multicoil(self) -> bool:
        return self.kspace.ndim == 4


def read_volume(path: Path) -> FastmriVolume:
    """Read one fastMRI file; missing ``kspace`` / ``ismrmrd_header`` or a bad shape is an error naming the file."""
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise NnDiffError(f"{path}: not a readable HDF5 file ({err}). Fix: re-download the volume") from None
    with f:
        missing = [k for k in ("kspace", "ismrmrd_header") if k not in f]
        if missing:
            raise NnDiffError(f"{path}: no dataset {missing} (found {sorted(f.keys())}); a fastMRI volume holds "
                              "kspace and ismrmrd_header. Fix: pass only fastMRI .h5 files")
        kspace = np.asarray(f["kspace"])
        header = f["ismrmrd_header"][()]
        mask = np.asarray(f["mask"]) if "mask" in f else None
        recon_key = next((k for k in RECONSTRUCTION_KEYS if k in f), None)
        reconstruction = np.asarray(f[recon_key]) if recon_key else None
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    if kspace.ndim not in (3, 4) or not np.iscomplexobj(kspace):
        raise NnDiffError(f"{path}: kspace must be complex (slices, [coils,] H, W), found {kspace.dtype} "
                          f"{kspace.shape}. Fix: pass the released fastMRI file")
    return FastmriVolume(path, kspace, parse_header(header, path), mask, reconstruction, attrs)


def center_mask(width: int, center_fraction: float) -> Any:
    """A (W,) mask with only the ``center_fraction`` centre columns: the calibration region for coil maps."""
    import torch  # noqa: PLC0415

    mask = torch.zeros(width)
    n = max(2, round(center_fraction * width))
    start = (width - n + 1) // 2
    mask[start:start + n] = 1
    return mask


def kspace_images(kspace: np.ndarray, center_fraction: float, source: str) -> np.ndarray:
    """Complex images (slices, H, W): ifft2c per slice; multi-coil combined with maps from the centre."""
    import torch  # noqa: PLC0415

    from nndiff.tasks.operators import estimate_sensitivity_maps, ifft2c, sensitivity_combine  # noqa: PLC0415

    k = torch.from_numpy(np.ascontiguousarray(kspace).astype(np.complex64))
    if k.ndim == 3:
        return ifft2c(k).numpy()
    out = []
    for slice_k in k:  # (coils, H, W)
        maps = estimate_sensitivity_maps(slice_k, center_mask(slice_k.shape[-1], center_fraction), source=source)
        out.append(sensitivity_combine(ifft2c(slice_k), maps)[0])
    return torch.stack(out).numpy()


def slice_images(volume: FastmriVolume, image_source: str, center_fraction: float) -> tuple[np.ndarray, tuple[float, float]]:
    """Training images of one volume (slices, H, W) and their in-plane spacing."""
    if image_source == "kspace":
        return kspace_images(volume.kspace, center_fraction, str(volume.path)), volume.geometry.encoded
    if volume.reconstruction is None:
        raise NnDiffError(f"{volume.path}: no {' / '.join(RECONSTRUCTION_KEYS)} dataset. Fix: use --image_source "
                          "kspace")
    return volume.reconstruction.astype(np.float32), volume.geometry.recon


def _props_2d(spacing: tuple[float, float], shape: tuple[int, int], dtype: str) -> ImageProperties:
    return ImageProperties(spacing=(999.0, float(spacing[0]), float(spacing[1])), origin=(0.0, 0.0),
                           direction=(1.0, 0.0, 0.0, 1.0), spatial_dims=2, shape=(1, *shape), dtype=dtype,
                           is_complex=dtype == "complex64")


def write_measurement(folder: Path, volume: FastmriVolume) -> Path:
    """``measurementsTs/{stem}.h5`` (kspace, mask) + ``{stem}.json`` spacing: the predictor's input."""
    h5py = _h5py()
    out = folder / MEASUREMENTS
    out.mkdir(exist_ok=True)
    target = out / f"{volume.path.stem}.h5"
    with h5py.File(target, "w") as f:
        f.create_dataset("kspace", data=volume.kspace.astype(np.complex64))
        f.create_dataset("mask", data=np.asarray(volume.mask).astype(np.float32))
    g = volume.geometry
    save_json({"spacing": [g.thickness, *g.encoded]}, target.with_suffix(".json"))
    return target


def convert_fastmri(source: str | Path, raw_root: str | Path, dataset_id: int, image_source: str = "kspace",
                    acceleration: float = 4.0, center_fraction: float = 0.08, mask_type: str = "random",
                    test_volumes: Sequence[str] = (), name: str | None = None) -> Path:
    """Write the fastMRI reconstruction dataset; returns its folder."""
    source = require_input(Path(source), "a folder of fastMRI .h5 files (or one file)",
                           "pass -i with e.g. singlecoil_train/")
    if image_source not in IMAGE_SOURCES:
        raise NnDiffError(f"unknown --image_source {image_source!r}. Fix: use one of {list(IMAGE_SOURCES)}")
    if not (acceleration >= 1 and 0 < center_fraction <= 1 / acceleration):
        raise NnDiffError(f"--center_fraction {center_fraction} with --acceleration {acceleration}: need acceleration "
                          ">= 1 and 0 < center_fraction <= 1/acceleration. Fix: lower --center_fraction")
    files = [source] if source.is_file() else sorted(source.glob("*.h5"))
    if not files:
        raise NnDiffError(f"{source} holds no .h5 files. Fix: pass -i with a fastMRI folder such as singlecoil_train/")
    unknown = sorted(set(test_volumes) - {f.stem for f in files})
    if unknown:
        raise NnDiffError(f"--test_volumes {unknown} are not files of {source}. Fix: name file stems, e.g. file1000001")
    ending = ".npy" if image_source == "kspace" else ".nii.gz"
    name = name or "fastMRI"
    metadata: dict[str, dict[str, Any]] = {}
    record: dict[str, Any] = {"train": [], "test": [], "measurements": []}
    coils: Counter[int] = Counter()
    with dataset_writer(raw_root, dataset_id, name) as folder:
        for path in files:
            volume = read_volume(path)
            coils[volume.kspace.shape[1] if volume.multicoil else 1] += 1
            if volume.mask is not None:
                write_measurement(folder, volume)
                record["measurements"].append(path.stem)
                continue
            split = "Ts" if path.stem in test_volumes else "Tr"
            record["test" if split == "Ts" else "train"].append(path.stem)
            metadata.update(_write_slices(folder, volume, split, image_source, center_fraction, ending))
        if not record["train"]:
            raise NnDiffError(f"{source}: no fully sampled volume (every file has a mask or is a test volume). "
                              "Fix: convert a *_train or *_val folder")
        block = {"operator": "mri_cartesian", "acceleration": float(acceleration),
                 "center_fraction": float(center_fraction), "mask_type": mask_type,
                 "num_coils": coils.most_common(1)[0][0]}
        train_meta = {c: m for c, m in metadata.items() if m["split"] == "train"}
        dataset = dataset_json(task="reconstruction", channel_names={0: "MRI"}, num_training=len(train_meta),
                               file_ending=ending, name=name, reference=REFERENCE, licence=LICENCE,
                               reconstruction=block, description=f"fastMRI slices from {image_source}")
        write_dataset_files(folder, dataset, {c: m["subject"] for c, m in train_meta.items()},
                            {c: {"slice": m["slice"]} for c, m in train_meta.items()})
        save_json({**record, "source": str(source), "image_source": image_source, "coils": dict(coils)},
                  folder / CONVERSION_RECORD)
    return Path(raw_root) / dataset_folder_name(dataset_id, name)


def _write_slices(folder: Path, volume: FastmriVolume, split: str, image_source: str, center_fraction: float,
                  ending: str) -> dict[str, dict[str, Any]]:
    images, spacing = slice_images(volume, image_source, center_fraction)
    dtype = "complex64" if np.iscomplexobj(images) else "float32"
    props = _props_2d(spacing, images.shape[-2:], dtype)
    out: dict[str, dict[str, Any]] = {}
    for index, image in enumerate(images):
        case_id = f"{volume.path.stem}_s{index:03d}"
        write_case_image(folder, f"images{split}", case_id, 0, image[None].astype(dtype), props, ending)
        out[case_id] = {"subject": volume.path.stem, "slice": index, "split": "train" if split == "Tr" else "test"}
    return out


def convert_parser() -> argparse.ArgumentParser:
    """Arguments of ``nndiff_convert_fastmri``."""
    p = converter_parser("nndiff_convert_fastmri", "Convert fastMRI single-/multi-coil HDF5 volumes into an nnDiff "
                         "reconstruction dataset (2D slices; undersampled files kept for prediction).")
    p.add_argument("--image_source", choices=IMAGE_SOURCES, default="kspace",
                   help="training images: complex ifft of the k-space (default) or the released magnitude")
    p.add_argument("--acceleration", type=float, default=4.0, help="dataset.json acceleration (default 4)")
    p.add_argument("--center_fraction", type=float, default=0.08,
                   help="fully sampled centre fraction (default 0.08; also the coil-map calibration region)")
    p.add_argument("--mask_type", choices=("random", "equispaced", "gaussian"), default="random")
    p.add_argument("--test_volumes", nargs="*", default=[], help="file stems whose slices go to imagesTs/")
    return p


def _convert(args: argparse.Namespace, raw_root: Path) -> Path:
    return convert_fastmri(args.input, raw_root, args.dataset_id, args.image_source, args.acceleration,
                           args.center_fraction, args.mask_type, args.test_volumes, args.name)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``nndiff_convert_fastmri``; returns the exit code."""
    return run_converter(convert_parser(), _convert, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
