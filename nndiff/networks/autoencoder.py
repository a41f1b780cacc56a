"""Autoencoder stage of latent diffusion: KL-regularised and vector-quantised convolutional
autoencoders for 2D and 3D, sliding-window encode/decode, and the latent scale factor.

The autoencoder is built from the plan's configuration ``autoencoder`` block alone
(:func:`build_autoencoder`), so a predictor can rebuild it without the training code. Downsampling
is per axis: ``downsampling_factors`` ``[1, 4, 4]`` halves axes 1 and 2 twice and never touches
axis 0. Blocks are GroupNorm + SiLU residual blocks without attention (attention over a full-size
3D feature map is what makes pixel-space 3D diffusion run out of memory in the first place).

The scale factor that makes latents unit-variance (Rombach et al. 2022) is measured on training
data by :func:`measure_scale_factor` and kept in the module's ``latent_scale_factor`` buffer, so
it travels with the weights; it starts as NaN ("not measured") and :meth:`AutoencoderKL.scale_factor`
refuses to return an unmeasured value. See ``documentation/latent.md``.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nndiff.errors import NnDiffError, PlansError
from nndiff.networks.layers import Downsample, Upsample, conv_nd, zero_init

#: Defaults of the optional ``autoencoder`` block keys (the planner may write any of them).
AUTOENCODER_DEFAULTS: dict[str, Any] = {
    "base_channels": 32,
    "channel_multipliers": None,  # None: min(2**level, 4) per level
    "num_res_blocks": 1,
    "norm_groups": 8,
    "kl_weight": 1e-6,
    "ssim_weight": 0.2,
    "adversarial": False,
    "adversarial_weight": 0.01,
    "adversarial_start_fraction": 0.5,
    "vq": False,
    "codebook_size": 256,
    "commitment_weight": 0.25,
}
#: Keys the planner must write.
AUTOENCODER_REQUIRED = ("downsampling_factors", "latent_channels")
#: Keys that only the trainer or planner reads (patch, batch, spacing bookkeeping).
AUTOENCODER_PASSTHROUGH = ("latent_spacing", "latent_median_shape", "patch_size", "batch_size",
                           "in_channels", "source_configuration", "training")
#: logvar is clamped so exp() cannot overflow in fp16/bf16 (as in LDM's DiagonalGaussian).
LOGVAR_RANGE = (-30.0, 20.0)
SCALE_FACTOR_BUFFER = "latent_scale_factor"


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AutoencoderConfig:
    """A validated ``autoencoder`` block (plus the image channels and dimensionality)."""

    spatial_dims: int
    in_channels: int
    downsampling_factors: tuple[int, ...]
    latent_channels: int
    base_channels: int
    channel_multipliers: tuple[int, ...]
    num_res_blocks: int
    norm_groups: int
    kl_weight: float
    ssim_weight: float
    adversarial: bool
    adversarial_weight: float
    adversarial_start_fraction: float
    vq: bool
    codebook_size: int
    commitment_weight: float

    @property
    def num_downsamplings(self) -> int:
        return len(self.channel_multipliers) - 1

    def strides(self) -> list[tuple[int, ...]]:
        """Per-level strides: an axis with factor 2**k is halved at levels 0..k-1, so the axes
        with the largest factors are reduced first, where the feature maps are largest."""
        return [tuple(2 if f > 2 ** level else 1 for f in self.downsampling_factors)
                for level in range(self.num_downsamplings)]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _is_power_of_two(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and value & (value - 1) == 0


def parse_autoencoder_config(ae_block: Mapping[str, Any], in_channels: int, spatial_dims: int) -> AutoencoderConfig:
    """Validate the plan's ``autoencoder`` block; one :class:`PlansError` lists every problem."""
    if not isinstance(ae_block, Mapping):
        raise PlansError(f"the configuration's 'autoencoder' block must be a mapping, got {type(ae_block).__name__}. "
                         "Fix: re-run planning")
    problems: list[str] = []
    if spatial_dims not in (2, 3):
        problems.append(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        problems.append(f"in_channels must be a positive integer, got {in_channels!r}")
    for key in AUTOENCODER_REQUIRED:
        if key not in ae_block:
            problems.append(f"autoencoder.{key} is missing")
    unknown = set(ae_block) - set(AUTOENCODER_REQUIRED) - set(AUTOENCODER_DEFAULTS) - set(AUTOENCODER_PASSTHROUGH)
    if unknown:
        problems.append(f"unknown key(s) {sorted(unknown)}; known: "
                        f"{sorted([*AUTOENCODER_REQUIRED, *AUTOENCODER_DEFAULTS, *AUTOENCODER_PASSTHROUGH])}")
    values = {**AUTOENCODER_DEFAULTS, **{k: v for k, v in ae_block.items() if k in AUTOENCODER_DEFAULTS}}
    factors = ae_block.get("downsampling_factors", [])
    if not (isinstance(factors, (list, tuple)) and len(factors) == spatial_dims
            and all(_is_power_of_two(f) for f in factors)):
        problems.append(f"autoencoder.downsampling_factors must list {spatial_dims} powers of two (one per axis), "
                        f"got {factors!r}")
        factors = [1] * max(spatial_dims, 0)
    levels = int(math.log2(max(factors))) if factors else 0
    multipliers = values["channel_multipliers"]
    if multipliers is None:
        multipliers = [min(2 ** level, 4) for level in range(levels + 1)]
    elif not (isinstance(multipliers, (list, tuple)) and len(multipliers) == levels + 1
              and all(isinstance(m, int) and m >= 1 for m in multipliers)):
        problems.append(f"autoencoder.channel_multipliers must list {levels + 1} positive integers (one per "
                        f"resolution: log2(max factor) + 1), got {multipliers!r}")
        multipliers = [1] * (levels + 1)
    for key in ("latent_channels", "base_channels", "num_res_blocks", "norm_groups", "codebook_size"):
        value = ae_block.get(key, values.get(key))
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"autoencoder.{key} must be a positive integer, got {value!r}")
    for key in ("kl_weight", "ssim_weight", "adversarial_weight", "commitment_weight", "adversarial_start_fraction"):
        if not isinstance(values[key], (int, float)) or isinstance(values[key], bool) or values[key] < 0:
            problems.append(f"autoencoder.{key} must be a number >= 0, got {values[key]!r}")
    for key in ("adversarial", "vq"):
        if not isinstance(values[key], bool):
            problems.append(f"autoencoder.{key} must be true or false, got {values[key]!r}")
    if not problems:
        widths = [values["base_channels"] * m for m in multipliers]
        if any(w % values["norm_groups"] for w in widths):
            problems.append(f"autoencoder.norm_groups {values['norm_groups']} must divide every level's width "
                            f"{widths} (base_channels x channel_multipliers)")
    if problems:
        raise PlansError("invalid 'autoencoder' block:\n" + "\n".join(f"  - {p}" for p in problems)
                         + "\nFix: re-run planning or correct the keys in an inherits_from configuration "
                           "(documentation/latent.md, Autoencoder stage)")
    return AutoencoderConfig(
        spatial_dims=spatial_dims, in_channels=in_channels, downsampling_factors=tuple(int(f) for f in factors),
        latent_channels=int(ae_block["latent_channels"]), base_channels=int(values["base_channels"]),
        channel_multipliers=tuple(int(m) for m in multipliers), num_res_blocks=int(values["num_res_blocks"]),
        norm_groups=int(values["norm_groups"]), kl_weight=float(values["kl_weight"]),
        ssim_weight=float(values["ssim_weight"]), adversarial=bool(values["adversarial"]),
        adversarial_weight=float(values["adversarial_weight"]),
        adversarial_start_fraction=float(values["adversarial_start_fraction"]), vq=bool(values["vq"]),
        codebook_size=int(values["codebook_size"]), commitment_weight=float(values["commitment_weight"]))


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
class AEResBlock(nn.Module):
    """``GN -> SiLU -> conv -> GN -> SiLU -> conv(zero-init)`` plus a skip (1x1 conv when the
    width changes). No time embedding, so :class:`nndiff.networks.layers.ResBlock` does not fit."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm_groups: int) -> None:
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.body = nn.Sequential(
            nn.GroupNorm(norm_groups, in_channels), nn.SiLU(), conv(in_channels, out_channels, 3, padding=1),
            nn.GroupNorm(norm_groups, out_channels), nn.SiLU(),
            zero_init(conv(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if in_channels == out_channels else conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _output_head(spatial_dims: int, channels: int, out_channels: int, norm_groups: int) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(norm_groups, channels), nn.SiLU(),
                         conv_nd(spatial_dims)(channels, out_channels, 3, padding=1))


class Encoder(nn.Module):
    """Image ``(B, C, *S)`` -> ``(B, out_channels, *S / factors)``."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int) -> None:
        super().__init__()
        d, groups = cfg.spatial_dims, cfg.norm_groups
        widths = [cfg.base_channels * m for m in cfg.channel_multipliers]
        self.conv_in = conv_nd(d)(cfg.in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        width = widths[0]
        strides = cfg.strides()
        for level, level_width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(AEResBlock(d, width, level_width, groups))
                width = level_width
            if level < len(strides):
                layers.append(Downsample(d, width, strides[level]))
        self.down = nn.Sequential(*layers)
        self.mid = nn.Sequential(AEResBlock(d, width, width, groups), AEResBlock(d, width, width, groups))
        self.head = _output_head(d, width, out_channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.down(self.conv_in(x))))


