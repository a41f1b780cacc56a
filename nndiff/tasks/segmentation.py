"""Segmentation family: image-conditioned mask diffusion and a deterministic supervised baseline.

Label encoding (``sampling.label_encoding: one_hot``, the planner's channel count = number of
dataset.json ``labels`` entries):

- plain labels ``{"background": 0, "a": 1, "b": 2}``: one channel per label value, in increasing
  value order (channel 0 is the lowest value, background);
- nnU-Net regions (a label entry is a list of several values, e.g. BraTS ``"tumor core": [2, 3]``):
  channel 0 is the background (voxels in no region), then one channel per region in dataset.json
  order; regions overlap, so several region channels may be 1 at a voxel. The label map is rebuilt
  with ``regions_class_order`` (nnU-Net: region i > 0.5 paints value ``regions_class_order[i]``,
  later regions over earlier ones).

:class:`SegmentationDiffusionTrainer` diffuses the encoded mask scaled to [-1, 1]
(SegDiff / MedSegDiff style) with the image channels concatenated as ``cond_image``; loss,
weighting, noise and t sampling come from the plan's ``diffusion`` block.
:class:`SegmentationBaselineTrainer` trains the *same* UNet (the plan's network block unchanged)
as a deterministic segmenter: its diffused-input channels are fed zeros and t is fixed to 0, and
the output channels are logits trained with soft Dice + cross-entropy (nnU-Net's loss; sigmoid
BCE for regions). Keeping the plan's block means both models load through the same code and
differ only in what they were trained to do. See ``documentation/segmentation.md``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nndiff.errors import NnDiffError, PlansError
from nndiff.tasks.translation import network_model_fn, sample_translation
from nndiff.training.diffusion_parts import DiffusionPartsMixin
from nndiff.training import Trainer, register_trainer, save_image_grid
from nndiff.training.data import validation_batches
from nndiff.training.rng import torch_generator
from nndiff.utils.files import load_json

logger = logging.getLogger(__name__)

#: dataset.json key of the nnU-Net region order used to rebuild a label map from region channels.
REGIONS_CLASS_ORDER_KEY = "regions_class_order"
#: Sample grid: at most this many validation patches, sampled with at most this many steps.
GRID_CASES = 4
GRID_SAMPLING_STEPS = 10
GRID_SEED_OFFSET = 7919
#: Smoothing of the soft Dice (nnU-Net uses 1e-5 with batch Dice).
DICE_SMOOTH = 1e-5


# ----------------------------------------------------------------------------------------------
# Label scheme: dataset.json labels <-> network channels
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelScheme:
    """How label maps become network channels and back.

    ``names[c]`` / ``values[c]``: channel c's name and the label values it covers (one value for
    plain labels; a region's values; channel 0 of a region scheme is the background, ``()``).
    ``class_order``: for regions, the value each region channel (1..R) paints in the label map.
    """

    names: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]
    is_region: bool
    class_order: tuple[int, ...] | None = None

    @property
    def num_channels(self) -> int:
        return len(self.names)

    @property
    def declared_values(self) -> set[int]:
        found = {v for group in self.values for v in group}
        return found | {0} if self.is_region else found


def _as_values(name: str, value: Any) -> tuple[int, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
        raise PlansError(f"dataset.json 'labels' entry {name!r} must be an integer >= 0 or a list of them, got "
                         f"{value!r}. Fix: e.g. \"{name}\": 1 or \"{name}\": [1, 2]")
    return tuple(int(v) for v in items)


def _region_order(dataset_json: Mapping[str, Any], num_regions: int) -> tuple[int, ...] | None:
    order = dataset_json.get(REGIONS_CLASS_ORDER_KEY)
    if order is None:
        return None
    if (not isinstance(order, list) or len(order) != num_regions
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in order)):
        raise PlansError(f"dataset.json '{REGIONS_CLASS_ORDER_KEY}' must list one label value > 0 per region "
                         f"({num_regions} regions), got {order!r}. Fix: e.g. {list(range(1, num_regions + 1))}")
    return tuple(order)


def label_scheme(dataset_json: Mapping[str, Any]) -> LabelScheme:
    """The channel layout of dataset.json ``labels`` (plain labels or nnU-Net regions)."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise PlansError("dataset.json key 'labels' is missing or empty; segmentation needs it. "
                         "Fix: declare {\"background\": 0, \"structure\": 1, ...}")
    parsed = {str(name): _as_values(str(name), value) for name, value in labels.items()}
    if not any(len(v) > 1 for v in parsed.values()):
        by_value = sorted(parsed.items(), key=lambda item: item[1][0])
        values = [v for _, v in by_value]
        if len(set(values)) != len(values) or values[0] != (0,):
            raise PlansError(f"dataset.json 'labels' {dict(labels)} must give distinct values with background 0. "
                             "Fix: one value per label, e.g. {\"background\": 0, \"a\": 1, \"b\": 2}")
        return LabelScheme(tuple(n for n, _ in by_value), tuple(values), False)
    background = [n for n, v in parsed.items() if v == (0,)]
    if len(background) != 1:
        raise PlansError(f"dataset.json 'labels' {dict(labels)} uses regions but has no single background entry "
                         "with value 0. Fix: add \"background\": 0")
    regions = [(n, v) for n, v in parsed.items() if n != background[0]]
    if any(0 in v for _, v in regions):
        raise PlansError("dataset.json 'labels': a region must not contain 0 (background). Fix: remove 0 from it")
    order = _region_order(dataset_json, len(regions))
    return LabelScheme((background[0], *(n for n, _ in regions)), ((), *(v for _, v in regions)), True, order)


