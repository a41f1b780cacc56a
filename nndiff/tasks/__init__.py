"""Task families (one module per family: generation, translation, denoising, reconstruction,
anomaly_detection, segmentation).

Planner hook registry: a family adjusts the plans through its own
``plan_overrides(fingerprint, plans) -> dict | None`` (modify ``plans`` in place or return a new
dict), registered here as ``"module:function"``. The planner calls it last, so a family never
edits ``nndiff/planning/``. Families register when they land.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from nndiff.diffusion.options import TaskFamily, parse_option

PlanOverrides = Callable[[dict[str, Any], dict[str, Any]], "dict[str, Any] | None"]

#: family → "module:function" of its plan_overrides (empty until families register).
PLAN_HOOKS: dict[str, str] = {
    "anomaly_detection": "nndiff.tasks.anomaly:plan_overrides",
}


def plan_hook(task: str | TaskFamily) -> PlanOverrides | None:
    """The family's ``plan_overrides`` function, or None if the family registers none.

    Raises ValueError for an unknown family, ImportError / AttributeError if a registered hook
    cannot be loaded (a packaging bug, not a user error).
    """
    family = parse_option(TaskFamily, task, "task")
    spec = PLAN_HOOKS.get(family.value)
    if spec is None:
        return None
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"plan hook for {family.value!r} must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module_name), function_name)
