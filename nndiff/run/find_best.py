"""``nndiff_find_best_configuration``: rank trained configurations by their validation loss and write
``inference_instructions.txt`` with ready-to-run commands (as nnU-Net does).

Metric, for every family: the trainer's validation loss (fixed validation items, fixed (t, noise)
pairs, EMA weights) from the ``history`` stored in each fold's checkpoint. ``--criterion final``
(default) takes the last epoch's value — the weights ``checkpoint_final.pth`` holds, which
``nndiff_predict`` uses by default; ``best`` takes the lowest value over the run
(``checkpoint_best.pth``, and the instructions then pass ``-chk checkpoint_best.pth``). A model's
score is the mean over the compared folds, its fold ensemble being what ``nndiff_predict -f`` loads.
Lower is better. No trainer writes a validation summary with task metrics yet, so conditional
families are ranked on the same loss.

Validation losses are comparable only when the training-side diffusion settings are equal
(process, schedule, parameterisation, loss weighting: everything of the ``diffusion`` block except
the sampling keys): the result names the configurations whose settings differ.
Console script: ``nndiff_find_best_configuration=nndiff.run.find_best:find_best_entry``.
"""
from __future__ import annotations

import argparse
import math
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from nndiff.errors import NnDiffError
from nndiff.inference.model_folder import FOLD_PREFIX, locate_plans_and_dataset_json, parse_model_folder_name
from nndiff.paths import resolve_paths
from nndiff.planning import resolve_configuration
from nndiff.run.common import add_verbosity_flags, configure_logging, run_cli
from nndiff.run.model_sharing import find_model_dirs
from nndiff.training.checkpoint import BEST, FINAL, load_checkpoint
from nndiff.utils.files import atomic_path, load_json, save_json

INSTRUCTIONS_FILE = "inference_instructions.txt"
RESULT_FILE = "best_configuration.json"
CRITERIA = ("final", "best")
#: Diffusion keys that only concern sampling: they do not change the validation loss.
SAMPLING_KEYS = ("sampler", "num_sampling_steps", "sampler_options", "sampling_eps", "timestep_spacing", "clip_x0",
                 "dynamic_threshold", "guidance", "guidance_scale")


@dataclass
class ModelScore:
    """One trained model folder's validation losses (per fold) and score (mean over folds)."""

    folder: str
    trainer: str
    plans_name: str
    configuration: str
    task: str
    folds: list[str]
    final_val_loss: dict[str, float]
    best_val_loss: dict[str, float]
    score: float
    diffusion: dict[str, Any] = field(repr=False)


def fold_validation_losses(fold_dir: Path) -> tuple[float, float]:
    """``(final, best)`` validation loss of one fold from its final checkpoint's history."""
    path = fold_dir / FINAL
    if not path.is_file():
        raise NnDiffError(f"{path} does not exist: the fold has not finished training. Fix: finish it "
                          "(nndiff_train ... --continue) or leave the fold out with -f")
    history = load_checkpoint(path).get("history") or {}
    losses = [float(v) for v in history.get("val_loss", []) if math.isfinite(float(v))]
    if not losses:
        raise NnDiffError(f"{path} records no finite validation loss (no validation cases, or training diverged). "
                          "Fix: train with validation cases (a fold other than 'all') or leave this model out with -c")
    return losses[-1], min(losses)


def training_diffusion(configuration: dict[str, Any]) -> dict[str, Any]:
    """The diffusion settings that change the validation loss (sampling keys removed)."""
    return {k: v for k, v in (configuration.get("diffusion") or {}).items() if k not in SAMPLING_KEYS}


def score_model(model_dir: Path, folds: Sequence[str], criterion: str,
                preprocessed_dir: Path | None) -> ModelScore:
    """Validation losses of ``folds`` of one model folder and their mean under ``criterion``."""
    name = parse_model_folder_name(model_dir)
    plans_file, dataset_json = locate_plans_and_dataset_json(model_dir, name.plans_name, preprocessed_dir)
    configuration = resolve_configuration(load_json(plans_file), name.configuration)
    final, best = {}, {}
    for fold in folds:
        final[fold], best[fold] = fold_validation_losses(model_dir / f"{FOLD_PREFIX}{fold}")
    chosen = final if criterion == "final" else best
    return ModelScore(folder=str(model_dir), trainer=name.trainer, plans_name=name.plans_name,
                      configuration=name.configuration, task=str(load_json(dataset_json).get("task", "generation")),
                      folds=list(folds), final_val_loss=final, best_val_loss=best,
                      score=sum(chosen.values()) / len(chosen), diffusion=training_diffusion(configuration))


