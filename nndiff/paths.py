"""Root folders for raw data, preprocessed data and results.

Resolution order for each root: explicit argument (CLI flag) > environment variable.
Nothing is read from the environment at import time: call :func:`resolve_paths`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from nndiff.errors import PathsError

ENV_VARS = {"raw": "nnDiff_raw", "preprocessed": "nnDiff_preprocessed", "results": "nnDiff_results"}
FLAGS = {"raw": "--raw", "preprocessed": "--preprocessed", "results": "--results"}


@dataclass(frozen=True)
class Paths:
    """Resolved roots. A root is ``None`` when neither flag nor variable set it."""

    raw: Path | None = None
    preprocessed: Path | None = None
    results: Path | None = None

    def require(self, which: str) -> Path:
        """Return the root ``which`` or raise a PathsError naming the flag and variable to set."""
        if which not in ENV_VARS:
            raise ValueError(f"unknown root {which!r}; valid: {', '.join(ENV_VARS)}")
        value = getattr(self, which)
        if value is None:
            raise PathsError(
                f"the {which} folder is not set. Pass {FLAGS[which]} DIR or set the environment "
                f"variable {ENV_VARS[which]}=DIR"
            )
        return value


def resolve_paths(
    raw: str | Path | None = None,
    preprocessed: str | Path | None = None,
    results: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Paths:
    """Resolve the three roots from explicit values, else from the environment."""
    env = os.environ if environ is None else environ
    given = {"raw": raw, "preprocessed": preprocessed, "results": results}
    resolved: dict[str, Path | None] = {}
    for key, value in given.items():
        if value is None:
            value = env.get(ENV_VARS[key]) or None
        resolved[key] = Path(value).expanduser() if value is not None else None
    return Paths(**resolved)
