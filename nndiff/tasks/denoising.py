"""Denoising family: diffusion of clean images conditioned on their noisy version.

Two training modes, told apart by dataset.json:

- **paired** (``target_names`` + ``targetsTr``): noisy ``imagesTr`` -> clean ``targetsTr``. This is
  image-conditioned diffusion of the targets exactly as in translation, so :class:`DenoisingTrainer`
  reuses :class:`~nndiff.tasks.translation.TranslationTrainer` for it.
- **clean-only** (no targets): the network diffuses the clean images and its condition is a noisy
  copy simulated on the fly, every iteration, with a freshly drawn level (one per case), by
  :func:`nndiff.tasks.degradations.simulate` **in original units** (the normalised clean patch is
  mapped back through the plan's normalization, degraded, and normalised again with the same map,
  clip included, as inference normalises a real noisy image).

The degradation is the planner's decision, read from the configuration's ``degradation`` block
(:func:`nndiff.planning.diffusion.decide_degradation`: dataset.json ``"degradation"`` or, without
it, the modality: Rician for magnitude MR, low-dose Poisson *in projection* for CT (``ct: true``),
Poisson for PET, Gaussian otherwise), with the plan's reason. For ``ct: true`` the trainer projects
each patch with a full-view parallel-beam geometry (:func:`ct_projector`) and reconstructs it by
filtered back-projection (:class:`nndiff.tasks.operators.ParallelBeamCT`). The choice and its
reason are logged and written to ``debug.json`` (``degradation``).

In both modes the condition is replaced by zeros with probability
:attr:`DenoisingTrainer.condition_drop_probability` (classifier-free-guidance style), so the same
network is also an unconditional prior: the warm-start strategy of the predictor
(R2D2+ / come-closer-diffuse-faster) can run it with the null (zero) condition.
See ``documentation/denoising.md``.
"""
from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from nndiff.diffusion.options import Degradation, parse_option
from nndiff.errors import NnDiffError, PlansError
from nndiff.preprocessing import normalization as norm
from nndiff.tasks.degradations import CTProjector, DegradationError, simulate
from nndiff.tasks.operators import ParallelBeamCT, parallel_beam_angles
from nndiff.tasks.translation import TranslationTrainer, availability, condition_image
from nndiff.training import Trainer, register_trainer

logger = logging.getLogger(__name__)

#: Configuration key of the planner's clean-only degradation decision.
DEGRADATION_KEY = "degradation"
#: Probability of training a sample with the null (zero) condition.
CONDITION_DROP_PROBABILITY = 0.1


# ----------------------------------------------------------------------------------------------
# The degradation of clean-only training
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DegradationSetting:
    """What clean-only training simulates: ``kind`` at a level drawn from ``level`` ([low, high]);
    ``ct``: Poisson noise in projection (low dose) instead of in the image."""

    kind: Degradation
    level: tuple[float, float]
    reason: str
    ct: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind.value, "level": list(self.level), "ct": self.ct, "reason": self.reason}


def degradation_from_plan(configuration: Mapping[str, Any], plans_reasons: Mapping[str, Any] | None,
                          where: str) -> DegradationSetting:
    """The planner's ``degradation`` block of a clean-only denoising configuration, validated."""
    block = configuration.get(DEGRADATION_KEY)
    if not isinstance(block, Mapping) or "type" not in block or "level" not in block:
        raise PlansError(f"{where} has no valid '{DEGRADATION_KEY}' block for clean-only denoising (found "
                         f"{block!r}). Fix: re-run nndiff_plan_and_preprocess (the planner decides it)")
    try:
        kind = parse_option(Degradation, str(block["type"]), "degradation type")
    except ValueError as error:
        raise PlansError(f"{where} '{DEGRADATION_KEY}': {error}. Fix: re-run planning") from None
    level = block["level"]
    if not (isinstance(level, (list, tuple)) and len(level) == 2 and 0 < float(level[0]) <= float(level[1])):
        raise PlansError(f"{where} '{DEGRADATION_KEY}.level' must be [low, high] with 0 < low <= high, got "
                         f"{level!r}. Fix: re-run planning")
    ct = bool(block.get("ct", False))
    if ct and kind is not Degradation.POISSON:
        raise PlansError(f"{where} '{DEGRADATION_KEY}' has ct true with type {kind.value!r}; low-dose CT is "
                         "Poisson in projection. Fix: re-run planning")
    reason = str((plans_reasons or {}).get(DEGRADATION_KEY) or f"planned ({block.get('source', 'plan')})")
    return DegradationSetting(kind, (float(level[0]), float(level[1])), reason, ct)


