"""Small tensor helpers shared by the diffusion modules (nD broadcasting, scalar handling)."""
from __future__ import annotations

import torch

Scalar = float | int


def per_sample(values: torch.Tensor | Scalar, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample values ``(B,)`` (or a scalar) to ``(B, 1, 1, ...)`` matching ``like``.

    Works for 4-D ``(B, C, H, W)`` and 5-D ``(B, C, D, H, W)`` tensors alike; the result has
    ``like``'s dtype and device so it broadcasts without surprises.
    """
    v = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if v.ndim == 0:
        return v.reshape((1,) * like.ndim)
    if v.ndim != 1 or v.shape[0] != like.shape[0]:
        raise ValueError(
            f"per-sample values must have shape ({like.shape[0]},), got {tuple(v.shape)}"
        )
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def as_time_vector(t: torch.Tensor | Scalar, batch: int, device: torch.device | None) -> torch.Tensor:
    """Return ``t`` as a float64 tensor of shape ``(batch,)`` (a scalar is repeated)."""
    tt = torch.as_tensor(t, dtype=torch.float64, device=device)
    if tt.ndim == 0:
        return tt.expand(batch).clone()
    if tt.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(tt.shape)}")
    return tt
