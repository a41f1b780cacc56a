"""Small deterministic image builders for the evaluation tests."""
import numpy as np
from scipy.ndimage import gaussian_filter


def smooth_images(rng: np.random.Generator, count: int, shape: tuple, sigma: float = 2.0,
                  offset: float = 0.0, scale: float = 100.0) -> np.ndarray:
    """``(count, 1, *shape)`` smooth random images (blurred noise looks more like anatomy than noise)."""
    noise = rng.standard_normal((count, *shape))
    blurred = np.stack([gaussian_filter(item, sigma) for item in noise])
    blurred /= blurred.std()
    return (offset + scale * blurred)[:, None]
