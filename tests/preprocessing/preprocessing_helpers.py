"""Hand-built plans and smooth synthetic images for the preprocessing tests."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def norm_entry(channel: int, scheme: str, **params: float) -> dict[str, Any]:
    """One plans normalization entry (documentation/architecture.md layout)."""
    return {"channel": channel, "name": f"c{channel}", "modality": "other", "role": "image",
            "scheme": scheme, "params": params, "reason": "test"}


def make_plans(images: list[dict], targets: list[dict] | None = None,
               configurations: dict[str, dict] | None = None,
               transpose: Sequence[int] = (0, 1, 2)) -> dict[str, Any]:
    """A minimal plans dict with the keys preprocessing reads."""
    forward = [int(a) for a in transpose]
    return {
        "dataset_name": "test",
        "plans_name": "nnDiffPlans",
        "transpose_forward": forward,
        "transpose_backward": [int(i) for i in np.argsort(forward)],
        "normalization": {"images": images, "targets": targets or []},
        "configurations": configurations or {},
    }


def config(spacing: Sequence[float], spatial_dims: int = 3, crop: bool = True, **extra: Any) -> dict[str, Any]:
    """A configuration block with the preprocessing keys."""
    return {"spacing": [float(s) for s in spacing], "spatial_dims": spatial_dims,
            "crop_to_nonzero": crop, "trainable": True, **extra}


def gaussian_blob(shape: Sequence[int], sigma: Sequence[float], center: Sequence[float] | None = None,
                  coords: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """exp(-r²/2) on the voxel grid (or at given per-axis coordinates), in voxel units of ``shape``."""
    center = [n / 2 - 0.3 for n in shape] if center is None else center
    axes = coords if coords is not None else [np.arange(n, dtype=np.float64) for n in shape]
    grids = np.meshgrid(*axes, indexing="ij")
    r2 = sum(((g - c) / s) ** 2 for g, c, s in zip(grids, center, sigma))
    return np.exp(-r2 / 2.0)


def edge_aligned_coordinates(old: int, new: int) -> np.ndarray:
    """Centres of ``new`` voxels spanning the same extent as ``old`` voxels, in old voxel units."""
    return (np.arange(new) + 0.5) * old / new - 0.5
