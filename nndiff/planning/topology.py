"""Rules: network topology (levels, per-axis strides, channels, attention levels, res blocks),
channels diffused / conditioning / output, class and metadata conditioning, dropout.

The result is the ``network`` block of documentation/architecture.md, read by
``nndiff.networks.build_network``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from nndiff.diffusion.options import TaskFamily
from nndiff.errors import PlansError
from nndiff.planning.constants import (
    MAX_ATTENTION_TOKENS,
    MAX_CHANNEL_MULT,
    MAX_DOWNSAMPLINGS,
    MIN_FEATURE_MAP_SIZE,
    MODEL_CHANNELS,
    NORM_GROUPS,
    NUM_HEAD_CHANNELS,
    NUM_RES_BLOCKS,
    SMALL_DATASET_CASES,
    SMALL_DATASET_DROPOUT,
    STRIDE_SPACING_RATIO,
)
from nndiff.planning.decision import Decision, fmt_num, fmt_shape, fmt_spacing
from nndiff.planning.fingerprint_view import IMAGE, TARGET, FingerprintView


def compute_strides(size: Sequence[float], spacing: Sequence[float], max_steps: int,
                    min_feature: float = MIN_FEATURE_MAP_SIZE) -> list[list[int]]:
    """Per-axis strides, nnU-Net v2's pooling rule: at each step an axis is halved if it stays
    ≥ ``min_feature`` voxels and its current spacing is less than STRIDE_SPACING_RATIO (2) times the
    finest current spacing among the axes that can still be halved. A coarse (thick-slice) axis
    therefore keeps stride 1 in the first levels until the in-plane axes have caught up.
    """
    size = [float(s) for s in size]
    spacing = [float(s) for s in spacing]
    strides: list[list[int]] = []
    while len(strides) < max_steps:
        poolable = [a for a in range(len(size)) if size[a] >= 2 * min_feature]
        if not poolable:
            break
        finest = min(spacing[a] for a in poolable)
        step = [2 if a in poolable and spacing[a] / finest < STRIDE_SPACING_RATIO else 1
                for a in range(len(size))]
        strides.append(step)
        size = [s / f for s, f in zip(size, step)]
        spacing = [s * f for s, f in zip(spacing, step)]
    return strides


def shape_divisor(strides: Sequence[Sequence[int]], dims: int) -> list[int]:
    """Product of strides per axis: every patch side must be a multiple of it."""
    return [math.prod(s[a] for s in strides) for a in range(dims)]


def fit_patch_to_strides(raw: Sequence[float], spacing: Sequence[float]) -> tuple[list[int], list[list[int]]]:
    """Round a raw patch to the nearest multiple of its own network's total stride (per axis).

    Strides depend on the patch and the rounding on the strides; divisors are powers of two, so
    iterating until the patch is divisible by the strides computed from it terminates.
    """
    dims = len(raw)
    patch = [max(1, int(round(r))) for r in raw]
    for _ in range(MAX_DOWNSAMPLINGS[dims] + 2):
        strides = compute_strides(patch, spacing, MAX_DOWNSAMPLINGS[dims])
        divisor = shape_divisor(strides, dims)
        if all(p % d == 0 for p, d in zip(patch, divisor)):
            return patch, strides
        patch = [d * max(1, int(round(p / d))) for p, d in zip(patch, divisor)]
    raise AssertionError(f"patch rounding did not converge for {list(raw)}")  # pragma: no cover


def level_shapes(patch: Sequence[int], strides: Sequence[Sequence[int]]) -> list[list[int]]:
    shapes = [list(patch)]
    for step in strides:
        shapes.append([s // f for s, f in zip(shapes[-1], step)])
    return shapes


def attention_levels(patch: Sequence[int], strides: Sequence[Sequence[int]]) -> list[int]:
    """Levels ≥ 1 whose feature map has ≤ MAX_ATTENTION_TOKENS tokens, and always the deepest."""
    shapes = level_shapes(patch, strides)
    deepest = len(shapes) - 1
    levels = [lvl for lvl in range(1, len(shapes)) if math.prod(shapes[lvl]) <= MAX_ATTENTION_TOKENS]
    return sorted(set(levels) | {deepest})


def channel_mult(num_levels: int, dims: int) -> list[int]:
    """Doubling per level, capped at MAX_CHANNEL_MULT (width stops growing at coarse levels)."""
    return [min(2**lvl, MAX_CHANNEL_MULT[dims]) for lvl in range(num_levels)]


@dataclass(frozen=True)
class ChannelPlan:
    """How many channels the network diffuses, sees as conditioning, and outputs."""

    in_channels: int
    cond_channels: int
    out_channels: int


def _num_labels(dataset_json: Mapping[str, Any]) -> int:
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise PlansError("dataset.json key 'labels' is missing or empty; segmentation diffuses the labels. "
                         "Fix: declare them as {\"background\": 0, \"structure\": 1, ...}")
    return len(labels)


#: dataset.json key that lets cases lack some image (source) channels.
ALLOW_MISSING_CHANNELS_KEY = "allow_missing_channels"


def _allow_missing_channels(task: TaskFamily, n_tgt: int, dataset_json: Mapping[str, Any]) -> bool:
    """dataset.json ``allow_missing_channels``; only families that *condition* on the images can
    complete a missing channel, so any other family with the key set is a plans error."""
    if not dataset_json.get(ALLOW_MISSING_CHANNELS_KEY, False):
        return False
    if task == TaskFamily.TRANSLATION or (task == TaskFamily.DENOISING and n_tgt):
        return True
    what = "clean-only denoising" if task == TaskFamily.DENOISING else str(task)
    raise PlansError(f"dataset.json key '{ALLOW_MISSING_CHANNELS_KEY}' is true, but {what} diffuses or degrades the "
                     "images themselves, so a missing image channel cannot be conditioned away (only translation "
                     "and paired denoising support missing channels). Fix: remove the key (and add the missing "
                     "channel files) or use task translation")


def decide_channels(fp: FingerprintView, task: TaskFamily, dataset_json: Mapping[str, Any]) -> Decision[ChannelPlan]:
    """Channels diffused (``in_channels``), concatenated conditioning images (``cond_channels``) and
    network output (``out_channels`` = in_channels: the v-target has the shape of x).

    generation / anomaly_detection / reconstruction diffuse the images without image conditioning
    (reconstruction conditions through data consistency in the sampler, anomaly detection through
    partial diffusion); translation and paired denoising diffuse the targets conditioned on the
    images; clean-only denoising diffuses the images conditioned on a synthetically degraded copy;
    segmentation diffuses one-hot labels (one channel per label incl. background, scaled to [-1, 1])
    conditioned on the images. Complex images count twice (real/imaginary channel pairs).

    With dataset.json ``"allow_missing_channels": true`` (translation and paired denoising only,
    the families whose conditioning images may lack channels) the conditioning doubles: the images
    (missing ones zero-filled) and one availability mask channel per image channel
    (``nndiff.tasks.translation.ConditionLayout``, UMM-CSGM's missing-modality completion).
    """
    n_img = fp.stored_channel_count(IMAGE)
    n_tgt = fp.stored_channel_count(TARGET)
    cx = " (complex → real/imaginary pairs)" if fp.is_complex else ""
    allow_missing = _allow_missing_channels(task, n_tgt, dataset_json)
    if task in (TaskFamily.GENERATION, TaskFamily.ANOMALY_DETECTION, TaskFamily.RECONSTRUCTION):
        plan, why = ChannelPlan(n_img, 0, n_img), f"{task} diffuses the {n_img} image channel(s){cx}, no image conditioning"
    elif task == TaskFamily.TRANSLATION or (task == TaskFamily.DENOISING and n_tgt):
        if not n_tgt:
            raise PlansError("translation needs target channels but the fingerprint has none. Fix: add "
                             "'target_names' and targetsTr/ to the dataset, then re-run nndiff_extract_fingerprint")
        if allow_missing:
            plan = ChannelPlan(n_tgt, 2 * n_img, n_tgt)
            why = (f"{task} diffuses the {n_tgt} target channel(s) conditioned on the {n_img} image channel(s){cx} "
                   f"plus {n_img} availability mask channel(s), because dataset.json allows missing channels "
                   f"(2 × {n_img} conditioning channels: images zero-filled where missing, then 1/0 masks)")
        else:
            plan = ChannelPlan(n_tgt, n_img, n_tgt)
            why = f"{task} diffuses the {n_tgt} target channel(s) conditioned on the {n_img} image channel(s){cx}"
    elif task == TaskFamily.DENOISING:
        plan = ChannelPlan(n_img, n_img, n_img)
        why = (f"clean-only denoising diffuses the {n_img} clean image channel(s) conditioned on "
               f"{n_img} synthetically degraded copy(ies){cx}")
    else:  # segmentation
        n_lab = _num_labels(dataset_json)
        plan = ChannelPlan(n_lab, n_img, n_lab)
        why = (f"segmentation diffuses {n_lab} one-hot label channels (one per label incl. background) "
               f"conditioned on the {n_img} image channel(s)")
    return Decision(plan, f"{why} → in_channels {plan.in_channels}, cond_channels {plan.cond_channels}, "
                          f"out_channels {plan.out_channels}")


def decide_conditioning(dataset_json: Mapping[str, Any]) -> Decision[tuple[int | None, int]]:
    """``num_classes`` and ``num_continuous_conditions`` from dataset.json ``conditions``.

    Several categorical fields become one joint class index (product of their value counts), since
    the network has one class embedding; continuous fields each feed the metadata MLP.
    """
    conditions = dataset_json.get("conditions") or {}
    categorical: list[tuple[str, int]] = []
    continuous: list[str] = []
    for name, spec in conditions.items():
        ctype = spec if isinstance(spec, str) else spec.get("type") if isinstance(spec, Mapping) else None
        if ctype == "continuous":
            continuous.append(name)
        elif ctype == "categorical":
            values = spec.get("values") if isinstance(spec, Mapping) else None
            if not isinstance(values, list) or len(values) < 2:
                raise PlansError(f"dataset.json 'conditions' entry '{name}' is categorical but declares no "
                                 "'values' list, so the number of classes is unknown. Fix: add "
                                 f"\"values\": [...] to conditions.{name}")
            categorical.append((name, len(values)))
    num_classes = math.prod(n for _, n in categorical) if categorical else None
    if not categorical and not continuous:
        return Decision((None, 0), "no 'conditions' in dataset.json → unconditional (num_classes null, "
                                   "0 continuous conditions)")
    parts = []
    if categorical:
        joint = " × ".join(f"{n} ({k})" for n, k in categorical)
        parts.append(f"categorical {joint} → num_classes {num_classes} (+1 learned null token for CFG)")
    parts.append(f"{len(continuous)} continuous condition(s)" + (f" ({', '.join(continuous)})" if continuous else ""))
    return Decision((num_classes, len(continuous)), "; ".join(parts))


def decide_dropout(fp: FingerprintView) -> Decision[float]:
    """Dropout 0.1 in the residual blocks for datasets under SMALL_DATASET_CASES (200) cases: small
    datasets are memorised by diffusion UNets (ADM used dropout 0.1-0.3 on small datasets); 0 else."""
    n = fp.num_cases
    if n < SMALL_DATASET_CASES:
        return Decision(SMALL_DATASET_DROPOUT, f"{n} cases < {SMALL_DATASET_CASES} → dropout "
                                               f"{fmt_num(SMALL_DATASET_DROPOUT)} against memorisation")
    return Decision(0.0, f"{n} cases ≥ {SMALL_DATASET_CASES} → dropout 0")


def build_network_block(spatial_dims: int, strides: Sequence[Sequence[int]], patch: Sequence[int],
                        channels: ChannelPlan, conditioning: tuple[int | None, int],
                        dropout: float) -> dict[str, Any]:
    """The plans ``network`` block for a patch and its strides (keys exactly as architecture.md)."""
    return {
        "architecture": "unet",
        "spatial_dims": spatial_dims,
        "in_channels": channels.in_channels,
        "cond_channels": channels.cond_channels,
        "out_channels": channels.out_channels,
        "model_channels": MODEL_CHANNELS[spatial_dims],
        "channel_mult": channel_mult(len(strides) + 1, spatial_dims),
        "strides": [list(s) for s in strides],
        "num_res_blocks": NUM_RES_BLOCKS,
        "attention_levels": attention_levels(patch, strides),
        "num_head_channels": NUM_HEAD_CHANNELS,
        "norm_groups": NORM_GROUPS,
        "dropout": dropout,
        "num_classes": conditioning[0],
        "num_continuous_conditions": conditioning[1],
    }


def decide_network_topology(patch: Sequence[int], spacing: Sequence[float], channels: ChannelPlan,
                            conditioning: tuple[int | None, int], dropout: float) -> Decision[dict[str, Any]]:
    """Network block for ``patch`` at ``spacing``: strides by :func:`compute_strides` (at most
    MAX_DOWNSAMPLINGS, bottleneck ≥ MIN_FEATURE_MAP_SIZE voxels per pooled axis), one level per
    stride + 1, width MODEL_CHANNELS × min(2^level, MAX_CHANNEL_MULT), NUM_RES_BLOCKS residual blocks
    per level, self-attention where a level has ≤ MAX_ATTENTION_TOKENS tokens (and always at the
    deepest level, for global context)."""
    dims = len(patch)
    patch = list(patch)
    strides = compute_strides(patch, spacing, MAX_DOWNSAMPLINGS[dims])
    divisor = shape_divisor(strides, dims)
    if any(p % d for p, d in zip(patch, divisor)):
        raise PlansError(f"patch_size {patch} is not divisible by the network's total stride {divisor}. "
                         "Fix: use a patch size that is a multiple of it per axis")
    net = build_network_block(dims, strides, patch, channels, conditioning, dropout)
    shapes = level_shapes(patch, strides)
    widths = [net["model_channels"] * m for m in net["channel_mult"]]
    coarse = [a for a in range(dims) if strides and strides[0][a] == 1]
    aniso = (f"; axis {coarse} keeps stride 1 in the first level(s) because its spacing is ≥ "
             f"{fmt_num(STRIDE_SPACING_RATIO)}× the finest" if coarse else "")
    tokens = ", ".join(f"{lvl}: {math.prod(shapes[lvl])}" for lvl in net["attention_levels"])
    reason = (f"patch {fmt_shape(patch)} at {fmt_spacing(spacing)} → {len(strides)} downsamplings "
              f"(strides {strides}, total {fmt_shape(divisor)}){aniso}; bottleneck {fmt_shape(shapes[-1])} "
              f"(≥ {MIN_FEATURE_MAP_SIZE} per pooled axis); {len(widths)} levels, channels "
              f"{'/'.join(map(str, widths))}; {NUM_RES_BLOCKS} res blocks per level; attention at levels "
              f"{net['attention_levels']} (tokens {tokens}; ≤ {MAX_ATTENTION_TOKENS} or deepest)")
    return Decision(net, reason)
