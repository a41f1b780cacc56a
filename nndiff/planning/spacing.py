"""Rules: axis transpose and target spacing (nnU-Net v2's median + anisotropy rule)."""
from __future__ import annotations

import numpy as np

from nndiff.planning.constants import (
    ANISOTROPIC_AXIS_PERCENTILE,
    ANISOTROPY_THRESHOLD,
    DUMMY_2D_SPACING,
)
from nndiff.planning.decision import Decision, fmt_num, fmt_shape, fmt_spacing
from nndiff.planning.fingerprint_view import FingerprintView

_AXES = "zyx"


def median_spacing(fp: FingerprintView) -> np.ndarray:
    """Median per-case spacing in the fingerprint's array axis order (z, y, x)."""
    return np.median(fp.spacings, axis=0)


def anisotropy(spacing: np.ndarray | list[float], spatial_dims: int) -> float:
    """max/min spacing over the real axes (the dummy 2D axis 0 is not one)."""
    real = np.asarray(spacing, dtype=float)[3 - spatial_dims:]
    return float(real.max() / real.min())


def decide_transpose(fp: FingerprintView) -> Decision[list[int]]:
    """Transpose so the lowest-resolution (largest-spacing) axis comes first, as nnU-Net v2 does.

    Preprocessing, the 2d configuration (which slices along axis 0) and the per-axis strides all
    then treat axis 0 as the through-plane axis. 2D data keeps its dummy axis 0 and is not
    transposed.
    """
    spacing = median_spacing(fp)
    if fp.spatial_dims == 2:
        return Decision([0, 1, 2], f"2D images (spatial_dims 2, dummy spacing {fmt_num(DUMMY_2D_SPACING)} "
                                   f"on axis 0, median in-plane spacing {fmt_spacing(spacing[1:])}) "
                                   "→ no transpose")
    worst = int(np.argmax(spacing))  # first of equal maxima: isotropic data stays as it is
    forward = [worst] + [a for a in range(3) if a != worst]
    where = (f"axis {worst} ({_AXES[worst]}) has the largest median spacing "
             f"({fmt_num(spacing[worst])} mm of {fmt_spacing(spacing)}, axes z,y,x)")
    if worst == 0:
        return Decision(forward, f"{where}, already first → no transpose [0, 1, 2]")
    return Decision(forward, f"{where} → moved first: transpose_forward {forward}")


def decide_target_spacing(fp: FingerprintView, transpose_forward: list[int]) -> Decision[list[float]]:
    """Target spacing (after transpose): the per-axis median spacing; for strongly anisotropic data
    (max/min median spacing > ANISOTROPY_THRESHOLD = 3) the low-resolution axis uses the 10th
    percentile of its per-case spacings (never finer than the other axes), as nnU-Net v2 does, so
    thin-slice cases are not downsampled to the typical thick-slice spacing.

    Deviation from nnU-Net: nnU-Net also requires that the coarse axis has few voxels; we apply
    the percentile on spacing anisotropy alone (the task's rule), which only differs when spacings
    vary between cases.
    """
    spacings = fp.spacings[:, transpose_forward]
    target = np.median(spacings, axis=0)
    if fp.spatial_dims == 2:
        target[0] = DUMMY_2D_SPACING
        return Decision([float(s) for s in target],
                        f"median in-plane spacing {fmt_spacing(target[1:])} over {fp.num_cases} cases; "
                        f"2D data keeps the dummy {fmt_num(DUMMY_2D_SPACING)} on axis 0")
    ratio = anisotropy(target, 3)
    text = f"median spacing {fmt_spacing(target)} (axes after transpose) over {fp.num_cases} cases"
    if ratio <= ANISOTROPY_THRESHOLD:
        return Decision([float(s) for s in target],
                        f"{text}, anisotropy {ratio:.3g} ≤ {fmt_num(ANISOTROPY_THRESHOLD)} → median spacing")
    low_res = int(np.argmax(target))
    finest_other = float(max(np.delete(target, low_res)))
    pct = float(np.percentile(spacings[:, low_res], ANISOTROPIC_AXIS_PERCENTILE))
    chosen = max(pct, finest_other)
    target[low_res] = chosen
    guard = (f" (raised to the coarsest other axis {fmt_num(finest_other)} mm)"
             if chosen > pct else "")
    return Decision([float(s) for s in target],
                    f"{text}, anisotropy {ratio:.3g} > {fmt_num(ANISOTROPY_THRESHOLD)} → low-resolution "
                    f"axis {low_res} uses the {fmt_num(ANISOTROPIC_AXIS_PERCENTILE)}th percentile of its "
                    f"spacings, {fmt_num(pct)} mm{guard}; target {fmt_spacing(target)}")


def median_shape_at(fp: FingerprintView, transpose_forward: list[int], target: list[float]) -> list[int]:
    """Median over cases of the cropped shape resampled to ``target`` (after transpose)."""
    shapes = fp.shapes[:, transpose_forward]
    spacings = fp.spacings[:, transpose_forward]
    new = np.round(shapes * spacings / np.asarray(target)[None, :])
    if fp.spatial_dims == 2:
        new[:, 0] = 1
    new = np.maximum(new, 1)
    return [int(round(v)) for v in np.median(new, axis=0)]


def original_median_shape(fp: FingerprintView, transpose_forward: list[int]) -> list[float]:
    """Median cropped shape before resampling, after transpose (nnU-Net's field of that name)."""
    return [float(v) for v in np.median(fp.shapes[:, transpose_forward], axis=0)]


def describe_image(shape: list[int], spacing: list[float]) -> str:
    """'median shape 300×512×512 at 2.5×0.7×0.7 mm' for reasons."""
    return f"median shape {fmt_shape(shape)} at {fmt_spacing(spacing)}"
