"""Autoencoder stage of latent diffusion: :class:`AutoencoderTrainer` and loading a trained stage.

The trainer fits the autoencoder a latent configuration's ``autoencoder`` block describes, on the
pixel-space preprocessed data of that configuration (its ``data_identifier``), with

``loss = L1 + ssim_weight * (1 - SSIM) + kl_weight * KL``  (VQ: ``+ vq_loss`` instead of KL)

plus, with ``adversarial: true``, ``adversarial_weight * hinge generator loss`` of a small PatchGAN
discriminator once ``adversarial_start_fraction`` of the run is done. No loss needs downloaded
weights. At the end it measures the latent scale factor (1/std of the training cases' latents) with
the EMA weights of the final and of the best checkpoint, stores it in those checkpoints' weights
(buffer ``latent_scale_factor``, plus the checkpoint key ``latent_scale_factor``) and writes
``autoencoder.json`` with the sha256 of the weights (:func:`weights_sha256`), which the latent
diffusion stage records and checks. See ``documentation/latent.md``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nndiff.diffusion.options import TaskFamily
from nndiff.errors import NnDiffError, PlansError
from nndiff.networks.autoencoder import (build_autoencoder, kl_divergence, measure_scale_factor,
                                         parse_autoencoder_config, weights_sha256)
from nndiff.networks.layers import conv_nd
from nndiff.training import BEST, FINAL, Trainer, load_checkpoint, register_trainer
from nndiff.training import checkpoint as ckpt
from nndiff.training.config import parse_training_settings, total_iterations
from nndiff.training.data import SamplingSpec
from nndiff.utils.files import load_json, save_json

logger = logging.getLogger(__name__)

AUTOENCODER_JSON = "autoencoder.json"
#: Images the scale factor is measured on: 2D slices spread evenly over the training cases, or 3D cases.
SCALE_FACTOR_MAX_IMAGES = {2: 64, 3: 32}
#: SSIM window of the structural loss: 7 taps (not the metric's 11) so 16-voxel patches keep a valid region.
SSIM_LOSS_WINDOW = 7
SSIM_LOSS_SIGMA = 1.5


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def _gaussian_kernel(size: int, sigma: float, dims: int, channels: int, like: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(size, dtype=torch.float32, device=like.device) - (size - 1) / 2
    g = torch.exp(-0.5 * (pos / sigma) ** 2)
    g = g / g.sum()
    kernel = g
    for _ in range(dims - 1):
        kernel = kernel[..., None] * g
    return kernel.expand(channels, 1, *([size] * dims)).contiguous()


def data_range_per_sample(reference: torch.Tensor) -> torch.Tensor:
    """max - min of each sample of the reference (floored so a constant patch does not divide by 0)."""
    flat = reference.detach().float().flatten(1)
    return (flat.max(1).values - flat.min(1).values).clamp_min(1e-3)


def ssim_torch(x: torch.Tensor, y: torch.Tensor, data_range: torch.Tensor) -> torch.Tensor:
    """Differentiable mean SSIM per sample of ``(B, C, *S)`` tensors (Gaussian window, valid region).

    Same definition as ``nndiff.evaluation.ssim`` (Wang et al. 2004, K1 0.01, K2 0.03) with a
    7-tap window, shrunk to the smallest axis for tiny patches; ``data_range`` per sample.
    """
    dims = x.ndim - 2
    size = min(SSIM_LOSS_WINDOW, *(n if n % 2 else n - 1 for n in x.shape[2:]))
    x, y = x.float(), y.float()
    kernel = _gaussian_kernel(max(size, 1), SSIM_LOSS_SIGMA, dims, x.shape[1], x)
    conv = {2: F.conv2d, 3: F.conv3d}[dims]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return conv(t, kernel, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    shape = [-1] + [1] * (dims + 1)
    c1 = ((0.01 * data_range) ** 2).reshape(shape)
    c2 = ((0.03 * data_range) ** 2).reshape(shape)
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def psnr_per_sample(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each sample against ``reference``, with the reference's own data range."""
    mse = ((x.float() - reference.float()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range_per_sample(reference) ** 2 / mse)


class PatchDiscriminator(nn.Module):
    """Small PatchGAN (Isola et al. 2017) for 2D/3D: strided 3x3(x3) convs with GroupNorm and
    LeakyReLU, one real/fake logit per patch. 3-tap kernels so thin anisotropic axes survive."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: int = 32, num_layers: int = 3) -> None:
        super().__init__()
        conv = conv_nd(spatial_dims)
        layers: list[nn.Module] = [conv(in_channels, channels, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for _ in range(num_layers - 1):
            layers += [conv(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(min(8, 2 * width), 2 * width),
                       nn.LeakyReLU(0.2)]
            width *= 2
        layers.append(conv(width, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
def find_source_configuration(plans: Mapping[str, Any], configuration: Mapping[str, Any]
                              ) -> tuple[str, dict[str, Any]] | None:
    """The pixel configuration whose preprocessed data a latent configuration uses: the block's
    ``source_configuration``, else the configuration without ``autoencoder`` block that has the
    same ``data_identifier``."""
    from nndiff.planning import resolve_configuration

    names = list(plans.get("configurations", {}))
    wanted = configuration.get("autoencoder", {}).get("source_configuration")
    if wanted:
        return wanted, resolve_configuration(plans, wanted)
    for name in names:
        other = resolve_configuration(plans, name)
        if "autoencoder" not in other and other.get("data_identifier") == configuration.get("data_identifier"):
            return name, other
    return None


@register_trainer
class AutoencoderTrainer(Trainer):
    """Trains the autoencoder stage of a latent configuration (see the module docstring).

    Plan keys read from the configuration's ``autoencoder`` block, besides the architecture:
    ``patch_size`` / ``batch_size`` (default: the source pixel configuration's), ``training``
    (overrides of the configuration's training block: the autoencoder's run length), ``in_channels``
    (default: the channels of the preprocessed ``data``).
    """

    handles_latent_configurations = True

    def __init__(self, plans: Mapping[str, Any], configuration: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(plans, configuration, *args, **kwargs)
        ae_block = self.configuration.get("autoencoder")
        if not isinstance(ae_block, Mapping):
            raise PlansError(f"configuration {configuration!r} has no 'autoencoder' block: the autoencoder stage "
                             "trains only latent configurations (e.g. 3d_latent). Fix: pick a latent configuration "
                             "or re-run planning")
        self.ae_block = dict(ae_block)
        self.ae_config = parse_autoencoder_config(self.ae_block, int(self.ae_block.get("in_channels", 1)),
                                                  int(self.configuration.get("spatial_dims", 0)))
        self._apply_autoencoder_schedule(kwargs.get("epochs"), kwargs.get("iterations"))
        self._apply_autoencoder_patch()
        self.discriminator: PatchDiscriminator | None = None
        self.discriminator_optimizer: torch.optim.Optimizer | None = None
        self.discriminator_scaler: torch.amp.GradScaler | None = None
        self._last_pair: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- plan ----------------------------------------------------------------------------------
    def _refuse_untrainable(self) -> None:
        # The latent configuration may still be marked untrainable for its diffusion stage; the
        # autoencoder stage only needs its block.
        if "autoencoder" not in self.configuration:
            super()._refuse_untrainable()

    def _apply_autoencoder_schedule(self, epochs: int | None, iterations: int | None) -> None:
        overrides = self.ae_block.get("training")
        if overrides:
            if not isinstance(overrides, Mapping):
                raise PlansError(f"autoencoder.training of configuration {self.configuration_name!r} must be a "
                                 f"mapping of training keys, got {overrides!r}")
            merged = {**(self.configuration.get("training") or {}), **overrides}
            self.settings = parse_training_settings(merged)
            self.total_iterations = total_iterations(self.settings, epochs, iterations)
            self.spec = SamplingSpec(self.spec.patch_size, self.spec.spatial_dims, self.settings.augmentation)

    def _apply_autoencoder_patch(self) -> None:
        source = find_source_configuration(self.plans, self.configuration)
        patch = self.ae_block.get("patch_size") or (source[1].get("patch_size") if source else None)
        batch = self.ae_block.get("batch_size") or (source[1].get("batch_size") if source else None)
        where = f"configuration {self.configuration_name!r}"
        if not patch or not batch:
            raise PlansError(f"{where}: no autoencoder patch/batch size (autoencoder.patch_size / batch_size) and "
                             "no source pixel configuration with the same data_identifier to take them from. "
                             "Fix: re-run planning or add autoencoder.patch_size and batch_size")
        patch = tuple(int(p) for p in patch)
        bad = [(p, f) for p, f in zip(patch, self.ae_config.downsampling_factors) if p % f]
        if len(patch) != self.ae_config.spatial_dims or bad:
            raise PlansError(f"{where}: autoencoder patch {list(patch)} must have {self.ae_config.spatial_dims} "
                             f"sizes, each a multiple of downsampling_factors "
                             f"{list(self.ae_config.downsampling_factors)}. Fix: set autoencoder.patch_size")
        self.batch_size = int(batch)
        self.spec = SamplingSpec(patch, self.spec.spatial_dims, self.spec.augmentation)

    # -- network -------------------------------------------------------------------------------
    def data_channels(self) -> int:
        """Channels of the preprocessed images (checked against ``autoencoder.in_channels`` if given)."""
        channels = int(self.store[self.train_cases[0]].data.shape[0])
        planned = self.ae_block.get("in_channels")
        if planned is not None and int(planned) != channels:
            raise PlansError(f"autoencoder.in_channels is {planned} but the preprocessed cases in {self.data_folder} "
                             f"have {channels} channel(s). Fix: re-run planning and preprocessing")
        return channels

    def build_network(self) -> nn.Module:
        return build_autoencoder(self.ae_block, self.data_channels(), self.ae_config.spatial_dims)

    def initialize(self) -> None:
        if self.initialized:
            return
        super().initialize()
        if str(self.plans.get("task", "")) == TaskFamily.ANOMALY_DETECTION.value:
            from nndiff.tasks.anomaly import restrict_autoencoder_to_healthy  # anomaly imports the latent trainer

            restrict_autoencoder_to_healthy(self)
        if self.ae_config.adversarial:
            self.discriminator = PatchDiscriminator(self.ae_config.spatial_dims, self.network.config.in_channels,
                                                    self.ae_config.base_channels).to(self.device)
            self.discriminator_optimizer = self.build_optimizer(self.discriminator)
            self.discriminator_scaler = torch.amp.GradScaler("cuda") if self._needs_scaler else None

    @property
    def adversarial_start(self) -> int:
        """First iteration with the adversarial terms (after the warm-up fraction of the run)."""
        return int(math.ceil(self.ae_config.adversarial_start_fraction * self.total_iterations))

    def adversarial_active(self) -> bool:
        return self.discriminator is not None and self.iteration >= self.adversarial_start

    # -- losses --------------------------------------------------------------------------------
    def reconstruction_terms(self, recon: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        l1 = (recon.float() - x.float()).abs().mean()
        ssim = ssim_torch(recon, x, data_range_per_sample(x)).mean()
        return {"l1": l1, "ssim": ssim}

    def compute_loss(self, network: nn.Module, batch: Mapping[str, Any], *, train: bool,
                     generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["data"]
        cfg = self.ae_config
        if cfg.vq:
            recon, _, reg = network(x)
            reg_name, reg_term = "vq", reg
        else:
            recon, mean, logvar = network(x)
            reg = kl_divergence(mean, logvar)
            # KL summed over the latent, per image voxel: the same balance to a mean L1 as LDM's
            # summed KL to its summed reconstruction loss, so kl_weight keeps LDM's meaning (1e-6).
            reg_name, reg_term = "kl", cfg.kl_weight * reg / x[0].numel()
        terms = self.reconstruction_terms(recon, x)
        loss = terms["l1"] + cfg.ssim_weight * (1.0 - terms["ssim"]) + reg_term
        logs = {"l1": terms["l1"].detach(), "ssim": terms["ssim"].detach(), reg_name: reg.detach()}
        if train and self.adversarial_active():
            assert self.discriminator is not None
            self.discriminator.requires_grad_(False)  # the generator step must not train D
            g_adv = -self.discriminator(recon).float().mean()
            loss = loss + cfg.adversarial_weight * g_adv
            logs["adv_g"] = g_adv.detach()
            self._last_pair = (x.detach(), recon.detach())
        return loss, logs

    def train_iteration(self, numpy_batch: Mapping[str, Any]) -> float:
        """The autoencoder step (base class), then one discriminator step once adversarial training runs."""
        self._last_pair = None
        loss = super().train_iteration(numpy_batch)
        if self._last_pair is not None:
            self._discriminator_step(*self._last_pair)
            self._last_pair = None
        return loss

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        assert self.discriminator is not None and self.discriminator_optimizer is not None
        disc, opt = self.discriminator, self.discriminator_optimizer
        disc.requires_grad_(True)
        disc.train()
        for group in opt.param_groups:  # same schedule as the autoencoder
            group["lr"] = self.optimizer.param_groups[0]["lr"]
        opt.zero_grad(set_to_none=True)
        with self.autocast():
            d_loss = hinge_discriminator_loss(disc(real).float(), disc(fake).float())
        value = float(d_loss.detach())
        if self.discriminator_scaler is not None:  # fp16: the scaler skips non-finite steps itself
            self.discriminator_scaler.scale(d_loss).backward()
            self.discriminator_scaler.step(opt)
            self.discriminator_scaler.update()
        else:
            d_loss.backward()
            if math.isfinite(value):  # a non-finite step would poison D; the autoencoder step already passed
                opt.step()
        logs = self._epoch_acc["logs"]
        logs["adv_d"] = logs.get("adv_d", 0.0) + value

    def validation_step(self, batch: Mapping[str, Any], generators: Sequence[torch.Generator]) -> dict[str, float]:
        """Validation loss = L1 of the reconstruction (posterior mean / codewords); also PSNR and SSIM."""
        x = batch["data"]
        recon = self.validation_network(x)[0]
        terms = self.reconstruction_terms(recon, x)
        return {"loss": float(terms["l1"]), "psnr": float(psnr_per_sample(recon, x).mean()),
                "ssim": float(terms["ssim"])}

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint_extra_state(self) -> dict[str, Any]:
        if self.discriminator is None:
            return {}
        assert self.discriminator_optimizer is not None
        return {"discriminator_weights": self.discriminator.state_dict(),
                "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
                "discriminator_scaler": None if self.discriminator_scaler is None
                else self.discriminator_scaler.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if self.discriminator is None:
            return
        if "discriminator_weights" not in state:
            raise NnDiffError(f"the checkpoint in {self.output_dir} has no discriminator although the plan asks for "
                              "adversarial training. Fix: train from scratch (without --continue) or set "
                              "autoencoder.adversarial back to false")
        self.discriminator.load_state_dict(state["discriminator_weights"])
        assert self.discriminator_optimizer is not None
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        if self.discriminator_scaler is not None and state.get("discriminator_scaler"):
            self.discriminator_scaler.load_state_dict(state["discriminator_scaler"])

    # -- end of training: scale factor + autoencoder.json ----------------------------------------
    def scale_factor_picks(self) -> list[tuple[str, int | None]]:
        """(case, z slice or None) of the images the scale factor is measured on: 2D slices spread
        evenly over the fold's training cases, or 3D cases; at most SCALE_FACTOR_MAX_IMAGES."""
        dims = self.ae_config.spatial_dims
        limit = SCALE_FACTOR_MAX_IMAGES[dims]
        if dims == 3:
            return [(self.train_cases[i], None) for i in _spread(len(self.train_cases), limit)]
        slices = [(case, z) for case in self.train_cases for z in range(self.store[case].data.shape[1])]
        return [slices[i] for i in _spread(len(slices), limit)]

    def scale_factor_images(self) -> Iterator[np.ndarray]:
        """The picked training images ``(C, *S)``, padded at their end to multiples of the factors with
        each channel's minimum, as the latent cache and the latent predictors pad (so the factor is
        measured on the latents the diffusion model sees)."""
        for case, z in self.scale_factor_picks():
            data = self.store[case].data
            image = data if z is None else data[:, z]
            pad = [(0, (-n) % f) for n, f in zip(image.shape[1:], self.ae_config.downsampling_factors)]
            minimum = image.reshape(image.shape[0], -1).min(axis=1)
            yield np.stack([np.pad(channel, pad, constant_values=low) for channel, low in zip(image, minimum)])

    def measure_checkpoint_scale_factor(self, path: Path) -> dict[str, Any]:
        """Measure the factor with the checkpoint's EMA weights and store it in that checkpoint."""
        state = load_checkpoint(path)
        model = build_autoencoder(self.ae_block, self.network.config.in_channels, self.ae_config.spatial_dims)
        model.load_state_dict(state["ema_weights"])
        model.to(self.device)
        from nndiff.tasks.latent import decode_limit  # latent imports the generation trainer; import late

        latent_window = [p // f for p, f in zip(self.spec.patch_size, self.ae_config.downsampling_factors)]
        with self.autocast():
            # Volumes within the plan's one-pass limit are encoded whole, as the latent cache encodes
            # them (exact-norm sliding windows cost one partial encoder pass per GroupNorm and tile).
            factor = measure_scale_factor(model, ([img] for img in self.scale_factor_images()),
                                          latent_window=latent_window if self.ae_config.spatial_dims == 3 else None,
                                          max_whole_voxels=decode_limit(self.configuration))
        ema = {k: v.cpu() for k, v in model.state_dict().items()}
        state["ema_weights"] = ema
        state["network_weights"]["latent_scale_factor"] = torch.tensor(factor, dtype=torch.float32)
        state["latent_scale_factor"] = factor
        state["weights_sha256"] = weights_sha256(ema)
        ckpt.save_checkpoint(state, path)
        return {"latent_scale_factor": factor, "weights_sha256": state["weights_sha256"],
                "iteration": int(state["iteration"])}

    def on_train_end(self) -> None:
        checkpoints: dict[str, Any] = {}
        for name in (FINAL, BEST):
            if (self.output_dir / name).is_file():
                checkpoints[name] = self.measure_checkpoint_scale_factor(self.output_dir / name)
        final = checkpoints[FINAL]
        # The live modules get the final checkpoint's factor too (API users keep the trainer object).
        for module in (self.network, self.ema_network):
            module.set_scale_factor(final["latent_scale_factor"])
        info = {
            "checkpoint": FINAL,
            "weights": "ema_weights",
            "weights_sha256": final["weights_sha256"],
            "latent_scale_factor": final["latent_scale_factor"],
            "checkpoints": checkpoints,
            "in_channels": self.network.config.in_channels,
            "spatial_dims": self.ae_config.spatial_dims,
            "autoencoder": self.ae_block,
            "autoencoder_resolved": self.ae_config.to_dict(),
            "configuration": self.configuration_name,
            "plans_hash": self.plans_hash,
            "fold": str(self.fold),
            "train_cases": list(self.train_cases),
            "scale_factor_images": [[case, z] for case, z in self.scale_factor_picks()],
        }
        save_json(info, self.output_dir / AUTOENCODER_JSON)
        self.log(f"latent scale factor {final['latent_scale_factor']:.5g} (1/std of the training latents); wrote "
                 f"{AUTOENCODER_JSON} (weights sha256 {final['weights_sha256'][:12]}...)")


def _spread(count: int, limit: int) -> list[int]:
    """Up to ``limit`` indices spread evenly over ``range(count)``."""
    if count <= limit:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, limit).round().astype(int).tolist()))


