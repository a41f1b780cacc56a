"""nndiff_demo: the README's main job.

Until the generation family lands this runs the foundation end to end on example datasets that
it creates itself: a 2D grey PNG dataset and a 3D anisotropic CT-like NIfTI dataset are written
into ``OUTPUT/raw``, then fingerprinted, planned (with ``--explain``) and preprocessed into
``OUTPUT/preprocessed``. ``--smoke`` uses fewer cases (seconds; run by the test suite).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Sequence

from nndiff.run.common import add_verbosity_flags, configure_logging, run_cli

EXAMPLES = (("2d_grey_png", 1), ("3d_ct", 2))


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nndiff_demo",
        description=(
            "Create example datasets (2D grey PNG, 3D CT-like NIfTI) in OUTPUT/raw and run "
            "fingerprint -> plan (explained) -> preprocess on them."
        ),
    )
    p.add_argument("-o", "--output", default="nndiff_demo_output", type=Path,
                   help="working folder (default ./nndiff_demo_output); its raw/ and preprocessed/ are replaced")
    p.add_argument("--smoke", action="store_true", help="tiny version for tests (seconds)")
    p.add_argument("--gpu_memory_target", type=float, default=8.0, metavar="GiB",
                   help="GPU memory target for planning (default 8)")
    add_verbosity_flags(p)
    return p


def run_demo(output: Path, smoke: bool = False, gpu_memory_target_gib: float = 8.0) -> dict[str, dict]:
    """Create the example datasets, plan and preprocess them; return the plans per dataset."""
    import shutil

    from nndiff.dataset.examples import make_example_dataset
    from nndiff.paths import resolve_paths
    from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
    from nndiff.utils.files import load_json

    raw, pre = output / "raw", output / "preprocessed"
    for folder in (raw, pre):
        if folder.exists():
            shutil.rmtree(folder)
    paths = resolve_paths(raw=raw, preprocessed=pre, results=output / "results")
    num_cases = 4 if smoke else 8
    all_plans: dict[str, dict] = {}
    for kind, dataset_id in EXAMPLES:
        make_example_dataset(kind, raw, dataset_id, num_cases=num_cases, seed=dataset_id)
        location = locate_dataset(dataset_id, paths)
        extract_fingerprint_step(location, num_processes=1, verify_dataset_integrity=True)
        plan_step(location, gpu_memory_target_gib)
        preprocess_step(location)
        all_plans[location.name] = load_json(location.plans_file())  # with measured clip fractions
    return all_plans


def _demo_body(argv: Sequence[str] | None) -> None:
    from nndiff.planning import explain

    args = demo_parser().parse_args(argv)
    configure_logging(args)
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    start = time.perf_counter()
    all_plans = run_demo(args.output, smoke=args.smoke, gpu_memory_target_gib=args.gpu_memory_target)
    for name, plans in all_plans.items():
        print(f"===== {name} =====")
        print(explain(plans))
    print(f"nndiff_demo finished in {time.perf_counter() - start:.1f} s; outputs in {args.output.resolve()}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_demo_body, argv)
