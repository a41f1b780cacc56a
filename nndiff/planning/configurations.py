"""Rules: which configurations exist (2d, 3d_fullres, latent), and the per-configuration decisions
that are not patch / network / diffusion (spacing, cropping, resampling, trainability)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from nndiff.diffusion.options import TaskFamily
from nndiff.planning.constants import (
    ANISOTROPY_THRESHOLD,
    AUTOENCODER_BASE_CHANNELS,
    AUTOENCODER_DECODE_HEADROOM,
    AUTOENCODER_KL_WEIGHT,
    AUTOENCODER_LOSS_TENSORS,
    AUTOENCODER_MAX_CHANNEL_MULT,
    AUTOENCODER_MEMORY_CALIBRATION,
    AUTOENCODER_NUM_EPOCHS,
    AUTOENCODER_NUM_RES_BLOCKS,
    AUTOENCODER_SSIM_WEIGHT,
    LATENT_DOWNSAMPLING,
    LATENT_LARGE_IMAGE_VOXELS,
    LATENT_MIN_CHANNELS,
    LATENT_MIN_PATCH_COVERAGE,
    MAX_DATASET_FRACTION_PER_BATCH,
    MIN_BATCH_SIZE,
    NORM_GROUPS,
    NUM_HEAD_CHANNELS,
    PATCH_SCALE_STEP,
    TRAINING_DTYPE,
)
from nndiff.planning.decision import Decision, fmt_gib, fmt_num, fmt_pct, fmt_shape, fmt_spacing
from nndiff.planning.diffusion import decide_diffusion, decide_sampling
from nndiff.planning.fingerprint_view import FingerprintView
from nndiff.planning.memory import GIB, estimate_training_vram
from nndiff.planning.patch import (
    decide_batch_size,
    decide_estimated_vram,
    decide_patch_size,
    memory_budget_gib,
    search_patch,
)
from nndiff.planning.topology import (
    ChannelPlan,
    build_network_block,
    compute_strides,
    decide_network_topology,
    shape_divisor,
)

TRAINABLE = "trainable"
PLANNED_NOT_TRAINABLE = "planned, not trainable yet"
#: Status of a latent configuration: trainable, in two stages per fold.
LATENT_TRAINABLE = "trainable (two stages: autoencoder, then latent diffusion)"


@dataclass(frozen=True)
class PlanContext:
    """Everything the per-configuration rules share (decided once per dataset)."""

    fp: FingerprintView
    task: TaskFamily
    plans_name: str
    gpu_memory_target_gib: float
    channels: Decision[ChannelPlan]
    conditioning: Decision[tuple[int | None, int]]
    dropout: Decision[float]
    produced_schemes: tuple[str, ...]
    dataset_voxels: float


def decide_crop_to_nonzero(fp: FingerprintView, task: TaskFamily) -> Decision[bool]:
    """Crop to the nonzero bounding box (recorded, so the inverse pads it back) except for
    reconstruction, whose forward operator (k-space / projections) is defined on the full field of
    view."""
    rel = fp.median_relative_size_after_cropping
    rel_text = (f"median relative size after cropping {fmt_num(rel)}" if rel is not None
                else "median relative size after cropping not in the fingerprint")
    if task == TaskFamily.RECONSTRUCTION:
        return Decision(False, f"reconstruction: the forward operator acts on the full field of view → no "
                               f"cropping ({rel_text}, 100 % kept)")
    return Decision(True, f"{rel_text} → crop to the nonzero box (lossless: the box is recorded and the "
                          "inverse pads the background back)")


def decide_resampling(spacing: Sequence[float]) -> Decision[dict[str, Any]]:
    """Resampling orders (nnU-Net's): images and targets cubic (order 3), label maps linear per label
    (order 1, one-hot then argmax); when the spacing anisotropy exceeds 3, the low-resolution axis
    is resampled separately with order 0 (cubic across thick slices rings)."""
    real = [s for s in spacing if s != 999.0]
    ratio = max(real) / min(real)
    data = {"order": 3, "order_z": 0, "separate_z_anisotropy_threshold": ANISOTROPY_THRESHOLD}
    value = {"data": dict(data), "target": dict(data),
             "seg": {"order": 1, "order_z": 0, "per_label": True,
                     "separate_z_anisotropy_threshold": ANISOTROPY_THRESHOLD}}
    sep = (f"anisotropy {ratio:.3g} > {fmt_num(ANISOTROPY_THRESHOLD)} → the low-resolution axis separately "
           "with order 0" if ratio > ANISOTROPY_THRESHOLD
           else f"anisotropy {ratio:.3g} ≤ {fmt_num(ANISOTROPY_THRESHOLD)} → all axes together")
    return Decision(value, f"images/targets order 3 (cubic), labels order 1 per label; {sep}")


def decide_latent(fp: FingerprintView, median_shape: Sequence[int], coverage: float, source: str
                  ) -> Decision[bool]:
    """Plan a latent configuration when the pixel-space patch of ``source`` at the memory target
    covers less than LATENT_MIN_PATCH_COVERAGE (25 %) of the median image's voxels, or when the
    median image has ≥ LATENT_LARGE_IMAGE_VOXELS (1024² in 2D, 128³ in 3D)."""
    dims = len(median_shape)
    voxels = math.prod(median_shape)
    large = voxels >= LATENT_LARGE_IMAGE_VOXELS[dims]
    low = coverage < LATENT_MIN_PATCH_COVERAGE
    size = (f"median image {fmt_shape(median_shape)} = {voxels:.3g} voxels "
            f"{'≥' if large else '<'} {LATENT_LARGE_IMAGE_VOXELS[dims]:.3g}")
    cov = (f"{source} patch covers {fmt_pct(coverage)} {'<' if low else '≥'} "
           f"{fmt_pct(LATENT_MIN_PATCH_COVERAGE)} of it")
    verdict = "→ plan a latent configuration" if (large or low) else "→ no latent configuration"
    return Decision(large or low, f"{size}; {cov} {verdict}")


def _spacing_decision(name: str, spacing: list[float], target_reason: str) -> Decision[list[float]]:
    if name == "2d" and len(spacing) == 2:
        return Decision(spacing, f"in-plane target spacing {fmt_spacing(spacing)}; axis 0 is not resampled "
                                 f"(2 entries: the 2d configuration keeps each case's own slice spacing, as "
                                 f"nnU-Net). From: {target_reason}")
    return Decision(spacing, target_reason)


def plan_pixel_configuration(ctx: PlanContext, name: str, spacing: list[float], median_shape: list[int],
                             spacing_reason: str, dataset_voxels: float | None = None,
                             channels: ChannelPlan | None = None) -> dict[str, Any]:
    """One trainable configuration: patch, batch, network and diffusion for ``median_shape`` at
    ``spacing`` (both with the configuration's spatial dims)."""
    dims = len(spacing)
    ch = channels or ctx.channels.value
    voxels = ctx.dataset_voxels if dataset_voxels is None else dataset_voxels
    target = ctx.gpu_memory_target_gib

    def make_network(patch: Sequence[int], strides: Sequence[Sequence[int]]) -> dict[str, Any]:
        return build_network_block(dims, strides, patch, ch, ctx.conditioning.value, ctx.dropout.value)

    search = search_patch(median_shape, spacing, make_network, target)
    patch = decide_patch_size(search, median_shape, spacing, target)
    network = decide_network_topology(patch.value, spacing, ch, ctx.conditioning.value, ctx.dropout.value)
    batch = decide_batch_size(network.value, patch.value, target, voxels)
    vram = decide_estimated_vram(network.value, patch.value, batch.value, target)
    diffusion, diffusion_reasons = decide_diffusion(ctx.task, patch.value, ctx.produced_schemes,
                                                    *ctx.conditioning.value)
    sampling = decide_sampling(ctx.task)
    crop = decide_crop_to_nonzero(ctx.fp, ctx.task)
    resampling = decide_resampling(spacing)
    spacing_d = _spacing_decision(name, spacing, spacing_reason)
    axes = "axes 1, 2 (in-plane after transpose)" if dims == 2 else "all 3 axes"
    config = {
        "data_identifier": f"{ctx.plans_name}_{name}",
        "spatial_dims": dims,
        "spacing": spacing_d.value,
        "median_image_size_in_voxels": list(median_shape),
        "patch_size": patch.value,
        "batch_size": batch.value,
        "crop_to_nonzero": crop.value,
        "resampling": resampling.value,
        "network": network.value,
        "diffusion": diffusion,
        "sampling": sampling.value,
        "estimated_vram_gib": vram.value,
        "trainable": True,
        "status": TRAINABLE,
    }
    reasons = {
        "spatial_dims": f"{name}: {dims}D network over {axes}",
        "spacing": spacing_d.reason,
        "median_image_size_in_voxels": f"median over {ctx.fp.num_cases} cases of the cropped shape resampled to "
                                       f"{fmt_spacing(spacing)}: {fmt_shape(median_shape)}",
        "patch_size": patch.reason,
        "batch_size": batch.reason,
        "crop_to_nonzero": crop.reason,
        "resampling": resampling.reason,
        "network": network.reason,
        "network.channels": ctx.channels.reason if channels is None else
        f"latent: {ch.in_channels} latent channels diffused, {ch.cond_channels} conditioning, {ch.out_channels} out",
        "network.conditioning": ctx.conditioning.reason,
        "network.dropout": ctx.dropout.reason,
        "estimated_vram_gib": vram.reason,
        "sampling": sampling.reason,
        "trainable": f"pixel-space configuration, preprocessed into {ctx.plans_name}_{name} → trainable "
                     f"(estimate {fmt_num(vram.value)} GiB)",
        "status": f"trainable now (patch {fmt_shape(patch.value)}, batch {batch.value})",
        **diffusion_reasons,
    }
    reasons["diffusion"] = "; ".join(f"{k.split('.', 1)[1]}: {diffusion_reasons[k]}" for k in
                                     ("diffusion.schedule", "diffusion.parameterization", "diffusion.sampler"))
    config["reasons"] = reasons
    config["_search"] = search  # removed by the planner; the latent rule reads the coverage
    return config


def latent_strides(median_shape: Sequence[int], spacing: Sequence[float]) -> list[list[int]]:
    """Autoencoder downsampling per level: log2(f) halvings by the same spacing-aware rule as the
    network strides (a thick-slice axis is halved only once the others have caught up)."""
    dims = len(median_shape)
    steps = int(math.log2(LATENT_DOWNSAMPLING[dims]))
    return compute_strides(median_shape, spacing, steps, min_feature=1)


def latent_factors(median_shape: Sequence[int], spacing: Sequence[float]) -> list[int]:
    """Autoencoder downsampling per axis: the product of :func:`latent_strides`."""
    return shape_divisor(latent_strides(median_shape, spacing), len(median_shape))


# ----------------------------------------------------------------------------------------------
# The autoencoder stage of a latent configuration
# ----------------------------------------------------------------------------------------------
def autoencoder_channel_multipliers(num_levels: int, dims: int) -> list[int]:
    """Doubling per level up to AUTOENCODER_MAX_CHANNEL_MULT (4 in 2D, 2 in 3D)."""
    return [min(2**level, AUTOENCODER_MAX_CHANNEL_MULT[dims]) for level in range(num_levels)]


def autoencoder_standin_network(dims: int, in_channels: int, base_channels: int,
                                multipliers: Sequence[int], strides: Sequence[Sequence[int]],
                                num_res_blocks: int) -> dict[str, Any]:
    """A UNet network block shaped like the autoencoder (same levels, widths, per-axis strides and
    residual blocks, no attention) for :func:`~nndiff.planning.memory.estimate_training_vram`.

    The memory model walks ADM UNets only. The UNet stand-in keeps *more* than the autoencoder
    (skip tensors, decoder blocks over concatenated skips, time embeddings), so its estimate is an
    upper bound, scaled by AUTOENCODER_MEMORY_CALIBRATION (measured on the GPU) before use.
    """
    return {"architecture": "unet", "spatial_dims": dims, "in_channels": in_channels, "cond_channels": 0,
            "out_channels": in_channels, "model_channels": base_channels, "channel_mult": list(multipliers),
            "strides": [list(s) for s in strides], "num_res_blocks": num_res_blocks, "attention_levels": [],
            "num_head_channels": NUM_HEAD_CHANNELS, "norm_groups": NORM_GROUPS, "dropout": 0.0,
            "num_classes": None, "num_continuous_conditions": 0}


def estimate_autoencoder_vram_gib(standin: dict[str, Any], patch: Sequence[int], batch_size: int,
                                  in_channels: int, dtype: str = TRAINING_DTYPE) -> float:
    """Estimated GPU memory (GiB) of one autoencoder training step: the UNet stand-in's estimate
    plus AUTOENCODER_LOSS_TENSORS fp32 full-resolution tensors per image channel (L1 + SSIM loss),
    times AUTOENCODER_MEMORY_CALIBRATION (the stand-in over-counts; measured on the GPU)."""
    loss = batch_size * math.prod(patch) * in_channels * AUTOENCODER_LOSS_TENSORS * 4 / GIB
    return AUTOENCODER_MEMORY_CALIBRATION * (estimate_training_vram(standin, patch, batch_size, dtype).total_gib + loss)


def _round_to_factors(raw: Sequence[float], factors: Sequence[int]) -> list[int]:
    return [max(f, int(round(r / f)) * f) for r, f in zip(raw, factors)]


def decide_autoencoder_patch(median_shape: Sequence[int], factors: Sequence[int], standin: dict[str, Any],
                             in_channels: int, target_gib: float) -> tuple[Decision[list[int]], float]:
    """Autoencoder patch: the largest patch of the median image's aspect ratio (scaled by 0.95 per
    try, each side a multiple of its downsampling factor, at most the median rounded up) whose step
    at batch MIN_BATCH_SIZE fits the memory budget (TARGET_UTILIZATION × target), as for the
    diffusion patch. Returns the decision and the coverage of the median image."""
    budget = memory_budget_gib(target_gib)
    median_voxels = math.prod(median_shape)
    scale, tried = 1.0, 0
    while True:
        patch = _round_to_factors([m * scale for m in median_shape], factors)
        estimate = estimate_autoencoder_vram_gib(standin, patch, MIN_BATCH_SIZE, in_channels)
        tried += 1
        fits = estimate <= budget
        smallest = all(p == f for p, f in zip(patch, factors))
        if fits or smallest:
            break
        scale *= PATCH_SCALE_STEP
    coverage = min(1.0, math.prod(patch) / median_voxels)
    head = (f"target {fmt_num(target_gib)} GiB → budget {fmt_gib(budget)}; autoencoder step estimated with a "
            f"UNet-shaped stand-in (same levels, widths and strides, no attention) + {AUTOENCODER_LOSS_TENSORS} fp32 "
            f"loss tensors per voxel and channel, × {AUTOENCODER_MEMORY_CALIBRATION} (the stand-in keeps more "
            f"tensors than the autoencoder; calibrated on the GPU)")
    tail = (f"patch {fmt_shape(patch)} ({fmt_pct(coverage)} of the median {fmt_shape(median_shape)}, sides "
            f"multiples of the factors {fmt_shape(factors)}), estimate {fmt_gib(estimate)} at batch {MIN_BATCH_SIZE}")
    if not fits:
        return Decision(patch, f"{head}; even the smallest patch does not fit: {tail} (expect out-of-memory; "
                               "raise --gpu_memory_target)"), coverage
    what = "the whole median image fits" if tried == 1 else "largest patch of the median's aspect ratio that fits"
    return Decision(patch, f"{head}; {what} → {tail}"), coverage


def decide_autoencoder_batch(standin: dict[str, Any], patch: Sequence[int], in_channels: int, target_gib: float,
                             dataset_voxels: float) -> Decision[int]:
    """Autoencoder batch: as many patches as the budget allows over the fixed cost, capped at
    MAX_DATASET_FRACTION_PER_BATCH (5 %) of the dataset's voxels, at least MIN_BATCH_SIZE (the rule
    of the diffusion batch, on the autoencoder estimate)."""
    budget = memory_budget_gib(target_gib)
    one = estimate_autoencoder_vram_gib(standin, patch, 1, in_channels)
    per_sample = estimate_autoencoder_vram_gib(standin, patch, 2, in_channels) - one
    fixed = one - per_sample
    by_memory = max(0, int((budget - fixed) // per_sample))
    cap = int(MAX_DATASET_FRACTION_PER_BATCH * dataset_voxels // math.prod(patch))
    batch = max(MIN_BATCH_SIZE, min(by_memory, cap))
    limit = "memory" if by_memory <= cap else f"the {fmt_pct(MAX_DATASET_FRACTION_PER_BATCH)} dataset cap"
    return Decision(batch, f"budget {fmt_gib(budget)} − fixed {fmt_gib(fixed)} over {fmt_gib(per_sample)} per "
                           f"{fmt_shape(patch)} patch → {by_memory} by memory; cap {cap} "
                           f"({fmt_pct(MAX_DATASET_FRACTION_PER_BATCH)} of {dataset_voxels:.3g} dataset voxels); "
                           f"batch {batch} (limited by {limit}, at least {MIN_BATCH_SIZE})")


def plan_autoencoder_block(ctx: PlanContext, median_shape: Sequence[int], spacing: Sequence[float],
                           latent_channels: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """The ``autoencoder`` block of a latent configuration and its reasons (``autoencoder.<key>``).

    Keys read by ``nndiff.networks.autoencoder.build_autoencoder`` (architecture, losses) and keys
    only the stages read: ``patch_size``, ``batch_size``, ``training`` (the autoencoder trainer's
    TrainingSettings overrides). Returns ``(block, stage, reasons)``: ``stage`` holds the
    configuration-level keys ``autoencoder_estimated_vram_gib`` and ``max_decode_voxels`` (the latent
    trainer and predictor encode/decode larger volumes in sliding windows); they stay outside the
    block, which ``build_autoencoder`` validates key by key.

    Architecture (KL autoencoder, GroupNorm–SiLU residual blocks, no attention): one level per
    halving of :func:`latent_strides`, AUTOENCODER_BASE_CHANNELS wide at level 0. Patch and batch
    at the memory target (:func:`decide_autoencoder_patch` / :func:`decide_autoencoder_batch`),
    training length AUTOENCODER_NUM_EPOCHS, loss weights, and the whole-latent decode limit
    ``max_decode_voxels`` the predictor uses to switch to sliding-window decoding.
    """
    dims = len(median_shape)
    factors = latent_factors(median_shape, spacing)
    # the autoencoder halves an axis with factor 2**k at its first k levels (networks/autoencoder.py)
    strides = [[2 if f > 2**level else 1 for f in factors] for level in range(int(math.log2(max(factors))))]
    pixel_channels = ctx.channels.value.in_channels
    base = AUTOENCODER_BASE_CHANNELS[dims]
    multipliers = autoencoder_channel_multipliers(len(strides) + 1, dims)
    num_res_blocks = AUTOENCODER_NUM_RES_BLOCKS[dims]
    standin = autoencoder_standin_network(dims, pixel_channels, base, multipliers, strides, num_res_blocks)
    target = ctx.gpu_memory_target_gib
    patch, _ = decide_autoencoder_patch(median_shape, factors, standin, pixel_channels, target)
    batch = decide_autoencoder_batch(standin, patch.value, pixel_channels, target, ctx.dataset_voxels)
    estimate = estimate_autoencoder_vram_gib(standin, patch.value, batch.value, pixel_channels)
    decode_voxels = AUTOENCODER_DECODE_HEADROOM * math.prod(patch.value) * batch.value
    latent_shape = [max(1, math.ceil(m / f)) for m, f in zip(median_shape, factors)]
    block = {
        "in_channels": pixel_channels,
        "downsampling_factors": factors,
        "latent_channels": latent_channels,
        "latent_spacing": [s * f for s, f in zip(spacing, factors)],
        "latent_median_shape": latent_shape,
        "base_channels": base,
        "channel_multipliers": multipliers,
        "num_res_blocks": num_res_blocks,
        "kl_weight": AUTOENCODER_KL_WEIGHT,
        "ssim_weight": AUTOENCODER_SSIM_WEIGHT,
        "adversarial": False,
        "vq": False,
        "patch_size": patch.value,
        "batch_size": batch.value,
        "training": {"num_epochs": AUTOENCODER_NUM_EPOCHS},
    }
    stage = {"autoencoder_estimated_vram_gib": round(estimate, 3), "max_decode_voxels": int(decode_voxels)}
    width_why = ("as Stable Diffusion's KL autoencoder" if dims == 2 else
                 "MONAI's 3D latent-diffusion tutorial scale; 3D activations are Z× larger")
    reasons = {
        "autoencoder.in_channels": f"the {pixel_channels} diffused image channel(s) of the pixel configuration",
        "autoencoder.architecture": (
            f"KL autoencoder, {len(multipliers)} levels (per-level strides {strides}: an axis with factor "
            f"2^k is halved at the first k levels), base {base} channels × {multipliers} ({dims}D: {width_why}), "
            f"{num_res_blocks} residual block(s) per level, no attention (keeps memory low at full resolution)"),
        "autoencoder.patch_size": patch.reason,
        "autoencoder.batch_size": batch.reason,
        "autoencoder_estimated_vram_gib": f"{fmt_gib(estimate)} at patch {fmt_shape(patch.value)}, batch "
                                          f"{batch.value} (conservative stand-in estimate, see patch_size)",
        "autoencoder.training": (f"{AUTOENCODER_NUM_EPOCHS} epochs (a quarter of the diffusion model's default 400): "
                                 "a reconstruction loss has one target per input rather than one per noise level and "
                                 "plateaus sooner; check the held-out reconstruction PSNR and extend with an "
                                 "inherits_from configuration if it still improves"),
        "autoencoder.losses": (f"L1 + {fmt_num(AUTOENCODER_SSIM_WEIGHT)}·(1 − SSIM) + {AUTOENCODER_KL_WEIGHT:g}·KL "
                               "(a small KL keeps latents near N(0, I) without blurring, Rombach et al. 2022); "
                               "no adversarial loss by default (switch on with adversarial: true), no VQ"),
        "max_decode_voxels": (
            f"{AUTOENCODER_DECODE_HEADROOM} × patch {fmt_shape(patch.value)} × batch {batch.value} = "
            f"{decode_voxels:.3g} output voxels: decoding without gradients keeps no activations for a backward "
            "pass, so a decode this large fits in the training step's memory; larger outputs are decoded in "
            "sliding windows"),
    }
    return block, stage, reasons


def plan_latent_configuration(ctx: PlanContext, name: str, source: str, spacing: list[float],
                              median_shape: list[int], latent_reason: str) -> dict[str, Any]:
    """A latent-diffusion configuration derived from pixel configuration ``source``: the diffusion
    UNet runs on autoencoder latents (median shape / f, LATENT_MIN_CHANNELS+ channels), planned with
    the same patch/batch/network rules; the ``autoencoder`` block plans the first stage
    (:func:`plan_autoencoder_block`). Trainable: the latent trainer trains the autoencoder of a
    fold first, then the diffusion model on its cached latents."""
    factors = latent_factors(median_shape, spacing)
    pixel = ctx.channels.value
    lc = max(LATENT_MIN_CHANNELS, pixel.in_channels)
    latent_channels = ChannelPlan(lc, lc if pixel.cond_channels else 0, lc)
    latent_shape = [max(1, math.ceil(m / f)) for m, f in zip(median_shape, factors)]
    latent_spacing = [s * f for s, f in zip(spacing, factors)]
    config = plan_pixel_configuration(
        ctx, name, latent_spacing, latent_shape,
        f"latent grid: {fmt_spacing(spacing)} × factors {fmt_shape(factors)} = {fmt_spacing(latent_spacing)}",
        dataset_voxels=ctx.dataset_voxels / math.prod(factors), channels=latent_channels)
    config.pop("_search")
    config["data_identifier"] = f"{ctx.plans_name}_{source}"
    config["spacing"] = list(spacing)
    config["median_image_size_in_voxels"] = list(median_shape)
    resampling = decide_resampling(spacing)  # the pixel data are resampled as for the source
    config["resampling"] = resampling.value
    autoencoder, stage, ae_reasons = plan_autoencoder_block(ctx, median_shape, spacing, lc)
    config["autoencoder"] = autoencoder
    config.update(stage)
    # Latents × scale factor have unit variance but no bound; rotating / zooming a latent grid is not
    # the latent of a rotated image (the encoder is not equivariant) → no clipping, no augmentation.
    config["diffusion"]["clip_x0"] = None
    config["training"] = {"augmentation": "none"}
    config["trainable"] = True
    config["status"] = LATENT_TRAINABLE
    reasons = config["reasons"]
    reasons.update(ae_reasons)
    reasons["resampling"] = resampling.reason
    reasons["spacing"] = (f"same preprocessed data as '{source}' ({fmt_spacing(spacing)}); the autoencoder "
                          f"encodes it to {fmt_spacing(latent_spacing)}")
    reasons["median_image_size_in_voxels"] = (f"pixel median {fmt_shape(median_shape)} → latent "
                                              f"{fmt_shape(latent_shape)}")
    f_why = ("Stable Diffusion, Rombach et al. 2022" if len(spacing) == 2
             else "3D latent diffusion keeps more detail per latent voxel")
    reasons["autoencoder"] = (f"f = {LATENT_DOWNSAMPLING[len(spacing)]} per axis ({f_why}), "
                              f"spacing-aware → factors {fmt_shape(factors)}; {lc} latent channels "
                              f"(≥ {LATENT_MIN_CHANNELS} and ≥ the {pixel.in_channels} diffused channel(s))")
    reasons["patch_size"] = "in latent voxels: " + reasons["patch_size"]
    reasons["diffusion.clip_x0"] = ("latents × scale factor (1/std of the training latents) have unit variance "
                                    "but no bound → no x0 clipping")
    reasons["training"] = ("augmentation none (0 % of latent patches rotated or zoomed, pixel configurations: 20 %): "
                           "a rotated or zoomed latent grid is not the latent of a rotated image (the encoder is "
                           "not equivariant), and unaugmented latents can be encoded once and cached")
    reasons["trainable"] = (f"{latent_reason}; two stages per fold: the autoencoder (block 'autoencoder') on "
                            f"'{source}' data, then the diffusion UNet on its latents → trainable "
                            f"(diffusion estimate {fmt_num(config['estimated_vram_gib'])} GiB, autoencoder "
                            f"{fmt_num(stage['autoencoder_estimated_vram_gib'])} GiB)")
    reasons["status"] = (f"{LATENT_TRAINABLE}: autoencoder patch {fmt_shape(autoencoder['patch_size'])} batch "
                         f"{autoencoder['batch_size']}, latent patch {fmt_shape(config['patch_size'])} batch "
                         f"{config['batch_size']}")
    return config
