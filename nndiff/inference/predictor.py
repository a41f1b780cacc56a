"""Predictor base: load a model folder, read and preprocess input cases, run the family's hook with
a seeded generator per case, map outputs back to the original grid and units, write them atomically.

Families subclass :class:`Predictor` and override :meth:`Predictor.predict_case` (conditional
families: translation, denoising, ...) and/or :meth:`Predictor.generate` (unconditional
generation). Everything else — files, preprocessing, seeding, batching of 2D slices and samples,
inverse mapping, geometry, Monte-Carlo mean/std — is here. See documentation/inference.md.
"""
from __future__ import annotations

import logging
import time
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from nndiff.errors import NnDiffError
from nndiff.inference.files import (
    STD_SUFFIX,
    find_input_cases,
    monte_carlo_summary,
    write_output,
)
from nndiff.inference.model_folder import (
    checked_weights,
    fold_dirs,
    load_network,
    locate_plans_and_dataset_json,
    model_folder_path,
    parse_model_folder_name,
)
from nndiff.paths import Paths
from nndiff.planning import resolve_configuration
from nndiff.training.devices import resolve_device, synchronize
from nndiff.utils.files import load_json, save_json

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "checkpoint_final.pth"
#: Written into every output folder: which model, folds, checkpoint and seed made the files.
PREDICTION_INFO = "prediction_info.json"
#: What an output is, for the inverse mapping (``invert_case``'s ``kind``).
OUTPUT_KINDS = ("data", "target", "seg")
#: Checkpoint entries a predictor does not keep (weights are in the networks; the rest is resume state).
HEAVY_CHECKPOINT_KEYS = ("network_weights", "ema_weights", "optimizer_state", "grad_scaler_state",
                         "rng_state", "epoch_accumulator")
#: Generated samples are named ``sample_0000`` ...
SAMPLE_PREFIX = "sample"
#: How the networks of several folds are combined: ``prediction`` (each fold samples on its own, the
#: outputs are averaged; generation draws sample i from fold i mod F) or ``step`` (the folds' network
#: outputs are averaged at every sampler step, one trajectory). See documentation/inference.md.
FOLD_ENSEMBLE_MODES = ("prediction", "step")


@dataclass
class PreparedCase:
    """An input case after preprocessing: ``data`` ``(C, Z, Y, X)`` float32 on the configuration's
    grid (a 2D configuration keeps all slices), and the case JSON the inverse needs."""

    identifier: str
    data: np.ndarray
    case_json: dict


