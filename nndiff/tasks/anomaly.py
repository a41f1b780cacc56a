"""Anomaly-detection family (``task: anomaly_detection``): the healthy rule, the plan hook and
the trainers of the three detection strategies. Prediction: ``nndiff.tasks.anomaly_predictor``.

Healthy rule (:func:`healthy_cases`), per case, first match wins:

1. ``metadata.json`` ``"healthy": true | false`` (JSON booleans only; anything else is an error
   naming metadata.json and the case);
2. else the case's label map (``seg`` in the preprocessed ``CASE.npz``, from ``labelsTr``):
   all zero → healthy, any foreground → diseased;
3. else (no metadata flag, no label) → healthy.

Strategies (``configurations.<name>.anomaly.strategy``) and their trainers:

- ``anoddpm`` → :class:`AnomalyDDPMTrainer` (AnoDDPM, Wyatt et al. 2022): the generation model
  trained on the fold's *healthy* training cases with the plan's noise (simplex). Default.
- ``wolleb`` → :class:`AnomalyClassifierTrainer` (Wolleb et al. 2022): a classifier of noisy
  images, healthy (0) vs diseased (1), whose gradient guides DDIM decoding toward "healthy". The
  diffusion model it guides is one trained on all cases (Wolleb et al.): the
  :class:`AnomalyCDPMTrainer` model with the null label is such a model.
- ``cdpm`` → :class:`AnomalyCDPMTrainer` (Sanchez et al. 2022): the generation model conditioned
  on health (class 0 healthy, 1 diseased) with a learned null token and condition dropout for
  classifier-free guidance.

The plan's ``anomaly`` block (per configuration, written by :func:`plan_overrides`; keys and
defaults :data:`ANOMALY_DEFAULTS`, read with :func:`anomaly_settings`)::

    {"strategy": "anoddpm", "num_reconstructions": 1, "map_smoothing_sigma": 1.0,
     "encode_fraction": 0.5, "classifier_scale": 100.0, "classifier_max_t_fraction": 1.0,
     "classifier_pooling": "attention", "guidance_scale": 3.0, "condition_dropout": 0.1,
     "latent_resample_quantile": 0.9}

AnoDDPM's t_λ is the plan's ``sampling.start_fraction`` (not repeated here).

Latent configurations (``*_latent``, planned for large images) train
:class:`LatentAnomalyDDPMTrainer`: the fold's autoencoder stage and the latent diffusion model both
learn the healthy training cases, with Gaussian noise in latent space; prediction:
``nndiff.tasks.latent_anomaly_predictor.LatentAnomalyPredictor`` (anoddpm with masked resampling).

Checkpoints: every trainer writes the Trainer base format (``Trainer.checkpoint_state``: weights,
``ema_weights``, optimizer, ..., ``extra``). ``extra["anomaly"]`` holds ``strategy`` and
``class_map`` ``{"healthy": 0, "diseased": 1}`` for all three, plus:

- CDPM: ``extra["conditions"]`` (the :class:`~nndiff.tasks.generation.ConditionEncoder` with one
  categorical field ``"healthy"`` with values ``[true, false]``, so class 0 is healthy) and
  ``extra["anomaly"]["network"]`` (the UNet block it was built with: the plan's with
  ``num_classes`` 2, see :func:`cdpm_network_block`), ``guidance_scale``, ``condition_dropout``.
- Classifier: ``extra["anomaly"]["classifier"]`` = ``{"network": <UNet block>, "num_classes": 2,
  "pooling": ...}`` (rebuild with ``nndiff.networks.classifier.build_classifier`` or
  :func:`load_noisy_classifier`), ``max_t_fraction`` (the classifier saw t below
  ``max_t_fraction · T``), ``class_weights`` (cross-entropy weights, healthy then diseased),
  and ``noise_type``. Its ``ema_weights`` are the weights to guide with.

See ``documentation/anomaly_detection.md``.
"""
from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nndiff.diffusion.config import DiffusionConfig, build_noise, build_process
from nndiff.diffusion.options import Guidance, NoiseType
from nndiff.errors import NnDiffError, PlansError
from nndiff.networks.classifier import POOLINGS, NoisyClassifier, build_classifier
from nndiff.planning.decision import Decision, fmt_num, fmt_shape
from nndiff.tasks.generation import ConditionEncoder, GenerationTrainer
from nndiff.tasks.latent import LatentDiffusionTrainer
from nndiff.training import Trainer, per_sample, register_trainer
from nndiff.training.data import CaseArrays, CaseStore

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
#: metadata.json key of the healthy flag (and the CDPM condition's field name).
HEALTHY_KEY = "healthy"
#: Class indices of the CDPM condition and the classifier's logits.
CLASS_MAP: dict[str, int] = {"healthy": 0, "diseased": 1}
STRATEGIES: tuple[str, ...] = ("anoddpm", "wolleb", "cdpm")
#: Trainer per strategy (wolleb also needs a diffusion model trained on all cases: the CDPM one).
STRATEGY_TRAINERS: dict[str, str] = {"anoddpm": "AnomalyDDPMTrainer", "wolleb": "AnomalyClassifierTrainer",
                                     "cdpm": "AnomalyCDPMTrainer"}

