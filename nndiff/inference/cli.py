"""``nndiff_predict``: predict new cases (``-i``) or generate samples (no ``-i``; conditional models
with ``--condition KEY=VALUE`` and ``--guidance_scale``) with a trained model.

Flags as in documentation/cli.md. The console-script line for setup.py is
``nndiff_predict=nndiff.inference.cli:predict_entry``.
"""
from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Sequence

from nndiff.errors import NnDiffError
from nndiff.inference.predictor import DEFAULT_CHECKPOINT
from nndiff.inference.registry import predictor_class_for
from nndiff.run.common import add_path_flags, add_verbosity_flags, configure_logging, paths_from_args, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nndiff_predict",
        description="Predict the cases of -i (outputs in the input's format, geometry and units) or, without "
                    "-i, generate --num_samples samples (spacing from the plan, origin 0, identity direction; "
                    "conditional models take --condition KEY=VALUE and --guidance_scale).")
    parser.add_argument("-i", dest="input", default=None, help="folder of {CASE}_{XXXX}{ending} input files")
    parser.add_argument("-o", dest="output", required=True, help="output folder")
    parser.add_argument("-d", dest="dataset", required=True, help="dataset id, DatasetXXX or DatasetXXX_Name")
    parser.add_argument("-c", dest="configuration", required=True, help="configuration, e.g. 2d or 3d_fullres")
    parser.add_argument("-f", dest="folds", nargs="+", default=["0"], help="folds (numbers or 'all'); default 0")
    parser.add_argument("-tr", dest="trainer", default=None,
                        help="trainer name (default: the only trained model of this configuration)")
    parser.add_argument("-p", dest="plans", default="nnDiffPlans", help="plans name (default nnDiffPlans)")
    parser.add_argument("-chk", dest="checkpoint", default=DEFAULT_CHECKPOINT, help=f"default {DEFAULT_CHECKPOINT}")
    parser.add_argument("-device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--num_samples", type=int, default=None,
                        help="with -i: samples per case (> 1 writes the mean and {CASE}_std); without -i: total "
                             "samples (default 1 with -i, 8 without)")
    parser.add_argument("--sampler", default=None, help="sampler name (default: the plan's)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the plan's)")
    parser.add_argument("--seed", type=int, default=0, help="seed (same seed -> same outputs)")
    parser.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument("--condition", action="append", default=None, metavar="KEY=VALUE",
                        help="generation (no -i) with a conditional model: a condition of dataset.json 'conditions' "
                             "for every sample, e.g. --condition shape=disk --condition size=6.5 (repeat for each "
                             "key; all keys or none)")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="classifier-free guidance scale for conditional generation (default: the plan's; "
                             "1 = no guidance)")
    add_path_flags(parser)
    add_verbosity_flags(parser)
    return parser


def _only_trainer(results_dir: Path, plans: str, configuration: str) -> str:
    suffix = f"__{plans}__{configuration}"
    found = sorted(p.name[: -len(suffix)] for p in results_dir.glob(f"*{suffix}") if p.is_dir())
    if len(found) != 1:
        raise NnDiffError(f"{'no' if not found else 'several'} trained models for {configuration} ({plans}) in "
                          f"{results_dir}{': ' + ', '.join(found) if found else ''}. Fix: "
                          f"{'train one first' if not found else 'choose one with -tr'}")
    return found[0]


def _folds(values: Sequence[str]) -> tuple[int | str, ...] | str:
    if list(values) == ["all"]:
        return "all"
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise NnDiffError(f"folds must be numbers or 'all', got {' '.join(values)}") from None


def parse_condition_flags(flags: Sequence[str] | None) -> dict[str, str] | None:
    """``["shape=disk", "size=6.5"]`` (``--condition KEY=VALUE``, repeatable) -> ``{"shape": "disk", "size": "6.5"}``.

    Values stay strings; the family predictor (e.g. :func:`nndiff.tasks.generation_predictor.validate_conditions`) matches them to the model's categories and numbers.
    """
    if not flags:
        return None
    parsed: dict[str, str] = {}
    for flag in flags:
        key, sep, value = flag.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise NnDiffError(f"--condition {flag!r} is not KEY=VALUE. Fix: e.g. --condition shape=disk")
        if key in parsed and parsed[key] != value:
            raise NnDiffError(f"--condition {key} given twice ({parsed[key]!r} and {value!r}). Fix: give it once")
        parsed[key] = value
    return parsed


#: ``generate_to_folder`` keyword -> the flag that sets it.
_GENERATION_FLAGS = {"conditions": "--condition", "guidance_scale": "--guidance_scale"}


def _generation_options(predictor: object, args: argparse.Namespace) -> dict:
    """``conditions`` / ``guidance_scale`` keyword arguments for ``generate_to_folder``, only when
    given (a family without conditional generation does not take them)."""
    options = {"conditions": parse_condition_flags(args.condition), "guidance_scale": args.guidance_scale}
    options = {key: value for key, value in options.items() if value is not None}
    accepted = inspect.signature(predictor.generate_to_folder).parameters  # type: ignore[attr-defined]
    refused = [_GENERATION_FLAGS[key] for key in options if key not in accepted]
    if refused:
        raise NnDiffError(f"{type(predictor).__name__} does not take {' or '.join(refused)}. "
                          "Fix: drop the flag(s); this model family generates without conditions")
    return options


def _main(argv: Sequence[str] | None) -> int:
    from nndiff.training.api import find_preprocessed_dataset

    args = build_parser().parse_args(argv)
    configure_logging(args)
    paths = paths_from_args(args)
    results_dir = find_preprocessed_dataset(paths.require("results"), args.dataset)
    trainer = args.trainer or _only_trainer(results_dir, args.plans, args.configuration)
    cls = predictor_class_for(trainer)
    predictor = cls.from_trained(args.dataset, args.configuration, paths, trainer=trainer, plans_name=args.plans,
                                 folds=_folds(args.folds), checkpoint=args.checkpoint, use_ema=not args.no_ema,
                                 device=args.device, sampler=args.sampler, num_steps=args.steps)
    if args.input is not None:
        if args.condition or args.guidance_scale is not None:
            raise NnDiffError("--condition and --guidance_scale apply to generation. Fix: drop -i to generate "
                              "samples, or drop them to predict the cases of -i")
        written = predictor.predict_from_folder(args.input, args.output, seed=args.seed,
                                                num_mc_samples=args.num_samples or 1)
    else:
        written = predictor.generate_to_folder(args.output, args.num_samples or 8, seed=args.seed,
                                               **_generation_options(predictor, args))
    print(f"wrote {len(written)} file(s) to {args.output}")
    return 0


def predict_entry(argv: Sequence[str] | None = None) -> int:
    """Console script ``nndiff_predict``."""
    return run_cli(_main, argv)
