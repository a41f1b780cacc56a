"""Reconstruction evaluation: PSNR, SSIM, NMSE of reconstructions against the fully sampled
reference (fastMRI's definitions), the zero-filled / FBP baseline in the same table, and the
data-consistency residual the predictor recorded.

Definitions (fastMRI, Zbontar et al. 2018, on magnitude images, per case = per volume):
NMSE = ||ref - rec||^2 / ||ref||^2; PSNR = 10 log10(max(ref)^2 / MSE) with data range max(ref);
SSIM with data range max(ref) (window 7; :mod:`nndiff.evaluation.image_quality`'s Gaussian-weighted
SSIM, where fastMRI uses a uniform 7x7 window, so values differ slightly). fastMRI's centre crop
(320 x 320 for its knee data) is ``crop=(H, W)``: both images are centre-cropped before the metrics
(off by default; synthetic data has no oversampled readout). See documentation/reconstruction.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nndiff.errors import NnDiffError
from nndiff.evaluation.image_quality import nmse, psnr, ssim
from nndiff.utils.files import load_json, save_json

BASELINE_DIR = "baseline"
INFO_FILE = "reconstruction_info.json"
SSIM_WIN_SIZE = 7
METRICS = ("psnr", "ssim", "nmse")
_SKIP_SUFFIXES = ("_std", "_complex")


def centre_crop(image: np.ndarray, crop: Sequence[int] | None) -> np.ndarray:
    """The centre ``crop`` = (H, W) of the last two axes (no crop where the image is smaller)."""
    if crop is None:
        return image
    index = [slice(None)] * (image.ndim - 2)
    for size, want in zip(image.shape[-2:], crop):
        want = min(int(want), size)
        start = (size - want) // 2
        index.append(slice(start, start + want))
    return image[tuple(index)]


def case_metrics(reconstruction: np.ndarray, reference: np.ndarray, crop: Sequence[int] | None = None) -> dict[str, float]:
    """PSNR / SSIM / NMSE of one case's magnitudes ``(C, Z, Y, X)`` (fastMRI definitions)."""
    rec = centre_crop(np.abs(np.asarray(reconstruction)).astype(np.float64), crop)
    ref = centre_crop(np.abs(np.asarray(reference)).astype(np.float64), crop)
    if rec.shape != ref.shape:
        raise NnDiffError(f"reconstruction shape {rec.shape} differs from reference shape {ref.shape}")
    data_range = float(ref.max())
    if data_range <= 0:
        raise NnDiffError("the reference image is all zero; PSNR/SSIM/NMSE are undefined")
    win = min(SSIM_WIN_SIZE, *[n if n % 2 else n - 1 for n in ref.shape[-2:]])
    slices = ref.reshape(-1, *ref.shape[-2:])  # SSIM slice by slice (2D), as fastMRI
    rec_slices = rec.reshape(-1, *rec.shape[-2:])
    ssim_value = float(np.mean([ssim(p[None], r[None], data_range, win_size=win) for p, r in zip(rec_slices, slices)]))
    return {"psnr": psnr(rec, ref, data_range), "ssim": ssim_value, "nmse": nmse(rec, ref)}


def _split_name(path: Path) -> tuple[str, str]:
    name = path.name
    dot = name.find(".")
    return (name, "") if dot < 0 else (name[:dot], name[dot:])


def _prediction_cases(folder: Path) -> dict[str, Path]:
    cases = {}
    for path in sorted(folder.iterdir()):
        identifier, ending = _split_name(path)
        if path.is_file() and ending and ending != ".json" and not identifier.endswith(_SKIP_SUFFIXES):
            cases[identifier] = path
    return cases


def _reference_file(folder: Path, identifier: str, ending: str) -> Path:
    for name in (f"{identifier}_0000{ending}", f"{identifier}{ending}"):
        if (folder / name).is_file():
            return folder / name
    raise NnDiffError(f"{folder}: no reference {identifier}_0000{ending} (or {identifier}{ending}) for the "
                      f"reconstruction of case {identifier}. Fix: pass the folder of the fully sampled images")


def _mean(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in METRICS} if rows else {}


def evaluate_reconstruction(prediction_dir: str | Path, reference_dir: str | Path,
                            output_file: str | Path | None = None, crop: Sequence[int] | None = None) -> dict[str, Any]:
    """Metrics of every ``{CASE}{ending}`` in ``prediction_dir`` (written by ReconstructionPredictor)
    against ``reference_dir/{CASE}_0000{ending}``; the ``baseline/`` reconstructions in the same table;
    the DC residual from ``reconstruction_info.json``. Returns (and writes to ``output_file``)
    ``{"cases": {id: {"reconstruction": {...}, "baseline": {...}, "dc_residual": r}}, "mean": {...}}``."""
    from nndiff.dataset.io import read_images

    prediction_dir, reference_dir = Path(prediction_dir), Path(reference_dir)
    if not prediction_dir.is_dir():
        raise NnDiffError(f"prediction folder {prediction_dir} does not exist. Fix: run the prediction first")
    cases = _prediction_cases(prediction_dir)
    if not cases:
        raise NnDiffError(f"{prediction_dir} holds no reconstructions. Fix: pass nndiff_predict's output folder")
    info_path = prediction_dir / INFO_FILE
    info = load_json(info_path).get("cases", {}) if info_path.is_file() else {}
    table: dict[str, Any] = {}
    for identifier, path in cases.items():
        ending = _split_name(path)[1]
        reference, _ = read_images([_reference_file(reference_dir, identifier, ending)])
        reconstruction, _ = read_images([path])
        row: dict[str, Any] = {"reconstruction": case_metrics(reconstruction, reference, crop)}
        baseline = prediction_dir / BASELINE_DIR / path.name
        if baseline.is_file():
            row["baseline"] = case_metrics(read_images([baseline])[0], reference, crop)
        if identifier in info and "dc_residual" in info[identifier]:
            row["dc_residual"] = float(info[identifier]["dc_residual"])
        table[identifier] = row
    rows = list(table.values())
    mean: dict[str, Any] = {"reconstruction": _mean([r["reconstruction"] for r in rows])}
    baselines = [r["baseline"] for r in rows if "baseline" in r]
    if baselines:
        mean["baseline"] = _mean(baselines)
        mean["psnr_gain_over_baseline"] = mean["reconstruction"]["psnr"] - mean["baseline"]["psnr"]
    residuals = [r["dc_residual"] for r in rows if "dc_residual" in r]
    if residuals:
        mean["dc_residual"] = float(np.mean(residuals))
    summary = {"num_cases": len(table), "crop": list(crop) if crop else None, "cases": table, "mean": mean}
    if output_file is not None:
        save_json(summary, Path(output_file))
    return summary
