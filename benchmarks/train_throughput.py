"""Training throughput: nnDiff's planned 2D UNet against MONAI's DiffusionModelUNet, same run, equal parameters.

What it does (issue 4, "Throughput benchmark"):

1. Plans a realistic dataset (default: the 240x240x155 1 mm brain-MR fingerprint of
   ``tests/planning/planning_fixtures.py``) at a GPU-memory target (default 24 GiB) and takes the
   ``2d`` configuration's network block, patch and batch size; nnDiff's network is
   ``nndiff.networks.build_network(block)``.
2. Configures MONAI's ``DiffusionModelUNet`` with the same topology (levels, channels, residual
   blocks per level, attention levels, head width, GroupNorm groups; flash attention on), then
   changes the width of one level (up to 3 width units) or of two levels (1 unit each) until its
   parameter count is within +-1 % of nnDiff's (the candidate with the smallest change in
   convolution compute wins; a width unit keeps the GroupNorm groups and the attention head width).
   Both counts and the relative difference are printed; the script exits with status 2 if no
   candidate is within the tolerance.
3. Counts FLOPs of one forward + backward per model with ``torch.utils.flop_counter`` on the meta
   device (``nndiff.networks.estimate_flops``: convolutions, linears, attention matmuls).
4. Runs the same training step for both (AdamW, fused on CUDA; MSE on eps; gradient clipping 1.0;
   EMA by ``torch._foreach_lerp_``), both ``torch.compile``-d (default mode, one input shape), in
   bf16 autocast and in "fp32" (float32 tensors with TF32 tensor-core matmuls and convolutions
   enabled), warm-up steps excluded from timing; reports samples/s, TFLOP/s and peak
   ``max_memory_allocated`` / ``max_memory_reserved`` per (model, precision), and the ratio
   nnDiff / MONAI samples/s per precision.
5. Times simplex noise for one batch (``nndiff.diffusion.noise.SimplexNoise``) against one nnDiff
   training step on the same batch shape and device.

Usage::

    PYTHONPATH=. python benchmarks/train_throughput.py --device cuda --output $OUT     # GPU, ~5 min
    PYTHONPATH=. python benchmarks/train_throughput.py --device cpu --tiny             # CPU check, < 1 min

Output: one JSON line per measurement on stdout (prefix ``RESULT``), ratio lines (prefix ``RATIO``),
elapsed time per phase (prefix ``PHASE``) and a markdown table at the end; with ``--output DIR``
also ``DIR/train_throughput.jsonl`` and ``DIR/train_throughput.md``. The input batches are
generated once on the device before timing (model throughput, not data loading).
Compile switch: ``--compile on|off|auto`` (auto: the trainer's environment switch ``nnDiff_compile``,
else on for CUDA and off for CPU).

``--parallel_compile`` runs each (model, precision) in its own process: all of them compile at the
same time (compilation is CPU work, ~150 s per model and precision on the GPU machine, so four in a
row cost ~10 minutes of device time), then each waits until every process has warmed up and times
its steps holding a file lock, so no two timed sections overlap and each process's peak memory is its
own allocator's. The parent measures the simplex noise afterwards and prints the same table. MONAI (``pip install monai``, needs ``einops``) is a
benchmark-only dependency.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tests" / "planning"):  # nndiff without installing; the planner's fixtures
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from nndiff.networks import build_network, count_parameters, estimate_flops  # noqa: E402
from nndiff.planning import plan_experiment  # noqa: E402

#: The trainer's compile switch (nndiff/training/config.py; importing that package would pull in
#: batchgenerators, which the GPU machine does not have).
ENV_COMPILE = "nnDiff_compile"
PARAM_TOLERANCE = 0.01
PRECISIONS = ("bf16", "fp32")
NNDIFF, MONAI = "nnDiff", "MONAI"
#: Same optimiser and EMA settings as the trainer's defaults (nndiff/training/config.py).
LEARNING_RATE = 1e-4
EMA_DECAY = 0.9999
GRAD_CLIP = 1.0
NUM_BATCHES = 4  # distinct pre-generated batches, cycled (all of one shape)


@dataclass(frozen=True)
class Setup:
    """What one benchmark trains: a plans ``network`` block, patch and batch size."""

    network: dict[str, Any]
    patch_size: tuple[int, ...]
    batch_size: int
    source: str


@dataclass
class Match:
    """Result of the MONAI width search."""

    channels: tuple[int, ...]
    params: int
    target_params: int
    tried: int
    closest: list[tuple[tuple[int, ...], int]] = field(default_factory=list)

    @property
    def relative_difference(self) -> float:
        """(MONAI - nnDiff) / nnDiff parameters."""
        return (self.params - self.target_params) / self.target_params


# ----------------------------------------------------------------------------------------------
# What to benchmark
# ----------------------------------------------------------------------------------------------

def planned_setup(fingerprint_kind: str, gpu_memory_target_gib: float, configuration: str = "2d") -> Setup:
    """Network, patch and batch of ``configuration`` planned for a large synthetic fingerprint."""
    import planning_fixtures as fx

    fingerprints = {"mr": (fx.mr_fingerprint, {"0": "T1"}), "ct": (fx.ct_fingerprint, {"0": "CT"}),
                    "xray": (fx.xray_fingerprint, {"0": "xray"})}
    make_fingerprint, channel_names = fingerprints[fingerprint_kind]
    plans = plan_experiment(make_fingerprint(), fx.dataset_json(channel_names=channel_names),
                            gpu_memory_target_gib=gpu_memory_target_gib)
    config = plans["configurations"][configuration]
    source = f"{fingerprint_kind} fingerprint, {gpu_memory_target_gib:g} GiB target, '{configuration}' configuration"
    return Setup(dict(config["network"]), tuple(config["patch_size"]), int(config["batch_size"]), source)


def tiny_setup(setup: Setup, levels: int = 3, model_channels: int = 16, patch: int = 32, batch: int = 2) -> Setup:
    """A CPU-sized version of a planned setup: fewer levels, narrower, 32² patch, batch 2.

    Keeps the block's structure (channel multipliers of the first levels, res blocks, attention at
    the deepest kept level) so the same code paths run, only small.
    """
    net = dict(setup.network)
    levels = min(levels, len(net["channel_mult"]))
    net.update(model_channels=model_channels, channel_mult=list(net["channel_mult"][:levels]),
               strides=[list(s) for s in net["strides"][:levels - 1]], attention_levels=[levels - 1],
               num_head_channels=16, norm_groups=4)
    spatial = (patch,) * net["spatial_dims"]
    return Setup(net, spatial, batch, setup.source + ", shrunk by --tiny")


def level_channels(network: Mapping[str, Any]) -> tuple[int, ...]:
    """Channels per resolution level of an nnDiff network block."""
    return tuple(network["model_channels"] * m for m in network["channel_mult"])


def level_pixels(patch_size: Sequence[int], network: Mapping[str, Any]) -> tuple[int, ...]:
    """Number of pixels (voxels) per resolution level for ``patch_size``."""
    sizes = list(patch_size)
    pixels = [math.prod(sizes)]
    for stride in network["strides"]:
        sizes = [s // f for s, f in zip(sizes, stride)]
        pixels.append(math.prod(sizes))
    return tuple(pixels)


# ----------------------------------------------------------------------------------------------
# MONAI's network at nnDiff's parameter count
# ----------------------------------------------------------------------------------------------

def monai_kwargs(network: Mapping[str, Any], channels: Sequence[int]) -> dict[str, Any]:
    """``DiffusionModelUNet`` arguments reproducing nnDiff's topology with the given level widths.

    MONAI always halves every axis between levels, has attention in the middle block and one more
    residual block per decoder level than per encoder level (as nnDiff); it adds the time embedding
    instead of nnDiff's scale-shift, so equal widths give fewer parameters.
    """
    if any(f != 2 for stride in network["strides"] for f in stride):
        raise SystemExit(f"MONAI's DiffusionModelUNet halves every axis; planned strides {network['strides']} "
                         "cannot be reproduced. Fix: benchmark a configuration with isotropic 2x strides")
    if network.get("cond_channels") or network.get("num_classes") or network.get("num_continuous_conditions"):
        raise SystemExit("the benchmark compares unconditional networks. Fix: plan an unconditional dataset")
    levels = len(network["channel_mult"])
    return dict(
        spatial_dims=network["spatial_dims"], in_channels=network["in_channels"],
        out_channels=network["out_channels"], num_res_blocks=network["num_res_blocks"],
        channels=tuple(int(c) for c in channels),
        attention_levels=tuple(level in network["attention_levels"] for level in range(levels)),
        num_head_channels=network["num_head_channels"], norm_num_groups=network["norm_groups"],
        use_flash_attention=True,
    )


def build_monai(kwargs: Mapping[str, Any], meta: bool = False, seed: int = 0) -> nn.Module:
    """MONAI's ``DiffusionModelUNet``; on the meta device (no memory) when ``meta``."""
    from monai.networks.nets import DiffusionModelUNet

    if meta:
        with torch.device("meta"):
            return DiffusionModelUNet(**kwargs)
    torch.manual_seed(seed)
    return DiffusionModelUNet(**kwargs)


