"""Latent diffusion (generation family): the diffusion UNet of a ``*_latent`` configuration trained on
autoencoder latents.

Two stages per fold (documentation/latent.md, "Training"):

1. The fold's autoencoder ``results/DatasetXXX/AutoencoderTrainer__<Plans>__<config>/fold_N/``:
   used when it is complete (``autoencoder.json`` written), continued when it stopped early, trained
   first when missing — on the *same* fold split (an autoencoder trained on every case would have
   seen the validation cases: a leak into cross-validation).
2. Every preprocessed case is encoded once (posterior mean × the autoencoder's measured
   ``latent_scale_factor``) into ``<model folder>/latents_cache/<hash>/CASE.npz``, keyed by the
   autoencoder's ``weights_hash``; :class:`LatentDiffusionTrainer` is the
   :class:`~nndiff.tasks.generation.GenerationTrainer` with that folder as its data source.

The diffusion checkpoints record the autoencoder (``extra.autoencoder``: hash, scale factor);
resuming or predicting with a different autoencoder is refused (:func:`check_autoencoder_hash`).
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from nndiff.diffusion.options import TaskFamily
from nndiff.errors import NnDiffError, PlansError
from nndiff.tasks.generation import GenerationTrainer, sample_images
from nndiff.training import register_trainer, save_image_grid
from nndiff.training.checkpoint import FINAL, LATEST, load_checkpoint
from nndiff.training.data import list_cases, load_case, load_case_json
from nndiff.training.rng import torch_generator
from nndiff.utils.files import atomic_path, load_json, save_json

logger = logging.getLogger(__name__)

AUTOENCODER_TRAINER = "AutoencoderTrainer"
#: Written by the autoencoder stage into its fold folder: ``latent_scale_factor`` and the sha256 of the
#: weights (``weights_sha256``; ``weights_hash`` is read too).
AUTOENCODER_INFO = "autoencoder.json"
LATENTS_CACHE = "latents_cache"
CACHE_INFO = "cache.json"
#: Hex digits of the autoencoder hash that name its cache folder (64 bits: no collisions in practice).
CACHE_KEY_LENGTH = 16
#: The cache is written only when the disk keeps this factor × the latents' bytes free afterwards.
CACHE_DISK_MARGIN = 2.0
#: Families whose latent configurations this version trains and predicts.
LATENT_FAMILIES = (TaskFamily.GENERATION.value, TaskFamily.ANOMALY_DETECTION.value)
#: Trainer of each family's latent configurations (the lead's default_trainer reads this).
LATENT_TRAINERS = {TaskFamily.GENERATION.value: "LatentDiffusionTrainer",
                   TaskFamily.ANOMALY_DETECTION.value: "LatentAnomalyDDPMTrainer"}


# ----------------------------------------------------------------------------------------------
# Which configurations are latent, and for which family
# ----------------------------------------------------------------------------------------------
def is_latent_configuration(configuration: Mapping[str, Any]) -> bool:
    """A resolved configuration is latent when the planner gave it an ``autoencoder`` block."""
    return isinstance(configuration.get("autoencoder"), Mapping)


def check_latent_supported(task: str, configuration_name: str) -> None:
    """Refuse a latent configuration of a family without latent support (clear message + fix)."""
    if str(task) not in LATENT_FAMILIES:
        raise NnDiffError(f"latent not supported for {task}: configuration {configuration_name!r} is a latent "
                          f"configuration, and this version trains latent diffusion for "
                          f"{', '.join(LATENT_FAMILIES)} only. Fix: train a pixel-space configuration "
                          "(2d or 3d_fullres) of this dataset")


def latent_trainer_for(plans: Mapping[str, Any], configuration: Mapping[str, Any], configuration_name: str
                       ) -> str | None:
    """The trainer of a latent configuration (None for a pixel one); refuses unsupported families."""
    if not is_latent_configuration(configuration):
        return None
    task = str(plans.get("task", ""))
    check_latent_supported(task, configuration_name)
    return LATENT_TRAINERS[task]


# ----------------------------------------------------------------------------------------------
# The autoencoder of a fold
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AutoencoderRecord:
    """A finished autoencoder stage: where it is, its weights hash and its latent scale factor."""

    fold_dir: Path
    weights_hash: str
    scale_factor: float

    @property
    def cache_key(self) -> str:
        return self.weights_hash[:CACHE_KEY_LENGTH]


def autoencoder_fold_dir(dataset_results_dir: Path, plans_name: str, configuration: str, fold: int | str) -> Path:
    """``results/DatasetXXX/AutoencoderTrainer__<Plans>__<config>/fold_N`` (the autoencoder stage's folder)."""
    return Path(dataset_results_dir) / f"{AUTOENCODER_TRAINER}__{plans_name}__{configuration}" / f"fold_{fold}"


def read_autoencoder_record(fold_dir: Path) -> AutoencoderRecord | None:
    """The record of a finished autoencoder stage, or None when ``autoencoder.json`` is absent."""
    path = Path(fold_dir) / AUTOENCODER_INFO
    if not path.is_file():
        return None
    info = load_json(path)
    weights_hash = info.get("weights_sha256") or info.get("weights_hash")
    scale = info.get("latent_scale_factor")
    if not isinstance(weights_hash, str) or not weights_hash:
        raise NnDiffError(f"{path} has no 'weights_sha256'. Fix: retrain the autoencoder stage (delete {fold_dir})")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise NnDiffError(f"{path}: 'latent_scale_factor' must be a positive number, got {scale!r}. Fix: retrain "
                          f"the autoencoder stage (delete {fold_dir})")
    return AutoencoderRecord(Path(fold_dir), weights_hash, float(scale))


def check_autoencoder_hash(expected: str, record: AutoencoderRecord, model: str) -> None:
    """Refuse an autoencoder other than the one ``model`` was trained on (message names both hashes)."""
    if expected != record.weights_hash:
        raise NnDiffError(
            f"{model} was trained on the latents of the autoencoder with weights hash {expected}, but the "
            f"autoencoder found in {record.fold_dir} has weights hash {record.weights_hash}: its latents mean "
            "something else. Fix: retrain the latent diffusion model on this autoencoder (start without "
            f"--continue), or point to the right autoencoder (restore that fold folder)")


def network_block(block: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of the plan's ``autoencoder`` block that ``build_autoencoder`` accepts (keys a user
    or a later planner adds for the stages are left out, so loading never fails on them)."""
    from nndiff.networks import autoencoder as ae_module

    known = {*ae_module.AUTOENCODER_REQUIRED, *ae_module.AUTOENCODER_DEFAULTS, *ae_module.AUTOENCODER_PASSTHROUGH}
    return {k: v for k, v in block.items() if k in known}


def load_autoencoder(record: AutoencoderRecord, configuration: Mapping[str, Any], device: torch.device) -> nn.Module:
    """The autoencoder of ``record`` from its final checkpoint, on ``device`` in eval mode.

    The weights loaded are the ones whose hash is ``record.weights_hash`` (EMA or raw, whichever the
    autoencoder stage hashed); a checkpoint matching neither is refused: the folder was changed
    after ``autoencoder.json`` was written.
    """
    from nndiff.networks.autoencoder import build_autoencoder, weights_sha256

    block = configuration["autoencoder"]
    path = record.fold_dir / FINAL
    if not path.is_file():
        raise NnDiffError(f"{record.fold_dir} has {AUTOENCODER_INFO} but no {FINAL}. Fix: retrain the autoencoder "
                          f"stage (delete {record.fold_dir})")
    state = load_checkpoint(path, map_location="cpu")
    network = build_autoencoder(network_block(block), int(block["in_channels"]), int(configuration["spatial_dims"]))
    found = []
    for key in ("ema_weights", "network_weights"):
        weights = state.get(key)
        if not isinstance(weights, Mapping):
            continue
        try:
            network.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            raise NnDiffError(f"the weights in {path} do not fit the autoencoder the plans describe: "
                              f"{str(err).splitlines()[0]}. Fix: use the plans the autoencoder was trained "
                              "with") from None
        found.append(weights_sha256(network.state_dict()))
        if found[-1] == record.weights_hash:
            return network.to(device).eval()
    raise NnDiffError(f"{path} does not hold the weights {record.fold_dir / AUTOENCODER_INFO} names (weights hash "
                      f"{record.weights_hash}; the checkpoint has {', '.join(found) or 'no weights'}). Fix: retrain "
                      f"the autoencoder stage (delete {record.fold_dir})")


# ----------------------------------------------------------------------------------------------
# Encoding and decoding whole cases
# ----------------------------------------------------------------------------------------------
def pad_to_factors(array: torch.Tensor, factors: Sequence[int], pad_value: torch.Tensor) -> torch.Tensor:
    """Pad the trailing spatial axes of ``(N, C, *spatial)`` at their end to multiples of ``factors``
    with one value per channel (the background), so the encoder's strides divide the input."""
    spatial = array.shape[2:]
    target = [int(math.ceil(s / f) * f) for s, f in zip(spatial, factors)]
    if list(spatial) == target:
        return array
    out = pad_value.to(array.dtype).reshape(1, -1, *([1] * len(spatial))).expand(
        array.shape[0], array.shape[1], *target).clone()
    out[(slice(None), slice(None), *[slice(0, s) for s in spatial])] = array
    return out


def encode_volume(autoencoder: nn.Module, x: torch.Tensor, factors: Sequence[int], max_voxels: int,
                  latent_window: Sequence[int]) -> torch.Tensor:
    """Posterior means of ``x`` ``(N, C, *spatial)`` (spatial divisible by ``factors``): whole when
    N × voxels ≤ ``max_voxels``, else per sample in sliding windows of ``latent_window`` latents."""
    if x.shape[0] * math.prod(x.shape[2:]) <= max_voxels:
        return autoencoder.latents_for_diffusion(x).float()
    from nndiff.networks.autoencoder_windows import sliding_window_encode

    pixel_window = [w * f for w, f in zip(latent_window, factors)]
    return torch.cat([sliding_window_encode(autoencoder, x[i:i + 1], pixel_window, 0.5, factors)[0].float()
                      for i in range(x.shape[0])])


def decode_latents(autoencoder: nn.Module, z: torch.Tensor, factors: Sequence[int], max_voxels: int,
                   latent_window: Sequence[int]) -> torch.Tensor:
    """Images of unscaled latents ``z`` ``(N, C_lat, *latent)``: whole when the output has at most
    ``max_voxels`` voxels (N × prod(latent × factors)), else per sample with sliding windows."""
    out_voxels = z.shape[0] * math.prod(s * f for s, f in zip(z.shape[2:], factors))
    if out_voxels <= max_voxels:
        return autoencoder.decode(z).float()
    from nndiff.networks.autoencoder_windows import sliding_window_decode

    return torch.cat([sliding_window_decode(autoencoder, z[i:i + 1], latent_window, 0.5, factors).float()
                      for i in range(z.shape[0])])


def decode_limit(configuration: Mapping[str, Any]) -> int:
    """Output voxels encoded or decoded in one pass: the plan's ``max_decode_voxels`` (default: the
    autoencoder's training patch voxels × batch, what its training step held with gradients)."""
    value = configuration.get("max_decode_voxels")
    if value is not None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PlansError(f"max_decode_voxels must be a positive integer, got {value!r}. Fix: re-run planning")
        return value
    block = configuration["autoencoder"]
    return math.prod(int(p) for p in block["patch_size"]) * int(block.get("batch_size", 1))


def latent_window(block: Mapping[str, Any]) -> list[int]:
    """Sliding-window size in latents: the autoencoder's training patch divided by the factors."""
    return [max(1, int(p) // int(f)) for p, f in zip(block["patch_size"], block["downsampling_factors"])]


def encode_case(autoencoder: nn.Module, data: np.ndarray, block: Mapping[str, Any], spatial_dims: int,
                scale_factor: float, device: torch.device, max_voxels: int, slice_batch: int = 8) -> np.ndarray:
    """Latents × ``scale_factor`` of one preprocessed case ``(C, Z, Y, X)`` → ``(C_lat, Z', Y', X')``.

    3D: the volume, padded at its end to multiples of the factors with each channel's minimum (the
    background, as training patches are padded). 2D: each z slice, in batches of ``slice_batch``.
    Inputs above ``max_voxels`` voxels are encoded in sliding windows of the autoencoder patch.
    """
    factors = [int(f) for f in block["downsampling_factors"]]
    window = latent_window(block)
    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(device)
    pad = x.reshape(x.shape[0], -1).min(dim=1).values
    with torch.no_grad():
        if spatial_dims == 3:
            z = encode_volume(autoencoder, pad_to_factors(x[None], factors, pad), factors, max_voxels, window)[0]
        else:
            slices = x.permute(1, 0, 2, 3)  # (Z, C, Y, X)
            parts = [encode_volume(autoencoder, pad_to_factors(slices[i:i + slice_batch], factors, pad), factors,
                                   max_voxels, window) for i in range(0, slices.shape[0], slice_batch)]
            z = torch.cat(parts).permute(1, 0, 2, 3)  # (C_lat, Z, Y', X')
    return (z * scale_factor).cpu().numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The latent cache
# ----------------------------------------------------------------------------------------------
def _source_signature(path: Path) -> str:
    """Size and modification time of a preprocessed case file: a re-preprocessed case is re-encoded."""
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _check_disk_space(folder: Path, needed_bytes: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < CACHE_DISK_MARGIN * needed_bytes:
        raise NnDiffError(f"not enough disk space for the latent cache in {folder}: about {needed_bytes / 2**30:.2f} "
                          f"GiB needed ({CACHE_DISK_MARGIN:g}× kept free), {free / 2**30:.2f} GiB free. Fix: free "
                          "disk space or move the results root (nnDiff_results)")


def build_latent_cache(autoencoder: nn.Module, record: AutoencoderRecord, pixel_folder: Path, cache_root: Path,
                       block: Mapping[str, Any], spatial_dims: int, device: torch.device, max_voxels: int) -> Path:
    """Encode every case of ``pixel_folder`` into ``cache_root/<hash>/CASE.npz`` (key ``data``) with a
    ``CASE.json`` holding the case's metadata; cases already cached from the same source file are kept.

    Rule (documentation/latent.md): training needs every case's latent at each training call
    (patches are drawn from whole latents), so without a cache each call — the first and every
    ``--continue`` — re-runs the encoder over every pixel volume; the cache costs one write of
    latents that are C_lat / (C × ∏f) of the pixel bytes. It is therefore always cheaper from the
    second call on, and is written whenever the disk has room (``CACHE_DISK_MARGIN``).
    """
    folder = Path(cache_root) / record.cache_key
    info_path = folder / CACHE_INFO
    info = load_json(info_path) if info_path.is_file() else {}
    if info.get("weights_hash") not in (None, record.weights_hash):
        raise NnDiffError(f"{info_path} belongs to autoencoder {info.get('weights_hash')}, not "
                          f"{record.weights_hash}. Fix: delete {folder}")
    cases = list_cases(pixel_folder)
    signatures = {c: _source_signature(pixel_folder / f"{c}.npz") for c in cases}
    known = info.get("cases", {}) if info.get("latent_scale_factor") == record.scale_factor else {}
    todo = [c for c in cases if known.get(c) != signatures[c] or not (folder / f"{c}.npz").is_file()]
    if todo:
        ratio = int(block["latent_channels"]) / math.prod(int(f) for f in block["downsampling_factors"])
        pixel_bytes = sum((pixel_folder / f"{c}.npz").stat().st_size for c in todo)
        _check_disk_space(folder, pixel_bytes * ratio)
    for stale in set(known) - set(cases):  # cases no longer preprocessed must not reach the training list
        for suffix in (".npz", ".json"):
            (folder / f"{stale}{suffix}").unlink(missing_ok=True)
    started = time.monotonic()
    for case in todo:
        data = load_case(pixel_folder / f"{case}.npz").data
        latent = encode_case(autoencoder, data, block, spatial_dims, record.scale_factor, device, max_voxels)
        with atomic_path(folder / f"{case}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, data=latent)
        metadata = load_case_json(pixel_folder, case).get("metadata")
        save_json({"source": str(pixel_folder / f"{case}.npz"), "latent_shape": list(latent.shape),
                   **({"metadata": metadata} if isinstance(metadata, dict) else {})}, folder / f"{case}.json")
    if todo or not info_path.is_file() or set(known) != set(cases):
        save_json({"weights_hash": record.weights_hash, "latent_scale_factor": record.scale_factor,
                   "autoencoder": str(record.fold_dir), "pixel_folder": str(pixel_folder),
                   "cases": {c: signatures[c] for c in cases}}, info_path)
        logger.info("encoded %d case(s) into %s in %.1f s (%d reused)", len(todo), folder,
                    time.monotonic() - started, len(cases) - len(todo))
    return folder


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
@register_trainer
class LatentDiffusionTrainer(GenerationTrainer):
    """Generation by latent diffusion for ``*_latent`` configurations (two stages per fold).

    :meth:`prepare_autoencoder` finds, continues or trains the fold's autoencoder stage
    (``AutoencoderTrainer``, same plans, configuration, fold split and seed);
    :meth:`initialize` encodes the cases into the latent cache and trains the
    :class:`GenerationTrainer` on it (patches of the plan's latent ``patch_size``). Sample grids
    are decoded to images. ``autoencoder_iterations``: cap on the autoencoder stage's iterations
    (default: the ``iterations`` cap, so a smoke run is short in both stages; ``epochs`` applies
    to the diffusion stage only).
    """

    handles_latent_configurations = True

    def __init__(self, *args: Any, autoencoder_iterations: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_latent_supported(str(self.plans.get("task", "")), self.configuration_name)
        if not is_latent_configuration(self.configuration):
            raise PlansError(f"configuration {self.configuration_name!r} has no 'autoencoder' block, so it is not a "
                             "latent configuration. Fix: train it with GenerationTrainer, or choose a *_latent "
                             "configuration")
        self.autoencoder_block: dict[str, Any] = dict(self.configuration["autoencoder"])
        self.autoencoder_iterations = autoencoder_iterations if autoencoder_iterations is not None else kwargs.get(
            "iterations")
        self.autoencoder_dir = autoencoder_fold_dir(self.output_dir.parent.parent, self.plans_name,
                                                    self.configuration_name, self.fold)
        self.pixel_folder = self.data_folder
        self.record: AutoencoderRecord | None = None
        self.autoencoder: nn.Module | None = None

    # ---- stage 1 --------------------------------------------------------------------------------
    def prepare_autoencoder(self, time_limit_s: float | None = None) -> bool:
        """Make the fold's autoencoder available; True when it is finished (``autoencoder.json``).

        Missing: trained now; stopped early (checkpoints but no ``autoencoder.json``): continued.
        With ``time_limit_s`` the stage may stop early again (returns False; call again later).
        """
        if self.record is None:
            self.record = read_autoencoder_record(self.autoencoder_dir)
        if self.record is None:
            self._train_autoencoder(time_limit_s)
            self.record = read_autoencoder_record(self.autoencoder_dir)
            if self.record is None:
                return False
        if self.autoencoder is None:
            self.autoencoder = load_autoencoder(self.record, self.configuration, self.device)
            for parameter in self.autoencoder.parameters():
                parameter.requires_grad_(False)
        return True

    def _train_autoencoder(self, time_limit_s: float | None) -> None:
        from nndiff.tasks.autoencoder import AutoencoderTrainer

        resume = any((self.autoencoder_dir / name).is_file() for name in (LATEST, FINAL))
        logger.info("%s the autoencoder stage of fold %s in %s", "continuing" if resume else "training",
                    self.fold, self.autoencoder_dir)
        stage = AutoencoderTrainer(self.plans, self.configuration_name, self.fold, self.preprocessed_dataset_dir,
                                   output_dir=self.autoencoder_dir, device=self.device,
                                   iterations=self.autoencoder_iterations, seed=self.seed,
                                   num_workers=self.num_workers, metadata=self._given_metadata)
        stage.command = self.command
        stage.run_training(continue_training=resume, time_limit_s=time_limit_s)

    # ---- stage 2 --------------------------------------------------------------------------------
    @property
    def latents_cache_root(self) -> Path:
        """``<model folder>/latents_cache`` (beside the fold folders; one subfolder per autoencoder)."""
        return self.output_dir.parent / LATENTS_CACHE

    def initialize(self) -> None:
        """Autoencoder stage (trained when missing), latent cache, then the generation trainer's setup
        with the cache as its data folder."""
        if self.initialized:
            return
        if not self.prepare_autoencoder():
            raise NnDiffError(f"the autoencoder stage in {self.autoencoder_dir} did not finish")
        assert self.record is not None and self.autoencoder is not None
        self.data_folder = build_latent_cache(self.autoencoder, self.record, self.pixel_folder,
                                              self.latents_cache_root, self.autoencoder_block,
                                              self.spec.spatial_dims, self.device, decode_limit(self.configuration))
        super().initialize()

    def run_training(self, continue_training: bool = False, stop_after_iterations: int | None = None,
                     time_limit_s: float | None = None) -> None:
        """Both stages; ``time_limit_s`` covers them together (a stopped autoencoder stage is continued
        by the next call, with or without ``--continue``)."""
        started = time.monotonic()
        if not self.initialized and not self.prepare_autoencoder(time_limit_s):
            self.log(f"the autoencoder stage stopped at the time limit; run again with --continue to finish it "
                     f"({self.autoencoder_dir})")
            return
        left = None if time_limit_s is None else max(0.0, time_limit_s - (time.monotonic() - started))
        super().run_training(continue_training, stop_after_iterations, left)

    # ---- sample grid: decoded images ------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images of *scaled* latents (``/ scale factor``, then the autoencoder's decoder)."""
        assert self.record is not None and self.autoencoder is not None
        block = self.autoencoder_block
        with torch.no_grad():
            return decode_latents(self.autoencoder, latents / self.record.scale_factor,
                                  block["downsampling_factors"], decode_limit(self.configuration),
                                  latent_window(block))

    def write_sample_grid(self, epoch: int) -> torch.Tensor:
        """Latents sampled with the EMA network and the planned sampler (few steps), decoded; written as
        ``samples_epoch_XXXX.png``."""
        from nndiff.tasks.generation import GRID_SAMPLES, GRID_SAMPLING_STEPS, GRID_SEED_OFFSET

        num = GRID_SAMPLES.get(self.spec.spatial_dims, 4)
        labels, continuous = self.grid_conditions(num)
        generator = torch_generator(self.seed + GRID_SEED_OFFSET, self.device)
        steps = min(GRID_SAMPLING_STEPS, self.diffusion.num_sampling_steps)
        latents = sample_images(self.validation_network, self.configuration, num, generator=generator,
                                device=self.device, class_labels=labels, continuous=continuous, num_steps=steps,
                                autocast_dtype=self.autocast_dtype)
        images = self.decode(latents)
        path = self.output_dir / f"samples_epoch_{epoch:04d}.png"
        save_image_grid(images, path, value_range=(-1.0, 1.0))
        self.log(f"wrote {path.name} ({num} decoded samples, {steps} {self.diffusion.sampler.value} steps)")
        return images

    # ---- checkpoints record the autoencoder ----------------------------------------------------
    def checkpoint_extra_state(self) -> dict[str, Any]:
        """The generation extras plus the autoencoder this model's latents come from."""
        state = super().checkpoint_extra_state()
        assert self.record is not None
        state["autoencoder"] = {"weights_hash": self.record.weights_hash,
                                "latent_scale_factor": self.record.scale_factor,
                                "fold_dir": str(self.record.fold_dir)}
        return state

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Refuse to resume on another autoencoder than the checkpoint's."""
        recorded = state.get("autoencoder") or {}
        assert self.record is not None
        check_autoencoder_hash(str(recorded.get("weights_hash")), self.record,
                               f"the checkpoint in {self.output_dir}")
        super().load_extra_state(state)

    def debug_info(self) -> dict[str, Any]:
        info = super().debug_info()
        assert self.record is not None
        # data_folder stays the preprocessed one: model loading finds the plans beside it
        info.update(data_folder=str(self.pixel_folder), latent_data_folder=str(self.data_folder),
                    autoencoder_dir=str(self.autoencoder_dir), autoencoder_weights_hash=self.record.weights_hash,
                    latent_scale_factor=self.record.scale_factor)
        return info