def trained_folds(model_dir: Path) -> set[str]:
    """Folds of a model folder with a final checkpoint (``fold_all`` excluded: it validates on training cases)."""
    return {p.parent.name[len(FOLD_PREFIX):] for p in model_dir.glob(f"{FOLD_PREFIX}*/{FINAL}")} - {"all"}


def choose_folds(model_dirs: Sequence[Path], folds: Sequence[str] | None) -> tuple[list[str], list[Path], list[str]]:
    """The folds to compare and the models that have them all; models lacking one are skipped
    (with a note) so every score averages the same folds. Default: folds every model has."""
    if folds:
        wanted = [str(f) for f in folds]
    else:
        common = set.intersection(*(trained_folds(d) for d in model_dirs))
        if not common:
            raise NnDiffError("the trained models share no finished fold, so their losses cannot be compared. "
                              "Fix: train the same folds (e.g. 0) for every configuration, or pass -c / -f")
        wanted = sorted(common, key=lambda f: (len(f), f))
    kept, notes = [], []
    for model_dir in model_dirs:
        missing = [f for f in wanted if f not in trained_folds(model_dir)]
        if missing:
            notes.append(f"skipped {model_dir.name}: fold(s) {', '.join(missing)} not finished")
        else:
            kept.append(model_dir)
    if not kept:
        raise NnDiffError(f"no trained model has all of fold(s) {', '.join(wanted)} finished ({'; '.join(notes)}). "
                          "Fix: pass -f with folds that are trained")
    return wanted, kept, notes


def diffusion_differences(scores: Sequence[ModelScore]) -> list[str]:
    """Lines naming the models whose training diffusion settings differ from the first one's."""
    reference = scores[0]
    lines = []
    for score in scores[1:]:
        keys = sorted(k for k in set(reference.diffusion) | set(score.diffusion)
                      if reference.diffusion.get(k) != score.diffusion.get(k))
        if keys:
            lines.append(f"{Path(score.folder).name} and {Path(reference.folder).name} differ in diffusion "
                         f"{', '.join(keys)}: their validation losses are not on the same scale, so the ranking "
                         "between them is not meaningful; compare them on samples (nndiff_evaluate_folder) instead")
    return lines


def find_best_configuration(results_root: str | Path, dataset: str | int, configurations: Sequence[str] | None = None,
                            trainers: Sequence[str] | None = None, folds: Sequence[str] | None = None,
                            plans_name: str = "nnDiffPlans", criterion: str = "final",
                            preprocessed_root: str | Path | None = None, write: bool = True) -> dict[str, Any]:
    """Rank the trained models of ``dataset`` (lowest mean validation loss first); write
    ``best_configuration.json`` and ``inference_instructions.txt`` into the results dataset folder."""
    from nndiff.training.api import find_preprocessed_dataset

    if criterion not in CRITERIA:
        raise NnDiffError(f"unknown criterion {criterion!r}. Fix: use one of {', '.join(CRITERIA)}")
    dataset_dir = find_preprocessed_dataset(Path(results_root), dataset)  # same DatasetXXX_ lookup
    preprocessed_dir = Path(preprocessed_root) / dataset_dir.name if preprocessed_root is not None else None
    if preprocessed_dir is not None and not preprocessed_dir.is_dir():
        preprocessed_dir = None
    chosen_folds, model_dirs, notes = choose_folds(find_model_dirs(dataset_dir, configurations, trainers, plans_name),
                                                   folds)
    scores = sorted((score_model(d, chosen_folds, criterion, preprocessed_dir) for d in model_dirs),
                    key=lambda s: s.score)
    result = {"dataset": dataset_dir.name, "criterion": criterion, "folds": chosen_folds,
              "rule": f"lowest mean {criterion} validation loss over folds {' '.join(chosen_folds)} wins",
              "best": _public(scores[0]), "ranking": [_public(s) for s in scores],
              "diffusion_differences": diffusion_differences(scores), "notes": notes}
    if write:
        save_json(result, dataset_dir / RESULT_FILE)
        with atomic_path(dataset_dir / INSTRUCTIONS_FILE) as tmp:
            tmp.write_text(inference_instructions(result), encoding="utf-8")
    return result


