"""``inherits_from``: configurations that override a few keys of another (nnU-Net semantics)."""
from __future__ import annotations

import copy
from typing import Any, Mapping

from nndiff.errors import PlansError

INHERITS_FROM = "inherits_from"


def merge_configuration(parent: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """Child keys override parent keys; nested dicts are merged key by key (lists are replaced)."""
    merged = copy.deepcopy(dict(parent))
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_configuration(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _chain(configurations: Mapping[str, Any], name: str) -> list[str]:
    """[name, parent, grandparent, ...]; PlansError on unknown parents and cycles."""
    chain = [name]
    current = configurations[name]
    while True:
        if not isinstance(current, Mapping):
            raise PlansError(f"configuration {chain[-1]!r} must be a JSON object. Fix: correct the plans file")
        parent = current.get(INHERITS_FROM)
        if parent is None:
            return chain
        if not isinstance(parent, str):
            raise PlansError(f"configuration {chain[-1]!r}: 'inherits_from' must be a configuration name, "
                             f"got {parent!r}")
        if parent in chain:
            cycle = " → ".join([*chain, parent])
            raise PlansError(f"configuration {name!r} has an inherits_from cycle: {cycle}. Fix: make one of "
                             "them inherit from a planned configuration")
        if parent not in configurations:
            raise PlansError(f"configuration {chain[-1]!r} inherits_from unknown configuration {parent!r}"
                             f"{' (needed by ' + repr(name) + ')' if chain[-1] != name else ''}; available: "
                             f"{', '.join(configurations)}. Fix: correct 'inherits_from'")
        chain.append(parent)
        current = configurations[parent]


def _override_note(child_name: str, child: Mapping[str, Any]) -> dict[str, str]:
    """Reason text for keys a user configuration overrides without giving its own reason."""
    own = child.get("reasons", {}) if isinstance(child.get("reasons"), Mapping) else {}
    notes = {}
    for key, value in child.items():
        if key in (INHERITS_FROM, "reasons") or key in own:
            continue
        what = (", ".join(f"{key}.{k}" for k in value) if isinstance(value, Mapping) else f"{key} = {value!r}")
        notes[key] = f"overridden by configuration {child_name!r}: {what}"
    return notes


def resolve_configuration(plans: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The full configuration ``name`` with its ``inherits_from`` chain applied (root first, each
    child overriding). The result has no ``inherits_from``; reasons of overridden keys say so.
    Unknown names, unknown parents and cycles raise :class:`PlansError` naming the configuration."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, Mapping):
        raise PlansError("the plans have no 'configurations' object. Fix: re-run nndiff_plan_experiment")
    if name not in configurations:
        raise PlansError(f"configuration {name!r} is not in the plans; available: {', '.join(configurations)}")
    chain = _chain(configurations, name)
    resolved: dict[str, Any] = {}
    for link in reversed(chain):
        config = configurations[link]
        notes = _override_note(link, config) if link != chain[-1] else {}
        resolved = merge_configuration(resolved, {k: v for k, v in config.items() if k != INHERITS_FROM})
        reasons = resolved.setdefault("reasons", {})
        for key, note in notes.items():
            reasons[key] = f"{reasons[key]} | {note}" if key in reasons else note
    return resolved
