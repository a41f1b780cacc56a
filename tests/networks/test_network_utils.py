"""Parameter and FLOP counts against independent counts."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nndiff.networks import build_network, count_parameters, estimate_flops
from nndiff.networks.layers import AttentionBlock


def _reference_flops(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    """2 x multiply-adds of every conv, linear and attention matmul, from output shapes."""
    macs = 0

    def conv_or_linear(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Linear):
            macs += module.weight.numel() * math.prod(output.shape[:-1])
        else:  # weight (C_out, C_in, k...) applied at every output voxel of every sample
            macs += module.weight.numel() * output.shape[0] * math.prod(output.shape[2:])

    def attention(module: AttentionBlock, inputs, _output) -> None:
        nonlocal macs
        b, c = inputs[0].shape[:2]
        n = math.prod(inputs[0].shape[2:])
        macs += 2 * b * c * n * n  # QK^T and (softmax)V, summed over heads

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.Linear)):
            module.register_forward_hook(conv_or_linear)
        elif isinstance(module, AttentionBlock):
            module.register_forward_hook(attention)
    model(x, t)
    return 2 * macs


@pytest.mark.parametrize("override,shape", [
    ({}, (2, 1, 16, 12)),
    ({"spatial_dims": 3, "strides": [[1, 2, 2], [2, 2, 2]], "num_continuous_conditions": 1}, (1, 1, 4, 8, 8)),
])
def test_estimate_flops_matches_independent_count(make_block, override, shape):
    block = make_block(**override)
    model = build_network(block)
    expected = _reference_flops(model, torch.zeros(shape), torch.zeros(shape[0]))
    assert estimate_flops(block, shape) == expected
    assert estimate_flops(model, shape) == expected
    doubled = (2 * shape[0], *shape[1:])
    assert estimate_flops(block, doubled) == 2 * expected


def test_estimate_flops_with_backward_counts_about_three_forwards(make_block):
    block = make_block()
    forward = estimate_flops(block, (2, 1, 16, 12))
    total = estimate_flops(block, (2, 1, 16, 12), backward=True)
    # Backward costs ~2 forwards (input and weight gradients); the first conv needs no input gradient.
    assert 2.8 * forward < total <= 3 * forward


def test_estimate_flops_of_a_generic_module_leaves_it_untouched():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * t[:, None, None, None]

    tiny = Tiny()
    assert estimate_flops(tiny, (3, 2, 5, 6)) == 2 * (4 * 2 * 9) * 3 * 5 * 6
    assert tiny.conv.weight.device.type == "cpu"


def test_count_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert count_parameters(model) == 3 * 4 + 4 + 4 * 2 + 2
    model[0].weight.requires_grad_(False)
    assert count_parameters(model) == 4 + 4 * 2 + 2
    assert count_parameters(model, trainable_only=False) == 3 * 4 + 4 + 4 * 2 + 2
