"""Training history (per-epoch values) and the ``progress.png`` plot.

The plot uses matplotlib's object API with the Agg canvas directly: no pyplot, no global
backend switch, works on machines without a display.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from nndiff.utils.files import atomic_path

#: Columns every history has; families may log more (they are kept and saved, not plotted).
CORE_KEYS = ("epoch", "iteration", "train_loss", "val_loss", "lr", "epoch_time_s")


class TrainingHistory:
    """Per-epoch values as lists of floats (checkpoint-friendly: plain lists)."""

    def __init__(self, columns: dict[str, list[float]] | None = None) -> None:
        self.columns: dict[str, list[float]] = {k: list(v) for k, v in (columns or {}).items()}
        for key in CORE_KEYS:
            self.columns.setdefault(key, [])

    def append(self, values: dict[str, float]) -> None:
        """Add one epoch; columns missing from ``values`` get NaN so all columns stay aligned."""
        length = len(self.columns["epoch"])
        for key in values:
            self.columns.setdefault(key, [math.nan] * length)
        for key, column in self.columns.items():
            column.append(float(values.get(key, math.nan)))

    def __len__(self) -> int:
        return len(self.columns["epoch"])

    def last(self, key: str) -> float:
        column = self.columns.get(key) or [math.nan]
        return column[-1]

    def state(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.columns.items()}


def plot_progress(history: TrainingHistory, path: Path, title: str = "") -> None:
    """Write ``progress.png``: train/val loss, learning rate and epoch time over epochs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = history.columns
    epochs = cols["epoch"]
    figure = Figure(figsize=(9, 9), dpi=90)
    FigureCanvasAgg(figure)
    loss_ax, lr_ax, time_ax = figure.subplots(3, 1, sharex=True)
    marker = "." if len(epochs) < 30 else None
    loss_ax.plot(epochs, cols["train_loss"], color="tab:blue", marker=marker, label="train loss")
    loss_ax.plot(epochs, cols["val_loss"], color="tab:red", marker=marker, label="val loss (fixed t, noise; EMA)")
    _log_scale_if_positive(loss_ax, cols["train_loss"] + cols["val_loss"])
    loss_ax.legend(loc="upper right")
    loss_ax.set_ylabel("loss")
    if title:
        loss_ax.set_title(title)
    lr_ax.plot(epochs, cols["lr"], color="tab:green")
    lr_ax.set_ylabel("learning rate")
    time_ax.plot(epochs, cols["epoch_time_s"], color="tab:gray")
    time_ax.set_ylabel("epoch time [s]")
    time_ax.set_xlabel("epoch")
    for ax in (loss_ax, lr_ax, time_ax):
        ax.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def _log_scale_if_positive(ax: Any, values: list[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")


def image_grid(images: Any, value_range: tuple[float, float] = (-1.0, 1.0), ncols: int | None = None,
               pad: int = 2) -> np.ndarray:
    """Tile a batch ``(N, C, Y, X)`` or ``(N, C, Z, Y, X)`` into one uint8 image.

    3D samples show their middle z slice. One channel gives a grey image, three an RGB image;
    other channel counts show channel 0. Values are clipped to ``value_range`` first, so a
    grid of generated samples is on the same scale as one of training data.
    """
    array = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images, np.float32)
    if array.ndim == 5:
        array = array[:, :, array.shape[2] // 2]
    if array.ndim != 4:
        raise ValueError(f"expected (N, C, Y, X) or (N, C, Z, Y, X), got shape {array.shape}")
    array = array if array.shape[1] in (1, 3) else array[:, :1]
    lo, hi = value_range
    scaled = np.clip((array - lo) / (hi - lo), 0.0, 1.0)
    n, c, h, w = scaled.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.ones((c, nrows * (h + pad) + pad, ncols * (w + pad) + pad), np.float32)
    for index in range(n):
        row, col = divmod(index, ncols)
        top, left = pad + row * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = scaled[index]
    out = np.round(grid * 255).astype(np.uint8)
    return out[0] if c == 1 else np.moveaxis(out, 0, -1)


def save_image_grid(images: Any, path: Path, value_range: tuple[float, float] = (-1.0, 1.0),
                    ncols: int | None = None) -> None:
    """Write :func:`image_grid` as a PNG (atomically); e.g. a family's sample grid at epoch end."""
    from matplotlib.image import imsave

    grid = image_grid(images, value_range, ncols)
    with atomic_path(path) as tmp:
        imsave(tmp, grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255, format="png")
