"""``nndiff_demo``: the README's main job on real MRI (the MNI152 T1 template shipped with nilearn).

Stages (each timed; see documentation/demo.md):

1. **convert**: the template becomes a 2D axial slice dataset in ``OUTPUT/raw`` (a held-out slab
   in ``imagesTs`` separated from the training slices by a gap; ``nndiff.dataset_conversion.mni152``).
2. **plan + preprocess**: fingerprint and plan as ``nndiff_plan_and_preprocess`` would, then add the
   small CPU configuration ``2d_demo`` (``inherits_from: "2d"``) and preprocess it.
3. **train**: ``GenerationTrainer`` on fold ``all`` through ``train_fold``.
4. **sample**: the generation predictor writes samples of the trained model and of the *untrained*
   network (the trained run's own initial weights), same sampler, steps and seed.
5. **evaluate**: both sample sets against the held-out slab (intensity Wasserstein-1, MS-SSIM
   diversity, memorization against the training slices), printed side by side.
6. **grid**: ``OUTPUT/demo_grid.png`` (trained, untrained, real held-out rows) and
   ``OUTPUT/demo_summary.json``.

``--smoke`` runs the same stages at a tiny scale in seconds (the test suite runs it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from nndiff.errors import NnDiffError
from nndiff.run.common import add_verbosity_flags, configure_logging, run_cli

logger = logging.getLogger(__name__)

DATASET_ID = 152
DATASET_NAME = "MNI152Demo"
TRAINER = "GenerationTrainer"
PARENT_CONFIGURATION = "2d"
CONFIGURATION = "2d_demo"
FOLD = "all"
GRID_FILE = "demo_grid.png"
SUMMARY_FILE = "demo_summary.json"
#: Folders below OUTPUT that the demo owns and replaces on every run.
OWNED_FOLDERS = ("raw", "preprocessed", "results", "samples", "evaluation")
#: Distance kept free between training and held-out slices (10 slices at 2 mm, the converter default).
GAP_MM = 20
STAGES = ("convert", "plan_preprocess", "train", "sample", "evaluate", "grid")


@dataclass(frozen=True)
class DemoSettings:
    """Everything that differs between the full demo and ``--smoke`` (documented in demo.md).

    ``spacing_mm``: in-plane spacing of the demo configuration (the template is converted at
    ``resolution_mm`` and resampled by preprocessing). The patch is not a setting: it is the
    smallest multiple of the network's total stride covering every preprocessed slice, so each
    training sample is a whole, centred slice (see :func:`covering_patch`).
    """

    resolution_mm: int
    spacing_mm: float
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[int, ...]
    norm_groups: int
    batch_size: int
    iterations: int
    iterations_per_epoch: int
    initial_lr: float
    warmup_iterations: int
    num_val_cases: int
    sampler: str
    num_sampling_steps: int
    num_samples: int
    seed: int = 12345


FULL = DemoSettings(
    resolution_mm=1, spacing_mm=4.0, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
    attention_levels=(2,), norm_groups=8, batch_size=8, iterations=1500, iterations_per_epoch=100,
    initial_lr=2e-3, warmup_iterations=50, num_val_cases=8, sampler="dpm_solver_pp_2m",
    num_sampling_steps=25, num_samples=16,
)
SMOKE = DemoSettings(
    resolution_mm=1, spacing_mm=8.0, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
    attention_levels=(1,), norm_groups=4, batch_size=2, iterations=4, iterations_per_epoch=2,
    initial_lr=1e-3, warmup_iterations=1, num_val_cases=2, sampler="dpm_solver_pp_2m",
    num_sampling_steps=3, num_samples=2,
)


# --------------------------------------------------------------------------- configuration


def snr_shift_for(patch_size: Sequence[int]) -> float:
    """The planner's schedule-shift rule for this patch: sqrt(prod(side / 64)), never below 1."""
    return round(max(1.0, math.sqrt(math.prod(s / 64.0 for s in patch_size))), 6)


