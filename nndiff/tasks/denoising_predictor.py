"""Denoising family predictor: two strategies for a :class:`~nndiff.tasks.denoising.DenoisingTrainer` model.

``strategy="conditional"`` (default): sample the clean image conditioned on the noisy one, from pure
noise, exactly as translation samples a target (whole patch or per-step sliding windows, 2D slices
batched) — :class:`~nndiff.tasks.translation_predictor.TranslationPredictor` does it.

``strategy="warm_start"`` (R2D2+ / come-closer-diffuse-faster): the noisy image itself is the
start of the reverse process.

1. y = the noisy image in the diffused channels' normalised units (clean-only: the input as
   normalised; paired: mapped from the input's per-image normalization to the targets' through
   original units, which needs as many image as target channels);
2. sigma = :func:`~nndiff.tasks.degradations.estimate_noise_sigma` of y (normalised units; 2D
   configurations: the median over the case's slices, max over channels), or the predictor's
   ``noise_sigma`` when the noise level is known;
3. t0 = :func:`~nndiff.tasks.degradations.matching_timestep` (sigma), x_t0 =
   :func:`~nndiff.tasks.degradations.noisy_image_state` (alpha y topped up to sigma_t0 with fresh
   noise from the case's generator);
4. the planned sampler runs from t0 with the step count scaled by t0's fraction of the time range
   (the same step density as a full run, so fewer steps: "diffuse faster").

The network is conditional. ``warm_start_condition="null"`` (default) runs it with the zero condition,
which training taught it as the unconditional prior (condition dropout, see
:mod:`nndiff.tasks.denoising`), so the warm start is the R2D2+ method: an image prior plus the noisy
start. ``"noisy"`` conditions on the noisy image as well (both sources of information).
Per case the sigma and t0 used are kept in :attr:`DenoisingPredictor.warm_starts` and written to
``prediction_info.json``. See ``documentation/denoising.md``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from nndiff.diffusion.config import DiffusionConfig, build_process, build_sampler
from nndiff.diffusion.samplers import sample
from nndiff.errors import NnDiffError, PlansError
from nndiff.inference.predictor import PreparedCase
from nndiff.inference.registry import register_predictor
from nndiff.preprocessing.case import normalization_entries
from nndiff.tasks.degradations import estimate_noise_sigma, matching_timestep, noisy_image_state
from nndiff.tasks.denoising import affine_normalization
from nndiff.tasks.translation import MISSING_CHANNELS_KEY, availability, condition_image
from nndiff.tasks.translation_predictor import TranslationPredictor, pad_to_patch

logger = logging.getLogger(__name__)

STRATEGIES = ("conditional", "warm_start")
WARM_START_CONDITIONS = ("null", "noisy")


def warm_start_steps(t0: float, t_min: float, t_max: float, planned_steps: int) -> int:
    """Steps from ``t0``: the planned count scaled by t0's fraction of the time range (at least 1)."""
    fraction = (t0 - t_min) / max(t_max - t_min, 1e-12)
    return max(1, math.ceil(planned_steps * min(max(fraction, 0.0), 1.0)))


