"""Translation family: paired image-to-image diffusion (e.g. MR contrasts → CT).

The network diffuses the *target* channels (``targetsTr``) and sees the normalised conditioning
images (``imagesTr``) concatenated to its input through ``cond_channels`` (planned by
``nndiff.planning.topology.decide_channels``). Loss, weighting, noise type and t sampling are the
generation family's (from the plan's ``diffusion`` block).

Missing source channels (dataset.json ``"allow_missing_channels": true``, UMM-CSGM's
missing-modality completion): a missing channel is zero-filled and, when the plan gives the network
``cond_channels = 2 × image channels``, a per-channel availability mask (1 available, 0 missing;
constant over the image) is concatenated after the images. In training every available channel is
additionally dropped with probability :attr:`TranslationTrainer.channel_drop_probability` (never
all of a sample's channels), so the model learns to complete any subset. A preprocessed case marks
its missing channels in ``CASE.json`` as ``"missing_channels": [index, ...]`` (:data:`MISSING_CHANNELS_KEY`);
the stored values of those channels are ignored. See ``documentation/translation.md``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from nndiff.diffusion.config import DiffusionConfig, build_process, build_sampler
from nndiff.diffusion.samplers import sample
from nndiff.errors import NnDiffError, PlansError
from nndiff.preprocessing.case_io import MISSING_CHANNELS_KEY  # CASE.json: channels a case lacks
from nndiff.training.diffusion_parts import DiffusionPartsMixin
from nndiff.training import Trainer, register_trainer, save_image_grid
from nndiff.training.data import load_case_json
from nndiff.training.rng import torch_generator
from nndiff.utils.files import load_json

logger = logging.getLogger(__name__)

#: dataset.json key that allows cases without some source channels.
ALLOW_MISSING_KEY = "allow_missing_channels"
#: Probability of dropping each available source channel per training sample (mask mode only).
CHANNEL_DROP_PROBABILITY = 0.1
#: Sample grid: at most this many validation cases, sampled with at most this many steps.
GRID_CASES = 4
GRID_SAMPLING_STEPS = 10
GRID_SEED_OFFSET = 7919

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Conditioning layout and availability masks
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConditionLayout:
    """What the network's ``cond_channels`` hold: ``num_images`` source channels, then (with
    ``with_mask``) one availability channel per source channel."""

    num_images: int
    with_mask: bool

    @property
    def cond_channels(self) -> int:
        return self.num_images * (2 if self.with_mask else 1)


def condition_layout(network_block: Mapping[str, Any], num_images: int) -> ConditionLayout:
    """The layout implied by the plan: ``cond_channels`` = C (images only) or 2C (images + mask)."""
    cond = int(network_block.get("cond_channels", 0))
    if num_images < 1:
        raise PlansError("translation needs at least one conditioning image channel; the data has none. "
                         "Fix: check channel_names in dataset.json and re-run preprocessing")
    if cond == num_images:
        return ConditionLayout(num_images, False)
    if cond == 2 * num_images:
        return ConditionLayout(num_images, True)
    raise PlansError(f"the plan's network has cond_channels {cond} but the data has {num_images} conditioning "
                     f"channel(s): translation needs {num_images} (images) or {2 * num_images} (images + "
                     "missing-channel mask). Fix: re-run planning, or correct network.cond_channels in the "
                     "configuration")


def availability(missing: Sequence[Sequence[int]], num_images: int, device: torch.device | str) -> torch.Tensor:
    """``(B, C)`` float tensor: 1 where sample b has source channel c, 0 where it is missing."""
    mask = torch.ones(len(missing), num_images, device=device)
    for row, channels in enumerate(missing):
        for channel in channels:
            mask[row, int(channel)] = 0.0
    return mask


def drop_channels(available: torch.Tensor, probability: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Drop each available channel with ``probability``, keeping at least one per sample
    (a sample whose draws would drop everything keeps its channels unchanged)."""
    if probability <= 0:
        return available
    keep = torch.rand(available.shape, generator=generator, device=available.device) >= probability
    dropped = available * keep.to(available.dtype)
    empty = dropped.sum(dim=1) == 0
    return torch.where(empty[:, None], available, dropped)


