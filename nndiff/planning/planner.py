"""``plan_experiment``: fingerprint + dataset.json → the plans dict written as ``nnDiffPlans.json``.

A pure function (no I/O): the rules in this package each return a :class:`Decision`; this module
assembles them in the layout of documentation/architecture.md and finally lets the task family
adjust the plan through its hook (``nndiff.tasks.plan_hook``).
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Mapping

import numpy as np

import nndiff
import nndiff.tasks
from nndiff.diffusion.options import TaskFamily, parse_option
from nndiff.errors import PlansError
from nndiff.planning.configurations import (
    PlanContext,
    decide_latent,
    plan_latent_configuration,
    plan_pixel_configuration,
)
from nndiff.planning.decision import Decision, fmt_num, jsonable
from nndiff.planning.diffusion import decide_degradation, decide_resample
from nndiff.planning.fingerprint_view import FingerprintView
from nndiff.planning.normalization import decide_normalization, produced_roles
from nndiff.planning.spacing import (
    decide_target_spacing,
    decide_transpose,
    median_shape_at,
    median_spacing,
    original_median_shape,
)
from nndiff.planning.topology import decide_channels, decide_conditioning, decide_dropout

logger = logging.getLogger(__name__)


def _task(fingerprint: Mapping[str, Any], dataset_json: Mapping[str, Any]) -> TaskFamily:
    value = dataset_json.get("task", fingerprint.get("task"))
    if value is None:
        raise PlansError("dataset.json has no 'task' key. Fix: add \"task\": one of "
                         f"{', '.join(t.value for t in TaskFamily)}")
    try:
        return parse_option(TaskFamily, value, "task")
    except ValueError as err:
        raise PlansError(f"dataset.json key 'task': {err}") from None


def _dataset_voxels(fp: FingerprintView, transpose: list[int], target: list[float]) -> float:
    """Voxels of the whole dataset after resampling to ``target`` (for the 5 % batch cap)."""
    shapes = fp.shapes[:, transpose] * fp.spacings[:, transpose] / np.asarray(target)[None, :]
    if fp.spatial_dims == 2:
        shapes[:, 0] = 1
    return float(np.sum(np.prod(np.maximum(np.round(shapes), 1), axis=1)))


def _produced_schemes(task: TaskFamily, normalization: Mapping[str, list[dict[str, Any]]]) -> tuple[str, ...]:
    if task == TaskFamily.SEGMENTATION:
        return ()  # one-hot labels in [-1, 1]
    return tuple(e["scheme"] for role in ("images", "targets") for e in normalization[role] if e["produced"])


def _configurations_reason(names: list[str], fp: FingerprintView, latent: Decision[bool] | None) -> str:
    base = ("2D data (spatial_dims 2) → '2d' only" if fp.spatial_dims == 2 else
            "3D data (spatial_dims 3) → '2d' (slices along axis 0) and '3d_fullres'")
    latent_text = f"; latent rule: {latent.reason}" if latent is not None else ""
    return f"{base}{latent_text}; planned: {', '.join(names)} ({len(names)} configurations)"


def _apply_family_hook(task: TaskFamily, fingerprint: Mapping[str, Any], plans: dict[str, Any]) -> dict[str, Any]:
    """Call the family's ``plan_overrides(fingerprint, plans)`` last (in place or returning new plans)."""
    hook = nndiff.tasks.plan_hook(task)
    if hook is None:
        return plans
    result = hook(fingerprint, plans)
    plans = plans if result is None else result
    try:
        json.dumps(plans)
    except (TypeError, ValueError) as err:
        raise PlansError(f"the {task} family's plan_overrides made the plans non-JSON: {err}") from None
    return plans


def _add_family_data_options(configurations: dict[str, dict[str, Any]], task: TaskFamily,
                             degradation: Decision[dict[str, Any] | None]) -> None:
    """Per configuration: ``resample`` (always) and ``degradation`` (clean-only denoising), with reasons."""
    for config in configurations.values():
        config.pop("_search", None)
        resample = decide_resample(task, config["spacing"])
        config["resample"] = resample.value
        config["reasons"]["resample"] = resample.reason
        if degradation.value is not None:
            config["degradation"] = dict(degradation.value)
            config["reasons"]["degradation"] = degradation.reason


