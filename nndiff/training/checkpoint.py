"""Checkpoint files: atomic writes, ``weights_only`` loading, compatibility checks, plans hash."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from nndiff.errors import NnDiffError
from nndiff.utils.files import atomic_path

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
LATEST = "checkpoint_latest.pth"
BEST = "checkpoint_best.pth"
FINAL = "checkpoint_final.pth"

#: Configuration keys that explain a decision but do not change it; editing them (or a new
#: planner version rewording them) does not invalidate a run.
EXPLANATION_KEYS = ("reasons",)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def plans_hash(plans: Mapping[str, Any], resolved_configuration: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of what defines a trained model.

    Hashed: the plan-level keys (normalisation, transposition, ...; not the other
    configurations, so adding a configuration keeps existing runs resumable) and the resolved
    configuration without its explanation keys (``reasons``).
    """
    plan_level = {k: v for k, v in plans.items() if k != "configurations"}
    configuration = {k: v for k, v in resolved_configuration.items() if k not in EXPLANATION_KEYS}
    text = _canonical({"plans": plan_level, "configuration": configuration})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_checkpoint(state: Mapping[str, Any], path: Path) -> None:
    """Write ``state`` with torch.save to a temporary file and rename it onto ``path``.

    A crash during the write leaves the previous checkpoint untouched.
    """
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)
    logger.debug("wrote %s", path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (no pickled code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise NnDiffError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise NnDiffError(f"cannot load checkpoint {path}: {err}. Fix: the file is damaged or not an "
                          f"nnDiff checkpoint; train again or use another checkpoint") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise NnDiffError(f"{path} is not an nnDiff checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def check_compatible(state: Mapping[str, Any], trainer_class: str, expected_plans_hash: str, path: Path) -> None:
    """Refuse to continue from a checkpoint written by another trainer class or another plan."""
    if state.get("trainer_class") != trainer_class:
        raise NnDiffError(
            f"cannot continue from {path}: it was written by trainer {state.get('trainer_class')!r}, "
            f"this run uses {trainer_class!r}. Fix: continue with -tr {state.get('trainer_class')}, "
            f"or train without --continue (this overwrites the folder's checkpoints)")
    if state.get("plans_hash") != expected_plans_hash:
        raise NnDiffError(
            f"cannot continue from {path}: the plans changed since it was written (plans hash "
            f"{str(state.get('plans_hash'))[:12]}... in the checkpoint, {expected_plans_hash[:12]}... now). "
            "Fix: restore the plans the run started with, or add your changes as a new configuration "
            "(inherits_from) and train that from scratch")


def strip_compile_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a torch.compile'd module's state dict start with ``_orig_mod.``; remove it."""
    prefix = "_orig_mod."
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}

