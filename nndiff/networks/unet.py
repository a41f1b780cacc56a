"""The diffusion UNet (ADM-style), 2D or 3D, built from a validated :class:`UNetConfig`.

Layout for ``L = len(channel_mult)`` levels:

- input conv on ``concat(x, cond_image)``;
- encoder: per level ``num_res_blocks`` residual blocks (+ attention at planned levels), then a
  strided-conv downsampling with that level's per-axis stride (not after the last level);
- middle: res block, attention (when the deepest level is an attention level), res block;
- decoder: per level ``num_res_blocks + 1`` residual blocks, each fed the matching encoder
  skip, then nearest upsampling + conv back to the previous level's size;
- output: GroupNorm, SiLU, zero-initialised conv to ``out_channels``.

``forward`` has no data-dependent Python control flow, so ``torch.compile`` sees one graph
for a fixed input shape.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nndiff.networks.conditioning import ConditionEmbedding
from nndiff.networks.config import UNetConfig
from nndiff.networks.layers import (
    AttentionBlock,
    Downsample,
    ResAttnBlock,
    ResBlock,
    Upsample,
    conv_nd,
    timestep_embedding,
    zero_init,
)


class EncoderLevel(nn.Module):
    """Residual(+attention) blocks of one resolution level and the downsampling after it."""

    def __init__(self, blocks: list[ResAttnBlock], downsample: Downsample | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class DecoderLevel(nn.Module):
    """Residual(+attention) blocks of one resolution level and the upsampling after it."""

    def __init__(self, blocks: list[ResAttnBlock], upsample: Upsample | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.upsample = upsample


class UNet(nn.Module):
    """Time- and condition-embedded UNet for diffusion models (see module docstring).

    Call as ``model(x, t, cond_image=None, class_labels=None, continuous=None)``:

    - ``x``: ``(B, in_channels, *spatial)``; every spatial size divisible by
      :attr:`shape_divisor` (the product of that axis' strides).
    - ``t``: ``(B,)`` (or scalar) float time value per sample: the diffusion process's
      ``model_time(t)`` (step index for DDPM, (T-1)·t for VP SDEs, log sigma for VE).
    - ``cond_image``: ``(B, cond_channels, *spatial)``, concatenated to ``x``; required exactly
      when ``cond_channels > 0``.
    - ``class_labels`` / ``continuous``: see :mod:`nndiff.networks.conditioning`; ``None``
      selects the learned null embedding for every sample.

    Returns ``(B, out_channels, *spatial)``.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        # Plain tuple computed once: forward must not run generator expressions (graph breaks).
        self._shape_divisor: tuple[int, ...] = config.shape_divisor
        emb_dim = config.time_embed_dim
        self.time_embed = nn.Sequential(
            nn.Linear(config.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        has_conditions = config.num_classes is not None or config.num_continuous_conditions > 0
        self.condition_embed = (
            ConditionEmbedding(emb_dim, config.num_classes, config.num_continuous_conditions)
            if has_conditions else None
        )
        conv = conv_nd(config.spatial_dims)
        channels = config.level_channels
        self.input_conv = conv(config.in_channels + config.cond_channels, channels[0], 3, padding=1)

        skip_channels = [channels[0]]
        self.encoder = nn.ModuleList()
        ch = channels[0]
        for level in range(config.num_levels):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(self._block(level, ch, channels[level]))
                ch = channels[level]
                skip_channels.append(ch)
            downsample = None
            if level < config.num_levels - 1:
                downsample = Downsample(config.spatial_dims, ch, config.strides[level])
                skip_channels.append(ch)
            self.encoder.append(EncoderLevel(blocks, downsample))

        deepest = config.num_levels - 1
        self.middle = nn.ModuleList([
            self._block(deepest, ch, ch),
            ResAttnBlock(self._res(ch, ch), None),
        ])

        self.decoder = nn.ModuleList()
        for level in reversed(range(config.num_levels)):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(self._block(level, ch + skip_channels.pop(), channels[level]))
                ch = channels[level]
            upsample = Upsample(config.spatial_dims, ch, config.strides[level - 1]) if level > 0 else None
            self.decoder.append(DecoderLevel(blocks, upsample))

        self.out_norm = nn.GroupNorm(config.norm_groups, ch)
        self.out_conv = zero_init(conv(ch, config.out_channels, 3, padding=1))

    def _res(self, in_channels: int, out_channels: int) -> ResBlock:
        c = self.config
        return ResBlock(c.spatial_dims, in_channels, out_channels, c.time_embed_dim, c.norm_groups, c.dropout)

    def _block(self, level: int, in_channels: int, out_channels: int) -> ResAttnBlock:
        """Residual block of ``level``, with attention when the plan lists the level."""
        c = self.config
        attention = None
        if level in c.attention_levels:
            attention = AttentionBlock(out_channels, c.num_head_channels, c.norm_groups)
        return ResAttnBlock(self._res(in_channels, out_channels), attention)

    @property
    def shape_divisor(self) -> tuple[int, ...]:
        """Per spatial axis, the number every input size must be divisible by."""
        return self._shape_divisor

    @property
    def network_config(self) -> dict[str, Any]:
        """The plans ``network`` block this model was built from (JSON types)."""
        return self.config.to_dict()

    def _check_inputs(self, x: torch.Tensor, cond_image: torch.Tensor | None) -> None:
        """Shape checks on static shapes only (no graph break under torch.compile)."""
        c = self.config
        if x.ndim != 2 + c.spatial_dims or x.shape[1] != c.in_channels:
            raise ValueError(f"x must have shape (B, {c.in_channels}, {c.spatial_dims} spatial sizes), "
                             f"got {tuple(x.shape)}")
        spatial = tuple(x.shape[2:])
        for size, divisor in zip(spatial, self._shape_divisor):
            if size % divisor:
                raise ValueError(f"spatial size {spatial} is not divisible by {self._shape_divisor} "
                                 "(product of the planned strides per axis); pad or crop the input")
        if c.cond_channels and cond_image is None:
            raise ValueError(f"the network expects a conditioning image with {c.cond_channels} channel(s) "
                             "(cond_channels in the plan); pass cond_image (zeros if it is dropped on purpose)")
        if not c.cond_channels and cond_image is not None:
            raise ValueError("cond_image given but the network has cond_channels = 0")
        if cond_image is not None and (cond_image.shape[0] != x.shape[0] or cond_image.shape[1] != c.cond_channels
                                       or tuple(cond_image.shape[2:]) != spatial):
            raise ValueError(f"cond_image must have shape ({x.shape[0]}, {c.cond_channels}, *{spatial}), "
                             f"got {tuple(cond_image.shape)}")

    def embed(self, t: torch.Tensor, batch_size: int, device: torch.device,
              class_labels: torch.Tensor | None, continuous: torch.Tensor | None) -> torch.Tensor:
        """SiLU-activated time (+ condition) embedding ``(B, 4 * model_channels)``."""
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(f"t must have shape ({batch_size},) or be a scalar, got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))
        if self.condition_embed is not None:
            cond = self.condition_embed(class_labels, continuous, batch_size, device)
            emb = emb + cond.to(emb.dtype)
        elif class_labels is not None or continuous is not None:
            raise ValueError("conditions given but the network is unconditional "
                             "(num_classes null and num_continuous_conditions 0 in the plan)")
        return F.silu(emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond_image: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None,
                continuous: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, cond_image)
        emb = self.embed(t, x.shape[0], x.device, class_labels, continuous)
        h = x if cond_image is None else torch.cat([x, cond_image.to(x.dtype)], dim=1)
        h = self.input_conv(h)
        skips = [h]
        for level in self.encoder:
            for block in level.blocks:
                h = block(h, emb)
                skips.append(h)
            if level.downsample is not None:
                h = level.downsample(h)
                skips.append(h)
        for block in self.middle:
            h = block(h, emb)
        for level in self.decoder:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.out_conv(F.silu(self.out_norm(h)))