def ct_projector(patch_size: Sequence[int], spacing: Sequence[float]) -> CTProjector:
    """Full-view parallel-beam projector of a patch's in-plane grid for low-dose CT simulation:
    ceil(pi/2 * side) views over 180 degrees (angular Nyquist rate for the patch), FBP with a ramp
    filter as the reconstruction; pixel size = the in-plane spacing (mm), so HU become attenuation
    per pixel. 3D patches are projected slice by slice (the operator folds leading axes)."""
    height, width = int(patch_size[-2]), int(patch_size[-1])
    views = int(math.ceil(math.pi / 2 * max(height, width)))
    operator = ParallelBeamCT((height, width), parallel_beam_angles(views))
    return CTProjector(operator.forward, operator.fbp, pixel_mm=float(spacing[-1]))


# ----------------------------------------------------------------------------------------------
# Normalization as an affine map (torch), to simulate noise in original units
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AffineNormalization:
    """``original = scale * y + offset``; ``bounded``: the forward map clips to [-1, 1]."""

    scale: float
    offset: float
    bounded: bool

    def to_original(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale + self.offset

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - self.offset) / self.scale
        return y.clamp(-1.0, 1.0) if self.bounded else y


def affine_normalization(entry: Mapping[str, Any], image_values: Mapping[str, float] | None = None
                         ) -> AffineNormalization:
    """The plan's normalization ``entry`` of one channel as an affine map (every scheme is affine;
    ``per_image_percentile`` needs the image's stored ``image_values``)."""
    entry = dict(entry)
    try:
        bounds = norm.window(entry, dict(image_values) if image_values else None)
    except ValueError as error:
        raise PlansError(f"normalization of channel {entry.get('channel', '?')}: {error}. Fix: re-run "
                         "preprocessing") from None
    if bounds is not None:
        lo, hi = bounds
        half = (hi - lo) / 2.0
        return AffineNormalization(half, lo + half, True)
    if str(entry.get("scheme")) == "scale_only":
        return AffineNormalization(float(entry["params"]["scale"]), 0.0, False)
    return AffineNormalization(1.0, 0.0, False)


def degrade_normalised(clean: torch.Tensor, maps: Sequence[AffineNormalization], setting: DegradationSetting,
                       generator: torch.Generator | None, ct: CTProjector | None = None) -> torch.Tensor:
    """A noisy copy of normalised ``clean`` ``(B, C, *spatial)``: back to original units per channel,
    ``simulate`` (one level per case, reference = the case's maximum; with ``setting.ct`` low-dose CT
    through ``ct``), normalised again."""
    if setting.ct and ct is None:
        raise PlansError("the planned degradation is low-dose CT (ct true) but no projector was given")
    if len(maps) != clean.shape[1]:
        raise PlansError(f"{len(maps)} normalization entries for {clean.shape[1]} channel(s). Fix: re-run planning")
    original = torch.cat([m.to_original(clean[:, c:c + 1]) for c, m in enumerate(maps)], dim=1)
    if setting.kind is Degradation.POISSON and not setting.ct and float(original.min()) < 0:
        raise DegradationError(f"the Poisson degradation needs non-negative intensities but the images reach "
                               f"{float(original.min()):g} in original units. Fix: set dataset.json "
                               "'degradation' to gaussian (or rician for MR)")
    noisy = simulate(setting.kind, original, list(setting.level), generator, ct=ct if setting.ct else None)
    return torch.cat([m.to_model(noisy[:, c:c + 1]) for c, m in enumerate(maps)], dim=1).to(clean.dtype)


