"""Memorization check: is a generated sample a near-copy of a training case?

Synthetic medical images are shared to protect patients, so a sample that reproduces a training
image defeats the purpose. For every sample we report the nearest training case by SSIM (and by
L2), its SSIM, and which samples reach ``SSIM >= threshold`` (default 0.95, a level that noisy
re-acquisitions of the same anatomy rarely reach but a copy with small perturbations does).

Cost: exhaustive windowed SSIM of every sample against every training image is
``N_samples x N_train`` filtered products. By default only the ``candidates`` training images with
the highest Pearson correlation to the sample (one matrix product) plus its L2-nearest image are
scored with SSIM. A near-copy has correlation close to 1 and is among these candidates, so the
near-copy rate is unaffected in practice; ``candidates=None`` scores every pair.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from nndiff.evaluation.ssim import DEFAULT_SIGMA, DEFAULT_WIN_SIZE, ssim_pairs

#: SSIM at or above which a sample counts as a near-copy of a training case.
NEAR_COPY_SSIM = 0.95


@dataclass
class MemorizationResult:
    """Per-sample nearest training cases and the near-copy summary (JSON-ready via ``to_json``)."""

    threshold: float
    nearest_ssim_index: list[int]
    nearest_ssim: list[float]
    nearest_l2_index: list[int]
    nearest_l2_rmse: list[float]
    near_copy_indices: list[int]
    near_copy_rate: float
    candidates: int | None
    max_ssim: float
    mean_nearest_ssim: float

    def to_json(self) -> dict:
        """Plain dict of Python scalars and lists."""
        return asdict(self)


def _flatten(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1)


def _l2_nearest(samples: np.ndarray, training: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Index of and RMSE to the L2-nearest training image per sample (chunked matrix products)."""
    s, t = _flatten(samples), _flatten(training)
    t_sq = (t * t).sum(1)
    index = np.empty(len(s), dtype=np.int64)
    rmse = np.empty(len(s), dtype=np.float64)
    for start in range(0, len(s), chunk):
        part = s[start:start + chunk]
        dist2 = (part * part).sum(1)[:, None] + t_sq[None] - 2 * part @ t.T
        best = dist2.argmin(1)
        index[start:start + chunk] = best
        exact = ((part - t[best]) ** 2).mean(1)  # recompute exactly: the expansion loses precision
        rmse[start:start + chunk] = np.sqrt(exact)
    return index, rmse


def _correlation_candidates(samples: np.ndarray, training: np.ndarray, count: int) -> np.ndarray:
    """Per sample, the ``count`` training indices of highest Pearson correlation ``(N, count)``."""
    def standardise(x: np.ndarray) -> np.ndarray:
        x = _flatten(x)
        x = x - x.mean(1, keepdims=True)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norm > 0, norm, 1.0)

    corr = standardise(samples) @ standardise(training).T
    return np.argpartition(-corr, count - 1, axis=1)[:, :count]


def _score_candidates(
    samples: np.ndarray, training: np.ndarray, candidates: np.ndarray, data_range: float,
    win_size: int, sigma: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Best SSIM and its training index per sample among ``candidates`` ``(N, K)``."""
    num, k = candidates.shape
    sample_index = np.repeat(np.arange(num), k)
    values = np.empty(num * k, dtype=np.float64)
    step = 512
    for start in range(0, num * k, step):
        rows = sample_index[start:start + step]
        cols = candidates.ravel()[start:start + step]
        values[start:start + step] = ssim_pairs(samples[rows], training[cols], data_range, win_size, sigma)
    values = values.reshape(num, k)
    best = values.argmax(1)
    return candidates[np.arange(num), best], values[np.arange(num), best]


def memorization_check(
    samples: np.ndarray,
    training: np.ndarray,
    data_range: float,
    threshold: float = NEAR_COPY_SSIM,
    candidates: int | None = 32,
    win_size: int = DEFAULT_WIN_SIZE,
    sigma: float = DEFAULT_SIGMA,
) -> MemorizationResult:
    """Nearest training case per sample by SSIM and by L2, and the near-copy rate.

    ``samples`` ``(N, C, *spatial)`` and ``training`` ``(M, C, *spatial)`` share one shape (compare
    2D slices with 2D slices). ``candidates``: how many correlation-ranked training images are
    scored with SSIM per sample (``None`` = all); see the module docstring.
    """
    samples = np.asarray(samples, dtype=np.float64)
    training = np.asarray(training, dtype=np.float64)
    if samples.shape[1:] != training.shape[1:]:
        raise ValueError(f"sample shape {samples.shape[1:]} differs from training shape {training.shape[1:]}")
    l2_index, l2_rmse = _l2_nearest(samples, training)
    if candidates is None or candidates >= len(training):
        pool = np.tile(np.arange(len(training)), (len(samples), 1))
    else:
        # The L2-nearest image is always scored too, so SSIM never misses an exact copy.
        pool = np.concatenate([_correlation_candidates(samples, training, candidates), l2_index[:, None]], 1)
    ssim_index, ssim_value = _score_candidates(samples, training, pool, data_range, win_size, sigma)
    copies = np.flatnonzero(ssim_value >= threshold)
    return MemorizationResult(
        threshold=float(threshold),
        nearest_ssim_index=ssim_index.tolist(),
        nearest_ssim=ssim_value.tolist(),
        nearest_l2_index=l2_index.tolist(),
        nearest_l2_rmse=l2_rmse.tolist(),
        near_copy_indices=copies.tolist(),
        near_copy_rate=float(len(copies) / len(samples)),
        candidates=candidates,
        max_ssim=float(ssim_value.max()),
        mean_nearest_ssim=float(ssim_value.mean()),
    )
