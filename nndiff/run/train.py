"""Entry points ``nndiff_train`` (one fold of a planned, preprocessed dataset) and
``nndiff_plan_and_train`` (fingerprint, plan, preprocess and train in one command).

The trainer defaults to the dataset's task family (:data:`DEFAULT_TRAINERS`); ``-tr`` picks any
registered trainer (see :mod:`nndiff.training.registry`). Training reads only the preprocessed
folder, so ``nndiff_train`` runs on a machine without the raw data (and without SimpleITK).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from nndiff.diffusion.options import TaskFamily
from nndiff.errors import NnDiffError
from nndiff.run.common import add_path_flags, add_verbosity_flags, configure_logging, paths_from_args, run_cli

logger = logging.getLogger(__name__)

DEFAULT_PLANS = "nnDiffPlans"

#: Trainer used when ``-tr`` is not given, by the plans' task family. Families whose trainer has
#: not landed yet are absent: asking for them gives an error that says so.
DEFAULT_TRAINERS: dict[str, str] = {
    TaskFamily.GENERATION.value: "GenerationTrainer",
    TaskFamily.TRANSLATION.value: "TranslationTrainer",
    TaskFamily.RECONSTRUCTION.value: "ReconstructionTrainer",
    TaskFamily.DENOISING.value: "DenoisingTrainer",
    TaskFamily.ANOMALY_DETECTION.value: "AnomalyDDPMTrainer",
    TaskFamily.SEGMENTATION.value: "SegmentationDiffusionTrainer",
}


def default_trainer(plans: dict, configuration: str | None = None) -> str:
    """The default trainer name for the plans' ``task`` (error names the fix when none exists); a
    latent ``configuration`` gets its family's latent trainer (autoencoder stage, then diffusion)."""
    task = str(plans.get("task", ""))
    if configuration is not None:
        from nndiff.planning import resolve_configuration
        from nndiff.tasks.latent import latent_trainer_for

        latent = latent_trainer_for(plans, resolve_configuration(plans, configuration), configuration)
        if latent is not None:
            return latent
    if task in DEFAULT_TRAINERS:
        return DEFAULT_TRAINERS[task]
    known = ", ".join(f"{k} -> {v}" for k, v in DEFAULT_TRAINERS.items())
    raise NnDiffError(f"no default trainer for task family {task!r} in this version (defaults: {known}). "
                      "Fix: choose a registered trainer with -tr, or use a dataset of a supported family")


