"""Building blocks of the diffusion UNet, dimension-agnostic (2D and 3D share one code path).

Every block takes its convolution class from :func:`conv_nd`, so a 3D network is the 2D
network with ``spatial_dims=3``. Tensors are ``(B, C, *spatial)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Attribute set on modules whose weights start at zero (see :func:`zero_init`).
ZERO_INIT_ATTR = "nndiff_zero_initialised"


def conv_nd(spatial_dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    """The convolution class for 2 or 3 spatial dimensions."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def zero_init(module: nn.Module) -> nn.Module:
    """Zero the module's parameters and mark it (``ZERO_INIT_ATTR``).

    Used on the UNet output conv and on the last layer of every residual / attention branch
    (common practice since DDPM/ADM): each block starts as the identity, so a deep network
    trains stably from step one. The mark lets tests find these layers.
    """
    for p in module.parameters():
        nn.init.zeros_(p)
    setattr(module, ZERO_INIT_ATTR, True)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f_k), sin(t f_k)]`` of one float time value per sample.

    ``f_k = max_period^(-k / (dim/2))``: the frequencies resolve time values from ~1 to
    ``max_period``, i.e. they suit discrete step indices in [0, 1000]; callers pass the
    process's ``model_time(t)``. Computed in float32 even under autocast (bf16 would round large t).
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # odd widths get one zero column so the MLP input size is exactly dim
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Residual block with time/condition embedding by scale-shift norm (ADM).

    ``GN -> SiLU -> conv -> GN * (1 + scale) + shift -> SiLU -> dropout -> conv(zero-init)``
    plus a skip (1x1 conv when the channel count changes). ``emb`` is the already
    SiLU-activated embedding, shared by all blocks.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, emb_dim: int,
                 norm_groups: int, dropout: float) -> None:
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.spatial_dims = spatial_dims
        self.in_norm = nn.GroupNorm(norm_groups, in_channels)
        self.in_conv = conv(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)
        self.out_norm = nn.GroupNorm(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_init(conv(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(F.silu(self.in_norm(x)))
        scale_shift = self.emb_proj(emb).reshape(emb.shape[0], -1, *([1] * self.spatial_dims))
        scale, shift = scale_shift.chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all voxels of a feature map, residual.

    Runs through :func:`torch.nn.functional.scaled_dot_product_attention`, so CUDA picks
    flash / memory-efficient kernels. q, k, v come from one linear layer on the GroupNorm-ed
    tokens; heads have ``num_head_channels`` channels; the output projection is zero-initialised.
    """

    def __init__(self, channels: int, num_head_channels: int, norm_groups: int) -> None:
        super().__init__()
        self.num_heads = channels // num_head_channels
        self.head_dim = num_head_channels
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, *spatial) -> q, k, v each (B, heads, N, head_dim), N = number of voxels."""
        b, c = x.shape[:2]
        tokens = self.norm(x).reshape(b, c, -1).transpose(1, 2)
        qkv = self.qkv(tokens).reshape(b, tokens.shape[1], 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        q, k, v = self.split_heads(x)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, c)
        return x + self.proj(out).transpose(1, 2).reshape(x.shape)


class ResAttnBlock(nn.Module):
    """A :class:`ResBlock` optionally followed by an :class:`AttentionBlock`."""

    def __init__(self, res: ResBlock, attention: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attention = attention

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.res(x, emb)
        if self.attention is not None:  # fixed at construction: no graph break
            h = self.attention(h)
        return h


class Downsample(nn.Module):
    """Strided 3x3(x3) convolution; ``stride`` is per axis (1 keeps an axis, 2 halves it)."""

    def __init__(self, spatial_dims: int, channels: int, stride: Sequence[int]) -> None:
        super().__init__()
        self.conv = conv_nd(spatial_dims)(channels, channels, 3, stride=tuple(stride), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by a per-axis factor, then a 3x3(x3) convolution."""

    def __init__(self, spatial_dims: int, channels: int, stride: Sequence[int]) -> None:
        super().__init__()
        self.stride = tuple(stride)
        self.conv = conv_nd(spatial_dims)(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # An explicit size (not a float scale factor) keeps the shape exact and static.
        size = [n * s for n, s in zip(x.shape[2:], self.stride)]
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
