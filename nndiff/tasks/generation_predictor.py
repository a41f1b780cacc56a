"""Generation family predictor: unconditional and class/metadata-conditioned samples from a trained
:class:`~nndiff.tasks.generation.GenerationTrainer` model.

Sampling is :func:`nndiff.tasks.generation.sample_images` (the same code the trainer's sample grid
uses) on the predictor's fold ensemble (:meth:`Predictor.model_fn`: EMA weights by default; outputs
averaged over folds at every step, or with ``fold_ensemble="prediction"`` sample i drawn by fold i mod F
alone), with the plan's sampler and step count unless overridden. Conditions are
given as metadata (``{"shape": "disk", "size": 6.5}``), checked against the condition encoding the
trainer stored in the checkpoint, and recorded per sample in ``prediction_info.json``. Every
``generate_to_folder`` call writes ``prediction_timing.json`` (seconds per sample, sampler and steps,
device, CUDA peak memory), so pixel and latent models can be compared.
See ``documentation/generation.md`` (section *Generating samples*).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from nndiff.diffusion.config import DiffusionConfig
from nndiff.diffusion.options import Sampler as SamplerName, parse_option
from nndiff.errors import NnDiffError, PlansError
from nndiff.inference.predictor import PREDICTION_INFO, SAMPLE_PREFIX, Predictor
from nndiff.inference.registry import register_predictor
from nndiff.tasks.generation import ConditionEncoder, resolve_guidance_scale, sample_images
from nndiff.training.devices import synchronize
from nndiff.utils.files import load_json, save_json

logger = logging.getLogger(__name__)

#: What a caller passes as conditions: one mapping for every sample, or one mapping per sample.
Conditions = Mapping[str, Any] | Sequence[Mapping[str, Any]]
#: At most this many condition problems are listed in one error (the rest are counted).
MAX_LISTED_PROBLEMS = 8
#: Written into the output folder by every generate_to_folder call: time per sample and peak memory.
PREDICTION_TIMING = "prediction_timing.json"
TIMING_DEFINITIONS = {
    "total_seconds": "wall time of the generate_to_folder call: sampling, decoding (latent models), mapping back "
                     "to original units and writing the files; model loading excluded; CUDA synchronised",
    "seconds_per_sample": "total_seconds / num_samples",
    "generate_seconds": "the part of total_seconds spent drawing the samples: sampler steps, plus the autoencoder "
                        "decoder of a latent model",
    "peak_memory_reserved_gib": "torch.cuda.max_memory_reserved / 2^30 on the device since the start of the call "
                                "(the peak counter is reset then; the loaded weights count); null on the CPU",
    "peak_memory_allocated_gib": "torch.cuda.max_memory_allocated / 2^30, same window; null on the CPU",
}


# ----------------------------------------------------------------------------------------------
# Peak device memory
# ----------------------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on a CUDA ``device`` (no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> dict[str, float | None]:
    """``peak_memory_reserved_gib`` / ``peak_memory_allocated_gib`` of a CUDA ``device`` since the last
    :func:`reset_peak_memory` (GiB = 2^30 bytes); both None on other devices."""
    if device.type != "cuda":
        return {"peak_memory_reserved_gib": None, "peak_memory_allocated_gib": None}
    return {"peak_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "peak_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}


# ----------------------------------------------------------------------------------------------
# Conditions given by the user -> validated metadata rows
# ----------------------------------------------------------------------------------------------
def condition_names(encoder: ConditionEncoder) -> list[str]:
    """Every condition key of the model, categorical first, in dataset.json order."""
    return [name for name, _ in encoder.categorical] + [name for name, _, _ in encoder.continuous]


def _canonical_category(value: Any, values: Sequence[Any]) -> Any | None:
    """The dataset.json value ``value`` stands for (exact match, else string match), or None."""
    for candidate in values:
        if value == candidate and type(value) is type(candidate):
            return candidate
    for candidate in values:
        if str(value) == str(candidate):
            return candidate
    return None


def _as_finite_float(value: Any) -> float | None:
    """``value`` as a finite float (numbers and numeric strings, as the command line gives), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _check_row(row: Any, where: str, encoder: ConditionEncoder) -> tuple[dict[str, Any], list[str]]:
    """One sample's conditions, canonicalised, and the problems found in them."""
    if not isinstance(row, Mapping):
        return {}, [f"{where}: conditions must be a mapping {{key: value}}, got {type(row).__name__}"]
    known = condition_names(encoder)
    problems = [f"{where}: unknown condition {key!r}; this model's conditions are {', '.join(known)}"
                for key in row if key not in known]
    clean: dict[str, Any] = {}
    for name, values in encoder.categorical:
        if name not in row:
            continue
        value = _canonical_category(row[name], values)
        if value is None:
            problems.append(f"{where}: {name}={row[name]!r} is not a value of {name}; "
                            f"use one of {', '.join(map(str, values))}")
        clean[name] = value
    for name, _, _ in encoder.continuous:
        if name not in row:
            continue
        number = _as_finite_float(row[name])
        if number is None:
            problems.append(f"{where}: {name}={row[name]!r} is not a finite number")
        clean[name] = number
    missing = [name for name in known if name not in row]
    if missing:
        problems.append(f"{where}: missing condition(s) {', '.join(missing)}; give every condition "
                        f"({' '.join(f'--condition {m}=VALUE' for m in missing)}) or none for unconditional samples")
    return clean, problems