@register_predictor(trainers=("DenoisingTrainer",))
class DenoisingPredictor(TranslationPredictor):
    """Denoised images for noisy input cases, by conditional sampling or a warm start (module doc).

    Extra keyword arguments: ``strategy`` (``conditional`` | ``warm_start``), ``warm_start_condition``
    (``null`` | ``noisy``), ``noise_sigma`` (known noise std in normalised units; default: estimated).
    Outputs are written like translation's: the clean image (clean-only) or target (paired) in
    original units with the input's geometry; ``num_mc_samples`` K > 1 gives mean and ``_std``.
    """

    def __init__(self, *args: Any, strategy: str = "conditional", warm_start_condition: str = "null",
                 noise_sigma: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.paired = "target_names" in self.dataset_json
        self.output_kind = "target" if self.paired else "data"
        self.strategy = strategy
        self.warm_start_condition = warm_start_condition
        self.noise_sigma = noise_sigma
        self.warm_starts: dict[str, dict[str, float]] = {}

    # ---- options ------------------------------------------------------------------------------
    @property
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        if value not in STRATEGIES:
            raise NnDiffError(f"unknown denoising strategy {value!r}. Fix: use one of {', '.join(STRATEGIES)}")
        self._strategy = value

    @property
    def warm_start_condition(self) -> str:
        return self._warm_start_condition

    @warm_start_condition.setter
    def warm_start_condition(self, value: str) -> None:
        if value not in WARM_START_CONDITIONS:
            raise NnDiffError(f"unknown warm_start_condition {value!r}. Fix: use one of "
                              f"{', '.join(WARM_START_CONDITIONS)}")
        self._warm_start_condition = value

    # ---- the noisy image in the diffused channels' units ----------------------------------------
    def noisy_in_model_units(self, data: torch.Tensor, case: PreparedCase) -> torch.Tensor:
        """``data`` (normalised input images) in the units of the channels the network diffuses."""
        if not self.paired:
            return data
        num_targets = int(self.configuration["network"]["in_channels"])
        if data.shape[0] != num_targets:
            raise PlansError(f"the warm start needs one noisy image channel per target channel; the model has "
                             f"{data.shape[0]} image and {num_targets} target channel(s). Fix: use "
                             "strategy='conditional'")
        records = case.case_json["images"]["normalization"]
        targets = normalization_entries(self.plans, "targets", num_targets)
        rows = []
        for c in range(num_targets):
            source = affine_normalization(records[c], records[c].get("image_values"))
            rows.append(affine_normalization(targets[c]).to_model(source.to_original(data[c])))
        return torch.stack(rows)

    def estimate_sigma(self, noisy: torch.Tensor) -> float:
        """Noise std of a case ``(C, Z, Y, X)`` in normalised units (2D: median over slices)."""
        if self.noise_sigma is not None:
            return float(self.noise_sigma)
        if self.is_2d:
            per_slice = estimate_noise_sigma(noisy.permute(1, 0, 2, 3).float(), spatial_dims=2)  # (Z, C)
            return float(per_slice.median(dim=0).values.max())
        return float(estimate_noise_sigma(noisy[None].float(), spatial_dims=3).max())

    # ---- sampling ------------------------------------------------------------------------------
    def warm_start_batch(self, images: torch.Tensor, noisy: torch.Tensor, sigma: float, available: torch.Tensor,
                         pad_values: torch.Tensor, noisy_pad: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Reverse process from t0 = matching_timestep(sigma) for a batch ``(B, C, *spatial)``."""
        patch = [int(p) for p in self.configuration["patch_size"]]
        padded_images, crop = pad_to_patch(images, patch, pad_values)
        padded_noisy, _ = pad_to_patch(noisy, patch, noisy_pad)
        cond = condition_image(padded_images, available, self.layout)
        if self.warm_start_condition == "null":
            cond = torch.zeros_like(cond)
        diffusion = DiffusionConfig.from_dict(self.configuration.get("diffusion", {}))
        process = build_process(diffusion)
        sampler = build_sampler(diffusion, self.sampler_name, self.num_steps, process=process)
        t0 = matching_timestep(sigma, process)
        t0, x_t0 = noisy_image_state(process, padded_noisy.float(), sigma, t0=t0, noise=generator)
        steps = warm_start_steps(t0, process.t_min, process.t_max, sampler.num_steps)
        fits = list(padded_images.shape[2:]) == patch
        model = self.model_fn() if fits else self.windowed_model_fn()
        out = sample(sampler, model, cond={"cond_image": cond}, start_at=(t0, x_t0), num_steps=steps,
                     generator=generator, device=images.device)
        return out.sample.float()[crop]

    def batches_samples(self) -> bool:
        """K samples share sampler runs in the conditional strategy (it is the translation sampler);
        the warm start keeps one run per sample (its start depends on the case's noise estimate)."""
        return self.strategy == "conditional"

    def predict_case(self, data: torch.Tensor, case: PreparedCase, generator: torch.Generator) -> torch.Tensor:
        """One sample ``(C_out, Z, Y, X)``: conditional sampling or the warm start (module doc)."""
        if self.strategy == "conditional":
            return super().predict_case(data, case, generator)
        missing = [int(c) for c in case.case_json.get(MISSING_CHANNELS_KEY) or []]
        available = availability([missing], self.layout.num_images, self.device)
        pad_values = data.reshape(data.shape[0], -1).amin(dim=1)
        noisy = self.noisy_in_model_units(data, case)
        noisy_pad = noisy.reshape(noisy.shape[0], -1).amin(dim=1)
        sigma = self.estimate_sigma(noisy)
        process = build_process(DiffusionConfig.from_dict(self.configuration.get("diffusion", {})))
        self.warm_starts[case.identifier] = {"sigma": sigma, "t0": float(matching_timestep(sigma, process))}
        if self.is_2d:
            slices = noisy.permute(1, 0, 2, 3)
            index = iter(range(0, slices.shape[0], self.batch_size))

            def run(images: torch.Tensor) -> torch.Tensor:
                start = next(index)
                part = slices[start:start + images.shape[0]]
                return self.warm_start_batch(images, part, sigma, available.expand(images.shape[0], -1),
                                             pad_values, noisy_pad, generator)

            return self.map_slices(run, data)
        return self.warm_start_batch(data[None], noisy[None], sigma, available, pad_values, noisy_pad, generator)[0]

    def _write_info(self, output_dir: Path, seed: int, extra: dict[str, Any]) -> None:
        """The base's prediction_info.json plus the strategy and, for warm starts, sigma and t0 per case."""
        extra = {**extra, "strategy": self.strategy, "paired": self.paired}
        if self.strategy == "warm_start":
            extra.update({"warm_start_condition": self.warm_start_condition, "warm_starts": self.warm_starts})
        super()._write_info(output_dir, seed, extra)
