"""Experiment planning: dataset fingerprint → ``nnDiffPlans.json`` (every decision with its reason).

Public API (documentation/architecture.md, documentation/planning.md):

- :func:`plan_experiment` — fingerprint + dataset.json → plans dict (pure, no I/O);
- :func:`resolve_configuration` — apply ``inherits_from`` chains;
- :func:`explain` — the plan's decisions and reasons as text (``--explain``);
- :class:`Decision` — what every ``decide_*`` rule returns;
- :func:`estimate_training_vram_gib` / :func:`estimate_training_vram` — GPU memory of a step.
"""
from nndiff.planning.decision import Decision
from nndiff.planning.explain import explain
from nndiff.planning.inheritance import merge_configuration, resolve_configuration
from nndiff.planning.memory import (
    DEFAULT_MEMORY_MODEL,
    MemoryModel,
    VramEstimate,
    count_parameters,
    estimate_training_vram,
    estimate_training_vram_gib,
)
from nndiff.planning.planner import plan_experiment

__all__ = [
    "DEFAULT_MEMORY_MODEL",
    "Decision",
    "MemoryModel",
    "VramEstimate",
    "count_parameters",
    "estimate_training_vram",
    "estimate_training_vram_gib",
    "explain",
    "merge_configuration",
    "plan_experiment",
    "resolve_configuration",
]
