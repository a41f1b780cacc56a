"""Parameter and FLOP counts, used by the planner report and the throughput benchmark."""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nndiff.networks.config import parse_network_config
from nndiff.networks.unet import UNet


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable, by default) parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _meta_model(model_or_network: nn.Module | Mapping[str, Any]) -> nn.Module:
    """A copy of the model on the meta device (no memory, no compute)."""
    if isinstance(model_or_network, Mapping):
        with torch.device("meta"):
            return UNet(parse_network_config(model_or_network))
    if isinstance(model_or_network, UNet):
        with torch.device("meta"):
            return UNet(model_or_network.config)
    return copy.deepcopy(model_or_network).to("meta")


def _example_inputs(model: nn.Module, input_shape: Sequence[int]) -> tuple[tuple, dict]:
    """Meta inputs for one forward: x, t, and the conditioning a UNet expects."""
    x = torch.zeros(tuple(input_shape), device="meta")
    t = torch.zeros(x.shape[0], device="meta")
    kwargs: dict[str, torch.Tensor] = {}
    if isinstance(model, UNet):
        c = model.config
        if c.cond_channels:
            kwargs["cond_image"] = torch.zeros(x.shape[0], c.cond_channels, *x.shape[2:], device="meta")
        if c.num_classes:
            kwargs["class_labels"] = torch.zeros(x.shape[0], dtype=torch.long, device="meta")
        if c.num_continuous_conditions:
            kwargs["continuous"] = torch.zeros(x.shape[0], c.num_continuous_conditions, device="meta")
    return (x, t), kwargs


def estimate_flops(model_or_network: nn.Module | Mapping[str, Any], input_shape: Sequence[int],
                   backward: bool = False) -> int:
    """FLOPs of one forward (plus backward when ``backward``) pass, counted on the meta device.

    ``input_shape`` is the full shape of ``x``, ``(B, in_channels, *spatial)``. Accepts a plans
    ``network`` block, a :class:`UNet`, or any module called as ``module(x, t)`` (e.g. a peer's
    UNet in the benchmark); the module is copied to the meta device, so nothing is computed.
    Counts matmuls/convolutions (2 FLOPs per multiply-add) as ``torch.utils.flop_counter``
    does; attention is forced onto the math SDPA path while counting so its two matmuls are
    counted on every device. Normalisations and activations are not counted.
    """
    model = _meta_model(model_or_network)
    args, kwargs = _example_inputs(model, input_shape)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        out = model(*args, **kwargs)
        if backward:
            out.sum().backward()
    return int(counter.get_total_flops())
