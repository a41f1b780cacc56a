"""Tiny synthetic raw datasets in the nnDiff layout, for tests, demos and documentation.

``make_example_dataset(kind, raw_root, dataset_id)`` writes ``raw_root/DatasetXXX_Name/`` and
returns that folder. Every builder is seeded and fast (well under 0.5 s); images are small
(2D 32x32, 3D at most 12x24x24) but carry structure (bodies, bones, blobs) so that fingerprints and
plans see realistic intensity distributions.

Kinds (:data:`EXAMPLE_KINDS`):

=================  ===============  ==========================================================
kind               task             content
=================  ===============  ==========================================================
``2d_grey_png``    generation       32x32 grey PNG (uint8), disks and bars on a gradient;
                                    ``metadata.json`` with ``subject`` (two cases per subject)
``2d_rgb_png``     generation       32x32 RGB PNG, one file holds channels R, G, B (nnU-Net's
                                    RGB exception), stained-tissue-like blobs
``3d_ct``          generation       NIfTI int16 in HU (-1024..1500), body + bones + lungs,
                                    12x24x24 at 3.0x0.8x0.8 mm (z, y, x), non-zero origin,
                                    rotated direction
``3d_mr``          generation       NIfTI float32, 16^3 at 1 mm, positive, dark background
``nnunet_seg``     segmentation     nnU-Net v2 dataset (2 channels T2/ADC, labels background/a/b,
                                    labelsTr, imagesTs) plus the ``"task"`` key
``complex_npy``    reconstruction   complex64 .npy 32x32 MR slices with ``{CASE}.json`` sidecar
                                    (spacing) and a ``"reconstruction"`` block
``translation``    translation      imagesTr MR-like, targetsTr CT-like (HU), 8x16x16 NIfTI,
                                    ``target_names``
``anomaly_2d``     anomaly_detection 32x32 grey PNG; ``metadata.json`` ``healthy`` flags and
                                    lesion masks in labelsTr for the unhealthy cases
``denoising_2d``   denoising        32x32 grey PNG, clean images only + ``"degradation"`` block
``conditional_2d`` generation       like ``2d_grey_png`` with a categorical (``shape``) and a
                                    continuous (``size``) condition in ``metadata.json``
=================  ===============  ==========================================================
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nndiff.dataset.io import ImageProperties, write_image
from nndiff.utils.files import save_json

#: Default number of training cases per kind (10 for 2D so 5-fold CV by subject works).
DEFAULT_NUM_CASES: dict[str, int] = {
    "2d_grey_png": 10,
    "2d_rgb_png": 6,
    "3d_ct": 5,
    "3d_mr": 5,
    "nnunet_seg": 5,
    "complex_npy": 6,
    "translation": 5,
    "anomaly_2d": 10,
    "denoising_2d": 6,
    "conditional_2d": 10,
}
DEFAULT_NAMES: dict[str, str] = {
    "2d_grey_png": "Grey2D",
    "2d_rgb_png": "RGB2D",
    "3d_ct": "CT3D",
    "3d_mr": "MR3D",
    "nnunet_seg": "Seg3D",
    "complex_npy": "ComplexMR2D",
    "translation": "MRtoCT3D",
    "anomaly_2d": "Anomaly2D",
    "denoising_2d": "Denoise2D",
    "conditional_2d": "Conditional2D",
}
EXAMPLE_KINDS: tuple[str, ...] = tuple(DEFAULT_NUM_CASES)

#: Geometry of the 3D CT example, in array order (z, y, x) for spacing.
CT_SPACING = (3.0, 0.8, 0.8)
CT_SHAPE = (12, 24, 24)
CT_ORIGIN = (-10.5, 20.25, -31.0)  # SimpleITK order (x, y, z)


def _rotation_z(degrees: float) -> tuple[float, ...]:
    """Row-major 3x3 rotation about the z axis (a proper rotation, NIfTI-representable)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


CT_DIRECTION = _rotation_z(15.0)


