"""Synthetic fingerprints (no image data) in the dataset_fingerprint.json layout of
documentation/architecture.md, for planner tests."""
from __future__ import annotations

import copy
from typing import Any, Sequence

CT_FG = {"mean": 60.0, "median": 40.0, "std": 350.0, "min": -1024.0, "max": 3071.0,
         "percentile_00_5": -950.0, "percentile_99_5": 1600.0}
CT_WHOLE = {"mean": -500.0, "median": -700.0, "std": 500.0, "min": -1024.0, "max": 3071.0,
            "percentile_00_5": -1024.0, "percentile_99_5": 1400.0}
MR_FG = {"mean": 600.0, "median": 550.0, "std": 300.0, "min": 0.0, "max": 2500.0,
         "percentile_00_5": 50.0, "percentile_99_5": 1800.0}
MR_WHOLE = {"mean": 200.0, "median": 0.0, "std": 350.0, "min": 0.0, "max": 2500.0,
            "percentile_00_5": 0.0, "percentile_99_5": 1500.0}
XRAY_FG = {"mean": 2000.0, "median": 2100.0, "std": 700.0, "min": 0.0, "max": 4095.0,
           "percentile_00_5": 300.0, "percentile_99_5": 3900.0}
XRAY_WHOLE = {"mean": 1800.0, "median": 1900.0, "std": 800.0, "min": 0.0, "max": 4095.0,
              "percentile_00_5": 100.0, "percentile_99_5": 3850.0}
MAG_WHOLE = {"mean": 0.2, "median": 0.1, "std": 0.2, "min": 0.0, "max": 3.0,
             "percentile_00_5": 0.0, "percentile_99_5": 1.25}


def fingerprint(shape_zyx: Sequence[int], spacing_zyx: Sequence[float], num_cases: int,
                channels: Sequence[tuple[str, str, str]] = (("CT", "ct", "image"),),
                props: Sequence[tuple[dict, dict]] = ((CT_FG, CT_WHOLE),), task: str = "generation",
                spatial_dims: int = 3, is_complex: bool = False, is_rgb: bool = False,
                spacings: Sequence[Sequence[float]] | None = None, name: str = "Dataset900_Synthetic",
                relative_size_after_crop: float = 0.85) -> dict[str, Any]:
    """A fingerprint of ``num_cases`` identical cases (unless ``spacings`` gives per-case spacings).

    ``channels``: (name, modality, role) per channel; ``props``: (foreground, whole-image) intensity
    properties per channel, in the same order (image channels first, then targets).
    """
    spacings = [list(map(float, s)) for s in spacings] if spacings else [list(map(float, spacing_zyx))] * num_cases
    shapes = [list(map(int, shape_zyx))] * len(spacings)
    image_idx = [i for i, c in enumerate(channels) if c[2] == "image"]
    target_idx = [i for i, c in enumerate(channels) if c[2] == "target"]

    def per_channel(indices: list[int], which: int) -> dict[str, dict]:
        return {str(k): copy.deepcopy(props[i][which]) for k, i in enumerate(indices)}

    voxels = 1
    for s in shape_zyx:
        voxels *= int(s)
    return {
        "dataset_name": name,
        "task": task,
        "num_cases": len(spacings),
        "spatial_dims": spatial_dims,
        "spacings": spacings,
        "shapes_before_crop": [[s[0], int(s[1] / relative_size_after_crop ** 0.5), int(s[2] / relative_size_after_crop ** 0.5)] for s in shapes],
        "shapes_after_crop": shapes,
        "channels": [{"name": n, "modality": m, "role": r} for n, m, r in channels],
        "foreground_intensity_properties_per_channel": per_channel(image_idx, 0),
        "intensity_properties_per_channel": per_channel(image_idx, 1),
        "target_foreground_intensity_properties_per_channel": per_channel(target_idx, 0),
        "target_intensity_properties_per_channel": per_channel(target_idx, 1),
        "foreground_definition": "label > 0" if task == "segmentation" else "nonzero after crop",
        "is_rgb": is_rgb,
        "is_complex": is_complex,
        "median_spacing": list(map(float, spacing_zyx)),
        "median_shape": list(map(int, shape_zyx)),
        "anisotropy": max(spacing_zyx[3 - spatial_dims:]) / min(spacing_zyx[3 - spatial_dims:]),
        "median_relative_size_after_cropping": relative_size_after_crop,
        "label_statistics": {},
        "dataset_size": {"num_cases": len(spacings), "total_voxels": voxels * len(spacings),
                         "bytes_float32": 4 * voxels * len(spacings)},
        "warnings": [],
    }


def ct_fingerprint(num_cases: int = 500, **kw: Any) -> dict[str, Any]:
    """512×512×300 CT at 0.7×0.7×2.5 mm (x, y, z) → array order (300, 512, 512), (2.5, 0.7, 0.7)."""
    return fingerprint((300, 512, 512), (2.5, 0.7, 0.7), num_cases, **kw)


def mr_fingerprint(num_cases: int = 1250, **kw: Any) -> dict[str, Any]:
    """240×240×155 MR at 1 mm isotropic (BraTS-like), T1."""
    kw.setdefault("channels", (("T1", "mr", "image"),))
    kw.setdefault("props", ((MR_FG, MR_WHOLE),))
    return fingerprint((155, 240, 240), (1.0, 1.0, 1.0), num_cases, **kw)


def xray_fingerprint(num_cases: int = 5000, **kw: Any) -> dict[str, Any]:
    """2048² chest X-ray, 2D (spacing[0] = 999 by convention) at 0.15 mm."""
    kw.setdefault("channels", (("xray", "xray", "image"),))
    kw.setdefault("props", ((XRAY_FG, XRAY_WHOLE),))
    return fingerprint((1, 2048, 2048), (999.0, 0.15, 0.15), num_cases, spatial_dims=2, **kw)


def dataset_json(task: str = "generation", channel_names: dict | None = None, **extra: Any) -> dict[str, Any]:
    spec = {"task": task, "channel_names": channel_names or {"0": "CT"}, "numTraining": 10,
            "file_ending": ".nii.gz"}
    spec.update(extra)
    return spec
