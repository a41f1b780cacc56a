"""``nndiff_predict``: predict new cases (``-i``) or generate samples (no ``-i``; conditional models
with ``--condition KEY=VALUE`` and ``--guidance_scale``) with a trained model.

Family flags (``-i`` only) go to the family predictor's constructor or prediction call:
reconstruction (``--simulate``, ``--acceleration``, ``--center_fraction``, ``--mask_pattern``,
``--num_views``, ``--dc``, ``--dc_scale``, ``--no_warm_start``), denoising (``--strategy``,
``--warm_start_condition``, ``--noise_sigma``), anomaly detection (``--anomaly_strategy``,
``--start_fraction``, ``--classifier_dir``, ``--classifier_scale``, ``--threshold``,
``--smoothing_sigma``, ``--calibrate_threshold``; ``--guidance_scale`` with ``-i`` is the cdpm
guidance) and segmentation (``--fusion``, ``--uncertainty``). A flag of one family given for a model
of another is refused (exit code 2, naming the flag and the model's family), as is a flag that would
have no effect in the chosen mode (e.g. ``--acceleration`` without ``--simulate``, ``--classifier_dir``
with the anoddpm strategy): nothing is ignored.

``--num_samples`` with ``-i``: absent, predictors that plan their own sample count (segmentation's
ensemble size K, anomaly detection's ``num_reconstructions``) use the plan's; the others draw one.

Flags as in documentation/cli.md. The console-script line for setup.py is
``nndiff_predict=nndiff.inference.cli:predict_entry``.
"""
from __future__ import annotations

import argparse
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from nndiff.errors import NnDiffError
from nndiff.inference.predictor import DEFAULT_CHECKPOINT, FOLD_ENSEMBLE_MODES
from nndiff.inference.registry import predictor_class_for
from nndiff.run.common import add_path_flags, add_verbosity_flags, configure_logging, paths_from_args, run_cli

# Choices of the family options (kept equal to the predictors' lists by tests/inference/test_family_cli.py;
# spelled out here so --help does not import the family modules).
DC_CHOICES = ("projection", "dps", "mcg")
MASK_PATTERN_CHOICES = ("equispaced", "random", "gaussian")
STRATEGY_CHOICES = ("conditional", "warm_start")
WARM_START_CONDITION_CHOICES = ("null", "noisy")
ANOMALY_STRATEGY_CHOICES = ("anoddpm", "wolleb", "cdpm")
FUSION_CHOICES = ("mean", "staple")
UNCERTAINTY_CHOICES = ("entropy", "variance")
RECONSTRUCTION = "reconstruction"
DENOISING = "denoising"
ANOMALY = "anomaly_detection"
SEGMENTATION = "segmentation"
#: Trainers whose model folders are a stage or helper of another model (the latent model's autoencoder,
#: the wolleb strategy's noisy classifier), never a model to predict with: -tr is not inferred from them.
AUXILIARY_TRAINERS = ("AutoencoderTrainer", "AnomalyClassifierTrainer")


