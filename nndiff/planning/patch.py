"""Rules: patch size and batch size from the GPU memory target, using the memory estimate."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from nndiff.planning.constants import (
    MAX_DATASET_FRACTION_PER_BATCH,
    MIN_BATCH_SIZE,
    MIN_PATCH_SIDE,
    PATCH_SCALE_STEP,
    TARGET_UTILIZATION,
    TRAINING_DTYPE,
)
from nndiff.planning.decision import Decision, fmt_gib, fmt_num, fmt_pct, fmt_shape
from nndiff.planning.memory import estimate_training_vram, per_sample_and_static_gib
from nndiff.planning.topology import fit_patch_to_strides

#: Builds the network block for a patch and its strides (channels/conditioning fixed by the caller).
NetworkFactory = Callable[[Sequence[int], Sequence[Sequence[int]]], dict[str, Any]]


@dataclass(frozen=True)
class PatchSearch:
    """Outcome of the patch search (the chosen patch, its network and estimate at the minimum batch)."""

    patch_size: list[int]
    network: dict[str, Any]
    estimate_gib: float
    fits: bool
    coverage: float
    candidates_tried: int


def memory_budget_gib(gpu_memory_target_gib: float) -> float:
    """The planned step's estimate must stay below TARGET_UTILIZATION × target (headroom for error)."""
    return TARGET_UTILIZATION * gpu_memory_target_gib


def search_patch(median_shape: Sequence[int], spacing: Sequence[float], make_network: NetworkFactory,
                 gpu_memory_target_gib: float, dtype: str = TRAINING_DTYPE) -> PatchSearch:
    """Largest patch (median-shape aspect ratio, divisible by its network's total stride) whose
    training step at batch MIN_BATCH_SIZE fits the memory budget.

    Scales the median shape by s = 1, 0.95, 0.95², … (each side at least min(median, MIN_PATCH_SIDE))
    and takes the first candidate that fits; the patch thus grows toward the median image shape as
    the target grows. If not even the smallest candidate fits, it is returned with ``fits=False``.
    """
    budget = memory_budget_gib(gpu_memory_target_gib)
    floor = [min(float(m), float(MIN_PATCH_SIDE)) for m in median_shape]
    median_voxels = math.prod(median_shape)
    seen: set[tuple[int, ...]] = set()
    scale = 1.0
    last: PatchSearch | None = None
    while True:
        raw = [max(m * scale, f) for m, f in zip(median_shape, floor)]
        patch, strides = fit_patch_to_strides(raw, spacing)
        if tuple(patch) not in seen:
            seen.add(tuple(patch))
            net = make_network(patch, strides)
            est = estimate_training_vram(net, patch, MIN_BATCH_SIZE, dtype).total_gib
            coverage = min(1.0, math.prod(patch) / median_voxels)
            last = PatchSearch(patch, net, est, est <= budget, coverage, len(seen))
            if last.fits:
                return last
        if all(r <= f for r, f in zip(raw, floor)):
            assert last is not None
            return last
        scale *= PATCH_SCALE_STEP


def decide_patch_size(search: PatchSearch, median_shape: Sequence[int], spacing: Sequence[float],
                      gpu_memory_target_gib: float) -> Decision[list[int]]:
    """Patch size: the result of :func:`search_patch`, with the numbers that drove it."""
    budget = memory_budget_gib(gpu_memory_target_gib)
    head = (f"median image {fmt_shape(median_shape)} at {fmt_shape(spacing)} mm; target "
            f"{fmt_num(gpu_memory_target_gib)} GiB × {fmt_num(TARGET_UTILIZATION)} = {fmt_gib(budget)} budget")
    tail = (f"patch {fmt_shape(search.patch_size)} ({fmt_pct(search.coverage)} of the median image's voxels, "
            f"divisible by the total stride), estimate {fmt_gib(search.estimate_gib)} at batch {MIN_BATCH_SIZE}")
    if not search.fits:
        return Decision(search.patch_size, f"{head}; even the smallest patch does not fit: {tail} > budget "
                                           "(expect out-of-memory; raise --gpu_memory_target)")
    if search.coverage >= 1.0 or search.candidates_tried == 1:
        return Decision(search.patch_size, f"{head}; the whole median image fits → {tail}")
    return Decision(search.patch_size, f"{head}; largest patch of the median's aspect ratio that fits "
                                       f"→ {tail}")


def decide_batch_size(network: dict[str, Any], patch_size: Sequence[int], gpu_memory_target_gib: float,
                      dataset_voxels: float, dtype: str = TRAINING_DTYPE) -> Decision[int]:
    """Batch size: as many samples as the memory budget allows on top of the fixed cost (weights,
    optimizer, EMA, workspace), capped so batch × patch voxels ≤ MAX_DATASET_FRACTION_PER_BATCH (5 %)
    of the dataset's voxels (nnU-Net's rule against over-large batches on small datasets), and at
    least MIN_BATCH_SIZE (2; GroupNorm does not need large batches, but one sample per step makes
    the loss too noisy)."""
    budget = memory_budget_gib(gpu_memory_target_gib)
    per_sample, fixed = per_sample_and_static_gib(network, patch_size, dtype)
    by_memory = max(0, int((budget - fixed) // per_sample))
    patch_voxels = math.prod(patch_size)
    cap = int(MAX_DATASET_FRACTION_PER_BATCH * dataset_voxels // patch_voxels)
    batch = max(MIN_BATCH_SIZE, min(by_memory, cap))
    limit = "memory" if by_memory <= cap else f"the {fmt_pct(MAX_DATASET_FRACTION_PER_BATCH)} dataset cap"
    clamp = f", clamped up to the minimum {MIN_BATCH_SIZE}" if batch > min(by_memory, cap) else ""
    return Decision(batch, f"budget {fmt_gib(budget)} − fixed {fmt_gib(fixed)} (weights, AdamW, EMA, "
                           f"workspace) over {fmt_gib(per_sample)} per sample of {fmt_shape(patch_size)} → "
                           f"{by_memory} by memory; {fmt_pct(MAX_DATASET_FRACTION_PER_BATCH)} of "
                           f"{dataset_voxels:.3g} dataset voxels / {patch_voxels} per patch → cap {cap}; "
                           f"batch {batch} (limited by {limit}{clamp})")


def decide_estimated_vram(network: dict[str, Any], patch_size: Sequence[int], batch_size: int,
                          gpu_memory_target_gib: float, dtype: str = TRAINING_DTYPE) -> Decision[float]:
    """The estimate of the planned step (recorded so the GPU calibration can compare it)."""
    est = estimate_training_vram(network, patch_size, batch_size, dtype)
    return Decision(round(est.total_gib, 3),
                    f"{dtype} autocast, AdamW + EMA: {est.parameters / 1e6:.3g} M parameters → static "
                    f"{fmt_gib(est.static_gib)}; activations {fmt_gib(est.activations_gib)} at batch {batch_size} "
                    f"(of which attention scores {fmt_gib(est.attention_scores_gib)}, math path assumed; "
                    f"time embeddings {est.time_embedding_gib * 1024:.3g} MiB); workspace "
                    f"{fmt_gib(est.workspace_gib)} → {fmt_gib(est.total_gib)} of {fmt_num(gpu_memory_target_gib)} GiB")
