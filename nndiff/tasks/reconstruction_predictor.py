"""Reconstruction family predictor: undersampled MRI k-space / sparse-view CT -> image, by sampling
the trained prior (:class:`~nndiff.tasks.reconstruction.ReconstructionTrainer`) with data
consistency inside every sampler step.

Inputs (``-i DIR``), per case:

- ``{CASE}.npz`` with ``kspace`` (complex; ``(H, W)``, ``(coils, H, W)`` or ``(slices, coils, H, W)``),
  ``mask`` (0/1; ``(W,)``, ``(H, W)`` or broadcastable) and optional ``sens_maps`` (like kspace),
  plus a ``{CASE}.json`` sidecar with ``"spacing"`` ((y, x) or (z, y, x), mm);
- ``{CASE}.h5`` (fastMRI layout: ``kspace`` ``(slices, H, W)`` single-coil or ``(slices, coils, H, W)``,
  ``mask``, optional ``sens_maps``), same sidecar; needs h5py (imported lazily);
- simulate mode (:meth:`ReconstructionPredictor.predict_simulated`): fully sampled images
  ``{CASE}_0000{ending}`` undersampled on the fly (MRI: seeded Cartesian mask; CT: sparse-view
  sinogram) from dataset.json's ``reconstruction`` block unless overridden; retrospective evaluation.

Sampling: the plan's sampler; data consistency ``dc``: ``projection`` (default: k-space replacement
for MRI, POCS for CT on every predicted x0), ``dps`` (likelihood gradient through the network) or
``mcg`` (gradient + projection on x_t); warm start from the zero-filled / FBP image at
t0 = start_fraction of the schedule when the plan's ``sampling.warm_start`` says so. Measurements
are divided by the plan's scale-only factor (network units), outputs multiplied back.

Outputs: ``{CASE}{ending}`` magnitude in original units with the geometry (sidecar spacing or the
input image's geometry), ``{CASE}_std{ending}`` for K > 1, ``{CASE}_complex.npy`` (complex MRI
reconstruction, original units; K > 1: complex mean), ``baseline/{CASE}{ending}`` (zero-filled /
FBP magnitude) and ``reconstruction_info.json`` (per case: data-consistency residual, acceleration).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nndiff.diffusion.config import DiffusionConfig, build_process, build_sampler
from nndiff.diffusion.samplers import sample
from nndiff.errors import NnDiffError, PlansError
from nndiff.inference.files import monte_carlo_summary, write_output
from nndiff.inference.predictor import Predictor
from nndiff.inference.registry import register_predictor
from nndiff.tasks.data_consistency import (
    dps_hooks,
    mcg_hooks,
    projection_hooks,
    residual,
    warm_start_image,
    warm_start_state,
)
from nndiff.tasks.operators import (
    LinearOperator,
    MeasurementError,
    MultiCoilMRI,
    ParallelBeamCT,
    RealImageOperator,
    SingleCoilMRI,
    channels_to_complex,
    check_finite,
    estimate_sensitivity_maps,
    expand_mask,
    mask_acceleration,
    parallel_beam_angles,
    undersampling_mask,
)
from nndiff.utils.files import atomic_path, load_json, save_json

logger = logging.getLogger(__name__)

DC_MODES = ("projection", "dps", "mcg")
BASELINE_DIR = "baseline"
INFO_FILE = "reconstruction_info.json"
COMPLEX_SUFFIX = "_complex.npy"
MEASUREMENT_ENDINGS = (".npz", ".h5")


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
@dataclass
class CaseMeasurement:
    """One case's measurements per slice, in original units: ``data`` ``(S, coils, H, W)`` complex
    (MRI) or ``(S, 1, views, detectors)`` (CT); operators per slice; spacing / properties for writing."""

    identifier: str
    operators: list[LinearOperator]
    data: torch.Tensor
    properties: Any
    source: str
    acceleration: float
    reference: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_sidecar(path: Path) -> dict[str, Any]:
    """``{CASE}.json`` next to a measurement file: needs ``spacing`` (2 or 3 positive numbers)."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise NnDiffError(f"{path}: the sidecar {sidecar.name} is missing; it gives the output spacing. Fix: write "
                          f"{sidecar} with {{\"spacing\": [y, x]}} (mm)")
    content = load_json(sidecar)
    spacing = content.get("spacing") if isinstance(content, dict) else None
    if (not isinstance(spacing, list) or len(spacing) not in (2, 3)
            or not all(isinstance(s, (int, float)) and s > 0 for s in spacing)):
        raise NnDiffError(f"{sidecar}: 'spacing' must be a list of 2 or 3 positive numbers, found {spacing!r}. "
                          "Fix: write e.g. {\"spacing\": [0.5, 0.5]}")
    return content


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    try:
        import h5py
    except ImportError as err:
        raise NnDiffError(f"{path}: reading fastMRI .h5 files needs h5py. Fix: pip install h5py") from err
    with h5py.File(path, "r") as f:
        return {k: np.asarray(f[k]) for k in ("kspace", "mask", "sens_maps") if k in f}