#: Where each case's verdict came from (:func:`classify_cases`).
SOURCE_METADATA, SOURCE_LABEL, SOURCE_DEFAULT = "metadata", "label", "default"

Labels = Mapping[str, "np.ndarray | None"] | Callable[[str], "np.ndarray | None"] | None


# ----------------------------------------------------------------------------------------------
# The healthy rule
# ----------------------------------------------------------------------------------------------
def case_health(case: str, metadata: Mapping[str, Any] | None, label: np.ndarray | None, *,
                metadata_file: str = METADATA_FILE) -> tuple[bool, str]:
    """``(healthy, source)`` of one case by the healthy rule (module docstring)."""
    if metadata and HEALTHY_KEY in metadata:
        value = metadata[HEALTHY_KEY]
        if not isinstance(value, bool):
            raise NnDiffError(f"{metadata_file}: case {case!r} has \"{HEALTHY_KEY}\": {value!r}, which is not a "
                              f"boolean. Fix: write \"{HEALTHY_KEY}\": true or \"{HEALTHY_KEY}\": false (JSON "
                              "booleans, no quotes), or remove the key to let the label map decide")
        return value, SOURCE_METADATA
    if label is not None:
        return not bool(np.any(np.asarray(label))), SOURCE_LABEL
    return True, SOURCE_DEFAULT


def _label_getter(labels: Labels) -> Callable[[str], np.ndarray | None]:
    if labels is None:
        return lambda case: None
    if callable(labels):
        return labels
    return lambda case: labels.get(case)


def classify_cases(case_ids: Sequence[str], metadata: Mapping[str, Mapping[str, Any]] | None,
                   labels: Labels = None, *, metadata_file: str = METADATA_FILE) -> dict[str, tuple[bool, str]]:
    """``case -> (healthy, source)``; labels are read (lazily, when ``labels`` is a function) only
    for cases whose metadata does not decide."""
    metadata = metadata or {}
    get_label = _label_getter(labels)
    out: dict[str, tuple[bool, str]] = {}
    for case in case_ids:
        entry = metadata.get(case) or {}
        if HEALTHY_KEY in entry:
            out[case] = case_health(case, entry, None, metadata_file=metadata_file)
        else:
            out[case] = case_health(case, entry, get_label(case), metadata_file=metadata_file)
    return out


def healthy_cases(case_ids: Sequence[str], metadata: Mapping[str, Mapping[str, Any]] | None,
                  labels: Labels = None, *, metadata_file: str = METADATA_FILE) -> dict[str, bool]:
    """``case -> healthy`` by the healthy rule.

    ``metadata``: case → metadata entry (``metadata.json`` content); ``labels``: case → label
    array (or None), or a function ``case -> array | None``; ``metadata_file``: the name used in
    errors.
    """
    return {case: healthy for case, (healthy, _) in
            classify_cases(case_ids, metadata, labels, metadata_file=metadata_file).items()}


def read_preprocessed_label(data_folder: str | Path, case: str) -> np.ndarray | None:
    """The ``seg`` array of ``CASE.npz`` (None when the case has no label). Reads only that array."""
    path = Path(data_folder) / f"{case}.npz"
    try:
        with np.load(path) as npz:
            return np.asarray(npz["seg"]) if "seg" in npz.files else None
    except (OSError, ValueError) as err:
        raise NnDiffError(f"cannot read preprocessed case {path}: {err}. Fix: re-run nndiff_preprocess") from err