def bounded_number(kind: type, low: float, high: float = math.inf, low_inclusive: bool = True,
                   high_inclusive: bool = True, hint: str = "") -> Callable[[str], Any]:
    """argparse ``type=``: parse ``kind`` (int/float) and require it finite and inside the interval;
    argparse turns the error into ``argument --flag: ...`` and exit code 2."""
    interval = (f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
                if math.isfinite(high) else f"{'>=' if low_inclusive else '>'} {low:g}")
    if not math.isfinite(low) and not math.isfinite(high):
        interval = "a finite number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        inside = (math.isfinite(value) and (value >= low if low_inclusive else value > low)
                  and (value <= high if high_inclusive else value < high))
        if not inside:
            raise argparse.ArgumentTypeError(f"must be {interval}{hint}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nndiff_predict",
        description="Predict the cases of -i (outputs in the input's format, geometry and units) or, without "
                    "-i, generate --num_samples samples (spacing from the plan, origin 0, identity direction; "
                    "conditional models take --condition KEY=VALUE and --guidance_scale). Reconstruction and "
                    "denoising models take the family flags below (with -i); a family's flag given for a model "
                    "of another family is refused.")
    parser.add_argument("-i", dest="input", default=None,
                        help="folder of {CASE}_{XXXX}{ending} input files (reconstruction: {CASE}.npz / {CASE}.h5 "
                             "measurements with {CASE}.json sidecars, or fully sampled images with --simulate)")
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
    parser.add_argument("--fold_ensemble", choices=FOLD_ENSEMBLE_MODES, default=None,
                        help="several folds (-f): 'prediction' = each fold samples on its own and the outputs are "
                             "averaged (std over folds x samples); generation draws sample i from fold i mod F; "
                             "'step' = fold outputs averaged at every sampler step. Default: prediction, step for "
                             "generation models; recorded in prediction_info.json (with one fold it changes nothing)")
    parser.add_argument("--condition", action="append", default=None, metavar="KEY=VALUE",
                        help="generation (no -i) with a conditional model: a condition of dataset.json 'conditions' "
                             "for every sample, e.g. --condition shape=disk --condition size=6.5 (repeat for each "
                             "key; all keys or none)")
    parser.add_argument("--guidance_scale", type=bounded_number(float, 0.0), default=None,
                        help="classifier-free guidance scale for conditional generation, or with -i for the cdpm "
                             "anomaly strategy (default: the plan's; 1 = no guidance)")
    parser.add_argument("--shape", nargs="+", default=None, metavar="SIZE",
                        help="generation (no -i): sample shape on the configuration's grid, 'patch' (default), "
                             "'median' (the plan's median image) or the sizes (Y X for 2D, Z Y X for 3D)")
    add_reconstruction_flags(parser)
    add_denoising_flags(parser)
    add_anomaly_flags(parser)
    add_segmentation_flags(parser)
    add_path_flags(parser)
    add_verbosity_flags(parser)
    return parser


def add_reconstruction_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of reconstruction models (ReconstructionPredictor); all default to None / off."""
    group = parser.add_argument_group(
        "reconstruction models (with -i)",
        "-i holds {CASE}.npz / {CASE}.h5 measurements with {CASE}.json sidecars, or with --simulate fully "
        "sampled images {CASE}_0000{ending} that are undersampled on the fly (seeded per case)")
    group.add_argument("--simulate", action="store_true",
                       help="-i holds fully sampled images; simulate the measurements (retrospective evaluation)")
    group.add_argument("--acceleration", type=bounded_number(float, 1.0, hint=" (1 = fully sampled)"),
                       default=None, metavar="R",
                       help="with --simulate, MRI: acceleration (default: dataset.json 'reconstruction', else 4)")
    group.add_argument("--center_fraction", type=bounded_number(float, 0.0, 1.0), default=None, metavar="F",
                       help="with --simulate, MRI: fully sampled centre fraction of the columns (default: "
                            "dataset.json, else 0.08)")
    group.add_argument("--mask_pattern", choices=MASK_PATTERN_CHOICES, default=None,
                       help="with --simulate, MRI: Cartesian mask pattern (default: dataset.json 'mask_type', else "
                            "random)")
    group.add_argument("--num_views", type=bounded_number(int, 1), default=None, metavar="N",
                       help="with --simulate, CT: number of projection views (default: dataset.json, else 60)")
    group.add_argument("--dc", choices=DC_CHOICES, default=None,
                       help="data consistency in every step: projection (default; k-space replacement / POCS), "
                            "dps (likelihood gradient) or mcg (gradient + projection)")
    group.add_argument("--dc_scale", type=bounded_number(float, 0.0, low_inclusive=False), default=None,
                       metavar="S", help="step size of the dps / mcg gradient (default 1; needs --dc dps or mcg)")
    group.add_argument("--no_warm_start", action="store_true",
                       help="start from pure noise instead of the zero-filled / FBP image at the plan's t0")


def add_denoising_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of denoising models (DenoisingPredictor); all default to None."""
    group = parser.add_argument_group("denoising models (with -i)")
    group.add_argument("--strategy", choices=STRATEGY_CHOICES, default=None,
                       help="conditional (default: sample conditioned on the noisy image) or warm_start (start the "
                            "reverse process from the noisy image at the t0 matching its noise level)")
    group.add_argument("--warm_start_condition", choices=WARM_START_CONDITION_CHOICES, default=None,
                       help="with --strategy warm_start: null condition (default; image prior only) or the noisy "
                            "image as condition too")
    group.add_argument("--noise_sigma", type=bounded_number(float, 0.0, low_inclusive=False), default=None,
                       metavar="S",
                       help="with --strategy warm_start: the known noise std in the model's normalised units "
                            "(default: estimated per case from the image)")


