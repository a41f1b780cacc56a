"""Evaluation of image-to-image translation: predicted targets against reference targets.

Per case, in original units (HU for CT): MAE, PSNR and SSIM over the whole image and inside a body
mask; with Monte-Carlo predictions (``{CASE}_std`` files) the Pearson correlation between the
predicted standard deviation and the absolute error (is the uncertainty where the errors are?).

Definitions (documentation/translation.md, "Evaluation"):

* PSNR = 10 log10(L² / MSE) with one dataset-level data range L (``data_range``; default max − min
  over all reference images), so cases are comparable. MAE = mean |pred − ref|.
* SSIM: Gaussian window (σ 1.5, 11 taps, fewer when an in-plane side is shorter), C1 = (0.01 L)²,
  C2 = (0.03 L)², computed per 2D slice (array axis 0 of a volume: anisotropic volumes are usually
  thick in z) with reflect padding so the SSIM map covers every voxel; overall SSIM is the mean of
  the map, body SSIM its mean inside the mask. Several target channels: mean over channels.
* Body mask, from the reference (first target channel): voxels above ``body_threshold`` (original
  units), by default lo + 0.1 (hi − lo) with lo / hi the 1st / 99th percentiles of the case
  (−822 HU for a CT with air at −1024 and bone at 1000), the largest connected component, then
  holes filled per slice, so air inside the body (lungs, bowel gas) counts as body.
* Uncertainty: Pearson r between the std map and |pred − ref| over all voxels and over the body
  mask, per case, and pooled over the voxels of all cases.

MAE, PSNR, the body mask and the std-error correlation are those of
``nndiff.evaluation.image_quality``. SSIM is this module's own per-slice, full-size map: thick-slice
volumes often have fewer slices than a 3D SSIM window, and a map covering every voxel can be
averaged inside the body mask.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from nndiff.errors import DatasetError, NnDiffError
from nndiff.evaluation import image_quality as iq
from nndiff.evaluation.image_quality import BODY_FRACTION, BODY_PERCENTILES
from nndiff.utils.files import load_json, save_json

logger = logging.getLogger(__name__)

PathLike = str | Path
SSIM_WIN_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
STD_SUFFIX = "_std"
#: Metrics averaged over cases in the summary.
CASE_METRICS = ("mae", "psnr", "ssim", "mae_body", "psnr_body", "ssim_body", "body_fraction",
                "mean_std", "uncertainty_error_pearson", "uncertainty_error_pearson_body")


# ----------------------------------------------------------------------------------------------
# Metrics (numpy / torch, original units)
# ----------------------------------------------------------------------------------------------
def _expand(mask: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    return np.broadcast_to(mask, like.shape) if mask is not None else np.ones(like.shape, bool)


def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    return kernel / kernel.sum()


def ssim_map(prediction: np.ndarray, reference: np.ndarray, data_range: float) -> np.ndarray:
    """Per-voxel SSIM of ``(C, Z, Y, X)`` images, computed per z slice (see module docstring)."""
    x = torch.from_numpy(np.ascontiguousarray(prediction, dtype=np.float64))
    y = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float64))
    shape = x.shape
    x, y = x.reshape(-1, 1, *shape[-2:]), y.reshape(-1, 1, *shape[-2:])
    size = min(SSIM_WIN_SIZE, *(s if s % 2 else s - 1 for s in shape[-2:]))
    kernel = _gaussian_kernel(max(size, 1), SSIM_SIGMA)
    half = kernel.numel() // 2

    def blur(image: torch.Tensor) -> torch.Tensor:
        padded = F.pad(image, (half, half, half, half), mode="reflect") if half else image
        out = F.conv2d(padded, kernel.view(1, 1, -1, 1))
        return F.conv2d(out, kernel.view(1, 1, 1, -1))

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return value.reshape(shape).numpy()


def body_mask(reference: np.ndarray, threshold: float | None = None,
              fraction: float = BODY_FRACTION) -> tuple[np.ndarray, float]:
    """``(Z, Y, X)`` body mask of a reference ``(C, Z, Y, X)`` (first channel) and the threshold used:
    :func:`nndiff.evaluation.image_quality.body_mask` (threshold, largest component, holes filled
    per slice), with the default threshold made explicit for the summary."""
    channel = reference[0].astype(np.float64)
    if threshold is None:
        low, high = np.percentile(channel, BODY_PERCENTILES)
        threshold = float(low + fraction * (high - low))
    return iq.body_mask(channel, threshold), float(threshold)


def case_metrics(prediction: np.ndarray, reference: np.ndarray, data_range: float, std: np.ndarray | None = None,
                 body_threshold: float | None = None) -> dict[str, Any]:
    """Every metric of one case (arrays ``(C, Z, Y, X)`` in original units)."""
    mask, threshold = body_mask(reference, body_threshold)
    ssim_values = ssim_map(prediction, reference, data_range)
    has_body = bool(mask.any())
    out: dict[str, Any] = {
        "mae": iq.mae(prediction, reference), "psnr": iq.psnr(prediction, reference, data_range),
        "ssim": float(ssim_values.mean()),
        "mae_body": iq.mae(prediction, reference, mask) if has_body else None,
        "psnr_body": iq.psnr(prediction, reference, data_range, mask) if has_body else None,
        "ssim_body": float(ssim_values[_expand(mask, ssim_values)].mean()) if has_body else None,
        "body_fraction": float(mask.mean()), "body_threshold": threshold,
        "mean_std": None, "uncertainty_error_pearson": None, "uncertainty_error_pearson_body": None,
    }
    if std is not None:
        out["mean_std"] = float(std.mean())
        out["uncertainty_error_pearson"] = iq.uncertainty_error_correlation(std, prediction, reference)
        if has_body:
            out["uncertainty_error_pearson_body"] = iq.uncertainty_error_correlation(std, prediction, reference, mask)
    return out


# ----------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------
@dataclass
class CaseFiles:
    """Reference, prediction and (optional) std files of one case, one path per target channel."""

    identifier: str
    reference: list[Path]
    prediction: list[Path]
    std: list[Path] | None


def _dataset_settings(dataset_json: PathLike | Mapping[str, Any] | None,
                      reference_dir: Path) -> tuple[int, str]:
    """``(number of target channels, file ending)`` from dataset.json, else from the reference names."""
    if dataset_json is not None:
        data = dict(dataset_json) if isinstance(dataset_json, Mapping) else _load_dataset_json(Path(dataset_json))
        names = data.get("target_names")
        if not isinstance(names, Mapping) or not names:
            raise NnDiffError(f"dataset.json has no 'target_names' (task {data.get('task')!r}); translation is "
                              "evaluated on targets. Fix: pass the translation dataset's dataset.json")
        return len(names), str(data.get("file_ending", ".nii.gz"))
    from nndiff.evaluation.folders import _image_files, folder_file_ending

    files = _image_files(reference_dir, "reference")
    ending = folder_file_ending(files, reference_dir, "reference")
    channels = {p.name[: -len(ending)][-4:] for p in files}
    return max(1, len([c for c in channels if c.isdigit()])), ending


def _load_dataset_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError([(path, "does not exist", "pass the dataset's dataset.json")])
    return load_json(path)


def pair_case_files(reference_dir: PathLike, prediction_dir: PathLike, num_targets: int,
                    file_ending: str) -> list[CaseFiles]:
    """Reference cases (``{CASE}_{XXXX}{ending}``, the dataset layout of targetsTs/targetsTr) with
    their predictions as ``nndiff_predict`` writes them (``{CASE}{ending}`` for one target,
    ``{CASE}_{XXXX}{ending}`` for several; ``{CASE}_std...`` for Monte-Carlo std). A reference case
    without its prediction is an error; std files must exist for all cases or none."""
    from nndiff.dataset.discovery import scan_channel_folder
    from nndiff.inference.files import output_paths

    reference_dir, prediction_dir = Path(reference_dir), Path(prediction_dir)
    for folder, role in ((reference_dir, "reference"), (prediction_dir, "prediction")):
        if not folder.is_dir():
            raise DatasetError([(folder, f"{role} folder does not exist", "pass an existing folder")])
    found, problems = scan_channel_folder(reference_dir, file_ending, num_targets, "target")
    pairs: list[CaseFiles] = []
    for identifier, channels in sorted(found.items()):
        missing = [c for c in range(num_targets) if c not in channels]
        if missing:
            problems.append((str(reference_dir / identifier), f"target file(s) {missing} missing",
                             "add every target channel of the case"))
            continue
        prediction = output_paths(prediction_dir, identifier, num_targets, file_ending)
        absent = [p.name for p in prediction if not p.is_file()]
        if absent:
            problems.append((str(prediction_dir / absent[0]), f"missing: no prediction for reference case {identifier}",
                             "predict every reference case (nndiff_predict -i ...) or remove it from the reference"))
            continue
        std = output_paths(prediction_dir, identifier, num_targets, file_ending, suffix=STD_SUFFIX)
        pairs.append(CaseFiles(identifier, [channels[c] for c in range(num_targets)], prediction,
                               std if all(p.is_file() for p in std) else None))
    if not pairs and not problems:
        problems.append((str(reference_dir), f"holds no {{CASE}}_{{XXXX}}{file_ending} reference targets",
                         "pass the folder of reference targets (e.g. targetsTs)"))
    with_std = [p.identifier for p in pairs if p.std is not None]
    if with_std and len(with_std) != len(pairs):
        lacking = [p.identifier for p in pairs if p.std is None]
        problems.append((str(prediction_dir), f"std maps exist for {len(with_std)} case(s) but not for "
                         f"{', '.join(lacking[:5])}", "predict all cases with the same --num_samples"))
    if problems:
        raise DatasetError([tuple(p) for p in problems])  # type: ignore[misc]
    return pairs


def _read_pair(case: CaseFiles) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Reference, prediction and std arrays of one case; shape and spacing must agree."""
    from nndiff.dataset.io import read_images

    reference, ref_props = read_images(case.reference)
    prediction, pred_props = read_images(case.prediction)
    std = read_images(case.std)[0] if case.std is not None else None
    if prediction.shape != reference.shape:
        raise DatasetError([(case.prediction[0], f"has shape {list(prediction.shape[1:])} but the reference "
                             f"{case.reference[0].name} has {list(reference.shape[1:])}",
                             "predict on the reference's grid (nndiff_predict keeps the input geometry)")])
    if not np.allclose(pred_props.spacing, ref_props.spacing, rtol=1e-3):
        raise DatasetError([(case.prediction[0], f"has spacing {list(pred_props.spacing)} but the reference has "
                             f"{list(ref_props.spacing)}", "predict from the images of the reference case")])
    if std is not None and std.shape != prediction.shape:
        raise DatasetError([(case.std[0], f"has shape {list(std.shape[1:])}, the prediction "  # type: ignore[index]
                             f"{list(prediction.shape[1:])}", "write mean and std in one nndiff_predict run")])
    return reference.astype(np.float64), prediction.astype(np.float64), None if std is None else std.astype(np.float64)