def condition_image(images: torch.Tensor, available: torch.Tensor, layout: ConditionLayout) -> torch.Tensor:
    """The network's ``cond_image``: source channels with missing ones zero-filled, then (mask
    mode) the availability map broadcast over space. ``images`` ``(B, C, *spatial)``."""
    if images.shape[1] != layout.num_images:
        raise NnDiffError(f"conditioning images have {images.shape[1]} channel(s); the model was trained with "
                          f"{layout.num_images}. Fix: give every channel of dataset.json's channel_names")
    shape = (*available.shape, *([1] * (images.ndim - 2)))
    mask = available.to(images.dtype).reshape(shape)
    filled = images * mask
    if not layout.with_mask:
        return filled
    return torch.cat([filled, mask.expand_as(images)], dim=1)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def network_model_fn(network: nn.Module) -> ModelFn:
    """``model(x, t, cond)`` for the sampling loop; ``cond`` is ``{"cond_image": tensor}``."""

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return network(x, t, cond_image=(cond or {}).get("cond_image")).float()

    return model_fn


def sample_translation(model_fn: ModelFn, configuration: Mapping[str, Any], cond_image: torch.Tensor, *,
                       generator: torch.Generator | None, sampler: str | None = None,
                       num_steps: int | None = None) -> torch.Tensor:
    """Sample targets ``(B, in_channels, *spatial)`` (normalised units, float32) for ``cond_image``
    ``(B, cond_channels, *spatial)`` with the plan's sampler and steps (or the overrides).

    ``model_fn(x, t, {"cond_image": ...})``: the network, a fold ensemble or a sliding-window
    wrapper. Every random draw comes from ``generator`` (same seed → same sample).
    """
    diffusion = DiffusionConfig.from_dict(configuration.get("diffusion", {}))
    process = build_process(diffusion)
    the_sampler = build_sampler(diffusion, sampler, num_steps, process=process)
    in_channels = int(configuration["network"]["in_channels"])
    shape = (cond_image.shape[0], in_channels, *cond_image.shape[2:])
    out = sample(the_sampler, model_fn, shape, cond={"cond_image": cond_image}, generator=generator,
                 device=cond_image.device)
    return out.sample.float()


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
@register_trainer
class TranslationTrainer(DiffusionPartsMixin, Trainer):
    """Diffusion of the target channels conditioned on the source images (paired translation).

    Batches carry ``data`` (source images, normalised) and ``target`` (the channels to produce).
    Loss: ``diffusion_loss`` with the plan's parameterization, weighting and noise type, t uniform
    or importance-sampled. Missing source channels: see the module docstring. Validation uses
    every available channel (no dropping) and fixed per-case (t, noise).
    """

    #: Per-channel drop probability in training (mask mode); a subclass may change it.
    channel_drop_probability: float = CHANNEL_DROP_PROBABILITY

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setup_diffusion("network")
        self.layout: ConditionLayout | None = None
        self.missing_channels: dict[str, list[int]] = {}

    # ---- setup ----------------------------------------------------------------------------------
    def initialize(self) -> None:
        """Base initialisation, then the conditioning layout and every case's missing channels."""
        if self.initialized:
            return
        super().initialize()
        num_images = int(self.store[self.train_cases[0]].data.shape[0])
        self.layout = condition_layout(self.configuration["network"], num_images)
        self.missing_channels = self._read_missing_channels(num_images)
        allowed = bool(self._dataset_json().get(ALLOW_MISSING_KEY, False))
        if allowed and not self.layout.with_mask:
            self.log(f"dataset.json allows missing channels but the plan gives the network no mask channels "
                     f"(cond_channels {self.layout.cond_channels}): missing channels are zero-filled without a "
                     f"mask. Fix: a configuration with network.cond_channels {2 * num_images} "
                     "(documentation/translation.md)", level=logging.WARNING)

    def _dataset_json(self) -> dict[str, Any]:
        path = self.preprocessed_dataset_dir / "dataset.json"
        return load_json(path) if path.is_file() else {}

    def _read_missing_channels(self, num_images: int) -> dict[str, list[int]]:
        """``CASE.json`` ``missing_channels`` of every case; refused unless dataset.json allows them."""
        allowed = bool(self._dataset_json().get(ALLOW_MISSING_KEY, False))
        found: dict[str, list[int]] = {}
        for case in [*self.train_cases, *self.val_cases]:
            channels = [int(c) for c in load_case_json(self.data_folder, case).get(MISSING_CHANNELS_KEY) or []]
            if not channels:
                continue
            where = self.data_folder / f"{case}.json"
            if not allowed:
                raise NnDiffError(f"{where}: case {case} lacks source channel(s) {channels} but dataset.json does not "
                                  f"set \"{ALLOW_MISSING_KEY}\": true. Fix: add the channel files, or allow missing "
                                  "channels in dataset.json and re-run preprocessing")
            bad = [c for c in channels if not 0 <= c < num_images]
            if bad or len(set(channels)) >= num_images:
                raise NnDiffError(f"{where}: '{MISSING_CHANNELS_KEY}' {channels} must name distinct channels in "
                                  f"0..{num_images - 1} and leave at least one. Fix: re-run preprocessing")
            found[case] = channels
        return found

    # ---- hooks ----------------------------------------------------------------------------------
    def make_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Base tensors plus ``available`` ``(B, C)``; a batch without targets is a clear error."""
        if "target" not in batch:
            raise NnDiffError(f"preprocessed cases {', '.join(batch['keys'])} in {self.data_folder} have no 'target' "
                              "array: translation trains on targetsTr. Fix: check target_names and targetsTr/ in "
                              "the raw dataset and re-run nndiff_preprocess")
        out = super().make_batch(batch)
        assert self.layout is not None, "initialize() first"
        out["available"] = availability([self.missing_channels.get(k, []) for k in out["keys"]],
                                        self.layout.num_images, self.device)
        return out

    def batch_condition(self, batch: Mapping[str, Any], train: bool) -> torch.Tensor:
        """``cond_image`` of a batch; in training (mask mode) with random channel dropping."""
        assert self.layout is not None, "initialize() first"
        available = batch["available"]
        if train and self.layout.with_mask:
            available = drop_channels(available, self.channel_drop_probability)
        return condition_image(batch["data"], available, self.layout)

    def compute_loss(self, network: nn.Module, batch: Mapping[str, Any], *, train: bool,
                     generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted diffusion loss on the targets, conditioned on the (masked) source images."""
        cond = self.batch_condition(batch, train)
        loss = self.weighted_diffusion_loss(batch["target"], lambda x_t, time: network(x_t, time, cond_image=cond),
                                            train=train, generators=generators)
        return loss, {}

    # ---- sample grid ----------------------------------------------------------------------------
    def write_sample_grid(self, epoch: int) -> torch.Tensor | None:
        """Rows of (source channel 0, sample, target) for the first validation patches, sampled
        with the EMA network and the planned sampler (few steps): ``samples_epoch_XXXX.png``."""
        items = self.validation_items[:GRID_CASES]
        if not items or self.spec.spatial_dims != 2:
            return None  # 3D patches have no single picture; the validation loss tracks them
        from nndiff.training.data import validation_batches

        numpy_batch, _ = next(validation_batches(items, len(items)))
        batch = self.make_batch(numpy_batch)
        generator = torch_generator(self.seed + GRID_SEED_OFFSET, self.device)
        steps = min(GRID_SAMPLING_STEPS, self.diffusion.num_sampling_steps)
        network = self.validation_network
        was_training = network.training
        network.eval()
        try:
            with torch.no_grad(), self.autocast():
                samples = sample_translation(network_model_fn(network), self.configuration,
                                             self.batch_condition(batch, train=False), generator=generator,
                                             num_steps=steps)
        finally:
            network.train(was_training)
        rows = [torch.stack([batch["data"][i, :1], samples[i, :1], batch["target"][i, :1]]) for i in range(len(items))]
        low, high = self.diffusion.clip_x0 or (-1.0, 1.0)
        path = self.output_dir / f"samples_epoch_{epoch:04d}.png"
        save_image_grid(torch.cat(rows), path, value_range=(low, high), ncols=3)
        self.log(f"wrote {path.name} ({len(items)} validation cases: source | sample | target)")
        return samples

    def on_epoch_end(self, epoch: int, record: Mapping[str, float]) -> None:
        if self.is_progress_epoch(epoch) or self.iteration >= self.total_iterations:
            self.write_sample_grid(epoch)

    # ---- checkpoint extras ----------------------------------------------------------------------
    def checkpoint_extra_state(self) -> dict[str, Any]:
        """The conditioning layout (the predictor checks it) and the importance sampler's history."""
        assert self.layout is not None
        state: dict[str, Any] = {"condition_layout": {"num_images": self.layout.num_images,
                                                      "with_mask": self.layout.with_mask}}
        return {**state, **self.time_sampler_extra()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.load_time_sampler_extra(state)
