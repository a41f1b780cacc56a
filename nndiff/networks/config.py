"""Validation of the ``network`` block of a plans configuration.

The planner writes the block; :func:`parse_network_config` turns it into a frozen
:class:`UNetConfig` or raises one :class:`~nndiff.errors.PlansError` that lists every problem,
each naming the key and the fix. The format is documented in ``documentation/architecture.md``
(network block) and ``documentation/networks.md``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from nndiff.errors import PlansError

#: Architectures :func:`nndiff.networks.build_network` knows. A string constant for now;
#: the shared options module has no enum for network architectures yet.
UNET = "unet"
KNOWN_ARCHITECTURES: tuple[str, ...] = (UNET,)

#: Downsampling factors a strided 3x3(x3) convolution handles without skipping voxels.
ALLOWED_STRIDES: tuple[int, ...] = (1, 2)

REQUIRED_KEYS: tuple[str, ...] = (
    "architecture",
    "spatial_dims",
    "in_channels",
    "out_channels",
    "model_channels",
    "channel_mult",
    "strides",
    "num_res_blocks",
    "attention_levels",
    "num_head_channels",
    "norm_groups",
)
#: Conditioning and regularisation keys default to "off" so a hand-written block stays short.
OPTIONAL_DEFAULTS: dict[str, Any] = {
    "cond_channels": 0,
    "dropout": 0.0,
    "num_classes": None,
    "num_continuous_conditions": 0,
}


@dataclass(frozen=True)
class UNetConfig:
    """A validated network block. Field meanings: ``documentation/networks.md``."""

    architecture: str
    spatial_dims: int
    in_channels: int
    cond_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    num_res_blocks: int
    attention_levels: tuple[int, ...]
    num_head_channels: int
    norm_groups: int
    dropout: float
    num_classes: int | None
    num_continuous_conditions: int

    @property
    def num_levels(self) -> int:
        """Number of resolution levels (one more than the number of downsamplings)."""
        return len(self.channel_mult)

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Feature channels at each resolution level."""
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        """Width of the time (+ condition) embedding, 4x model_channels as in DDPM/ADM."""
        return 4 * self.model_channels

    @property
    def shape_divisor(self) -> tuple[int, ...]:
        """Per spatial axis, the number every input size must be divisible by."""
        return tuple(
            math.prod(s[axis] for s in self.strides) for axis in range(self.spatial_dims)
        )

    def to_dict(self) -> dict[str, Any]:
        """The block as plain JSON types (lists, not tuples), as a plans file stores it."""
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["strides"] = [list(s) for s in self.strides]
        d["attention_levels"] = list(self.attention_levels)
        return d


def _is_int(value: Any) -> bool:
    # bool is a subclass of int; "true" in a JSON plan is never a channel count.
    return isinstance(value, int) and not isinstance(value, bool)