def check_scheme_channels(scheme: LabelScheme, network_block: Mapping[str, Any]) -> None:
    """The plan's network must diffuse (and output) one channel per scheme channel."""
    in_channels = int(network_block.get("in_channels", -1))
    out_channels = int(network_block.get("out_channels", -1))
    if in_channels != scheme.num_channels or out_channels != scheme.num_channels:
        raise PlansError(f"the plan's network has in_channels {in_channels} / out_channels {out_channels}, but "
                         f"dataset.json labels give {scheme.num_channels} channels ({', '.join(scheme.names)}). "
                         "Fix: re-run planning with this dataset.json")


def _bad_values(seg: torch.Tensor, scheme: LabelScheme) -> list[int]:
    present = torch.unique(seg).tolist()
    return sorted(int(v) for v in present if int(v) not in scheme.declared_values)


def encode_labels(seg: torch.Tensor, scheme: LabelScheme, where: str = "label map") -> torch.Tensor:
    """Label maps ``(B, 1, *spatial)`` (integers) -> channel masks ``(B, C, *spatial)`` float {0, 1}.

    A value that dataset.json does not declare is a :class:`NnDiffError` naming ``where``.
    """
    bad = _bad_values(seg, scheme)
    if bad:
        raise NnDiffError(f"{where}: label value(s) {bad} are not declared in dataset.json 'labels' "
                          f"(declared: {sorted(scheme.declared_values)}). Fix: declare them or correct the label "
                          "files, then re-run preprocessing")
    seg = seg[:, 0].long()
    if scheme.is_region:
        regions = [torch.isin(seg, torch.tensor(v, device=seg.device)) for v in scheme.values[1:]]
        stacked = torch.stack(regions, dim=1)
        background = ~stacked.any(dim=1, keepdim=True)
        return torch.cat([background, stacked], dim=1).float()
    lookup = torch.zeros(max(scheme.declared_values) + 1, dtype=torch.long, device=seg.device)
    for channel, (value,) in enumerate(scheme.values):
        lookup[value] = channel
    return F.one_hot(lookup[seg], scheme.num_channels).movedim(-1, 1).float()


def to_signed(masks: torch.Tensor) -> torch.Tensor:
    """{0, 1} channel masks -> the diffused x0 in {-1, 1}."""
    return masks * 2.0 - 1.0


def channels_to_picture(x: torch.Tensor) -> torch.Tensor:
    """Channel maps ``(B, C, H, W)`` -> argmax channel scaled to [-1, 1] ``(B, 1, H, W)``, for grids."""
    return x.argmax(dim=1, keepdim=True).float() / max(x.shape[1] - 1, 1) * 2 - 1