def _as_slices(array: np.ndarray, h5: bool) -> np.ndarray:
    """k-space / maps to ``(S, coils, H, W)``: npz 2-D = one coil, 3-D = coils, 4-D = slices x coils;
    fastMRI h5 3-D = slices (single coil), 4-D = slices x coils."""
    if array.ndim == 2:
        return array[None, None]
    if array.ndim == 3:
        return array[:, None] if h5 else array[None]
    if array.ndim == 4:
        return array
    raise MeasurementError(f"expected 2 to 4 axes, got shape {array.shape}")


def read_measurement(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """``(kspace (S, coils, H, W) complex64, mask, sens_maps | None, sidecar)`` of one measurement file,
    validated (keys, complex, finite, mask shape and values); errors name the file."""
    sidecar = read_sidecar(path)
    arrays = _read_arrays(path)
    missing = [k for k in ("kspace", "mask") if k not in arrays]
    if missing:
        raise MeasurementError(f"{path}: missing key(s) {missing}; a measurement file needs 'kspace' and 'mask' "
                               "(optional 'sens_maps'). Fix: save them with np.savez")
    h5 = path.suffix == ".h5"
    try:
        kspace = torch.from_numpy(_as_slices(arrays["kspace"], h5).astype(np.complex64))
    except MeasurementError as err:
        raise MeasurementError(f"{path}: kspace {err}") from None
    check_finite(kspace, "kspace", str(path))
    mask = torch.from_numpy(np.asarray(arrays["mask"]).astype(np.float32))
    mask = expand_mask(mask, tuple(kspace.shape), str(path))
    maps = None
    if "sens_maps" in arrays:
        maps = torch.from_numpy(_as_slices(arrays["sens_maps"], h5).astype(np.complex64))
        if maps.shape[-3:] != kspace.shape[-3:]:
            raise MeasurementError(f"{path}: sens_maps shape {tuple(maps.shape)} disagrees with kspace shape "
                                   f"{tuple(kspace.shape)} (coils, H, W must match)")
    return kspace, mask, maps, sidecar


# ----------------------------------------------------------------------------------------------
# The predictor
# ----------------------------------------------------------------------------------------------
@register_predictor(trainers=("ReconstructionTrainer",))
class ReconstructionPredictor(Predictor):
    """Reconstructs images from measurements with a trained prior and data consistency (module docstring)."""

    def __init__(self, *args: Any, dc: str = "projection", dc_scale: float = 1.0,
                 warm_start: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if dc not in DC_MODES:
            raise NnDiffError(f"unknown data consistency {dc!r}. Fix: use one of {', '.join(DC_MODES)}")
        if not self.is_2d:
            raise PlansError(f"configuration {self.configuration_name!r} is 3D; reconstruction operators act on "
                             "2D slices. Fix: predict with the 2d configuration")
        self.dc = dc
        self.dc_scale = float(dc_scale)
        sampling = self.configuration.get("sampling") or {}
        self.warm_start = bool(sampling.get("warm_start")) if warm_start is None else bool(warm_start)
        self.start_fraction = float(sampling.get("start_fraction", 1.0))
        self.block = dict(self.dataset_json.get("reconstruction") or {})
        self.operator_kind = str(self.block.get("operator", "mri_cartesian"))
        self.scale = self._scale()
        self.in_channels = int(self.configuration["network"]["in_channels"])
        self.diffusion = DiffusionConfig.from_dict(self.configuration["diffusion"])
        self.process = build_process(self.diffusion)

    def _scale(self) -> float:
        entries = (self.plans.get("normalization") or {}).get("images") or []
        if len(entries) != 1 or entries[0].get("scheme") != "scale_only":
            raise PlansError("reconstruction needs one image channel with scale_only normalization in the plans "
                             f"(found {[e.get('scheme') for e in entries]}). Fix: re-plan with task 'reconstruction'")
        return float(entries[0]["params"]["scale"])

    # ---- operators ----------------------------------------------------------------------------
    def network_operator(self, operator: LinearOperator) -> LinearOperator:
        """The operator as the network's tensors see it (a 1-channel prior is real)."""
        if operator.complex_image and self.in_channels == 1:
            return RealImageOperator(operator)
        return operator

    def ct_operator(self, shape: Sequence[int], num_views: int | None = None) -> ParallelBeamCT:
        views = int(num_views or self.block.get("num_views", 60))
        arc = math.radians(float(self.block.get("angle_range", 180.0)))
        return ParallelBeamCT(tuple(shape), parallel_beam_angles(views, arc), self.block.get("num_detectors"))

    # ---- sampling one slice -------------------------------------------------------------------
    def _model(self, shape: Sequence[int]) -> Callable:
        patch = [int(p) for p in self.configuration["patch_size"]]
        if list(shape) == patch:
            return self.model_fn()
        if all(s >= p for s, p in zip(shape, patch)):
            return self.windowed_model_fn()
        inner = self.model_fn()
        pads = []
        for size, p in zip(reversed(list(shape)), reversed(patch)):
            extra = max(p - size, 0)
            pads += [extra // 2, extra - extra // 2]

        def padded(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
            out = inner(F.pad(x, pads), t, cond)  # zero = background in scale-only units
            return out[..., pads[2]:out.shape[-2] - pads[3], pads[0]:out.shape[-1] - pads[1]]

        return padded

    def _hooks(self, operator: LinearOperator, y: torch.Tensor, model: Callable,
               generator: torch.Generator, source: str) -> dict[str, Any]:
        if self.dc == "dps":
            return dps_hooks(operator, y, model, self.process, self.diffusion.parameterization,
                             scale=self.dc_scale, source=source)
        if self.dc == "mcg":
            return mcg_hooks(operator, y, model, self.process, self.diffusion.parameterization,
                             scale=self.dc_scale, generator=generator)
        return projection_hooks(operator, y, source=source)

    def baseline(self, operator: LinearOperator, y: torch.Tensor) -> torch.Tensor:
        """Zero-filled (MRI) / FBP (CT) image in network layout (``(1, in_channels, H, W)``)."""
        image = warm_start_image(operator, y)
        if image.shape[1] != self.in_channels and image.shape[1] == 2 * self.in_channels:
            raise PlansError("internal: complex warm start for a real prior")  # RealImageOperator prevents this
        return image.float()

    def reconstruct_slice(self, operator: LinearOperator, y: torch.Tensor, generator: torch.Generator,
                          source: str, num_samples: int = 1) -> torch.Tensor:
        """``num_samples`` samples ``(num_samples, in_channels, H, W)`` in network units for a
        normalised measurement ``y`` ``(1, ...)``, drawn as one batch of the sampler (the data
        consistency broadcasts y over the batch; each sample draws its own noise)."""
        operator = self.network_operator(operator)
        operator.check_measurement(y, source)
        shape = self._image_shape(operator, y)
        model = self._model(shape)
        sampler = build_sampler(self.diffusion, self.sampler_name, self.num_steps, process=self.process)
        hooks = self._hooks(operator, y, model, generator, source)
        steps = self.num_steps or self.diffusion.num_sampling_steps
        if self.warm_start and self.start_fraction < 1.0:
            x_init = self.baseline(operator, y).expand(num_samples, -1, -1, -1)
            t0 = self.process.t_clean + self.start_fraction * (self.process.t_max - self.process.t_clean)
            start = warm_start_state(self.process, x_init, t0, generator)
            steps = max(1, round(steps * self.start_fraction))
            out = sample(sampler, model, start_at=start, num_steps=steps, generator=generator, **hooks)
        else:
            out = sample(sampler, model, (num_samples, self.in_channels, *shape), generator=generator,
                         device=self.device, **hooks)
        return out.sample.float()

    @staticmethod
    def _image_shape(operator: LinearOperator, y: torch.Tensor) -> tuple[int, int]:
        inner = operator.operator if isinstance(operator, RealImageOperator) else operator
        if isinstance(inner, ParallelBeamCT):
            return inner.image_shape
        return tuple(y.shape[-2:])

    # ---- whole cases --------------------------------------------------------------------------
    def to_complex(self, x: torch.Tensor) -> torch.Tensor:
        """Network tensor ``(1, C, H, W)`` -> image ``(H, W)`` (complex for 2-channel priors), original units."""
        image = channels_to_complex(x)[0, 0] if self.in_channels == 2 else x[0, 0]
        return image * self.scale

    def reconstruct_case(self, case: CaseMeasurement, seed: int, num_samples: int = 1) -> dict[str, Any]:
        """Samples ``(S_total, Z, H, W)``, baseline ``(Z, H, W)`` and the mean relative DC residual of
        one case. With the ``prediction`` fold ensemble each fold reconstructs the case on its own
        (its own generator, :meth:`fold_generator`) and the samples are stacked fold-major
        (F x K); otherwise the folds are averaged at every step (one generator, K samples)."""
        if not self.ensembles_predictions:
            return self.reconstruct_with(case, self.make_generator(seed, case.identifier), num_samples)
        parts = []
        for fold in range(len(self.networks)):
            with self.active_folds([fold]):
                parts.append(self.reconstruct_with(case, self.fold_generator(seed, case.identifier, fold),
                                                   num_samples))
        return {"samples": torch.cat([p["samples"] for p in parts]), "baseline": parts[0]["baseline"],
                "residual": float(np.mean([p["residual"] for p in parts]))}

    def reconstruct_with(self, case: CaseMeasurement, generator: torch.Generator, num_samples: int) -> dict[str, Any]:
        """``num_samples`` reconstructions of every slice of ``case`` drawn with ``generator``; the
        samples of a slice run together, ``batch_size`` per sampler run (K sequential runs of batch 1
        would cost K times the network calls)."""
        samples, baselines, residuals = [], [], []
        with torch.no_grad():
            for s, operator in enumerate(case.operators):
                y = (case.data[s:s + 1] / self.scale).to(self.device)
                net_op = self.network_operator(operator)
                baselines.append(self.to_complex(self.baseline(net_op, y)).cpu())
                per_sample = []
                for count in self.sample_chunks(num_samples):
                    x = self.reconstruct_slice(operator, y, generator, case.source, count)
                    residuals += [float(r) for r in residual(net_op, y, x)]
                    per_sample += [self.to_complex(x[k:k + 1]).cpu() for k in range(count)]
                samples.append(torch.stack(per_sample))
        return {"samples": torch.stack(samples, dim=1), "baseline": torch.stack(baselines),
                "residual": float(np.mean(residuals))}

    def sample_chunks(self, num_samples: int) -> list[int]:
        """Sizes of the sampler runs for ``num_samples`` samples of one slice: ``batch_size`` each, the rest last."""
        size = max(1, self.batch_size)
        return [min(size, num_samples - start) for start in range(0, num_samples, size)]

    def write_case(self, case: CaseMeasurement, result: dict[str, Any], output_dir: Path,
                   with_std: bool = True) -> list[Path]:
        """Magnitude (+ std over the samples when ``with_std`` and there are several), complex image
        and baseline with the case's geometry."""
        samples = result["samples"]  # (K, S, H, W); K = folds x samples in the prediction fold ensemble
        magnitudes = [s.abs().numpy()[None] for s in samples]  # each (1, S, H, W)
        mean, std = monte_carlo_summary(magnitudes)
        paths = write_output(mean, case.properties, output_dir, case.identifier, self.file_ending)
        if with_std and len(magnitudes) > 1:
            paths += write_output(std, case.properties, output_dir, case.identifier, self.file_ending, suffix="_std")
        if samples.is_complex():
            path = output_dir / f"{case.identifier}{COMPLEX_SUFFIX}"
            with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                np.save(handle, samples.mean(0).numpy().astype(np.complex64))
            paths.append(path)
        baseline = result["baseline"].abs().numpy()[None].astype(np.float32)
        paths += write_output(baseline, case.properties, output_dir / BASELINE_DIR, case.identifier, self.file_ending)
        return paths

    def _predict_cases(self, cases: Sequence[CaseMeasurement], output_dir: Path, seed: int,
                       num_mc_samples: int, extra: dict[str, Any]) -> list[Path]:
        if num_mc_samples < 1:
            raise NnDiffError(f"num_mc_samples must be >= 1, got {num_mc_samples}")
        output_dir = Path(output_dir)
        written: list[Path] = []
        info: dict[str, Any] = {}
        for case in cases:
            result = self.reconstruct_case(case, seed, num_mc_samples)
            # as the base: a std map only for --num_samples > 1 (the fold count does not add one)
            written += self.write_case(case, result, output_dir, with_std=num_mc_samples > 1)
            info[case.identifier] = {"dc_residual": result["residual"], "acceleration": case.acceleration,
                                     "source": case.source, **case.extra}
            logger.info("reconstructed %s (relative DC residual %.3g)", case.identifier, result["residual"])
        save_json({"dc": self.dc, "warm_start": self.warm_start, "scale": self.scale, "cases": info},
                  output_dir / INFO_FILE)
        self._write_info(output_dir, seed, {"num_cases": len(cases), "num_mc_samples": num_mc_samples,
                                            "dc": self.dc, **extra})
        return written

    # ---- measurement files --------------------------------------------------------------------
    def measurement_case(self, path: Path) -> CaseMeasurement:
        """A case from ``{CASE}.npz`` / ``{CASE}.h5`` + sidecar (MRI)."""
        from nndiff.dataset.io import ImageProperties

        kspace, mask, maps, sidecar = read_measurement(path)
        source = str(path)
        coils = kspace.shape[1]
        operators: list[LinearOperator] = []
        for s in range(kspace.shape[0]):
            if coils == 1 and maps is None:
                operators.append(SingleCoilMRI(mask, source))
            else:
                slice_maps = maps[s] if maps is not None else estimate_sensitivity_maps(kspace[s], mask, source=source)
                operators.append(MultiCoilMRI(mask, slice_maps, source))
        spacing = [float(v) for v in sidecar["spacing"]]
        num_slices, h, w = kspace.shape[0], kspace.shape[-2], kspace.shape[-1]
        is_2d = num_slices == 1 and len(spacing) == 2
        zyx = (999.0, *spacing) if len(spacing) == 2 else tuple(spacing)
        props = ImageProperties(spacing=zyx, origin=(0.0,) * (2 if is_2d else 3),
                                direction=(1.0, 0.0, 0.0, 1.0) if is_2d else (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
                                spatial_dims=2 if is_2d else 3, shape=(num_slices, h, w))
        return CaseMeasurement(path.stem, operators, kspace, props, source,
                               mask_acceleration(mask.expand(h, w)))

    def predict_from_folder(self, input_dir: str | Path, output_dir: str | Path, seed: int = 0,
                            num_mc_samples: int = 1) -> list[Path]:
        """Reconstruct every ``{CASE}.npz`` / ``{CASE}.h5`` (with ``{CASE}.json``) of ``input_dir``."""
        folder = Path(input_dir)
        files = sorted(p for p in folder.iterdir() if p.suffix in MEASUREMENT_ENDINGS) if folder.is_dir() else []
        if not files:
            raise NnDiffError(f"{folder} holds no {{CASE}}.npz or {{CASE}}.h5 measurement files. Fix: save kspace, "
                              "mask (and sens_maps) there with a {CASE}.json sidecar, or use simulate mode")
        cases = [self.measurement_case(p) for p in files]
        return self._predict_cases(cases, Path(output_dir), seed, num_mc_samples,
                                   {"mode": "measurements", "input_dir": str(folder)})

    # ---- simulate mode ------------------------------------------------------------------------
    def simulation_settings(self, acceleration: float | None = None, center_fraction: float | None = None,
                            mask_pattern: str | None = None, num_views: int | None = None) -> dict[str, Any]:
        """Simulation parameters: arguments over dataset.json's ``reconstruction`` block (validated)."""
        settings = {"acceleration": float(acceleration if acceleration is not None else self.block.get("acceleration", 4.0)),
                    "center_fraction": float(center_fraction if center_fraction is not None
                                             else self.block.get("center_fraction", 0.08)),
                    "mask_pattern": str(mask_pattern or self.block.get("mask_type", "random")),
                    "num_views": int(num_views or self.block.get("num_views", 60))}
        if self.operator_kind == "mri_cartesian" and not settings["acceleration"] >= 1:
            raise MeasurementError(f"acceleration must be >= 1 (1 = fully sampled), got {settings['acceleration']}. "
                                   "Fix: pass e.g. --acceleration 4")
        return settings

    def simulated_case(self, identifier: str, images: np.ndarray, properties: Any, settings: dict[str, Any],
                       seed: int, source: str) -> CaseMeasurement:
        """Measurements of fully sampled images ``(1, Z, H, W)``; the mask / views seeded per case."""
        if images.shape[0] != 1:
            raise NnDiffError(f"{source}: simulate mode reconstructs one image channel, got {images.shape[0]}")
        volume = torch.from_numpy(np.ascontiguousarray(images[0]))
        check_finite(volume, "image", source)
        h, w = volume.shape[-2:]
        if self.operator_kind == "ct_parallel":
            operator: LinearOperator = self.ct_operator((h, w), settings["num_views"])
            data = torch.stack([operator.forward(sl[None, None].double()).float()[0] for sl in volume.real])
            return CaseMeasurement(identifier, [operator] * volume.shape[0], data, properties, source,
                                   float(operator.sinogram_shape[0]), images[0],
                                   {"num_views": settings["num_views"]})
        from nndiff.inference.predictor import seed_for

        mask = undersampling_mask((h, w), settings["acceleration"], settings["center_fraction"],
                                  settings["mask_pattern"], seed=seed_for(seed, identifier + "/mask"))
        operator = SingleCoilMRI(mask, source)
        data = torch.stack([operator.forward(sl.to(torch.complex64)[None, None])[0] for sl in volume])
        return CaseMeasurement(identifier, [operator] * volume.shape[0], data, properties, source,
                               mask_acceleration(mask), images[0], {"mask_pattern": settings["mask_pattern"],
                                                                    "center_fraction": settings["center_fraction"]})

    def predict_simulated(self, input_dir: str | Path, output_dir: str | Path, seed: int = 0,
                          num_mc_samples: int = 1, **settings: Any) -> list[Path]:
        """Simulate mode: undersample every fully sampled ``{CASE}_0000{ending}`` of ``input_dir`` and
        reconstruct it; ``settings``: acceleration, center_fraction, mask_pattern, num_views."""
        from nndiff.dataset.io import read_images
        from nndiff.inference.files import find_input_cases

        resolved = self.simulation_settings(**settings)
        cases = []
        for item in find_input_cases(input_dir, self.file_ending, 1):
            images, properties = read_images(item.files)
            cases.append(self.simulated_case(item.identifier, images, properties, resolved, seed, str(item.files[0])))
        return self._predict_cases(cases, Path(output_dir), seed, num_mc_samples,
                                   {"mode": "simulate", "input_dir": str(input_dir), **resolved})