# ----------------------------------------------------------------------------------------------
# Loading a trained stage
# ----------------------------------------------------------------------------------------------
def load_trained_autoencoder(fold_dir: str | Path, checkpoint: str = FINAL, device: str | torch.device = "cpu",
                             expected_sha256: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The trained autoencoder (EMA weights, eval mode, scale factor set) of ``fold_dir`` and its
    ``autoencoder.json``. ``expected_sha256``: refuse weights whose hash differs (e.g. the hash a
    latent diffusion model was trained with)."""
    fold_dir = Path(fold_dir)
    info_path = fold_dir / AUTOENCODER_JSON
    if not info_path.is_file():
        raise NnDiffError(f"{info_path} not found: the autoencoder stage of this fold has not finished. Fix: train "
                          "it (AutoencoderTrainer) to the end")
    info = load_json(info_path)
    entry = info.get("checkpoints", {}).get(checkpoint)
    if entry is None:
        raise NnDiffError(f"{info_path} lists no measured checkpoint {checkpoint!r} (has: "
                          f"{sorted(info.get('checkpoints', {}))})")
    state = load_checkpoint(fold_dir / checkpoint)
    weights = state["ema_weights"]
    actual = weights_sha256(weights)
    if actual != entry["weights_sha256"]:
        raise NnDiffError(f"{fold_dir / checkpoint}: its weights hash {actual[:12]}... differs from "
                          f"{entry['weights_sha256'][:12]}... in {info_path} (the file was replaced or damaged). "
                          "Fix: retrain the autoencoder stage")
    if expected_sha256 is not None and actual != expected_sha256:
        raise NnDiffError(f"{fold_dir / checkpoint}: autoencoder weights hash {actual[:12]}... is not the "
                          f"{expected_sha256[:12]}... the latent model was trained with. Fix: use the autoencoder "
                          "that model was trained on, or retrain the latent diffusion model")
    model = build_autoencoder(info["autoencoder"], int(info["in_channels"]), int(info["spatial_dims"]))
    model.load_state_dict(weights)
    return model.to(device).eval(), info
