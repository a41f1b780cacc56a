"""Noise sources for training and sampling (pluggable: Gaussian or simplex).

Every noise source follows :class:`NoiseFn`: called with a shape ``(B, C, *spatial)`` it returns
a tensor of that shape, zero mean and unit variance per sample, on ``device`` in ``dtype``,
drawn from ``generator`` when given (reproducible).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch


class NoiseFn(Protocol):
    def __call__(
        self,
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor: ...


class GaussianNoise:
    """Standard normal noise (the default everywhere)."""

    def __call__(self, shape, *, generator=None, device=None, dtype=torch.float32):
        if generator is not None and device is None:
            device = generator.device
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
