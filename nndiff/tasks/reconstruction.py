"""Reconstruction family: the image prior for MRI k-space / sparse-view CT reconstruction.

:class:`ReconstructionTrainer` learns an unconditional diffusion prior on the fully sampled images
of ``imagesTr`` (loss, weighting, noise type and t sampling are the generation family's); the
measurement enters only at sampling time, through data consistency in the sampler's hooks
(:mod:`nndiff.tasks.data_consistency`, :mod:`nndiff.tasks.reconstruction_predictor`).

Complex images are stored as (real, imaginary) channel pairs by preprocessing (the planner gives
the network 2 channels). Magnitude-only MR images can be trained with a **smooth random phase**
(:func:`smooth_random_phase`): x -> |x| e^{i phi} as 2 channels, so the prior cannot rely on the
Hermitian symmetry of real images' k-space. That needs a network with 2 channels for 1 stored
channel; the planner plans ``in_channels`` = stored channels (1 for magnitude), so the option is
active when a configuration sets ``network.in_channels`` / ``out_channels`` to 2 and controlled by
the configuration key ``"reconstruction": {"random_phase": "auto" | true | false}`` ("auto": on
exactly when the network has twice the stored channels). See ``documentation/reconstruction.md``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from nndiff.errors import PlansError
from nndiff.tasks.generation import GRID_SAMPLES, GRID_SAMPLING_STEPS, GRID_SEED_OFFSET, GenerationTrainer, sample_images
from nndiff.training import register_trainer, save_image_grid
from nndiff.training.rng import torch_generator

logger = logging.getLogger(__name__)

#: Configuration key of the family's training options.
CONFIG_KEY = "reconstruction"
#: Random phase: polynomial order of the smooth phase and its maximal amplitude (radians).
PHASE_ORDER = 2
PHASE_AMPLITUDE = math.pi


def smooth_random_phase(shape: Sequence[int], generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu", order: int = PHASE_ORDER,
                        amplitude: float = PHASE_AMPLITUDE) -> torch.Tensor:
    """One smooth random phase map per sample, ``(B, 1, H, W)`` in radians.

    phi(y, x) = c0 + sum_{1 <= i + j <= order} c_ij y^i x^j on [-1, 1]^2 with c ~ U(-a, a) scaled by
    1 / (i + j + 1): a constant offset plus low-order polynomial variation, like the slowly varying
    B0 / receive phase of real MR images (a low-order random polynomial, never high frequencies).
    """
    batch, height, width = int(shape[0]), int(shape[-2]), int(shape[-1])
    yy = torch.linspace(-1.0, 1.0, height, device=device)[:, None].expand(height, width)
    xx = torch.linspace(-1.0, 1.0, width, device=device)[None, :].expand(height, width)
    terms = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
    coeffs = (torch.rand(batch, len(terms), generator=generator, device=generator.device if generator else "cpu")
              .to(device) * 2 - 1) * amplitude
    phase = torch.zeros(batch, height, width, device=device)
    for k, (i, j) in enumerate(terms):
        phase = phase + coeffs[:, k, None, None] / (i + j + 1) * yy ** i * xx ** j
    return phase[:, None]


def apply_phase(magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Real ``(B, C, H, W)`` images times e^{i phase} as ``(B, 2C, H, W)`` (re_0, im_0, re_1, ...)."""
    real, imag = magnitude * torch.cos(phase), magnitude * torch.sin(phase)
    return torch.stack([real, imag], dim=2).reshape(magnitude.shape[0], 2 * magnitude.shape[1], *magnitude.shape[2:])