def demo_configuration(settings: DemoSettings) -> dict[str, Any]:
    """The small CPU configuration, stored in the plans as ``2d_demo`` (``inherits_from: "2d"``).

    Only the keys that differ from the planned ``2d`` configuration are stored; ``reasons`` say
    why (``nndiff_plan_experiment --explain`` shows them). ``patch_size`` and ``diffusion.snr_shift``
    are filled in after preprocessing by :func:`finish_configuration`.
    """
    levels = len(settings.channel_mult)
    spacing = [settings.spacing_mm, settings.spacing_mm]
    return {
        "inherits_from": PARENT_CONFIGURATION,
        "data_identifier": f"nnDiffPlans_{CONFIGURATION}",
        "spacing": spacing,
        "batch_size": settings.batch_size,
        "network": {
            "model_channels": settings.model_channels, "channel_mult": list(settings.channel_mult),
            "strides": [[2, 2]] * (levels - 1), "num_res_blocks": settings.num_res_blocks,
            "attention_levels": list(settings.attention_levels), "num_head_channels": settings.model_channels,
            "norm_groups": settings.norm_groups, "dropout": 0.0,
        },
        "diffusion": {"sampler": settings.sampler, "num_sampling_steps": settings.num_sampling_steps},
        "training": {
            "num_iterations_per_epoch": settings.iterations_per_epoch,
            "num_epochs": max(1, math.ceil(settings.iterations / settings.iterations_per_epoch)),
            "initial_lr": settings.initial_lr, "warmup_iterations": settings.warmup_iterations,
            "num_val_cases": settings.num_val_cases, "augmentation": "none",
            "progress_every_epochs": max(1, math.ceil(settings.iterations / settings.iterations_per_epoch)),
        },
        "reasons": {
            "spacing": f"{settings.spacing_mm:g} mm in-plane: a brain slice of about "
                       f"{round(180 / settings.spacing_mm)} pixels across, enough to show cortex, white "
                       "matter and ventricles at a fraction of the 2 mm cost on a CPU",
            "batch_size": f"{settings.batch_size}: small enough for one CPU step per fraction of a second",
            "network": f"{settings.model_channels} channels x {list(settings.channel_mult)}, "
                       f"{settings.num_res_blocks} residual block per level, attention only at the deepest "
                       "level, no dropout: a short CPU run learns the template, it does not overfit it",
            "diffusion": f"{settings.sampler} with {settings.num_sampling_steps} steps (planned sampler; "
                         "DPM-Solver++ needs few steps)",
            "training": f"{settings.iterations} iterations at lr {settings.initial_lr:g} (AdamW, cosine decay, "
                        f"{settings.warmup_iterations} warmup): a brief CPU run; no augmentation, whole "
                        "centred slices",
        },
    }


def covering_patch(shapes: Sequence[Sequence[int]], divisor: Sequence[int]) -> list[int]:
    """Smallest patch that is a multiple of ``divisor`` per axis and covers every shape.

    The trainer centres a slice that is smaller than the patch and pads it with background, so
    with this patch every training sample is one whole slice in one consistent position.
    """
    largest = np.max(np.asarray(shapes, dtype=int), axis=0)
    return [int(math.ceil(n / d) * d) for n, d in zip(largest.tolist(), divisor)]


def finish_configuration(plans: dict, preprocessed_dir: Path) -> list[int]:
    """Set the demo configuration's ``patch_size`` (and its schedule shift) from the
    preprocessed slices; returns the patch."""
    from nndiff.networks.config import parse_network_config
    from nndiff.planning import resolve_configuration
    from nndiff.utils.files import load_json

    config = plans["configurations"][CONFIGURATION]
    folder = preprocessed_dir / config["data_identifier"]
    shapes = [load_json(path)["shape_after_resampling"][1:] for path in sorted(folder.glob("*.json"))]
    if not shapes:
        raise NnDiffError(f"no preprocessed slices in {folder}. Fix: re-run nndiff_demo")
    network = resolve_configuration(plans, CONFIGURATION)["network"]
    divisor = parse_network_config(network).shape_divisor
    patch = covering_patch(shapes, divisor)
    config["patch_size"] = patch
    config.setdefault("diffusion", {})["snr_shift"] = snr_shift_for(patch)
    config["reasons"]["patch_size"] = (f"{patch}: the smallest multiple of the network stride {list(divisor)} "
                                       f"covering every preprocessed slice (largest {np.max(shapes, 0).tolist()}), "
                                       "so each training sample is a whole centred slice")
    return patch


# --------------------------------------------------------------------------- stages