class Decoder(nn.Module):
    """Latent ``(B, latent_channels, *L)`` -> image ``(B, C, *L * factors)`` (mirror of :class:`Encoder`)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        d, groups = cfg.spatial_dims, cfg.norm_groups
        widths = [cfg.base_channels * m for m in cfg.channel_multipliers]
        width = widths[-1]
        self.conv_in = conv_nd(d)(cfg.latent_channels, width, 3, padding=1)
        self.mid = nn.Sequential(AEResBlock(d, width, width, groups), AEResBlock(d, width, width, groups))
        layers: list[nn.Module] = []
        strides = cfg.strides()
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks):
                layers.append(AEResBlock(d, width, widths[level], groups))
                width = widths[level]
            if level > 0:
                layers.append(Upsample(d, width, strides[level - 1]))
        self.up = nn.Sequential(*layers)
        self.head = _output_head(d, width, cfg.in_channels, groups)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(self.mid(self.conv_in(z))))


# ----------------------------------------------------------------------------------------------
# Autoencoders
# ----------------------------------------------------------------------------------------------
class _AutoencoderBase(nn.Module):
    """Shared parts: config, shape checks, decoder, the scale-factor buffer."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.spatial_dims = cfg.spatial_dims
        self.factors = cfg.downsampling_factors
        self.decoder = Decoder(cfg)
        # NaN = not measured yet; a float32 buffer so it is saved in the state dict with the weights.
        self.register_buffer(SCALE_FACTOR_BUFFER, torch.tensor(float("nan")))

    def check_input(self, x: torch.Tensor) -> None:
        """Clear error for a wrong rank, channel count or a size not divisible by the factors."""
        d = self.spatial_dims
        if x.ndim != d + 2 or x.shape[1] != self.config.in_channels:
            raise NnDiffError(f"autoencoder input must be (B, {self.config.in_channels}, {d} spatial axes), got "
                              f"shape {tuple(x.shape)}")
        bad = [(n, f) for n, f in zip(x.shape[2:], self.factors) if n % f]
        if bad:
            raise NnDiffError(f"autoencoder input size {tuple(x.shape[2:])} is not divisible by the downsampling "
                              f"factors {self.factors}. Fix: pad the image (or choose a patch) to a multiple of "
                              f"the factors")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, latent_channels, *L)`` -> image ``(B, C, *L * factors)``."""
        return self.decoder(z)

    def latent_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Latent spatial shape of an image of ``spatial_shape`` (which must be divisible by the factors)."""
        return tuple(int(n) // f for n, f in zip(spatial_shape, self.factors))

    def scale_factor(self) -> float:
        """The measured latent scale factor; raises when it was never measured."""
        value = float(getattr(self, SCALE_FACTOR_BUFFER))
        if not math.isfinite(value):
            raise NnDiffError("this autoencoder's latent scale factor was never measured. Fix: finish the "
                              "autoencoder training (it measures the factor at the end) or call "
                              "nndiff.networks.autoencoder.measure_scale_factor")
        return value

    def set_scale_factor(self, value: float) -> None:
        getattr(self, SCALE_FACTOR_BUFFER).fill_(float(value))


class AutoencoderKL(_AutoencoderBase):
    """KL-regularised autoencoder: the encoder predicts a diagonal Gaussian per latent voxel.

    ``encode(x) -> (mean, logvar)``, ``sample_latent(mean, logvar)``, ``decode(z)``,
    ``forward(x) -> (recon, mean, logvar)`` (recon decodes a sample in training mode and the mean in
    eval mode, so validation is deterministic).
    """

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__(cfg)
        self.encoder = Encoder(cfg, 2 * cfg.latent_channels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def sample_latent(self, mean: torch.Tensor, logvar: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + exp(logvar / 2) * eps`` (reparameterisation), eps from ``generator`` if given."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logvar = self.encode(x)
        z = self.sample_latent(mean, logvar, generator) if self.training else mean
        return self.decode(z), mean, logvar

    def latents_for_diffusion(self, x: torch.Tensor) -> torch.Tensor:
        """The (unscaled) latent a diffusion model is trained on: the posterior mean."""
        return self.encode(x)[0]


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent channels and voxels, mean over the batch."""
    kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float())
    return kl.flatten(1).sum(1).mean()


class VectorQuantizer(nn.Module):
    """Nearest-codeword quantisation with a straight-through gradient (van den Oord et al. 2017).

    The codebook is a plain learned embedding (not EMA-updated): its loss
    ``||sg(z_e) - e||^2`` trains it through the optimiser, so resume needs no extra state.
    ``vq_loss = codebook loss + commitment_weight * ||z_e - sg(e)||^2``.
    """

    def __init__(self, codebook_size: int, channels: int, commitment_weight: float) -> None:
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, channels)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.commitment_weight = commitment_weight

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        channels = z_e.shape[1]
        flat = z_e.movedim(1, -1).reshape(-1, channels).float()
        codebook = self.codebook.weight.float()
        # fp32 distances even under autocast: bf16 rounding would pick wrong nearest codewords.
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None])
        indices = distances.argmin(1)
        quantized = codebook[indices].reshape(*z_e.shape[:1], *z_e.shape[2:], channels).movedim(-1, 1)
        quantized = quantized.to(z_e.dtype)
        codebook_loss = F.mse_loss(quantized.float(), z_e.detach().float())
        commitment = F.mse_loss(z_e.float(), quantized.detach().float())
        vq_loss = codebook_loss + self.commitment_weight * commitment
        # Straight-through: forward gives the codeword, backward passes the gradient to z_e unchanged.
        z_q = z_e + (quantized - z_e).detach()
        return z_q, indices.reshape(z_e.shape[0], *z_e.shape[2:]), vq_loss


class AutoencoderVQ(_AutoencoderBase):
    """Vector-quantised autoencoder: ``encode(x) -> (z_q, indices, vq_loss)``; ``forward(x) ->
    (recon, z_q, vq_loss)``. For methods that need a discrete latent."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__(cfg)
        self.encoder = Encoder(cfg, cfg.latent_channels)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.latent_channels, cfg.commitment_weight)

    def encode_continuous(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder output before quantisation (blended by :func:`sliding_window_encode`)."""
        self.check_input(x)
        return self.encoder(x)

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.quantizer(z_e)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.quantize(self.encode_continuous(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_q, _, vq_loss = self.encode(x)
        return self.decode(z_q), z_q, vq_loss

    def latents_for_diffusion(self, x: torch.Tensor) -> torch.Tensor:
        """The latent a diffusion model is trained on: the quantised codewords."""
        return self.encode(x)[0]


def build_autoencoder(ae_block: Mapping[str, Any], in_channels: int, spatial_dims: int) -> nn.Module:
    """:class:`AutoencoderKL` (or :class:`AutoencoderVQ` when ``vq: true``) from the plan's
    ``autoencoder`` block; ``in_channels`` image channels, ``spatial_dims`` 2 or 3."""
    cfg = parse_autoencoder_config(ae_block, in_channels, spatial_dims)
    return AutoencoderVQ(cfg) if cfg.vq else AutoencoderKL(cfg)


# ----------------------------------------------------------------------------------------------
# Sliding windows
# ----------------------------------------------------------------------------------------------
# Why not just decode windows and blend them: (1) near a window's edge the decoder sees zero
# padding instead of the neighbours, so each window is decoded with a halo of ``context`` latent
# voxels that is cropped away; (2) GroupNorm normalises with statistics of the whole tensor, so a
# window normalised by its own statistics comes out with a slightly different contrast (the seams
# of tiled VAE decoding). The statistics of every GroupNorm are therefore measured first over the
# whole volume, window by window (one truncated pass per GroupNorm layer, each reusing the exact
# statistics of the layers before it), and then frozen for the blended pass.


class _Stop(Exception):
    """Ends a truncated statistics pass once the GroupNorm being measured has seen its input."""


class _FrozenGroupNorms:
    """Context manager that routes every GroupNorm of ``module`` through frozen statistics.

    ``stats[i] = (sum, sum of squares, count)`` per (sample, group) of GroupNorm ``i``.
    ``measure = i``: GroupNorm ``i`` adds the core region of its input to ``stats[i]`` and stops
    the forward pass; GroupNorms before it use their frozen statistics.
    """

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self.stats: dict[int, list[torch.Tensor]] = {}
        self.measure: int | None = None
        #: (input window size, core start, core end) per axis, in the units of the pass's input.
        self.core: tuple[Sequence[int], Sequence[int], Sequence[int]] | None = None

    def __enter__(self) -> "_FrozenGroupNorms":
        for index, norm in enumerate(self.norms):
            norm.forward = self._forward_for(index, norm)  # instance attribute shadows the class method
        return self

    def __exit__(self, *exc: Any) -> None:
        for norm in self.norms:
            del norm.forward

    def _forward_for(self, index: int, norm: nn.GroupNorm):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.measure == index:
                self._accumulate(index, norm, x)
                raise _Stop
            if index not in self.stats:
                return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
            return self._normalise(index, norm, x)
        return forward

    def _accumulate(self, index: int, norm: nn.GroupNorm, x: torch.Tensor) -> None:
        assert self.core is not None
        size, lo, hi = self.core
        # The input window maps to this activation by a per-axis scale (e.g. 4x after two upsamplings).
        region = tuple(slice(int(round(a * n / s)), int(round(b * n / s)))
                       for n, s, a, b in zip(x.shape[2:], size, lo, hi))
        core = x[(slice(None), slice(None), *region)].double().reshape(x.shape[0], norm.num_groups, -1)
        new = [core.sum(-1), (core ** 2).sum(-1), torch.tensor(float(core.shape[-1]), dtype=torch.float64)]
        old = self.stats.get(index)
        self.stats[index] = new if old is None else [o + n for o, n in zip(old, new)]

    def _normalise(self, index: int, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        total, total_sq, count = (s.to(x.device) for s in self.stats[index])
        mean = total / count
        var = (total_sq / count - mean ** 2).clamp_min(0.0)
        b, c = x.shape[:2]
        grouped = x.float().reshape(b, norm.num_groups, -1)
        y = ((grouped - mean[..., None].float()) * torch.rsqrt(var[..., None].float() + norm.eps)).reshape(x.shape)
        affine = [1, c] + [1] * (x.ndim - 2)
        if norm.affine:
            y = y * norm.weight.reshape(affine) + norm.bias.reshape(affine)
        return y.to(x.dtype)


def receptive_radius(module: nn.Module, spatial_dims: int) -> tuple[float, ...]:
    """Per-axis receptive-field radius of ``module``'s convolution stack, in voxels of its input.

    Walks the modules in registration order (which is the forward order of :class:`Encoder` and
    :class:`Decoder`): a k-tap conv adds ``k // 2`` voxels at the current resolution, a stride
    coarsens it, an :class:`Upsample` refines it. A halo of this size makes a window exact.
    """
    step = [1.0] * spatial_dims  # size of one voxel of the current activation, in input voxels
    radius = [0.0] * spatial_dims
    for m in module.modules():
        if isinstance(m, Upsample):
            step = [s / k for s, k in zip(step, m.stride)]
        elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
            radius = [r + (k // 2) * s for r, k, s in zip(radius, m.kernel_size, step)]
            step = [s * k for s, k in zip(step, m.stride)]
    return tuple(radius)


def _window_starts(size: int, window: int, overlap: float, align: int = 1) -> list[int]:
    """Start positions covering ``[0, size)`` with windows of ``window`` (the last one flush with the
    end); steps are multiples of ``align`` (encoding: the factor, so windows map to whole latent voxels)."""
    if window >= size:
        return [0]
    step = max(align, int(round(window * (1.0 - overlap))) // align * align)
    starts = list(range(0, size - window, step))
    return starts + [size - window]


def blending_weights(window: Sequence[int], mode: str = "gaussian", device: torch.device | str = "cpu"
                     ) -> torch.Tensor:
    """Separable weights of one window: ``gaussian`` (sigma = window / 8, as nnU-Net) or ``linear``
    (a tent); floored at a small positive value so every voxel has weight."""
    weights = torch.ones((), device=device)
    for n in window:
        pos = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        if mode == "gaussian":
            axis = torch.exp(-0.5 * (pos / max(n / 8.0, 1e-3)) ** 2)
        elif mode == "linear":
            axis = 1.0 - pos.abs() / (n / 2.0 + 0.5)
        else:
            raise NnDiffError(f"unknown blending mode {mode!r}; choose 'gaussian' or 'linear'")
        weights = weights[..., None] * (axis / axis.max())
    return weights.clamp_min(1e-3)


@dataclass(frozen=True)
class _Window:
    """One window: its core ``[start, end)`` and the halo-extended input ``[lo, hi)``, per axis."""

    start: tuple[int, ...]
    end: tuple[int, ...]
    lo: tuple[int, ...]
    hi: tuple[int, ...]

    def input_slice(self) -> tuple[slice, ...]:
        return (slice(None), slice(None), *(slice(a, b) for a, b in zip(self.lo, self.hi)))

    def core_in_window(self) -> tuple[list[int], list[int], list[int]]:
        return ([b - a for a, b in zip(self.lo, self.hi)], [s - a for s, a in zip(self.start, self.lo)],
                [e - a for e, a in zip(self.end, self.lo)])


def _windows(spatial: Sequence[int], window: Sequence[int], overlap: float, context: Sequence[int],
             align: Sequence[int], partition: bool = False) -> list[_Window]:
    """Overlapping windows (``partition``: non-overlapping tiles that cover each voxel once)."""
    per_axis = []
    for n, w, a in zip(spatial, window, align):
        w = min(w, n)
        starts = list(range(0, n, w)) if partition else _window_starts(n, w, overlap, a)
        per_axis.append([(s, min(n, s + w)) for s in starts])
    out = []
    for combo in itertools.product(*per_axis):
        start = tuple(s for s, _ in combo)
        end = tuple(e for _, e in combo)
        lo = tuple(max(0, s - c) for s, c in zip(start, context))
        hi = tuple(min(n, e + c) for e, c, n in zip(end, context, spatial))
        out.append(_Window(start, end, lo, hi))
    return out


def _measure_norm_statistics(freezer: _FrozenGroupNorms, run, source: torch.Tensor, window: Sequence[int],
                             context: Sequence[int], align: Sequence[int]) -> None:
    """Fill ``freezer.stats`` with whole-volume statistics, one GroupNorm at a time."""
    tiles = _windows(source.shape[2:], window, 0.0, context, align, partition=True)
    for index in range(len(freezer.norms)):
        freezer.measure = index
        for tile in tiles:
            freezer.core = tile.core_in_window()
            try:
                run(source[tile.input_slice()])
            except _Stop:
                pass
    freezer.measure = None


def _blend(run, source: torch.Tensor, window: Sequence[int], overlap: float, scale: Sequence[float],
           context: Sequence[int], align: Sequence[int], mode: str,
           out_device: torch.device | str | None) -> list[torch.Tensor]:
    """Run ``run`` on overlapping halo-extended windows of ``source``; blend each output's cores.

    ``scale`` maps input voxels to output voxels per axis (factors for decoding, 1/factors for
    encoding). Returns one blended tensor per output of ``run``.
    """
    spatial = source.shape[2:]
    device = source.device if out_device is None else torch.device(out_device)
    out_spatial = [int(round(n * s)) for n, s in zip(spatial, scale)]
    sums: list[torch.Tensor] | None = None
    norm = torch.zeros(out_spatial, device=device)
    for win in _windows(spatial, window, overlap, context, align):
        outputs = run(source[win.input_slice()])
        core = tuple(slice(int(round((s - a) * k)), int(round((e - a) * k)))
                     for s, e, a, k in zip(win.start, win.end, win.lo, scale))
        target = tuple(slice(int(round(s * k)), int(round(e * k))) for s, e, k in zip(win.start, win.end, scale))
        weights = blending_weights([t.stop - t.start for t in target], mode, device)
        if sums is None:
            sums = [torch.zeros(*o.shape[:2], *out_spatial, device=device, dtype=torch.float32) for o in outputs]
        for total, out in zip(sums, outputs):
            window_core = out[(slice(None), slice(None), *core)].float().to(device)
            total[(slice(None), slice(None), *target)] += window_core * weights
        norm[target] += weights
    assert sums is not None
    return [total / norm for total in sums]


def _check_window(window: Sequence[int] | int, dims: int, what: str) -> tuple[int, ...]:
    window = (int(window),) * dims if isinstance(window, int) else tuple(int(w) for w in window)
    if len(window) != dims or min(window) < 1:
        raise NnDiffError(f"{what} must be a positive size per spatial axis ({dims} values), got {window}")
    return window


def _check_overlap(overlap: float) -> None:
    if not 0.0 <= overlap < 1.0:
        raise NnDiffError(f"overlap must be in [0, 1), got {overlap}")


def _resolve_factors(ae: nn.Module, factors: Sequence[int] | None) -> tuple[int, ...]:
    own = tuple(getattr(ae, "factors", ()))
    if factors is None:
        if not own:
            raise NnDiffError("pass factors: the autoencoder does not say its downsampling factors")
        return own
    factors = tuple(int(f) for f in factors)
    if own and factors != own:
        raise NnDiffError(f"factors {factors} differ from the autoencoder's downsampling factors {own}")
    return factors


def _resolve_context(context: Sequence[int] | int | None, module: nn.Module, dims: int,
                     multiple: Sequence[int] | None = None) -> tuple[int, ...]:
    """The halo: given, or the module's full receptive radius (rounded up to ``multiple``)."""
    if context is None:
        radius = receptive_radius(module, dims)
        multiple = multiple or [1] * dims
        return tuple(int(math.ceil(r / m)) * m for r, m in zip(radius, multiple))
    ctx = (int(context),) * dims if isinstance(context, int) else tuple(int(c) for c in context)
    if len(ctx) != dims or min(ctx) < 0 or (multiple and any(c % m for c, m in zip(ctx, multiple))):
        raise NnDiffError(f"context must be {dims} non-negative sizes" +
                          (f" that are multiples of the factors {tuple(multiple)}" if multiple else "") +
                          f", got {ctx}")
    return ctx


@torch.no_grad()
def sliding_window_decode(ae: nn.Module, z: torch.Tensor, latent_window: Sequence[int] | int,
                          overlap: float = 0.5, factors: Sequence[int] | None = None, *,
                          context: Sequence[int] | int | None = None, mode: str = "gaussian",
                          exact_norm: bool = True, out_device: torch.device | str | None = None) -> torch.Tensor:
    """Decode ``z`` in overlapping windows of ``latent_window`` latent voxels, blended in pixel space.

    Each window is decoded with a halo of ``context`` latent voxels per side (default: the
    decoder's receptive radius, which makes every window exact), cropped back to the window and
    averaged with ``mode`` weights (``gaussian`` or ``linear``). ``exact_norm``: GroupNorm
    statistics are measured over the whole latent first (see the section comment); off, each
    window uses its own (faster, seams possible). ``out_device``: where the full-size image is
    accumulated (e.g. ``"cpu"`` when it does not fit on the GPU).
    """
    _check_overlap(overlap)
    factors = _resolve_factors(ae, factors)
    dims = z.ndim - 2
    window = _check_window(latent_window, dims, "latent_window")
    decoder = getattr(ae, "decoder", ae)
    ctx = _resolve_context(context, decoder, dims)
    if all(w >= n for w, n in zip(window, z.shape[2:])):
        return ae.decode(z)  # one window holds everything: nothing to blend
    run = lambda w: (ae.decode(w),)  # noqa: E731
    ones = [1] * dims
    if not exact_norm:
        return _blend(run, z, window, overlap, factors, ctx, ones, mode, out_device)[0]
    with _FrozenGroupNorms(decoder) as freezer:
        _measure_norm_statistics(freezer, run, z, window, ctx, ones)
        return _blend(run, z, window, overlap, factors, ctx, ones, mode, out_device)[0]


@torch.no_grad()
def sliding_window_encode(ae: nn.Module, x: torch.Tensor, pixel_window: Sequence[int] | int,
                          overlap: float = 0.5, factors: Sequence[int] | None = None, *,
                          context: Sequence[int] | int | None = None, mode: str = "gaussian",
                          exact_norm: bool = True, out_device: torch.device | str | None = None
                          ) -> tuple[torch.Tensor, ...]:
    """Encode ``x`` in overlapping pixel windows, blended in latent space (the mirror of
    :func:`sliding_window_decode`; windows, halo and image size must be multiples of the factors).

    KL autoencoder: returns ``(mean, logvar)``. VQ autoencoder: the pre-quantisation latents are
    blended and then quantised, returning ``(z_q, indices, vq_loss)`` like ``encode``.
    """
    _check_overlap(overlap)
    factors = _resolve_factors(ae, factors)
    dims = x.ndim - 2
    window = _check_window(pixel_window, dims, "pixel_window")
    if any(w % f for w, f in zip(window, factors)) or any(n % f for n, f in zip(x.shape[2:], factors)):
        raise NnDiffError(f"pixel_window {window} and the image size {tuple(x.shape[2:])} must be multiples of the "
                          f"downsampling factors {factors}. Fix: pad the image / choose another window")
    if all(w >= n for w, n in zip(window, x.shape[2:])):
        return tuple(ae.encode(x))  # one window holds everything: nothing to blend
    encoder = getattr(ae, "encoder", ae)
    ctx = _resolve_context(context, encoder, dims, multiple=factors)
    scale = [1.0 / f for f in factors]
    vq = isinstance(ae, AutoencoderVQ)
    run = (lambda w: (ae.encode_continuous(w),)) if vq else (lambda w: ae.encode(w))  # noqa: E731
    with _FrozenGroupNorms(encoder) if exact_norm else contextlib.nullcontext() as freezer:
        if freezer is not None:
            _measure_norm_statistics(freezer, run, x, window, ctx, factors)
        outputs = _blend(run, x, window, overlap, scale, ctx, factors, mode, out_device)
    if vq:
        return ae.quantize(outputs[0].to(x.device, x.dtype))
    return outputs[0], outputs[1]


# ----------------------------------------------------------------------------------------------
# Scale factor and weights hash
# ----------------------------------------------------------------------------------------------
def _as_batches(data: Any, device: torch.device) -> Iterable[torch.Tensor]:
    """Yield ``(B, C, *S)`` float tensors from arrays/tensors ``(C, *S)`` or ``(B, C, *S)``, a
    DataLoader of such tensors, or of dicts with a ``data`` key."""
    for item in data:
        if isinstance(item, Mapping):
            if "data" not in item:
                raise NnDiffError(f"a batch dict needs a 'data' key with the images, got keys {sorted(item)}")
            item = item["data"]
        if isinstance(item, (list, tuple)):
            item = item[0]
        tensor = torch.as_tensor(np.asarray(item) if not isinstance(item, torch.Tensor) else item)
        yield tensor.to(device=device, dtype=torch.float32)


@torch.no_grad()
def measure_scale_factor(ae: nn.Module, loader_or_arrays: Any, *, latent_window: Sequence[int] | None = None,
                         max_whole_voxels: int | None = None, store: bool = True) -> float:
    """``1 / std`` of the training latents (all channels and voxels pooled, population std).

    KL: the posterior means; VQ: the quantised latents. Single images ``(C, *S)`` and batches
    ``(B, C, *S)`` are both accepted; ``latent_window`` (latent voxels) encodes large images with
    :func:`sliding_window_encode`, except an image of at most ``max_whole_voxels`` voxels (N × spatial),
    which is encoded whole as the latent cache encodes it. With ``store`` the value goes into the
    module's ``latent_scale_factor`` buffer, which is saved with its weights.
    """
    device = next(ae.parameters()).device
    was_training = ae.training
    ae.eval()
    total, total_sq, count = 0.0, 0.0, 0
    try:
        for batch in _as_batches(loader_or_arrays, device):
            if batch.ndim == ae.spatial_dims + 1:
                batch = batch[None]
            whole = max_whole_voxels is not None and batch.shape[0] * math.prod(batch.shape[2:]) <= max_whole_voxels
            if latent_window is not None and not whole:
                pixel_window = [w * f for w, f in zip(latent_window, ae.factors)]
                z = sliding_window_encode(ae, batch, pixel_window)[0]
            else:
                z = ae.latents_for_diffusion(batch)
            z = z.double()
            total += float(z.sum())
            total_sq += float((z ** 2).sum())
            count += z.numel()
    finally:
        ae.train(was_training)
    if count == 0:
        raise NnDiffError("measure_scale_factor got no images. Fix: pass the training cases' images")
    variance = max(total_sq / count - (total / count) ** 2, 0.0)
    if not variance > 0:
        raise NnDiffError("the latents have zero variance (constant images or a collapsed encoder); the scale "
                          "factor 1/std is undefined. Fix: check the training data and the autoencoder training")
    factor = 1.0 / math.sqrt(variance)
    if store:
        ae.set_scale_factor(factor)
    return factor


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict (sorted by name), so the hash
    names the weights, not the file they were saved in."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