def plan_experiment(fingerprint: dict, dataset_json: dict, gpu_memory_target_gib: float = 8.0,
                    plans_name: str = "nnDiffPlans") -> dict:
    """Plan every configuration of a dataset from its fingerprint (pure function, no I/O).

    Returns the plans dict of documentation/architecture.md ("nnDiffPlans.json"): transpose,
    normalization per channel, and configurations ``2d`` (always), ``3d_fullres`` (3D data) and a
    latent one (``3d_latent`` / ``2d_latent``, not trainable yet) when images are large, each with
    ``reasons`` quoting the numbers behind every decision. Deterministic and JSON-serialisable.
    """
    if not isinstance(gpu_memory_target_gib, (int, float)) or not math.isfinite(gpu_memory_target_gib) \
            or gpu_memory_target_gib <= 0:
        raise PlansError(f"the GPU memory target must be a positive number of GiB, got {gpu_memory_target_gib!r}")
    fp = FingerprintView(fingerprint)
    task = _task(fingerprint, dataset_json)
    transpose = decide_transpose(fp)
    target = decide_target_spacing(fp, transpose.value)
    roles = produced_roles(task, fp)
    normalization = decide_normalization(fp, task, roles.value)
    ctx = PlanContext(
        fp=fp, task=task, plans_name=plans_name, gpu_memory_target_gib=float(gpu_memory_target_gib),
        channels=decide_channels(fp, task, dataset_json), conditioning=decide_conditioning(dataset_json),
        dropout=decide_dropout(fp), produced_schemes=_produced_schemes(task, normalization),
        dataset_voxels=_dataset_voxels(fp, transpose.value, target.value))
    median_full = median_shape_at(fp, transpose.value, target.value)

    configurations: dict[str, dict[str, Any]] = {}
    configurations["2d"] = plan_pixel_configuration(ctx, "2d", target.value[1:], median_full[1:], target.reason)
    source = "2d"
    if fp.spatial_dims == 3:
        configurations["3d_fullres"] = plan_pixel_configuration(ctx, "3d_fullres", target.value, median_full,
                                                                target.reason)
        source = "3d_fullres"
    src = configurations[source]
    latent = decide_latent(fp, src["median_image_size_in_voxels"], src["_search"].coverage, f"'{source}'")
    if latent.value:
        name = "3d_latent" if fp.spatial_dims == 3 else "2d_latent"
        configurations[name] = plan_latent_configuration(ctx, name, source, src["spacing"],
                                                         src["median_image_size_in_voxels"], latent.reason)
    _add_family_data_options(configurations, task, decide_degradation(fp, task, dataset_json))

    inverse = [int(i) for i in np.argsort(transpose.value)]
    plans: dict[str, Any] = {
        "dataset_name": fingerprint.get("dataset_name", dataset_json.get("name")),
        "plans_name": plans_name,
        "task": str(task),
        "nndiff_version": nndiff.__version__,
        "gpu_memory_target_gib": float(gpu_memory_target_gib),
        "transpose_forward": transpose.value,
        "transpose_backward": inverse,
        "original_median_spacing_after_transp": [float(s) for s in median_spacing(fp)[transpose.value]],
        "original_median_shape_after_transp": original_median_shape(fp, transpose.value),
        "target_spacing": target.value,
        "normalization": normalization,
        "configurations": configurations,
        "reasons": {
            "transpose_forward": transpose.reason,
            "target_spacing": target.reason,
            "normalization": f"{roles.reason}; per channel below",
            "configurations": _configurations_reason(list(configurations), fp, latent),
        },
    }
    plans = jsonable(plans)
    plans = _apply_family_hook(task, fingerprint, plans)
    logger.info("planned %s: %s (GPU memory target %s GiB)", plans["dataset_name"],
                ", ".join(plans["configurations"]), fmt_num(gpu_memory_target_gib))
    return plans
