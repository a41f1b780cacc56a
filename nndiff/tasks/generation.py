"""Generation family: unconditional and class/metadata-conditioned image generation.

- :class:`GenerationTrainer` trains the planned UNet with the planned diffusion loss
  (parameterization, weighting, noise type, optional importance sampling of t), drops the
  conditions with the plan's ``condition_dropout`` for classifier-free guidance, and writes a
  sample grid (EMA weights, planned sampler, few steps) on progress epochs.
- :class:`ConditionEncoder` turns case metadata into the network's ``class_labels`` /
  ``continuous`` inputs, following the dataset.json ``conditions`` block.
- :func:`sample_images` draws samples from a trained network (used by the grid and the predictor).

See ``documentation/generation.md``.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from nndiff.diffusion.config import DiffusionConfig, build_process, build_sampler
from nndiff.diffusion.options import Guidance
from nndiff.diffusion.samplers import sample
from nndiff.errors import NnDiffError, PlansError
from nndiff.networks import NULL_LABEL, drop_conditions
from nndiff.training.diffusion_parts import DiffusionPartsMixin
from nndiff.training import Trainer, register_trainer, save_image_grid
from nndiff.training.rng import torch_generator
from nndiff.utils.files import load_json

logger = logging.getLogger(__name__)

#: Sampler steps of the epoch-end sample grid (a preview: the plan's count, capped here).
GRID_SAMPLING_STEPS = 10
#: Samples in the epoch-end grid (2D / 3D; 3D grids show the middle slice).
GRID_SAMPLES = {2: 8, 3: 4}
#: Seed stream of the grid's noise, so grids of different epochs start from the same noise.
GRID_SEED_OFFSET = 7919
DATASET_JSON = "dataset.json"


# ----------------------------------------------------------------------------------------------
# Conditions: metadata -> network inputs
# ----------------------------------------------------------------------------------------------
@dataclass
class ConditionEncoder:
    """Maps case metadata to ``class_labels`` (one joint index) and standardised ``continuous`` values.

    Rules (the planner's ``num_classes`` / ``num_continuous_conditions`` follow the same order):

    - Categorical fields, in dataset.json order, form one joint class index in mixed radix with
      the *first* field most significant: ``index = ((v0 * n1) + v1) * n2 + v2 ...`` where ``vi``
      is the position of the case's value in ``values``. A case with a missing or unknown value
      gets :data:`NULL_LABEL` (the learned null token).
    - Continuous fields, in dataset.json order, are standardised with the mean and standard
      deviation over the *training* cases (std 0 -> 1), because raw units (age in years, dose in
      mGy) would saturate the metadata MLP. A missing value gives NaN (the null embedding).
    """

    categorical: list[tuple[str, list[Any]]] = field(default_factory=list)
    continuous: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def num_classes(self) -> int | None:
        """Joint class count, or None without categorical fields (as the planner writes it)."""
        return math.prod(len(values) for _, values in self.categorical) if self.categorical else None

    @property
    def num_continuous(self) -> int:
        return len(self.continuous)

    @classmethod
    def from_dataset_json(cls, dataset_json: Mapping[str, Any],
                          training_metadata: Sequence[Mapping[str, Any]]) -> "ConditionEncoder":
        """Read the ``conditions`` block; continuous statistics come from ``training_metadata``."""
        categorical: list[tuple[str, list[Any]]] = []
        continuous: list[tuple[str, float, float]] = []
        for name, spec in (dataset_json.get("conditions") or {}).items():
            ctype = spec if isinstance(spec, str) else spec.get("type") if isinstance(spec, Mapping) else None
            if ctype == "categorical":
                values = spec.get("values") if isinstance(spec, Mapping) else None
                if not isinstance(values, list) or len(values) < 2:
                    raise PlansError(f"dataset.json conditions.{name} is categorical without a 'values' list. "
                                     f"Fix: add \"values\": [...] to conditions.{name} and re-run planning")
                categorical.append((name, list(values)))
            elif ctype == "continuous":
                observed = [float(m[name]) for m in training_metadata if _is_number(m.get(name))]
                mean = float(np.mean(observed)) if observed else 0.0
                std = float(np.std(observed)) if observed else 1.0
                continuous.append((name, mean, std if std > 0 else 1.0))
            else:
                raise PlansError(f"dataset.json conditions.{name}: unknown type {ctype!r}. "
                                 "Fix: use 'categorical' or 'continuous'")
        return cls(categorical, continuous)

    def class_label(self, metadata: Mapping[str, Any]) -> int:
        """Joint class index of one case (:data:`NULL_LABEL` when a value is missing or unknown)."""
        index = 0
        for name, values in self.categorical:
            position = _value_position(metadata.get(name), values)
            if position is None:
                return NULL_LABEL
            index = index * len(values) + position
        return index

    def continuous_values(self, metadata: Mapping[str, Any]) -> list[float]:
        """Standardised continuous values of one case (NaN where missing)."""
        out = []
        for name, mean, std in self.continuous:
            value = metadata.get(name)
            out.append((float(value) - mean) / std if _is_number(value) else math.nan)
        return out

    def encode(self, metadata: Sequence[Mapping[str, Any]], device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(class_labels (B,) int64 | None, continuous (B, K) float32 | None)`` for a batch of cases."""
        labels = (torch.tensor([self.class_label(m) for m in metadata], dtype=torch.long, device=device)
                  if self.categorical else None)
        values = (torch.tensor([self.continuous_values(m) for m in metadata], dtype=torch.float32,
                               device=device).reshape(len(metadata), self.num_continuous)
                  if self.continuous else None)
        return labels, values

    def to_dict(self) -> dict[str, Any]:
        """JSON/checkpoint form (lists, strings and numbers only)."""
        return {"categorical": [[name, list(values)] for name, values in self.categorical],
                "continuous": [[name, mean, std] for name, mean, std in self.continuous]}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "ConditionEncoder":
        return cls([(str(n), list(v)) for n, v in state.get("categorical", [])],
                   [(str(n), float(m), float(s)) for n, m, s in state.get("continuous", [])])

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> "ConditionEncoder":
        """The encoding a :class:`GenerationTrainer` stored in a checkpoint (``extra.conditions``).

        The predictor uses it so that labels and standardised metadata mean what they meant in training.
        """
        return cls.from_dict(state.get("extra", {}).get("conditions", {}))

    def check_network(self, network_block: Mapping[str, Any]) -> None:
        """Refuse a plan whose network conditioning does not match the dataset's conditions."""
        planned = (network_block.get("num_classes"), int(network_block.get("num_continuous_conditions") or 0))
        if planned != (self.num_classes, self.num_continuous):
            raise PlansError(
                f"the plan's network has num_classes {planned[0]} and {planned[1]} continuous condition(s), but "
                f"dataset.json declares {self.num_classes} classes and {self.num_continuous} continuous "
                "condition(s). Fix: re-run planning after changing dataset.json 'conditions'")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _value_position(value: Any, values: Sequence[Any]) -> int | None:
    """Position of ``value`` in ``values``; falls back to string comparison (``1`` vs ``"1"``)."""
    if value is None:
        return None
    for i, candidate in enumerate(values):
        if value == candidate and type(value) is type(candidate):
            return i
    for i, candidate in enumerate(values):
        if str(value) == str(candidate):
            return i
    return None


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def _network_model_fn(network: nn.Module):
    """Model function for the sampling loop: ``cond`` is None or {"class_labels", "continuous"}."""

    def model_fn(x: torch.Tensor, t_net: torch.Tensor, cond: Any) -> torch.Tensor:
        cond = cond or {}
        out = network(x, t_net, class_labels=cond.get("class_labels"), continuous=cond.get("continuous"))
        return out.float()  # autocast gives bf16; samplers work in float32/64

    return model_fn


def _null_like(cond: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """The null conditions of a batch (what ``drop_conditions(..., p=1)`` gives)."""
    labels, continuous = cond.get("class_labels"), cond.get("continuous")
    return {"class_labels": None if labels is None else torch.full_like(labels, NULL_LABEL),
            "continuous": None if continuous is None else torch.full_like(continuous, math.nan)}


def _batched_cfg_model_fn(network: nn.Module, scale: float):
    """Classifier-free guidance with conditional and null halves in *one* network call.

    Same result as :class:`~nndiff.diffusion.ClassifierFreeGuidance` (out_null + w (out_cond - out_null)),
    at one launch per step instead of two, which matters for small sampling batches on a GPU.
    """

    def model_fn(x: torch.Tensor, t_net: torch.Tensor, cond: Any) -> torch.Tensor:
        null = _null_like(cond)
        both = {k: None if cond.get(k) is None else torch.cat([cond[k], null[k]]) for k in null}
        t_both = torch.cat([t_net, t_net]) if t_net.ndim else t_net
        out = network(torch.cat([x, x]), t_both, class_labels=both["class_labels"],
                      continuous=both["continuous"]).float()
        out_cond, out_null = out.chunk(2)
        return out_null + scale * (out_cond - out_null)

    return model_fn


def resolve_guidance_scale(diffusion: DiffusionConfig, guidance_scale: float | None, conditioned: bool) -> float:
    """The CFG scale to sample with: the argument, else the plan's (with classifier-free guidance), else 1."""
    if not conditioned:
        return 1.0
    if guidance_scale is not None:
        return float(guidance_scale)
    return float(diffusion.guidance_scale) if diffusion.guidance is Guidance.CLASSIFIER_FREE else 1.0


def sample_images(network: nn.Module, plans_config: Mapping[str, Any], num_samples: int, *,
                  generator: torch.Generator | None, device: torch.device | str,
                  class_labels: torch.Tensor | None = None, continuous: torch.Tensor | None = None,
                  guidance_scale: float | None = None, sampler: str | None = None,
                  num_steps: int | None = None, spatial_shape: Sequence[int] | None = None,
                  autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Draw ``num_samples`` images ``(N, in_channels, *spatial)`` in normalised units (float32).

    ``plans_config``: the resolved configuration (``network``, ``diffusion``, ``patch_size``).
    ``generator``: on ``device``; every random draw (start noise, stochastic steps) comes from it,
    so equal generators give equal samples. ``class_labels`` ``(N,)`` / ``continuous`` ``(N, K)``:
    encoded conditions (:class:`ConditionEncoder`); without both the model samples unconditionally
    (null conditions). ``guidance_scale``: CFG scale (default: the plan's when it plans
    classifier-free guidance, else 1; ignored without conditions). ``sampler`` / ``num_steps``
    override the plan's. ``spatial_shape``: default the plan's ``patch_size``; must be divisible by
    the network's strides. ``autocast_dtype``: e.g. ``torch.bfloat16`` on CUDA. The network's mode
    is restored afterwards.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    device = torch.device(device)
    diffusion = DiffusionConfig.from_dict(plans_config.get("diffusion", {}))
    in_channels = int(plans_config["network"]["in_channels"])
    shape = tuple(int(s) for s in (spatial_shape or plans_config["patch_size"]))
    divisor = tuple(getattr(network, "shape_divisor", (1,) * len(shape)))
    if any(size % d for size, d in zip(shape, divisor)):
        raise ValueError(f"spatial_shape {list(shape)} is not divisible by the network's strides {list(divisor)} "
                         "per axis; pad or crop to a multiple")
    conditioned = class_labels is not None or continuous is not None
    for name, value in (("class_labels", class_labels), ("continuous", continuous)):
        if value is not None and value.shape[0] != num_samples:
            raise ValueError(f"{name} has {value.shape[0]} rows for {num_samples} samples")
    cond = ({"class_labels": None if class_labels is None else class_labels.to(device),
             "continuous": None if continuous is None else continuous.to(device)} if conditioned else None)
    scale = resolve_guidance_scale(diffusion, guidance_scale, conditioned)
    process = build_process(diffusion)
    the_sampler = build_sampler(diffusion, sampler, num_steps, process=process)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad(), autocast:
            model_fn = (_batched_cfg_model_fn(network, scale) if conditioned and scale != 1.0
                        else _network_model_fn(network))
            out = sample(the_sampler, model_fn, (num_samples, in_channels, *shape), cond=cond,
                         generator=generator, device=device)
    finally:
        network.train(was_training)
    return out.sample.float()


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
@register_trainer
class GenerationTrainer(DiffusionPartsMixin, Trainer):
    """Diffusion training for image generation (unconditional or class/metadata conditioned).

    Loss: ``diffusion_loss`` on the plan's parameterization, weighting and noise type; t uniform
    (or importance-sampled when the plan says so). Validation draws t and noise per case from the
    fixed per-case generators (comparable across epochs) and uses the conditions without dropout.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setup_diffusion()
        self.conditions = ConditionEncoder()
        self._case_labels: dict[str, int] = {}
        self._case_continuous: dict[str, list[float]] = {}

    # ---- setup ----------------------------------------------------------------------------------
    def initialize(self) -> None:
        """Base initialisation, then the condition encoding from dataset.json and the training cases."""
        if self.initialized:
            return
        super().initialize()
        network_block = self.configuration.get("network", {})
        if network_block.get("num_classes") or network_block.get("num_continuous_conditions"):
            self._set_conditions(ConditionEncoder.from_dataset_json(
                self._dataset_json(), [self.case_metadata.get(c, {}) for c in self.train_cases]))

    def _dataset_json(self) -> dict[str, Any]:
        path = self.preprocessed_dataset_dir / DATASET_JSON
        if not path.is_file():
            raise NnDiffError(f"{path} not found, but the plan's network is conditioned: its 'conditions' block "
                              "says how metadata map to class labels. Fix: copy the raw dataset.json there "
                              "(nndiff_extract_fingerprint does)")
        return load_json(path)

    def _set_conditions(self, encoder: ConditionEncoder) -> None:
        encoder.check_network(self.configuration.get("network", {}))
        self.conditions = encoder
        self._case_labels = {c: encoder.class_label(m) for c, m in self.case_metadata.items()}
        self._case_continuous = {c: encoder.continuous_values(m) for c, m in self.case_metadata.items()}
        unlabelled = [c for c in self.train_cases if encoder.categorical and self._case_labels.get(c) == NULL_LABEL]
        if unlabelled:
            self.log(f"{len(unlabelled)} training case(s) without a valid categorical condition train the null "
                     f"class: {', '.join(unlabelled[:5])}", level=logging.WARNING)

    @property
    def is_conditional(self) -> bool:
        return bool(self.conditions.categorical or self.conditions.continuous)

    # ---- hooks ----------------------------------------------------------------------------------
    def make_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Base tensors plus ``class_labels`` / ``continuous`` of the batch's cases (if conditioned)."""
        out = super().make_batch(batch)
        keys = out["keys"]
        if self.conditions.categorical:
            out["class_labels"] = torch.tensor([self._case_labels.get(k, NULL_LABEL) for k in keys],
                                               dtype=torch.long, device=self.device)
        if self.conditions.continuous:
            nan_row = [math.nan] * self.conditions.num_continuous
            out["continuous"] = torch.tensor([self._case_continuous.get(k, nan_row) for k in keys],
                                             dtype=torch.float32, device=self.device
                                             ).reshape(len(keys), self.conditions.num_continuous)
        return out

    def compute_loss(self, network: nn.Module, batch: Mapping[str, Any], *, train: bool,
                     generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted diffusion loss on the plan's target; conditions dropped with ``condition_dropout`` in training."""
        labels, continuous = batch.get("class_labels"), batch.get("continuous")
        if train and self.diffusion.condition_dropout > 0:
            labels, continuous = drop_conditions(labels, continuous, self.diffusion.condition_dropout)
        loss = self.weighted_diffusion_loss(
            batch["data"], lambda x_t, time: network(x_t, time, class_labels=labels, continuous=continuous),
            train=train, generators=generators)
        return loss, {}

    # ---- sample grid ----------------------------------------------------------------------------
    def grid_conditions(self, num_samples: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Conditions of the grid: those of the first training cases, cycled (shows what conditioning does)."""
        if not self.is_conditional or not self.train_cases:
            return None, None
        cases = [self.train_cases[i % len(self.train_cases)] for i in range(num_samples)]
        if self.conditions.categorical and self.conditions.num_classes:
            # Cycle the classes instead, so every class appears in the grid.
            labels = torch.arange(num_samples, device=self.device) % self.conditions.num_classes
        else:
            labels = None
        _, continuous = self.conditions.encode([self.case_metadata.get(c, {}) for c in cases], self.device)
        return labels, continuous

    def write_sample_grid(self, epoch: int) -> torch.Tensor:
        """Sample with the EMA network and the planned sampler (few steps); write ``samples_epoch_XXXX.png``."""
        num = GRID_SAMPLES.get(self.spec.spatial_dims, 4)
        labels, continuous = self.grid_conditions(num)
        generator = torch_generator(self.seed + GRID_SEED_OFFSET, self.device)
        steps = min(GRID_SAMPLING_STEPS, self.diffusion.num_sampling_steps)
        images = sample_images(self.validation_network, self.configuration, num, generator=generator,
                               device=self.device, class_labels=labels, continuous=continuous, num_steps=steps,
                               autocast_dtype=self.autocast_dtype)
        path = self.output_dir / f"samples_epoch_{epoch:04d}.png"
        low, high = self.diffusion.clip_x0 or (-1.0, 1.0)
        save_image_grid(images, path, value_range=(low, high))
        self.log(f"wrote {path.name} ({num} samples, {steps} {self.diffusion.sampler.value} steps)")
        return images

    def on_epoch_end(self, epoch: int, record: Mapping[str, float]) -> None:
        """Sample grid on progress epochs and after the last epoch."""
        if self.is_progress_epoch(epoch) or self.iteration >= self.total_iterations:
            self.write_sample_grid(epoch)

    # ---- checkpoint extras ----------------------------------------------------------------------
    def checkpoint_extra_state(self) -> dict[str, Any]:
        """The condition encoding (the predictor needs it) and the importance sampler's history."""
        state: dict[str, Any] = {"conditions": self.conditions.to_dict()}
        return {**state, **self.time_sampler_extra()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "conditions" in state and (state["conditions"].get("categorical") or state["conditions"].get("continuous")):
            self._set_conditions(ConditionEncoder.from_dict(state["conditions"]))
        self.load_time_sampler_extra(state)
