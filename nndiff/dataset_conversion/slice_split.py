"""Which template slices are training, held-out, gap or skipped (the MNI152 converter's split).

Adjacent slices are near duplicates, so the held-out slab is separated from every training slice by
``gap`` dropped slices, and training slices are grouped into slabs that act as subjects for
cross-validation. Anomaly detection adds a lesioned training slab, ``gap`` slices away from both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from nndiff.errors import NnDiffError

#: Slicing axis name -> axis index in the (Z, Y, X) array (SimpleITK array order).
AXES: dict[str, int] = {"axial": 0, "coronal": 1, "sagittal": 2}
#: Fewest slabs (subjects) we aim for, so 5-fold cross-validation grouped by subject works.
MIN_SLABS = 5
#: Default share of the kept slices that forms the lesioned training slab (anomaly detection).
DEFAULT_LESIONED_FRACTION = 0.15


@dataclass(frozen=True)
class SliceSplit:
    """Slice indices (along the slicing axis) of each part of the dataset.

    ``train_slabs`` lists the training slices grouped into slabs (one subject each); ``gap`` holds
    the slices dropped between training and held-out; ``skipped`` the slices with too little brain.
    """

    axis: str
    train_slabs: list[list[int]]
    heldout: list[int]
    gap: list[int]
    skipped: list[int]
    #: Anomaly detection only: training slabs whose slices all get synthetic lesions (``train_slabs``
    #: then holds the healthy training slices).
    lesioned_slabs: list[list[int]] = field(default_factory=list)

    @property
    def train(self) -> list[int]:
        """All healthy (or, outside anomaly detection, all) training slice indices, ascending."""
        return sorted(i for slab in self.train_slabs for i in slab)

    @property
    def lesioned(self) -> list[int]:
        """Lesioned training slice indices, ascending (empty outside anomaly detection)."""
        return sorted(i for slab in self.lesioned_slabs for i in slab)

    def min_distance(self) -> int | None:
        """Smallest |training - heldout| slice distance over all training slices (None without
        held-out slices)."""
        return _min_distance(self.train + self.lesioned, self.heldout)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON description written to ``mni152_conversion.json``."""
        record = {
            "axis": self.axis,
            "train_slabs": self.train_slabs,
            "heldout": self.heldout,
            "gap": self.gap,
            "skipped_little_brain": self.skipped,
            "min_train_heldout_distance": self.min_distance(),
        }
        if self.lesioned_slabs:
            record["lesioned_slabs"] = self.lesioned_slabs
            record["min_lesioned_heldout_distance"] = _min_distance(self.lesioned, self.heldout)
            record["min_healthy_lesioned_distance"] = _min_distance(self.train, self.lesioned)
        return record


