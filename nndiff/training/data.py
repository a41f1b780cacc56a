"""Training data: preprocessed cases, patch and slice sampling, mild augmentation, resumable loaders.

The batch of training iteration ``i`` is a pure function of ``(seed, i)``: case choice, slice,
patch location and augmentation all draw from a generator seeded with ``(seed, i)``. So

- resuming at iteration ``k`` draws exactly the batches an uninterrupted run draws, and
- batchgenerators' multithreaded augmenter (worker ``w`` of ``n`` makes iterations
  ``start + w, start + w + n, ...``; it hands them out round-robin) gives the same stream as
  the single-threaded loader.

Batches are dicts of numpy arrays: ``data`` float32 ``(B, C, *patch)``, optional ``seg`` int16
``(B, 1, *patch)``, optional ``target`` float32 ``(B, C_t, *patch)``, ``keys`` (case identifiers)
and ``iteration``.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase

from nndiff.errors import NnDiffError
from nndiff.training.rng import derive_seed, numpy_global_seed, stable_id

logger = logging.getLogger(__name__)

#: Independent random streams derived from the run seed.
STREAM_TRAIN = 1
STREAM_VALIDATION_PATCH = 2
STREAM_VALIDATION_NOISE = 3

#: Mild augmentation (see documentation/training.md for the reasons): in-plane rotation up to
#: this many degrees and isotropic scaling in this range, each applied to 20 % of the samples.
MILD_MAX_ROTATION_DEG = 10.0
MILD_SCALE_RANGE = (0.9, 1.1)
MILD_PROBABILITY = 0.2

#: Default in-memory cache of loaded cases, per process.
DEFAULT_CACHE_BYTES = 2 * 2**30

ARRAY_KEYS = ("data", "seg", "target")


def list_cases(folder: Path) -> list[str]:
    """Sorted case identifiers (``CASE.npz`` stems) of a preprocessed configuration folder."""
    if not folder.is_dir():
        raise NnDiffError(f"preprocessed data not found: {folder} does not exist. Fix: run "
                          f"nndiff_preprocess for this dataset and configuration first")
    cases = sorted(p.name[: -len(".npz")] for p in folder.glob("*.npz"))
    if not cases:
        raise NnDiffError(f"no preprocessed cases (*.npz) in {folder}. Fix: re-run nndiff_preprocess")
    return cases


@dataclass
class CaseArrays:
    """One preprocessed case. ``pad_*``: per-channel values used where a patch leaves the image
    (the channel minimum, i.e. the background of a [-1, 1]-normalised image)."""

    data: np.ndarray
    seg: np.ndarray | None = None
    target: np.ndarray | None = None
    pad_data: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    pad_target: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.data, self.seg, self.target) if a is not None)


def _channel_min(array: np.ndarray) -> np.ndarray:
    return array.reshape(array.shape[0], -1).min(axis=1).astype(np.float32)


def load_case(path: Path) -> CaseArrays:
    """Read ``CASE.npz``; checks the (C, Z, Y, X) layout so a wrong file fails with its name."""
    try:
        with np.load(path) as npz:
            arrays = {k: np.asarray(npz[k]) for k in ARRAY_KEYS if k in npz.files}
    except (OSError, ValueError) as err:
        raise NnDiffError(f"cannot read preprocessed case {path}: {err}. Fix: re-run nndiff_preprocess") from err
    if "data" not in arrays:
        raise NnDiffError(f"{path} has no 'data' array. Fix: re-run nndiff_preprocess")
    for key, array in arrays.items():
        if array.ndim != 4:
            raise NnDiffError(f"{path}: '{key}' must be a (C, Z, Y, X) array, got shape {array.shape}. "
                              "Fix: re-run nndiff_preprocess")
        if array.shape[1:] != arrays["data"].shape[1:]:
            raise NnDiffError(f"{path}: '{key}' has spatial shape {array.shape[1:]} but 'data' has "
                              f"{arrays['data'].shape[1:]}. Fix: re-run nndiff_preprocess")
    data = arrays["data"].astype(np.float32, copy=False)
    target = arrays.get("target")
    if target is not None:
        target = target.astype(np.float32, copy=False)
    seg = arrays.get("seg")
    return CaseArrays(data=data, seg=None if seg is None else seg.astype(np.int16, copy=False),
                      target=target, pad_data=_channel_min(data),
                      pad_target=None if target is None else _channel_min(target))


class CaseStore:
    """Loads ``CASE.npz`` files on demand and keeps them in memory up to ``cache_bytes``.

    Case files are compressed; decompressing one per sample would dominate small 2D steps.
    """

    def __init__(self, folder: Path, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.folder = Path(folder)
        self.cache_bytes = cache_bytes
        self._cache: dict[str, CaseArrays] = {}
        self._cached_bytes = 0

    def __getitem__(self, identifier: str) -> CaseArrays:
        case = self._cache.get(identifier)
        if case is None:
            case = load_case(self.folder / f"{identifier}.npz")
            if self._cached_bytes + case.nbytes <= self.cache_bytes:
                self._cache[identifier] = case
                self._cached_bytes += case.nbytes
        return case

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes start with an empty cache rather than a pickled copy of it.
        state = dict(self.__dict__)
        state["_cache"] = {}
        state["_cached_bytes"] = 0
        return state


def load_case_json(folder: Path, identifier: str) -> dict[str, Any]:
    """``CASE.json`` beside the case file, or ``{}`` when absent."""
    path = Path(folder) / f"{identifier}.json"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingSpec:
    """What a training sample is: a ``patch_size`` patch of ``spatial_dims`` dimensions.

    ``spatial_dims == 2`` draws one z slice of the (C, Z, Y, X) case and a (Y, X) patch of it;
    ``3`` draws a (Z, Y, X) patch.
    """

    patch_size: tuple[int, ...]
    spatial_dims: int
    augmentation: str = "none"

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise NnDiffError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if len(self.patch_size) != self.spatial_dims:
            raise NnDiffError(f"patch_size {list(self.patch_size)} must have {self.spatial_dims} entries "
                              f"for a {self.spatial_dims}D configuration. Fix: correct the plans file")


def crop_with_padding(array: np.ndarray, start: Sequence[int], size: Sequence[int],
                      pad_value: np.ndarray | float) -> np.ndarray:
    """Region ``[start, start + size)`` of the spatial axes of ``array`` (C, *spatial).

    ``start`` may be negative and the region may extend past the end: those voxels get
    ``pad_value`` (a scalar or one value per channel).
    """
    channels = array.shape[0]
    out = np.empty((channels, *size), dtype=array.dtype)
    out[...] = np.asarray(pad_value, dtype=array.dtype).reshape((-1,) + (1,) * len(size))
    src, dst = [slice(None)], [slice(None)]
    for begin, length, extent in zip(start, size, array.shape[1:]):
        lo, hi = max(begin, 0), min(begin + length, extent)
        if hi <= lo:
            return out  # region entirely outside the image
        src.append(slice(lo, hi))
        dst.append(slice(lo - begin, hi - begin))
    out[tuple(dst)] = array[tuple(src)]
    return out


def choose_patch_start(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator) -> tuple[int, ...]:
    """Patch origin per axis: uniform over all positions that keep the patch inside the image;
    on an axis where the image is smaller than the patch, the image is centred in the patch
    (padding split evenly), so small images keep one consistent layout for a generator to learn."""
    start = []
    for extent, length in zip(shape, patch):
        if extent >= length:
            start.append(int(rng.integers(0, extent - length + 1)))
        else:
            start.append(-((length - extent) // 2))
    return tuple(start)


def extraction_size(spec: SamplingSpec) -> tuple[int, ...]:
    """Size of the region cut before augmentation: the patch, enlarged for ``mild`` so that a
    rotated/zoomed patch never reaches outside the cut region (no artificial border inside)."""
    if spec.augmentation == "none":
        return tuple(spec.patch_size)
    angle = math.radians(MILD_MAX_ROTATION_DEG)
    rotated = (math.cos(angle) + math.sin(angle)) * MILD_SCALE_RANGE[1]
    in_plane = set(range(spec.spatial_dims - 2, spec.spatial_dims))  # (Y, X): the rotated axes
    sizes = []
    for axis, length in enumerate(spec.patch_size):
        factor = rotated if axis in in_plane else MILD_SCALE_RANGE[1]
        sizes.append(int(math.ceil(length * factor)) + 2)
    return tuple(sizes)


def build_augmentation(spec: SamplingSpec):
    """batchgenerators transform for ``spec.augmentation`` (``None`` for ``none``).

    ``mild``: in-plane rotation (about the z axis for 3D, so the coarse axis of anisotropic data
    is never interpolated across) and isotropic scaling, linear interpolation (cubic splines
    overshoot and would create intensities that do not exist in the data), no flips (anatomy is
    lateralised: a mirrored body is not a plausible sample for a generator to learn), no elastic
    deformation, no intensity transforms. The transform center-crops ``spec.patch_size`` out of
    the :func:`extraction_size` region.
    """
    if spec.augmentation == "none":
        return None
    from batchgenerators.transforms.spatial_transforms import SpatialTransform

    angle = math.radians(MILD_MAX_ROTATION_DEG)
    return SpatialTransform(
        list(spec.patch_size), patch_center_dist_from_border=None, do_elastic_deform=False,
        do_rotation=True, angle_x=(-angle, angle), angle_y=(0.0, 0.0), angle_z=(0.0, 0.0),
        do_scale=True, scale=MILD_SCALE_RANGE, border_mode_data="nearest", order_data=1,
        border_mode_seg="constant", border_cval_seg=0, order_seg=0, random_crop=False,
        p_el_per_sample=0.0, p_rot_per_sample=MILD_PROBABILITY, p_scale_per_sample=MILD_PROBABILITY,
    )


def sample_region(case: CaseArrays, spec: SamplingSpec, rng: np.random.Generator,
                  size: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Draw one sample (slice for 2D, then a patch origin) and cut a ``size`` region around it.

    ``size`` defaults to the patch; a larger size extends the region evenly around the patch.
    """
    size = tuple(spec.patch_size) if size is None else tuple(size)
    arrays = {"data": case.data, "seg": case.seg, "target": case.target}
    if spec.spatial_dims == 2:
        z = int(rng.integers(0, case.data.shape[1]))
        arrays = {k: (None if a is None else a[:, z]) for k, a in arrays.items()}
    spatial = arrays["data"].shape[1:]
    patch_start = choose_patch_start(spatial, spec.patch_size, rng)
    start = [s - (e - p) // 2 for s, e, p in zip(patch_start, size, spec.patch_size)]
    pads = {"data": case.pad_data, "seg": 0, "target": case.pad_target}
    return {k: crop_with_padding(a, start, size, pads[k]) for k, a in arrays.items() if a is not None}


def _stack(samples: list[dict[str, np.ndarray]], keys: list[str]) -> dict[str, Any]:
    present = set(samples[0])
    for sample, key in zip(samples, keys):
        if set(sample) != present:
            raise NnDiffError(f"case {key} has arrays {sorted(sample)} but other cases have {sorted(present)}. "
                              "Fix: every case of a dataset needs the same arrays (seg/target); re-run preprocessing")
    return {k: np.stack([s[k] for s in samples]) for k in present}


def _augment(batch: dict[str, Any], transform, seed: int) -> dict[str, Any]:
    """Apply a batchgenerators transform with its np.random draws seeded by ``seed``.

    ``target`` is concatenated to ``data`` so that it moves exactly like the image.
    """
    n_data = batch["data"].shape[1]
    data = batch["data"] if "target" not in batch else np.concatenate([batch["data"], batch["target"]], 1)
    inputs: dict[str, Any] = {"data": data}
    if "seg" in batch:
        inputs["seg"] = batch["seg"].astype(np.float32)
    with numpy_global_seed(seed):
        out = transform(**inputs)
    result = dict(batch)
    result["data"] = np.ascontiguousarray(out["data"][:, :n_data], dtype=np.float32)
    if "target" in batch:
        result["target"] = np.ascontiguousarray(out["data"][:, n_data:], dtype=np.float32)
    if "seg" in batch:
        result["seg"] = np.rint(out["seg"]).astype(np.int16)
    return result


def generate_batch(store: CaseStore, identifiers: Sequence[str], spec: SamplingSpec, batch_size: int,
                   seed: int, iteration: int, transform=None) -> dict[str, Any]:
    """The training batch of ``iteration``: a function of ``(seed, iteration)`` only.

    Cases are drawn uniformly with replacement (as nnU-Net), so every iteration has a full batch.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, STREAM_TRAIN, iteration]))
    picks = rng.integers(0, len(identifiers), size=batch_size)
    keys = [identifiers[i] for i in picks]
    size = extraction_size(spec) if transform is not None else tuple(spec.patch_size)
    samples = [sample_region(store[key], spec, rng, size) for key in keys]
    batch = _stack(samples, keys)
    if transform is not None:
        batch = _augment(batch, transform, int(rng.integers(0, 2**32)))
    batch["keys"] = keys
    batch["iteration"] = iteration
    return batch


class ResumableBatchLoader(SlimDataLoaderBase):
    """batchgenerators data loader whose position is just the next iteration number.

    In worker ``thread_id`` of ``num_workers`` it makes iterations
    ``start_iteration + thread_id + j * num_workers`` (j = 0, 1, ...), which the multithreaded
    augmenter returns in order.
    """

    def __init__(self, store: CaseStore, identifiers: Sequence[str], spec: SamplingSpec, batch_size: int,
                 seed: int, start_iteration: int = 0, num_workers: int = 1) -> None:
        super().__init__(list(identifiers), batch_size, max(1, num_workers))
        self.store = store
        self.spec = spec
        self.seed = seed
        self.start_iteration = start_iteration
        self.transform = build_augmentation(spec)
        self._produced = 0

    def next_iteration(self) -> int:
        step = self.number_of_threads_in_multithreaded or 1
        return self.start_iteration + self.thread_id + self._produced * step

    def generate_train_batch(self) -> dict[str, Any]:
        iteration = self.next_iteration()
        self._produced += 1
        return generate_batch(self.store, self._data, self.spec, self.batch_size, self.seed, iteration,
                              self.transform)


class BatchStream:
    """Iterator over training batches from iteration ``start_iteration`` on.

    ``num_workers == 0``: batches are made in this process (deterministic tests, CPU runs).
    Otherwise batchgenerators' MultiThreadedAugmenter runs the loader in worker processes; the
    stream is identical. Call :meth:`close` (or use as a context manager) to stop the workers.
    """

    def __init__(self, store: CaseStore, identifiers: Sequence[str], spec: SamplingSpec, batch_size: int,
                 seed: int, start_iteration: int = 0, num_workers: int = 0) -> None:
        if not identifiers:
            raise NnDiffError("no training cases: the fold's training list is empty")
        self.num_workers = num_workers
        self._loader = ResumableBatchLoader(store, identifiers, spec, batch_size, seed, start_iteration,
                                            num_workers)
        self._augmenter = None
        if num_workers > 0:
            from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

            self._augmenter = MultiThreadedAugmenter(self._loader, None, num_workers, num_cached_per_queue=2,
                                                     seeds=None, pin_memory=False)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._augmenter is not None:
            return next(self._augmenter)
        return next(self._loader)

    def close(self) -> None:
        if self._augmenter is not None:
            self._augmenter._finish()
            self._augmenter = None

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Validation set
# ----------------------------------------------------------------------------------------------
@dataclass
class ValidationItem:
    """One fixed validation sample and the seed of its (t, noise) generator.

    Both depend only on the run seed and the case identifier, so the validation loss of one
    case is comparable across epochs (and across resumes).
    """

    key: str
    arrays: dict[str, np.ndarray]
    noise_seed: int


def pick_validation_cases(identifiers: Sequence[str], max_cases: int) -> list[str]:
    """At most ``max_cases`` identifiers, evenly spread over the sorted list (deterministic)."""
    ids = sorted(identifiers)
    if max_cases <= 0 or not ids:
        return []
    if len(ids) <= max_cases:
        return ids
    positions = np.unique(np.linspace(0, len(ids) - 1, max_cases).round().astype(int))
    return [ids[i] for i in positions]


def build_validation_set(store: CaseStore, identifiers: Sequence[str], spec: SamplingSpec, seed: int,
                         max_cases: int) -> list[ValidationItem]:
    """One un-augmented patch (2D: of one slice) per validation case, chosen by a generator
    seeded with (seed, case identifier)."""
    items = []
    plain = SamplingSpec(tuple(spec.patch_size), spec.spatial_dims, "none")
    for key in pick_validation_cases(identifiers, max_cases):
        rng = np.random.default_rng(np.random.SeedSequence([seed, STREAM_VALIDATION_PATCH, stable_id(key)]))
        arrays = sample_region(store[key], plain, rng)
        items.append(ValidationItem(key, arrays, derive_seed(seed, STREAM_VALIDATION_NOISE, stable_id(key))))
    return items


def validation_batches(items: Sequence[ValidationItem], batch_size: int) -> Iterator[tuple[dict[str, Any], list[int]]]:
    """Fixed validation batches: (batch dict like a training batch, per-sample noise seeds)."""
    for begin in range(0, len(items), batch_size):
        chunk = list(items[begin: begin + batch_size])
        batch = _stack([c.arrays for c in chunk], [c.key for c in chunk])
        batch["keys"] = [c.key for c in chunk]
        batch["iteration"] = -1
        yield batch, [c.noise_seed for c in chunk]
