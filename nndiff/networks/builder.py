"""Static network builder: plans ``network`` block -> ``nn.Module``.

The predictor rebuilds the trained network from the plan alone, so the builder depends on
nothing but the block (and an optional seed for the initial weights).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
from torch import nn

from nndiff.networks.config import UNET, UNetConfig, parse_network_config
from nndiff.networks.unet import UNet

logger = logging.getLogger(__name__)

#: architecture name -> constructor taking the validated config. Explicit, no import search.
ARCHITECTURES: dict[str, Callable[[UNetConfig], nn.Module]] = {UNET: UNet}


def build_network(network: Mapping[str, Any], seed: int | None = None) -> nn.Module:
    """Build the network a plans ``network`` block describes (on CPU, float32).

    Raises :class:`~nndiff.errors.PlansError` naming the key and the fix when the block is
    invalid. The structure depends only on the block; the initial weights come from torch's
    global RNG, or, when ``seed`` is given, from that seed without touching the global RNG.
    """
    config = parse_network_config(network)
    constructor = ARCHITECTURES[config.architecture]
    if seed is None:
        model = constructor(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = constructor(config)
    logger.debug("built %s (%dD, %d levels) with %d parameters", config.architecture,
                 config.spatial_dims, config.num_levels, sum(p.numel() for p in model.parameters()))
    return model