def healthy_cases_in_folder(data_folder: str | Path, metadata: Mapping[str, Mapping[str, Any]] | None,
                            case_ids: Sequence[str] | None = None, *,
                            metadata_file: str = METADATA_FILE) -> dict[str, tuple[bool, str]]:
    """:func:`classify_cases` for a preprocessed configuration folder (``CASE.npz`` ``seg`` arrays)."""
    folder = Path(data_folder)
    if case_ids is None:
        case_ids = sorted(p.name[: -len(".npz")] for p in folder.glob("*.npz"))
    return classify_cases(case_ids, metadata, lambda case: read_preprocessed_label(folder, case),
                          metadata_file=metadata_file)


_RULE_FIX = ("mark cases in metadata.json with \"healthy\": true / false, or give healthy cases all-zero and "
             "diseased cases non-empty masks in labelsTr, then re-run nndiff_preprocess")


def require_healthy(healthy: Mapping[str, bool], cases: Sequence[str], strategy: str, where: str = "") -> list[str]:
    """The healthy cases among ``cases``; NnDiffError (with the fix) when there are none."""
    found = [c for c in cases if healthy.get(c, False)]
    if not found:
        raise NnDiffError(f"strategy {strategy} needs healthy training cases, but none of the {len(cases)} "
                          f"training case(s){where} is healthy by the healthy rule. Fix: {_RULE_FIX}")
    return found


def require_diseased(healthy: Mapping[str, bool], cases: Sequence[str], strategy: str, where: str = "") -> list[str]:
    """The diseased cases among ``cases``; NnDiffError (with the fix) when there are none."""
    found = [c for c in cases if not healthy.get(c, True)]
    if not found:
        raise NnDiffError(f"strategy {strategy} needs healthy and diseased training cases, but none of the "
                          f"{len(cases)} training case(s){where} is diseased by the healthy rule (no metadata "
                          "flag and no label means healthy). Fix: add diseased cases (\"healthy\": false in "
                          "metadata.json or a non-empty lesion mask in labelsTr) and re-run nndiff_preprocess, "
                          "or use strategy anoddpm (AnomalyDDPMTrainer), which trains on healthy cases only")
    return found


# ----------------------------------------------------------------------------------------------
# Plan: the anomaly block
# ----------------------------------------------------------------------------------------------
#: Keys of the plan's ``anomaly`` block and their defaults (used when a plan lacks the block).
ANOMALY_DEFAULTS: dict[str, Any] = {
    "strategy": "anoddpm",
    "num_reconstructions": 1,
    "map_smoothing_sigma": 1.0,
    "encode_fraction": 0.5,
    "classifier_scale": 100.0,
    "classifier_max_t_fraction": 1.0,
    "classifier_pooling": "attention",
    "guidance_scale": 3.0,
    "condition_dropout": 0.1,
    "latent_resample_quantile": 0.9,
}
#: AnoDDPM's ratio of the first simplex octave's feature size to the image side (64 / 256).
SIMPLEX_FEATURE_FRACTION = 0.25
#: The finest simplex octave's feature size in voxels (AnoDDPM at 256²: 64 / 2⁵ = 2).
SIMPLEX_FINEST_FEATURE = 2.0
#: Why a latent anomaly configuration diffuses with Gaussian noise.
LATENT_NOISE_REASON = ("latent configuration → Gaussian noise: simplex noise's role is to cover lesion-sized, "
                       "low-frequency structures of the image, and a latent voxel already spans the downsampling "
                       "factors' pixels; latent anomaly detection (Pinaya et al. 2022) noises latents with "
                       "Gaussian noise")
#: Image side per voxel of anomaly-map smoothing sigma (256 → sigma 2 voxels).
SMOOTHING_SIDE_PER_VOXEL = 128.0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _check_setting(key: str, value: Any) -> str | None:
    """Problem with one ``anomaly`` block value, or None."""
    if key == "strategy":
        return None if value in STRATEGIES else f"must be one of {', '.join(STRATEGIES)}"
    if key == "classifier_pooling":
        return None if value in POOLINGS else f"must be one of {', '.join(POOLINGS)}"
    if key == "num_reconstructions":
        return None if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "must be an integer >= 1"
    if not _number(value):
        return "must be a number"
    if key in ("encode_fraction", "classifier_max_t_fraction", "latent_resample_quantile"):
        return None if 0 < value <= 1 else "must be in (0, 1]"
    if key == "condition_dropout":
        return None if 0 <= value < 1 else "must be in [0, 1)"
    return None if value >= 0 else "must be >= 0"


