"""Distribution distances: intensity Wasserstein-1, Fréchet distance and kernel (KID) distance.

Fréchet and kernel distances work in the feature space of a user-supplied TorchScript model
(``torch.jit.load``); nnDiff ships no feature network, because ImageNet features say little about
medical images and a domain model is the user's choice. Without one those metrics are skipped.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from nndiff.errors import NnDiffError

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]

#: Above this many intensity values per set, W1 is computed on evenly spaced quantiles.
DEFAULT_MAX_INTENSITY_VALUES = 1_000_000


# --------------------------------------------------------------------------- intensity histogram
def _quantiles(values: np.ndarray, count: int) -> np.ndarray:
    """``count`` mid-point quantiles ``(k + 0.5) / count`` of ``values`` (deterministic subsample)."""
    levels = (np.arange(count) + 0.5) / count
    # inverted-CDF quantiles by one sort and indexing: np.quantile with 10^6 levels partitions once
    # per level and took minutes on 1.6 M values (64 samples of 160x160).
    ordered = np.sort(values, kind="stable")
    index = np.clip(np.ceil(levels * ordered.size).astype(np.int64) - 1, 0, ordered.size - 1)
    return ordered[index]


def wasserstein1(a: np.ndarray, b: np.ndarray, max_values: int = DEFAULT_MAX_INTENSITY_VALUES) -> float:
    """Wasserstein-1 distance between the empirical distributions of two value arrays.

    Exact (``scipy.stats.wasserstein_distance``) when both have at most ``max_values`` values;
    otherwise both are replaced by their ``max_values`` mid-point quantiles, which is deterministic
    and, because W1 is the L1 distance between quantile functions, errs by at most the mean
    quantile-step width (tiny for 10^6 levels).
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("Wasserstein distance needs non-empty value sets")
    if a.size > max_values:
        a = _quantiles(a, max_values)
    if b.size > max_values:
        b = _quantiles(b, max_values)
    return float(wasserstein_distance(a, b))


def intensity_wasserstein(
    generated: list[np.ndarray], real: list[np.ndarray], max_values: int = DEFAULT_MAX_INTENSITY_VALUES
) -> dict:
    """Per-channel W1 between all generated and all real intensities (original units).

    ``generated`` and ``real`` are lists of ``(C, *spatial)`` images with the same channel count.
    Returns ``{"per_channel": [...], "mean": float}``.
    """
    channels = {image.shape[0] for image in generated} | {image.shape[0] for image in real}
    if len(channels) != 1:
        raise ValueError(f"channel counts differ between images: {sorted(channels)}")
    per_channel = []
    for channel in range(channels.pop()):
        gen_values = np.concatenate([image[channel].ravel() for image in generated])
        real_values = np.concatenate([image[channel].ravel() for image in real])
        per_channel.append(wasserstein1(gen_values, real_values, max_values))
    return {"per_channel": per_channel, "mean": float(np.mean(per_channel))}


# --------------------------------------------------------------------------- feature extraction
def load_feature_extractor(path: Union[str, Path]) -> FeatureExtractor:
    """Load a feature extractor on the CPU: TorchScript (``torch.jit.load``) or, for a ``.pt2``
    file, a ``torch.export`` program (TorchScript is deprecated in recent PyTorch; export is its
    successor; export it with a dynamic batch dimension).

    The model takes a float32 batch ``(B, C, *spatial)`` in original intensity units (rescale
    inside the model if it expects another range) and returns ``(B, F)`` features (extra axes
    are flattened).
    """
    path = Path(path)
    if not path.is_file():
        raise NnDiffError(f"feature extractor {path} does not exist. Fix: pass a TorchScript file "
                          "saved with torch.jit.save(torch.jit.script(model), path)")
    if path.suffix == ".pt2":
        return _load_exported(path)
    try:
        with warnings.catch_warnings():
            # The user chose TorchScript; its deprecation notice is not actionable here.
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as error:
        raise NnDiffError(f"{path} is not a TorchScript model ({error}). Fix: save it with "
                          "torch.jit.save(torch.jit.script(model), path)") from error
    return model.eval()


def _load_exported(path: Path) -> FeatureExtractor:
    try:
        program = torch.export.load(str(path))
    except Exception as error:  # torch raises several types for a bad archive
        raise NnDiffError(f"{path} is not a torch.export program ({error}). Fix: save it with "
                          "torch.export.save(torch.export.export(model, args), path)") from error
    return program.module()


def _same_shape_run_end(images: list[np.ndarray], start: int, limit: int) -> int:
    """End of the run of consecutive images shaped like ``images[start]`` (at most ``limit``).

    Held-out 3D cases may differ in size, so only same-shape neighbours share a batch.
    """
    stop = start + 1
    while stop < len(images) and stop - start < limit and images[stop].shape == images[start].shape:
        stop += 1
    return stop


def extract_features(
    extractor: FeatureExtractor, images: list[np.ndarray], batch_size: int = 32
) -> np.ndarray:
    """Features ``(N, F)`` (float64) of ``(C, *spatial)`` images; same-shape runs are batched."""
    features = []
    with torch.no_grad():
        start = 0
        while start < len(images):
            stop = _same_shape_run_end(images, start, batch_size)
            batch = torch.as_tensor(np.stack(images[start:stop]), dtype=torch.float32)
            output = extractor(batch)
            features.append(output.reshape(output.shape[0], -1).double().numpy())
            start = stop
    return np.concatenate(features)


# --------------------------------------------------------------------------- Fréchet distance
def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((Σ1 Σ2)^½)`` via the symmetric form ``Σ1^½ Σ2 Σ1^½`` (same eigenvalues, PSD, stable)."""
    eigvals, eigvecs = np.linalg.eigh(sigma1)
    root1 = (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T
    middle = root1 @ sigma2 @ root1
    middle = (middle + middle.T) / 2  # symmetrise round-off
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0, None)).sum())


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """``‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)`` for Gaussians fitted to two feature sets."""
    mean_term = float(np.sum((mu1 - mu2) ** 2))
    cov_term = float(np.trace(sigma1) + np.trace(sigma2)) - 2 * _trace_sqrt_product(sigma1, sigma2)
    return max(mean_term + cov_term, 0.0)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, ``N − 1``) of ``(N, F)`` features; needs ``N ≥ 2``."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least two feature vectors (N, F), got shape {features.shape}")
    return features.mean(0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between two ``(N, F)`` feature sets (FID when the features are Inception's)."""
    return frechet_distance_from_stats(*feature_statistics(features1), *feature_statistics(features2))


# --------------------------------------------------------------------------- kernel distance
def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``k(x, y) = (x·y / F + 1)^3``, the KID kernel (Bińkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the polynomial kernel (diagonals excluded); needs two vectors per set."""
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("unbiased MMD needs at least two feature vectors per set")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    term_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_x + term_y - 2 * k_xy.mean())


def kernel_distance(
    features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
    seed: int = 0,
) -> dict:
    """KID: unbiased polynomial-kernel MMD² averaged over random subsets (seeded, deterministic).

    ``subset_size`` is capped at the smaller set's size; when that uses every vector of both sets
    one subset suffices (all subsets would be equal). Returns ``{"mean", "std", "num_subsets",
    "subset_size"}``; the unbiased estimate can be slightly negative when the sets match.
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    size = min(subset_size, len(x), len(y))
    if len(x) == size and len(y) == size:
        num_subsets = 1
    rng = np.random.default_rng(seed)
    values = [
        mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
        for _ in range(num_subsets)
    ]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)),
            "num_subsets": num_subsets, "subset_size": size}
