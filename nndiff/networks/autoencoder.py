"""Autoencoder stage of latent diffusion: KL-regularised and vector-quantised convolutional
autoencoders for 2D and 3D, sliding-window encode/decode, and the latent scale factor.

The autoencoder is built from the plan's configuration ``autoencoder`` block alone
(:func:`build_autoencoder`), so a predictor can rebuild it without the training code. Downsampling
is per axis: ``downsampling_factors`` ``[1, 4, 4]`` halves axes 1 and 2 twice and never touches
axis 0. Blocks are GroupNorm + SiLU residual blocks without attention (attention over a full-size
3D feature map is what makes pixel-space 3D diffusion run out of memory in the first place).
Sliding-window encode/decode: :mod:`nndiff.networks.autoencoder_windows`.

The scale factor that makes latents unit-variance (Rombach et al. 2022) is measured on training
data by :func:`measure_scale_factor` and kept in the module's ``latent_scale_factor`` buffer, so
it travels with the weights; it starts as NaN ("not measured") and :meth:`AutoencoderKL.scale_factor`
refuses to return an unmeasured value. See ``documentation/latent.md``.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nndiff.errors import NnDiffError, PlansError
from nndiff.networks.autoencoder_windows import sliding_window_encode
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