def channel_units(network: Mapping[str, Any]) -> tuple[int, ...]:
    """Smallest width step per level that keeps GroupNorm groups and (at attention levels) the head width."""
    groups, head = network["norm_groups"], network["num_head_channels"]
    return tuple(math.lcm(groups, head) if level in network["attention_levels"] else groups
                 for level in range(len(network["channel_mult"])))


def channel_candidates(base: Sequence[int], units: Sequence[int], max_steps: int = 3) -> Iterable[tuple[int, ...]]:
    """``base``, every change of one level by +-1..``max_steps`` units, every pair of levels by +-1 unit.

    A width never drops below one unit.
    """
    base = tuple(base)
    yield base
    for level, step in itertools.product(range(len(base)), range(-max_steps, max_steps + 1)):
        if step and base[level] + step * units[level] >= units[level]:
            yield base[:level] + (base[level] + step * units[level],) + base[level + 1:]
    for (a, b), (step_a, step_b) in itertools.product(itertools.combinations(range(len(base)), 2),
                                                      itertools.product((-1, 1), repeat=2)):
        channels = list(base)
        channels[a] += step_a * units[a]
        channels[b] += step_b * units[b]
        if channels[a] >= units[a] and channels[b] >= units[b]:
            yield tuple(channels)


def compute_change(base: Sequence[int], channels: Sequence[int], pixels: Sequence[int]) -> int:
    """Proxy for the change in convolution FLOPs: sum over levels of |c'^2 - c^2| x pixels of the level."""
    return sum(abs(c * c - b * b) * p for b, c, p in zip(base, channels, pixels))


