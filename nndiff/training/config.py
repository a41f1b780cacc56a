"""The ``training`` block of a plans configuration and the run-length overrides.

The planner may write a ``training`` block into a configuration; every key is optional and
falls back to :data:`DEFAULTS`. :func:`parse_training_settings` validates the block and raises
one :class:`~nndiff.errors.PlansError` listing every problem (key, problem, fix). The keys are
documented in ``documentation/training.md``.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from nndiff.errors import NnDiffError, PlansError

#: Learning-rate decay after warmup.
LR_DECAYS: tuple[str, ...] = ("cosine", "poly", "constant")
#: Spatial augmentation levels (see ``documentation/training.md``).
AUGMENTATIONS: tuple[str, ...] = ("none", "mild")
#: Numeric precision of the forward pass. ``auto``: bf16 on CUDA with bf16 support, fp16 with a
#: gradient scaler on older CUDA cards, fp32 on CPU.
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")

#: Environment switch: ``nnDiff_compile=0`` turns torch.compile off, ``1`` forces it on (also on CPU).
ENV_COMPILE = "nnDiff_compile"
#: Environment switch: number of data-augmentation worker processes (as nnU-Net's nnUNet_n_proc_DA).
ENV_NUM_WORKERS = "nnDiff_n_proc_DA"


@dataclass(frozen=True)
class TrainingSettings:
    """Validated training hyper-parameters of one configuration (see training.md for each key)."""

    num_iterations_per_epoch: int = 250
    num_epochs: int = 400
    initial_lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_iterations: int = 1000
    lr_decay: str = "cosine"
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    grad_clip: float = 1.0
    num_val_cases: int = 50
    augmentation: str = "mild"
    precision: str = "auto"
    checkpoint_every_epochs: int = 1
    progress_every_epochs: int = 5

    @property
    def planned_iterations(self) -> int:
        """Iterations the plan asks for: epochs x iterations per epoch."""
        return self.num_epochs * self.num_iterations_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULTS = TrainingSettings()

_INT_KEYS = ("num_iterations_per_epoch", "num_epochs", "checkpoint_every_epochs", "progress_every_epochs")
_NON_NEGATIVE_INT_KEYS = ("warmup_iterations", "num_val_cases")
_CHOICES = {"lr_decay": LR_DECAYS, "augmentation": AUGMENTATIONS, "precision": PRECISIONS}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(key: str, value: Any) -> tuple[str, str] | None:
    """Rule for one key: returns (problem, fix) or None when the value is valid."""
    if key in _INT_KEYS and not (_is_int(value) and value >= 1):
        return f"must be an integer >= 1, got {value!r}", f"set {key} to a positive integer"
    if key in _NON_NEGATIVE_INT_KEYS and not (_is_int(value) and value >= 0):
        return f"must be an integer >= 0, got {value!r}", f"set {key} to 0 or a positive integer"
    if key in _CHOICES and value not in _CHOICES[key]:
        return f"unknown value {value!r}", f"use one of: {', '.join(_CHOICES[key])}"
    if key == "initial_lr" and not (_is_number(value) and value > 0):
        return f"must be a number > 0, got {value!r}", "use e.g. 1e-4"
    if key in ("weight_decay", "grad_clip") and not (_is_number(value) and value >= 0):
        return f"must be a number >= 0, got {value!r}", f"use e.g. {getattr(DEFAULTS, key)} (0 turns it off)"
    if key == "ema_decay" and not (_is_number(value) and 0 <= value < 1):
        return f"must be a number in [0, 1), got {value!r}", "use e.g. 0.9999 (0 copies the weights)"
    if key == "ema_warmup" and not isinstance(value, bool):
        return f"must be true or false, got {value!r}", "use true or false"
    return None


def parse_training_settings(block: Mapping[str, Any] | None) -> TrainingSettings:
    """Validate a configuration's ``training`` block (``None`` = all defaults).

    Raises :class:`PlansError` listing every unknown key and every invalid value.
    """
    if block is None:
        return DEFAULTS
    if not isinstance(block, Mapping):
        raise PlansError(f"the configuration's 'training' block must be a JSON object, got "
                         f"{type(block).__name__}. Fix: remove it or see documentation/training.md")
    known = set(DEFAULTS.to_dict())
    problems: list[tuple[str, str, str]] = []
    for key in sorted(set(block) - known):
        problems.append((key, "is not a known training key", f"remove it or use one of: {', '.join(sorted(known))}"))
    for key in sorted(set(block) & known):
        found = _check(key, block[key])
        if found:
            problems.append((key, *found))
    if problems:
        lines = [f"{len(problems)} problem(s) in the plans 'training' block:"]
        lines += [f"  - training.{k}: {p}. Fix: {f}" for k, p, f in problems]
        raise PlansError("\n".join(lines))
    values = {k: (float(v) if isinstance(getattr(DEFAULTS, k), float) else v) for k, v in block.items()}
    return replace(DEFAULTS, **values)


def total_iterations(settings: TrainingSettings, epochs: int | None = None, iterations: int | None = None) -> int:
    """Total optimizer steps of a run.

    ``epochs`` (``--epochs``) replaces the planned number of epochs; ``iterations``
    (``--iterations``) caps the total, so ``--iterations 10`` is a quick smoke run whatever the
    plan says. The schedule (warmup, decay) is laid out over this total.
    """
    if epochs is not None and (not _is_int(epochs) or epochs < 1):
        raise NnDiffError(f"--epochs must be a positive integer, got {epochs!r}")
    if iterations is not None and (not _is_int(iterations) or iterations < 1):
        raise NnDiffError(f"--iterations must be a positive integer, got {iterations!r}")
    num_epochs = settings.num_epochs if epochs is None else epochs
    total = num_epochs * settings.num_iterations_per_epoch
    return total if iterations is None else min(total, iterations)


def compile_requested(device_type: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether to torch.compile the training network.

    Default: on for CUDA, off for CPU (compilation costs more than it saves on short CPU runs).
    ``nnDiff_compile=0`` turns it off, ``nnDiff_compile=1`` forces it on.
    """
    env = os.environ if environ is None else environ
    value = env.get(ENV_COMPILE, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    if value:
        raise NnDiffError(f"environment variable {ENV_COMPILE}={value!r} is not understood. Fix: use 0 or 1")
    return device_type == "cuda"


def default_num_workers(device_type: str, environ: Mapping[str, str] | None = None) -> int:
    """Data-augmentation worker processes: ``nnDiff_n_proc_DA`` if set, else a few on CUDA
    (keeps the GPU fed) and 0 on CPU (workers would compete with the training step for cores)."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_NUM_WORKERS)
    if value is not None and value.strip():
        try:
            workers = int(value)
        except ValueError:
            workers = -1
        if workers < 0:
            raise NnDiffError(f"environment variable {ENV_NUM_WORKERS}={value!r} must be an integer >= 0")
        return workers
    if device_type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 2))
