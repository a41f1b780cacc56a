"""Image readers and writers that keep geometry (spacing, origin, direction).

Array contract (documentation/architecture.md):

* images are ``(C, Z, Y, X)`` numpy arrays in SimpleITK's array order; 2D files get ``Z = 1`` and
  spacing ``[999.0, sy, sx]`` (nnU-Net v2's convention);
* ``spacing`` is in array axis order (z, y, x); ``origin`` and ``direction`` are kept exactly as
  SimpleITK reports them (x, y, z order; direction flattened row-major) because they are only
  used to write the image back.

Formats:

* SimpleITK: ``.nii.gz .nii .nrrd .nhdr .mha .mhd`` (geometry from the header);
* natural images through SimpleITK: ``.png .jpg .jpeg .bmp .tif .tiff`` (grey or RGB; RGB gives
  three channels). Their headers carry no reliable physical geometry, so spacing is 1 (2D:
  ``[999, 1, 1]``), origin 0 and direction identity unless a sidecar JSON says otherwise;
* numpy: ``.npy`` / ``.npz`` (one channel per file, real or complex), spacing from a sidecar JSON.

Sidecar JSON (as nnU-Net's Tiff3DIO): ``{"spacing": [...]}`` in array axis order, optionally
``"origin"`` and ``"direction"`` in SimpleITK order. Looked up first per file
(``case_0000.json`` beside ``case_0000.npy``), then per case (``case.json``). Without a sidecar the
spacing is 1 (a note is logged for numpy files, whose spacing is otherwise unknown).

SimpleITK is imported lazily, only in this module, so training from preprocessed data runs where
SimpleITK is not installed.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nndiff.errors import DatasetError, NnDiffError

logger = logging.getLogger(__name__)

SIMPLEITK_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NATURAL_ENDINGS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NUMPY_ENDINGS: tuple[str, ...] = (".npy", ".npz")
SUPPORTED_ENDINGS: tuple[str, ...] = SIMPLEITK_ENDINGS + NATURAL_ENDINGS + NUMPY_ENDINGS
#: Formats whose spacing may come from a sidecar JSON (their headers carry none we trust).
SIDECAR_ENDINGS: tuple[str, ...] = NATURAL_ENDINGS + NUMPY_ENDINGS
#: Formats that store integers only; float arrays are rounded and clipped when written.
INTEGER_ONLY_ENDINGS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")
#: Spacing used for the dummy z axis of 2D images (nnU-Net v2).
SPACING_2D_Z = 999.0

# Geometry tolerances between files of one case (channels, label, targets). Headers written by
# different tools differ in float precision (float32 in NIfTI), never by more than these.
SPACING_RTOL = 1e-3
ORIGIN_ATOL_MM = 1e-3
ORIGIN_RTOL = 1e-4
DIRECTION_ATOL = 1e-3

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class ImageProperties:
    """Geometry and provenance of an image read from disk.

    ``spacing`` is in array axis order ``(z, y, x)`` (``999.0`` on z for 2D); ``origin`` and
    ``direction`` are in SimpleITK order with ``spatial_dims`` and ``spatial_dims**2`` entries.
    ``shape`` is the spatial shape ``(Z, Y, X)``; ``dtype`` the on-disk dtype of the first file.
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    spatial_dims: int
    shape: tuple[int, int, int]
    num_channels: int = 1
    is_rgb: bool = False
    is_complex: bool = False
    dtype: str = "float32"
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON dict (lists, not tuples); inverse of :meth:`from_json`."""
        d = asdict(self)
        for key in ("spacing", "origin", "direction", "shape"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ImageProperties":
        """Rebuild from :meth:`to_json` output."""
        return cls(
            spacing=tuple(float(v) for v in d["spacing"]),  # type: ignore[arg-type]
            origin=tuple(float(v) for v in d["origin"]),
            direction=tuple(float(v) for v in d["direction"]),
            spatial_dims=int(d["spatial_dims"]),
            shape=tuple(int(v) for v in d["shape"]),  # type: ignore[arg-type]
            num_channels=int(d.get("num_channels", 1)),
            is_rgb=bool(d.get("is_rgb", False)),
            is_complex=bool(d.get("is_complex", False)),
            dtype=str(d.get("dtype", "float32")),
            files=list(d.get("files", [])),
        )

    def sitk_spacing(self) -> tuple[float, ...]:
        """Spacing in SimpleITK order (x, y[, z]), without the dummy 2D axis."""
        real = self.spacing[1:] if self.spatial_dims == 2 else self.spacing
        return tuple(float(v) for v in reversed(real))


# --------------------------------------------------------------------------- file names


def file_ending_of(path: str | Path) -> str:
    """The image ending of ``path`` (``.nii.gz`` counts as one); the last suffix if unknown."""
    name = Path(path).name
    lower = name.lower()
    for ending in sorted(SUPPORTED_ENDINGS, key=len, reverse=True):
        if lower.endswith(ending):
            return name[len(name) - len(ending):]
    return Path(name).suffix


def strip_ending(path: str | Path, ending: str | None = None) -> str:
    """File name without its image ending (``case_0000.nii.gz`` -> ``case_0000``)."""
    name = Path(path).name
    ending = file_ending_of(name) if ending is None else ending
    return name[: len(name) - len(ending)] if ending and name.endswith(ending) else name


def is_supported_ending(ending: str) -> bool:
    """Whether nnDiff can read files with this ending (case-insensitive)."""
    return ending.lower() in SUPPORTED_ENDINGS


def sidecar_candidates(path: str | Path) -> list[Path]:
    """Sidecar JSON paths for ``path`` in lookup order: per file, then per case."""
    path = Path(path)
    stem = strip_ending(path)
    candidates = [path.with_name(stem + ".json")]
    match = _CHANNEL_SUFFIX.match(stem)
    if match:
        candidates.append(path.with_name(match.group("case") + ".json"))
    return candidates


# --------------------------------------------------------------------------- SimpleITK


def _sitk() -> Any:
    """Import SimpleITK on first use (it is optional for training from preprocessed data)."""
    try:
        import SimpleITK  # noqa: N813  (lazy on purpose, see module docstring)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise NnDiffError(
            "reading or writing medical/natural image files needs SimpleITK, which is not "
            "installed. Fix: pip install SimpleITK"
        ) from e
    return SimpleITK


def _read_error(path: Path, detail: str) -> DatasetError:
    first_line = detail.strip().splitlines()[-1] if detail.strip() else "unknown error"
    return DatasetError(
        [(path, f"cannot be read ({first_line[:200]})",
          "check that the file is complete and a valid image of its type; re-export it")]
    )


def _read_with_sitk(path: Path, natural: bool) -> tuple[np.ndarray, ImageProperties]:
    sitk = _sitk()
    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
    except RuntimeError as e:
        raise _read_error(path, str(e)) from None
    dim = img.GetDimension()
    if dim not in (2, 3):
        raise DatasetError([(path, f"has {dim} spatial dimensions; only 2D and 3D are supported",
                             "store each channel (or time point) as its own file _0000, _0001, ...")])
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        arr = np.moveaxis(arr, -1, 0)  # (Z, Y, X, c) / (Y, X, c) -> channel first
    else:
        arr = arr[None]
    is_rgb = natural and ncomp in (3, 4)
    if natural and ncomp == 4:
        logger.info("%s: RGBA image, the alpha channel is dropped", path)
        arr = arr[:3]
    if dim == 2:
        arr = arr[:, None]
    sitk_spacing = tuple(float(v) for v in img.GetSpacing())
    spacing = tuple(reversed(sitk_spacing))
    if dim == 2:
        spacing = (SPACING_2D_Z,) + spacing
    origin = tuple(float(v) for v in img.GetOrigin())
    direction = tuple(float(v) for v in img.GetDirection())
    if natural:
        # PNG/TIFF headers hold dpi-like values, not physical geometry: use unit geometry.
        spacing = (SPACING_2D_Z, 1.0, 1.0) if dim == 2 else (1.0, 1.0, 1.0)
        origin = (0.0,) * dim
        direction = tuple(np.eye(dim).ravel().tolist())
    props = ImageProperties(
        spacing=spacing,  # type: ignore[arg-type]
        origin=origin,
        direction=direction,
        spatial_dims=dim,
        shape=tuple(int(v) for v in arr.shape[1:]),  # type: ignore[arg-type]
        num_channels=int(arr.shape[0]),
        is_rgb=is_rgb,
        is_complex=False,
        dtype=str(arr.dtype),
        files=[str(path)],
    )
    return arr, props


# --------------------------------------------------------------------------- numpy


def _read_numpy_array(path: Path) -> np.ndarray:
    try:
        if path.name.lower().endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                keys = list(npz.keys())
                if "data" in keys:
                    return np.asarray(npz["data"])
                if len(keys) == 1:
                    return np.asarray(npz[keys[0]])
                raise DatasetError([(path, f"holds several arrays {keys} and none is named 'data'",
                                     "store the image under the key 'data'")])
        return np.load(path, allow_pickle=False)
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise _read_error(path, str(e)) from None


def _read_numpy(path: Path) -> tuple[np.ndarray, ImageProperties]:
    arr = _read_numpy_array(path)
    if arr.ndim not in (2, 3):
        raise DatasetError([(path, f"has shape {arr.shape}; numpy images must be 2D (Y, X) or 3D "
                             "(Z, Y, X) with one channel per file",
                             "store each channel as its own file _0000, _0001, ...")])
    if arr.dtype.kind not in "biufc":
        raise DatasetError([(path, f"has dtype {arr.dtype}, not a numeric image",
                             "save a numeric (integer, float or complex) array")])
    dim = arr.ndim
    arr = arr[None, None] if dim == 2 else arr[None]
    spacing = (SPACING_2D_Z, 1.0, 1.0) if dim == 2 else (1.0, 1.0, 1.0)
    props = ImageProperties(
        spacing=spacing,  # type: ignore[arg-type]
        origin=(0.0,) * dim,
        direction=tuple(np.eye(dim).ravel().tolist()),
        spatial_dims=dim,
        shape=tuple(int(v) for v in arr.shape[1:]),  # type: ignore[arg-type]
        num_channels=1,
        is_rgb=False,
        is_complex=arr.dtype.kind == "c",
        dtype=str(arr.dtype),
        files=[str(path)],
    )
    return arr, props


# --------------------------------------------------------------------------- sidecars


def find_sidecar(path: str | Path) -> Path | None:
    """The sidecar JSON that applies to ``path``, or None."""
    for candidate in sidecar_candidates(path):
        if candidate.is_file():
            return candidate
    return None


def _apply_sidecar(path: Path, props: ImageProperties) -> None:
    """Overwrite spacing (and origin/direction if given) from the sidecar JSON, in place."""
    sidecar = find_sidecar(path)
    if sidecar is None:
        if path.name.lower().endswith(NUMPY_ENDINGS):
            logger.info("%s: no sidecar JSON (%s), spacing 1 assumed", path,
                        " or ".join(p.name for p in sidecar_candidates(path)))
        return
    try:
        with open(sidecar, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError([(sidecar, f"is not valid JSON ({e})",
                             'write it as {"spacing": [z, y, x]} in array axis order')]) from None
    dim = props.spatial_dims
    spacing = meta.get("spacing") if isinstance(meta, dict) else None
    valid_lengths = (2, 3) if dim == 2 else (3,)
    if (not isinstance(spacing, list) or len(spacing) not in valid_lengths
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                       for v in spacing)):
        raise DatasetError([(f"{sidecar} key 'spacing'",
                             f"must be a list of {dim if dim == 3 else '2 (or 3)'} positive numbers "
                             f"for the {dim}D image {path.name}, found {spacing!r}",
                             "write the spacing in array axis order, e.g. {\"spacing\": "
                             + ("[3.0, 0.8, 0.8]}" if dim == 3 else "[0.5, 0.5]}"))])
    values = tuple(float(v) for v in spacing)
    props.spacing = ((SPACING_2D_Z,) + values[-2:]) if dim == 2 else values  # type: ignore[assignment]
    for key, length in (("origin", dim), ("direction", dim * dim)):
        if key not in meta:
            continue
        value = meta[key]
        if not isinstance(value, list) or len(value) != length:
            raise DatasetError([(f"{sidecar} key '{key}'",
                                 f"must be a list of {length} numbers, found {value!r}",
                                 f"give the {key} in SimpleITK order or remove the key")])
        setattr(props, key, tuple(float(v) for v in value))


# --------------------------------------------------------------------------- public readers


def read_file(path: str | Path) -> tuple[np.ndarray, ImageProperties]:
    """Read one image file in its on-disk dtype as ``(c, Z, Y, X)`` plus its geometry.

    ``c`` is 3 for RGB natural images, else 1. Raises :class:`DatasetError` naming the file when
    it is missing, unreadable or of an unsupported type.
    """
    path = Path(path)
    ending = file_ending_of(path).lower()
    if not is_supported_ending(ending):
        raise DatasetError([(path, f"has the unsupported ending {ending!r}",
                             f"convert it to one of {', '.join(SUPPORTED_ENDINGS)}")])
    if not path.is_file():
        raise DatasetError([(path, "does not exist", "check the path")])
    if ending in NUMPY_ENDINGS:
        arr, props = _read_numpy(path)
    else:
        arr, props = _read_with_sitk(path, natural=ending in NATURAL_ENDINGS)
    if ending in SIDECAR_ENDINGS:
        _apply_sidecar(path, props)
    return arr, props


def geometry_differences(a: ImageProperties, b: ImageProperties) -> list[str]:
    """Human-readable differences in shape, spacing, origin or direction beyond tolerance.

    Tolerances (module constants): spacing relative ``SPACING_RTOL``; origin
    ``ORIGIN_ATOL_MM + ORIGIN_RTOL * |origin|``; direction absolute ``DIRECTION_ATOL``.
    """
    diffs: list[str] = []
    if tuple(a.shape) != tuple(b.shape):
        diffs.append(f"shape {list(a.shape)} vs {list(b.shape)}")
        return diffs  # geometry of differently sized images is moot
    if a.spatial_dims != b.spatial_dims:
        diffs.append(f"dimensionality {a.spatial_dims}D vs {b.spatial_dims}D")
        return diffs
    if not np.allclose(a.spacing, b.spacing, rtol=SPACING_RTOL, atol=0.0):
        diffs.append(f"spacing {_fmt(a.spacing)} vs {_fmt(b.spacing)}")
    if len(a.origin) != len(b.origin) or not np.allclose(a.origin, b.origin, rtol=ORIGIN_RTOL,
                                                         atol=ORIGIN_ATOL_MM):
        diffs.append(f"origin {_fmt(a.origin)} vs {_fmt(b.origin)}")
    if len(a.direction) != len(b.direction) or not np.allclose(a.direction, b.direction,
                                                               rtol=0.0, atol=DIRECTION_ATOL):
        diffs.append(f"direction {_fmt(a.direction)} vs {_fmt(b.direction)}")
    return diffs


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def read_images(paths: Sequence[str | Path]) -> tuple[np.ndarray, ImageProperties]:
    """Read the channel files of one case and stack them to ``(C, Z, Y, X)``.

    Returns float32 (complex64 if any file is complex) and the properties of the first file with
    ``num_channels``, ``is_complex`` and ``files`` covering all files. Raises
    :class:`DatasetError` naming the files if their shape or geometry differ.
    """
    if not paths:
        raise ValueError("read_images needs at least one path")
    if any(p is None for p in paths):
        raise ValueError("read_images got None for a missing channel (allow_missing_channels); "
                         "pass Case.existing_images() or fill the missing channel yourself")
    arrays: list[np.ndarray] = []
    all_props: list[ImageProperties] = []
    for p in paths:
        arr, props = read_file(p)
        arrays.append(arr)
        all_props.append(props)
    first = all_props[0]
    problems = []
    for p, props in zip(paths[1:], all_props[1:]):
        diffs = geometry_differences(first, props)
        if diffs:
            problems.append((p, f"does not match {Path(paths[0]).name}: " + "; ".join(diffs),
                             "resample all channels of a case onto the same grid"))
    if problems:
        raise DatasetError(problems)
    is_complex = any(props.is_complex for props in all_props)
    dtype = np.complex64 if is_complex else np.float32
    data = np.concatenate([a.astype(dtype, copy=False) for a in arrays], axis=0)
    props = ImageProperties(**{**asdict(first)})
    props.num_channels = int(data.shape[0])
    props.is_complex = is_complex
    props.files = [str(p) for p in paths]
    return data, props


def read_label(path: str | Path) -> tuple[np.ndarray, ImageProperties]:
    """Read a label map as an integer ``(1, Z, Y, X)`` array.

    Integer files keep their dtype; float files holding whole numbers become int32. Raises
    :class:`DatasetError` for multi-channel, complex or non-integral label files.
    """
    path = Path(path)
    arr, props = read_file(path)
    if arr.shape[0] != 1:
        raise DatasetError([(path, f"has {arr.shape[0]} channels; a label map has one",
                             "save the label map as a single-channel (grey) integer image")])
    if arr.dtype.kind == "c":
        raise DatasetError([(path, "is complex-valued; a label map holds integers",
                             "save the label map as an integer array")])
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DatasetError([(path, "holds non-integer values; a label map holds integers",
                                 "save the label map with integer values (e.g. uint8)")])
        arr = arr.astype(np.int32)
    return arr, props


# --------------------------------------------------------------------------- writers


def _cast_for_integer_format(array: np.ndarray, ending: str, target_dtype: str) -> np.ndarray:
    """PNG/JPEG/BMP store integers: round and clip float arrays into the target integer range."""
    if array.dtype.kind in "ui" and array.min(initial=0) >= 0:
        if array.max(initial=0) <= 255:
            return array.astype(np.uint8)
        if ending == ".png" and array.max(initial=0) <= 65535:
            return array.astype(np.uint16)
    dtype = np.dtype(target_dtype) if target_dtype in ("uint8", "uint16") else np.dtype(np.uint8)
    if ending != ".png":
        dtype = np.dtype(np.uint8)  # JPEG/BMP: 8 bit only
    info = np.iinfo(dtype)
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    return np.clip(np.round(array.astype(np.float64)), info.min, info.max).astype(dtype)


def _sitk_compatible(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return np.ascontiguousarray(array)


def _move_into_place(tmp_dir: Path, target: Path) -> None:
    """Move every file written in ``tmp_dir`` beside ``target``; the named file goes last.

    Data files of a header/data pair (``.mhd`` + ``.raw``) land before the header, so a reader
    never sees a header whose data is missing.
    """
    written = sorted(tmp_dir.iterdir(), key=lambda p: p.name == target.name)
    for f in written:
        os.replace(f, target.parent / f.name)


def write_image(array: np.ndarray, properties: ImageProperties, path: str | Path) -> None:
    """Write ``array`` (``(C, Z, Y, X)`` or ``(Z, Y, X)``) with ``properties``' geometry, atomically.

    The format follows ``path``'s ending. ``C`` must be 1, or 3 for an RGB natural image.
    Float and integer arrays are written in their dtype (bool -> uint8, float16 -> float32);
    PNG/JPEG/BMP store integers only, so float arrays are rounded and clipped to uint8 (uint16 for
    PNG when ``properties.dtype`` is uint16). Complex arrays need ``.npy``/``.npz``. Numpy files,
    and natural images whose geometry is not unit, get a per-file sidecar ``{name}.json`` holding
    spacing, origin and direction.
    """
    path = Path(path)
    ending = file_ending_of(path).lower()
    if not is_supported_ending(ending):
        raise NnDiffError(f"cannot write {path}: unsupported ending {ending!r}; "
                          f"use one of {', '.join(SUPPORTED_ENDINGS)}")
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"write_image expects (C, Z, Y, X) or (Z, Y, X), got shape {array.shape}")
    num_channels = array.shape[0]
    rgb_ok = ending in NATURAL_ENDINGS and num_channels == 3
    if num_channels != 1 and not rgb_ok:
        raise ValueError(f"cannot write {num_channels} channels to one {ending} file {path.name}; "
                         "write one file per channel (RGB natural images may hold 3)")
    if properties.spatial_dims == 2 and array.shape[1] != 1:
        raise ValueError(f"properties say 2D but the array has Z = {array.shape[1]}")
    if array.dtype.kind == "c" and ending not in NUMPY_ENDINGS:
        raise NnDiffError(f"cannot write complex data to {path.name}: use .npy or .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp_path = tmp_dir / path.name
        if ending in NUMPY_ENDINGS:
            _write_numpy(array, properties, tmp_path, ending)
        else:
            _write_with_sitk(array, properties, tmp_path, ending)
        _move_into_place(tmp_dir, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _write_numpy(array: np.ndarray, properties: ImageProperties, tmp_path: Path,
                 ending: str) -> None:
    spatial = array[0, 0] if properties.spatial_dims == 2 else array[0]
    if ending == ".npz":
        np.savez_compressed(tmp_path, data=spatial)
        # np.savez appends .npz only when missing; the name already ends with it.
    else:
        np.save(tmp_path, spatial)
    _write_sidecar(properties, tmp_path)


def _has_non_unit_geometry(properties: ImageProperties) -> bool:
    dim = properties.spatial_dims
    unit_spacing = (1.0,) * dim
    real_spacing = tuple(properties.spacing[1:]) if dim == 2 else tuple(properties.spacing)
    return (not np.allclose(real_spacing, unit_spacing)
            or (len(properties.origin) == dim and not np.allclose(properties.origin, 0.0))
            or (len(properties.direction) == dim * dim
                and not np.allclose(properties.direction, np.eye(dim).ravel())))


def _write_sidecar(properties: ImageProperties, image_path: Path) -> None:
    """Per-file sidecar ``{name}.json`` with spacing (array order), origin and direction."""
    dim = properties.spatial_dims
    spacing = list(properties.spacing[1:]) if dim == 2 else list(properties.spacing)
    meta: dict[str, Any] = {"spacing": spacing}
    if len(properties.origin) == dim:
        meta["origin"] = list(properties.origin)
    if len(properties.direction) == dim * dim:
        meta["direction"] = list(properties.direction)
    sidecar = image_path.with_name(strip_ending(image_path) + ".json")
    with open(sidecar, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def _write_with_sitk(array: np.ndarray, properties: ImageProperties, tmp_path: Path,
                     ending: str) -> None:
    sitk = _sitk()
    if ending in INTEGER_ONLY_ENDINGS:
        array = _cast_for_integer_format(array, ending, properties.dtype)
    array = _sitk_compatible(array)
    data = array[:, 0] if properties.spatial_dims == 2 else array  # drop the dummy z axis
    if data.shape[0] == 3:
        img = sitk.GetImageFromArray(np.moveaxis(data, 0, -1).copy(), isVector=True)
    else:
        img = sitk.GetImageFromArray(data[0])
    dim = img.GetDimension()
    if ending in NATURAL_ENDINGS:
        # Natural formats carry no trustworthy geometry: a sidecar keeps it when it is not unit.
        if _has_non_unit_geometry(properties):
            _write_sidecar(properties, tmp_path)
    else:
        img.SetSpacing(properties.sitk_spacing())
        if len(properties.origin) == dim:
            img.SetOrigin(tuple(properties.origin))
        if len(properties.direction) == dim * dim:
            img.SetDirection(tuple(properties.direction))
    compress = ending in (".nrrd", ".nhdr", ".mha", ".mhd")
    try:
        sitk.WriteImage(img, str(tmp_path), useCompression=compress)
    except RuntimeError as e:
        raise NnDiffError(f"cannot write {tmp_path.name}: {str(e).strip().splitlines()[-1]}") from None
