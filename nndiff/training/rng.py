"""Seeding and random-number-generator state that survives a checkpoint.

States are stored as tensors, lists and plain numbers only, so a checkpoint loads with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import random
import zlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (all CUDA devices included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (e.g. (seed, stream, iteration)).

    Uses numpy's SeedSequence, so nearby inputs give unrelated seeds.
    """
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def stable_id(text: str) -> int:
    """A stable (process- and run-independent) integer for a string; python's hash() is salted."""
    return zlib.crc32(text.encode("utf-8"))


def torch_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of python, numpy and torch (CPU and every CUDA device)."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored for the devices present."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    cuda_states: Sequence[torch.Tensor] = state.get("torch_cuda", [])
    if cuda_states and torch.cuda.is_available():
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device=index)


@contextlib.contextmanager
def isolated_rng(device: torch.device | None = None) -> Iterator[None]:
    """Run a block without disturbing the global RNG streams of training.

    Hooks such as sample grids at epoch end draw random numbers; inside this block they do not
    change what the training loop draws afterwards, so a run with sample grids trains exactly
    like one without.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def numpy_global_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global generator for a block, then put the previous state back.

    batchgenerators' transforms draw from ``np.random``; this makes their draws a function of
    ``seed`` alone without leaking into anyone else's numpy stream.
    """
    previous = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(previous)
