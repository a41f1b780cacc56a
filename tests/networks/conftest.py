"""Shared tiny network blocks and helpers for the network tests."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

from nndiff.networks.layers import ZERO_INIT_ATTR


def network_block(**overrides: Any) -> dict[str, Any]:
    """A tiny valid 2D plans network block (3 levels, attention on the two coarse ones)."""
    block: dict[str, Any] = {
        "architecture": "unet",
        "spatial_dims": 2,
        "in_channels": 1,
        "cond_channels": 0,
        "out_channels": 1,
        "model_channels": 8,
        "channel_mult": [1, 2, 2],
        "strides": [[2, 2], [2, 2]],
        "num_res_blocks": 1,
        "attention_levels": [1, 2],
        "num_head_channels": 8,
        "norm_groups": 4,
        "dropout": 0.0,
        "num_classes": None,
        "num_continuous_conditions": 0,
    }
    block.update(overrides)
    return block


def perturb_zero_init(model: nn.Module) -> int:
    """Give every zero-initialised layer PyTorch's default random init; returns how many.

    With the zero-init layers in place the output is identically zero and no conditioning
    can show, so tests that must be able to fail perturb them first.
    """
    layers = [m for m in model.modules() if getattr(m, ZERO_INIT_ATTR, False)]
    for layer in layers:
        layer.reset_parameters()
    return len(layers)


@pytest.fixture
def make_block() -> Callable[..., dict[str, Any]]:
    return network_block


@pytest.fixture
def perturb() -> Callable[[nn.Module], int]:
    return perturb_zero_init


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
