"""Shared pieces of the command-line entry points: path flags, logging, error reporting."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from nndiff.errors import NnDiffError
from nndiff.paths import ENV_VARS, Paths, resolve_paths


def add_path_flags(parser: argparse.ArgumentParser) -> None:
    """Add --raw / --preprocessed / --results (each falls back to its environment variable)."""
    group = parser.add_argument_group("folders (flag > environment variable)")
    for key in ("raw", "preprocessed", "results"):
        group.add_argument(
            f"--{key}",
            default=None,
            metavar="DIR",
            help=f"{key} data root (default: ${ENV_VARS[key]})",
        )


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def paths_from_args(args: argparse.Namespace) -> Paths:
    return resolve_paths(raw=args.raw, preprocessed=args.preprocessed, results=args.results)


def configure_logging(args: argparse.Namespace) -> None:
    level = logging.INFO
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    elif getattr(args, "quiet", False):
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def run_cli(body: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None) -> int:
    """Run a CLI body; user errors become a clear message on stderr and exit code 2.

    Bugs (any other exception) keep their traceback: they are ours to fix, not the user's.
    """
    try:
        code = body(argv)
    except NnDiffError as err:
        print(f"nnDiff error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)