def _public(score: ModelScore) -> dict[str, Any]:
    data = asdict(score)
    data.pop("diffusion")
    return data


def predict_command(result: dict[str, Any], with_input: bool) -> list[str]:
    """``nndiff_predict`` argv for the best model (placeholders INPUT_FOLDER / OUTPUT_FOLDER)."""
    best = result["best"]
    dataset_id = str(int(result["dataset"][len("Dataset"):].split("_")[0]))
    argv = ["nndiff_predict", *(["-i", "INPUT_FOLDER"] if with_input else []), "-o", "OUTPUT_FOLDER",
            "-d", dataset_id, "-c", best["configuration"], "-tr", best["trainer"], "-p", best["plans_name"],
            "-f", *best["folds"]]
    if result["criterion"] == "best":
        argv += ["-chk", BEST]
    if not with_input:
        argv += ["--num_samples", "100"]
    return argv


def inference_instructions(result: dict[str, Any]) -> str:
    """Text of ``inference_instructions.txt``: the choice, the ranking and commands to run."""
    best = result["best"]
    task = best["task"]
    dataset_id = str(int(result["dataset"][len("Dataset"):].split("_")[0]))
    lines = [f"Best model for {result['dataset']}: {Path(best['folder']).name} (task {task})",
             f"Rule: {result['rule']} (lower is better).", "", "Ranking (mean validation loss):"]
    lines += [f"  {Path(s['folder']).name}: {s['score']:.6g}" for s in result["ranking"]]
    for note in result["diffusion_differences"] + result["notes"]:
        lines.append(f"Note: {note}")
    lines += ["", f"Run inference (fold ensemble of folds {' '.join(best['folds'])}):"]
    generation = task == "generation"
    lines.append("  " + shlex.join(predict_command(result, with_input=not generation)))
    if task == "reconstruction":
        lines.append("  (retrospective evaluation from fully sampled images: add --simulate)")
    lines += ["", "Evaluate:"]
    if task == "denoising":
        lines.append("  denoising is evaluated with the Python API nndiff.evaluation.denoising.evaluate_denoising "
                     "(documentation/denoising.md); nndiff_evaluate_folder refuses denoising datasets")
    else:
        reference = "REFERENCE_FOLDER"  # generation: held-out images; others: reference targets / fully sampled
        lines.append("  " + shlex.join(["nndiff_evaluate_folder", reference, "OUTPUT_FOLDER", "-d", dataset_id]))
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nndiff_find_best_configuration",
        description="Rank trained configurations of a dataset by their mean validation loss over folds (lower is "
                    f"better) and write {INSTRUCTIONS_FILE} and {RESULT_FILE} into results/DatasetXXX_Name/.")
    p.add_argument("-d", dest="dataset", required=True, help="dataset id, DatasetXXX or DatasetXXX_Name")
    p.add_argument("-c", dest="configurations", nargs="+", default=None, help="configurations (default: all trained)")
    p.add_argument("-tr", dest="trainers", nargs="+", default=None, help="trainers (default: all trained)")
    p.add_argument("-p", dest="plans", default="nnDiffPlans", help="plans name (default nnDiffPlans)")
    p.add_argument("-f", dest="folds", nargs="+", default=None,
                   help="folds to compare (default: the finished folds every model has)")
    p.add_argument("--criterion", choices=CRITERIA, default="final",
                   help="final: last epoch's validation loss (checkpoint_final.pth, default); best: lowest over the "
                        "run (checkpoint_best.pth)")
    p.add_argument("--results", default=None, metavar="DIR", help="results root (default: $nnDiff_results)")
    p.add_argument("--preprocessed", default=None, metavar="DIR",
                   help="preprocessed root, for the plans (default: $nnDiff_preprocessed)")
    add_verbosity_flags(p)
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args)
    paths = resolve_paths(results=args.results, preprocessed=args.preprocessed)
    result = find_best_configuration(paths.require("results"), args.dataset, args.configurations, args.trainers,
                                     args.folds, args.plans, args.criterion, paths.preprocessed)
    print(inference_instructions(result), end="")
    return 0


def find_best_entry(argv: Sequence[str] | None = None) -> int:
    """Console script ``nndiff_find_best_configuration``."""
    return run_cli(_main, argv)
