"""Intensity statistics that combine across cases and worker processes deterministically.

Mean, std, min and max are exact over every voxel (per-case count/mean/M2 merged with Chan et
al.'s parallel formula). Median and the 0.5 / 99.5 percentiles come from a seeded sample of at
most ``max_samples`` voxels per case, all voxels when the case has fewer (so tiny datasets get
exact values; large ones weight cases equally, as nnU-Net's sampling does).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

STAT_KEYS = ("mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5")


@dataclass
class PartialStats:
    """Mergeable statistics of one set of voxels."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    min: float = float("inf")
    max: float = float("-inf")
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    @classmethod
    def from_values(cls, values: np.ndarray, max_samples: int, rng: np.random.Generator) -> "PartialStats":
        """Statistics of ``values`` (any shape) with a seeded sample for the percentiles."""
        flat = np.asarray(values, dtype=np.float64).ravel()
        if flat.size == 0:
            return cls()
        mean = float(flat.mean())
        m2 = float(np.sum((flat - mean) ** 2))
        return cls(flat.size, mean, m2, float(flat.min()), float(flat.max()),
                   sample_values(flat, max_samples, rng))

    def merge(self, other: "PartialStats") -> "PartialStats":
        """Statistics of the union of both voxel sets (order of merging does not matter)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / count
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / count
        return PartialStats(count, mean, m2, min(self.min, other.min), max(self.max, other.max),
                            np.concatenate([self.samples, other.samples]))

    def summary(self) -> dict[str, float]:
        """nnU-Net's keys: mean, median, std, min, max, percentile_00_5, percentile_99_5."""
        if self.count == 0:
            return {k: float("nan") for k in STAT_KEYS}
        median, p005, p995 = np.percentile(self.samples.astype(np.float64), [50.0, 0.5, 99.5])
        return {
            "mean": float(self.mean),
            "median": float(median),
            "std": float(np.sqrt(self.m2 / self.count)),
            "min": float(self.min),
            "max": float(self.max),
            "percentile_00_5": float(p005),
            "percentile_99_5": float(p995),
        }


def sample_values(flat: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    """All values when there are at most ``max_samples``, else a seeded sample without replacement."""
    if flat.size <= max_samples:
        return flat.astype(np.float32)
    index = rng.choice(flat.size, size=max_samples, replace=False)
    index.sort()  # memory-order access; the set drawn depends only on the rng
    return flat[index].astype(np.float32)


def merge_all(parts: list[PartialStats]) -> PartialStats:
    """Merge a list of partial statistics in the given order."""
    total = PartialStats()
    for part in parts:
        total = total.merge(part)
    return total
