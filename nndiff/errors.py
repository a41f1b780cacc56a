"""User-facing error types.

The CLI catches :class:`NnDiffError` and prints its message without a traceback: these
errors describe a problem in the user's data or command, never a bug in nnDiff.
"""
from __future__ import annotations

from pathlib import Path


class NnDiffError(Exception):
    """Base class for errors caused by user input (data, configuration, command line)."""


class PathsError(NnDiffError):
    """A required root folder (raw / preprocessed / results) is not configured or missing."""


class DatasetError(NnDiffError):
    """One or more problems in a raw dataset.

    ``problems`` is a list of ``(where, problem, fix)`` triples; ``where`` names the file or
    dataset.json key. The message lists every problem so the user can fix them in one go.
    """

    def __init__(self, problems: list[tuple[str | Path, str, str]]):
        if not problems:
            raise ValueError("DatasetError needs at least one problem")
        self.problems = [(str(w), p, f) for w, p, f in problems]
        lines = [f"{len(self.problems)} problem(s) found in the dataset:"]
        for where, problem, fix in self.problems:
            lines.append(f"  - {where}: {problem}. Fix: {fix}")
        super().__init__("\n".join(lines))


class PlansError(NnDiffError):
    """A plans file or configuration is malformed or asks for something impossible."""