def properties_2d(spacing: tuple[float, float] = (1.0, 1.0), shape: tuple[int, int] = (32, 32),
                  is_rgb: bool = False, dtype: str = "uint8") -> ImageProperties:
    """Properties of a 2D image: ``spacing`` is (y, x); the dummy z spacing is 999."""
    return ImageProperties(spacing=(999.0, float(spacing[0]), float(spacing[1])), origin=(0.0, 0.0),
                           direction=(1.0, 0.0, 0.0, 1.0), spatial_dims=2, shape=(1, *shape),
                           num_channels=3 if is_rgb else 1, is_rgb=is_rgb, dtype=dtype)


def properties_3d(spacing: tuple[float, float, float], shape: tuple[int, int, int],
                  origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
                  direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
                  dtype: str = "float32") -> ImageProperties:
    """Properties of a 3D image: ``spacing`` (z, y, x); origin/direction in SimpleITK order."""
    return ImageProperties(spacing=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
                           origin=origin, direction=direction, spatial_dims=3, shape=shape,
                           dtype=dtype)


# --------------------------------------------------------------------------- shapes


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    return list(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))


def _ellipse(shape: tuple[int, ...], center: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    grids = _grid(shape)
    dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii))
    return dist <= 1.0


def _grey_2d(rng: np.random.Generator, shape_kind: int | None = None,
             size: float | None = None) -> np.ndarray:
    """32x32 uint8: gradient background, a disk (or square) and a bar, mild noise."""
    y, x = _grid((32, 32))
    img = 20.0 + 30.0 * (x / 31.0) * rng.uniform(0.5, 1.0)
    kind = int(rng.integers(0, 2)) if shape_kind is None else shape_kind
    radius = float(rng.uniform(4.0, 9.0)) if size is None else size
    cy, cx = rng.uniform(10, 22, size=2)
    if kind == 0:
        blob = (y - cy) ** 2 + (x - cx) ** 2 <= radius ** 2
    else:
        blob = (np.abs(y - cy) <= radius * 0.8) & (np.abs(x - cx) <= radius * 0.8)
    img[blob] = rng.uniform(150, 230)
    row = int(rng.integers(2, 29))
    img[row:row + 2, 3:29] += rng.uniform(40, 80)
    img += rng.normal(0, 4.0, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _rgb_2d(rng: np.random.Generator) -> np.ndarray:
    """(3, 32, 32) uint8: pink background with purple nuclei-like blobs (H&E-like)."""
    img = np.empty((3, 32, 32), dtype=np.float64)
    img[0], img[1], img[2] = 235.0, 200.0, 215.0
    for _ in range(int(rng.integers(4, 8))):
        blob = _ellipse((32, 32), tuple(rng.uniform(3, 29, size=2)), tuple(rng.uniform(2, 4.5, size=2)))
        color = np.array([rng.uniform(90, 140), rng.uniform(40, 80), rng.uniform(120, 170)])
        img[:, blob] = color[:, None]
    img += rng.normal(0, 5.0, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _ct_3d(rng: np.random.Generator, shape: tuple[int, int, int] = CT_SHAPE,
           spacing: tuple[float, float, float] = CT_SPACING) -> np.ndarray:
    """int16 HU volume: air -1024, body soft tissue ~40 HU, fat rim, lungs ~-800, bone up to 1500."""
    z, y, x = shape
    sy, sx = spacing[1], spacing[2]
    vol = np.full(shape, -1024.0)
    cy, cx = y / 2 + rng.uniform(-1, 1), x / 2 + rng.uniform(-1, 1)
    body = _ellipse((y, x), (cy, cx), (y * 0.42 * rng.uniform(0.9, 1.0), x * 0.46))
    fat = body & ~_ellipse((y, x), (cy, cx), (y * 0.36, x * 0.40))
    lungs = (_ellipse((y, x), (cy - 1, cx - x * 0.2), (y * 0.18, x * 0.12))
             | _ellipse((y, x), (cy - 1, cx + x * 0.2), (y * 0.18, x * 0.12)))
    spine = _ellipse((y, x), (cy + y * 0.25, cx), (2.0 * 0.8 / sy, 2.0 * 0.8 / sx))
    for k in range(z):
        sl = vol[k]
        sl[body] = 40.0
        sl[fat] = -100.0
        sl[lungs] = -800.0
        sl[spine] = 1000.0 + 60.0 * k / max(z - 1, 1)
    vol += rng.normal(0, 15.0, size=shape) * (vol > -1000)
    vol[vol > 900] += rng.uniform(0, 500)  # bone density varies; cap below at 1500
    return np.clip(np.round(vol), -1024, 1500).astype(np.int16)


def _mr_3d(rng: np.random.Generator, shape: tuple[int, ...] = (16, 16, 16)) -> np.ndarray:
    """float32 head-like volume: dark noisy background, grey shell, bright core; all >= 0."""
    center = tuple(n / 2 - 0.5 + rng.uniform(-0.7, 0.7) for n in shape)
    head = _ellipse(shape, center, tuple(n * 0.42 for n in shape))
    core = _ellipse(shape, center, tuple(n * 0.25 for n in shape))
    vol = np.abs(rng.normal(0, 4.0, size=shape))  # Rician-like magnitude background
    vol[head] = 300.0 + rng.normal(0, 20.0, size=int(head.sum()))
    vol[core] = 600.0 * rng.uniform(0.9, 1.1) + rng.normal(0, 25.0, size=int(core.sum()))
    return np.abs(vol).astype(np.float32)


# --------------------------------------------------------------------------- builders


def _case_id(i: int) -> str:
    return f"case_{i:03d}"


def _build_2d_grey_png(folder: Path, n: int, rng: np.random.Generator) -> dict[str, Any]:
    props = properties_2d()
    metadata = {}
    for i in range(n):
        write_image(_grey_2d(rng)[None, None], props, folder / "imagesTr" / f"{_case_id(i)}_0000.png")
        metadata[_case_id(i)] = {"subject": f"subject_{i // 2:02d}"}
    save_json(metadata, folder / "metadata.json")
    return {"task": "generation", "channel_names": {"0": "grey"}, "numTraining": n,
            "file_ending": ".png"}


def _build_2d_rgb_png(folder: Path, n: int, rng: np.random.Generator) -> dict[str, Any]:
    props = properties_2d(is_rgb=True)
    for i in range(n):
        write_image(_rgb_2d(rng)[:, None], props, folder / "imagesTr" / f"{_case_id(i)}_0000.png")
    return {"task": "generation", "channel_names": {"0": "R", "1": "G", "2": "B"},
            "numTraining": n, "file_ending": ".png"}


def _build_3d_ct(folder: Path, n: int, rng: np.random.Generator) -> dict[str, Any]:
    props = properties_3d(CT_SPACING, CT_SHAPE, CT_ORIGIN, CT_DIRECTION, dtype="int16")
    for i in range(n):
        write_image(_ct_3d(rng)[None], props, folder / "imagesTr" / f"{_case_id(i)}_0000.nii.gz")
    return {"task": "generation", "channel_names": {"0": "CT"}, "numTraining": n,
            "file_ending": ".nii.gz"}


def _build_3d_mr(folder: Path, n: int, rng: np.random.Generator) -> dict[str, Any]:
    props = properties_3d((1.0, 1.0, 1.0), (16, 16, 16), origin=(-8.0, -8.0, -8.0))
    for i in range(n):
        write_image(_mr_3d(rng)[None], props, folder / "imagesTr" / f"{_case_id(i)}_0000.nii.gz")
    return {"task": "generation", "channel_names": {"0": "T1"}, "numTraining": n,
            "file_ending": ".nii.gz"}


def _seg_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Two MR-like channels and a label map (1 = lesion 'a', 2 = its core 'b')."""
    t2 = _mr_3d(rng, shape)
    center = tuple(s / 2 + rng.uniform(-1.5, 1.5) for s in shape)
    a = _ellipse(shape, center, (shape[0] * 0.3, shape[1] * 0.25, shape[2] * 0.25))
    b = _ellipse(shape, center, (shape[0] * 0.15, shape[1] * 0.12, shape[2] * 0.12))
    t2[a] += 250.0
    t2[b] += 200.0
    adc = np.where(t2 > 50, 1500.0 - t2, 0.0) + np.abs(rng.normal(0, 5.0, size=shape))
    label = np.zeros(shape, dtype=np.uint8)
    label[a] = 1
    label[b] = 2
    return np.stack([t2, adc.astype(np.float32)]), label


def _build_nnunet_seg(folder: Path, n: int, rng: np.random.Generator) -> dict[str, Any]:
    shape = (8, 16, 16)
    props = properties_3d((2.0, 1.0, 1.0), shape, origin=(5.0, -3.0, 12.0))
    label_props = properties_3d((2.0, 1.0, 1.0), shape, origin=(5.0, -3.0, 12.0), dtype="uint8")
    for i in range(n + 1):
        images, label = _seg_case(rng, shape)
        split = "Tr" if i < n else "Ts"
        for c in range(2):
            write_image(images[c][None], props, folder / f"images{split}" / f"{_case_id(i)}_{c:04d}.nii.gz")
        write_image(label[None], label_props, folder / f"labels{split}" / f"{_case_id(i)}.nii.gz")
    return {"channel_names": {"0": "T2", "1": "ADC"},
            "labels": {"background": 0, "a": 1, "b": 2},
            "numTraining": n, "file_ending": ".nii.gz",
            "name": "Seg3D", "description": "synthetic nnU-Net v2 style dataset",
            "task": "segmentation"}


def _complex_slice(rng: np.random.Generator) -> np.ndarray:
    """32x32 complex64 MR-like slice: magnitude body with a bright core, smooth phase."""
    mag = _mr_3d(rng, (1, 32, 32))[0]
    y, x = _grid((32, 32))
    phase = rng.uniform(-0.5, 0.5) + 0.05 * (x - 16) * rng.uniform(0.5, 1.5) + 0.03 * (y - 16)
    return (mag * np.exp(1j * phase)).astype(np.complex64)


def _build_complex_npy(folder: Path, n: int, rng: np.random.Generator) -> dict[str, Any]:
    props = properties_2d(spacing=(0.5, 0.5), dtype="complex64")
    for i in range(n):
        # write_image puts the geometry in a per-file sidecar; the example uses the per-case one.
        path = folder / "imagesTr" / f"{_case_id(i)}_0000.npy"
        write_image(_complex_slice(rng)[None, None], props, path)
        (folder / "imagesTr" / f"{_case_id(i)}_0000.json").rename(folder / "imagesTr" / f"{_case_id(i)}.json")
    return {"task": "reconstruction", "channel_names": {"0": "MR"}, "numTraining": n,
            "file_ending": ".npy",
            "reconstruction": {"operator": "mri_cartesian", "acceleration": 4.0,
                               "center_fraction": 0.08, "mask_type": "random", "num_coils": 1}}


def _build_translation(folder: Path, n: int, rng: np.random.Generator) -> dict[str, Any]:
    shape = (8, 16, 16)
    props = properties_3d((2.0, 1.0, 1.0), shape, origin=(0.0, -8.0, 4.0))
    for i in range(n):
        ct = _ct_3d(rng, shape, (2.0, 1.0, 1.0)).astype(np.float32)
        # MR-like contrast of the same anatomy: bone and air dark, fat bright, tissue mid grey.
        mr = np.select([ct < -900, ct < -500, ct < -50, ct < 300], [5.0, 30.0, 800.0, 400.0], 60.0)
        mr = np.abs(mr + rng.normal(0, 10.0, size=shape)).astype(np.float32)
        write_image(mr[None], props, folder / "imagesTr" / f"{_case_id(i)}_0000.nii.gz")
        write_image(ct.astype(np.int16)[None], props, folder / "targetsTr" / f"{_case_id(i)}_0000.nii.gz")
    return {"task": "translation", "channel_names": {"0": "T1"}, "target_names": {"0": "CT"},
            "numTraining": n, "file_ending": ".nii.gz"}


def _build_anomaly_2d(folder: Path, n: int, rng: np.random.Generator) -> dict[str, Any]:
    props = properties_2d()
    metadata = {}
    for i in range(n):
        img = _grey_2d(rng, shape_kind=0)
        healthy = i % 2 == 0
        lesion = np.zeros((32, 32), dtype=np.uint8)
        if not healthy:
            lesion_mask = _ellipse((32, 32), tuple(rng.uniform(8, 24, size=2)), (3.0, 3.0))
            img[lesion_mask] = 255
            lesion[lesion_mask] = 1
            write_image(lesion[None, None], props, folder / "labelsTr" / f"{_case_id(i)}.png")
        write_image(img[None, None], props, folder / "imagesTr" / f"{_case_id(i)}_0000.png")
        metadata[_case_id(i)] = {"healthy": healthy, "subject": f"subject_{i:02d}"}
    save_json(metadata, folder / "metadata.json")
    return {"task": "anomaly_detection", "channel_names": {"0": "grey"},
            "labels": {"background": 0, "lesion": 1}, "numTraining": n, "file_ending": ".png"}


def _build_denoising_2d(folder: Path, n: int, rng: np.random.Generator) -> dict[str, Any]:
    props = properties_2d()
    for i in range(n):
        write_image(_grey_2d(rng)[None, None], props, folder / "imagesTr" / f"{_case_id(i)}_0000.png")
    return {"task": "denoising", "channel_names": {"0": "grey"}, "numTraining": n,
            "file_ending": ".png", "degradation": {"type": "gaussian", "level": 0.1}}


def _build_conditional_2d(folder: Path, n: int, rng: np.random.Generator) -> dict[str, Any]:
    props = properties_2d()
    metadata = {}
    for i in range(n):
        shape_kind = i % 2
        size = float(rng.uniform(4.0, 9.0))
        write_image(_grey_2d(rng, shape_kind, size)[None, None], props,
                    folder / "imagesTr" / f"{_case_id(i)}_0000.png")
        metadata[_case_id(i)] = {"subject": f"subject_{i // 2:02d}",
                                 "shape": ["disk", "square"][shape_kind], "size": round(size, 3)}
    save_json(metadata, folder / "metadata.json")
    return {"task": "generation", "channel_names": {"0": "grey"}, "numTraining": n,
            "file_ending": ".png",
            "conditions": {"shape": {"type": "categorical", "values": ["disk", "square"]},
                           "size": {"type": "continuous"}}}


_BUILDERS: dict[str, Callable[[Path, int, np.random.Generator], dict[str, Any]]] = {
    "2d_grey_png": _build_2d_grey_png,
    "2d_rgb_png": _build_2d_rgb_png,
    "3d_ct": _build_3d_ct,
    "3d_mr": _build_3d_mr,
    "nnunet_seg": _build_nnunet_seg,
    "complex_npy": _build_complex_npy,
    "translation": _build_translation,
    "anomaly_2d": _build_anomaly_2d,
    "denoising_2d": _build_denoising_2d,
    "conditional_2d": _build_conditional_2d,
}


def make_example_dataset(kind: str, raw_root: str | Path, dataset_id: int,
                         num_cases: int | None = None, seed: int = 0,
                         name: str | None = None) -> Path:
    """Write a synthetic raw dataset ``raw_root/Dataset{id:03d}_{name}`` and return its folder.

    ``kind`` is one of :data:`EXAMPLE_KINDS`; ``num_cases`` defaults to
    :data:`DEFAULT_NUM_CASES`; the same ``seed`` gives identical files. An existing folder of
    the same name is an error (examples never overwrite data).
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown example kind {kind!r}; valid kinds: {', '.join(EXAMPLE_KINDS)}")
    n = DEFAULT_NUM_CASES[kind] if num_cases is None else int(num_cases)
    if n < 1:
        raise ValueError(f"num_cases must be >= 1, got {n}")
    if not 0 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be in 0..999, got {dataset_id}")
    folder = Path(raw_root) / f"Dataset{int(dataset_id):03d}_{name or DEFAULT_NAMES[kind]}"
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; choose another dataset_id or raw_root")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    dataset_json = _BUILDERS[kind](folder, n, rng)
    dataset_json.setdefault("name", folder.name.split("_", 1)[1])
    dataset_json.setdefault("description", f"synthetic nnDiff example ({kind}, seed {seed})")
    save_json(dataset_json, folder / "dataset.json")
    return folder
