"""Rules: intensity normalization per channel, from modality and the channel's role.

Channels the model *produces* use dataset-level parameters, so an output maps back to original
units without any input; channels that are only conditioning may be normalized per image.
Schemes and parameters: documentation/architecture.md ("Normalization schemes").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from nndiff.diffusion.options import Modality, NormalizationScheme, TaskFamily
from nndiff.errors import PlansError
from nndiff.planning.constants import PER_IMAGE_HIGH_PERCENTILE, PER_IMAGE_LOW_PERCENTILE
from nndiff.planning.decision import Decision, fmt_num, fmt_pct
from nndiff.planning.fingerprint_view import IMAGE, TARGET, Channel, FingerprintView

#: Fraction of voxels below / above the whole-image 0.5 / 99.5 percentiles, by definition.
_TAIL = 0.005


@dataclass(frozen=True)
class NormalizationChoice:
    """Scheme + params + what the fingerprint lets us say about clipping before preprocessing."""

    scheme: NormalizationScheme
    params: dict[str, float]
    #: Upper bound on the clipped fraction of voxels from the fingerprint percentiles (None: unknown,
    #: only the preprocessing measurement, ``clip_fraction``, will tell).
    clip_fraction_upper_bound: float | None


def produced_roles(task: TaskFamily, fp: FingerprintView) -> Decision[dict[str, bool]]:
    """Which channel roles the model produces (True) or only sees as conditioning (False).

    generation / reconstruction / anomaly_detection produce the images; translation and paired
    denoising produce the targets from the images; clean-only denoising produces the images (its
    noisy input is synthesised from them); segmentation produces the labels, so images are
    conditioning.
    """
    has_targets = bool(fp.channels_with_role(TARGET))
    if task in (TaskFamily.GENERATION, TaskFamily.RECONSTRUCTION, TaskFamily.ANOMALY_DETECTION):
        roles, why = {IMAGE: True, TARGET: False}, f"{task} produces the images"
    elif task in (TaskFamily.TRANSLATION, TaskFamily.DENOISING) and has_targets:
        roles, why = {IMAGE: False, TARGET: True}, f"{task} produces the targets from the images"
    elif task == TaskFamily.DENOISING:
        roles, why = {IMAGE: True, TARGET: False}, "clean-only denoising produces the (clean) images"
    else:
        roles, why = {IMAGE: False, TARGET: False}, "segmentation produces labels; images are conditioning"
    n = {r: len(fp.channels_with_role(r)) for r in (IMAGE, TARGET)}
    return Decision(roles, f"{why} ({n[IMAGE]} image, {n[TARGET]} target channel(s))")


def _require(props: Mapping[str, Any] | None, channel: Channel, what: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
    if props is None or any(k not in props for k in keys):
        raise PlansError(f"dataset_fingerprint.json has no {what} intensity properties ({', '.join(keys)}) for "
                         f"{channel.role} channel {channel.index} '{channel.name}'. Fix: re-run "
                         "nndiff_extract_fingerprint --clean")
    return props


def clip_fraction_bound(lo: float, hi: float, whole: Mapping[str, Any] | None) -> float | None:
    """Upper bound on the fraction of (whole-image) voxels outside [lo, hi] from the fingerprint's
    whole-image min / 0.5th / 99.5th percentile / max: 0 beyond min/max, 0.5 % per side inside the
    percentiles; None when the window cuts into the central 99 % (then only the preprocessing
    measurement tells)."""
    if not whole or any(k not in whole for k in ("min", "max", "percentile_00_5", "percentile_99_5")):
        return None
    below = 0.0 if lo <= whole["min"] else _TAIL if lo <= whole["percentile_00_5"] else None
    above = 0.0 if hi >= whole["max"] else _TAIL if hi >= whole["percentile_99_5"] else None
    return None if below is None or above is None else below + above


def _bound_text(bound: float | None) -> str:
    if bound is None:
        return "clip fraction not bounded by the percentiles (window inside the whole-image 0.5-99.5 % range); measured during preprocessing"
    return f"≤ {fmt_pct(bound)} of voxels clipped (bound from the whole-image percentiles; measured during preprocessing)"


def _ct_window(fp: FingerprintView, channel: Channel) -> Decision[NormalizationChoice]:
    """CT window: union of the foreground and whole-image 0.5/99.5 percentile ranges, in HU.

    nnU-Net's foreground-only window would clip the air inside the crop box (measured: 22 % of the
    voxels of the example CT inverted to about -830 HU instead of -1024). A produced channel must
    be reproducible everywhere, so the whole-image range widens the window where it is wider.
    """
    keys = ("percentile_00_5", "percentile_99_5")
    fg = _require(fp.foreground_properties(channel), channel, "foreground", keys)
    whole = fp.whole_image_properties(channel)
    sources = [fg] + ([whole] if whole is not None and all(k in whole for k in keys) else [])
    lo = min(float(p["percentile_00_5"]) for p in sources)
    hi = max(float(p["percentile_99_5"]) for p in sources)
    fg_lo, fg_hi = float(fg["percentile_00_5"]), float(fg["percentile_99_5"])
    bound = clip_fraction_bound(lo, hi, whole)
    definition = fp.foreground_definition or "foreground"
    return Decision(NormalizationChoice(NormalizationScheme.CT_WINDOW, {"clip_low": lo, "clip_high": hi}, bound),
                    f"CT in HU is calibrated across scanners → one dataset-level window [{fmt_num(lo)}, "
                    f"{fmt_num(hi)}] HU scaled to [-1, 1]: the foreground ({definition}) 0.5/99.5 "
                    f"percentiles [{fmt_num(fg_lo)}, {fmt_num(fg_hi)}] (nnU-Net's CT rule) widened to the "
                    "whole-image 0.5/99.5 percentiles, because the model also produces the air and "
                    f"background; {_bound_text(bound)}")


def _dataset_percentile(fp: FingerprintView, channel: Channel) -> Decision[NormalizationChoice]:
    keys = ("percentile_00_5", "percentile_99_5")
    whole = fp.whole_image_properties(channel)
    fg = fp.foreground_properties(channel)
    if whole is None and fg is None:
        _require(None, channel, "whole-image or foreground", keys)
    sources = [p for p in (whole, fg) if p is not None and all(k in p for k in keys)]
    if not sources:
        _require(whole, channel, "whole-image", keys)
    lo = min(float(p["percentile_00_5"]) for p in sources)
    hi = max(float(p["percentile_99_5"]) for p in sources)
    if hi <= lo:
        raise PlansError(f"{channel.role} channel {channel.index} '{channel.name}' has 0.5/99.5 percentiles "
                         f"{lo} ≥ {hi}: the intensities are (nearly) constant. Fix: check the images")
    bound = clip_fraction_bound(lo, hi, whole)
    used = ("the union of the whole-image and foreground 0.5/99.5 percentile ranges" if len(sources) == 2
            else "the whole-image 0.5/99.5 percentiles" if sources[0] is whole
            else "the foreground 0.5/99.5 percentiles")
    return Decision(NormalizationChoice(NormalizationScheme.DATASET_PERCENTILE,
                                        {"clip_low": lo, "clip_high": hi}, bound),
                    f"{channel.modality} intensities have no absolute unit but the model must produce "
                    f"them → one dataset-level window from {used}: [{fmt_num(lo)}, {fmt_num(hi)}] → [-1, 1] "
                    "(whole image: diffusion also generates the background, so it must stay inside the "
                    "window; foreground: the bright tail is defined by tissue, which background-dominated "
                    f"whole-image percentiles underestimate); {_bound_text(bound)}")


def _scale_only(fp: FingerprintView, channel: Channel, why: str) -> Decision[NormalizationChoice]:
    whole = _require(fp.whole_image_properties(channel), channel, "whole-image", ("percentile_99_5",))
    magnitude = max(abs(float(whole["percentile_99_5"])), abs(float(whole.get("percentile_00_5", 0.0))))
    if magnitude <= 0:
        raise PlansError(f"{channel.role} channel {channel.index} '{channel.name}' has a 99.5th magnitude "
                         "percentile of 0. Fix: check the images")
    return Decision(NormalizationChoice(NormalizationScheme.SCALE_ONLY, {"scale": magnitude}, 0.0),
                    f"{why} → scale_only: x / {fmt_num(magnitude)} (99.5th percentile of the magnitudes"
                    f"{', complex' if fp.is_complex else ''}); no offset and no clip keep the map linear "
                    "(0 % clipped)")


def decide_channel_normalization(fp: FingerprintView, task: TaskFamily, channel: Channel,
                                 produced: bool) -> Decision[NormalizationChoice]:
    """Normalization of one channel:

    - RGB (``is_rgb`` or microscopy_rgb): ``rgb`` (x / 127.5 - 1; exact, 0 % clipped), any role;
    - complex-valued data or a produced reconstruction channel: ``scale_only`` (linearity is what
      data consistency and the k-space operator need; an offset or clip would break it);
    - produced channel: CT → ``ct_window`` (union of foreground and whole-image 0.5/99.5 percentiles, HU); MR / PET / X-ray /
      ultrasound / OCT / other → ``dataset_percentile`` (union of whole-image and foreground
      0.5/99.5 percentile ranges);
    - conditioning-only channel → ``per_image_percentile`` (0.5/99.5 per image, values stored per
      case so the inverse exists).
    """
    modality = channel.modality
    if fp.is_rgb or modality == Modality.MICROSCOPY_RGB:
        return Decision(NormalizationChoice(NormalizationScheme.RGB, {}, 0.0),
                        "RGB 8-bit (0..255) → rgb: x / 127.5 - 1, exact and dataset-independent (0 % clipped)")
    if task == TaskFamily.RECONSTRUCTION and produced:
        return _scale_only(fp, channel, "reconstruction produces images through a linear forward operator")
    if fp.is_complex:
        return _scale_only(fp, channel, "complex-valued images (a percentile clip on real/imaginary parts "
                                        "would distort phase)")
    if not produced:
        bound = 2 * _TAIL
        return Decision(NormalizationChoice(NormalizationScheme.PER_IMAGE_PERCENTILE,
                                            {"low_percentile": PER_IMAGE_LOW_PERCENTILE,
                                             "high_percentile": PER_IMAGE_HIGH_PERCENTILE}, bound),
                        f"conditioning-only input (never produced) → per-image "
                        f"{fmt_num(PER_IMAGE_LOW_PERCENTILE)}/{fmt_num(PER_IMAGE_HIGH_PERCENTILE)} percentiles "
                        f"→ [-1, 1], robust to scanner and protocol differences; ≤ {fmt_pct(bound)} "
                        "clipped per image by construction")
    if modality == Modality.CT:
        return _ct_window(fp, channel)
    return _dataset_percentile(fp, channel)


def decide_normalization(fp: FingerprintView, task: TaskFamily, roles: Mapping[str, bool]) -> dict[str, list[dict[str, Any]]]:
    """The plans ``normalization`` block: one entry per image and target channel, each with its reason.

    ``clip_fraction`` is null here; preprocessing measures it and writes it into the plan.
    """
    block: dict[str, list[dict[str, Any]]] = {"images": [], "targets": []}
    for channel in fp.channels:
        produced = bool(roles.get(channel.role, False))
        decision = decide_channel_normalization(fp, task, channel, produced)
        choice = decision.value
        block["images" if channel.role == IMAGE else "targets"].append({
            "channel": channel.index,
            "name": channel.name,
            "modality": channel.modality,
            "role": channel.role,
            "produced": produced,
            "scheme": str(choice.scheme),
            "params": dict(choice.params),
            "clip_fraction": None,
            "clip_fraction_upper_bound": choice.clip_fraction_upper_bound,
            "reason": decision.reason,
        })
    return block
