"""Map a top-level function over cases, in-process or in spawned worker processes, with tqdm."""
from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Sequence, TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def progress_disabled() -> bool:
    """No progress bar when stderr is not a terminal (CI logs, pipes)."""
    return not sys.stderr.isatty()


def map_cases(fn: Callable[[T], R], items: Sequence[T], num_processes: int = 1, desc: str = "") -> list[R]:
    """``[fn(item) for item in items]`` in input order.

    ``num_processes == 1`` runs in this process (debuggable, no start-up cost). More processes use
    the ``spawn`` start method: it behaves the same on Linux and macOS and never forks a process
    that holds torch or BLAS threads. ``fn`` must therefore be a module-level function and the
    items picklable. A worker that dies raises ``BrokenProcessPool`` instead of hanging (which a
    ``multiprocessing.Pool`` would do), and an exception in ``fn`` is re-raised here. Results come
    back in input order whatever the worker count, so callers that aggregate them are
    deterministic.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    bar_args = {"total": len(items), "desc": desc, "disable": progress_disabled()}
    if num_processes == 1 or len(items) <= 1:
        return [fn(item) for item in tqdm(items, **bar_args)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(num_processes, len(items)), mp_context=context) as pool:
        results: Iterable[R] = pool.map(fn, items)
        return list(tqdm(results, **bar_args))
