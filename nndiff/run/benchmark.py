"""``nndiff_benchmark``: plan → train → predict the test set → evaluate, for several datasets,
resumable after an interruption, ending in a leaderboard table.

Every finished stage is recorded in ``OUT/benchmark_ledger.json`` (written atomically right after
the stage); a rerun skips recorded stages and redoes an interrupted one (its half-written outputs
are removed first; an interrupted training resumes from ``checkpoint_latest.pth``). Results go to
``OUT/benchmark_results.json`` and ``OUT/benchmark_results.md``.

Console-script line for setup.py: ``nndiff_benchmark=nndiff.run.benchmark:main``.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from nndiff.errors import NnDiffError
from nndiff.paths import Paths
from nndiff.run.common import add_path_flags, add_verbosity_flags, configure_logging, paths_from_args, run_cli
from nndiff.utils.files import load_json, save_json

logger = logging.getLogger(__name__)

STAGES = ("plan", "train", "predict", "evaluate")
LEDGER_FILE = "benchmark_ledger.json"
RESULTS_JSON = "benchmark_results.json"
RESULTS_MD = "benchmark_results.md"
PLANS_NAME = "nnDiffPlans"
SUPPORTED_FAMILIES = ("generation", "translation", "reconstruction")
#: What each family's evaluation compares the model with (None: no baseline in that evaluation).
BASELINE_NAMES = {"generation": None, "translation": None, "reconstruction": "zero-filled / FBP"}
DEVICE_HOURS_RULE = "device-hours = wall-clock seconds of the stage x number of devices used / 3600"


# --------------------------------------------------------------------------- ledger
class Ledger:
    """Finished stages, keyed ``Dataset/stage`` or ``Dataset/config/stage``; saved atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"stages": {}}
        if path.is_file():
            try:
                self.data = load_json(path)
            except ValueError as err:
                raise NnDiffError(f"{path} is not valid JSON ({err}). Fix: delete it to rerun every stage") from None
            if not isinstance(self.data.get("stages"), dict):
                raise NnDiffError(f"{path} has no 'stages' object. Fix: delete it to rerun every stage")

    def entry(self, key: str) -> dict[str, Any] | None:
        return self.data["stages"].get(key)

    def record(self, key: str, info: dict[str, Any]) -> dict[str, Any]:
        entry = {"status": "done", "finished_at": datetime.now(timezone.utc).isoformat(), **info}
        self.data["stages"][key] = entry
        save_json(self.data, self.path)
        return entry


