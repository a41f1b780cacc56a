"""Denoising evaluation: clean reference images are degraded at fixed noise levels, denoised by a
:class:`~nndiff.tasks.denoising_predictor.DenoisingPredictor` with each strategy (K-sample mean), and
compared with the noisy input and the classical baselines (non-local means, total variation) in the
same run.

Per level and case, in original units: PSNR and SSIM with ``data_range`` = the clean image's maximum
(the noise levels are fractions of it), for ``noisy``, every strategy and every baseline, and each
method's PSNR gain over the noisy input. The baselines get the true noise std (level x maximum for
Gaussian / Rician; estimated from the image otherwise). ``summary.json`` holds the settings, the
per-case values and the mean over cases per level and method. See ``documentation/denoising.md``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from nndiff.diffusion.options import Degradation, parse_option
from nndiff.errors import NnDiffError
from nndiff.evaluation.image_quality import denoising_baselines, psnr, ssim
from nndiff.tasks.degradations import CTProjector, DegradationError, simulate
from nndiff.utils.files import save_json

logger = logging.getLogger(__name__)

#: Rician / Gaussian noise std as a fraction of the image maximum (issue 5's protocol).
DEFAULT_LEVELS = (0.02, 0.05, 0.1)
SUMMARY_FILE = "summary.json"


def photon_levels(photons: Sequence[float]) -> tuple[float, ...]:
    """CT photon counts per ray -> the relative levels :func:`simulate` takes (1 / sqrt(I0))."""
    if any(not p > 0 for p in photons):
        raise DegradationError(f"photon counts must be > 0, got {list(photons)}")
    return tuple(float(p) ** -0.5 for p in photons)


def degrade_case(clean: np.ndarray, kind: Degradation, level: float, seed: int,
                 ct: CTProjector | None = None) -> np.ndarray:
    """A seeded noisy copy of one clean case ``(C, *spatial)`` (reference = the case's maximum)."""
    generator = torch.Generator().manual_seed(int(seed))
    image = torch.from_numpy(np.asarray(clean, dtype=np.float64))
    reference = float(np.abs(clean).max()) or 1.0
    noisy = simulate(kind, image, level, generator, reference=None if ct is not None else reference, ct=ct)
    return noisy.numpy()


def quality(prediction: np.ndarray, clean: np.ndarray, data_range: float, noisy_psnr: float | None) -> dict[str, float]:
    """PSNR, SSIM and (when the noisy PSNR is given) the PSNR gain over the noisy input."""
    values = {"psnr": psnr(prediction, clean, data_range), "ssim": ssim(prediction, clean, data_range)}
    if noisy_psnr is not None:
        values["psnr_gain"] = values["psnr"] - noisy_psnr
    return values


def denoise_mean(predictor: Any, noisy: np.ndarray, properties: Any, identifier: str, seed: int,
                 num_samples: int) -> np.ndarray:
    """The mean of ``num_samples`` predictions of one noisy case, in original units."""
    case = predictor.prepare_case(noisy.astype(np.float32), properties, identifier)
    samples = predictor._run_case(case, seed, num_samples).float().cpu().numpy()
    samples = samples if num_samples > 1 else samples[None]
    return np.mean([predictor.invert(s, case.case_json)[0] for s in samples], axis=0)


def _means(per_case: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    methods = sorted({m for case in per_case.values() for m in case})
    out: dict[str, dict[str, float]] = {}
    for method in methods:
        rows = [case[method] for case in per_case.values() if method in case]
        out[method] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    return out


def evaluate_denoising(predictor: Any, cases: Sequence[tuple[str, np.ndarray, Any]], output_dir: str | Path, *,
                       degradation: str = "rician", levels: Sequence[float] = DEFAULT_LEVELS,
                       strategies: Sequence[str] = ("conditional", "warm_start"), num_samples: int = 2,
                       seed: int = 0, ct: CTProjector | None = None, baselines: bool = True) -> dict[str, Any]:
    """Evaluate ``predictor`` on clean ``cases`` (``(identifier, array (C, Z, Y, X), ImageProperties)``,
    original units) degraded at each of ``levels``; writes and returns ``output_dir/summary.json``.

    ``degradation``: gaussian | rician | poisson (with ``ct``: low-dose CT, levels from
    :func:`photon_levels`). Each case's noise is seeded by ``(seed, level index, case index)``.
    """
    if not cases:
        raise NnDiffError("evaluate_denoising got no clean cases. Fix: pass (identifier, array, properties) tuples")
    if num_samples < 1:
        raise NnDiffError(f"num_samples must be >= 1, got {num_samples}")
    try:
        kind = parse_option(Degradation, degradation, "degradation type")
    except ValueError as error:
        raise DegradationError(f"evaluate_denoising: {error}") from None
    table: dict[str, Any] = {}
    for li, level in enumerate(levels):
        per_case: dict[str, dict[str, dict[str, float]]] = {}
        for ci, (identifier, clean, properties) in enumerate(cases):
            clean = np.asarray(clean, dtype=np.float64)
            data_range = float(clean.max())
            if data_range <= 0:
                raise NnDiffError(f"case {identifier}: the clean image's maximum is {data_range:g}; PSNR relative "
                                  "to the maximum needs a positive one. Fix: check the reference images")
            noisy = degrade_case(clean, kind, float(level), seed * 1_000 + li * 100 + ci, ct)
            base = quality(noisy, clean, data_range, None)
            row: dict[str, dict[str, float]] = {"noisy": base}
            for strategy in strategies:
                predictor.strategy = strategy
                mean = denoise_mean(predictor, noisy, properties, identifier, seed, num_samples)
                row[strategy] = quality(mean, clean, data_range, base["psnr"])
            if baselines:
                known = float(level) * data_range if kind is not Degradation.POISSON else None
                for name, output in denoising_baselines(noisy, known).items():
                    row[name] = quality(output, clean, data_range, base["psnr"])
            per_case[identifier] = row
            logger.info("level %g, %s: %s", level, identifier,
                        {m: round(v["psnr"], 2) for m, v in row.items()})
        table[f"{float(level):g}"] = {"mean": _means(per_case), "per_case": per_case}
    summary = {"settings": {"degradation": kind.value, "levels": [float(v) for v in levels],
                            "level_meaning": "noise std / image maximum" if kind is not Degradation.POISSON
                            else "1 / sqrt(counts or photons)", "strategies": list(strategies),
                            "num_samples": num_samples, "seed": seed, "data_range": "clean image maximum",
                            "num_cases": len(cases), "baselines": baselines},
               "levels": table}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_json(summary, output_dir / SUMMARY_FILE)
    return summary