def add_anomaly_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of anomaly-detection models (AnomalyPredictor); all default to None (the plan's choice)."""
    group = parser.add_argument_group(
        "anomaly detection models (with -i)",
        "writes {CASE} anomaly map, {CASE}_mask and {CASE}_reconstruction; --num_samples K averages the map over "
        "K stochastic reconstructions (default: the plan's num_reconstructions); --guidance_scale sets the cdpm "
        "guidance")
    group.add_argument("--anomaly_strategy", choices=ANOMALY_STRATEGY_CHOICES, default=None,
                       help="anoddpm (partial diffusion), wolleb (DDIM encoding + classifier guidance) or cdpm "
                            "(classifier-free counterfactual); default: the plan's / the one the model was trained for")
    group.add_argument("--start_fraction", type=bounded_number(float, 0.0, 1.0, low_inclusive=False), default=None,
                       metavar="F",
                       help="t_lambda as a fraction of the noise schedule, in (0, 1] (default: the plan's)")
    group.add_argument("--classifier_dir", default=None, metavar="DIR",
                       help="wolleb: the AnomalyClassifierTrainer model folder (default: the one next to the model); its "
                            "checkpoint is the -chk file name, like the diffusion model's")
    group.add_argument("--classifier_scale", type=bounded_number(float, 0.0), default=None, metavar="S",
                       help="wolleb: classifier guidance scale >= 0 (default: the plan's)")
    group.add_argument("--threshold", type=bounded_number(float, -math.inf), default=None, metavar="T",
                       help="mask = map >= T (default: the model folder's anomaly_threshold.json, else Otsu per case)")
    group.add_argument("--smoothing_sigma", type=bounded_number(float, 0.0), default=None, metavar="S",
                       help="Gaussian smoothing of the anomaly map in voxels, >= 0 (default: the plan's)")
    group.add_argument("--calibrate_threshold", nargs="+", default=None, metavar="DIR",
                       help="VAL_IMAGES [VAL_LABELS]: before predicting -i, choose the mask threshold on validation "
                            "images (best Dice against the lesion masks of VAL_LABELS, else Otsu) and store it in "
                            "the model folder's anomaly_threshold.json (used by every later prediction)")


def add_segmentation_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of segmentation models (SegmentationPredictor); all default to None (the predictor's default)."""
    group = parser.add_argument_group(
        "segmentation models (with -i)",
        "writes {CASE} label map and {CASE}_uncertainty; --num_samples K sets the ensemble size (default: the "
        "plan's num_ensemble_samples)")
    group.add_argument("--fusion", choices=FUSION_CHOICES, default=None,
                       help="how the K samples are fused: mean probability (default) or staple")
    group.add_argument("--uncertainty", choices=UNCERTAINTY_CHOICES, default=None,
                       help="uncertainty map: entropy of the fused probability (default) or variance of the samples "
                            "(needs K >= 2)")


@dataclass(frozen=True)
class FamilyFlag:
    """A family-specific flag: its argparse ``dest``, spelling, family, and the predictor constructor
    keyword it sets (None: a setting of the prediction call, e.g. simulate mode)."""

    dest: str
    flag: str
    family: str
    keyword: str | None = None


FAMILY_FLAGS = (
    FamilyFlag("simulate", "--simulate", RECONSTRUCTION),
    FamilyFlag("acceleration", "--acceleration", RECONSTRUCTION),
    FamilyFlag("center_fraction", "--center_fraction", RECONSTRUCTION),
    FamilyFlag("mask_pattern", "--mask_pattern", RECONSTRUCTION),
    FamilyFlag("num_views", "--num_views", RECONSTRUCTION),
    FamilyFlag("dc", "--dc", RECONSTRUCTION, "dc"),
    FamilyFlag("dc_scale", "--dc_scale", RECONSTRUCTION, "dc_scale"),
    FamilyFlag("no_warm_start", "--no_warm_start", RECONSTRUCTION, "warm_start"),
    FamilyFlag("strategy", "--strategy", DENOISING, "strategy"),
    FamilyFlag("warm_start_condition", "--warm_start_condition", DENOISING, "warm_start_condition"),
    FamilyFlag("noise_sigma", "--noise_sigma", DENOISING, "noise_sigma"),
    FamilyFlag("anomaly_strategy", "--anomaly_strategy", ANOMALY, "strategy"),
    FamilyFlag("start_fraction", "--start_fraction", ANOMALY, "start_fraction"),
    FamilyFlag("classifier_dir", "--classifier_dir", ANOMALY, "classifier_dir"),
    FamilyFlag("classifier_scale", "--classifier_scale", ANOMALY, "classifier_scale"),
    FamilyFlag("threshold", "--threshold", ANOMALY, "threshold"),
    FamilyFlag("smoothing_sigma", "--smoothing_sigma", ANOMALY, "smoothing_sigma"),
    FamilyFlag("calibrate_threshold", "--calibrate_threshold", ANOMALY),
    FamilyFlag("fusion", "--fusion", SEGMENTATION, "fusion"),
    FamilyFlag("uncertainty", "--uncertainty", SEGMENTATION, "uncertainty"),
)
#: Simulate-mode settings: refused without --simulate; MRI ones refused for CT models and vice versa.
MRI_SIMULATION_FLAGS = ("acceleration", "center_fraction", "mask_pattern")
CT_SIMULATION_FLAGS = ("num_views",)
#: Denoising options that only act in the warm-start strategy.
WARM_START_ONLY_FLAGS = ("warm_start_condition", "noise_sigma")
#: Anomaly options that only act in one strategy: flag dest -> that strategy.
STRATEGY_ONLY_FLAGS = {"classifier_dir": "wolleb", "classifier_scale": "wolleb", "guidance_scale": "cdpm"}


def _given(args: argparse.Namespace, dest: str) -> bool:
    value = getattr(args, dest)
    return value is not None and value is not False


def given_family_flags(args: argparse.Namespace) -> list[FamilyFlag]:
    """The family flags the user set, in FAMILY_FLAGS order."""
    return [f for f in FAMILY_FLAGS if _given(args, f.dest)]


def _spelled(dests: Sequence[str]) -> str:
    return ", ".join(f.flag for f in FAMILY_FLAGS if f.dest in dests)


def check_family_flag_combinations(args: argparse.Namespace) -> None:
    """Refuse family flags that would have no effect in the chosen mode (before any model is loaded)."""
    given = given_family_flags(args)
    if given and args.input is None:
        raise NnDiffError(f"{', '.join(f.flag for f in given)} apply to prediction with -i (reconstruction / "
                          "denoising / anomaly detection / segmentation models), not to generation. Fix: pass -i IN, "
                          "or drop them")
    if args.shape is not None and args.input is not None:
        raise NnDiffError("--shape sets the size of generated samples; with -i the outputs take each input's shape. "
                          "Fix: drop --shape, or drop -i to generate")
    simulation = [d for d in (*MRI_SIMULATION_FLAGS, *CT_SIMULATION_FLAGS) if _given(args, d)]
    if simulation and not args.simulate:
        raise NnDiffError(f"{_spelled(simulation)} set how measurements are simulated and need --simulate (-i then "
                          "holds fully sampled images). Fix: add --simulate, or drop them to reconstruct the "
                          "measurement files of -i")
    if args.dc_scale is not None and args.dc not in ("dps", "mcg"):
        raise NnDiffError(f"--dc_scale sets the gradient step of --dc dps / mcg, but data consistency is "
                          f"{args.dc or 'projection (the default)'}, which has no step size. Fix: add --dc dps or "
                          "--dc mcg, or drop --dc_scale")
    warm_only = [d for d in WARM_START_ONLY_FLAGS if _given(args, d)]
    if warm_only and args.strategy != "warm_start":
        raise NnDiffError(f"{_spelled(warm_only)} only act in the warm-start strategy, but the strategy is "
                          f"{args.strategy or 'conditional (the default)'}. Fix: add --strategy warm_start, or "
                          "drop them")
    check_anomaly_flag_combinations(args)


def check_anomaly_flag_combinations(args: argparse.Namespace) -> None:
    """--calibrate_threshold takes one or two folders and stores the threshold that --threshold would
    override; strategy-specific options need their strategy when --anomaly_strategy names one."""
    if args.calibrate_threshold is not None:
        if len(args.calibrate_threshold) > 2:
            raise NnDiffError(f"--calibrate_threshold takes VAL_IMAGES [VAL_LABELS], got "
                              f"{len(args.calibrate_threshold)} folders. Fix: give the validation images and, "
                              "optionally, their lesion masks")
        if args.threshold is not None:
            raise NnDiffError("--threshold overrides the stored threshold that --calibrate_threshold would choose, "
                              "so one of them would do nothing. Fix: drop one")
    if args.anomaly_strategy is not None:
        check_strategy_options(args, args.anomaly_strategy)


def _strategy_flag(dest: str) -> str:
    return "--guidance_scale" if dest == "guidance_scale" else _spelled([dest])


def check_strategy_options(args: argparse.Namespace, strategy: str, source: str = "--anomaly_strategy") -> None:
    """Refuse anomaly options (with -i) that the anomaly strategy ``strategy`` would not use."""
    if args.input is None:
        return
    wrong = [d for d, needs in STRATEGY_ONLY_FLAGS.items() if _given(args, d) and needs != strategy]
    if wrong:
        parts = ", ".join(f"{_strategy_flag(d)} (strategy {STRATEGY_ONLY_FLAGS[d]})" for d in wrong)
        raise NnDiffError(f"{parts} do not apply: the anomaly strategy is {strategy} ({source}). Fix: drop them, "
                          f"or choose their strategy with --anomaly_strategy")


def predictor_family(cls: type) -> str:
    """The task family of a predictor class: reconstruction, denoising, translation, generation,
    anomaly_detection, segmentation, or the class name for a predictor outside these families."""
    from nndiff.tasks.anomaly_predictor import AnomalyPredictor
    from nndiff.tasks.denoising_predictor import DenoisingPredictor
    from nndiff.tasks.generation_predictor import GenerationPredictor
    from nndiff.tasks.reconstruction_predictor import ReconstructionPredictor
    from nndiff.tasks.segmentation_predictor import SegmentationPredictor
    from nndiff.tasks.translation_predictor import TranslationPredictor

    # Denoising before translation: DenoisingPredictor subclasses TranslationPredictor.
    # SegmentationBaselinePredictor subclasses SegmentationPredictor; latent generation GenerationPredictor.
    for family, base in ((DENOISING, DenoisingPredictor), (RECONSTRUCTION, ReconstructionPredictor),
                         ("translation", TranslationPredictor), ("generation", GenerationPredictor),
                         (ANOMALY, AnomalyPredictor), (SEGMENTATION, SegmentationPredictor)):
        if issubclass(cls, base):
            return family
    return cls.__name__


def _a(word: str) -> str:
    """``word`` with its indefinite article (an anomaly_detection model, a segmentation model)."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def family_options(args: argparse.Namespace, cls: type, trainer: str) -> dict[str, Any]:
    """Constructor keywords from the family flags; a flag of another family than the model's is refused."""
    family = predictor_family(cls)
    foreign = [f for f in given_family_flags(args) if f.family != family]
    if foreign:
        names = ", ".join(f"{f.flag} ({f.family})" for f in foreign)
        raise NnDiffError(f"{names}: flag(s) of another model family, but {trainer} is {_a(family)} model "
                          f"({cls.__name__}). Fix: drop them, or choose {_a(foreign[0].family)} model with -d/-c/-tr")
    options: dict[str, Any] = {}
    for f in given_family_flags(args):
        if f.keyword == "warm_start":
            options["warm_start"] = False  # --no_warm_start; absent -> the plan's choice
        elif f.keyword is not None:
            options[f.keyword] = getattr(args, f.dest)
    if family == ANOMALY and args.input is not None:
        if args.guidance_scale is not None:  # with -i: the cdpm counterfactual's guidance
            options["guidance_scale"] = args.guidance_scale
        if args.num_samples is not None:  # set here so --calibrate_threshold maps with the same count
            options["num_reconstructions"] = args.num_samples
    if family == SEGMENTATION and args.fusion is not None and not getattr(cls, "stochastic", True):
        raise NnDiffError(f"--fusion combines several samples, but {trainer} is deterministic ({cls.__name__}: one "
                          "prediction per case, nothing to fuse). Fix: drop --fusion, or choose the diffusion model "
                          "with -tr SegmentationDiffusionTrainer")
    return options


def check_loaded_anomaly_predictor(args: argparse.Namespace, predictor: Any) -> None:
    """After loading (the strategy may come from the plan or the checkpoint): strategy-specific flags
    must match the strategy in use, and cdpm needs a class-conditional model."""
    source = "--anomaly_strategy" if args.anomaly_strategy else "the plan's / the model's default"
    check_strategy_options(args, predictor.strategy, source)
    if predictor.strategy == "cdpm" and not predictor.is_conditional:
        raise NnDiffError(f"strategy cdpm needs a class-conditional (healthy / diseased) model, but "
                          f"{type(predictor).__name__} loaded an unconditional one. Fix: choose -tr "
                          "AnomalyCDPMTrainer, or --anomaly_strategy anoddpm / wolleb")


def calibrate_from_args(predictor: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``--calibrate_threshold VAL_IMAGES [VAL_LABELS]``: store the strategy's threshold in the model folder."""
    from nndiff.tasks.anomaly_predictor import calibrate_threshold

    folders = [Path(f) for f in args.calibrate_threshold]
    for folder, role in zip(folders, ("validation images", "validation lesion masks")):
        if not folder.is_dir():
            # a mistyped labels folder must not turn every validation case into a healthy one
            raise NnDiffError(f"--calibrate_threshold: {role} folder {folder} does not exist. Fix: pass an existing "
                              "folder (images {CASE}_0000{ending}, masks {CASE}{ending})")
    entry = calibrate_threshold(predictor, folders[0], folders[1] if len(folders) > 1 else None, seed=args.seed)
    print(f"anomaly threshold ({predictor.strategy}, {entry['method']} on {entry['num_cases']} case(s)): "
          f"{entry['threshold']:.6g}, stored in {predictor.model_info.get('model_dir')}")
    return entry


def check_simulation_operator(args: argparse.Namespace, operator_kind: str) -> None:
    """MRI simulation flags for a CT model (and --num_views for MRI) would be ignored: refuse them."""
    if operator_kind == "ct_parallel":
        wrong = [d for d in MRI_SIMULATION_FLAGS if _given(args, d)]
        kind, use = "sparse-view CT (ct_parallel)", "--num_views"
    else:
        wrong = [d for d in CT_SIMULATION_FLAGS if _given(args, d)]
        kind, use = f"MRI ({operator_kind})", "--acceleration, --center_fraction, --mask_pattern"
    if wrong:
        raise NnDiffError(f"{_spelled(wrong)} do not apply: the model's dataset.json 'reconstruction' operator is "
                          f"{kind}. Fix: drop them ({kind} simulation takes {use})")


def default_samples_per_case(predictor: Any) -> int | None:
    """``num_mc_samples`` when --num_samples is absent: None for predictors whose
    ``predict_from_folder`` plans its own count (its default is None, e.g. segmentation's K), else 1."""
    parameter = inspect.signature(predictor.predict_from_folder).parameters.get("num_mc_samples")
    return None if parameter is not None and parameter.default is None else 1


def predict_input_folder(predictor: Any, args: argparse.Namespace) -> list[Path]:
    """``-i`` prediction: simulate mode for ``--simulate`` (reconstruction), else the folder's cases."""
    num_mc_samples = args.num_samples if args.num_samples is not None else default_samples_per_case(predictor)
    if args.simulate:
        check_simulation_operator(args, predictor.operator_kind)
        return predictor.predict_simulated(args.input, args.output, seed=args.seed, num_mc_samples=num_mc_samples,
                                           acceleration=args.acceleration, center_fraction=args.center_fraction,
                                           mask_pattern=args.mask_pattern, num_views=args.num_views)
    return predictor.predict_from_folder(args.input, args.output, seed=args.seed, num_mc_samples=num_mc_samples)


def _only_trainer(results_dir: Path, plans: str, configuration: str) -> str:
    """The trainer of the one model folder of ``configuration``; folders of AUXILIARY_TRAINERS (a
    latent model's autoencoder stage, a noisy classifier) are not models to predict with."""
    suffix = f"__{plans}__{configuration}"
    names = sorted(p.name[: -len(suffix)] for p in results_dir.glob(f"*{suffix}") if p.is_dir())
    found = [n for n in names if n not in AUXILIARY_TRAINERS]
    if len(found) != 1:
        skipped = [n for n in names if n in AUXILIARY_TRAINERS]
        note = f" ({', '.join(skipped)}: a stage of another model, not used alone)" if skipped else ""
        raise NnDiffError(f"{'no' if not found else 'several'} trained models for {configuration} ({plans}) in "
                          f"{results_dir}{': ' + ', '.join(found) if found else ''}{note}. Fix: "
                          f"{'train one first' if not found else 'choose one with -tr'}")
    return found[0]


def parse_shape(values: Sequence[str] | None) -> str | list[int] | None:
    """``--shape``: ``patch`` / ``median`` or positive sizes."""
    if values is None:
        return None
    if len(values) == 1 and values[0] in ("patch", "median"):
        return values[0]
    try:
        sizes = [int(v) for v in values]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise NnDiffError(f"--shape {' '.join(values)}: expected 'patch', 'median' or positive integer sizes "
                          "(Y X for 2D, Z Y X for 3D). Fix: e.g. --shape median or --shape 64 64")
    return sizes


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
_GENERATION_FLAGS = {"conditions": "--condition", "guidance_scale": "--guidance_scale", "shape": "--shape"}


def _generation_options(predictor: object, args: argparse.Namespace) -> dict:
    """``conditions`` / ``guidance_scale`` keyword arguments for ``generate_to_folder``, only when
    given (a family without conditional generation does not take them)."""
    options = {"conditions": parse_condition_flags(args.condition), "guidance_scale": args.guidance_scale,
               "shape": parse_shape(args.shape)}
    options = {key: value for key, value in options.items() if value is not None}
    accepted = inspect.signature(predictor.generate_to_folder).parameters  # type: ignore[attr-defined]
    refused = [_GENERATION_FLAGS[key] for key in options if key not in accepted]
    if refused:
        raise NnDiffError(f"{type(predictor).__name__} does not take {' or '.join(refused)}. "
                          "Fix: drop the flag(s); this model family generates without conditions")
    return options


def check_input_mode_generation_flags(args: argparse.Namespace, family: str) -> None:
    """With -i, --condition never applies and --guidance_scale only to anomaly models (cdpm guidance)."""
    if args.condition or (args.guidance_scale is not None and family != ANOMALY):
        raise NnDiffError("--condition and --guidance_scale apply to generation (--guidance_scale with -i only to "
                          "anomaly detection's cdpm strategy). Fix: drop -i to generate samples, or drop them to "
                          "predict the cases of -i")


def _main(argv: Sequence[str] | None) -> int:
    from nndiff.training.api import find_preprocessed_dataset

    args = build_parser().parse_args(argv)
    configure_logging(args)
    check_family_flag_combinations(args)
    paths = paths_from_args(args)
    results_dir = find_preprocessed_dataset(paths.require("results"), args.dataset)
    trainer = args.trainer or _only_trainer(results_dir, args.plans, args.configuration)
    cls = predictor_class_for(trainer)
    options = family_options(args, cls, trainer)
    family = predictor_family(cls)
    if args.input is not None:
        check_input_mode_generation_flags(args, family)
    predictor = cls.from_trained(args.dataset, args.configuration, paths, trainer=trainer, plans_name=args.plans,
                                 folds=_folds(args.folds), checkpoint=args.checkpoint, use_ema=not args.no_ema,
                                 device=args.device, sampler=args.sampler, num_steps=args.steps,
                                 fold_ensemble=args.fold_ensemble, **options)
    if args.input is not None:
        if family == ANOMALY:
            check_loaded_anomaly_predictor(args, predictor)
            if args.calibrate_threshold is not None:
                calibrate_from_args(predictor, args)
        written = predict_input_folder(predictor, args)
    else:
        written = predictor.generate_to_folder(args.output, args.num_samples or 8, seed=args.seed,
                                               **_generation_options(predictor, args))
    print(f"wrote {len(written)} file(s) to {args.output}")
    return 0


def predict_entry(argv: Sequence[str] | None = None) -> int:
    """Console script ``nndiff_predict``."""
    return run_cli(_main, argv)