class StageTimer:
    """Wall time per named stage (seconds), printed as the demo goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name`` and print its duration."""
        start = time.perf_counter()
        print(f"[nndiff_demo] {name} ...", flush=True)
        yield
        self.seconds[name] = time.perf_counter() - start
        print(f"[nndiff_demo] {name} done in {self.seconds[name]:.1f} s", flush=True)

    @property
    def total(self) -> float:
        return time.perf_counter() - self._start


def prepare_output(output: Path) -> None:
    """Remove what an earlier demo run wrote into ``output`` (only the demo's own folders/files)."""
    output.mkdir(parents=True, exist_ok=True)
    for name in OWNED_FOLDERS:
        if (output / name).exists():
            shutil.rmtree(output / name)
    for name in (GRID_FILE, SUMMARY_FILE):
        (output / name).unlink(missing_ok=True)


def convert_stage(paths: Any, settings: DemoSettings) -> Path:
    """MNI152 -> 2D axial slices (held-out slab in imagesTs); returns the raw dataset folder."""
    from nndiff.dataset_conversion.mni152 import convert_mni152

    return convert_mni152(paths.raw, DATASET_ID, mode="2d_slices", axis="axial", resolution=settings.resolution_mm,
                          gap=round(GAP_MM / settings.resolution_mm), name=DATASET_NAME)


def plan_and_preprocess_stage(paths: Any, settings: DemoSettings) -> tuple[dict, Path]:
    """Fingerprint, plan, add ``2d_demo``, preprocess it, set its patch; returns (plans, folder)."""
    from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
    from nndiff.utils.files import load_json, save_json

    location = locate_dataset(DATASET_ID, paths)
    extract_fingerprint_step(location, num_processes=1, verify_dataset_integrity=True)
    plans = plan_step(location)
    plans["configurations"][CONFIGURATION] = demo_configuration(settings)
    save_json(plans, location.plans_file())
    preprocess_step(location, configurations=[CONFIGURATION])
    plans = load_json(location.plans_file())  # with the measured clip fractions
    finish_configuration(plans, location.preprocessed_dir)
    save_json(plans, location.plans_file())
    return plans, location.preprocessed_dir


def train_stage(paths: Any, settings: DemoSettings, device: str) -> Path:
    """Train ``2d_demo`` on fold ``all``; returns the model folder (parent of ``fold_all``)."""
    from nndiff.training.api import train_fold

    trainer = train_fold(DATASET_ID, CONFIGURATION, FOLD, paths, trainer=TRAINER, iterations=settings.iterations,
                         device=device, num_workers=0, seed=settings.seed)
    return trainer.output_dir.parent


def untrained_network(configuration: dict, seed: int) -> Any:
    """The network exactly as the trainer built it before its first step (same seed, same builder)."""
    from nndiff.networks import build_network
    from nndiff.training.rng import seed_everything

    seed_everything(seed)  # Trainer.initialize seeds like this right before build_network
    return build_network(configuration["network"])


def sample_stage(model_dir: Path, preprocessed_dir: Path, output: Path, settings: DemoSettings,
                 device: str) -> tuple[Any, dict[str, Path]]:
    """Samples of the trained model and of the untrained network, same sampler/steps/seed.

    Returns the trained predictor (for the reference grid) and the two sample folders.
    """
    from nndiff.inference.registry import predictor_class_for

    predictor_class = predictor_class_for(TRAINER)
    trained = predictor_class.from_model_folder(model_dir, folds=(FOLD,), device=device,
                                                preprocessed_dir=preprocessed_dir)
    network = untrained_network(trained.configuration, settings.seed).to(trained.device).eval()
    untrained = predictor_class(trained.plans, CONFIGURATION, trained.dataset_json, [network], device=trained.device,
                                model_info={"model": "untrained (initial weights of the trained run)"},
                                checkpoint_states=trained.checkpoint_states)
    folders = {"trained": output / "samples" / "trained", "untrained": output / "samples" / "untrained"}
    for name, predictor in (("trained", trained), ("untrained", untrained)):
        predictor.generate_to_folder(folders[name], settings.num_samples, seed=settings.seed)
    return trained, folders


# --------------------------------------------------------------------------- evaluation


