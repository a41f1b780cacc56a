"""Device and precision choices shared by training and inference."""
from __future__ import annotations

import torch

from nndiff.errors import NnDiffError


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if not isinstance(device, torch.device):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
            raise NnDiffError(f"unknown device {device!r}. Fix: use cpu, cuda or auto")
        device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NnDiffError("device cuda requested but torch finds no CUDA device. Fix: use -device cpu")
        if device.index is None:  # an explicit index: checkpoints and set_device need one
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the queued CUDA work of ``device`` (no-op elsewhere), so wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_precision(setting: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a gradient scaler is needed) for the precision setting.

    CPU always trains in fp32 (autocast on CPU is slow and nothing needs it there).
    """
    if device.type != "cuda" or setting == "fp32":
        return None, False
    if setting == "auto":
        setting = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "bf16":
        return torch.bfloat16, False
    return torch.float16, True