class _Problems:
    """Collects (key, problem, fix) triples so one error can list all of them."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []

    def add(self, key: str, problem: str, fix: str) -> None:
        self.items.append((key, problem, fix))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        lines = [f"{len(self.items)} problem(s) in the plans 'network' block:"]
        lines += [f"  - network.{key}: {problem}. Fix: {fix}" for key, problem, fix in self.items]
        raise PlansError("\n".join(lines))


def _check_int(problems: _Problems, net: Mapping[str, Any], key: str, minimum: int) -> bool:
    """Rule: ``key`` is an integer >= ``minimum``. Returns whether it is."""
    value = net[key]
    if not _is_int(value) or value < minimum:
        problems.add(key, f"must be an integer >= {minimum}, got {value!r}",
                     f"set {key} to an integer >= {minimum}")
        return False
    return True


def _check_keys(problems: _Problems, net: Mapping[str, Any]) -> None:
    """Rule: every required key is present and no unknown key is (typos would be ignored)."""
    missing = [k for k in REQUIRED_KEYS if k not in net]
    for key in missing:
        problems.add(key, "is missing", f"add '{key}' to the network block (see documentation/networks.md)")
    known = set(REQUIRED_KEYS) | set(OPTIONAL_DEFAULTS)
    for key in sorted(set(net) - known):
        problems.add(key, "is not a known network key",
                     f"remove it or use one of: {', '.join(sorted(known))}")


def _check_channel_mult(problems: _Problems, net: Mapping[str, Any]) -> bool:
    """Rule: channel_mult is a non-empty list of positive ints (one per resolution level)."""
    mult = net["channel_mult"]
    if not isinstance(mult, (list, tuple)) or not mult or not all(_is_int(m) and m >= 1 for m in mult):
        problems.add("channel_mult", f"must be a non-empty list of positive integers, got {mult!r}",
                     "use e.g. [1, 2, 4, 4] (one multiplier of model_channels per resolution level)")
        return False
    return True


def _check_strides(problems: _Problems, net: Mapping[str, Any]) -> None:
    """Rule: strides has one entry per downsampling (len(channel_mult) - 1), each a list of
    spatial_dims factors in {1, 2}. Needs valid channel_mult and spatial_dims."""
    num_down = len(net["channel_mult"]) - 1
    strides = net["strides"]
    dims = net["spatial_dims"]
    if not isinstance(strides, (list, tuple)) or len(strides) != num_down:
        got = len(strides) if isinstance(strides, (list, tuple)) else repr(strides)
        problems.add("strides", f"needs one entry per downsampling, i.e. len(channel_mult) - 1 = "
                     f"{num_down}, got {got}",
                     "give one per-axis stride list between consecutive levels, or change channel_mult")
        return
    for i, stride in enumerate(strides):
        if not isinstance(stride, (list, tuple)) or len(stride) != dims:
            problems.add(f"strides[{i}]", f"must list one factor per spatial axis ({dims}), got {stride!r}",
                         f"write e.g. {[2] * dims} (or 1 on an axis that must not be downsampled)")
        elif not all(_is_int(s) and s in ALLOWED_STRIDES for s in stride):
            problems.add(f"strides[{i}]", f"factors must be in {list(ALLOWED_STRIDES)}, got {stride!r}",
                         "use 2 to halve an axis and 1 to keep it")


def _check_channels(problems: _Problems, net: Mapping[str, Any], mult_ok: bool) -> None:
    """Rules: GroupNorm needs every level's channels divisible by norm_groups; attention
    needs the channels of every attention level divisible by num_head_channels; attention
    levels are unique level indices."""
    ok = _check_int(problems, net, "model_channels", 1)
    ok &= _check_int(problems, net, "norm_groups", 1)
    ok &= _check_int(problems, net, "num_head_channels", 1)
    levels = net["attention_levels"]
    if not isinstance(levels, (list, tuple)) or not all(_is_int(a) for a in levels):
        problems.add("attention_levels", f"must be a list of level indices, got {levels!r}",
                     "use e.g. [2, 3], or [] for no attention")
        return
    if len(set(levels)) != len(levels):
        problems.add("attention_levels", f"has duplicates: {levels!r}", "list each level once")
    if not (ok and mult_ok):
        return
    channels = [net["model_channels"] * m for m in net["channel_mult"]]
    groups = net["norm_groups"]
    for level, ch in enumerate(channels):
        if ch % groups:
            problems.add("norm_groups", f"{groups} does not divide the {ch} channels of level {level}",
                         "choose norm_groups dividing model_channels * every channel_mult entry")
            break
    head = net["num_head_channels"]
    for level in levels:
        if not 0 <= level < len(channels):
            problems.add("attention_levels", f"level {level} does not exist "
                         f"(levels are 0..{len(channels) - 1})", "use indices into channel_mult")
        elif channels[level] % head:
            problems.add("num_head_channels", f"{head} does not divide the {channels[level]} channels "
                         f"of attention level {level}",
                         "choose num_head_channels dividing the channels of every attention level")


def _check_conditioning(problems: _Problems, net: Mapping[str, Any]) -> None:
    """Rules: channel counts are non-negative / positive ints; num_classes is null or >= 1
    (index num_classes is the learned null token); dropout is a probability in [0, 1)."""
    _check_int(problems, net, "in_channels", 1)
    _check_int(problems, net, "out_channels", 1)
    _check_int(problems, net, "cond_channels", 0)
    _check_int(problems, net, "num_continuous_conditions", 0)
    _check_int(problems, net, "num_res_blocks", 1)
    num_classes = net["num_classes"]
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 1):
        problems.add("num_classes", f"must be null or an integer >= 1, got {num_classes!r}",
                     "use null for an unconditional model or the number of classes")
    dropout = net["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        problems.add("dropout", f"must be a number in [0, 1), got {dropout!r}", "use e.g. 0.0 or 0.1")


def parse_network_config(network: Mapping[str, Any]) -> UNetConfig:
    """Validate a plans ``network`` block and return it as a :class:`UNetConfig`.

    Raises :class:`PlansError` listing every problem (``network.<key>: problem. Fix: ...``).
    """
    if not isinstance(network, Mapping):
        raise PlansError(f"the plans 'network' block must be a JSON object, got {type(network).__name__}. "
                         "Fix: re-run planning or restore the block from documentation/networks.md")
    problems = _Problems()
    _check_keys(problems, network)
    problems.raise_if_any()  # later rules index these keys
    net = {**OPTIONAL_DEFAULTS, **network}

    if net["architecture"] not in KNOWN_ARCHITECTURES:
        problems.add("architecture", f"unknown architecture {net['architecture']!r}",
                     f"use one of: {', '.join(KNOWN_ARCHITECTURES)}")
    dims_ok = net["spatial_dims"] in (2, 3) and _is_int(net["spatial_dims"])
    if not dims_ok:
        problems.add("spatial_dims", f"must be 2 or 3, got {net['spatial_dims']!r}",
                     "use 2 for slices/2D images, 3 for volumes")
    mult_ok = _check_channel_mult(problems, net)
    if mult_ok and dims_ok:
        _check_strides(problems, net)
    _check_channels(problems, net, mult_ok)
    _check_conditioning(problems, net)
    problems.raise_if_any()

    return UNetConfig(
        architecture=net["architecture"],
        spatial_dims=net["spatial_dims"],
        in_channels=net["in_channels"],
        cond_channels=net["cond_channels"],
        out_channels=net["out_channels"],
        model_channels=net["model_channels"],
        channel_mult=tuple(net["channel_mult"]),
        strides=tuple(tuple(s) for s in net["strides"]),
        num_res_blocks=net["num_res_blocks"],
        attention_levels=tuple(sorted(net["attention_levels"])),
        num_head_channels=net["num_head_channels"],
        norm_groups=net["norm_groups"],
        dropout=float(net["dropout"]),
        num_classes=net["num_classes"],
        num_continuous_conditions=net["num_continuous_conditions"],
    )
