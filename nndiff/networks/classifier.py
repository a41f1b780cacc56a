"""Noisy-image classifier for classifier-guided anomaly detection (Wolleb et al. 2022), 2D and 3D.

The network is the *encoder half* of the diffusion UNet (``nndiff.networks.unet``) built from the
same plans ``network`` block: input conv, the encoder levels (residual blocks with the planned
attention, strided downsampling), the middle block, then GroupNorm + SiLU, a pooling over all
voxels and one linear layer to ``num_classes`` logits. It sees a noisy image ``x_t`` and the
process' ``model_time(t)`` (the same sinusoidal time embedding as the UNet), so its gradient
``d log p(class | x_t) / d x_t`` can guide sampling at every noise level.

Pooling (``pooling``):

- ``"attention"`` (default, as guided-diffusion's encoder classifier used by Wolleb et al.): the
  mean token of the feature map attends to all voxel tokens (multi-head, ``num_head_channels``
  per head). Unlike guided-diffusion's pool it has no positional embedding, so one network works
  for any input size divisible by the strides (sliding windows, other patch sizes).
- ``"mean"``: global average pooling.

:func:`build_classifier` is the static builder (plan block in, module out), like
``nndiff.networks.build_network``; :attr:`NoisyClassifier.classifier_config` is what a checkpoint
stores so that a predictor rebuilds exactly this network.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from nndiff.errors import PlansError
from nndiff.networks.config import UNetConfig, parse_network_config
from nndiff.networks.layers import AttentionBlock, Downsample, ResAttnBlock, ResBlock, conv_nd, timestep_embedding

#: Pooling heads :class:`NoisyClassifier` knows.
POOLINGS: tuple[str, ...] = ("attention", "mean")
#: Healthy vs diseased.
DEFAULT_NUM_CLASSES = 2


class AttentionPool(nn.Module):
    """The mean token attends to all tokens (itself included); returns ``(B, C)``.

    No positional embedding (see the module docstring), so the pool is size-agnostic.
    """

    def __init__(self, channels: int, num_head_channels: int) -> None:
        super().__init__()
        if channels % num_head_channels:
            raise PlansError(f"attention pooling: num_head_channels {num_head_channels} does not divide the "
                             f"{channels} channels of the deepest level. Fix: choose num_head_channels dividing "
                             "them, or use pooling 'mean'")
        self.num_heads = channels // num_head_channels
        self.head_dim = num_head_channels
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c = h.shape[:2]
        tokens = h.reshape(b, c, -1).transpose(1, 2)                       # (B, N, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], 1)   # mean token first
        qkv = self.qkv(tokens).reshape(b, tokens.shape[1], 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # (B, heads, N+1, d)
        out = F.scaled_dot_product_attention(q[:, :, :1], k, v)            # only the mean token asks
        return self.proj(out.reshape(b, c))


class NoisyClassifier(nn.Module):
    """Encoder-half UNet classifier of noisy images: ``model(x_t, t) -> (B, num_classes)`` logits.

    ``x_t``: ``(B, in_channels, *spatial)`` with every spatial size divisible by
    :attr:`shape_divisor`; ``t``: ``(B,)`` or scalar model time (``process.model_time(t)``).
    """

    def __init__(self, config: UNetConfig, num_classes: int = DEFAULT_NUM_CLASSES,
                 pooling: str = "attention") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise PlansError(f"unknown classifier pooling {pooling!r}. Fix: use one of {', '.join(POOLINGS)}")
        if num_classes < 2:
            raise PlansError(f"a classifier needs num_classes >= 2, got {num_classes}")
        self.config = config
        self.num_classes = int(num_classes)
        self.pooling = pooling
        self._shape_divisor: tuple[int, ...] = config.shape_divisor
        emb_dim = config.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(config.model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        channels = config.level_channels
        self.input_conv = conv_nd(config.spatial_dims)(config.in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch = channels[0]
        for level in range(config.num_levels):
            level_blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                level_blocks.append(self._block(level, ch, channels[level]))
                ch = channels[level]
            self.blocks.append(level_blocks)
            last = level == config.num_levels - 1
            self.downsamples.append(nn.Identity() if last else Downsample(config.spatial_dims, ch,
                                                                          config.strides[level]))
        deepest = config.num_levels - 1
        self.middle = nn.ModuleList([self._block(deepest, ch, ch), ResAttnBlock(self._res(ch, ch), None)])
        self.out_norm = nn.GroupNorm(config.norm_groups, ch)
        self.pool = AttentionPool(ch, config.num_head_channels) if pooling == "attention" else None
        self.head = nn.Linear(ch, self.num_classes)

    def _res(self, in_channels: int, out_channels: int) -> ResBlock:
        c = self.config
        return ResBlock(c.spatial_dims, in_channels, out_channels, c.time_embed_dim, c.norm_groups, c.dropout)

    def _block(self, level: int, in_channels: int, out_channels: int) -> ResAttnBlock:
        c = self.config
        attention = (AttentionBlock(out_channels, c.num_head_channels, c.norm_groups)
                     if level in c.attention_levels else None)
        return ResAttnBlock(self._res(in_channels, out_channels), attention)

    @property
    def shape_divisor(self) -> tuple[int, ...]:
        """Per spatial axis, the number every input size must be divisible by."""
        return self._shape_divisor

    @property
    def classifier_config(self) -> dict[str, Any]:
        """JSON block that :func:`build_classifier` turns back into this architecture."""
        return {"network": self.config.to_dict(), "num_classes": self.num_classes, "pooling": self.pooling}

    def _check_input(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 2 + c.spatial_dims or x.shape[1] != c.in_channels:
            raise ValueError(f"x must have shape (B, {c.in_channels}, {c.spatial_dims} spatial sizes), "
                             f"got {tuple(x.shape)}")
        for size, divisor in zip(x.shape[2:], self._shape_divisor):
            if size % divisor:
                raise ValueError(f"spatial size {tuple(x.shape[2:])} is not divisible by {self._shape_divisor} "
                                 "(product of the planned strides per axis); pad or crop the input")

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = F.silu(self.time_embed(timestep_embedding(t, self.config.model_channels)))
        h = self.input_conv(x)
        for level_blocks, downsample in zip(self.blocks, self.downsamples):
            for block in level_blocks:
                h = block(h, emb)
            h = downsample(h)
        for block in self.middle:
            h = block(h, emb)
        h = F.silu(self.out_norm(h))
        pooled = self.pool(h) if self.pool is not None else h.flatten(2).mean(dim=2)
        return self.head(pooled)


def classifier_network_config(network: Mapping[str, Any]) -> UNetConfig:
    """The plan's UNet block validated, without what a classifier does not use (conditioning,
    ``out_channels``): the classifier sees only the noisy image and the time."""
    block = {**network, "cond_channels": 0, "num_classes": None, "num_continuous_conditions": 0}
    return parse_network_config(block)


def build_classifier(block: Mapping[str, Any], seed: int | None = None) -> NoisyClassifier:
    """Build a :class:`NoisyClassifier` from ``{"network": <plans network block>, "num_classes": 2,
    "pooling": "attention"}`` (the last two optional) — or from a bare plans ``network`` block.

    ``seed``: initial weights from that seed without touching the global RNG.
    """
    if not isinstance(block, Mapping):
        raise PlansError(f"classifier block must be a JSON object, got {type(block).__name__}")
    network = block["network"] if "network" in block else block
    config = classifier_network_config(network)
    num_classes = int(block.get("num_classes", DEFAULT_NUM_CLASSES)) if "network" in block else DEFAULT_NUM_CLASSES
    pooling = str(block.get("pooling", "attention")) if "network" in block else "attention"
    if seed is None:
        return NoisyClassifier(config, num_classes, pooling)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NoisyClassifier(config, num_classes, pooling)