def read_image_folder(folder: Path, file_ending: str) -> list[np.ndarray]:
    """Every image ``*{file_ending}`` of ``folder`` (sorted) as a ``(C, Y, X)`` array (2D data)."""
    from nndiff.dataset.io import read_images

    files = sorted(folder.glob(f"*{file_ending}"))
    if not files:
        raise NnDiffError(f"no {file_ending} images in {folder}")
    return [read_images([path])[0][:, 0] for path in files]


def centre_in_patch(data: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """A preprocessed 2D case ``(C, 1, Y, X)`` centred in ``patch`` as ``(C, *patch)``, padded with
    its per-channel minimum (cropped centrally on an axis where it is larger): the placement the
    trainer gives a slice that is smaller than the patch."""
    image = data[:, 0]
    fill = image.reshape(image.shape[0], -1).min(axis=1)
    out = np.broadcast_to(fill[:, None, None], (image.shape[0], *patch)).astype(np.float32)
    src, dst = [slice(None)], [slice(None)]
    for size, target in zip(image.shape[1:], patch):
        offset = abs(target - size) // 2
        inner = slice(offset, offset + min(size, target))
        src.append(inner if size > target else slice(None))
        dst.append(inner if size <= target else slice(None))
    out[tuple(dst)] = image[tuple(src)]
    return out


def write_reference_folders(predictor: Any, preprocessed_dir: Path, raw_dir: Path, output: Path) -> dict[str, Path]:
    """Real held-out and training slices on the samples' grid, written like samples.

    The generated samples are whole slices on the demo grid (4 mm, patch-sized); the raw slices
    are 2 mm and larger, so comparing them directly would compare different pixel sizes. Held-out
    slices therefore go through the plan's preprocessing (crop, resampling) as a prediction input
    would, training slices are the preprocessed cases the model saw; both are centred in the patch
    as the trainer does and written back through the predictor's own inverse (original units,
    same geometry as samples). Returns ``{"real_heldout": folder, "real_training": folder}``.
    """
    from nndiff.dataset.io import read_images
    from nndiff.inference.files import write_output
    from nndiff.preprocessing.case_io import load_case

    patch = predictor.configuration["patch_size"]
    case_json = predictor.generated_geometry(patch)
    ending = predictor.file_ending
    folders = {"real_heldout": output / "evaluation" / "real_heldout",
               "real_training": output / "evaluation" / "real_training"}

    def write(data: np.ndarray, folder: Path, identifier: str) -> None:
        array, properties = predictor.invert(centre_in_patch(data, patch)[:, None], case_json)
        write_output(array, properties, folder, identifier, ending)

    heldout = sorted((raw_dir / "imagesTs").glob(f"*_0000{ending}"))
    if not heldout:
        raise NnDiffError(f"no held-out slices in {raw_dir / 'imagesTs'}")
    for path in heldout:
        identifier = path.name[: -len(f"_0000{ending}")]
        images, properties = read_images([path])
        write(predictor.prepare_case(images, properties, identifier).data, folders["real_heldout"], identifier)
    data_folder = preprocessed_dir / predictor.configuration["data_identifier"]
    for path in sorted(data_folder.glob("*.npz")):
        write(load_case(data_folder, path.stem)[0]["data"], folders["real_training"], path.stem)
    return folders


def evaluate_stage(samples: dict[str, Path], references: dict[str, Path], raw_dir: Path,
                   preprocessed_dir: Path, output: Path) -> dict[str, dict]:
    """``evaluate_generation_folders`` of each sample folder against the same references, data
    range from the dataset fingerprint (the same for both models); summaries in OUTPUT/evaluation."""
    from nndiff.evaluation.generation_folders import evaluate_generation_folders

    return {name: evaluate_generation_folders(
                references["real_heldout"], folder, training_dir=references["real_training"],
                dataset_json=raw_dir / "dataset.json", fingerprint=preprocessed_dir / "dataset_fingerprint.json",
                output_file=output / "evaluation" / f"{name}.json")
            for name, folder in samples.items()}


def real_floor_w1(references: dict[str, Path], file_ending: str) -> float:
    """Intensity W1 between the real training and held-out slices: about what a model that
    reproduces its training distribution perfectly would score."""
    from nndiff.evaluation import intensity_wasserstein

    return float(intensity_wasserstein(read_image_folder(references["real_training"], file_ending),
                                       read_image_folder(references["real_heldout"], file_ending))["mean"])


# --------------------------------------------------------------------------- report


#: (label, path into the evaluation dict, format) of the printed comparison table.
TABLE_ROWS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("intensity W1 to held-out (training slices: {ref_w1})", ("metrics", "intensity_wasserstein1", "mean"),
     "{:.2f}"),
    ("MS-SSIM between samples, lower = more diverse (real: {ref})", ("metrics", "ms_ssim_diversity", "samples"),
     "{:.3f}"),
    ("SSIM to nearest training slice, mean (real: {ref_mem})", ("metrics", "memorization", "mean_nearest_ssim"),
     "{:.3f}"),
    ("near-copy rate (memorization)", ("metrics", "memorization", "near_copy_rate"), "{:.2f}"),
)