def match_width(base: Sequence[int], units: Sequence[int], pixels: Sequence[int], target_params: int,
                count: Callable[[tuple[int, ...]], int], tolerance: float = PARAM_TOLERANCE) -> Match:
    """The candidate width closest in compute to ``base`` whose parameter count is within ``tolerance``.

    Candidates (:func:`channel_candidates`) are counted in order of :func:`compute_change` (ties:
    fewer changed levels), so the first one within the tolerance is the least change of compute;
    ``count(channels)`` gives a candidate's parameter count (one model built on the meta device; the
    count is not a smooth function of the widths: a skip convolution appears when two neighbouring
    levels differ). If none fits, the returned match holds the closest candidate (check
    ``relative_difference``) and ``closest`` the three nearest.
    """
    def order(channels: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
        return compute_change(base, channels, pixels), sum(x != y for x, y in zip(base, channels)), channels

    seen: list[tuple[tuple[int, ...], int]] = []
    for channels in sorted(set(channel_candidates(base, units)), key=order):
        params = count(channels)
        seen.append((channels, params))
        if abs(params - target_params) <= tolerance * target_params:
            return Match(channels, params, target_params, len(seen))
    seen.sort(key=lambda item: abs(item[1] - target_params))
    return Match(seen[0][0], seen[0][1], target_params, len(seen), closest=seen[:3])


def match_monai(network: Mapping[str, Any], patch_size: Sequence[int], nndiff_params: int,
                fixed_channels: Sequence[int] | None = None) -> Match:
    """MONAI level widths at nnDiff's parameter count (or the given ``fixed_channels``, checked)."""
    def count(channels: tuple[int, ...]) -> int:
        return count_parameters(build_monai(monai_kwargs(network, channels), meta=True))

    if fixed_channels is not None:
        channels = tuple(fixed_channels)
        return Match(channels, count(channels), nndiff_params, 1)
    return match_width(level_channels(network), channel_units(network), level_pixels(patch_size, network),
                       nndiff_params, count)


# ----------------------------------------------------------------------------------------------
# The training step
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batch:
    """One noised training batch: network input, time value, and the noise to predict."""

    x_t: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor


def make_batches(shape: Sequence[int], device: torch.device, count: int = NUM_BATCHES, seed: int = 0) -> list[Batch]:
    """``count`` batches of one shape: x_t = sqrt(a) x0 + sqrt(1 - a) eps with a cosine alpha-bar at random t."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    batches = []
    for _ in range(count):
        x0 = torch.randn(tuple(shape), generator=generator)
        eps = torch.randn(tuple(shape), generator=generator)
        steps = torch.randint(0, 1000, (shape[0],), generator=generator)
        alpha_bar = torch.cos((steps.float() / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
        a = alpha_bar.view(-1, *([1] * (len(shape) - 1)))
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        batches.append(Batch(x_t.to(device), steps.float().to(device), eps.to(device)))
    return batches


class TrainingStep:
    """AdamW + MSE on eps + gradient clipping + EMA, the same for every model.

    ``forward`` is the (possibly compiled) model called as ``forward(x, t)``; ``model`` owns the
    parameters. Nothing here reads a value back to the host, so CUDA steps queue without syncing.
    """

    def __init__(self, model: nn.Module, forward: Callable[..., torch.Tensor], device: torch.device,
                 autocast_dtype: torch.dtype | None) -> None:
        self.forward = forward
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema = [p.detach().clone() for p in self.params]
        self.optimizer = torch.optim.AdamW(self.params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.0, fused=device.type == "cuda")

    def __call__(self, batch: Batch) -> torch.Tensor:
        autocast = (contextlib.nullcontext() if self.autocast_dtype is None
                    else torch.autocast(self.device.type, dtype=self.autocast_dtype))
        with autocast:
            prediction = self.forward(batch.x_t, batch.t)
        loss = F.mse_loss(prediction.float(), batch.eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - EMA_DECAY)
        return loss.detach()


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Free the previous phase's tensors and reset the peak-memory counters."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def autocast_dtype_for(precision: str) -> torch.dtype | None:
    """bf16 -> autocast to bfloat16; fp32 -> no autocast (TF32 matmuls where enabled)."""
    return torch.bfloat16 if precision == "bf16" else None


def attention_ops(model: nn.Module, batch: Batch, autocast_dtype: torch.dtype | None) -> list[str]:
    """The scaled-dot-product-attention ATen ops one eager forward dispatches to (flash, efficient, math...).

    Shows which kernel each model really uses in this precision (flash needs bf16/fp16 on CUDA).
    """
    autocast = (contextlib.nullcontext() if autocast_dtype is None
                else torch.autocast(batch.x_t.device.type, dtype=autocast_dtype))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, \
            torch.no_grad(), autocast:
        model(batch.x_t, batch.t)
    return sorted({event.name for event in profile.events() if event.name.startswith("aten::")
                   and ("scaled_dot_product" in event.name or "attention" in event.name)})


def reset_dynamo() -> None:
    """Forget earlier models' compiled graphs and zero the graph-break counters."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def dynamo_counts() -> dict[str, int]:
    """Graph breaks and compiled graphs since the last ``torch._dynamo`` counter reset."""
    from torch._dynamo.utils import counters

    return {"graph_breaks": int(sum(counters["graph_break"].values())),
            "unique_graphs": int(counters["stats"].get("unique_graphs", 0))}


def measure_training(name: str, build: Callable[[], nn.Module], precision: str, batches: Sequence[Batch],
                     device: torch.device, compile_model: bool, channels_last: bool, warmup: int, steps: int,
                     flops_per_step: int, params: int,
                     timing_turn: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict[str, Any]:
    """Build, (compile,) warm up and time ``steps`` training steps of one model in one precision.

    ``timing_turn`` (parallel processes): a context entered between warm-up and the timed steps.
    """
    release_memory(device)
    start = time.perf_counter()
    model = build().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    sdpa_ops = attention_ops(model, batches[0], autocast_dtype_for(precision))
    if compile_model:
        reset_dynamo()
    forward = torch.compile(model) if compile_model else model
    step = TrainingStep(model, forward, device, autocast_dtype_for(precision))
    synchronize(device)
    build_s = time.perf_counter() - start

    start = time.perf_counter()
    for i in range(warmup):  # the first call compiles forward and backward
        step(batches[i % len(batches)])
    synchronize(device)
    warmup_s = time.perf_counter() - start

    with timing_turn() if timing_turn is not None else contextlib.nullcontext():
        start = time.perf_counter()
        for i in range(steps):
            loss = step(batches[i % len(batches)])
        synchronize(device)
        timed_s = time.perf_counter() - start
    loss_value = float(loss)

    batch_size = batches[0].x_t.shape[0]
    samples_per_s = steps * batch_size / timed_s
    row = {
        "kind": "training", "model": name, "precision": precision, "compile": compile_model,
        "channels_last": channels_last, "device": str(device), "batch_size": batch_size,
        "patch_size": list(batches[0].x_t.shape[2:]), "params": params,
        "gflop_per_step": round(flops_per_step / 1e9, 3), "warmup_steps": warmup, "timed_steps": steps,
        "step_ms": round(1e3 * timed_s / steps, 3), "samples_per_s": round(samples_per_s, 3),
        "tflops": float(f"{flops_per_step * steps / timed_s / 1e12:.4g}"),
        "final_loss": loss_value, "loss_finite": math.isfinite(loss_value),
        "build_s": round(build_s, 2), "compile_and_warmup_s": round(warmup_s, 2), "timed_s": round(timed_s, 2),
        "attention_ops": sdpa_ops,
    }
    if compile_model:
        row.update(dynamo_counts())
    if device.type == "cuda":
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    del step, forward, model
    return row


# ----------------------------------------------------------------------------------------------
# Simplex noise against a training step
# ----------------------------------------------------------------------------------------------

def time_ms(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``call`` in ms over ``repeats`` calls, after one warm-up call."""
    call()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def measure_simplex(shape: Sequence[int], device: torch.device, repeats: int, step_ms: float | None,
                    step_label: str) -> list[dict[str, Any]]:
    """Milliseconds per batch of simplex noise (default and ``planar_2d=False``) and Gaussian noise."""
    from nndiff.diffusion.noise import GaussianNoise, SimplexNoise

    generator = torch.Generator(device=device).manual_seed(0)
    variants = [("gaussian", GaussianNoise()), ("simplex (default)", SimplexNoise())]
    if len(shape) == 4:
        variants.append(("simplex planar_2d=False", SimplexNoise(planar_2d=False)))
    rows = []
    for label, noise in variants:
        ms = time_ms(lambda: noise(tuple(shape), generator=generator, device=device), device, repeats)
        rows.append({"kind": "noise", "noise": label, "shape": list(shape), "device": str(device),
                     "ms_per_batch": round(ms, 3), "reference_step": step_label,
                     "reference_step_ms": None if step_ms is None else round(step_ms, 3),
                     "ratio_noise_over_step": None if not step_ms else round(ms / step_ms, 4)})
    return rows


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def throughput_ratios(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """nnDiff / MONAI samples/s per precision, for precisions where both were measured."""
    speed = {(r["model"], r["precision"]): r["samples_per_s"] for r in rows if r.get("kind") == "training"}
    return {p: speed[(NNDIFF, p)] / speed[(MONAI, p)] for p in PRECISIONS
            if (NNDIFF, p) in speed and (MONAI, p) in speed and speed[(MONAI, p)] > 0}


def attention_kernels(ops: Sequence[str]) -> str:
    """The specific SDPA kernels among profiled op names (the generic dispatcher op left out)."""
    names = [op.removeprefix("aten::") for op in ops if op != "aten::scaled_dot_product_attention"]
    return ", ".join(names) or "–"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Training rows and noise rows as markdown tables."""
    def cell(row: Mapping[str, Any], key: str) -> str:
        value = row.get(key)
        return "–" if value is None else str(value)

    lines = ["| model | precision | compile | params | GFLOP/step | step ms | samples/s | TFLOP/s "
             "| peak allocated GiB | peak reserved GiB | compile+warm-up s | attention kernel |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "training":
            lines.append(f"| {r['model']} | {r['precision']} | {r['compile']} | {r['params'] / 1e6:.2f} M "
                         f"| {r['gflop_per_step']:.1f} | {r['step_ms']:.1f} | {r['samples_per_s']:.1f} "
                         f"| {r['tflops']:.3g} | {cell(r, 'peak_allocated_gib')} | {cell(r, 'peak_reserved_gib')} "
                         f"| {r['compile_and_warmup_s']:.1f} | {attention_kernels(r.get('attention_ops', []))} |")
        elif r.get("kind") in ("error", "skipped"):
            what = f"failed: {r['error'][:80]}" if r["kind"] == "error" else "skipped (time limit)"
            lines.append(f"| {r['model']} | {r['precision']} | {what} |" + " |" * 9)
    noise = [r for r in rows if r.get("kind") == "noise"]
    if noise:
        lines += ["", "| noise | batch shape | ms / batch | reference training step ms | ratio noise / step |",
                  "|---|---|---|---|---|"]
        for r in noise:
            shape = "×".join(str(s) for s in r["shape"])
            lines.append(f"| {r['noise']} | {shape} | {r['ms_per_batch']:.2f} | {cell(r, 'reference_step_ms')} "
                         f"| {cell(r, 'ratio_noise_over_step')} |")
    ratios = throughput_ratios(rows)
    if ratios:
        lines += [""] + [f"nnDiff / MONAI samples/s, {p}: **{v:.3f}**" for p, v in ratios.items()]
    return "\n".join(lines)


class Reporter:
    """Prints JSON lines as they are measured and appends them to ``DIR/train_throughput.jsonl``."""

    def __init__(self, output: Path | None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.output = output
        self.started = time.perf_counter()
        if output is not None:
            output.mkdir(parents=True, exist_ok=True)
            (output / "train_throughput.jsonl").write_text("")

    def add(self, row: dict[str, Any]) -> None:
        """Record one measurement (stdout now, the jsonl file now, the table at the end)."""
        self.rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)
        if self.output is not None:
            with open(self.output / "train_throughput.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")

    def phase(self, name: str, seconds: float) -> None:
        """Elapsed time of one phase and since the start."""
        total = time.perf_counter() - self.started
        print(f"PHASE {name}: {seconds:.1f} s (total {total:.1f} s)", flush=True)

    def finish(self) -> str:
        """The markdown table (also written to ``DIR/train_throughput.md``)."""
        table = markdown_table(self.rows)
        if self.output is not None:
            (self.output / "train_throughput.md").write_text(table + "\n")
        return table


# ----------------------------------------------------------------------------------------------
# Parallel compilation, sequential timing
# ----------------------------------------------------------------------------------------------

class TimingTurns:
    """Processes sharing ``folder`` compile together but time one at a time.

    :meth:`turn` marks this process ready, waits until ``count`` processes are (or ``timeout_s``
    passes: a sibling that crashed before its mark must not hang the rest), then holds an exclusive
    ``flock`` on ``folder/lock`` for the timed steps. :meth:`mark_ready` is idempotent; a process
    that fails calls it too, so its siblings do not wait for it.
    """

    def __init__(self, folder: Path, count: int, tag: str, timeout_s: float = 1800.0, poll_s: float = 0.5):
        self.folder, self.count, self.tag = Path(folder), count, tag
        self.timeout_s, self.poll_s = timeout_s, poll_s

    def mark_ready(self) -> None:
        (self.folder / f"ready_{self.tag}").touch()

    def wait_all(self) -> bool:
        """True when all ``count`` processes are ready, False after the timeout."""
        deadline = time.monotonic() + self.timeout_s
        while len(list(self.folder.glob("ready_*"))) < self.count:
            if time.monotonic() > deadline:
                return False
            time.sleep(self.poll_s)
        return True

    @contextlib.contextmanager
    def turn(self):
        self.mark_ready()
        if not self.wait_all():
            print(f"WARNING: not all {self.count} processes were ready after {self.timeout_s:g} s; timing anyway",
                  file=sys.stderr, flush=True)
        with open(self.folder / "lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def child_argv(argv: Sequence[str], model: str, precision: str, turns_dir: Path, count: int) -> list[str]:
    """The parent's options for one child: without ``--parallel_compile`` and ``--output`` (the
    parent writes the files), with the child's (model, precision) and the shared turns folder."""
    out: list[str] = []
    skip_value = False
    for item in argv:
        if skip_value:
            skip_value = False
            continue
        if item == "--parallel_compile":
            continue
        if item in ("--output", "--precisions"):
            skip_value = True
            continue
        if item.startswith(("--output=", "--precisions=")):
            continue
        out.append(item)
    return out + ["--precisions", precision, "--only", f"{model}:{precision}",
                  "--turns", f"{turns_dir}:{count}"]


def result_rows(stdout: str) -> list[dict[str, Any]]:
    """The ``RESULT`` JSON rows a child printed."""
    return [json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")]


def run_children(args: argparse.Namespace, reporter: "Reporter") -> bool:
    """One child process per (model, precision), compiled in parallel and timed in turn; their rows
    go to ``reporter``. False when a child failed."""
    pairs = [(name, precision) for precision in args.precisions for name in (NNDIFF, MONAI)]
    ok = True
    with tempfile.TemporaryDirectory(prefix="throughput_turns_") as turns_dir:
        children = []
        for name, precision in pairs:
            command = [sys.executable, str(Path(__file__).resolve()),
                       *child_argv(args.argv, name, precision, Path(turns_dir), len(pairs))]
            children.append(((name, precision), subprocess.Popen(command, stdout=subprocess.PIPE, text=True)))
        for (name, precision), child in children:
            stdout, _ = child.communicate()
            rows = [r for r in result_rows(stdout) if r.get("kind") in ("training", "error")]
            if not rows:
                rows = [{"kind": "error", "model": name, "precision": precision,
                         "error": f"child process exited with status {child.returncode} and no result"}]
            for row in rows:
                reporter.add(row)
                ok &= row.get("kind") == "training" and bool(row.get("loss_finite"))
            ok &= child.returncode == 0
    return ok


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def compile_enabled(setting: str, device: torch.device, tiny: bool, environ: Mapping[str, str] = os.environ) -> bool:
    """``on``/``off`` as given; ``auto``: the trainer's ``nnDiff_compile`` switch, else CUDA and not ``--tiny``."""
    if setting != "auto":
        return setting == "on"
    value = environ.get(ENV_COMPILE, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return device.type == "cuda" and not tiny


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fingerprint", choices=("mr", "xray", "ct"), default="mr",
                        help="synthetic fingerprint to plan (tests/planning/planning_fixtures.py)")
    parser.add_argument("--gpu_memory_target", type=float, default=24.0, help="planner GPU-memory target, GiB")
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--precisions", default="bf16,fp32", help="comma-separated subset of bf16,fp32, run in order")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--channels_last", action="store_true", help="channels_last memory format for both models")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; 1 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30; 2 with --tiny)")
    parser.add_argument("--simplex_repeats", type=int, default=None, help="timed noise calls (default 5; 1 with --tiny)")
    parser.add_argument("--monai_channels", default=None,
                        help="comma-separated MONAI level widths (skips the search; still checked against +-1 %%)")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU check: 3 levels, 16 base channels, 32² patch, batch 2, few steps, no compile")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--time_limit_s", type=float, default=None,
                        help="skip a training phase when the time used plus the longest phase so far exceeds this")
    parser.add_argument("--output", type=Path, default=None, help="folder for train_throughput.jsonl / .md")
    parser.add_argument("--parallel_compile", action="store_true",
                        help="one process per model and precision: compile at once, time in turn")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)   # child: MODEL:PRECISION
    parser.add_argument("--turns", default=None, help=argparse.SUPPRESS)  # child: FOLDER:COUNT
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in args.precisions if p not in PRECISIONS]
    if unknown or not args.precisions:
        parser.error(f"--precisions: unknown {unknown}; use a subset of {','.join(PRECISIONS)}")
    for name, full, tiny in (("warmup", 5, 1), ("steps", 30, 2), ("simplex_repeats", 5, 1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.steps < 1 or args.warmup < 0 or args.simplex_repeats < 1:
        parser.error("--steps and --simplex_repeats must be >= 1, --warmup >= 0")
    return args


def print_header(device: torch.device, setup: Setup, compile_model: bool) -> None:
    """Versions, device, precision settings and the planned setup."""
    import monai

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, monai {monai.__version__}, device {device} ({name}), "
          f"threads {torch.get_num_threads()}, compile {compile_model}", flush=True)
    print("precisions: bf16 = bf16 autocast (float32 weights, GroupNorm as autocast decides); "
          "fp32 = float32 with TF32 tensor-core matmuls and convolutions enabled", flush=True)
    print(f"setup: {setup.source}; patch {list(setup.patch_size)}, batch {setup.batch_size}", flush=True)
    print("nnDiff network block: " + json.dumps(setup.network), flush=True)


def check_match(match: Match, nndiff_channels: Sequence[int]) -> bool:
    """Print both parameter counts and the widths; False when outside the tolerance."""
    ok = abs(match.relative_difference) <= PARAM_TOLERANCE
    print(f"parameters: nnDiff {match.target_params:,}  MONAI {match.params:,}  "
          f"relative difference {100 * match.relative_difference:+.3f} % (tolerance +-{100 * PARAM_TOLERANCE:g} %), "
          f"{match.tried} width candidate(s) counted", flush=True)
    print(f"level widths: nnDiff {list(nndiff_channels)}  MONAI {list(match.channels)}", flush=True)
    if not ok:
        print("ERROR: no MONAI width within the parameter tolerance; closest: "
              + ", ".join(f"{list(c)} -> {p:,}" for c, p in match.closest or [(match.channels, match.params)]),
              file=sys.stderr, flush=True)
    return ok


def measure_noise(reporter: Reporter, shape: Sequence[int], device: torch.device, repeats: int) -> None:
    """Simplex and Gaussian noise per batch against the first measured nnDiff training step."""
    start = time.perf_counter()
    reference = next((r for r in reporter.rows if r.get("kind") == "training" and r["model"] == NNDIFF), None)
    label = f"nnDiff {reference['precision']} training step" if reference else "none"
    for row in measure_simplex(shape, device, repeats, reference and reference["step_ms"], label):
        reporter.add(row)
    reporter.phase("simplex noise", time.perf_counter() - start)


def print_ratio(precision: str, ratio: float, compile_model: bool) -> None:
    print(f"RATIO nnDiff / MONAI samples/s, {precision}{' + compile' if compile_model else ''}: {ratio:.3f}",
          flush=True)


def measure_noise_recorded(reporter: Reporter, shape: Sequence[int], device: torch.device, repeats: int) -> bool:
    """:func:`measure_noise`, a failure recorded as an error row (False) instead of raised."""
    try:
        measure_noise(reporter, shape, device, repeats)
        return True
    except Exception as error:  # one failed phase must not lose the others
        traceback.print_exc()
        reporter.add({"kind": "error", "model": "simplex noise", "precision": "fp32",
                      "error": f"{type(error).__name__}: {error}"[:2000]})
        return False


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; returns the exit status (2: parameter mismatch, 1: a phase failed or was skipped)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        # "fp32" means TF32 tensor cores for matmuls and convolutions, as the trainer sets on CUDA.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    compile_model = compile_enabled(args.compile, device, args.tiny)
    reporter = Reporter(args.output)

    start = time.perf_counter()
    setup = planned_setup(args.fingerprint, args.gpu_memory_target, args.configuration)
    if args.tiny:
        setup = tiny_setup(setup)
    print_header(device, setup, compile_model)
    nndiff_params = count_parameters(build_network(setup.network, seed=0))
    fixed = [int(c) for c in args.monai_channels.split(",")] if args.monai_channels else None
    match = match_monai(setup.network, setup.patch_size, nndiff_params, fixed)
    reporter.phase("plan and match parameters", time.perf_counter() - start)
    if not check_match(match, level_channels(setup.network)):
        return 2
    kwargs = monai_kwargs(setup.network, match.channels)
    print("MONAI DiffusionModelUNet arguments: " + json.dumps(kwargs), flush=True)

    start = time.perf_counter()
    shape = (setup.batch_size, setup.network["in_channels"], *setup.patch_size)
    flops = {NNDIFF: estimate_flops(setup.network, shape, backward=True),
             MONAI: estimate_flops(build_monai(kwargs, meta=True), shape, backward=True)}
    print(f"FLOPs per training step (forward + backward, batch {shape[0]}): "
          f"nnDiff {flops[NNDIFF] / 1e9:,.1f} GFLOP  MONAI {flops[MONAI] / 1e9:,.1f} GFLOP  "
          f"(MONAI / nnDiff {flops[MONAI] / flops[NNDIFF]:.3f})", flush=True)
    if args.parallel_compile:
        failed = not run_children(args, reporter)
        reporter.phase("parallel children", time.perf_counter() - start)
        for precision, ratio in throughput_ratios(reporter.rows).items():
            print_ratio(precision, ratio, compile_model)
        failed |= not measure_noise_recorded(reporter, shape, device, args.simplex_repeats)
        return finish_report(reporter, failed)
    batches = make_batches(shape, device)
    reporter.phase("count FLOPs and make batches", time.perf_counter() - start)

    builders: dict[str, Callable[[], nn.Module]] = {
        NNDIFF: lambda: build_network(setup.network, seed=0),
        MONAI: lambda: build_monai(kwargs, seed=0),
    }
    params = {NNDIFF: nndiff_params, MONAI: match.params}
    if args.only:  # a child of --parallel_compile: one measurement, timed in its turn
        return run_child(args, reporter, builders, params, flops, batches, device, compile_model)
    failed = False
    longest_phase = 0.0
    for index, precision in enumerate(args.precisions):
        for name in (NNDIFF, MONAI):
            elapsed = time.perf_counter() - reporter.started
            if args.time_limit_s is not None and elapsed + longest_phase > args.time_limit_s:
                failed = True
                reporter.add({"kind": "skipped", "model": name, "precision": precision,
                              "reason": f"--time_limit_s {args.time_limit_s:g}: {elapsed:.0f} s used, "
                                        f"the longest phase took {longest_phase:.0f} s"})
                continue
            start = time.perf_counter()
            try:
                row = measure_training(name, builders[name], precision, batches, device, compile_model,
                                       args.channels_last, args.warmup, args.steps, flops[name], params[name])
                failed |= not row["loss_finite"]
            except Exception as error:  # record and go on: one failed phase must not lose the others
                traceback.print_exc()
                failed = True
                row = {"kind": "error", "model": name, "precision": precision,
                       "error": f"{type(error).__name__}: {error}"[:2000]}
            reporter.add(row)
            longest_phase = max(longest_phase, time.perf_counter() - start)
            reporter.phase(f"{name} {precision}", time.perf_counter() - start)
        ratio = throughput_ratios(reporter.rows).get(precision)
        if ratio is not None:
            print_ratio(precision, ratio, compile_model)
        if index == 0:  # right after the first precision: cheap, and compared with its nnDiff step
            failed |= not measure_noise_recorded(reporter, shape, device, args.simplex_repeats)

    return finish_report(reporter, failed)


def finish_report(reporter: Reporter, failed: bool) -> int:
    """Print the table and the issue-4 verdict; the exit status."""
    print("\n" + reporter.finish(), flush=True)
    ratio = throughput_ratios(reporter.rows).get("bf16")
    if ratio is not None:
        verdict = "met" if ratio >= 1.0 else "NOT met"
        print(f"\nissue 4 throughput check (nnDiff bf16 >= MONAI bf16 + flash, same run, equal parameters): "
              f"ratio {ratio:.3f}, {verdict}", flush=True)
    return 1 if failed else 0


def run_child(args: argparse.Namespace, reporter: Reporter, builders: Mapping[str, Callable[[], nn.Module]],
              params: Mapping[str, int], flops: Mapping[str, int], batches: Sequence[Batch], device: torch.device,
              compile_model: bool) -> int:
    """``--only MODEL:PRECISION --turns FOLDER:COUNT``: one measurement; marks itself ready even when
    it fails, so that its siblings do not wait for it."""
    name, _, precision = args.only.partition(":")
    if name not in builders or precision not in PRECISIONS:
        raise SystemExit(f"--only {args.only}: expected MODEL:PRECISION with MODEL in {list(builders)}")
    folder, _, count = (args.turns or "").rpartition(":")
    turns = TimingTurns(Path(folder), int(count), f"{name}_{precision}_{os.getpid()}") if folder else None
    try:
        row = measure_training(name, builders[name], precision, batches, device, compile_model, args.channels_last,
                               args.warmup, args.steps, flops[name], params[name],
                               timing_turn=turns.turn if turns else None)
    except Exception as error:
        traceback.print_exc()
        row = {"kind": "error", "model": name, "precision": precision, "error": f"{type(error).__name__}: {error}"[:2000]}
    finally:
        if turns is not None:
            turns.mark_ready()
    reporter.add(row)
    return 0 if row.get("kind") == "training" and row.get("loss_finite") else 1


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse options, run, exit with the benchmark's status."""
    sys.exit(run(parse_args(argv)))


if __name__ == "__main__":
    main()
