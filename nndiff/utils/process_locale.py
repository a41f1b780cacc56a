"""Keep the process's C locale across calls into GDCM (SimpleITK's DICOM reader and writer).

GDCM's DICOM writer (seen with SimpleITK 2.x) sets the C locale to "C" and leaves it there.
Python's default text encoding follows the C locale, so afterwards every ``open()`` /
``read_text()`` without an explicit encoding in the same process (ours, a library's, a user's)
silently becomes ASCII and fails on the first non-ASCII character (seen here: reading README.md
in a test worker that had written a synthetic DICOM series). Reading did not change the locale in
our checks; the DICOM readers are guarded anyway, since GDCM does not document its locale handling.
"""
from __future__ import annotations

import functools
import locale
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def keep_locale() -> Iterator[None]:
    """Restore every locale category to its value on entry when the block exits."""
    saved = locale.setlocale(locale.LC_ALL)  # query only
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def preserves_locale(function: F) -> F:
    """Decorator form of :func:`keep_locale`."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with keep_locale():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