def image_to_picture(images: torch.Tensor) -> torch.Tensor:
    """First image channel ``(B, 1, H, W)`` min-max scaled to [-1, 1] per image (z-scored data
    has no fixed range)."""
    first = images[:, :1].float()
    low = first.amin(dim=(2, 3), keepdim=True)
    high = first.amax(dim=(2, 3), keepdim=True)
    return (first - low) / (high - low).clamp_min(1e-6) * 2 - 1


def read_dataset_json(preprocessed_dataset_dir: str | Path) -> dict[str, Any]:
    """The dataset.json preprocessing copied beside the plans (labels live there)."""
    path = Path(preprocessed_dataset_dir) / "dataset.json"
    if not path.is_file():
        raise NnDiffError(f"{path} does not exist: segmentation reads its labels there. Fix: re-run "
                          "nndiff_plan_and_preprocess")
    return load_json(path)


# ----------------------------------------------------------------------------------------------
# Deterministic baseline: network call and loss
# ----------------------------------------------------------------------------------------------
def baseline_logits(network: nn.Module, images: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Logits ``(B, C, *spatial)`` of the baseline: the diffusion UNet with its noisy-input
    channels set to zeros and t = 0, so only the image (``cond_image``) informs the output."""
    zeros = images.new_zeros((images.shape[0], num_channels, *images.shape[2:]))
    t = torch.zeros(images.shape[0], device=images.device)
    return network(zeros, t, cond_image=images)


def logits_to_probabilities(logits: torch.Tensor, is_region: bool) -> torch.Tensor:
    """Softmax over channels (plain labels) or per-channel sigmoid (regions overlap)."""
    return torch.sigmoid(logits) if is_region else torch.softmax(logits, dim=1)


def soft_dice(probabilities: torch.Tensor, masks: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    """Batch soft Dice (nnU-Net's batch_dice) averaged over ``channels``."""
    axes = [0, *range(2, probabilities.ndim)]
    p, y = probabilities[:, list(channels)], masks[:, list(channels)]
    intersection = (p * y).sum(axes)
    denominator = p.sum(axes) + y.sum(axes)
    return ((2 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH)).mean()


def dice_ce_loss(logits: torch.Tensor, masks: torch.Tensor, is_region: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """nnU-Net's loss: cross-entropy (BCE per channel for regions) + (1 - soft Dice over the
    foreground channels; channel 0, the background, is left out as nnU-Net's do_bg=False)."""
    logits = logits.float()
    if is_region:
        ce = F.binary_cross_entropy_with_logits(logits, masks)
    else:
        ce = F.cross_entropy(logits, masks.argmax(dim=1))
    dice = soft_dice(logits_to_probabilities(logits, is_region), masks, range(1, masks.shape[1]))
    return ce + (1 - dice), {"ce": float(ce.detach()), "dice": float(dice.detach())}


# ----------------------------------------------------------------------------------------------
# Shared trainer setup
# ----------------------------------------------------------------------------------------------
class SegmentationTrainerBase(Trainer):
    """Shared by both segmentation trainers (not registered): the label scheme from the
    preprocessed dataset.json, checked against the plan's network, and batch label encoding."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "network" not in self.configuration:
            raise PlansError(f"configuration {self.configuration_name!r} has no 'network' block. Fix: re-run planning")
        self.scheme: LabelScheme = label_scheme(read_dataset_json(self.preprocessed_dataset_dir))
        check_scheme_channels(self.scheme, self.configuration["network"])

    def batch_masks(self, batch: Mapping[str, Any], out: Mapping[str, Any]) -> torch.Tensor:
        """Channel masks ``(B, C, *patch)`` of the batch's label patches (undeclared values: error)."""
        if "seg" not in batch:
            raise NnDiffError(f"preprocessed cases {', '.join(batch['keys'])} in {self.data_folder} have no 'seg' "
                              "array: segmentation trains on labelsTr. Fix: add labelsTr/ to the raw dataset and "
                              "re-run nndiff_preprocess")
        where = f"cases {', '.join(out['keys'])} in {self.data_folder}"
        return encode_labels(out["seg"], self.scheme, where=where)

    def checkpoint_extra_state(self) -> dict[str, Any]:
        """The label channel layout, so a predictor can check it against its dataset.json."""
        return {"label_channels": list(self.scheme.names), "is_region": self.scheme.is_region}


# ----------------------------------------------------------------------------------------------
# The trainers
# ----------------------------------------------------------------------------------------------
@register_trainer
class SegmentationDiffusionTrainer(DiffusionPartsMixin, SegmentationTrainerBase):
    """Diffusion of the one-hot (or region) mask in [-1, 1] conditioned on the image channels.

    Loss: ``diffusion_loss`` with the plan's parameterization, weighting and noise type; t uniform
    or importance-sampled; validation on fixed per-case (t, noise) pairs (the base's behaviour).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setup_diffusion("network")

    def make_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Base tensors plus ``x0``: the encoded label patch scaled to [-1, 1]."""
        out = super().make_batch(batch)
        out["x0"] = to_signed(self.batch_masks(batch, out))
        return out

    def compute_loss(self, network: nn.Module, batch: Mapping[str, Any], *, train: bool,
                     generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted diffusion loss on the mask channels, conditioned on the images."""
        loss = self.weighted_diffusion_loss(batch["x0"], lambda x_t, time: network(x_t, time, cond_image=batch["data"]),
                                            train=train, generators=generators)
        return loss, {}

    # ---- sample grid ----------------------------------------------------------------------------
    def write_sample_grid(self, epoch: int) -> torch.Tensor | None:
        """Rows of (image channel 0, sampled mask, reference mask) for the first validation
        patches (2D only), sampled with the EMA network in few steps: ``samples_epoch_XXXX.png``."""
        items = self.validation_items[:GRID_CASES]
        if not items or self.spec.spatial_dims != 2:
            return None  # 3D patches have no single picture; the validation loss tracks them
        numpy_batch, _ = next(validation_batches(items, len(items)))
        batch = self.make_batch(numpy_batch)
        generator = torch_generator(self.seed + GRID_SEED_OFFSET, self.device)
        network = self.validation_network
        was_training = network.training
        network.eval()
        try:
            with torch.no_grad(), self.autocast():
                samples = sample_translation(network_model_fn(network), self.configuration, batch["data"],
                                             generator=generator,
                                             num_steps=min(GRID_SAMPLING_STEPS, self.diffusion.num_sampling_steps))
        finally:
            network.train(was_training)
        rows = torch.stack([image_to_picture(batch["data"]), channels_to_picture(samples),
                            channels_to_picture(batch["x0"])], dim=1)  # (B, 3, 1, H, W)
        path = self.output_dir / f"samples_epoch_{epoch:04d}.png"
        save_image_grid(rows.flatten(0, 1), path, value_range=(-1.0, 1.0), ncols=3)
        self.log(f"wrote {path.name} ({len(items)} validation patches: image | sampled mask | reference)")
        return samples

    def on_epoch_end(self, epoch: int, record: Mapping[str, float]) -> None:
        if self.is_progress_epoch(epoch) or self.iteration >= self.total_iterations:
            self.write_sample_grid(epoch)

    def checkpoint_extra_state(self) -> dict[str, Any]:
        state = super().checkpoint_extra_state()
        return {**state, **self.time_sampler_extra()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.load_time_sampler_extra(state)


@register_trainer
class SegmentationBaselineTrainer(SegmentationTrainerBase):
    """Deterministic supervised baseline: the plan's UNet with zero noisy input and t = 0,
    trained with soft Dice + cross-entropy (sigmoid BCE + Dice for regions). Validation loss is
    the same loss on the fixed validation patches (no randomness to fix)."""

    def make_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = super().make_batch(batch)
        out["masks"] = self.batch_masks(batch, out)
        return out

    def compute_loss(self, network: nn.Module, batch: Mapping[str, Any], *, train: bool,
                     generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        logits = baseline_logits(network, batch["data"], self.scheme.num_channels)
        return dice_ce_loss(logits, batch["masks"], self.scheme.is_region)


# Importing the trainers (the trainer registry imports this module) registers their predictors too,
# until nndiff.inference.registry.PREDICTOR_MODULES lists nndiff.tasks.segmentation_predictor.
from nndiff.tasks import segmentation_predictor  # noqa: E402,F401  (registers the predictors)
