"""What every diffusion trainer reads from its configuration's ``diffusion`` block: the validated
config, the process, the noise generator and (with ``importance_sampling``) the loss-aware time
sampler, plus the training/validation time draw and the sampler's checkpoint state.

A mixin for :class:`nndiff.training.Trainer` subclasses (generation, translation, segmentation);
non-diffusion trainers (classifier, autoencoder, deterministic baseline) do not use it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from nndiff.diffusion.config import DiffusionConfig, build_noise, build_process
from nndiff.diffusion.losses import ImportanceTimeSampler, diffusion_loss
from nndiff.errors import PlansError
from nndiff.training.trainer import per_sample


class DiffusionPartsMixin:
    """``setup_diffusion()`` in ``__init__``; ``draw_t`` in ``compute_loss``; ``time_sampler_extra``
    / ``load_time_sampler_extra`` in the checkpoint extras."""

    configuration: dict[str, Any]
    configuration_name: str
    device: torch.device

    def setup_diffusion(self, *blocks: str) -> None:
        """Build the diffusion parts; ``blocks``: the configuration keys the trainer needs (the
        ``diffusion`` block always)."""
        missing = [key for key in ("diffusion", *blocks) if key not in self.configuration]
        if missing:
            raise PlansError(f"configuration {self.configuration_name!r} has no {' or '.join(repr(k) for k in missing)} "
                             "block. Fix: re-run planning")
        self.diffusion = DiffusionConfig.from_dict(self.configuration["diffusion"])
        self.process = build_process(self.diffusion)
        self.noise_fn = build_noise(self.diffusion)
        self.time_sampler = ImportanceTimeSampler(self.process) if self.diffusion.importance_sampling else None

    def draw_t(self, batch_size: int, generators: Sequence[torch.Generator] | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training (no generators): uniform or importance-sampled t from the global RNG, with the
        importance weights; validation: uniform t per sample from its own generator."""
        if generators is None and self.time_sampler is not None:
            return self.time_sampler.sample(batch_size, device=self.device)
        return per_sample(lambda n, g: self.process.sample_t(n, g, device=self.device), generators, batch_size), None

    def weighted_diffusion_loss(self, x0: torch.Tensor, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                                *, train: bool, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
        """Mean weighted diffusion loss of one batch: draw t and the plan's noise (per sample from
        ``generators`` in validation), ``out = forward(x_t, model_time)``, the plan's
        parameterization / weighting, importance weights; in training the sampler is updated with
        the unweighted per-sample losses (its own weights would otherwise feed back)."""
        n = x0.shape[0]
        t, weights = self.draw_t(n, generators)
        noise = per_sample(lambda k, g: self.noise_fn((k, *x0.shape[1:]), generator=g, device=x0.device,
                                                      dtype=x0.dtype), generators, n)
        out = forward(self.process.add_noise(x0, noise, t), self.process.model_time(t))
        losses = diffusion_loss(out.float(), x0.float(), noise.float(), t, self.process,
                                self.diffusion.parameterization, self.diffusion.loss_weighting,
                                min_snr_gamma=self.diffusion.min_snr_gamma, sample_weights=weights, reduction="none")
        if train and self.time_sampler is not None:
            self.time_sampler.update(t, losses.detach() / weights.to(losses.dtype))
        return losses.mean()

    def time_sampler_extra(self) -> dict[str, Any]:
        """``{"time_sampler": state}`` for checkpoint extras (empty without importance sampling)."""
        return {} if self.time_sampler is None else {"time_sampler": self.time_sampler.state_dict()}

    def load_time_sampler_extra(self, state: Mapping[str, Any]) -> None:
        sampler_state = state.get("time_sampler")
        if self.time_sampler is not None and sampler_state is not None:
            self.time_sampler.load_state_dict(sampler_state)