def _min_distance(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Smallest |a_i - b_j| (None when either is empty)."""
    if not len(a) or not len(b):
        return None
    return int(np.min(np.abs(np.asarray(a)[:, None] - np.asarray(b)[None, :])))


# --------------------------------------------------------------------------- slice split


def brain_fraction_per_slice(brain: np.ndarray, axis: int) -> np.ndarray:
    """Fraction of each slice (along ``axis``) inside the brain mask."""
    other = tuple(a for a in range(brain.ndim) if a != axis)
    return brain.mean(axis=other)


def _kept_range(fraction: np.ndarray, min_brain_fraction: float) -> tuple[int, int]:
    """First and last slice whose brain area is at least ``min_brain_fraction`` of the largest.

    Relative to the largest slice so the rule does not depend on how much empty field of view
    surrounds the head. The brain is one connected body, so the kept slices are contiguous.
    """
    keep = np.flatnonzero(fraction >= min_brain_fraction * float(fraction.max()))
    return int(keep[0]), int(keep[-1])


def _chunks(indices: list[int], slab_size: int) -> list[list[int]]:
    """Split a contiguous run into nearly equal slabs of at most ``slab_size`` slices."""
    if not indices:
        return []
    n = math.ceil(len(indices) / slab_size)
    return [part.tolist() for part in np.array_split(np.asarray(indices), n)]


def _slab_size(num_train: int, gap: int, slab_size: int | None) -> int:
    """Explicit ``slab_size``, else ``gap`` slices, reduced until there are ``MIN_SLABS`` slabs."""
    if slab_size is not None:
        if slab_size < 1:
            raise NnDiffError(f"slab_size must be at least 1, got {slab_size}")
        return slab_size
    size = max(1, gap)
    if num_train >= MIN_SLABS:
        # ceil division: the two runs around a centred held-out slab may add one slab each.
        size = min(size, max(1, num_train // MIN_SLABS))
    return size


def plan_slice_split(brain: np.ndarray, axis: str = "axial", gap: int = 10, heldout_fraction: float = 0.2,
                     min_brain_fraction: float = 0.1, heldout_position: str = "center",
                     slab_size: int | None = None) -> SliceSplit:
    """Decide which slices are training, held-out, gap and skipped.

    Slices with less brain than ``min_brain_fraction`` of the largest slice's brain area are
    skipped. Of the rest, ``round(heldout_fraction * n)`` contiguous slices are held out, in the
    middle of the brain (``heldout_position="center"``: the most representative anatomy; costs two
    gaps) or at its upper end along the axis (``"end"``: one gap). ``gap`` slices on each side of
    the held-out slab are dropped. Training slices are cut into slabs of ``slab_size`` slices
    (default ``gap``, smaller when that would give fewer than ``MIN_SLABS`` slabs).
    """
    axis_index = AXES[parse_axis(axis)]
    if gap < 0:
        raise NnDiffError(f"gap must be >= 0 slices, got {gap}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise NnDiffError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if heldout_position not in ("center", "end"):
        raise NnDiffError(f"heldout_position must be 'center' or 'end', got {heldout_position!r}")
    fraction = brain_fraction_per_slice(brain, axis_index)
    lo, hi = _kept_range(fraction, min_brain_fraction)
    kept = list(range(lo, hi + 1))
    skipped = [i for i in range(len(fraction)) if i < lo or i > hi]
    num_heldout = int(round(heldout_fraction * len(kept))) if heldout_fraction > 0 else 0
    if heldout_fraction > 0:
        num_heldout = max(1, num_heldout)
    start = lo + (len(kept) - num_heldout) // 2 if heldout_position == "center" else hi + 1 - num_heldout
    heldout = list(range(start, start + num_heldout))
    gap_slices: list[int] = []
    if heldout:
        gap_slices = [i for i in kept if 0 < heldout[0] - i <= gap or 0 < i - heldout[-1] <= gap]
    excluded = set(heldout) | set(gap_slices)
    below = [i for i in kept if i < start and i not in excluded]
    above = [i for i in kept if i >= start + num_heldout and i not in excluded]
    num_train = len(below) + len(above)
    if num_train == 0:
        raise NnDiffError(
            f"no training slices left: {len(kept)} slices hold brain, {num_heldout} are held out and "
            f"{len(gap_slices)} form the gap. Fix: lower --gap or --heldout_fraction, or use resolution 1"
        )
    size = _slab_size(num_train, gap, slab_size)
    return SliceSplit(axis=parse_axis(axis), train_slabs=_chunks(below, size) + _chunks(above, size),
                      heldout=heldout, gap=gap_slices, skipped=skipped)


def plan_anomaly_split(brain: np.ndarray, axis: str = "axial", gap: int = 10, heldout_fraction: float = 0.2,
                       lesioned_fraction: float = DEFAULT_LESIONED_FRACTION, min_brain_fraction: float = 0.1,
                       heldout_position: str = "center", slab_size: int | None = None) -> SliceSplit:
    """:func:`plan_slice_split` plus a lesioned training slab, ``gap`` slices away from both others.

    Of the two training runs beside the held-out slab, the longer one (the upper one on a tie)
    gives its ``round(lesioned_fraction * kept)`` slices next to the held-out gap to the lesioned
    slab (close to the test anatomy), then ``gap`` more slices are dropped before its healthy
    remainder. Layout with a centred held-out slab: healthy | gap | held-out | gap | lesioned |
    gap | healthy. Healthy and lesioned slices are cut into slabs (subjects) of the same size.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise NnDiffError(f"task anomaly_detection needs held-out slices (the lesioned test slab), got "
                          f"heldout_fraction {heldout_fraction}. Fix: pass --heldout_fraction in (0, 1), e.g. 0.2")
    if not 0.0 < lesioned_fraction < 1.0:
        raise NnDiffError(f"lesioned_fraction must be in (0, 1), got {lesioned_fraction}")
    base = plan_slice_split(brain, axis, gap, heldout_fraction, min_brain_fraction, heldout_position, slab_size)
    num_kept = len(base.train) + len(base.heldout) + len(base.gap)
    num_lesioned = max(1, int(round(lesioned_fraction * num_kept)))
    below = [i for i in base.train if i < base.heldout[0]]
    above = [i for i in base.train if i > base.heldout[-1]]
    # Walk the chosen run away from the held-out slab: lesioned first, then the new gap.
    take_above = len(above) >= len(below)
    run = above if take_above else below[::-1]
    lesioned = sorted(run[:num_lesioned])
    new_gap = run[num_lesioned:num_lesioned + gap]
    rest = sorted(run[num_lesioned + gap:])
    healthy_runs = [below, rest] if take_above else [rest, above]
    num_healthy = sum(len(r) for r in healthy_runs)
    if len(lesioned) < num_lesioned or num_healthy == 0:
        raise NnDiffError(
            f"no room for a lesioned slab of {num_lesioned} slices, its gap of {gap} and healthy training "
            f"slices: {len(base.train)} training slices remain beside the held-out slab. Fix: lower "
            "--lesioned_fraction, --heldout_fraction or --gap (at least 10 keeps slabs independent), "
            "or use --resolution 1")
    size = _slab_size(num_healthy, gap, slab_size)
    return SliceSplit(axis=base.axis, train_slabs=[c for r in healthy_runs for c in _chunks(r, size)],
                      heldout=base.heldout, gap=sorted(base.gap + new_gap), skipped=base.skipped,
                      lesioned_slabs=_chunks(lesioned, size))


def parse_axis(axis: str) -> str:
    """Validate the slicing axis name."""
    if axis not in AXES:
        raise NnDiffError(f"unknown axis {axis!r}; use one of {list(AXES)}")
    return axis
