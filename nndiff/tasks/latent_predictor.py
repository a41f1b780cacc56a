"""Latent generation predictor: samples of a :class:`~nndiff.tasks.latent.LatentDiffusionTrainer` model.

Latents are drawn exactly as :class:`~nndiff.tasks.generation_predictor.GenerationPredictor` draws
images (planned sampler, fold ensemble, conditions, classifier-free guidance), then divided by the
fold's ``latent_scale_factor`` and decoded by that fold's autoencoder — whole when the output has at
most the plan's ``max_decode_voxels`` voxels, else in overlapping sliding windows
blended in pixel space. The base writer maps the images back to original units with the plan's
geometry. See ``documentation/latent.md`` (section *Prediction*).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from nndiff.errors import NnDiffError
from nndiff.inference.model_folder import parse_model_folder_name
from nndiff.inference.registry import register_predictor
from nndiff.tasks.generation_predictor import GenerationPredictor
from nndiff.tasks.latent import (
    AutoencoderRecord,
    autoencoder_fold_dir,
    check_autoencoder_hash,
    check_latent_supported,
    decode_latents,
    decode_limit,
    encode_volume,
    is_latent_configuration,
    latent_window,
    load_autoencoder,
    read_autoencoder_record,
)

logger = logging.getLogger(__name__)


class LatentCodec:
    """Mixin of the latent predictors: each loaded fold's autoencoder, hash-checked against the
    diffusion checkpoint, and encoding / decoding with it (whole, or in sliding windows above the
    plan's ``max_decode_voxels``). Call :meth:`init_latent` at the end of ``__init__``."""

    #: The family's pixel-space predictor, named in the error for a pixel configuration.
    pixel_predictor = "the family's pixel-space predictor"

    def init_latent(self) -> None:
        self_: Any = self
        check_latent_supported(str(self_.plans.get("task", "")), self_.configuration_name)
        if not is_latent_configuration(self_.configuration):
            raise NnDiffError(f"configuration {self_.configuration_name!r} has no 'autoencoder' block; a latent "
                              f"predictor needs a *_latent configuration. Fix: use {self.pixel_predictor}")
        if len(self_.networks) > 1 and self_.fold_ensemble == "step":
            raise NnDiffError("latent folds cannot be averaged per sampler step: every fold has its own autoencoder "
                              "and latent space. Fix: use --fold_ensemble prediction (sample i from fold i mod F)")
        self.block = dict(self_.configuration["autoencoder"])
        self.factors = [int(f) for f in self.block["downsampling_factors"]]
        self.autoencoders: list[nn.Module] = []
        self.records: list[AutoencoderRecord] = []

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_model_folder(cls, model_dir: str | Path, *args: Any, **kwargs: Any) -> Any:
        """The base loader, then each fold's autoencoder (hash-checked against the checkpoint)."""
        predictor = super().from_model_folder(model_dir, *args, **kwargs)  # type: ignore[misc]
        predictor.attach_autoencoders(Path(model_dir))
        return predictor

    def attach_autoencoders(self, model_dir: Path) -> None:
        """Load ``<dataset results>/AutoencoderTrainer__<Plans>__<config>/fold_N`` for every loaded fold."""
        self_: Any = self
        name = parse_model_folder_name(model_dir)
        self.autoencoders, self.records = [], []
        for position, fold in enumerate(self_.fold_names):
            fold_dir = autoencoder_fold_dir(model_dir.parent, name.plans_name, name.configuration, fold)
            record = read_autoencoder_record(fold_dir)
            if record is None:
                raise NnDiffError(f"no finished autoencoder in {fold_dir} ({fold_dir.name}/autoencoder.json missing), "
                                  f"but {model_dir.name} fold {fold} decodes with it. Fix: restore that folder "
                                  "(export/copy it with the model) or retrain the latent model")
            state = self_.checkpoint_states[position] if position < len(self_.checkpoint_states) else {}
            expected = (state.get("extra") or {}).get("autoencoder", {}).get("weights_hash")
            if not expected:
                raise NnDiffError(f"the checkpoint of {model_dir.name} fold {fold} records no autoencoder. Fix: "
                                  "retrain it with the latent trainer")
            check_autoencoder_hash(str(expected), record, f"{model_dir.name} fold {fold}")
            self.records.append(record)
            self.autoencoders.append(load_autoencoder(record, self_.configuration, self_.device))

    # ---- encoding and decoding -----------------------------------------------------------------
    def _decoding_fold(self) -> int:
        """The fold whose autoencoder decodes this batch: the active one (prediction mode) or the only one."""
        self_: Any = self
        if self_._active_folds is not None:
            return self_._active_folds[0]
        if len(self_.networks) > 1:
            raise NnDiffError("latent samples must be drawn one fold at a time (each fold has its own autoencoder). "
                              "Fix: generate with generate_to_folder and fold_ensemble 'prediction'")
        return 0

    def _codec_context(self):
        self_: Any = self
        return torch.autocast(self_.device.type, dtype=self_.autocast_dtype or torch.float32,
                              enabled=self_.autocast_dtype is not None)

    def _autoencoder(self, fold: int) -> nn.Module:
        if not self.autoencoders:
            raise NnDiffError("no autoencoder loaded. Fix: load the predictor with from_model_folder / from_trained")
        return self.autoencoders[fold]

    def decode(self, latents: torch.Tensor, fold: int) -> torch.Tensor:
        """Images of scaled latents: ``/ latent_scale_factor``, then fold ``fold``'s decoder (sliding
        windows above ``max_decode_voxels`` output voxels)."""
        self_: Any = self
        autoencoder = self._autoencoder(fold)
        z = latents / self.records[fold].scale_factor
        with torch.no_grad(), self._codec_context():
            return decode_latents(autoencoder, z, self.factors, decode_limit(self_.configuration),
                                  latent_window(self.block))

    def encode(self, images: torch.Tensor, fold: int) -> torch.Tensor:
        """Scaled latents (posterior mean × ``latent_scale_factor``, as in the training cache) of
        images ``(N, C, *S)`` whose sizes are multiples of the factors."""
        self_: Any = self
        autoencoder = self._autoencoder(fold)
        with torch.no_grad(), self._codec_context():
            z = encode_volume(autoencoder, images, self.factors, decode_limit(self_.configuration),
                              latent_window(self.block))
        return z.float() * self.records[fold].scale_factor


@register_predictor(trainers=("LatentDiffusionTrainer",))
class LatentGenerationPredictor(LatentCodec, GenerationPredictor):
    """Generation in latent space, decoded per fold with the fold's own autoencoder.

    Load with :meth:`from_model_folder` (or ``from_trained``): besides each fold's diffusion
    network it loads ``AutoencoderTrainer__<Plans>__<config>/fold_N`` beside the model folder and
    refuses an autoencoder whose weights hash differs from the one recorded in the diffusion
    checkpoint. Generation shapes are in pixels on the configuration's grid (``"patch"`` = the
    latent patch × the downsampling factors). Folds never share a sampling trajectory: each has
    its own latent space, so ``fold_ensemble="step"`` with several folds is refused.
    """

    pixel_predictor = "GenerationPredictor"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.init_latent()

    # ---- shapes --------------------------------------------------------------------------------
    def generation_shape(self, shape: str | Sequence[int] = "patch") -> list[int]:
        """Pixel shape of the samples: ``"patch"`` (latent patch × factors), ``"median"`` or sizes."""
        if shape == "patch":
            shape = [int(p) * f for p, f in zip(self.configuration["patch_size"], self.factors)]
        return super().generation_shape(shape)

    def latent_shape(self, shape: Sequence[int]) -> list[int]:
        """Latent shape that decodes to at least ``shape`` pixels."""
        return [int(math.ceil(int(s) / f)) for s, f in zip(shape, self.factors)]

    # ---- sampling ------------------------------------------------------------------------------
    def generate(self, num_samples: int, generator: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
        """``num_samples`` images ``(N, C, *shape)`` in normalised units: latents of the shape that covers
        ``shape``, decoded, cropped to ``shape`` (latents cover whole multiples of the factors)."""
        fold = self._decoding_fold()
        latents = super().generate(num_samples, generator, self.latent_shape(shape))
        images = self.decode(latents, fold)
        return images[(slice(None), slice(None), *[slice(0, int(s)) for s in shape])]