def _lookup(values: dict, keys: Sequence[str]) -> Any:
    for key in keys:
        if not isinstance(values, dict) or key not in values:
            return None
        values = values[key]
    return values


def _scalar(value: Any) -> float | None:
    """A metric entry as one number (dict entries carry their ``mean``/``value``)."""
    if isinstance(value, dict):
        for key in ("mean", "value", "median"):
            if key in value:
                return _scalar(value[key])
        return None
    return None if value is None else float(value)


def comparison_table(evaluations: dict[str, dict], floor_w1: float | None = None) -> str:
    """Trained vs untrained, one metric per row; the labels carry the real-data reference values
    (``floor_w1``: W1 between the training and the held-out slices, where a model of the training
    slices lands; the held-out slab shows other anatomy, so lower is not simply better)."""
    trained = evaluations["trained"]
    references = {
        "ref_w1": floor_w1,
        "ref": _scalar(_lookup(trained, ("metrics", "ms_ssim_diversity", "real_heldout"))),
        "ref_mem": _scalar(_lookup(trained, ("metrics", "memorization_reference_real", "mean_nearest_ssim"))),
    }
    texts = {key: "n/a" if value is None else f"{value:.3g}" for key, value in references.items()}
    lines = [f"{'metric':<60} {'trained':>9} {'untrained':>9}", "-" * 80]
    for label, keys, fmt in TABLE_ROWS:
        cells = []
        for name in ("trained", "untrained"):
            value = _scalar(_lookup(evaluations[name], keys))
            cells.append("n/a" if value is None else fmt.format(value))
        lines.append(f"{label.format(**texts):<60} {cells[0]:>9} {cells[1]:>9}")
    return "\n".join(lines)