def validation_generator(seed: int, keys: Sequence[str], device: torch.device) -> torch.Generator:
    """A generator fixed by the run's seed and the batch's case keys (same validation noise each epoch)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((int(seed) * 1_000_003 + zlib.crc32("|".join(keys).encode())) % (2 ** 63 - 1))
    return generator


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
@register_trainer
class DenoisingTrainer(TranslationTrainer):
    """Clean images diffused conditioned on noisy ones: paired (noisy imagesTr -> clean targetsTr)
    or clean-only (noisy condition simulated every iteration). See the module docstring."""

    condition_drop_probability: float = CONDITION_DROP_PROBABILITY

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.paired = False
        self.degradation: DegradationSetting | None = None
        self.ct: CTProjector | None = None
        self.normalization_maps: list[AffineNormalization] = []

    def initialize(self) -> None:
        """Base initialisation, then the mode and (clean-only) the degradation, logged with its reason."""
        if self.initialized:
            return
        super().initialize()
        dataset_json = self._dataset_json()
        self.paired = "target_names" in dataset_json
        if self.paired:
            return
        entries = (self.plans.get("normalization") or {}).get("images") or []
        self.degradation = degradation_from_plan(
            self.configuration, self.configuration.get("reasons"),
            f"configuration {self.configuration_name!r} of {self.preprocessed_dataset_dir / 'nnDiffPlans.json'}")
        if self.degradation.ct:
            self.ct = ct_projector(self.configuration["patch_size"], self.configuration["spacing"])
        if any(str(e.get("scheme")) == "per_image_percentile" for e in entries):
            raise PlansError("clean-only denoising produces the images, but the plan normalises them per image "
                             "(per_image_percentile), which has no fixed inverse for simulation. Fix: re-run "
                             "planning with task 'denoising'")
        self.normalization_maps = [affine_normalization(e) for e in entries]

    def on_train_start(self) -> None:
        """Log the mode and (clean-only) the degradation with its reason (the log file is open now)."""
        super().on_train_start()
        if self.paired:
            self.log("denoising, paired mode: noisy imagesTr condition the diffusion of clean targetsTr")
            return
        assert self.degradation is not None
        self.log(f"denoising, clean-only mode: degradation {self.degradation.kind.value} level "
                 f"{list(self.degradation.level)}{' in projection (low-dose CT)' if self.degradation.ct else ''} "
                 f"({self.degradation.reason})")

    def debug_info(self) -> dict[str, Any]:
        info = super().debug_info()
        info["denoising_mode"] = "paired" if self.paired else "clean_only"
        info["degradation"] = self.degradation.to_json() if self.degradation else None
        info["condition_drop_probability"] = self.condition_drop_probability
        return info

    # ---- batches --------------------------------------------------------------------------------
    def make_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Paired: translation's batch. Clean-only: the clean images are both ``data`` and ``target``
        (the noisy condition is made in :meth:`batch_condition`)."""
        if self.paired:
            return super().make_batch(batch)
        out = Trainer.make_batch(self, batch)
        out["target"] = out["data"]
        assert self.layout is not None, "initialize() first"
        out["available"] = availability([[] for _ in out["keys"]], self.layout.num_images, self.device)
        return out

    def batch_condition(self, batch: Mapping[str, Any], train: bool) -> torch.Tensor:
        """The noisy condition (simulated in clean-only mode; fixed per batch in validation), replaced
        by zeros per sample with :attr:`condition_drop_probability` in training."""
        if self.paired:
            cond = super().batch_condition(batch, train)
        else:
            assert self.degradation is not None and self.layout is not None
            generator = None if train else validation_generator(self.seed, batch["keys"], self.device)
            noisy = degrade_normalised(batch["target"], self.normalization_maps, self.degradation, generator, self.ct)
            cond = condition_image(noisy, batch["available"], self.layout)
        if train and self.condition_drop_probability > 0:
            keep = torch.rand(cond.shape[0], device=cond.device) >= self.condition_drop_probability
            cond = cond * keep.to(cond.dtype).reshape(-1, *([1] * (cond.ndim - 1)))
        return cond

    def compute_loss(self, network: nn.Module, batch: Mapping[str, Any], *, train: bool,
                     generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        if "target" not in batch:
            raise NnDiffError(f"batch of cases {', '.join(batch.get('keys', []))} has no clean target. Fix: re-run "
                              "nndiff_preprocess")
        return super().compute_loss(network, batch, train=train, generators=generators)

    def checkpoint_extra_state(self) -> dict[str, Any]:
        """Translation's state plus the mode and degradation (the predictor and evaluation read them)."""
        state = super().checkpoint_extra_state()
        state["denoising"] = {"paired": self.paired,
                              "degradation": self.degradation.to_json() if self.degradation else None}
        return state
