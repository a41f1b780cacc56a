"""Training history (per-epoch values) and the ``progress.png`` plot.

The plot uses matplotlib's object API with the Agg canvas directly: no pyplot, no global
backend switch, works on machines without a display.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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
    loss_ax.plot(epochs, cols["train_loss"], color="tab:blue", label="train loss")
    loss_ax.plot(epochs, cols["val_loss"], color="tab:red", label="val loss (fixed t, noise; EMA)")
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