def run_stage(ledger: Ledger, key: str, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` unless the ledger says ``key`` is done; record its result and wall time."""
    done = ledger.entry(key)
    if done is not None:
        logger.info("%s: done before (%s), skipped", key, done.get("finished_at"))
        return done
    logger.info("%s: running", key)
    started = time.monotonic()
    info = body()
    return ledger.record(key, {"seconds": time.monotonic() - started, **info})


# --------------------------------------------------------------------------- settings
@dataclass
class BenchmarkSettings:
    """What to run; built from the command line by :func:`settings_from_args`."""

    datasets: list[str]
    output_dir: Path
    configurations: list[str] | None = None
    folds: list[str] = field(default_factory=lambda: ["0"])
    iterations: int | None = None
    num_samples: int = 8
    seed: int = 0
    device: str = "auto"
    trainer: str | None = None
    overrides: dict[str, dict] = field(default_factory=dict)
    stop_after: str = "evaluate"


def load_overrides(path: Path | None) -> dict[str, dict]:
    """``{name: configuration}`` from ``--configuration_overrides``; each needs ``inherits_from``."""
    if path is None:
        return {}
    if not path.is_file():
        raise NnDiffError(f"--configuration_overrides {path} does not exist. Fix: give a JSON file "
                          '{"NAME": {"inherits_from": "2d", ...}}')
    try:
        data = load_json(path)
    except ValueError as err:
        raise NnDiffError(f"--configuration_overrides {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise NnDiffError(f"{path}: expected a non-empty JSON object of configurations "
                          '{"NAME": {"inherits_from": "2d", ...}}')
    for name, config in data.items():
        if not isinstance(config, dict) or not isinstance(config.get("inherits_from"), str):
            raise NnDiffError(f"{path}: configuration {name!r} needs an 'inherits_from' naming a planned "
                              "configuration (e.g. \"2d\"). Fix: add it")
    return data


# --------------------------------------------------------------------------- stages
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _root_configuration(plans: dict, name: str) -> str:
    """Follow ``inherits_from`` to the planned configuration whose preprocessed data ``name`` uses."""
    configurations = plans["configurations"]
    seen = {name}
    while "inherits_from" in configurations[name]:
        name = configurations[name]["inherits_from"]
        if name in seen or name not in configurations:
            break  # resolve_configuration reports the cycle / unknown parent with its message
        seen.add(name)
    return name


def add_overrides(plans: dict, overrides: dict[str, dict], plans_file: Path) -> list[str]:
    """Add the override configurations whose parent is planned for this dataset; return their names."""
    from nndiff.planning import resolve_configuration

    added = []
    for name, config in overrides.items():
        if config["inherits_from"] in plans["configurations"]:
            plans["configurations"][name] = config
            resolve_configuration(plans, name)  # a broken override fails here, naming it
            added.append(name)
        else:
            logger.info("%s: override %r not added (no configuration %r planned)", plans_file.parent.name, name,
                        config["inherits_from"])
    return added


def choose_configurations(plans: dict, requested: list[str] | None, plans_file: Path) -> list[str]:
    """``-c`` (each must be in the plans) or the default of nndiff_plan_and_train."""
    from nndiff.run.train import choose_configuration

    if requested is None:
        return [choose_configuration(plans, None)]
    missing = [c for c in requested if c not in plans["configurations"]]
    if missing:
        raise NnDiffError(f"configuration(s) {', '.join(missing)} not in {plans_file} (have: "
                          f"{', '.join(plans['configurations'])}). Fix: choose planned ones with -c, or add them "
                          "with --configuration_overrides")
    return list(requested)


def plan_stage(location, settings: BenchmarkSettings) -> dict[str, Any]:
    """Fingerprint, plan (kept if a plans file exists), add overrides, preprocess what is needed."""
    from nndiff.pipeline import extract_fingerprint_step, plan_step, preprocess_step

    extract_fingerprint_step(location)
    plans_file = location.plans_file(PLANS_NAME)
    plans = load_json(plans_file) if plans_file.is_file() else plan_step(location, plans_name=PLANS_NAME)
    add_overrides(plans, settings.overrides, plans_file)
    save_json(plans, plans_file)
    configurations = choose_configurations(plans, settings.configurations, plans_file)
    roots = sorted({_root_configuration(plans, c) for c in configurations})
    preprocess_step(location, roots, plans_name=PLANS_NAME)
    return {"configurations": configurations, "task": plans.get("task"), "plans_sha256": _sha256(plans_file)}


def _device_info(device: str) -> dict[str, Any]:
    import torch

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    name = torch.cuda.get_device_name(0) if use_cuda and torch.cuda.is_available() else "cpu"
    return {"device": name, "device_count": 1}  # one fold trains on one device


def train_stage(location, configuration: str, fold: str, trainer: str, settings: BenchmarkSettings,
                paths: Paths) -> dict[str, Any]:
    """Train one fold; a fold with checkpoints (an interrupted or unrecorded run) is continued."""
    from nndiff.training import checkpoint as ckpt
    from nndiff.training.api import train_fold

    fold_dir = (paths.require("results") / location.name / f"{trainer}__{PLANS_NAME}__{configuration}"
                / (f"fold_{fold}" if fold != "all" else "fold_all"))
    # Any checkpoint: continue. The trainer goes on from checkpoint_latest.pth, or only notes that a
    # finished fold is complete (a fold trained before the ledger recorded it is not retrained).
    resume = any((fold_dir / name).is_file() for name in (ckpt.LATEST, ckpt.FINAL))
    instance = train_fold(location.name, configuration, fold, paths, trainer=trainer, plans_name=PLANS_NAME,
                          iterations=settings.iterations, continue_training=resume, device=settings.device,
                          seed=settings.seed)
    return {"resumed": resume, "iterations": instance.iteration,
            "output_dir": str(instance.output_dir), **_device_info(settings.device)}


def _test_images(location, family: str) -> Path:
    folder = location.raw_dir / "imagesTs"
    if not folder.is_dir() or not any(folder.iterdir()):
        what = "held-out real images" if family == "generation" else "test inputs"
        raise NnDiffError(f"{folder} is missing or empty; the {family} benchmark needs {what} there. Fix: put "
                          "test cases in imagesTs (nnU-Net layout: {CASE}_0000{ending})")
    return folder


def _count_cases(folder: Path) -> int:
    return len([p for p in folder.iterdir() if "_0000." in p.name])


def predict_stage(location, configuration: str, trainer: str, family: str, settings: BenchmarkSettings,
                  paths: Paths, output: Path) -> dict[str, Any]:
    """Predict the test set into ``output`` (removed first: a half-written folder is never trusted)."""
    from nndiff.inference.registry import predictor_class_for

    if output.exists():
        shutil.rmtree(output)
    folds = "all" if settings.folds == ["all"] else tuple(int(f) for f in settings.folds)
    predictor = predictor_class_for(trainer).from_trained(location.name, configuration, paths, trainer=trainer,
                                                         plans_name=PLANS_NAME, folds=folds, device=settings.device)
    if family == "generation":
        predictor.generate_to_folder(output, settings.num_samples, seed=settings.seed)
        return {"num_cases": settings.num_samples, "output": str(output), **_device_info(settings.device)}
    test_images = _test_images(location, family)
    if family == "reconstruction":
        predictor.predict_simulated(test_images, output, seed=settings.seed)
    else:
        predictor.predict_from_folder(test_images, output, seed=settings.seed)
    return {"num_cases": _count_cases(test_images), "output": str(output), **_device_info(settings.device)}


def _generation_metrics(summary: dict) -> tuple[dict, dict | None]:
    m = summary["metrics"]
    diversity = m["ms_ssim_diversity"]
    metrics = {"intensity_w1": m["intensity_wasserstein1"]["mean"],
               "ms_ssim_diversity": diversity["samples"]["mean"] if diversity["samples"] else None,
               "frechet_distance": m["frechet_distance"],
               "near_copy_rate": m["memorization"]["near_copy_rate"] if m["memorization"] else None}
    return metrics, None


def evaluate_stage(location, family: str, prediction: Path, output: Path) -> dict[str, Any]:
    """The family's evaluation of ``prediction``; returns its headline metrics and baseline's."""
    raw = location.raw_dir
    summary_file = output / "summary.json"
    output.mkdir(parents=True, exist_ok=True)
    if family == "generation":
        from nndiff.evaluation.generation_folders import evaluate_generation_folders

        summary = evaluate_generation_folders(
            _test_images(location, family), prediction, training_dir=raw / "imagesTr",
            dataset_json=raw / "dataset.json",
            fingerprint=location.fingerprint_file if location.fingerprint_file.is_file() else None,
            output_file=summary_file)
        metrics, baseline = _generation_metrics(summary)
    elif family == "translation":
        from nndiff.evaluation.translation import evaluate_translation_folders

        targets = raw / "targetsTs"
        if not targets.is_dir():
            raise NnDiffError(f"{targets} does not exist; the translation benchmark compares predictions with "
                              "reference targets. Fix: add targetsTs ({CASE}_0000{ending}) for the imagesTs cases")
        summary = evaluate_translation_folders(targets, prediction, dataset_json=raw / "dataset.json",
                                               output_file=summary_file)
        metrics, baseline = dict(summary["mean"]), None
    else:
        from nndiff.evaluation.reconstruction import evaluate_reconstruction

        summary = evaluate_reconstruction(prediction, _test_images(location, family), output_file=summary_file)
        metrics, baseline = dict(summary["mean"]["reconstruction"]), summary["mean"].get("baseline")
    return {"metrics": metrics, "baseline": baseline, "baseline_name": BASELINE_NAMES[family],
            "summary": str(summary_file)}


# --------------------------------------------------------------------------- driver
def _check_family(family: str, dataset: str) -> None:
    if family not in SUPPORTED_FAMILIES:
        raise NnDiffError(f"{dataset}: task family {family!r} is not benchmarked in this version (supported: "
                          f"{', '.join(SUPPORTED_FAMILIES)}; denoising is evaluated with the Python API "
                          "nndiff.evaluation.denoising.evaluate_denoising). Fix: leave it out of -d")


def _stops_before(stage: str, settings: BenchmarkSettings) -> bool:
    return STAGES.index(stage) > STAGES.index(settings.stop_after)


def benchmark_dataset(dataset: str, settings: BenchmarkSettings, paths: Paths, ledger: Ledger) -> list[dict]:
    """All stages of one dataset; returns one result row per evaluated configuration."""
    from nndiff.pipeline import locate_dataset
    from nndiff.run.train import default_trainer

    location = locate_dataset(dataset, paths)
    name = location.name
    planned = run_stage(ledger, f"{name}/plan", lambda: plan_stage(location, settings))
    family = str(planned.get("task") or "generation")
    _check_family(family, name)
    trainer = settings.trainer or default_trainer({"task": family})
    rows = []
    for configuration in planned["configurations"]:
        if _stops_before("train", settings):
            break
        trained = [run_stage(ledger, f"{name}/{configuration}/train/fold_{fold}",
                             lambda fold=fold: train_stage(location, configuration, fold, trainer, settings, paths))
                   for fold in settings.folds]
        if _stops_before("predict", settings):
            continue
        prediction = settings.output_dir / "predictions" / name / configuration
        predicted = run_stage(ledger, f"{name}/{configuration}/predict", lambda: predict_stage(
            location, configuration, trainer, family, settings, paths, prediction))
        if _stops_before("evaluate", settings):
            continue
        evaluation_dir = settings.output_dir / "evaluation" / name / configuration
        evaluated = run_stage(ledger, f"{name}/{configuration}/evaluate",
                              lambda: evaluate_stage(location, family, prediction, evaluation_dir))
        rows.append(result_row(name, family, configuration, trainer, settings.folds, trained, predicted, evaluated))
    return rows


def result_row(dataset: str, family: str, configuration: str, trainer: str, folds: list[str], trained: list[dict],
               predicted: dict, evaluated: dict) -> dict[str, Any]:
    """One leaderboard row: metrics, baseline, device-hours of training and seconds per predicted case."""
    train_hours = sum(t["seconds"] * t.get("device_count", 1) for t in trained) / 3600.0
    return {"dataset": dataset, "family": family, "configuration": configuration, "trainer": trainer,
            "folds": folds, "metrics": evaluated["metrics"], "baseline_name": evaluated["baseline_name"],
            "baseline": evaluated["baseline"], "device": predicted.get("device"),
            "train_device_hours": train_hours,
            "seconds_per_case": predicted["seconds"] / max(int(predicted["num_cases"]), 1),
            "num_cases": predicted["num_cases"], "summary": evaluated["summary"]}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metric_text(metrics: dict | None) -> str:
    if not metrics:
        return "-"
    return ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())


def results_markdown(rows: list[dict]) -> str:
    """The leaderboard table of ``benchmark_results.md``."""
    lines = ["# nnDiff benchmark results", "", f"{DEVICE_HOURS_RULE}; one fold trains on one device.", "",
             "| Dataset | Family | Configuration | Metrics | Baseline | Baseline metrics | Device | "
             "Train device-hours | Seconds per case |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['family']} | {r['configuration']} | {_metric_text(r['metrics'])} | "
                     f"{r['baseline_name'] or 'none'} | {_metric_text(r['baseline'])} | {r['device']} | "
                     f"{r['train_device_hours']:.4g} | {r['seconds_per_case']:.4g} |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], output_dir: Path) -> None:
    from nndiff.utils.files import atomic_path

    save_json({"device_hours": DEVICE_HOURS_RULE, "rows": rows}, output_dir / RESULTS_JSON)
    with atomic_path(output_dir / RESULTS_MD) as tmp:
        Path(tmp).write_text(results_markdown(rows), encoding="utf-8")


def run_benchmark(settings: BenchmarkSettings, paths: Paths) -> list[dict]:
    """Python API of ``nndiff_benchmark``; returns the result rows (also written to the output dir)."""
    from nndiff.pipeline import locate_dataset

    paths.require("results")
    for dataset in settings.datasets:  # a bad id fails before hours of work on the others
        locate_dataset(dataset, paths)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(settings.output_dir / LEDGER_FILE)
    rows = [row for dataset in settings.datasets for row in benchmark_dataset(dataset, settings, paths, ledger)]
    if rows:
        write_results(rows, settings.output_dir)
    return rows


# --------------------------------------------------------------------------- CLI
def benchmark_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nndiff_benchmark",
        description="Plan, train, predict the test set (imagesTs; generation: --num_samples samples) and evaluate "
                    "several datasets; resumable (finished stages in OUT/benchmark_ledger.json are skipped). "
                    "Writes OUT/benchmark_results.md and .json (documentation/benchmarking.md).")
    p.add_argument("-d", nargs="+", required=True, metavar="ID", help="dataset ids")
    p.add_argument("-c", nargs="+", default=None, metavar="CONFIG",
                   help="configurations (default: 3d_fullres when planned and trainable, else 2d)")
    p.add_argument("-f", nargs="+", default=["0"], metavar="FOLD", help="folds 0-4 or 'all' (default 0)")
    p.add_argument("-o", dest="output", type=Path, default=Path("nndiff_benchmark"), metavar="DIR",
                   help="output folder for ledger, predictions, evaluations and results (default ./nndiff_benchmark)")
    p.add_argument("--iterations", type=int, default=None, metavar="N", help="cap on training iterations per fold")
    p.add_argument("--num_samples", type=int, default=8, metavar="N", help="generation: samples to draw (default 8)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="training and prediction seed (default 0)")
    p.add_argument("-tr", dest="trainer", default=None, help="trainer (default: the task family's)")
    p.add_argument("-device", default="auto", choices=("auto", "cuda", "cpu"), help="device (default auto)")
    p.add_argument("--configuration_overrides", type=Path, default=None, metavar="FILE.json",
                   help='extra configurations {"NAME": {"inherits_from": "2d", ...}} added to each dataset\'s plans '
                        "where the parent is planned (e.g. a tiny configuration for a smoke run)")
    p.add_argument("--stop_after", choices=STAGES, default="evaluate",
                   help="stop every dataset after this stage (a later run without it goes on)")
    add_path_flags(p)
    add_verbosity_flags(p)
    return p


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    for flag, value in (("--iterations", args.iterations), ("--num_samples", args.num_samples)):
        if value is not None and value < 1:
            raise NnDiffError(f"{flag} must be at least 1, got {value}")
    folds = [str(f) for f in args.f]
    if any(f != "all" and not f.isdigit() for f in folds) or ("all" in folds and len(folds) > 1):
        raise NnDiffError(f"-f takes fold numbers or 'all' alone, got {' '.join(folds)}")
    return BenchmarkSettings(datasets=[str(d) for d in args.d], output_dir=args.output, configurations=args.c,
                             folds=folds, iterations=args.iterations, num_samples=args.num_samples, seed=args.seed,
                             device=args.device, trainer=args.trainer,
                             overrides=load_overrides(args.configuration_overrides), stop_after=args.stop_after)


def _body(argv: Sequence[str] | None) -> None:
    args = benchmark_parser().parse_args(argv)
    configure_logging(args)
    settings = settings_from_args(args)
    rows = run_benchmark(settings, paths_from_args(args))
    if rows:
        print(results_markdown(rows))
        print(f"results: {settings.output_dir / RESULTS_MD}")
    else:
        print(f"stopped after {settings.stop_after}; ledger: {settings.output_dir / LEDGER_FILE}")


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``nndiff_benchmark``."""
    return run_cli(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
