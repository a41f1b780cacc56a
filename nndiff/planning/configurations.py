"""Rules: which configurations exist (2d, 3d_fullres, latent), and the per-configuration decisions
that are not patch / network / diffusion (spacing, cropping, resampling, trainability)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from nndiff.diffusion.options import TaskFamily
from nndiff.planning.constants import (
    ANISOTROPY_THRESHOLD,
    LATENT_DOWNSAMPLING,
    LATENT_LARGE_IMAGE_VOXELS,
    LATENT_MIN_CHANNELS,
    LATENT_MIN_PATCH_COVERAGE,
)
from nndiff.planning.decision import Decision, fmt_num, fmt_pct, fmt_shape, fmt_spacing
from nndiff.planning.diffusion import decide_diffusion, decide_sampling
from nndiff.planning.fingerprint_view import FingerprintView
from nndiff.planning.patch import (
    decide_batch_size,
    decide_estimated_vram,
    decide_patch_size,
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
    median image has ≥ LATENT_LARGE_IMAGE_VOXELS (1024² in 2D, 256³ in 3D)."""
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


def latent_factors(median_shape: Sequence[int], spacing: Sequence[float]) -> list[int]:
    """Autoencoder downsampling per axis: log2(f) halvings by the same spacing-aware rule as the
    network strides (a thick-slice axis is halved only once the others have caught up)."""
    dims = len(median_shape)
    steps = int(math.log2(LATENT_DOWNSAMPLING[dims]))
    strides = compute_strides(median_shape, spacing, steps, min_feature=1)
    return shape_divisor(strides, dims)


def plan_latent_configuration(ctx: PlanContext, name: str, source: str, spacing: list[float],
                              median_shape: list[int], latent_reason: str) -> dict[str, Any]:
    """A latent-diffusion configuration derived from pixel configuration ``source``: the diffusion
    UNet runs on autoencoder latents (median shape / f, LATENT_MIN_CHANNELS+ channels); planned with
    the same patch/batch/network rules, marked not trainable until the latent stage exists."""
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
    config["autoencoder"] = {"downsampling_factors": factors, "latent_channels": lc,
                             "latent_spacing": latent_spacing, "latent_median_shape": latent_shape}
    config["trainable"] = False
    config["status"] = PLANNED_NOT_TRAINABLE
    reasons = config["reasons"]
    reasons["resampling"] = resampling.reason
    reasons["spacing"] = (f"same preprocessed data as '{source}' ({fmt_spacing(spacing)}); the autoencoder "
                          f"encodes it to {fmt_spacing(latent_spacing)}")
    reasons["median_image_size_in_voxels"] = (f"pixel median {fmt_shape(median_shape)} → latent "
                                              f"{fmt_shape(latent_shape)}")
    reasons["autoencoder"] = (f"f = {LATENT_DOWNSAMPLING[len(spacing)]} per axis ({'Stable Diffusion, Rombach et al. 2022' if len(spacing) == 2 else '3D latent diffusion keeps more detail per latent voxel'}), "
                              f"spacing-aware → factors {fmt_shape(factors)}; {lc} latent channels "
                              f"(≥ {LATENT_MIN_CHANNELS} and ≥ the {pixel.in_channels} diffused channel(s))")
    reasons["patch_size"] = "in latent voxels: " + reasons["patch_size"]
    reasons["trainable"] = f"{latent_reason}; the autoencoder stage is a later issue → trainable false"
    reasons["status"] = f"{PLANNED_NOT_TRAINABLE}: latent patch {fmt_shape(config['patch_size'])} planned for later"
    return config
