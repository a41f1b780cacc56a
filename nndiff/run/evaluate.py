"""Entry point ``nndiff_evaluate_folder``: evaluate a folder of predictions against references.

Dispatch on dataset.json's ``task``: generation (default) compares held-out real images (REF) with
generated samples (PRED), with the memorization check against the training images (Python API
:func:`nndiff.evaluation.evaluate_generation_folders`, re-exported here for convenience);
translation compares reference with predicted targets; reconstruction compares the fully sampled
references with nndiff_predict's reconstructions (and its zero-filled / FBP baseline); anomaly
detection (REF = test lesion masks, PRED = the anomaly predictor's output folder or a folder of
strategy folders; z-score baseline from ``--training`` / ``--images``) and segmentation (REF = test
label maps, PRED = predicted label maps; ``--baseline`` = the deterministic model's predictions side by
side) go through :func:`nndiff.evaluation.folders.evaluate_task_folders`. Denoising is not evaluated
here: its protocol degrades clean images and runs the model itself
(:func:`nndiff.evaluation.denoising.evaluate_denoising`), so the command refuses denoising datasets;
an unknown ``task`` is refused with the list of known ones.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from nndiff.errors import NnDiffError
from nndiff.run.common import add_verbosity_flags, configure_logging, run_cli

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
FINGERPRINT_FILE = "dataset_fingerprint.json"


def __getattr__(name: str):
    # Lazy re-export: importing the CLI module (e.g. for --help) need not import torch.
    if name == "evaluate_generation_folders":
        from nndiff.evaluation.generation_folders import evaluate_generation_folders

        return evaluate_generation_folders
    raise AttributeError(name)


def evaluate_folder_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nndiff_evaluate_folder",
        description=(
            "Evaluate generated samples (PRED, e.g. nndiff_predict's sample_XXXX files) against held-out "
            "real images (REF, e.g. the raw dataset's imagesTs): intensity Wasserstein-1, MS-SSIM "
            "diversity, Fréchet/kernel distances (with --feature_extractor) and the memorization check "
            "against the training images. Translation datasets (dataset.json task 'translation'): REF "
            "holds reference targets and PRED predicted targets; MAE, PSNR and SSIM in original units, "
            "overall and inside a body mask, and the std-error correlation of Monte-Carlo predictions. "
            "Reconstruction datasets (task 'reconstruction'): REF holds the fully sampled images, PRED "
            "nndiff_predict's output folder; PSNR, SSIM and NMSE (fastMRI definitions, optional --crop) of the "
            "reconstructions and of the zero-filled / FBP baseline, and the data-consistency residual. "
            "Anomaly detection datasets (task 'anomaly_detection'): REF holds the test lesion masks, PRED the "
            "predictor's output folder (or one subfolder per strategy); pixel AUROC/AUPRC, best Dice, Dice at the "
            "model's threshold and case AUROC, beside the voxel-wise z-score baseline (and its global-statistics row). Segmentation datasets "
            "(task 'segmentation'): REF holds the test label maps, PRED the predicted label maps (and uncertainty "
            "maps); Dice and HD95 per label, uncertainty AUROC, and with --baseline the deterministic model "
            "side by side. Denoising datasets are evaluated with the Python API (nndiff.evaluation.denoising."
            "evaluate_denoising), not here. Writes summary.json and prints a short table."
        ),
    )
    p.add_argument("reference", type=Path, metavar="REF",
                   help="held-out real images (translation: reference targets; reconstruction: fully sampled images; "
                        "anomaly detection: lesion masks; segmentation: label maps)")
    p.add_argument("prediction", type=Path, metavar="PRED",
                   help="generated samples (other families: nndiff_predict's output folder)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-d", metavar="ID", help="dataset id or folder name in the raw root (reads its dataset.json)")
    source.add_argument("--dataset_json", type=Path, metavar="FILE", help="a dataset.json instead of -d")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                   help=f"summary file (default PRED/{SUMMARY_FILE})")
    train = p.add_mutually_exclusive_group()
    train.add_argument("--training", type=Path, default=None, metavar="DIR",
                       help="training images for the memorization check; anomaly detection: the healthy training "
                            "images of the z-score baseline (default: imagesTr beside dataset.json)")
    train.add_argument("--no_training", action="store_true", help="skip the memorization check")
    p.add_argument("--feature_extractor", type=Path, default=None, metavar="MODEL",
                   help="TorchScript (.pt) or torch.export (.pt2) model: images (B, C, *spatial) -> features (B, F); "
                        "without it Fréchet and kernel distances are skipped")
    p.add_argument("--max_pairs", type=int, default=2000, metavar="N",
                   help="image pairs for MS-SSIM diversity (seeded subset above N; default 2000)")
    p.add_argument("--near_copy_ssim", type=float, default=None, metavar="S",
                   help="SSIM at or above which a sample counts as a near-copy of a training image (default 0.95)")
    p.add_argument("--memorization_candidates", type=int, default=32, metavar="K",
                   help="training images scored with SSIM per sample (correlation-ranked; 0 = all; default 32)")
    p.add_argument("--data_range", type=float, default=None, metavar="L",
                   help="SSIM data range in original units (default: fingerprint percentiles, else REF max - min)")
    p.add_argument("--fingerprint", type=Path, default=None, metavar="FILE",
                   help="dataset_fingerprint.json for the data range (default: preprocessed/DatasetXXX/ when set)")
    p.add_argument("--crop", type=_positive_int, nargs=2, default=None, metavar=("H", "W"),
                   help="reconstruction datasets only: centre-crop both images to H x W before the metrics "
                        "(fastMRI knee: 320 320; default: no crop)")
    p.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="anomaly detection only: the test images of REF's cases, for the z-score baseline "
                        "(default: imagesTs beside dataset.json)")
    p.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                   help="segmentation only: the deterministic baseline's prediction folder, evaluated side by side "
                        "(summary 'deterministic_baseline' and 'comparison')")
    paths = p.add_argument_group("folders (flag > environment variable)")
    paths.add_argument("--raw", default=None, metavar="DIR", help="raw data root (default: $nnDiff_raw)")
    paths.add_argument("--preprocessed", default=None, metavar="DIR",
                       help="preprocessed root, for the fingerprint (default: $nnDiff_preprocessed; optional)")
    add_verbosity_flags(p)
    return p


def _positive_int(text: str) -> int:
    """argparse ``type=`` for --crop sizes (error -> ``argument --crop: ...``, exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _dataset_files(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """``(dataset.json, fingerprint or None)`` from -d (raw root) or --dataset_json."""
    from nndiff.dataset import find_dataset_folder
    from nndiff.paths import resolve_paths

    if args.dataset_json is not None:
        return args.dataset_json, args.fingerprint
    paths = resolve_paths(raw=args.raw, preprocessed=args.preprocessed)
    raw_dir = find_dataset_folder(paths.require("raw"), args.d)
    fingerprint = args.fingerprint
    if fingerprint is None and paths.preprocessed is not None:
        candidate = paths.preprocessed / raw_dir.name / FINGERPRINT_FILE
        fingerprint = candidate if candidate.is_file() else None
    return raw_dir / "dataset.json", fingerprint


def _training_dir(args: argparse.Namespace, dataset_json: Path) -> Path | None:
    """--training, else the dataset's imagesTr when it exists (None with --no_training)."""
    if args.no_training:
        return None
    if args.training is not None:
        return args.training
    default = dataset_json.parent / "imagesTr"
    if default.is_dir():
        return default
    logger.info("no --training and no %s: memorization check skipped", default)
    return None


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(summary: dict) -> str:
    """Short human-readable table of the main numbers of a generation summary."""
    m, skipped = summary["metrics"], summary["skipped"]
    diversity = m["ms_ssim_diversity"]
    mem, ref = m["memorization"], m["memorization_reference_real"]
    rows = [
        ("images", f"{m['num_samples']} samples, {m['num_real_heldout']} held-out real, "
                   f"{m['num_training']} training"),
        ("SSIM data range", f"{_fmt(m['data_range'])} ({summary['settings']['data_range_source']})"),
        ("intensity W1 (mean over channels)", _fmt(m["intensity_wasserstein1"]["mean"])),
        ("MS-SSIM diversity samples / real", " / ".join(
            _fmt(d["mean"]) if d else "-" for d in (diversity["samples"], diversity["real_heldout"]))),
        ("Fréchet distance", _fmt(m["frechet_distance"])),
        ("kernel distance (KID)", _fmt(m["kernel_distance"]["mean"]) if m["kernel_distance"] else "-"),
    ]
    if mem:
        line = (f"{_fmt(mem['near_copy_rate'])} ({len(mem['near_copy_indices'])} of {m['num_samples']} "
                f"with SSIM >= {mem['threshold']}), max SSIM {_fmt(mem['max_ssim'])}")
        if ref:
            line += f"; held-out real: rate {_fmt(ref['near_copy_rate'])}, max SSIM {_fmt(ref['max_ssim'])}"
        rows.append(("memorization: near-copy rate", line))
    else:
        rows.append(("memorization: near-copy rate", "-"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    lines += [f"skipped {metric}: {reason}" for metric, reason in skipped.items()]
    return "\n".join(lines)


#: Flags that only mean something for generation evaluation (refused for translation datasets).
GENERATION_ONLY_FLAGS = ("training", "no_training", "feature_extractor", "max_pairs", "near_copy_ssim",
                         "memorization_candidates", "fingerprint")
#: Flags of the anomaly-detection and segmentation evaluations (refused for the other families).
TASK_FOLDER_FLAGS = ("images", "baseline")
#: dataset.json tasks this command knows (denoising only to refuse it with the API to use).
KNOWN_TASKS = ("generation", "translation", "reconstruction", "denoising", "anomaly_detection", "segmentation")


def refuse_flags(args: argparse.Namespace, names: Sequence[str], dataset_json: Path, task: str,
                 applies_to: str, accepted: str) -> None:
    """Refuse flags (argparse dests) that differ from their defaults: they mean nothing for ``task``."""
    defaults = evaluate_folder_parser().parse_args([str(args.reference), str(args.prediction), "-d", "0"])
    given = [f"--{name}" for name in names if getattr(args, name) != getattr(defaults, name)]
    if given:
        raise NnDiffError(f"{', '.join(given)} only apply to {applies_to}, but {dataset_json} has task "
                          f"'{task}'. Fix: drop them ({task} takes {accepted})")


def _evaluate_translation(args: argparse.Namespace, dataset_json: Path, output: Path) -> None:
    """Translation datasets: REF holds reference targets (e.g. targetsTs), PRED the predicted targets
    (nndiff.evaluation.translation). Generation-only flags are refused, not ignored."""
    from nndiff.evaluation.translation import evaluate_translation_folders, format_translation_table

    refuse_flags(args, GENERATION_ONLY_FLAGS, dataset_json, "translation", "generation datasets",
                 "--data_range and -o")
    refuse_flags(args, ("crop",), dataset_json, "translation", "reconstruction datasets", "--data_range and -o")
    refuse_flags(args, TASK_FOLDER_FLAGS, dataset_json, "translation", "anomaly detection / segmentation datasets",
                 "--data_range and -o")

    summary = evaluate_translation_folders(args.reference, args.prediction, dataset_json=dataset_json,
                                           data_range=args.data_range, output_file=output)
    print(format_translation_table(summary))
    print(f"summary: {output}")


def format_reconstruction_table(summary: dict) -> str:
    """Mean PSNR / SSIM / NMSE of the reconstructions and the baseline, and the DC residual."""
    mean = summary["mean"]
    crop = f", crop {'x'.join(map(str, summary['crop']))}" if summary["crop"] else ""
    lines = [f"{summary['num_cases']} case(s){crop}",
             f"{'':<26}{'PSNR':>10}{'SSIM':>10}{'NMSE':>10}"]
    for name, key in (("reconstruction", "reconstruction"), ("baseline (zero-filled/FBP)", "baseline")):
        if key in mean:
            row = mean[key]
            lines.append(f"{name:<26}{_fmt(row['psnr']):>10}{_fmt(row['ssim']):>10}{_fmt(row['nmse']):>10}")
    if "psnr_gain_over_baseline" in mean:
        lines.append(f"PSNR gain over baseline: {_fmt(mean['psnr_gain_over_baseline'])} dB")
    if "dc_residual" in mean:
        lines.append(f"relative data-consistency residual: {_fmt(mean['dc_residual'])}")
    return "\n".join(lines)


def _evaluate_reconstruction(args: argparse.Namespace, dataset_json: Path, output: Path) -> None:
    """Reconstruction datasets: REF = fully sampled images, PRED = nndiff_predict's output folder
    (nndiff.evaluation.reconstruction). Generation-only flags and --data_range (the data range is
    the reference maximum, fastMRI's definition) are refused, not ignored."""
    from nndiff.evaluation.reconstruction import evaluate_reconstruction

    refuse_flags(args, (*GENERATION_ONLY_FLAGS, "data_range"), dataset_json, "reconstruction",
                 "generation or translation datasets", "--crop and -o")
    refuse_flags(args, TASK_FOLDER_FLAGS, dataset_json, "reconstruction", "anomaly detection / segmentation datasets",
                 "--crop and -o")
    summary = evaluate_reconstruction(args.prediction, args.reference, output_file=output, crop=args.crop)
    print(format_reconstruction_table(summary))
    print(f"summary: {output}")


def _evaluate_task_folder(args: argparse.Namespace, dataset_json: Path, task: str, output: Path) -> None:
    """Anomaly detection and segmentation (nndiff.evaluation.folders.evaluate_task_folders); flags of
    other families are refused, not ignored."""
    from nndiff.evaluation.folders import evaluate_task_folders

    if task == "anomaly_detection":
        own, accepted = ("training", "images"), "--training, --images and -o"
    else:
        own, accepted = ("baseline",), "--baseline and -o"
    for names, applies_to in ((GENERATION_ONLY_FLAGS, "generation datasets"),
                              (("data_range",), "generation, translation datasets"),
                              (("crop",), "reconstruction datasets"),
                              (("training", "images"), "generation / anomaly detection datasets"),
                              (("baseline",), "segmentation datasets")):
        refuse_flags(args, [n for n in names if n not in own], dataset_json, task, applies_to, accepted)
    summary, table = evaluate_task_folders(task, args.reference, args.prediction, dataset_json=dataset_json,
                                           output_file=output, training_dir=args.training, images_dir=args.images,
                                           baseline=args.baseline)
    print(table)
    for method, reason in (summary.get("skipped") or {}).items():
        print(f"skipped {method}: {reason}")
    print(f"summary: {output}")


def _refuse_unknown_task(dataset_json: Path, task: object) -> None:
    raise NnDiffError(f"{dataset_json}: task is {task!r}, which nndiff_evaluate_folder does not know (known: "
                      f"{', '.join(KNOWN_TASKS)}). Fix: set dataset.json \"task\" to one of them")


def _refuse_denoising(dataset_json: Path) -> None:
    raise NnDiffError(f"{dataset_json} has task 'denoising'; its evaluation degrades clean images at fixed noise "
                      "levels and runs the model with each strategy, so it needs the trained model, not two "
                      "folders. Fix: use the Python API nndiff.evaluation.denoising.evaluate_denoising(predictor, "
                      "cases, output_dir) (documentation/denoising.md)")


def _evaluate_folder_body(argv: Sequence[str] | None) -> None:
    from nndiff.evaluation.generation_folders import evaluate_generation_folders
    from nndiff.evaluation.memorization import NEAR_COPY_SSIM

    args = evaluate_folder_parser().parse_args(argv)
    configure_logging(args)
    dataset_json, fingerprint = _dataset_files(args)
    output = args.output if args.output is not None else args.prediction / SUMMARY_FILE
    task = json.loads(dataset_json.read_text(encoding="utf-8")).get("task") if dataset_json.is_file() else None
    if task == "translation":
        _evaluate_translation(args, dataset_json, output)
        return
    if task == "reconstruction":
        _evaluate_reconstruction(args, dataset_json, output)
        return
    if task in ("anomaly_detection", "segmentation"):
        _evaluate_task_folder(args, dataset_json, task, output)
        return
    if task == "denoising":
        _refuse_denoising(dataset_json)
    if task is not None and task not in KNOWN_TASKS:
        _refuse_unknown_task(dataset_json, task)
    refuse_flags(args, TASK_FOLDER_FLAGS, dataset_json, "generation", "anomaly detection / segmentation datasets",
                 "the flags of --help except --crop, --images and --baseline")
    if task in (None, "generation"):  # a missing dataset.json is reported by evaluate_generation_folders
        refuse_flags(args, ("crop",), dataset_json, "generation", "reconstruction datasets",
                     "the flags of --help except --crop")
    summary = evaluate_generation_folders(
        args.reference, args.prediction,
        training_dir=_training_dir(args, dataset_json),
        dataset_json=dataset_json,
        feature_extractor=args.feature_extractor,
        fingerprint=fingerprint,
        data_range=args.data_range,
        max_pairs=args.max_pairs,
        near_copy_ssim=NEAR_COPY_SSIM if args.near_copy_ssim is None else args.near_copy_ssim,
        memorization_candidates=None if args.memorization_candidates == 0 else args.memorization_candidates,
        output_file=output,
    )
    print(format_table(summary))
    for copy in summary["near_copies"]:
        print(f"near-copy: {copy['sample']} ~ {copy['training']} (SSIM {copy['ssim']:.4f})")
    print(f"summary: {output}")


def evaluate_folder_entry(argv: Sequence[str] | None = None) -> int:
    """``nndiff_evaluate_folder``; returns the exit code (2 for user errors)."""
    return run_cli(_evaluate_folder_body, argv)


if __name__ == "__main__":
    sys.exit(evaluate_folder_entry())