def inference_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of network calls: CPU always float32 (None); CUDA ``auto`` uses bfloat16
    where supported (its range equals float32's, so no overflow), else float32; ``bf16`` /
    ``fp16`` force a dtype on CUDA, ``fp32`` turns autocast off."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise NnDiffError(f"unknown precision {precision!r}. Fix: use auto, fp32, bf16 or fp16")
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def seed_for(seed: int, identifier: str) -> int:
    """The generator seed of one case or sample: a function of ``(seed, identifier)`` only, so a
    case gets the same noise whatever else is in the input folder and in whatever order."""
    return (int(seed) * 1_000_003 + zlib.crc32(identifier.encode("utf-8"))) % (2 ** 63 - 1)


class Predictor:
    """Base of every family predictor.

    Parameters
    ----------
    plans: the plans dict (``nnDiffPlans.json``) the model was trained with.
    configuration: configuration name (``inherits_from`` applied).
    dataset_json: content of the dataset's ``dataset.json`` (``file_ending``, ``channel_names``).
    networks: one network per fold, already on ``device`` and in ``eval()`` mode (may be empty for
        a family that needs no network).
    device: ``auto``, ``cpu``, ``cuda`` or a torch.device.
    batch_size: samples (generation) or slices (2D configurations) per network call; default the
        configuration's ``batch_size``.
    sampler / num_steps: override the plan's sampler and step count (``None``: as planned).
    precision: ``auto`` (bf16 autocast on CUDA where supported, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``.
    checkpoint_states: per fold, the checkpoint without weights and resume state (``trainer_class``,
        ``iteration``, ``extra`` = the family trainer's ``checkpoint_extra_state()``, ...), so a
        family predictor can restore what its trainer stored (e.g. the condition encoding).
    fold_ensemble: ``prediction`` or ``step`` (:data:`FOLD_ENSEMBLE_MODES`); ``None``: the family's
        :attr:`default_fold_ensemble` when several folds are loaded, ``step`` for one fold (where the
        mode changes nothing; ``prediction_info.json`` says so).
    fold_names: the folds' names (``"0"``, ``"all"``, ...) for per-fold seeds and records; default
        the networks' positions.
    """

    #: What the family's output is (``invert_case`` kind): image channels, target channels or a label map.
    output_kind: str = "data"
    #: Fold ensemble mode used with several folds when the caller does not choose one.
    default_fold_ensemble: str = "prediction"

    def __init__(self, plans: dict, configuration: str, dataset_json: dict, networks: Sequence[nn.Module] = (),
                 *, device: str | torch.device = "auto", batch_size: int | None = None,
                 sampler: str | None = None, num_steps: int | None = None,
                 model_info: dict[str, Any] | None = None, precision: str = "auto",
                 checkpoint_states: Sequence[dict[str, Any]] = (), fold_ensemble: str | None = None,
                 fold_names: Sequence[int | str] | None = None) -> None:
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        self.plans = plans
        self.configuration_name = configuration
        self.configuration = resolve_configuration(plans, configuration)
        self.dataset_json = dataset_json
        self.device = resolve_device(device)
        self.networks = list(networks)
        self.batch_size = int(batch_size or self.configuration.get("batch_size") or 1)
        self.sampler_name = sampler
        self.num_steps = num_steps
        self.model_info = dict(model_info or {})
        self.checkpoint_states = [dict(state) for state in checkpoint_states]
        self.autocast_dtype = inference_autocast_dtype(precision, self.device)
        self.file_ending = str(dataset_json.get("file_ending", ".nii.gz"))
        self.num_input_channels = len(dataset_json.get("channel_names") or dataset_json.get("modality") or {})
        self.fold_names = self._checked_fold_names(fold_names)
        self.fold_ensemble = self._resolve_fold_ensemble(fold_ensemble)
        self._fold_ensemble_requested = fold_ensemble is not None
        self._active_folds: list[int] | None = None  # None: every fold (see active_folds)
        self._sampled_outside_fold_loop = False
        #: Indices of the samples the running ``generate`` call draws (set by generate_to_folder).
        self.sample_indices: list[int] | None = None
        #: Seconds spent in ``generate`` by the last generate_to_folder call (sampler + decoder).
        self.generate_seconds = 0.0

    def _checked_fold_names(self, fold_names: Sequence[int | str] | None) -> list[str]:
        if fold_names is None:
            return [str(i) for i in range(len(self.networks))]
        names = [str(n) for n in fold_names]
        if len(names) != len(self.networks) or len(set(names)) != len(names):
            raise NnDiffError(f"fold_names {names} must name each of the {len(self.networks)} network(s) once. "
                              "Fix: pass one distinct name per network, or leave fold_names out")
        return names

    def _resolve_fold_ensemble(self, requested: str | None) -> str:
        """The fold ensemble mode: the request (checked) or the default for this many folds."""
        if requested is None:
            several = len(self.networks) > 1 and self.output_kind != "seg"
            return self.default_fold_ensemble if several else "step"
        if requested not in FOLD_ENSEMBLE_MODES:
            raise NnDiffError(f"unknown fold_ensemble {requested!r}. Fix: use one of {', '.join(FOLD_ENSEMBLE_MODES)}")
        if requested == "prediction" and self.output_kind == "seg":
            raise NnDiffError(f"{type(self).__name__} writes label maps, which cannot be averaged across folds as "
                              "labels. Fix: use fold_ensemble 'step' (--fold_ensemble step)")
        return requested

    # ------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------
    @classmethod
    def build_network(cls, configuration: dict) -> nn.Module:
        """The network of one fold, rebuilt from the plan (override for non-UNet families)."""
        from nndiff.networks import build_network

        return build_network(configuration["network"])

    @classmethod
    def from_model_folder(cls, model_dir: str | Path, folds: Sequence[int | str] | int | str = (0,),
                          checkpoint: str = DEFAULT_CHECKPOINT, use_ema: bool = True,
                          device: str | torch.device = "auto", preprocessed_dir: str | Path | None = None,
                          **kwargs: Any) -> "Predictor":
        """Load ``results/DatasetXXX_Name/<Trainer>__<Plans>__<config>`` (the parent of ``fold_N``).

        ``folds``: fold numbers, or ``"all"`` for the ``fold_all`` model. One network per fold,
        with the EMA weights unless ``use_ema=False``. The plans and dataset.json are read from
        ``preprocessed_dir`` or found as documented in :mod:`nndiff.inference.model_folder`. A
        checkpoint trained with other plans (plans hash) is refused with :class:`NnDiffError`.
        Other keyword arguments go to the constructor.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise NnDiffError(f"model folder {model_dir} does not exist. Fix: train first, or pass "
                              "results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>")
        name = parse_model_folder_name(model_dir)
        plans_file, dataset_json_file = locate_plans_and_dataset_json(model_dir, name.plans_name, preprocessed_dir)
        plans, dataset_json = load_json(plans_file), load_json(dataset_json_file)
        if name.configuration not in plans.get("configurations", {}):
            raise NnDiffError(f"{plans_file} has no configuration {name.configuration!r} (model folder "
                              f"{model_dir.name}). Fix: use the plans the model was trained with")
        configuration = resolve_configuration(plans, name.configuration)
        target = resolve_device(device)
        networks, states = [], []
        directories = fold_dirs(model_dir, folds)
        paths = [d / checkpoint for d in directories]
        for path in paths:
            weights, state = checked_weights(path, plans, name.configuration, use_ema, map_location="cpu")
            networks.append(load_network(lambda: cls.build_network(configuration), weights, path, target))
            states.append({k: v for k, v in state.items() if k not in HEAVY_CHECKPOINT_KEYS})
        info = {"model_dir": str(model_dir), "trainer": name.trainer, "plans_name": name.plans_name,
                "configuration": name.configuration, "checkpoints": [str(p) for p in paths],
                "use_ema": use_ema, "plans_file": str(plans_file)}
        logger.info("loaded %d fold(s) of %s from %s (%s weights)", len(networks), name.configuration,
                    model_dir, "EMA" if use_ema else "raw")
        fold_names = [d.name[len("fold_"):] for d in directories]
        return cls(plans, name.configuration, dataset_json, networks, device=target, model_info=info,
                   checkpoint_states=states, fold_names=fold_names, **kwargs)

    @classmethod
    def from_trained(cls, dataset: str | int, configuration: str, paths: Paths, *, trainer: str,
                     plans_name: str = "nnDiffPlans", **kwargs: Any) -> "Predictor":
        """:meth:`from_model_folder` for ``results/DatasetXXX_Name/<trainer>__<plans_name>__<configuration>``
        found through ``paths`` (an ``nndiff.paths.Paths``: results root required, preprocessed
        root used for the plans when set). What ``nndiff_predict -d -c -tr -p`` needs."""
        model_dir = model_folder_path(paths.require("results"), dataset, trainer, configuration, plans_name)
        if kwargs.get("preprocessed_dir") is None and paths.preprocessed is not None:
            candidate = Path(paths.preprocessed) / model_dir.parent.name
            kwargs["preprocessed_dir"] = candidate if candidate.is_dir() else None
        return cls.from_model_folder(model_dir, **kwargs)

    # ------------------------------------------------------------------------------------------
    # Hooks a family overrides
    # ------------------------------------------------------------------------------------------
    def predict_case(self, data: torch.Tensor, case: PreparedCase, generator: torch.Generator) -> torch.Tensor:
        """The family's output for one preprocessed case.

        ``data``: ``(C, Z, Y, X)`` float32 on ``self.device`` (a 2D configuration gets the whole
        volume; :meth:`map_slices` batches its slices). Returns ``(C_out, Z, Y, X)`` on the same
        grid, in the normalised units of :attr:`output_kind`. Draw every random number from
        ``generator`` (same seed → same output).
        """
        raise NotImplementedError(f"{type(self).__name__} does not predict from input cases")

    def predict_case_samples(self, data: torch.Tensor, case: PreparedCase, generator: torch.Generator,
                             num_samples: int) -> torch.Tensor:
        """``num_samples`` outputs ``(K, C_out, Z, Y, X)`` for Monte-Carlo prediction; by default
        :meth:`predict_case` called K times with the same generator (override to batch them)."""
        return torch.stack([self.predict_case(data, case, generator) for _ in range(num_samples)])

    def generate(self, num_samples: int, generator: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
        """``num_samples`` unconditional samples ``(N, C, *shape)`` in normalised units;
        ``shape`` is the spatial shape on the configuration's grid (2 entries for 2D)."""
        raise NotImplementedError(f"{type(self).__name__} does not generate unconditional samples")

    # ------------------------------------------------------------------------------------------
    # Helpers for families
    # ------------------------------------------------------------------------------------------
    @property
    def is_2d(self) -> bool:
        """A 2D configuration: the network sees ``(B, C, Y, X)`` slices."""
        return int(self.configuration.get("spatial_dims", 3)) == 2

    def make_generator(self, seed: int, identifier: str) -> torch.Generator:
        """A generator on ``self.device`` seeded by :func:`seed_for`."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed_for(seed, identifier))
        return generator

    def make_sampler(self, **overrides: Any):
        """The plan's sampler (``nndiff.diffusion.build_sampler``) with this predictor's sampler
        and step-count overrides."""
        from nndiff.diffusion import build_sampler

        return build_sampler(self.configuration["diffusion"], self.sampler_name, self.num_steps, **overrides)

    def model_fn(self) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
        """``model(x, t, cond)`` averaging the outputs of the active fold networks (all folds, or
        the one :meth:`active_folds` selects while it runs; read at every call, so a model built
        once follows the selection). ``cond``: None or a dict of network keyword arguments such as
        ``cond_image``, ``class_labels``. Runs under autocast with :attr:`autocast_dtype` and
        returns float32, so samplers integrate in float32."""
        if not self.networks:
            raise NnDiffError("this predictor holds no network. Fix: load it with from_model_folder")

        dtype = self.autocast_dtype

        def model(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
            kwargs = dict(cond or {})
            networks = self._networks_for_call()
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                outputs = [net(x, t, **kwargs).float() for net in networks]
            return outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(0)

        return model

    # ------------------------------------------------------------------------------------------
    # Fold ensembles
    # ------------------------------------------------------------------------------------------
    @property
    def ensembles_predictions(self) -> bool:
        """Several folds, each sampling on its own (``fold_ensemble == "prediction"``)."""
        return self.fold_ensemble == "prediction" and len(self.networks) > 1

    @contextmanager
    def active_folds(self, folds: Sequence[int]) -> Iterator[None]:
        """Restrict :meth:`model_fn` to the networks at positions ``folds`` while the block runs."""
        chosen = [int(f) for f in folds]
        if not chosen or any(not 0 <= f < len(self.networks) for f in chosen):
            raise NnDiffError(f"fold positions {chosen} out of range for {len(self.networks)} loaded fold(s)")
        previous = self._active_folds
        self._active_folds = chosen
        try:
            yield
        finally:
            self._active_folds = previous

    def _networks_for_call(self) -> list[nn.Module]:
        if self._active_folds is not None:
            return [self.networks[f] for f in self._active_folds]
        if self.ensembles_predictions:
            self._note_sampling_outside_fold_loop()
        return self.networks

    def _note_sampling_outside_fold_loop(self) -> None:
        """A family sampled with every fold at once although folds should sample on their own
        (it does not go through _run_case / generate_to_folder): refuse an explicit request, else
        fall back to per-step averaging, logged and recorded in prediction_info.json."""
        if self._fold_ensemble_requested:
            raise NnDiffError(f"{type(self).__name__} samples outside the per-fold loop of the Predictor base, so "
                              "fold_ensemble 'prediction' is not available for it. Fix: use --fold_ensemble step "
                              "(fold outputs averaged at every sampler step)")
        if not self._sampled_outside_fold_loop:
            logger.warning("%s samples outside the per-fold loop: fold outputs are averaged at every step "
                           "(fold_ensemble 'step')", type(self).__name__)
        self._sampled_outside_fold_loop = True

    def fold_generator(self, seed: int, identifier: str, fold: int) -> torch.Generator:
        """The generator of fold position ``fold`` for one case or batch in ``prediction`` mode:
        seeded by ``(seed, "<identifier>/fold_<fold name>")``, so folds draw independent noise and a
        fold's noise does not depend on which other folds are loaded."""
        return self.make_generator(seed, f"{identifier}/fold_{self.fold_names[fold]}")

    def fold_case_samples(self, data: torch.Tensor, case: PreparedCase, seed: int,
                          num_samples: int) -> torch.Tensor:
        """``(F, K, C_out, Z, Y, X)``: each fold's network samples the case on its own, K times,
        with its :meth:`fold_generator`."""
        per_fold = []
        for fold in range(len(self.networks)):
            generator = self.fold_generator(seed, case.identifier, fold)
            with self.active_folds([fold]):
                per_fold.append(self._case_samples(data, case, generator, num_samples))
        return torch.stack(per_fold)

    def _case_samples(self, data: torch.Tensor, case: PreparedCase, generator: torch.Generator,
                      num_samples: int) -> torch.Tensor:
        if num_samples > 1:
            return self.predict_case_samples(data, case, generator, num_samples)
        return self.predict_case(data, case, generator)[None]

    def fold_ensemble_info(self) -> dict[str, Any]:
        """What prediction_info.json records about the folds and how they were combined."""
        mode = "step" if self._sampled_outside_fold_loop else self.fold_ensemble
        info: dict[str, Any] = {"folds": list(self.fold_names), "fold_ensemble": mode}
        if len(self.networks) == 1:
            info["fold_ensemble_note"] = "one fold loaded: the fold ensemble mode changes nothing"
        elif self._sampled_outside_fold_loop:
            info["fold_ensemble_note"] = (f"{type(self).__name__} samples outside the per-fold loop: fold outputs "
                                          "were averaged at every step instead of per prediction")
        return info

    def windowed_model_fn(self, step_fraction: float = 0.5, gaussian: bool = True) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
        """:meth:`model_fn` evaluated in windows of the planned ``patch_size`` (Gaussian-weighted
        overlaps), for inputs of any size: pass it to the sampler so every step sees the whole
        image (no seams); see :mod:`nndiff.inference.sliding_window`. Windows are stacked into
        calls of up to :attr:`batch_size` items (the planned training batch, so a forward pass of
        that many patches fits)."""
        from nndiff.inference.sliding_window import sliding_window_model

        return sliding_window_model(self.model_fn(), self.configuration["patch_size"],
                                    step_fraction=step_fraction, gaussian=gaussian, max_batch=self.batch_size)

    def map_slices(self, fn: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor) -> torch.Tensor:
        """Apply ``fn`` to the z slices of ``data`` ``(C, Z, Y, X)`` in batches of
        ``batch_size`` (``fn``: ``(B, C, Y, X) -> (B, C', Y, X)``); returns ``(C', Z, Y, X)``."""
        slices = data.permute(1, 0, 2, 3)
        outputs = [fn(slices[i:i + self.batch_size]) for i in range(0, slices.shape[0], self.batch_size)]
        return torch.cat(outputs).permute(1, 0, 2, 3)

    # ------------------------------------------------------------------------------------------
    # Input cases
    # ------------------------------------------------------------------------------------------
    def prepare_case(self, images: np.ndarray, properties: Any, identifier: str,
                     missing_channels: Sequence[int] = ()) -> PreparedCase:
        """Preprocess raw arrays ``(C, Z, Y, X)`` with the plan (as training data was);
        ``missing_channels``: stand-in channels that must not influence crop or statistics (stored as
        zeros and listed in the case JSON, as preprocessing does for training cases)."""
        from nndiff.preprocessing import preprocess_case

        arrays, case_json = preprocess_case(images, properties, self.plans, self.configuration_name,
                                            identifier=identifier, missing_channels=missing_channels)
        return PreparedCase(identifier, arrays["data"], case_json)

    def write_case_output(self, output: torch.Tensor, case: PreparedCase, output_dir: Path, identifier: str,
                          num_mc_samples: int) -> list[Path]:
        """Write one case's network-space output: the Monte-Carlo mean and std for ``num_mc_samples
        > 1`` (``output`` is then ``(K, ...)``), else the prediction, in the input's geometry and units."""
        output = output.float().cpu().numpy()
        if num_mc_samples > 1:
            return self.write_monte_carlo(list(output), case.case_json, output_dir, identifier)
        array, props = self.invert(output, case.case_json)
        return write_output(array, props, output_dir, identifier, self.file_ending)

    def _run_case(self, case: PreparedCase, seed: int, num_samples: int) -> torch.Tensor:
        """One case's output ``(C_out, Z, Y, X)`` for ``num_samples == 1``, else its samples ``(S, ...)``.

        ``prediction`` fold ensemble with F folds: the single output is the mean of the folds'
        outputs (in network units), and S = F × K samples (fold-major) feed the Monte-Carlo mean/std.
        """
        data = torch.from_numpy(np.ascontiguousarray(case.data)).to(self.device)
        with torch.no_grad():
            if self.ensembles_predictions:
                per_fold = self.fold_case_samples(data, case, seed, num_samples)
                return per_fold[:, 0].mean(0) if num_samples == 1 else per_fold.flatten(0, 1)
            generator = self.make_generator(seed, case.identifier)
            samples = self._case_samples(data, case, generator, num_samples)
            return samples if num_samples > 1 else samples[0]

    def invert(self, array: np.ndarray, case_json: dict) -> tuple[np.ndarray, Any]:
        """An output on the configuration's grid back to the original grid, units and geometry."""
        from nndiff.preprocessing import invert_case

        # label maps are class indices (resampled per label); intensities float32
        dtype = np.int16 if self.output_kind == "seg" else np.float32
        return invert_case(np.asarray(array).astype(dtype), case_json, self.plans,
                           self.configuration_name, kind=self.output_kind)

    def predict_arrays(self, images: np.ndarray, properties: Any, identifier: str = "case",
                       seed: int = 0) -> tuple[np.ndarray, Any]:
        """One case in memory: raw ``(C, Z, Y, X)`` + ``ImageProperties`` in, output in original
        units with the input's geometry out."""
        case = self.prepare_case(images, properties, identifier)
        output = self._run_case(case, seed, 1)
        return self.invert(output.float().cpu().numpy(), case.case_json)

    def predict_from_folder(self, input_dir: str | Path, output_dir: str | Path, seed: int = 0,
                            num_mc_samples: int = 1) -> list[Path]:
        """Predict every ``{CASE}_{XXXX}{ending}`` case of ``input_dir`` into ``output_dir``.

        Outputs: ``{CASE}{ending}`` (one file per channel ``{CASE}_{XXXX}{ending}`` when there are
        several), on the input's grid with its spacing, origin and direction, in original units.
        ``num_mc_samples`` K > 1: the mean of K samples is the prediction and the per-voxel
        standard deviation is written as ``{CASE}_std{ending}``.
        """
        if num_mc_samples > 1 and self.output_kind == "seg":
            raise NnDiffError("Monte-Carlo mean/std is defined for intensity outputs, not label maps. "
                              "Fix: predict label maps with one sample")
        output_dir = Path(output_dir)
        written: list[Path] = []
        count = 0
        for case in self.prepared_cases(input_dir):
            output = self._run_case(case, seed, num_mc_samples)
            written += self.write_case_output(output, case, output_dir, case.identifier, num_mc_samples)
            logger.info("predicted %s", case.identifier)
            count += 1
        self._write_info(output_dir, seed, {"mode": "predict", "input_dir": str(input_dir),
                                            "num_cases": count, "num_mc_samples": num_mc_samples})
        return written

    def prepared_cases(self, input_dir: str | Path) -> Iterator[PreparedCase]:
        """Every ``{CASE}_{XXXX}{ending}`` case of ``input_dir``, read and preprocessed, one at a time
        (the case list is checked before the first is read)."""
        from nndiff.dataset.io import read_images

        for item in find_input_cases(input_dir, self.file_ending, self.num_input_channels):
            images, properties = read_images(item.files)
            yield self.prepare_case(images, properties, item.identifier)

    # ------------------------------------------------------------------------------------------
    # Monte Carlo
    # ------------------------------------------------------------------------------------------
    def write_monte_carlo(self, samples: Sequence[np.ndarray], case_json: dict, output_dir: str | Path,
                          identifier: str) -> list[Path]:
        """Write the mean of K samples as ``{CASE}{ending}`` and their per-voxel standard deviation
        (ddof = 0) as ``{CASE}_std{ending}``, both on the original grid with its geometry.

        Each sample is mapped back to original units first (the inverse clips and resamples, so
        it does not commute with the mean); the statistics are in original units.
        """
        if self.output_kind == "seg":
            raise NnDiffError("Monte-Carlo mean/std is defined for intensity outputs, not label maps")
        inverted = [self.invert(sample, case_json) for sample in samples]
        mean, std = monte_carlo_summary([array for array, _ in inverted])
        properties = inverted[0][1]
        output_dir = Path(output_dir)
        paths = write_output(mean, properties, output_dir, identifier, self.file_ending)
        paths += write_output(std, properties, output_dir, identifier, self.file_ending, suffix=STD_SUFFIX)
        return paths

    # ------------------------------------------------------------------------------------------
    # Unconditional generation
    # ------------------------------------------------------------------------------------------
    def generation_shape(self, shape: str | Sequence[int] = "patch") -> list[int]:
        """Spatial shape of generated samples on the configuration's grid: ``"patch"`` (the
        planned patch size, which the network always accepts), ``"median"`` (the plan's median
        image size) or explicit sizes."""
        if isinstance(shape, str):
            key = {"patch": "patch_size", "median": "median_image_size_in_voxels"}.get(shape)
            if key is None:
                raise NnDiffError(f"unknown generation shape {shape!r}. Fix: use 'patch', 'median' or sizes")
            shape = self.configuration[key]
        sizes = [int(s) for s in shape]
        expected = 2 if self.is_2d else 3
        if len(sizes) != expected:
            raise NnDiffError(f"configuration {self.configuration_name!r} generates {expected}D samples; "
                              f"got shape {sizes}")
        return sizes

    def generated_geometry(self, shape: Sequence[int]) -> dict:
        """Case JSON of a generated sample: the configuration's spacing, origin 0, identity
        direction; a 2D configuration writes 2D images (``generated_case_json``)."""
        from nndiff.preprocessing import generated_case_json

        return generated_case_json(self.plans, self.configuration_name, shape)

    def generate_to_folder(self, output_dir: str | Path, num_samples: int, seed: int = 0,
                           shape: str | Sequence[int] = "patch") -> list[Path]:
        """Generate ``num_samples`` samples in batches of ``batch_size`` and write
        ``sample_0000{ending}``, ... with the documented geometry, in original units.

        Each batch draws from a generator seeded with ``(seed, "sample_<first index of the
        batch>")``: the same seed, batch size and folds give identical files. ``prediction`` fold
        ensemble with F folds: sample *i* is drawn by fold *i mod F* alone (fold *f*'s samples
        ``f, f+F, ...`` in batches); ``prediction_info.json`` lists each sample's fold.
        :attr:`generate_seconds` holds the wall time spent in :meth:`generate` (sampler, and a latent
        family's decoder; CUDA synchronised), without mapping back and writing.
        """
        if num_samples < 1:
            raise NnDiffError(f"num_samples must be >= 1, got {num_samples}")
        sizes = self.generation_shape(shape)
        case_json = self.generated_geometry(sizes)
        output_dir = Path(output_dir)
        written: list[Path] = []
        sample_folds: dict[str, str] = {}
        self.generate_seconds = 0.0
        for fold, indices in self.generation_batches(num_samples):
            generator = self.make_generator(seed, f"{SAMPLE_PREFIX}_{indices[0]:04d}")
            selection = self.active_folds([fold]) if fold is not None else nullcontext()
            self.sample_indices = indices
            try:
                synchronize(self.device)
                started = time.perf_counter()
                with torch.no_grad(), selection:
                    batch = self.generate(len(indices), generator, sizes).float()
                synchronize(self.device)
                self.generate_seconds += time.perf_counter() - started
                batch = batch.cpu().numpy()
            finally:
                self.sample_indices = None
            if batch.shape[0] != len(indices) or list(batch.shape[2:]) != sizes:
                raise NnDiffError(f"{type(self).__name__}.generate returned shape {list(batch.shape)}; "
                                  f"expected [{len(indices)}, C, {', '.join(map(str, sizes))}]")
            for index, sample in zip(indices, batch):
                grid = sample[:, None] if self.is_2d else sample  # (C, Y, X) -> (C, 1, Y, X)
                array, props = self.invert(grid, case_json)
                name = f"{SAMPLE_PREFIX}_{index:04d}"
                written += write_output(array, props, output_dir, name, self.file_ending)
                if fold is not None:
                    sample_folds[name] = self.fold_names[fold]
        extra: dict[str, Any] = {"mode": "generate", "num_samples": num_samples, "shape": sizes,
                                 "batch_size": self.batch_size}
        if sample_folds:
            extra["sample_folds"] = dict(sorted(sample_folds.items()))
        self._write_info(output_dir, seed, extra)
        return sorted(written)

    def generation_batches(self, num_samples: int) -> list[tuple[int | None, list[int]]]:
        """``(fold position or None for all folds, sample indices)`` of each generate call: runs of
        ``batch_size`` indices; in ``prediction`` mode fold *f* draws indices ``f, f+F, ...``."""
        if not self.ensembles_predictions:
            return [(None, list(range(start, min(start + self.batch_size, num_samples))))
                    for start in range(0, num_samples, self.batch_size)]
        batches: list[tuple[int | None, list[int]]] = []
        for fold in range(len(self.networks)):
            indices = list(range(fold, num_samples, len(self.networks)))
            batches += [(fold, indices[i:i + self.batch_size]) for i in range(0, len(indices), self.batch_size)]
        return batches

    # ------------------------------------------------------------------------------------------
    def _write_info(self, output_dir: Path, seed: int, extra: dict[str, Any]) -> None:
        info = {**self.model_info, "predictor": type(self).__name__, "configuration": self.configuration_name,
                "seed": seed, "device": str(self.device),
                "autocast": str(self.autocast_dtype) if self.autocast_dtype else "fp32", "sampler": self.sampler_name,
                "num_steps": self.num_steps, **self.fold_ensemble_info(), **extra}
        save_json(info, Path(output_dir) / PREDICTION_INFO)
