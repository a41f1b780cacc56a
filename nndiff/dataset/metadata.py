"""``metadata.json``: per-case fields (case id -> {name: value}).

Reserved keys: ``subject`` (str or int; cases of one subject always share a fold, since slices or
time points of one subject leak otherwise) and ``healthy`` (bool; anomaly detection trains on
healthy cases). Other fields are used only when declared in dataset.json's ``"conditions"``.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

from nndiff.dataset.schema import Problem

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"


def load_metadata(root: Path) -> tuple[dict[str, dict[str, Any]], list[Problem]]:
    """Read ``root/metadata.json``; absent means no metadata. Malformed JSON is a problem."""
    path = root / METADATA_FILE
    if not path.is_file():
        return {}, []
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        return {}, [Problem(str(path), f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                            "fix the JSON syntax")]
    except (OSError, UnicodeDecodeError) as e:
        return {}, [Problem(str(path), f"cannot be read ({e})", "check the file permissions and encoding")]
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        return {}, [Problem(str(path), "must map each case id to an object of fields",
                            'write it as {"case_000": {"subject": "s01", "healthy": true}}')]
    return data, []


def check_reserved_fields(metadata: dict[str, dict[str, Any]], path: Path) -> list[Problem]:
    """``subject`` must be a string or integer; ``healthy`` a boolean."""
    problems = []
    for case_id, fields in metadata.items():
        if "subject" in fields:
            subject = fields["subject"]
            if isinstance(subject, bool) or not isinstance(subject, (str, int)) or subject == "":
                problems.append(Problem(f"{path} case '{case_id}' key 'subject'",
                                        f"must be a non-empty string or an integer, found {subject!r}",
                                        "give the subject (patient) identifier"))
        if "healthy" in fields and not isinstance(fields["healthy"], bool):
            problems.append(Problem(f"{path} case '{case_id}' key 'healthy'",
                                    f"must be true or false, found {fields['healthy']!r}",
                                    "write true or false (JSON booleans, not strings)"))
    return problems


def check_conditions_present(metadata: dict[str, dict[str, Any]], conditions: dict[str, dict[str, Any]],
                             training_cases: Iterable[str], path: Path) -> list[Problem]:
    """Every training case needs every declared condition, with a valid value.

    Categorical: a string, integer or boolean (one of ``values`` when declared). Continuous: a
    finite number.
    """
    if not conditions:
        return []
    if not path.is_file():
        return [Problem(str(path), f"is missing but dataset.json declares conditions {sorted(conditions)}",
                        "write metadata.json with each training case's condition values")]
    problems = []
    for case_id in training_cases:
        fields = metadata.get(case_id)
        if fields is None:
            problems.append(Problem(f"{path} case '{case_id}'",
                                    f"has no entry but the conditions {sorted(conditions)} are declared",
                                    f"add \"{case_id}\": {{{', '.join(repr(c) + ': ...' for c in conditions)}}}"))
            continue
        for name, spec in conditions.items():
            problem = _condition_value_problem(fields, name, spec)
            if problem:
                problems.append(Problem(f"{path} case '{case_id}' key '{name}'", problem[0], problem[1]))
    return problems


def _condition_value_problem(fields: dict[str, Any], name: str,
                             spec: dict[str, Any]) -> tuple[str, str] | None:
    if name not in fields or fields[name] is None:
        return (f"is missing (declared {spec['type']} condition)", f"add the value of '{name}' for this case")
    value = fields[name]
    if spec["type"] == "continuous":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return (f"must be a finite number (continuous condition), found {value!r}", "write a number")
        return None
    if not isinstance(value, (str, int, bool)):
        return (f"must be a category (string, integer or boolean), found {value!r}", "write the category")
    allowed = spec.get("values")
    if allowed is not None and value not in allowed:
        return (f"value {value!r} is not among the declared values {allowed}",
                "fix the value or add it to the condition's 'values' in dataset.json")
    return None


def unknown_cases(metadata: dict[str, Any], known: Iterable[str]) -> list[str]:
    """Case ids in metadata.json that no split contains (logged, not an error: may be removed cases)."""
    return sorted(set(metadata) - set(known))