def random_phase_enabled(configuration: Mapping[str, Any], stored_channels: int) -> bool:
    """Whether training multiplies the images by a random phase (see the module docstring).

    Refuses an explicit ``true`` when the network does not have 2 x the stored channels, and any
    channel count that is neither the stored count nor twice it."""
    network = configuration.get("network", {})
    in_channels = int(network.get("in_channels", stored_channels))
    setting = (configuration.get(CONFIG_KEY) or {}).get("random_phase", "auto")
    if setting not in ("auto", True, False):
        raise PlansError(f"configuration key '{CONFIG_KEY}.random_phase' must be \"auto\", true or false, got "
                         f"{setting!r}. Fix: correct the configuration in nnDiffPlans.json")
    doubled = in_channels == 2 * stored_channels
    if in_channels != stored_channels and not doubled:
        raise PlansError(f"the network has in_channels {in_channels} but the preprocessed images have {stored_channels} "
                         f"channel(s): reconstruction needs {stored_channels} (as stored) or {2 * stored_channels} "
                         "(magnitude + random phase). Fix: re-run planning or correct network.in_channels")
    if setting is True and not doubled:
        raise PlansError(f"'{CONFIG_KEY}.random_phase' is true but the network has in_channels {in_channels} for "
                         f"{stored_channels} stored channel(s); the phased images need {2 * stored_channels}. Fix: "
                         f"set network.in_channels and out_channels to {2 * stored_channels} in the configuration")
    return doubled if setting == "auto" else bool(setting)


@register_trainer
class ReconstructionTrainer(GenerationTrainer):
    """Unconditional diffusion prior on fully sampled images for reconstruction (see module docstring).

    Differences from :class:`GenerationTrainer`: optional smooth random phase on magnitude images
    (training draws from the global stream, validation from the per-case generators so the
    validation loss stays comparable), and a sample grid of magnitudes for complex priors.
    """

    def initialize(self) -> None:
        if self.initialized:
            return
        super().initialize()
        self.stored_channels = int(self.store[self.train_cases[0]].data.shape[0])
        self.random_phase = random_phase_enabled(self.configuration, self.stored_channels)
        if self.random_phase:
            self.log("training on magnitude images with a smooth random phase (real, imaginary channels)")

    def phased(self, data: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
        """``data`` with a random phase (2 x channels) when enabled, else unchanged."""
        if not getattr(self, "random_phase", False):
            return data
        if generators is None:
            phase = smooth_random_phase(data.shape, None, data.device)
        else:
            phase = torch.cat([smooth_random_phase((1, *data.shape[1:]), g, data.device) for g in generators])
        return apply_phase(data, phase.to(data.dtype))

    def compute_loss(self, network: nn.Module, batch: Mapping[str, Any], *, train: bool,
                     generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The generation loss on the (optionally phased) fully sampled images."""
        batch = {**batch, "data": self.phased(batch["data"], generators)}
        return super().compute_loss(network, batch, train=train, generators=generators)

    def write_sample_grid(self, epoch: int) -> torch.Tensor:
        """Samples from the prior (EMA weights, few steps); complex priors shown as magnitudes."""
        num = GRID_SAMPLES.get(self.spec.spatial_dims, 4)
        generator = torch_generator(self.seed + GRID_SEED_OFFSET, self.device)
        steps = min(GRID_SAMPLING_STEPS, self.diffusion.num_sampling_steps)
        images = sample_images(self.validation_network, self.configuration, num, generator=generator,
                               device=self.device, num_steps=steps, autocast_dtype=self.autocast_dtype)
        shown = images
        if images.shape[1] % 2 == 0 and images.shape[1] >= 2:
            shown = torch.sqrt(images[:, 0::2] ** 2 + images[:, 1::2] ** 2)[:, :1] * 2 - 1  # |x| in [0, 1] -> [-1, 1]
        elif images.shape[1] not in (1, 3):
            shown = images[:, :1]
        path = self.output_dir / f"samples_epoch_{epoch:04d}.png"
        save_image_grid(shown, path, value_range=(-1.0, 1.0))
        self.log(f"wrote {path.name} ({num} prior samples, {steps} {self.diffusion.sampler.value} steps)")
        return images

    def checkpoint_extra_state(self) -> dict[str, Any]:
        """The generation extras plus whether the prior is phased (the predictor checks it)."""
        state = super().checkpoint_extra_state()
        state["random_phase"] = bool(getattr(self, "random_phase", False))
        return state
