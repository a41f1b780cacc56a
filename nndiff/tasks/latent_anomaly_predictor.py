"""Latent anomaly detection predictor: AnoDDPM in the latent space of a
:class:`~nndiff.tasks.anomaly.LatentAnomalyDDPMTrainer` model's autoencoder, with masked resampling.

Per image: z0 = scaled posterior mean of the input; pass 1 noises z0 to t_λ and denoises it; pass 2
redraws only the latent voxels that pass 1 moved most (:func:`resample_mask`) with the others held
at z0; the map compares the decoded result with decode(z0). Maps, masks, thresholds, outputs and
the command line are those of :class:`~nndiff.tasks.anomaly_predictor.AnomalyPredictor`. See
``documentation/anomaly_detection.md`` (section *Latent configurations*).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nndiff.diffusion.config import build_sampler
from nndiff.diffusion.samplers import sample
from nndiff.errors import NnDiffError
from nndiff.inference.predictor import PreparedCase
from nndiff.inference.registry import register_predictor
from nndiff.tasks.anomaly import anomaly_settings
from nndiff.tasks.anomaly_predictor import AnomalyPredictor, anomaly_map, case_score
from nndiff.tasks.latent import pad_to_factors
from nndiff.tasks.latent_predictor import LatentCodec
from nndiff.tasks.translation_predictor import pad_to_patch


def resample_mask(z0: torch.Tensor, z1: torch.Tensor, quantile: float) -> torch.Tensor:
    """Latent voxels to resample ``(B, 1, *spatial)`` (bool): where the first pass moved the latent
    most — channel-mean |z1 − z0| at or above its ``quantile`` per item — dilated by one voxel, so
    the resampled region has a margin of context. ``quantile`` >= 1: nothing."""
    if quantile >= 1:
        return torch.zeros_like(z0[:, :1], dtype=torch.bool)
    residual = (z1.float() - z0.float()).abs().mean(dim=1, keepdim=True)
    cut = torch.quantile(residual.flatten(1), quantile, dim=1).reshape(-1, *([1] * (residual.ndim - 1)))
    mask = (residual >= cut).float()
    pool = F.max_pool3d if mask.ndim == 5 else F.max_pool2d
    return pool(mask, kernel_size=3, stride=1, padding=1) > 0


@register_predictor(trainers=("LatentAnomalyDDPMTrainer",))
class LatentAnomalyPredictor(LatentCodec, AnomalyPredictor):
    """AnoDDPM in the latent space of the fold's autoencoder, with masked resampling.

    Per image: z0 = scaled posterior mean of the input; pass 1 noises z0 to t_λ (Gaussian noise, the
    plan's sampler) and denoises it to z1; pass 2 resamples, from t_λ again, only the latent voxels
    where z1 moved most (:func:`resample_mask`, the plan's ``anomaly.latent_resample_quantile``),
    holding the others at z0 (their x0 prediction is replaced by z0 at every step), so healthy
    tissue is not redrawn and what looked anomalous is replaced by healthy content. The map compares
    the decoded result with the autoencoder's reconstruction of the input, decode(z0), not with the
    input: the autoencoder's own reconstruction error would otherwise be in every map.
    """

    pixel_predictor = "AnomalyPredictor"

    def __init__(self, *args: Any, resample_quantile: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.init_latent()
        if self.strategy != "anoddpm":
            raise NnDiffError(f"strategy {self.strategy!r} is not available in latent space: latent anomaly detection "
                              "runs anoddpm (partial diffusion of the latent). Fix: use --anomaly_strategy anoddpm, "
                              "or a pixel configuration (2d / 3d_fullres) for wolleb and cdpm")
        quantile = (resample_quantile if resample_quantile is not None
                    else anomaly_settings(self.configuration)["latent_resample_quantile"])
        if not 0 < float(quantile) <= 1:
            raise NnDiffError(f"resample_quantile must be in (0, 1] (1 = no resampling pass), got {quantile!r}")
        self.resample_quantile = float(quantile)

    def _latent_pad_values(self, z: torch.Tensor) -> torch.Tensor:
        # Per-channel minimum: the value training pads small latents with.
        return z.transpose(0, 1).reshape(z.shape[1], -1).amin(dim=1)

    def reconstruct_latents(self, z0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pass 1 and (unless the quantile is 1) pass 2 on latents ``(B, C_lat, *latent)``."""
        patch = [int(p) for p in self.configuration["patch_size"]]
        padded, crop = pad_to_patch(z0, patch, self._latent_pad_values(z0))
        model = self.model_fn() if list(padded.shape[2:]) == patch else self.windowed_model_fn()
        z1 = self.reconstruct_batch(padded, generator, model)
        mask = resample_mask(padded, z1, self.resample_quantile)
        if mask.any():
            sampler = build_sampler(self.diffusion, self.sampler_name, None, process=self.process)
            held = padded

            def hold_healthy(x0: torch.Tensor, t: float) -> torch.Tensor:
                return torch.where(mask, x0, held.to(x0.dtype))

            z1 = sample(sampler, model, sdedit=(self.start_time(), padded), cond=None,
                        num_steps=self.start_steps(sampler.num_steps), consistency=hold_healthy,
                        generator=generator).sample.float()
        return z1[crop]

    def _reconstruction_pair(self, images: torch.Tensor, pad_values: torch.Tensor,
                             generator: torch.Generator) -> torch.Tensor:
        """``(B, 2C, *spatial)``: the healthy reconstruction, then decode(encode(input))."""
        fold = self._decoding_fold()
        crop = (slice(None), slice(None), *[slice(0, int(n)) for n in images.shape[2:]])
        z0 = self.encode(pad_to_factors(images, self.factors, pad_values), fold)
        healthy = self.decode(self.reconstruct_latents(z0, generator), fold)[crop]
        reference = self.decode(z0, fold)[crop]
        return torch.cat([healthy.float(), reference.float()], dim=1)

    def predict_case(self, data: torch.Tensor, case: PreparedCase, generator: torch.Generator) -> torch.Tensor:
        """Healthy reconstruction and autoencoder reconstruction stacked on the channel axis
        ``(2C, Z, Y, X)``; 2D configurations: slices in batches."""
        pad_values = data.reshape(data.shape[0], -1).amin(dim=1)
        if self.is_2d:
            return self.map_slices(lambda s: self._reconstruction_pair(s, pad_values, generator), data)
        return self._reconstruction_pair(data[None], pad_values, generator)[0]

    def case_outputs(self, case: PreparedCase, seed: int) -> dict[str, Any]:
        """As :meth:`AnomalyPredictor.case_outputs`, with decode(z0) in place of the input."""
        samples = self._run_case(case, seed, self.num_reconstructions)
        if self.num_reconstructions == 1:
            samples = samples[None]
        channels = case.data.shape[0]
        arrays = samples.float().cpu().numpy()
        reference, properties = self.invert(arrays[:, channels:].mean(axis=0), case.case_json)
        recons = np.stack([self.invert(s[:channels], case.case_json)[0] for s in arrays])
        amap = anomaly_map(torch.from_numpy(reference).double(), torch.from_numpy(recons).double(),
                           self.smoothing_sigmas()).float().numpy()
        return {"map": amap, "reconstruction": recons.mean(axis=0).astype(np.float32), "properties": properties,
                "score": case_score(amap, self.top_fraction)}

    def map_settings(self) -> dict[str, Any]:
        return {**super().map_settings(), "resample_quantile": self.resample_quantile}

    def _write_info(self, output_dir: Path, seed: int, extra: dict[str, Any]) -> None:
        super()._write_info(output_dir, seed, {**extra, "latent": True, "resample_quantile": self.resample_quantile,
                                               "map_reference": "autoencoder reconstruction of the input"})
