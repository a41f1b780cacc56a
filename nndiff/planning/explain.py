"""Human-readable rendering of a plan: every decision with its reason (``--explain``)."""
from __future__ import annotations

import json
from typing import Any, Mapping

from nndiff.planning.inheritance import INHERITS_FROM, resolve_configuration

_INDENT = "    "


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _explain_configuration(plans: Mapping[str, Any], name: str) -> list[str]:
    raw = plans["configurations"][name]
    config = resolve_configuration(plans, name)
    title = f"Configuration '{name}'"
    if isinstance(raw, Mapping) and INHERITS_FROM in raw:
        title += f" (inherits_from '{raw[INHERITS_FROM]}', overrides: {', '.join(k for k in raw if k not in (INHERITS_FROM, 'reasons'))})"
    lines = [title + ":"]
    reasons = config.get("reasons", {})
    shown = set()
    for key, value in config.items():
        if key == "reasons":
            continue
        lines.append(f"{_INDENT}{key} = {_short(value)}")
        if key in reasons:
            lines.append(f"{_INDENT * 2}because: {reasons[key]}")
            shown.add(key)
        for sub in sorted(k for k in reasons if k.startswith(key + ".")):
            # sub-decisions such as diffusion.schedule cover several keys; show a value where one exists
            sub_value = _lookup(config, sub)
            lines.append(f"{_INDENT * 2}{sub}" + (f" = {_short(sub_value)}" if sub_value is not None else ":"))
            lines.append(f"{_INDENT * 3}because: {reasons[sub]}")
            shown.add(sub)
    for key in sorted(set(reasons) - shown):
        lines.append(f"{_INDENT}{key}: {reasons[key]}")
    return lines


def explain(plans: Mapping[str, Any]) -> str:
    """Every planning decision of ``plans`` with its value and reason, as plain text."""
    lines = [f"nnDiff plans '{plans.get('plans_name')}' for {plans.get('dataset_name')} "
             f"(task {plans.get('task')}, GPU memory target {plans.get('gpu_memory_target_gib')} GiB)"]
    top = plans.get("reasons", {})
    if top:
        lines.append("Dataset-wide decisions:")
        for key, reason in top.items():
            value = plans.get(key)
            if isinstance(value, Mapping):  # blocks are listed in detail below; name their parts only
                value = list(value)
            lines.append(f"{_INDENT}{key}" + (f" = {_short(value)}" if value is not None else ""))
            lines.append(f"{_INDENT * 2}because: {reason}")
    norm = plans.get("normalization", {})
    if any(norm.get(role) for role in norm):
        lines.append("Normalization:")
        for role, entries in norm.items():
            for e in entries:
                lines.append(f"{_INDENT}{role}[{e.get('channel')}] '{e.get('name')}' ({e.get('modality')}, "
                             f"{'produced' if e.get('produced') else 'conditioning'}): {e.get('scheme')} "
                             f"{_short(e.get('params'))}, clip_fraction {e.get('clip_fraction')}")
                lines.append(f"{_INDENT * 2}because: {e.get('reason')}")
    for name in plans.get("configurations", {}):
        lines.extend(_explain_configuration(plans, name))
    return "\n".join(lines)
