"""GPU memory estimate of one training step of the planned diffusion UNet.

The estimate walks the network block (documentation/architecture.md) the way the UNet is built
(ADM layout, Dhariwal & Nichol 2021; see documentation/planning.md "Memory estimate"):

- input conv → per level: ``num_res_blocks`` residual blocks (+ self-attention at attention
  levels), then a strided-conv downsample (except at the deepest level); every block output is
  kept as a skip tensor;
- middle: residual block, attention (when the deepest level is an attention level, which the
  planner always makes it), residual block;
- decoder per level: ``num_res_blocks + 1`` residual blocks over [h, skip] (+ attention), then a
  nearest-upsample + conv (except at level 0); output GroupNorm–SiLU–conv.

Residual blocks have GroupNorm–SiLU–conv, a time-embedding projection (scale-shift of the second
GroupNorm), GroupNorm–SiLU–dropout–conv and a 1×1 skip conv where channels change.

It counts, per sample, the activations autograd keeps for the backward pass (conv feature maps,
GroupNorm / SiLU tensors, attention Q/K/V and scores, time-embedding projections, skips, loss
tensors) plus a backward-pass peak, and once per step the weights, gradients, AdamW moments, the
EMA copy and autocast weight casts. **Attention** is counted on the *math* path of
``scaled_dot_product_attention``: the (heads × tokens × tokens) score matrix is materialised, so
memory grows quadratically with tokens. On a GPU the flash / memory-efficient kernels keep it
linear; assuming the math path keeps the estimate conservative (CPU, old GPUs and unsupported
head sizes fall back to it).

All constants are fields of :class:`MemoryModel`; calibrate them on a GPU by replacing
``DEFAULT_MEMORY_MODEL`` (measured ``torch.cuda.max_memory_reserved()`` of a planned step must land
between 50 % and 100 % of the target).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

GIB = 1024**3


@dataclass(frozen=True)
class MemoryModel:
    """Named constants of the estimate (bytes unless stated otherwise)."""

    #: Bytes of one activation element in the low-precision compute dtype, per training dtype.
    compute_bytes: Mapping[str, int]
    #: GroupNorm (and softmax under autocast) run in fp32 even under bf16 autocast.
    norm_bytes: int = 4
    #: Residual block, per voxel and *input* channel: fp32 copy saved by GroupNorm 1, its output
    #: saved by SiLU, the conv-1 input in compute dtype → 2 × norm + 1 × compute.
    resblock_in_norm_tensors: int = 2
    resblock_in_compute_tensors: int = 1
    #: Residual block, per voxel and *output* channel: GroupNorm-2 input copy, its output (saved by
    #: the scale-shift multiply), the scale-shift result (saved by SiLU) → 3 × norm; conv-2 input
    #: → 1 × compute.
    resblock_out_norm_tensors: int = 3
    resblock_out_compute_tensors: int = 1
    #: Dropout keeps a 1-byte mask per output element when p > 0.
    dropout_mask_bytes: int = 1
    #: Attention block, per token and channel: GroupNorm copy (norm), qkv-conv input, q, k, v,
    #: attention output, residual output (compute).
    attention_norm_tensors: int = 1
    attention_compute_tensors: int = 6
    #: Math-path score memory per (head × token²): the saved softmax probabilities plus the raw
    #: scores / their gradient alive at the peak → this many compute-dtype copies.
    attention_score_copies: int = 3
    #: Per sample, per residual block: time-embedding input and its 2 × C scale-shift projection,
    #: kept in fp32 (tiny but counted, as the task asks).
    time_embedding_bytes: int = 4
    #: Loss computation at full resolution, fp32 tensors of out_channels each (x0, noise, x_t,
    #: target, prediction, difference).
    loss_tensors: int = 6
    #: Backward-pass peak: gradient buffers alive at once at level 0, in fp32 tensors of the widest
    #: level-0 tensor (decoder concatenation, 2 × level-0 channels).
    backward_peak_tensors: int = 3
    #: Static bytes per parameter: fp32 weight + fp32 gradient + AdamW exp_avg and exp_avg_sq +
    #: fp32 EMA copy + foreach-optimizer temporaries.
    weight_bytes: int = 4
    grad_bytes: int = 4
    adamw_state_bytes: int = 8
    ema_bytes: int = 4
    optimizer_temp_bytes: int = 4
    #: Autocast caches a low-precision copy of every weight during forward (bf16/fp16 only).
    autocast_weight_copy_bytes: int = 2
    #: Caching allocator: reserved / allocated ratio (fragmentation, block rounding).
    allocator_factor: float = 1.10
    #: cuBLAS / cuDNN workspaces and allocator slack, GiB.
    workspace_gib: float = 0.35
    #: Convolution kernel size of the UNet.
    kernel_size: int = 3
    #: Multiplier on the activation estimate per spatial dimensionality. The walk above counts what
    #: eager PyTorch keeps; the trainer runs the step under torch.compile on CUDA, whose fused
    #: GroupNorm/SiLU/scale-shift kernels keep fewer tensors. Calibrated on the GPU with
    #: benchmarks/memory_plan.py + memory_calibrate.py (documentation/benchmarks.md, "Memory plan
    #: check": the largest ratio of measured to estimated activations over the planned 8/24/64 GiB
    #: cases on an H200, 2026-12-04); 1.0 would be eager PyTorch.
    activation_scale_2d: float = 0.39
    activation_scale_3d: float = 0.49

    def activation_scale(self, spatial_dims: int) -> float:
        return self.activation_scale_2d if int(spatial_dims) == 2 else self.activation_scale_3d


DEFAULT_MEMORY_MODEL = MemoryModel(compute_bytes={"bf16": 2, "fp16": 2, "fp32": 4})

ATTENTION_PATH_ASSUMED = "math"  # see module docstring


# --- network walk ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """One module of the walked UNet: ``kind`` in conv_in, res, attn, down, up, out."""

    kind: str
    level: int
    c_in: int
    c_out: int


def _level_channels(net: Mapping[str, Any]) -> list[int]:
    return [int(net["model_channels"]) * int(m) for m in net["channel_mult"]]


@dataclass(frozen=True)
class UNetLayout:
    """Modules in forward order and the encoder tensors kept for skip connections."""

    blocks: tuple[Block, ...]
    #: (channels, level) of every encoder output alive until the decoder consumes it.
    skips: tuple[tuple[int, int], ...]


def unet_layout(net: Mapping[str, Any]) -> UNetLayout:
    """Walk the UNet of a network block (ADM layout, see module docstring)."""
    channels = _level_channels(net)
    last = len(channels) - 1
    attention = set(net.get("attention_levels", []))
    nrb = int(net["num_res_blocks"])
    blocks: list[Block] = []
    ch = channels[0]
    blocks.append(Block("conv_in", 0, int(net["in_channels"]) + int(net.get("cond_channels", 0) or 0), ch))
    skips = [(ch, 0)]
    for level, c_level in enumerate(channels):
        for _ in range(nrb):
            blocks.append(Block("res", level, ch, c_level))
            ch = c_level
            if level in attention:
                blocks.append(Block("attn", level, ch, ch))
            skips.append((ch, level))
        if level != last:
            blocks.append(Block("down", level, ch, ch))
            skips.append((ch, level + 1))
    encoder_skips = tuple(skips)
    blocks.append(Block("res", last, ch, ch))
    if last in attention:  # middle attention iff the deepest level is an attention level
        blocks.append(Block("attn", last, ch, ch))
    blocks.append(Block("res", last, ch, ch))
    for level in range(last, -1, -1):
        for i in range(nrb + 1):
            skip_ch, _ = skips.pop()
            blocks.append(Block("res", level, ch + skip_ch, channels[level]))
            ch = channels[level]
            if level in attention:
                blocks.append(Block("attn", level, ch, ch))
            if level != 0 and i == nrb:
                blocks.append(Block("up", level, ch, ch))
    blocks.append(Block("out", 0, ch, int(net["out_channels"])))
    return UNetLayout(blocks=tuple(blocks), skips=encoder_skips)


def time_embed_dim(net: Mapping[str, Any]) -> int:
    """4 × model_channels, as DDPM / ADM."""
    return 4 * int(net["model_channels"])


# --- parameters -------------------------------------------------------------------------------

def _conv_params(c_in: int, c_out: int, k: int, dims: int) -> int:
    return k**dims * c_in * c_out + c_out


def count_parameters(net: Mapping[str, Any], kernel_size: int = 3) -> int:
    """Trainable parameters of the UNet described by the network block (analytic)."""
    dims = int(net["spatial_dims"])
    temb = time_embed_dim(net)
    mc = int(net["model_channels"])
    total = mc * temb + temb + temb * temb + temb  # sinusoidal → MLP (2 linear layers)
    if net.get("num_classes"):
        total += (int(net["num_classes"]) + 1) * temb  # + learned null token
    n_cont = int(net.get("num_continuous_conditions") or 0)
    if n_cont:
        total += n_cont * temb + temb + temb * temb + temb + temb  # MLP + null embedding
    for b in unet_layout(net).blocks:
        if b.kind == "conv_in":
            total += _conv_params(b.c_in, b.c_out, kernel_size, dims)
        elif b.kind == "res":
            total += 2 * b.c_in + _conv_params(b.c_in, b.c_out, kernel_size, dims)
            total += temb * 2 * b.c_out + 2 * b.c_out  # time-embedding scale-shift projection
            total += 2 * b.c_out + _conv_params(b.c_out, b.c_out, kernel_size, dims)
            if b.c_in != b.c_out:
                total += _conv_params(b.c_in, b.c_out, 1, dims)
        elif b.kind == "attn":
            total += 2 * b.c_in + 3 * b.c_in * b.c_in + 3 * b.c_in + b.c_in * b.c_in + b.c_in
        elif b.kind in ("down", "up"):
            total += _conv_params(b.c_in, b.c_out, kernel_size, dims)
        elif b.kind == "out":
            total += 2 * b.c_in + _conv_params(b.c_in, b.c_out, kernel_size, dims)
    return total


# --- activations ------------------------------------------------------------------------------

def level_shapes(net: Mapping[str, Any], patch_size: Sequence[int]) -> list[list[float]]:
    """Feature-map shape at every level for ``patch_size`` (per-axis strides applied)."""
    shape = [float(s) for s in patch_size]
    shapes = [list(shape)]
    for stride in net["strides"]:
        shape = [s / f for s, f in zip(shape, stride)]
        shapes.append(list(shape))
    return shapes


def attention_score_bytes(tokens: float, heads: int, dtype: str = "bf16",
                          model: MemoryModel | None = None) -> float:
    """Math-path attention score memory of one attention layer, one sample: quadratic in tokens."""
    model = model or DEFAULT_MEMORY_MODEL
    return model.attention_score_copies * model.compute_bytes[dtype] * heads * tokens * tokens


@dataclass(frozen=True)
class VramEstimate:
    """Breakdown of the estimate in GiB (``total_gib`` is what the planner compares to the target)."""

    parameters: int
    static_gib: float
    activations_gib: float
    attention_scores_gib: float
    time_embedding_gib: float
    workspace_gib: float
    total_gib: float
    batch_size: int
    dtype: str


def _per_sample_activation_bytes(net: Mapping[str, Any], patch_size: Sequence[int], dtype: str,
                                 model: MemoryModel) -> tuple[float, float, float]:
    """(all activations, attention-score part, time-embedding part) in bytes for one sample."""
    cb = model.compute_bytes[dtype]
    nb = model.norm_bytes if dtype != "fp32" else max(model.norm_bytes, cb)
    voxels = [math.prod(s) for s in level_shapes(net, patch_size)]
    heads_of = lambda c: max(1, c // int(net["num_head_channels"]))  # noqa: E731
    dropout = float(net.get("dropout", 0.0) or 0.0)
    temb = time_embed_dim(net)
    layout = unet_layout(net)
    total = scores = tembs = 0.0
    for b in layout.blocks:
        v = voxels[b.level]
        if b.kind == "conv_in":
            total += v * cb * b.c_in
        elif b.kind == "res":
            per_voxel = (b.c_in * (model.resblock_in_norm_tensors * nb + model.resblock_in_compute_tensors * cb)
                         + b.c_out * (model.resblock_out_norm_tensors * nb
                                      + model.resblock_out_compute_tensors * cb))
            if b.c_in != b.c_out:
                per_voxel += b.c_in * cb  # 1×1 skip conv keeps its input
            if dropout > 0:
                per_voxel += b.c_out * model.dropout_mask_bytes
            total += v * per_voxel
            t = model.time_embedding_bytes * (temb + 2 * b.c_out)
            tembs += t
            total += t
        elif b.kind == "attn":
            total += v * b.c_in * (model.attention_norm_tensors * nb + model.attention_compute_tensors * cb)
            s = attention_score_bytes(v, heads_of(b.c_in), dtype, model)
            scores += s
            total += s
        elif b.kind == "down":
            total += v * cb * b.c_in  # strided conv keeps its (finer) input
        elif b.kind == "up":
            total += voxels[b.level - 1] * cb * b.c_in  # conv after nearest upsampling keeps its input
        elif b.kind == "out":
            total += v * b.c_in * (2 * nb + cb) + v * model.loss_tensors * 4 * b.c_out
    for ch, level in layout.skips:
        total += voxels[level] * cb * ch
    total += voxels[0] * model.backward_peak_tensors * 4 * 2 * _level_channels(net)[0]
    return total, scores, tembs


def estimate_training_vram(network: Mapping[str, Any], patch_size: Sequence[int], batch_size: int,
                           dtype: str = "bf16", model: MemoryModel | None = None) -> VramEstimate:
    """Estimated ``torch.cuda.max_memory_reserved()`` of one training step, with its breakdown.

    ``network`` is a plans network block, ``patch_size`` has ``spatial_dims`` entries, ``dtype`` is
    the autocast dtype ("bf16", "fp16") or "fp32". Attention is counted on the math path
    (quadratic in tokens), see the module docstring.
    """
    model = model or DEFAULT_MEMORY_MODEL  # looked up at call time so a calibration can replace it
    if dtype not in model.compute_bytes:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(model.compute_bytes)}")
    if len(patch_size) != int(network["spatial_dims"]):
        raise ValueError(f"patch_size {list(patch_size)} does not have spatial_dims="
                         f"{network['spatial_dims']} entries")
    params = count_parameters(network, model.kernel_size)
    per_param = (model.weight_bytes + model.grad_bytes + model.adamw_state_bytes + model.ema_bytes
                 + model.optimizer_temp_bytes + (model.autocast_weight_copy_bytes if dtype != "fp32" else 0))
    act, scores, tembs = _per_sample_activation_bytes(network, patch_size, dtype, model)
    factor = model.allocator_factor * model.activation_scale(network["spatial_dims"])
    static_gib = params * per_param / GIB
    act_gib = batch_size * act * factor / GIB
    total = static_gib + act_gib + model.workspace_gib
    return VramEstimate(parameters=params, static_gib=static_gib, activations_gib=act_gib,
                        attention_scores_gib=batch_size * scores * factor / GIB,
                        time_embedding_gib=batch_size * tembs * factor / GIB,
                        workspace_gib=model.workspace_gib, total_gib=total,
                        batch_size=batch_size, dtype=dtype)


def estimate_training_vram_gib(network: Mapping[str, Any], patch_size: Sequence[int], batch_size: int,
                               dtype: str = "bf16", model: MemoryModel | None = None) -> float:
    """Estimated GPU memory (GiB) of one training step; see :func:`estimate_training_vram`."""
    return estimate_training_vram(network, patch_size, batch_size, dtype, model).total_gib


def per_sample_and_static_gib(network: Mapping[str, Any], patch_size: Sequence[int], dtype: str = "bf16",
                              model: MemoryModel | None = None) -> tuple[float, float]:
    """(GiB per extra sample, GiB independent of the batch): the estimate is linear in batch size."""
    one = estimate_training_vram(network, patch_size, 1, dtype, model)
    two = estimate_training_vram(network, patch_size, 2, dtype, model)
    per_sample = two.total_gib - one.total_gib
    return per_sample, one.total_gib - per_sample