def anomaly_settings(configuration: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration's ``anomaly`` block over :data:`ANOMALY_DEFAULTS`, validated
    (PlansError naming the key and the fix)."""
    block = configuration.get("anomaly") or {}
    if not isinstance(block, Mapping):
        raise PlansError(f"the plans' 'anomaly' block must be a JSON object, got {type(block).__name__}. "
                         "Fix: re-run planning")
    problems = [f"anomaly.{k}: unknown key (known: {', '.join(ANOMALY_DEFAULTS)})"
                for k in block if k not in ANOMALY_DEFAULTS]
    settings = {**ANOMALY_DEFAULTS, **block}
    problems += [f"anomaly.{k} = {settings[k]!r} {p}" for k in ANOMALY_DEFAULTS
                 if (p := _check_setting(k, settings[k])) is not None]
    if problems:
        raise PlansError("invalid plans 'anomaly' block: " + "; ".join(problems) +
                         ". Fix: correct it in nnDiffPlans.json (an inherits_from configuration) or re-run planning")
    return settings


def _side(patch_size: Sequence[int]) -> int:
    """The smallest patch side that is not a singleton axis."""
    sides = [int(s) for s in patch_size if int(s) > 1] or [int(s) for s in patch_size]
    return min(sides)


def decide_simplex(patch_size: Sequence[int]) -> Decision[tuple[float, int]]:
    """Simplex ``frequency`` (first octave's feature size in voxels) and ``octaves`` from the patch:
    AnoDDPM's 64 at 256² is a quarter of the image, and its 6 octaves halve the feature size down to
    2 voxels; nnDiff keeps both ratios: frequency = side / 4 (at least 2), octaves = 1 + log2(frequency / 2)
    (rounded down)."""
    side = _side(patch_size)
    frequency = max(SIMPLEX_FINEST_FEATURE, side * SIMPLEX_FEATURE_FRACTION)
    octaves = 1 + int(math.floor(math.log2(frequency / SIMPLEX_FINEST_FEATURE) + 1e-9))
    return Decision((float(frequency), octaves),
                    f"anomaly detection → simplex noise (AnoDDPM, Wyatt et al. 2022) scaled to the patch "
                    f"{fmt_shape(patch_size)}: first-octave feature size = side {side} / 4 = {fmt_num(frequency)} "
                    f"voxels (AnoDDPM: 64 at 256), {octaves} octave(s) halving it down to "
                    f"{fmt_num(frequency / 2 ** (octaves - 1))} voxels (AnoDDPM: 6 octaves, 64 → 2)")


def decide_map_smoothing(patch_size: Sequence[int]) -> Decision[float]:
    """Gaussian sigma (voxels) of the anomaly map: side / 128, at least 1 voxel — removes
    single-voxel residual noise of the stochastic reconstruction, keeps lesions of a few voxels."""
    side = _side(patch_size)
    sigma = max(1.0, side / SMOOTHING_SIDE_PER_VOXEL)
    return Decision(round(sigma, 4), f"side {side} / {fmt_num(SMOOTHING_SIDE_PER_VOXEL)}, at least 1 → sigma "
                                     f"{fmt_num(sigma)} voxel(s): smooths single-voxel reconstruction noise out of "
                                     "the residual, keeps lesions a few voxels wide")


def decide_anomaly_block(patch_size: Sequence[int]) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``anomaly`` block of one configuration and a reason per key (``anomaly.<key>``)."""
    smoothing = decide_map_smoothing(patch_size)
    block = {**ANOMALY_DEFAULTS, "map_smoothing_sigma": smoothing.value}
    reasons = {
        "anomaly.strategy": "anoddpm: needs only healthy cases, so it works whatever the healthy rule finds; "
                            "wolleb and cdpm also need diseased training cases (select them by changing the "
                            "strategy in an inherits_from configuration)",
        "anomaly.num_reconstructions": "1 reconstruction per case (each costs start_fraction·T network "
                                       "evaluations); raise it to average stochastic reconstructions",
        "anomaly.map_smoothing_sigma": smoothing.reason,
        "anomaly.encode_fraction": "DDIM encoding depth of wolleb/cdpm: 0.5·T = 500 of 1000 steps "
                                   "(Wolleb et al. 2022's noise level L = 500)",
        "anomaly.classifier_scale": "classifier-guidance scale 100 (Wolleb et al. 2022 on BraTS)",
        "anomaly.classifier_max_t_fraction": "the classifier trains on all noise levels (Wolleb et al.), so it "
                                             "can guide any encoding depth chosen at prediction",
        "anomaly.classifier_pooling": "attention pooling over voxels (guided-diffusion's encoder classifier, "
                                      "without position embedding so any patch size works)",
        "anomaly.guidance_scale": "CDPM classifier-free guidance scale 3 toward 'healthy' (nnDiff's choice; "
                                  "1 = plain conditional decoding, larger removes more)",
        "anomaly.condition_dropout": "CDPM drops the health label with p = 0.1 in training (Ho & Salimans 2022) "
                                     "so the null token learns the unconditional model",
        "anomaly.latent_resample_quantile": "latent configurations: the second pass resamples the latent voxels "
                                            "whose first-pass change is in the top 10 % of the image (dilated by "
                                            "one voxel) and holds the rest (nnDiff's choice; 1 = one pass only)",
    }
    return block, reasons


def plan_overrides(fingerprint: Mapping[str, Any], plans: dict[str, Any]) -> dict[str, Any]:
    """Family hook (``nndiff.tasks.PLAN_HOOKS["anomaly_detection"]``): per configuration with a
    ``patch_size``, simplex octaves/frequency from the patch (``diffusion.noise_params``) and the
    ``anomaly`` block, each with its reason. Modifies and returns ``plans``."""
    for config in plans.get("configurations", {}).values():
        patch = config.get("patch_size")
        if not patch:
            continue  # an inherits_from override without its own patch: the parent carries the block
        reasons = config.setdefault("reasons", {})
        diffusion = config.get("diffusion")
        autoencoder = config.get("autoencoder")
        if isinstance(autoencoder, dict) and isinstance(diffusion, dict):
            # Latent configuration: the block's sizes are in pixels (latent patch × factors).
            patch = [int(p) * int(f) for p, f in zip(patch, autoencoder["downsampling_factors"])]
            diffusion["noise_type"], diffusion["noise_params"] = NoiseType.GAUSSIAN.value, {}
            reasons["diffusion.noise_type"] = LATENT_NOISE_REASON
        elif isinstance(diffusion, dict) and diffusion.get("noise_type") == NoiseType.SIMPLEX.value:
            simplex = decide_simplex(patch)
            frequency, octaves = simplex.value
            diffusion["noise_params"] = {**(diffusion.get("noise_params") or {}), "frequency": frequency,
                                         "octaves": octaves}
            reasons["diffusion.noise_type"] = simplex.reason
        block, block_reasons = decide_anomaly_block(patch)
        config["anomaly"] = block
        reasons.update(block_reasons)
    return plans


# ----------------------------------------------------------------------------------------------
# Trainer helpers
# ----------------------------------------------------------------------------------------------
class ImageOnlyStore(CaseStore):
    """A :class:`CaseStore` without label maps: anomaly trainers learn from images only, and a
    dataset with masks only for diseased cases would otherwise mix cases with and without ``seg``
    in one batch (which the loader refuses)."""

    def __getitem__(self, identifier: str) -> CaseArrays:
        case = super().__getitem__(identifier)
        if case.seg is None:
            return case
        return CaseArrays(data=case.data, seg=None, target=case.target, pad_data=case.pad_data,
                          pad_target=case.pad_target)


def classify_fold_cases(trainer: Any, label_folder: Path) -> dict[str, bool]:
    """The healthy rule on a trainer's fold cases (labels from ``label_folder``), with a log line of
    how many cases each source decided."""
    verdicts = healthy_cases_in_folder(label_folder, trainer.case_metadata,
                                       [*dict.fromkeys([*trainer.train_cases, *trainer.val_cases])],
                                       metadata_file=str(trainer.preprocessed_dataset_dir / METADATA_FILE))
    counts = Counter((source, healthy) for healthy, source in verdicts.values())
    summary = ", ".join(f"{n} {'healthy' if h else 'diseased'} by {s}" for (s, h), n in sorted(counts.items()))
    trainer.log(f"healthy rule: {summary}")
    return {case: healthy for case, (healthy, _) in verdicts.items()}


def keep_healthy_training_cases(trainer: Any, strategy: str, label_folder: Path) -> dict[str, bool]:
    """Restrict ``trainer.train_cases`` to the healthy ones (validation keeps all cases); NnDiffError
    with the fix when there are none. Returns the verdict per fold case."""
    healthy = classify_fold_cases(trainer, label_folder)
    all_train = list(trainer.train_cases)
    trainer.train_cases = require_healthy(healthy, all_train, strategy, f" of fold {trainer.fold} ({label_folder})")
    trainer.log(f"{strategy}: training on {len(trainer.train_cases)} healthy of {len(all_train)} training "
                f"cases; validating on all {len(trainer.val_cases)} validation cases")
    return healthy


def use_images_only(trainer: Any) -> None:
    """Swap in :class:`ImageOnlyStore` and drop ``seg`` from the fixed validation patches."""
    trainer.store = ImageOnlyStore(trainer.data_folder)
    for item in trainer.validation_items:
        item.arrays.pop("seg", None)


class _HealthMixin:
    """Shared by the anomaly trainers: the healthy rule on the fold's cases, and image-only data."""

    strategy: str = ""
    healthy: dict[str, bool]

    def _classify_health(self) -> dict[str, bool]:
        return classify_fold_cases(self, self._label_folder())

    def _use_images_only(self) -> None:
        use_images_only(self)

    def _label_folder(self) -> Path:
        """The preprocessed pixel folder whose ``seg`` arrays the healthy rule reads (a latent
        trainer's data folder is its latent cache, which has none)."""
        trainer: Any = self
        return Path(getattr(trainer, "pixel_folder", None) or trainer.data_folder)

    def _where(self) -> str:
        trainer: Any = self
        return f" of fold {trainer.fold} ({self._label_folder()})"

    def train_on_healthy_cases(self) -> None:
        """Keep the fold's healthy training cases (validation keeps all cases); log the counts."""
        self.healthy = keep_healthy_training_cases(self, self.strategy, self._label_folder())

    def anomaly_extra(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "class_map": dict(CLASS_MAP)}


def health_encoder() -> ConditionEncoder:
    """CDPM's condition: field ``healthy`` with values ``[True, False]`` → class 0 healthy, 1 diseased."""
    return ConditionEncoder(categorical=[(HEALTHY_KEY, [True, False])])


def cdpm_network_block(network: Mapping[str, Any]) -> dict[str, Any]:
    """The UNet block of a CDPM model: the plan's, conditioned on health (``num_classes`` 2; index
    2 is the learned null token). Refuses a plan already conditioned on dataset.json conditions."""
    if network.get("num_classes") or network.get("num_continuous_conditions"):
        raise PlansError("CDPM conditions the model on health only, but the plan's network is already conditioned "
                         f"(num_classes {network.get('num_classes')}, num_continuous_conditions "
                         f"{network.get('num_continuous_conditions')}) by dataset.json 'conditions'. Fix: remove "
                         "'conditions' from dataset.json and re-run planning, or use strategy anoddpm")
    return {**copy.deepcopy(dict(network)), "num_classes": len(CLASS_MAP), "num_continuous_conditions": 0}


# ----------------------------------------------------------------------------------------------
# AnoDDPM
# ----------------------------------------------------------------------------------------------
@register_trainer
class AnomalyDDPMTrainer(_HealthMixin, GenerationTrainer):
    """AnoDDPM: the generation trainer on the fold's healthy training cases (validation keeps all
    cases), with the plan's noise type (simplex for this family)."""

    strategy = "anoddpm"

    def initialize(self) -> None:
        if self.initialized:
            return
        super().initialize()
        self._use_images_only()
        self.train_on_healthy_cases()
        if self.is_conditional:  # continuous statistics over the cases actually trained on
            self._set_conditions(ConditionEncoder.from_dataset_json(
                self._dataset_json(), [self.case_metadata.get(c, {}) for c in self.train_cases]))

    def checkpoint_extra_state(self) -> dict[str, Any]:
        return {**super().checkpoint_extra_state(),
                "anomaly": {**self.anomaly_extra(), "num_healthy_training_cases": len(self.train_cases)}}


# ----------------------------------------------------------------------------------------------
# Latent AnoDDPM
# ----------------------------------------------------------------------------------------------
#: What the autoencoder stage of an anomaly-detection latent configuration is called in errors.
AUTOENCODER_STAGE = "latent anoddpm (autoencoder stage)"


def restrict_autoencoder_to_healthy(trainer: Any) -> None:
    """The autoencoder stage of an anomaly-detection latent configuration learns the fold's healthy
    training cases only (Pinaya et al. 2022 train both stages on healthy brains): an autoencoder
    that has learnt lesions lets them through the healthy latent prior more easily. Images only (the
    loader refuses batches mixing cases with and without masks). Called by ``AutoencoderTrainer``."""
    use_images_only(trainer)
    keep_healthy_training_cases(trainer, AUTOENCODER_STAGE, Path(trainer.data_folder))


@register_trainer
class LatentAnomalyDDPMTrainer(_HealthMixin, LatentDiffusionTrainer):
    """AnoDDPM in latent space (the ``*_latent`` configurations of anomaly detection): the fold's
    autoencoder stage and the latent diffusion model both learn the fold's healthy training cases;
    the latent predictor (``LatentAnomalyPredictor``) noises an input's latent to t_λ, denoises it,
    resamples the latent voxels that moved most with the rest held (masked resampling) and compares
    the decoded result with the autoencoder's reconstruction of the input."""

    strategy = "anoddpm"

    def initialize(self) -> None:
        if self.initialized:
            return
        super().initialize()
        self.train_on_healthy_cases()

    def checkpoint_extra_state(self) -> dict[str, Any]:
        return {**super().checkpoint_extra_state(),
                "anomaly": {**self.anomaly_extra(), "latent": True,
                            "num_healthy_training_cases": len(self.train_cases)}}


# ----------------------------------------------------------------------------------------------
# CDPM
# ----------------------------------------------------------------------------------------------
@register_trainer
class AnomalyCDPMTrainer(_HealthMixin, GenerationTrainer):
    """CDPM (Sanchez et al. 2022): diffusion conditioned on health (class 0 healthy, 1 diseased)
    with a learned null token; the label is dropped with the plan's ``anomaly.condition_dropout``
    so classifier-free guidance toward "healthy" works at prediction. Needs both kinds of cases."""

    strategy = "cdpm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.anomaly = anomaly_settings(self.configuration)
        self.configuration = dict(self.configuration)
        self.configuration["network"] = cdpm_network_block(self.configuration.get("network", {}))
        # The plan's diffusion block is unconditional (no dataset conditions): CFG comes from the anomaly block.
        self.configuration["diffusion"] = {**self.configuration["diffusion"],
                                           "guidance": Guidance.CLASSIFIER_FREE.value,
                                           "guidance_scale": float(self.anomaly["guidance_scale"]),
                                           "condition_dropout": float(self.anomaly["condition_dropout"])}
        self.diffusion = DiffusionConfig.from_dict(self.configuration["diffusion"])

    def initialize(self) -> None:
        if self.initialized:
            return
        # GenerationTrainer.initialize would encode dataset.json conditions; CDPM's one condition is health.
        Trainer.initialize(self)
        self._use_images_only()
        self.healthy = self._classify_health()
        healthy = require_healthy(self.healthy, self.train_cases, self.strategy, self._where())
        diseased = require_diseased(self.healthy, self.train_cases, self.strategy, self._where())
        for case, value in self.healthy.items():
            self.case_metadata.setdefault(case, {})[HEALTHY_KEY] = value  # the rule's verdict is the label
        self._set_conditions(health_encoder())
        self.log(f"{self.strategy}: {len(healthy)} healthy (class 0) and {len(diseased)} diseased (class 1) "
                 f"training cases; label dropped with p = {fmt_num(self.diffusion.condition_dropout)}")

    def checkpoint_extra_state(self) -> dict[str, Any]:
        return {**super().checkpoint_extra_state(),
                "anomaly": {**self.anomaly_extra(), "network": copy.deepcopy(self.configuration["network"]),
                            "guidance_scale": self.diffusion.guidance_scale,
                            "condition_dropout": self.diffusion.condition_dropout}}


# ----------------------------------------------------------------------------------------------
# Noisy classifier (Wolleb et al.)
# ----------------------------------------------------------------------------------------------
def sample_t_below(process: Any, batch_size: int, fraction: float, generator: torch.Generator | None,
                   device: torch.device | str) -> torch.Tensor:
    """Training times uniform over the first ``fraction`` of the process' time domain."""
    t = process.sample_t(batch_size, generator, device=device)
    if fraction >= 1.0:
        return t
    if not t.dtype.is_floating_point:  # discrete steps 0..T-1 → 0..ceil(fraction·T)-1
        return torch.floor(t.double() * fraction).long()
    t_min = float(process.t_min)
    return t_min + (t - t_min) * fraction


def class_weights(labels: Sequence[int], num_classes: int = len(CLASS_MAP)) -> torch.Tensor:
    """Cross-entropy weights ``n / (K · n_k)``: each class contributes equally whatever its share."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


@register_trainer
class AnomalyClassifierTrainer(_HealthMixin, Trainer):
    """Wolleb et al.'s classifier: :class:`~nndiff.networks.classifier.NoisyClassifier` on
    ``x_t ~ q(x_t | x_0)`` at random t (plan's process and noise type), healthy (0) vs diseased
    (1), class-weighted cross-entropy. Validation: loss and ``accuracy`` on fixed (t, noise) pairs.
    Needs both kinds of training cases."""

    strategy = "wolleb"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "diffusion" not in self.configuration or "network" not in self.configuration:
            raise PlansError(f"configuration {self.configuration_name!r} has no 'diffusion' or 'network' block. "
                             "Fix: re-run planning")
        self.anomaly = anomaly_settings(self.configuration)
        self.diffusion = DiffusionConfig.from_dict(self.configuration["diffusion"])
        self.process = build_process(self.diffusion)
        self.noise_fn = build_noise(self.diffusion)
        self.max_t_fraction = float(self.anomaly["classifier_max_t_fraction"])
        self.labels: dict[str, int] = {}
        self.loss_weights = torch.ones(len(CLASS_MAP))

    def build_network(self) -> nn.Module:
        return build_classifier({"network": self.configuration["network"], "num_classes": len(CLASS_MAP),
                                 "pooling": self.anomaly["classifier_pooling"]})

    def initialize(self) -> None:
        if self.initialized:
            return
        super().initialize()
        self._use_images_only()
        self.healthy = self._classify_health()
        healthy = require_healthy(self.healthy, self.train_cases, self.strategy, self._where())
        diseased = require_diseased(self.healthy, self.train_cases, self.strategy, self._where())
        self.labels = {c: CLASS_MAP["healthy"] if h else CLASS_MAP["diseased"] for c, h in self.healthy.items()}
        self.loss_weights = class_weights([self.labels[c] for c in self.train_cases]).to(self.device)
        self.log(f"{self.strategy} classifier: {len(healthy)} healthy / {len(diseased)} diseased training cases, "
                 f"cross-entropy weights {[round(w, 3) for w in self.loss_weights.tolist()]}, t below "
                 f"{fmt_num(self.max_t_fraction)}·T, noise {self.diffusion.noise_type.value}")

    def make_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = super().make_batch(batch)
        out["health_labels"] = torch.tensor([self.labels[k] for k in out["keys"]], dtype=torch.long,
                                            device=self.device)
        return out

    def compute_loss(self, network: nn.Module, batch: Mapping[str, Any], *, train: bool,
                     generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Class-weighted cross-entropy of the logits on ``x_t``; logs ``accuracy``."""
        x0 = batch["data"]
        n = x0.shape[0]
        t = per_sample(lambda k, g: sample_t_below(self.process, k, self.max_t_fraction, g, x0.device),
                       generators, n)
        noise = per_sample(lambda k, g: self.noise_fn((k, *x0.shape[1:]), generator=g, device=x0.device,
                                                      dtype=x0.dtype), generators, n)
        x_t = self.process.add_noise(x0, noise, t).to(x0.dtype)
        logits = network(x_t, self.process.model_time(t)).float()
        labels = batch["health_labels"]
        loss = F.cross_entropy(logits, labels, weight=self.loss_weights.to(logits.device))
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return loss, {"accuracy": accuracy.detach()}

    def checkpoint_extra_state(self) -> dict[str, Any]:
        network: Any = self.network
        return {"anomaly": {**self.anomaly_extra(), "classifier": network.classifier_config,
                            "max_t_fraction": self.max_t_fraction, "class_weights": self.loss_weights.tolist(),
                            "noise_type": self.diffusion.noise_type.value}}


def load_noisy_classifier(state: Mapping[str, Any], *, ema: bool = True) -> NoisyClassifier:
    """The classifier of an :class:`AnomalyClassifierTrainer` checkpoint dict (EMA weights by default), in eval mode."""
    block = (state.get("extra") or {}).get("anomaly", {}).get("classifier")
    if state.get("trainer_class") != AnomalyClassifierTrainer.__name__ or block is None:
        raise NnDiffError(f"this checkpoint was written by {state.get('trainer_class')!r}, not by "
                          f"{AnomalyClassifierTrainer.__name__}: it holds no noisy classifier. Fix: train one with "
                          f"-tr {AnomalyClassifierTrainer.__name__}")
    model = build_classifier(block)
    model.load_state_dict(state["ema_weights" if ema else "network_weights"])
    return model.eval()