def _finite_or_none(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _mean_over_cases(per_case: Mapping[str, Mapping[str, Any]], key: str) -> float | None:
    """Mean of a metric over the cases that have it (an infinite PSNR makes the mean infinite)."""
    values = [float(v[key]) for v in per_case.values() if v.get(key) is not None]
    return float(np.mean(values)) if values else None


def evaluate_translation_folders(reference_dir: PathLike, prediction_dir: PathLike, *,
                                 dataset_json: PathLike | Mapping[str, Any] | None = None,
                                 data_range: float | None = None, body_threshold: float | None = None,
                                 output_file: PathLike | None = None) -> dict[str, Any]:
    """Evaluate predicted targets against reference targets; returns (and writes) the summary.

    ``reference_dir``: ``{CASE}_{XXXX}{ending}`` targets (targetsTs layout). ``prediction_dir``:
    nndiff_predict output. ``dataset_json``: path or dict (target count and file ending); without
    it they are read from the reference names. ``data_range``: L of PSNR/SSIM in original units
    (default: max − min over the reference images). ``body_threshold``: body mask threshold in
    original units (default: the percentile rule of the module docstring). ``output_file``:
    default ``prediction_dir/summary.json``. Non-finite values (PSNR of a perfect case) are null.
    """
    reference_dir, prediction_dir = Path(reference_dir), Path(prediction_dir)
    num_targets, ending = _dataset_settings(dataset_json, reference_dir)
    cases = pair_case_files(reference_dir, prediction_dir, num_targets, ending)
    arrays = {case.identifier: _read_pair(case) for case in cases}
    if data_range is None:
        low = min(float(ref.min()) for ref, _, _ in arrays.values())
        high = max(float(ref.max()) for ref, _, _ in arrays.values())
        range_value, source = high - low, "max - min over the reference images"
    else:
        range_value, source = float(data_range), "given"
    if not range_value > 0 or not math.isfinite(range_value):
        raise NnDiffError(f"data range {range_value} must be a positive finite number (references in {reference_dir} "
                          "are constant?). Fix: pass data_range (--data_range) in original units")
    per_case = {}
    pooled_std, pooled_error = [], []
    for identifier, (reference, prediction, std) in arrays.items():
        per_case[identifier] = case_metrics(prediction, reference, range_value, std, body_threshold)
        if std is not None:
            mask, _ = body_mask(reference, body_threshold)
            full = _expand(mask, reference)
            pooled_std.append(std[full])
            pooled_error.append(np.abs(prediction - reference)[full])
    mean = {key: _mean_over_cases(per_case, key) for key in CASE_METRICS}
    # pooled over the body voxels of all cases: r of the concatenated std and |error| values
    pooled = None
    if pooled_std:
        error = np.concatenate(pooled_error)  # |error| against a zero reference is the error itself
        pooled = iq.uncertainty_error_correlation(np.concatenate(pooled_std), error, np.zeros_like(error))
    summary = {
        "task": "translation",
        "settings": {"data_range": range_value, "data_range_source": source, "body_threshold": body_threshold,
                     "body_rule": ("reference > body_threshold" if body_threshold is not None else
                                   f"reference > p{BODY_PERCENTILES[0]:g} + {BODY_FRACTION} (p{BODY_PERCENTILES[1]:g} "
                                   f"- p{BODY_PERCENTILES[0]:g}) per case (first target channel)")
                                  + ", largest connected component, holes filled per slice",
                     "ssim": f"per 2D slice, Gaussian window sigma {SSIM_SIGMA}, {SSIM_WIN_SIZE} taps, reflect padding"},
        "inputs": {"reference": str(reference_dir), "prediction": str(prediction_dir), "num_cases": len(cases),
                   "num_targets": num_targets, "file_ending": ending,
                   "with_uncertainty": bool(pooled_std)},
        "mean": {k: _finite_or_none(v) for k, v in mean.items()},
        "uncertainty_error_pearson_pooled_body": pooled,
        "per_case": {c: {k: _finite_or_none(v) for k, v in m.items()} for c, m in per_case.items()},
        "skipped": {} if pooled_std else {"uncertainty": "no {CASE}_std files (predict with --num_samples K > 1)"},
    }
    output = Path(output_file) if output_file is not None else prediction_dir / "summary.json"
    save_json(summary, output)
    logger.info("translation evaluation of %d case(s) written to %s", len(cases), output)
    return summary


def format_translation_table(summary: Mapping[str, Any]) -> str:
    """Short table of the mean metrics of a translation summary."""
    mean = summary["mean"]

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.4g}"

    rows = [("cases", str(summary["inputs"]["num_cases"])),
            ("data range (original units)", f"{fmt(summary['settings']['data_range'])} "
                                            f"({summary['settings']['data_range_source']})"),
            ("MAE overall / body", f"{fmt(mean['mae'])} / {fmt(mean['mae_body'])}"),
            ("PSNR overall / body (dB)", f"{fmt(mean['psnr'])} / {fmt(mean['psnr_body'])}"),
            ("SSIM overall / body", f"{fmt(mean['ssim'])} / {fmt(mean['ssim_body'])}"),
            ("std-error Pearson r (body, pooled)", fmt(summary["uncertainty_error_pearson_pooled_body"]))]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)