def validate_conditions(encoder: ConditionEncoder | None, conditions: Conditions | None,
                        num_samples: int) -> list[dict[str, Any]] | None:
    """Check user conditions and return one canonical metadata row per sample (None: unconditional).

    ``conditions``: a mapping applied to every sample, or a sequence of ``num_samples`` mappings.
    Every key must be one of the model's conditions and every condition must be given (a partial set
    would silently null the joint class label); categorical values must be among the dataset.json
    ``values`` (string match accepted: ``"1"`` finds ``1``), continuous values finite numbers
    (numeric strings accepted). All problems are reported together in one :class:`NnDiffError`.
    """
    if conditions is None:
        return None
    if encoder is None or not condition_names(encoder):
        raise NnDiffError("this model was trained without conditions (its dataset.json has no 'conditions' "
                          "block). Fix: generate without conditions (no --condition)")
    if isinstance(conditions, Mapping):
        rows: Sequence[Any] = [conditions] * num_samples
    elif isinstance(conditions, (list, tuple)):
        rows = conditions
        if len(rows) != num_samples:
            raise NnDiffError(f"{len(rows)} condition rows for {num_samples} samples. Fix: give one mapping per "
                              "sample, or a single mapping for all")
    else:
        raise NnDiffError(f"conditions must be a mapping or a list of mappings, got {type(conditions).__name__}")
    checked, problems = [], []
    for index, row in enumerate(rows):
        clean, found = _check_row(row, f"{SAMPLE_PREFIX}_{index:04d}", encoder)
        checked.append(clean)
        problems += [p for p in found if p not in problems]  # one shared mapping repeats its problems
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(listed)} more" if len(problems) > len(listed) else ""
        raise NnDiffError(f"{len(problems)} problem(s) in the generation conditions:\n  - "
                          + "\n  - ".join(listed) + more)
    return checked


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
class _Restandardized(nn.Module):
    """A fold network whose continuous conditions were standardised with another fold's statistics.

    Every fold standardises metadata with its own training cases' mean and std; the predictor
    encodes with fold 0's, so fold *i* gets ``z_i = z_0 * scale + shift`` (NaN, the null token, stays NaN).
    """

    def __init__(self, network: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    @property
    def shape_divisor(self) -> tuple[int, ...]:
        return tuple(self.network.shape_divisor)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                continuous: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if continuous is not None:
            continuous = continuous * self.scale.to(continuous.dtype) + self.shift.to(continuous.dtype)
        return self.network(x, t, class_labels=class_labels, continuous=continuous, **kwargs)


class _FoldEnsemble(nn.Module):
    """The predictor's :meth:`~Predictor.model_fn` (fold average under the predictor's autocast) in
    the network call form that :func:`sample_images` expects."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.folds = nn.ModuleList(predictor.networks)  # submodules, so eval()/train() reach them
        self._model = predictor.model_fn()
        self._shape_divisor = tuple(getattr(predictor.networks[0], "shape_divisor", ()))

    @property
    def shape_divisor(self) -> tuple[int, ...]:
        return self._shape_divisor

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                continuous: torch.Tensor | None = None) -> torch.Tensor:
        return self._model(x, t, {"class_labels": class_labels, "continuous": continuous})


def _fold_encoders(states: Sequence[Mapping[str, Any]]) -> list[ConditionEncoder]:
    return [ConditionEncoder.from_checkpoint(state) for state in states]


def _check_same_conditions(encoders: Sequence[ConditionEncoder]) -> None:
    """Folds must share the condition fields (labels would otherwise mean different things)."""
    first = encoders[0]
    for fold, encoder in enumerate(encoders[1:], start=1):
        same = (encoder.categorical == first.categorical
                and [n for n, _, _ in encoder.continuous] == [n for n, _, _ in first.continuous])
        if not same:
            raise PlansError(f"fold checkpoints disagree on the conditions (fold #0: {first.to_dict()}, fold #{fold}: "
                             f"{encoder.to_dict()}). Fix: ensemble folds trained on the same dataset.json")


def _restandardize(network: nn.Module, reference: ConditionEncoder, own: ConditionEncoder,
                   device: torch.device) -> nn.Module:
    """Wrap ``network`` so values standardised with ``reference`` reach it standardised with ``own``."""
    if [c[1:] for c in own.continuous] == [c[1:] for c in reference.continuous]:
        return network
    scale = torch.tensor([r_std / o_std for (_, _, r_std), (_, _, o_std) in zip(reference.continuous, own.continuous)],
                         device=device)
    shift = torch.tensor([(r_mean - o_mean) / o_std for (_, r_mean, _), (_, o_mean, o_std)
                          in zip(reference.continuous, own.continuous)], device=device)
    return _Restandardized(network, scale, shift).eval()


def _divisible_shape(shape: Sequence[int], divisor: Sequence[int]) -> list[int]:
    """``shape`` rounded up per axis to a multiple of the network's ``divisor``."""
    return [int(math.ceil(s / d) * d) for s, d in zip(shape, divisor)] if divisor else [int(s) for s in shape]


def _center_crop(images: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Crop ``(N, C, *spatial)`` to ``shape`` around the centre (the inverse of a centred pad)."""
    slices = [slice(None), slice(None)]
    for size, target in zip(images.shape[2:], shape):
        start = (size - int(target)) // 2
        slices.append(slice(start, start + int(target)))
    return images[tuple(slices)]


# ----------------------------------------------------------------------------------------------
# The predictor
# ----------------------------------------------------------------------------------------------
@dataclass
class _ConditionQueue:
    """Encoded conditions of a :meth:`GenerationPredictor.generate_to_folder` run, one row per sample."""

    labels: torch.Tensor | None
    continuous: torch.Tensor | None
    guidance_scale: float | None

    def take(self, indices: Sequence[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The rows of samples ``indices`` (a fold ensemble draws samples out of order: i from fold i mod F)."""
        rows = list(indices)
        return (None if self.labels is None else self.labels[rows],
                None if self.continuous is None else self.continuous[rows])


@register_predictor(trainers=("GenerationTrainer",))
class GenerationPredictor(Predictor):
    """Samples from a :class:`~nndiff.tasks.generation.GenerationTrainer` model.

    ``generate(num_samples, generator, shape)`` draws unconditional samples (null conditions for a
    conditional model) with :func:`sample_images` on the fold ensemble, the plan's sampler and step
    count (or the constructor's ``sampler`` / ``num_steps``). ``generate_to_folder(...,
    conditions=..., guidance_scale=...)`` adds class/metadata conditions and classifier-free
    guidance. The condition encoding (category order, continuous mean/std) is the one the trainer
    stored in each fold's checkpoint (``checkpoint_states[i]["extra"]["conditions"]``).
    """

    output_kind = "data"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.diffusion = DiffusionConfig.from_dict(self.configuration.get("diffusion", {}))
        self._encoding_unknown = False
        self.conditions = self._restore_conditions()
        self._queue: _ConditionQueue | None = None
        self._ensemble: _FoldEnsemble | None = None

    # ---- conditions -------------------------------------------------------------------------
    def _restore_conditions(self) -> ConditionEncoder | None:
        """Fold 0's encoding (checked against the plan); other folds' continuous statistics are
        reconciled by wrapping their networks (:class:`_Restandardized`)."""
        network = self.configuration.get("network", {})
        conditioned = bool(network.get("num_classes") or network.get("num_continuous_conditions"))
        if not conditioned:
            return None
        if not self.checkpoint_states:
            logger.warning("conditional model without checkpoint states: conditions cannot be encoded "
                           "(load it with from_model_folder); unconditional sampling only")
            self._encoding_unknown = True
            return None
        encoders = _fold_encoders(self.checkpoint_states)
        _check_same_conditions(encoders)
        encoders[0].check_network(network)
        if len(encoders) == len(self.networks):
            self.networks = [_restandardize(net, encoders[0], own, self.device)
                             for net, own in zip(self.networks, encoders)]
        return encoders[0]

    @property
    def is_conditional(self) -> bool:
        """The model takes class labels and/or continuous metadata."""
        return self.conditions is not None and bool(condition_names(self.conditions))

    def encode_conditions(self, rows: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Validated metadata rows -> ``(class_labels, continuous)`` on the device (the trainer's encoding)."""
        if self.conditions is None:
            return None, None
        return self.conditions.encode(list(rows), self.device)

    def check_guidance_scale(self, guidance_scale: float | None) -> float | None:
        """``None`` (the plan's) or a finite number >= 0 (0: unconditional, 1: conditional, > 1: guided)."""
        if guidance_scale is None:
            return None
        value = _as_finite_float(guidance_scale)
        if value is None or value < 0:
            raise NnDiffError(f"guidance scale {guidance_scale!r} must be a finite number >= 0. Fix: e.g. "
                              "--guidance_scale 2 (1 = no guidance)")
        return value

    # ---- sampling ---------------------------------------------------------------------------
    def ensemble(self) -> nn.Module:
        """The folds as one network module for :func:`sample_images` (built once, in eval mode)."""
        if self._ensemble is None:
            self._ensemble = _FoldEnsemble(self).eval()
        return self._ensemble

    def generate(self, num_samples: int, generator: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
        """``num_samples`` samples ``(N, C, *shape)`` in normalised units.

        Conditions come from the running :meth:`generate_to_folder` call (none: null conditions).
        A shape the network's strides do not divide (e.g. the plan's median shape) is sampled padded
        up to a multiple and centre-cropped back.
        """
        indices = self.sample_indices if self.sample_indices is not None else range(num_samples)
        labels, continuous = self._queue.take(indices) if self._queue is not None else (None, None)
        scale = self._queue.guidance_scale if self._queue is not None else None
        network = self.ensemble()
        padded = _divisible_shape(shape, getattr(network, "shape_divisor", ()))
        images = sample_images(network, self.configuration, num_samples, generator=generator, device=self.device,
                               class_labels=labels, continuous=continuous, guidance_scale=scale,
                               sampler=self.sampler_name, num_steps=self.num_steps, spatial_shape=padded,
                               autocast_dtype=None)  # model_fn applies the predictor's autocast
        return _center_crop(images, shape)

    def generate_to_folder(self, output_dir: str | Path, num_samples: int, seed: int = 0,
                           shape: str | Sequence[int] = "patch", conditions: Conditions | None = None,
                           guidance_scale: float | None = None) -> list[Path]:
        """Write ``num_samples`` samples (``sample_0000{ending}`` ...; geometry and units as the base).

        ``conditions``: ``None`` (unconditional), one mapping for all samples (``{"shape": "disk",
        "size": 6.5}``) or one mapping per sample; validated by :func:`validate_conditions` before
        anything is sampled. ``guidance_scale``: classifier-free guidance scale (default: the plan's
        ``guidance_scale`` when it plans classifier-free guidance, else 1; ignored without conditions).
        ``prediction_info.json`` records ``guidance_scale`` (the scale used; null when unconditional)
        and ``conditions`` (sample name -> its canonical metadata; null when unconditional).
        ``prediction_timing.json`` (:meth:`write_timing`) records the time per sample and, on CUDA,
        the peak memory; one INFO line logs the seconds per sample.
        """
        if num_samples < 1:
            raise NnDiffError(f"num_samples must be >= 1, got {num_samples}")
        if conditions is not None and self._encoding_unknown:
            raise NnDiffError("the model is conditional but its condition encoding is unknown (no checkpoint "
                              "states). Fix: load the predictor with from_model_folder / from_trained")
        rows = validate_conditions(self.conditions, conditions, num_samples)
        scale = self.check_guidance_scale(guidance_scale)
        if rows is None and scale is not None:
            logger.warning("--guidance_scale ignored: no conditions given (unconditional samples)")
        labels, continuous = self.encode_conditions(rows) if rows is not None else (None, None)
        self._queue = _ConditionQueue(labels, continuous, scale)
        reset_peak_memory(self.device)
        synchronize(self.device)
        started = time.perf_counter()
        try:
            written = super().generate_to_folder(output_dir, num_samples, seed=seed, shape=shape)
        finally:
            self._queue = None
        synchronize(self.device)
        total = time.perf_counter() - started
        used = resolve_guidance_scale(self.diffusion, scale, True) if rows is not None else None
        self._record_conditions(Path(output_dir), rows, used)
        self.write_timing(Path(output_dir), num_samples, self.generation_shape(shape), total)
        return written

    # ---- time per sample and peak memory ----------------------------------------------------
    def latent_shape(self, shape: Sequence[int]) -> list[int] | None:
        """The latent shape sampled for ``shape`` pixels: None in pixel space (latent predictors override)."""
        return None

    def sampler_settings(self) -> tuple[str, int]:
        """The sampler name and step count the samples were drawn with (overrides, else the plan's)."""
        sampler = self.make_sampler()
        name = self.diffusion.sampler if self.sampler_name is None else parse_option(SamplerName, self.sampler_name,
                                                                                     "sampler")
        return name.value, int(sampler.num_steps)

    def write_timing(self, output_dir: Path, num_samples: int, shape: Sequence[int], total_seconds: float) -> dict:
        """Write :data:`PREDICTION_TIMING` (time per sample, peak memory) and log one line.

        ``total_seconds``: the whole ``generate_to_folder`` call (sampling, decoding, mapping back to
        original units, writing the files; model loading excluded). ``generate_seconds``: the part
        spent in :meth:`generate` (sampler steps, plus the autoencoder decoder of a latent model).
        """
        sampler, steps = self.sampler_settings()
        latent_shape = self.latent_shape(shape)
        memory = peak_memory_gib(self.device)
        info = {
            "predictor": type(self).__name__,
            "configuration": self.configuration_name,
            "latent": latent_shape is not None,
            "num_samples": int(num_samples),
            "shape": [int(s) for s in shape],
            "latent_shape": latent_shape,
            "batch_size": self.batch_size,
            "sampler": sampler,
            "num_steps": steps,
            "folds": list(self.fold_names),
            "fold_ensemble": self.fold_ensemble_info()["fold_ensemble"],
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "autocast": str(self.autocast_dtype) if self.autocast_dtype else "fp32",
            "total_seconds": total_seconds,
            "seconds_per_sample": total_seconds / num_samples,
            "generate_seconds": self.generate_seconds,
            "generate_seconds_per_sample": self.generate_seconds / num_samples,
            **memory,
            "definitions": TIMING_DEFINITIONS,
        }
        save_json(info, output_dir / PREDICTION_TIMING)
        reserved = memory["peak_memory_reserved_gib"]
        logger.info("generated %d sample(s) of shape %s with %s (%d steps) on %s: %.3f s per sample (%.3f s in "
                    "sampling%s), %.2f s in total; peak memory reserved %s", num_samples,
                    "x".join(map(str, info["shape"])), sampler, steps, info["device"],
                    info["seconds_per_sample"], info["generate_seconds_per_sample"],
                    " + decoding" if latent_shape is not None else "", total_seconds,
                    "n/a (CPU)" if reserved is None else f"{reserved:.2f} GiB")
        return info

    def _record_conditions(self, output_dir: Path, rows: list[dict[str, Any]] | None, scale: float | None) -> None:
        """Add the per-sample conditions and the guidance scale to the base's ``prediction_info.json``."""
        info_path = output_dir / PREDICTION_INFO
        info = load_json(info_path)
        info["guidance_scale"] = scale
        info["conditions"] = (None if rows is None
                              else {f"{SAMPLE_PREFIX}_{i:04d}": row for i, row in enumerate(rows)})
        save_json(info, info_path)