def write_grid(path: Path, folders: dict[str, Path], real_dir: Path, window: tuple[float, float],
               file_ending: str, num_columns: int) -> None:
    """PNG with one labelled row each: trained samples, untrained samples, real held-out slices."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from nndiff.training.progress import image_grid
    from nndiff.utils.files import atomic_path

    rows = {
        "trained model": read_image_folder(folders["trained"], file_ending)[:num_columns],
        "untrained model": read_image_folder(folders["untrained"], file_ending)[:num_columns],
        "real held-out slices": _spread(read_image_folder(real_dir, file_ending), num_columns),
    }
    figure = Figure(figsize=(1.2 * num_columns + 0.5, 4.2), dpi=120)
    for index, (title, images) in enumerate(rows.items()):
        axis = figure.add_subplot(len(rows), 1, index + 1)
        axis.imshow(image_grid(np.stack(images), window, ncols=num_columns), cmap="gray", vmin=0, vmax=255)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def _spread(images: list[np.ndarray], count: int) -> list[np.ndarray]:
    """Up to ``count`` images evenly spread over the list (the held-out slab from bottom to top)."""
    indices = np.unique(np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int))
    return [images[i] for i in indices]


# --------------------------------------------------------------------------- driver


def run_demo(output: Path, settings: DemoSettings = FULL, device: str = "cpu") -> dict[str, Any]:
    """Run every stage into ``output``; returns the summary written to ``demo_summary.json``."""
    from nndiff.paths import Paths
    from nndiff.utils.files import save_json

    output = Path(output)
    prepare_output(output)
    paths = Paths(raw=output / "raw", preprocessed=output / "preprocessed", results=output / "results")
    timer = StageTimer()
    with timer.stage("convert"):
        raw_dir = convert_stage(paths, settings)
    with timer.stage("plan_preprocess"):
        plans, preprocessed_dir = plan_and_preprocess_stage(paths, settings)
    with timer.stage("train"):
        model_dir = train_stage(paths, settings, device)
    with timer.stage("sample"):
        predictor, folders = sample_stage(model_dir, preprocessed_dir, output, settings, device)
    file_ending = predictor.file_ending
    patch = predictor.configuration["patch_size"]
    with timer.stage("evaluate"):
        references = write_reference_folders(predictor, preprocessed_dir, raw_dir, output)
        evaluations = evaluate_stage(folders, references, raw_dir, preprocessed_dir, output)
        floor_w1 = real_floor_w1(references, file_ending)
    with timer.stage("grid"):
        from nndiff.preprocessing.normalization import window

        window_range = window(plans["normalization"]["images"][0]) or (0.0, 255.0)
        write_grid(output / GRID_FILE, folders, references["real_heldout"], window_range, file_ending,
                   num_columns=min(8, settings.num_samples))
    summary = {
        "settings": asdict(settings),
        "device": str(predictor.device),
        "configuration": CONFIGURATION,
        "patch_size": patch,
        "dataset": str(raw_dir),
        "model_dir": str(model_dir),
        "samples": {name: str(folder) for name, folder in folders.items()},
        "references": {name: str(folder) for name, folder in references.items()},
        "grid": str(output / GRID_FILE),
        "evaluation": evaluations,
        "real_training_vs_heldout_w1": floor_w1,
        "stage_seconds": {name: round(value, 2) for name, value in timer.seconds.items()},
        "total_seconds": round(timer.total, 2),
    }
    save_json(summary, output / SUMMARY_FILE)
    return summary


def demo_parser() -> argparse.ArgumentParser:
    """Arguments of ``nndiff_demo``."""
    p = argparse.ArgumentParser(
        prog="nndiff_demo",
        description="Convert the MNI152 T1 template (shipped with nilearn) to a 2D slice dataset, plan it "
                    "with a small CPU configuration, train briefly, sample, evaluate against held-out slices "
                    "next to an untrained model, and write a PNG grid.",
    )
    p.add_argument("-o", "--output", default=Path("nndiff_demo_output"), type=Path,
                   help="working folder (default ./nndiff_demo_output); the demo's folders in it are replaced")
    p.add_argument("--smoke", action="store_true", help="tiny version for tests (seconds, meaningless numbers)")
    p.add_argument("--iterations", type=int, default=None, help=f"training iterations (default: {FULL.iterations}; smoke {SMOKE.iterations})")
    p.add_argument("--num_samples", type=int, default=None, help="samples per model (default: 16; smoke 2)")
    p.add_argument("-device", "--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="device for training and sampling (default cpu)")
    add_verbosity_flags(p)
    return p


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """The preset (full or smoke) with the command line's overrides."""
    settings = SMOKE if args.smoke else FULL
    if args.iterations is not None:
        if args.iterations < 1:
            raise NnDiffError(f"--iterations must be at least 1, got {args.iterations}")
        settings = replace(settings, iterations=args.iterations)
    if args.num_samples is not None:
        if args.num_samples < 2:
            raise NnDiffError(f"--num_samples must be at least 2 (diversity needs pairs), got {args.num_samples}")
        settings = replace(settings, num_samples=args.num_samples)
    return settings


def print_report(summary: dict[str, Any], output: Path) -> None:
    """The comparison table, stage times and where the outputs are."""
    print()
    print(f"nnDiff demo: MNI152 axial slices, configuration {CONFIGURATION} (patch {summary['patch_size']}), "
          f"{summary['settings']['iterations']} iterations on {summary['device']}, "
          f"{summary['settings']['num_samples']} samples per model")
    print(comparison_table(summary["evaluation"], summary["real_training_vs_heldout_w1"]))
    print()
    print("wall time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary["stage_seconds"].items()))
    print(f"total {summary['total_seconds']:.1f} s")
    print(f"grid: {(output / GRID_FILE).resolve()}")
    print(f"summary: {(output / SUMMARY_FILE).resolve()}")


def _demo_body(argv: Sequence[str] | None) -> None:
    args = demo_parser().parse_args(argv)
    configure_logging(args)
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    settings = settings_from_args(args)
    summary = run_demo(args.output, settings, device=args.device)
    print_report(summary, args.output)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``nndiff_demo``; returns the exit code."""
    return run_cli(_demo_body, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
