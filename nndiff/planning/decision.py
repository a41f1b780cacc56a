"""The value + reason pair every planner rule returns, and the number formatting reasons share.

A reason quotes the numbers that drove the decision ("median shape 300×512×512 at 2.5×0.7×0.7 mm,
anisotropy 3.57 > 3 → ..."), so a person reading ``nnDiffPlans.json`` or ``--explain`` can check it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Decision(Generic[T]):
    """One planning decision: the chosen ``value`` and the ``reason`` (with its numbers)."""

    value: T
    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ValueError("a planning Decision needs a non-empty reason")


def fmt_num(x: float | int, digits: int = 4) -> str:
    """Short number: integers without decimals, floats with ``digits`` significant digits."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int) or float(x).is_integer():
        return str(int(x))
    return f"{float(x):.{digits}g}"


def fmt_shape(shape: Sequence[float | int]) -> str:
    """``[300, 512, 512]`` -> ``"300×512×512"``."""
    return "×".join(fmt_num(s) for s in shape)


def fmt_spacing(spacing: Sequence[float]) -> str:
    """``[2.5, 0.7, 0.7]`` -> ``"2.5×0.7×0.7 mm"``."""
    return f"{fmt_shape(spacing)} mm"


def fmt_gib(x: float) -> str:
    """GiB with two decimals (memory estimates are not more precise than that)."""
    return f"{x:.2f} GiB"


def fmt_pct(fraction: float) -> str:
    """0.0523 -> '5.2 %'."""
    return f"{100.0 * fraction:.3g} %"


def jsonable(value: Any) -> Any:
    """Convert tuples and numpy scalars to plain JSON types (plans must round-trip through JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    return value
