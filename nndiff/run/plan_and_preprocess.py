"""Entry points: nndiff_extract_fingerprint, nndiff_plan_experiment, nndiff_preprocess,
nndiff_plan_and_preprocess. Thin wrappers around :mod:`nndiff.pipeline`."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from nndiff.pipeline import (
    DEFAULT_PLANS,
    extract_fingerprint_step,
    locate_dataset,
    plan_step,
    preprocess_step,
)
from nndiff.run.common import (
    add_path_flags,
    add_verbosity_flags,
    configure_logging,
    paths_from_args,
    run_cli,
)
from nndiff.utils.files import load_json

logger = logging.getLogger(__name__)


def _add_dataset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-d", nargs="+", required=True, metavar="ID",
        help="dataset ids (4, Dataset004 or Dataset004_Name); several are processed in turn",
    )


def _add_np(p: argparse.ArgumentParser) -> None:
    p.add_argument("-np", type=int, default=1, metavar="N",
                   help="number of worker processes (default 1)")


def _add_fingerprint_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="open every file and run the full integrity checks (cheap checks always run)")
    p.add_argument("--clean", action="store_true",
                   help="recompute the fingerprint even if an up-to-date one exists")


def _add_plan_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu_memory_target", type=float, default=8.0, metavar="GiB",
                   help="GPU memory the planned training step may use (default 8)")
    p.add_argument("-pl", "--plans_name", default=DEFAULT_PLANS,
                   help=f"name of the plans file (default {DEFAULT_PLANS})")
    p.add_argument("--explain", action="store_true",
                   help="print every planning decision with its reason")


def _add_preprocess_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", nargs="+", default=None, metavar="CONFIG",
                   help="configurations to preprocess (default: every trainable configuration)")


def _check_np(args: argparse.Namespace) -> None:
    from nndiff.errors import NnDiffError

    if args.np < 1:
        raise NnDiffError(f"-np must be at least 1, got {args.np}")


def _print_explanation(plans: dict) -> None:
    from nndiff.planning import explain

    print(explain(plans))


# --- nndiff_extract_fingerprint -------------------------------------------------------------

def extract_fingerprint_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nndiff_extract_fingerprint",
        description="Check a raw dataset and write preprocessed/DatasetXXX/dataset_fingerprint.json.",
    )
    _add_dataset_flag(p)
    _add_np(p)
    _add_fingerprint_flags(p)
    add_path_flags(p)
    add_verbosity_flags(p)
    return p


def _extract_fingerprint_body(argv: Sequence[str] | None) -> None:
    args = extract_fingerprint_parser().parse_args(argv)
    configure_logging(args)
    _check_np(args)
    paths = paths_from_args(args)
    for dataset in args.d:
        location = locate_dataset(dataset, paths)
        extract_fingerprint_step(location, args.np, args.verify_dataset_integrity, args.clean)
        print(f"{location.name}: fingerprint in {location.fingerprint_file}")


def extract_fingerprint_entry(argv: Sequence[str] | None = None) -> int:
    return run_cli(_extract_fingerprint_body, argv)


# --- nndiff_plan_experiment -----------------------------------------------------------------

def plan_experiment_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nndiff_plan_experiment",
        description="Plan configurations from the fingerprint; writes preprocessed/DatasetXXX/nnDiffPlans.json.",
    )
    _add_dataset_flag(p)
    _add_plan_flags(p)
    add_path_flags(p)
    add_verbosity_flags(p)
    return p


def _plan_experiment_body(argv: Sequence[str] | None) -> None:
    args = plan_experiment_parser().parse_args(argv)
    configure_logging(args)
    paths = paths_from_args(args)
    for dataset in args.d:
        location = locate_dataset(dataset, paths)
        plans = plan_step(location, args.gpu_memory_target, args.plans_name)
        print(f"{location.name}: plans in {location.plans_file(args.plans_name)}")
        if args.explain:
            _print_explanation(plans)


def plan_experiment_entry(argv: Sequence[str] | None = None) -> int:
    return run_cli(_plan_experiment_body, argv)


# --- nndiff_preprocess ----------------------------------------------------------------------

def preprocess_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nndiff_preprocess",
        description="Preprocess a planned dataset into preprocessed/DatasetXXX/nnDiffPlans_<config>/.",
    )
    _add_dataset_flag(p)
    _add_preprocess_flags(p)
    _add_np(p)
    p.add_argument("-pl", "--plans_name", default=DEFAULT_PLANS,
                   help=f"name of the plans file (default {DEFAULT_PLANS})")
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="open every file and run the full integrity checks first")
    add_path_flags(p)
    add_verbosity_flags(p)
    return p


def _preprocess_body(argv: Sequence[str] | None) -> None:
    args = preprocess_parser().parse_args(argv)
    configure_logging(args)
    _check_np(args)
    paths = paths_from_args(args)
    for dataset in args.d:
        location = locate_dataset(dataset, paths)
        done = preprocess_step(location, args.c, args.np, args.plans_name, args.verify_dataset_integrity)
        print(f"{location.name}: preprocessed {', '.join(done)} in {location.preprocessed_dir}")


def preprocess_entry(argv: Sequence[str] | None = None) -> int:
    return run_cli(_preprocess_body, argv)


# --- nndiff_plan_and_preprocess -------------------------------------------------------------

def plan_and_preprocess_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nndiff_plan_and_preprocess",
        description=(
            "Fingerprint, plan and preprocess raw datasets in one go: integrity checks, "
            "dataset_fingerprint.json, nnDiffPlans.json (every decision with its reason) and "
            "nnDiffPlans_<config>/ with an exact inverse."
        ),
    )
    _add_dataset_flag(p)
    _add_preprocess_flags(p)
    _add_np(p)
    _add_fingerprint_flags(p)
    _add_plan_flags(p)
    p.add_argument("--no_pp", action="store_true", help="stop after planning (no preprocessing)")
    add_path_flags(p)
    add_verbosity_flags(p)
    return p


def _plan_and_preprocess_body(argv: Sequence[str] | None) -> None:
    args = plan_and_preprocess_parser().parse_args(argv)
    configure_logging(args)
    _check_np(args)
    paths = paths_from_args(args)
    locations = [locate_dataset(d, paths) for d in args.d]  # fail on a bad id before any work
    for location in locations:
        extract_fingerprint_step(location, args.np, args.verify_dataset_integrity, args.clean)
        plans = plan_step(location, args.gpu_memory_target, args.plans_name)
        if args.no_pp:
            print(f"{location.name}: planned (no preprocessing) in {location.plans_file(args.plans_name)}")
        else:
            done = preprocess_step(location, args.c, args.np, args.plans_name)
            print(f"{location.name}: planned and preprocessed {', '.join(done)} in {location.preprocessed_dir}")
            plans = load_json(location.plans_file(args.plans_name))  # now with measured clip fractions
        if args.explain:
            _print_explanation(plans)


def plan_and_preprocess_entry(argv: Sequence[str] | None = None) -> int:
    return run_cli(_plan_and_preprocess_body, argv)


if __name__ == "__main__":
    sys.exit(plan_and_preprocess_entry())
