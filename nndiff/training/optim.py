"""Optimiser, learning-rate schedule and EMA weights.

The learning rate is a pure function of the iteration (no scheduler object to checkpoint), so
a resumed run uses exactly the rates of an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from nndiff.training.config import TrainingSettings

#: Exponent of the poly decay (nnU-Net's value).
POLY_EXPONENT = 0.9
#: Warmup never takes more than this fraction of the run (short runs would otherwise never
#: leave warmup).
MAX_WARMUP_FRACTION = 0.1


def effective_warmup(settings: TrainingSettings, total: int) -> int:
    """Warmup iterations: the planned number, at most 10 % of the run."""
    return min(settings.warmup_iterations, int(total * MAX_WARMUP_FRACTION))


def learning_rate(iteration: int, total: int, settings: TrainingSettings) -> float:
    """Learning rate for the update of (0-based) ``iteration`` of a run of ``total`` iterations.

    Linear warmup from ``initial_lr / warmup`` to ``initial_lr``, then ``cosine`` (half cosine to
    0 at the end), ``poly`` ((1 - p)^0.9 as nnU-Net) or ``constant``.
    """
    base = settings.initial_lr
    warmup = effective_warmup(settings, total)
    if iteration < warmup:
        return base * (iteration + 1) / warmup
    if settings.lr_decay == "constant":
        return base
    progress = min(1.0, (iteration - warmup) / max(1, total - warmup))
    if settings.lr_decay == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base * (1.0 - progress) ** POLY_EXPONENT


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_adamw(parameters: Iterable[nn.Parameter], settings: TrainingSettings,
                device: torch.device) -> torch.optim.AdamW:
    """AdamW with the plan's lr and weight decay; fused kernels on CUDA (one launch per step)."""
    return torch.optim.AdamW(list(parameters), lr=settings.initial_lr, weight_decay=settings.weight_decay,
                             betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")


def ema_decay_at(update: int, decay: float, warmup: bool) -> float:
    """EMA decay for the ``update``-th update (0-based).

    With warmup the decay is ``min(decay, (1 + n) / (10 + n))``: early averages forget the random
    initialisation quickly, so short runs get a useful EMA too.
    """
    if not warmup:
        return decay
    return min(decay, (1.0 + update) / (10.0 + update))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers are copied."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    if ema_params:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def make_ema_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` that holds the EMA weights."""
    import copy

    ema = copy.deepcopy(model)
    ema.eval()
    ema.requires_grad_(False)
    return ema