def _positive(name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise NnDiffError(f"{name} must be positive, got {value}")


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-tr", dest="trainer", default=None,
                   help="trainer class name (default: the task family's, e.g. GenerationTrainer)")
    p.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="number of epochs (overrides the plan; an epoch is the plan's iterations_per_epoch)")
    p.add_argument("--iterations", type=int, default=None, metavar="N",
                   help="cap on the total training iterations (e.g. 10 for a smoke run; the schedule is laid "
                        "out over the capped total)")
    p.add_argument("-device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="device (default auto: cuda when available)")
    p.add_argument("--num_workers", type=int, default=None, metavar="N",
                   help="data-loader worker processes (default: the trainer's, 0 on CPU)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="training seed (default: the trainer's)")


def _train_kwargs(args: argparse.Namespace) -> dict:
    _positive("--epochs", args.epochs)
    _positive("--iterations", args.iterations)
    kwargs = dict(epochs=args.epochs, iterations=args.iterations, device=args.device, num_workers=args.num_workers)
    if args.seed is not None:
        kwargs["seed"] = args.seed
    return kwargs


# --- nndiff_train ---------------------------------------------------------------------------

def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nndiff_train",
        description="Train one fold of a planned and preprocessed dataset into "
                    "results/DatasetXXX_Name/<Trainer>__<Plans>__<config>/fold_N/ (checkpoints latest/best/final, "
                    "training_log_*.txt, progress.png, sample grids).",
    )
    p.add_argument("dataset", help="dataset id: 4, Dataset004 or Dataset004_Name")
    p.add_argument("configuration", help="configuration from the plans, e.g. 2d, 3d_fullres or an inherited one")
    p.add_argument("fold", help="fold 0-4 (splits_final.json, grouped by the 'subject' metadata key) or 'all'")
    p.add_argument("-p", dest="plans", default=DEFAULT_PLANS, help=f"plans name (default {DEFAULT_PLANS})")
    _add_training_flags(p)
    p.add_argument("--continue", dest="continue_training", action="store_true",
                   help="resume from checkpoint_latest.pth (exactly as an uninterrupted run would go on)")
    p.add_argument("--time_limit", type=float, default=None, metavar="SECONDS",
                   help="stop this call after SECONDS at an iteration boundary, writing checkpoint_latest.pth; "
                        "go on later with --continue (for time-limited GPU sessions)")
    add_path_flags(p)
    add_verbosity_flags(p)
    return p


def _train_body(argv: Sequence[str] | None) -> None:
    from nndiff.training.api import find_preprocessed_dataset, load_plans, train_fold

    args = train_parser().parse_args(argv)
    configure_logging(args)
    _positive("--time_limit", args.time_limit)
    kwargs = _train_kwargs(args)
    paths = paths_from_args(args)
    preprocessed = find_preprocessed_dataset(paths.require("preprocessed"), args.dataset)
    trainer = args.trainer or default_trainer(load_plans(preprocessed, args.plans), args.configuration)
    instance = train_fold(preprocessed.name, args.configuration, args.fold, paths, trainer=trainer,
                          plans_name=args.plans, continue_training=args.continue_training,
                          time_limit_s=args.time_limit, command=_command_line("nndiff_train", argv), **kwargs)
    _report(instance)


def _command_line(program: str, argv: Sequence[str] | None) -> list[str]:
    """The command as the user typed it (for debug.json and exported model manifests)."""
    return [program, *(sys.argv[1:] if argv is None else argv)]


def _report(instance) -> None:
    done = instance.iteration >= instance.total_iterations
    state = "finished" if done else "stopped early (resume with --continue)"
    print(f"{type(instance).__name__} {state} at iteration {instance.iteration} of {instance.total_iterations}; "
          f"outputs in {instance.output_dir}")


def train_entry(argv: Sequence[str] | None = None) -> int:
    return run_cli(_train_body, argv)


# --- nndiff_plan_and_train ------------------------------------------------------------------

def plan_and_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nndiff_plan_and_train",
        description="One command from raw dataset to trained model: integrity checks, fingerprint, plan "
                    "(reasons with --explain), preprocess, then train one fold with the task family's "
                    "trainer (final validation included).",
    )
    p.add_argument("-d", dest="dataset", required=True, metavar="ID", help="dataset id (4, Dataset004, ...)")
    p.add_argument("-c", dest="configuration", default=None, metavar="CONFIG",
                   help="configuration to train (default: 3d_fullres when planned and trainable, else 2d)")
    p.add_argument("-f", dest="fold", default="0", help="fold 0-4 or 'all' (default 0)")
    p.add_argument("-np", type=int, default=1, metavar="N",
                   help="processes for fingerprinting and preprocessing (default 1)")
    p.add_argument("--gpu_memory_target", type=float, default=8.0, metavar="GiB",
                   help="GPU memory the planned training step may use (default 8)")
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="open every file and run the full integrity checks")
    p.add_argument("--explain", action="store_true", help="print every planning decision with its reason")
    _add_training_flags(p)
    add_path_flags(p)
    add_verbosity_flags(p)
    return p


def choose_configuration(plans: dict, requested: str | None) -> str:
    """``-c`` if given (must be in the plans), else ``3d_fullres`` when it is planned and trainable
    (3D data: a 3D model is what a 3D dataset asks for), else the first trainable configuration."""
    from nndiff.planning import resolve_configuration

    configurations = plans.get("configurations", {})
    if requested is not None:
        if requested not in configurations:
            raise NnDiffError(f"configuration {requested!r} is not in the plans (have: "
                              f"{', '.join(configurations)}). Fix: choose one of these with -c")
        return requested  # preprocess_step refuses an untrainable one with its status
    order = ["3d_fullres"] * ("3d_fullres" in configurations) + list(configurations)
    for name in order:
        if resolve_configuration(plans, name).get("trainable", True):
            return name
    raise NnDiffError("the plans have no trainable configuration. Fix: see the planning reasons with --explain")


def _plan_and_train_body(argv: Sequence[str] | None) -> None:
    from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
    from nndiff.planning import explain
    from nndiff.training.api import train_fold
    from nndiff.utils.files import load_json

    args = plan_and_train_parser().parse_args(argv)
    configure_logging(args)
    if args.np < 1:
        raise NnDiffError(f"-np must be at least 1, got {args.np}")
    kwargs = _train_kwargs(args)
    paths = paths_from_args(args)
    paths.require("results")  # fail before hours of preprocessing, not after
    location = locate_dataset(args.dataset, paths)
    extract_fingerprint_step(location, args.np, args.verify_dataset_integrity)
    plans = plan_step(location, args.gpu_memory_target, DEFAULT_PLANS)
    configuration = choose_configuration(plans, args.configuration)
    trainer = args.trainer or default_trainer(plans, configuration)
    preprocess_step(location, [configuration], args.np, DEFAULT_PLANS)
    if args.explain:
        print(explain(load_json(location.plans_file(DEFAULT_PLANS))))
    print(f"{location.name}: planned and preprocessed {configuration}; training {trainer} fold {args.fold}")
    instance = train_fold(location.name, configuration, args.fold, paths, trainer=trainer,
                          command=_command_line("nndiff_plan_and_train", argv), **kwargs)
    _report(instance)


def plan_and_train_entry(argv: Sequence[str] | None = None) -> int:
    return run_cli(_plan_and_train_body, argv)


if __name__ == "__main__":
    sys.exit(train_entry())
