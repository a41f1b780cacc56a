"""Typed, validated access to the fingerprint fields the planner reads.

The fingerprint is a plain dict (``dataset_fingerprint.json``, fields in
documentation/architecture.md). A missing or malformed field raises :class:`PlansError` naming it
and the fix, instead of a ``KeyError`` deep inside a rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from nndiff.errors import PlansError

IMAGE = "image"
TARGET = "target"

_REFINGERPRINT = "re-run nndiff_extract_fingerprint --clean to regenerate dataset_fingerprint.json"


def _missing(field: str, what: str = "is missing") -> PlansError:
    return PlansError(f"dataset_fingerprint.json field '{field}' {what}. Fix: {_REFINGERPRINT}")


@dataclass(frozen=True)
class Channel:
    """One input channel of the fingerprint (``role`` image or target, ``index`` within the role)."""

    role: str
    index: int
    name: str
    modality: str


def _per_channel(fp: Mapping[str, Any], field: str, index: int) -> dict[str, float] | None:
    """Entry ``index`` of a per-channel statistics field (dict keyed "0", "1", ... or a list)."""
    block = fp.get(field)
    if block is None:
        return None
    if isinstance(block, Mapping):
        entry = block.get(str(index), block.get(index))  # type: ignore[call-overload]
    elif isinstance(block, (list, tuple)) and index < len(block):
        entry = block[index]
    else:
        entry = None
    return dict(entry) if isinstance(entry, Mapping) else None


class FingerprintView:
    """Read-only accessors over a fingerprint dict; values in array axis order (z, y, x)."""

    def __init__(self, fingerprint: Mapping[str, Any]):
        if not isinstance(fingerprint, Mapping):
            raise PlansError("the fingerprint must be a JSON object (the content of dataset_fingerprint.json)")
        self.raw = fingerprint
        self.spacings = self._case_array("spacings")
        self.shapes = self._case_array("shapes_after_crop")
        if self.spacings.shape != self.shapes.shape:
            raise _missing("spacings", f"has {self.spacings.shape[0]} cases × {self.spacings.shape[1]} "
                                       f"axes but 'shapes_after_crop' has {self.shapes.shape}")
        self.spatial_dims = self._spatial_dims()
        self.channels = self._channels()

    # --- geometry ---------------------------------------------------------------------------
    def _case_array(self, field: str) -> np.ndarray:
        value = self.raw.get(field)
        if not value:
            raise _missing(field)
        try:
            arr = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            raise _missing(field, "is not a list of per-case [z, y, x] lists") from None
        if arr.ndim != 2 or arr.shape[1] != 3 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise _missing(field, "must hold one positive [z, y, x] triple per case")
        return arr

    def _spatial_dims(self) -> int:
        dims = self.raw.get("spatial_dims")
        if dims not in (2, 3):
            raise _missing("spatial_dims", f"must be 2 or 3, got {dims!r}")
        if dims == 2 and np.any(self.shapes[:, 0] != 1):
            raise _missing("shapes_after_crop", "has Z > 1 although spatial_dims is 2")
        return int(dims)

    @property
    def num_cases(self) -> int:
        return int(self.spacings.shape[0])

    # --- channels ---------------------------------------------------------------------------
    def _channels(self) -> list[Channel]:
        entries = self.raw.get("channels")
        if not isinstance(entries, list) or not entries:
            raise _missing("channels", "is missing or empty (needs name, modality, role per channel)")
        counters = {IMAGE: 0, TARGET: 0}
        channels = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or entry.get("role", IMAGE) not in counters:
                raise _missing(f"channels[{i}]", "must be an object with role 'image' or 'target'")
            role = entry.get("role", IMAGE)
            channels.append(Channel(role=role, index=counters[role], name=str(entry.get("name", i)),
                                    modality=str(entry.get("modality", "other"))))
            counters[role] += 1
        return channels

    def channels_with_role(self, role: str) -> list[Channel]:
        return [c for c in self.channels if c.role == role]

    @property
    def is_rgb(self) -> bool:
        return bool(self.raw.get("is_rgb", False))

    @property
    def is_complex(self) -> bool:
        return bool(self.raw.get("is_complex", False))

    def stored_channel_count(self, role: str) -> int:
        """Array channels after preprocessing: complex channels become real/imag pairs."""
        n = len(self.channels_with_role(role))
        return 2 * n if self.is_complex else n

    # --- intensities ------------------------------------------------------------------------
    def foreground_properties(self, channel: Channel) -> dict[str, float] | None:
        field = ("foreground_intensity_properties_per_channel" if channel.role == IMAGE
                 else "target_foreground_intensity_properties_per_channel")
        return _per_channel(self.raw, field, channel.index)

    def whole_image_properties(self, channel: Channel) -> dict[str, float] | None:
        field = ("intensity_properties_per_channel" if channel.role == IMAGE
                 else "target_intensity_properties_per_channel")
        return _per_channel(self.raw, field, channel.index)

    # --- size ----------------------------------------------------------------------------------
    @property
    def median_relative_size_after_cropping(self) -> float | None:
        value = self.raw.get("median_relative_size_after_cropping")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def foreground_definition(self) -> str | None:
        value = self.raw.get("foreground_definition")
        return str(value) if value is not None else None
