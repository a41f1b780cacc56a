"""Translation family predictor: sample the target of each input case from a trained
:class:`~nndiff.tasks.translation.TranslationTrainer` model.

Per case the target is sampled with the plan's sampler and step count (or ``--sampler`` /
``--num_steps``), conditioned on the case's preprocessed images. An image that fits the planned
patch is sampled whole (padded to the patch with each channel's minimum, as training pads, and
cropped back); a larger one is sampled with the denoiser applied in Gaussian-blended windows at
every step (:func:`nndiff.inference.sliding_window.sliding_window_model`), so there are no seams.
2D configurations sample the slices of a volume in batches. ``--num_samples K`` gives the
Monte-Carlo mean (prediction) and standard deviation (``{CASE}_std``) through the base class.
Outputs are targets in original units (HU for CT) on the input's grid and geometry.

With ``"allow_missing_channels": true`` in dataset.json an input case may lack channel files: they
are zero-filled and flagged in the availability mask (see :mod:`nndiff.tasks.translation`).
See ``documentation/translation.md``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nndiff.errors import DatasetError, NnDiffError, PlansError
from nndiff.inference.files import InputCase
from nndiff.inference.predictor import PreparedCase, Predictor
from nndiff.inference.registry import register_predictor
from nndiff.tasks.translation import (
    ALLOW_MISSING_KEY,
    MISSING_CHANNELS_KEY,
    ConditionLayout,
    availability,
    condition_image,
    condition_layout,
    sample_translation,
)

logger = logging.getLogger(__name__)


def pad_to_patch(images: torch.Tensor, patch_size: Sequence[int],
                 values: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad ``images`` ``(B, C, *spatial)`` (centred) so every axis is at least the patch, with
    ``values`` ``(C,)`` per channel (training pads small images the same way); returns the padded
    tensor and the index that crops an output back."""
    pads: list[int] = []
    crop: list[slice] = [slice(None), slice(None)]
    for size, patch in zip(images.shape[2:], patch_size):
        extra = max(int(patch) - size, 0)
        crop.append(slice(extra // 2, extra // 2 + size))
    for size, patch in zip(reversed(images.shape[2:]), reversed(list(patch_size))):
        extra = max(int(patch) - size, 0)
        pads += [extra // 2, extra - extra // 2]
    if not any(pads):
        return images, tuple(crop)
    # Pad with 0 after subtracting the channel value, then add it back: a per-channel constant pad.
    shift = values.to(images.dtype).reshape(1, -1, *([1] * (images.ndim - 2)))
    return F.pad(images - shift, pads) + shift, tuple(crop)


def find_cases_allowing_missing(folder: str | Path, file_ending: str, num_channels: int) -> list[InputCase]:
    """Cases of ``folder`` (``{CASE}_{XXXX}{ending}``) that have at least one channel file; a
    missing channel is ``None`` in :attr:`InputCase.files`. Naming problems are one DatasetError."""
    from nndiff.dataset.discovery import scan_channel_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError([(folder, "input folder does not exist", "pass an existing folder with -i")])
    found, problems = scan_channel_folder(folder, file_ending, num_channels, "channel")
    if not found and not problems:
        problems.append((str(folder), f"holds no {{CASE}}_{{XXXX}}{file_ending} files",
                         f"put the input images there, named like case_0000{file_ending}"))
    if problems:
        raise DatasetError([tuple(p) for p in problems])  # type: ignore[misc]
    return [InputCase(identifier, [channels.get(c) for c in range(num_channels)])  # type: ignore[misc]
            for identifier, channels in sorted(found.items())]


def read_with_missing(files: Sequence[Path | None]) -> tuple[np.ndarray, Any, list[int]]:
    """Read the present channel files; a missing channel gets a copy of the first present one (so
    cropping and per-image normalisation behave) and is listed, to be zero-filled and masked."""
    from nndiff.dataset.io import read_images

    present = [i for i, f in enumerate(files) if f is not None]
    if not present:
        raise NnDiffError("a case needs at least one channel file")
    arrays, properties = read_images([files[i] for i in present])
    full = np.empty((len(files), *arrays.shape[1:]), dtype=arrays.dtype)
    for channel in range(len(files)):
        full[channel] = arrays[present.index(channel)] if channel in present else arrays[0]
    properties.num_channels = len(files)
    return full, properties, [i for i in range(len(files)) if i not in present]


@register_predictor(trainers=("TranslationTrainer",))
class TranslationPredictor(Predictor):
    """Samples targets for input cases from a :class:`~nndiff.tasks.translation.TranslationTrainer` model.

    ``predict_from_folder(input_dir, output_dir, seed, num_mc_samples)`` writes ``{CASE}{ending}``
    (one target channel; ``{CASE}_{XXXX}`` for several) and, for K > 1, ``{CASE}_std{ending}``.
    """

    output_kind = "target"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layout: ConditionLayout = condition_layout(self.configuration["network"], self.num_input_channels)
        self.allow_missing = bool(self.dataset_json.get(ALLOW_MISSING_KEY, False))
        self._check_checkpoint_layout()

    def _check_checkpoint_layout(self) -> None:
        """The layout each fold was trained with (stored by the trainer) must be the plan's."""
        for fold, state in enumerate(self.checkpoint_states):
            stored = (state.get("extra") or {}).get("condition_layout")
            if stored and (int(stored["num_images"]), bool(stored["with_mask"])) != (
                    self.layout.num_images, self.layout.with_mask):
                raise PlansError(f"fold #{fold} was trained with conditioning {stored} but the plans and dataset.json "
                                 f"give {self.layout}. Fix: use the plans and dataset.json the model was trained with")

    # ---- sampling ---------------------------------------------------------------------------
    def sample_batch(self, images: torch.Tensor, available: torch.Tensor, pad_values: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
        """Targets ``(B, C_t, *spatial)`` for source images ``(B, C, *spatial)`` (normalised units):
        whole-patch sampling when the image fits the patch, per-step sliding windows otherwise."""
        patch = [int(p) for p in self.configuration["patch_size"]]
        padded, crop = pad_to_patch(images, patch, pad_values)
        cond = condition_image(padded, available, self.layout)
        fits = list(padded.shape[2:]) == patch
        model = self.model_fn() if fits else self.windowed_model_fn()
        out = sample_translation(model, self.configuration, cond, generator=generator,
                                 sampler=self.sampler_name, num_steps=self.num_steps)
        return out[crop]

    def predict_case(self, data: torch.Tensor, case: PreparedCase, generator: torch.Generator) -> torch.Tensor:
        """One target sample ``(C_t, Z, Y, X)`` for the case's images ``(C, Z, Y, X)``."""
        return self.sample_copies(data, case, generator, 1)[0]

    def predict_case_samples(self, data: torch.Tensor, case: PreparedCase, generator: torch.Generator,
                             num_samples: int) -> torch.Tensor:
        """``num_samples`` targets ``(K, C_t, Z, Y, X)``, drawn together (:meth:`sample_copies`) unless a
        subclass samples differently (:meth:`batches_samples` false: one :meth:`predict_case` per sample)."""
        if not self.batches_samples():
            return super().predict_case_samples(data, case, generator, num_samples)
        return self.sample_copies(data, case, generator, num_samples)

    def batches_samples(self) -> bool:
        """Whether K samples may share sampler runs: true while :meth:`predict_case` is this class's
        conditional sampling; a subclass with its own ``predict_case`` (e.g. a warm start) keeps the
        per-sample loop unless it overrides this."""
        return type(self).predict_case is TranslationPredictor.predict_case

    def sample_copies(self, data: torch.Tensor, case: PreparedCase, generator: torch.Generator,
                      num_samples: int) -> torch.Tensor:
        """``num_samples`` targets ``(K, C_t, Z, Y, X)`` for the case's images ``(C, Z, Y, X)``.

        The K copies of the case (2D: of each slice) are the batch items of the sampler, at most
        ``batch_size`` per run, so a step costs ceil(K * Z / batch_size) network calls (2D; 3D:
        ceil(K / batch_size)), times the sliding windows, instead of K times as many calls with K
        sequential samples (the GPU run's slow translation: one slice per case, K = 4 .. 8).
        K = 1 is exactly the former per-slice batching.
        """
        missing = [int(c) for c in case.case_json.get(MISSING_CHANNELS_KEY) or []]
        available = availability([missing], self.layout.num_images, self.device)
        pad_values = data.reshape(data.shape[0], -1).amin(dim=1)  # the whole case's minima, as training
        items = data.permute(1, 0, 2, 3) if self.is_2d else data[None]  # (Z, C, Y, X) slices or (1, C, ...)
        copies = items.repeat(num_samples, *([1] * (items.ndim - 1)))  # sample-major: copy k of item i at k*n + i
        outputs = [self.sample_batch(chunk, available.expand(chunk.shape[0], -1), pad_values, generator)
                   for chunk in copies.split(max(1, self.batch_size))]
        samples = torch.cat(outputs).reshape(num_samples, items.shape[0], *outputs[0].shape[1:])
        return samples.permute(0, 2, 1, 3, 4) if self.is_2d else samples[:, 0]

    # ---- missing channels -------------------------------------------------------------------
    def prepare_with_missing(self, images: np.ndarray, properties: Any, identifier: str,
                             missing: Sequence[int]) -> PreparedCase:
        """Preprocess a case and record its missing channels (refused unless dataset.json allows them)."""
        missing = sorted(int(c) for c in missing)
        if missing and not self.allow_missing:
            raise NnDiffError(f"case {identifier} lacks channel(s) {missing} but the model's dataset.json does not set "
                              f"\"{ALLOW_MISSING_KEY}\": true. Fix: give every channel of channel_names")
        if len(missing) >= self.layout.num_images:
            raise NnDiffError(f"case {identifier}: every channel is missing. Fix: give at least one channel")
        return self.prepare_case(images, properties, identifier, missing_channels=missing)

    def predict_arrays(self, images: np.ndarray, properties: Any, identifier: str = "case", seed: int = 0,
                       missing_channels: Sequence[int] = ()) -> tuple[np.ndarray, Any]:
        """One in-memory case (``missing_channels``: indices whose content is to be ignored)."""
        case = self.prepare_with_missing(images, properties, identifier, missing_channels)
        output = self._run_case(case, seed, 1)
        return self.invert(output.float().cpu().numpy(), case.case_json)

    def predict_from_folder(self, input_dir: str | Path, output_dir: str | Path, seed: int = 0,
                            num_mc_samples: int = 1) -> list[Path]:
        """The base's folder prediction; with ``allow_missing_channels`` cases may lack channel files."""
        if not self.allow_missing:
            return super().predict_from_folder(input_dir, output_dir, seed, num_mc_samples)
        output_dir = Path(output_dir)
        cases = find_cases_allowing_missing(input_dir, self.file_ending, self.num_input_channels)
        written: list[Path] = []
        incomplete: dict[str, list[int]] = {}
        for item in cases:
            images, properties, missing = read_with_missing(item.files)
            case = self.prepare_with_missing(images, properties, item.identifier, missing)
            if missing:
                incomplete[item.identifier] = missing
            output = self._run_case(case, seed, num_mc_samples)
            written += self.write_case_output(output, case, output_dir, item.identifier, num_mc_samples)
            logger.info("predicted %s%s", item.identifier, f" (missing channels {missing})" if missing else "")
        self._write_info(output_dir, seed, {"mode": "predict", "input_dir": str(input_dir), "num_cases": len(cases),
                                            "num_mc_samples": num_mc_samples, "missing_channels": incomplete})
        return written
