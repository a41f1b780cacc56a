"""Preprocess one case (transpose, crop, normalize, resample) and invert it exactly.

Forward order (as nnU-Net): complex → real/imag pairs, transpose, crop to the non-background
box, normalize (on the original grid, so the window and clip fraction refer to real voxels),
resample to the configuration's spacing. The inverse runs the steps backwards: resample to the
cropped shape, un-normalize, un-crop with each channel's recorded background value, transpose
back, rebuild complex values. Everything the inverse needs is in the case JSON (see
:func:`preprocess_case`), so a predictor can map an output back without the raw data.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from nndiff.errors import PlansError
from nndiff.preprocessing import normalization as norm
from nndiff.preprocessing.case_io import MISSING_CHANNELS_KEY
from nndiff.preprocessing.cropping import (
    bbox_from_mask,
    channel_background_values,
    crop,
    full_bbox,
    nonzero_mask,
    uncrop,
)
from nndiff.preprocessing.layout import (
    COMPLEX_LAYOUT,
    from_real_channels,
    spatial_transpose,
    stored_channels,
    to_real_channels,
    transpose_array,
    transpose_values,
)
from nndiff.preprocessing.resampling import (
    ResamplingSettings,
    compute_new_shape,
    resample,
    settings_from_config,
)

logger = logging.getLogger(__name__)

KINDS = ("data", "target", "seg")
ROLE_OF_KIND = {"data": "images", "target": "targets"}


# --------------------------------------------------------------------------- plans access


def resolve_config(plans: dict, configuration: str) -> dict:
    """The configuration with its ``inherits_from`` chain applied (planning's resolver)."""
    # imported here: the fingerprint uses this package's crop rule before any plans exist
    from nndiff.planning import resolve_configuration

    return resolve_configuration(plans, configuration)


def transposes(plans: dict) -> tuple[list[int], list[int]]:
    """``(transpose_forward, transpose_backward)`` of the plans (identity when absent)."""
    forward = spatial_transpose(plans.get("transpose_forward", [0, 1, 2]))
    backward = plans.get("transpose_backward")
    backward = spatial_transpose(backward) if backward is not None else list(np.argsort(forward))
    if [forward[b] for b in backward] != [0, 1, 2]:
        raise PlansError(f"transpose_backward {backward} does not undo transpose_forward {forward}")
    return forward, [int(b) for b in backward]


def normalization_entries(plans: dict, role: str, num_channels: int) -> list[dict]:
    """The plans' normalization entry of each channel of ``role`` ("images" | "targets")."""
    entries = (plans.get("normalization") or {}).get(role) or []
    by_channel = {int(e.get("channel", i)): e for i, e in enumerate(entries)}
    missing = [c for c in range(num_channels) if c not in by_channel]
    if missing:
        raise PlansError(
            f"plans normalization.{role} has no entry for channel(s) {missing}; "
            "re-run nndiff_plan_experiment for this dataset"
        )
    return [by_channel[c] for c in range(num_channels)]


def target_spacing(config: dict, spacing: Sequence[float], shape: Sequence[int]) -> list[float]:
    """Spacing to resample to (transposed axis order).

    A 2D configuration (``spatial_dims`` 2 or a 2-entry ``spacing``) resamples in-plane only; the
    first axis keeps the case's spacing (as nnU-Net's 2d configuration). Axes of length 1 (2D
    images) keep their spacing. ``"resample": false`` (reconstruction) keeps every axis's spacing.
    """
    resample = config.get("resample", True)
    if not isinstance(resample, bool):
        raise PlansError(f"configuration key 'resample' must be true or false, found {resample!r}")
    if not resample:
        return [float(s) for s in spacing]
    if "spacing" not in config:
        raise PlansError("configuration has no 'spacing'; re-run nndiff_plan_experiment")
    wanted = [float(v) for v in config["spacing"]]
    if len(wanted) == 2 or int(config.get("spatial_dims", 3)) == 2:
        wanted = [float(spacing[0])] + wanted[-2:]
    if len(wanted) != 3:
        raise PlansError(f"configuration spacing {config['spacing']} must have 2 or 3 entries")
    return [float(s) if n == 1 else t for s, t, n in zip(spacing, wanted, shape)]


# --------------------------------------------------------------------------- forward


def _check_missing(missing_channels: Sequence[int], num_images: int, identifier: str) -> list[int]:
    """Sorted distinct channel indices in range, at least one channel left."""
    missing = sorted({int(c) for c in missing_channels})
    if any(c < 0 or c >= num_images for c in missing) or len(missing) == num_images:
        raise ValueError(f"case {identifier}: missing_channels {list(missing_channels)} must be distinct indices "
                         f"below {num_images} that leave at least one image channel present")
    return missing


def _crop_box(images: np.ndarray, image_bg: list[float], targets: np.ndarray | None,
              target_bg: list[float] | None, enabled: bool, rows: Sequence[int] | None = None) -> list[list[int]]:
    """Box of voxels that are non-background in any image (``rows``: the present stored channels)
    or target channel."""
    if not enabled:
        return full_bbox(images.shape[1:])
    rows = list(range(images.shape[0])) if rows is None else list(rows)
    mask = nonzero_mask(images[rows], [image_bg[r] for r in rows])
    if targets is not None and target_bg is not None:
        mask |= nonzero_mask(targets, target_bg)
    return bbox_from_mask(mask)


def _normalize_role(array: np.ndarray, entries: list[dict], is_complex: bool,
                    missing: Sequence[int] = ()) -> tuple[np.ndarray, list[dict], list[list[int]]]:
    """Normalize every stored channel with its original channel's entry.

    Returns the float64 array, the per-channel record for the case JSON (scheme, params and the
    per-image values if any) and ``[clipped, total]`` voxel counts per original channel. A
    ``missing`` channel stays zero (a window scheme would map 0 to a plausible intensity) and its
    record says ``"missing": true``; it adds nothing to the clip counts.
    """
    out = np.empty_like(array, dtype=np.float64)
    records: list[dict] = []
    counts: list[list[int]] = []
    for channel, entry in enumerate(entries):
        idx = stored_channels(channel, is_complex)
        if channel in missing:
            out[idx] = 0.0
            records.append({"channel": channel, **norm.describe(entry), "missing": True})
            counts.append([0, 0])
            continue
        values = norm.per_image_values(array[idx], entry)
        clipped = total = 0
        for i in idx:
            out[i] = norm.normalize(array[i], entry, values)
            c, t = norm.clip_counts(array[i], entry, values)
            clipped, total = clipped + c, total + t
        record = {"channel": channel, **norm.describe(entry)}
        if values is not None:
            record["image_values"] = values
        records.append(record)
        counts.append([clipped, total])
    return out, records, counts


def _bounded_rows(records: list[dict], is_complex: bool) -> list[int]:
    """Stored channels whose scheme maps into [-1, 1]."""
    rows: list[int] = []
    for record in records:
        if record["scheme"] in [str(s) for s in norm.BOUNDED_SCHEMES]:
            rows.extend(stored_channels(record["channel"], is_complex))
    return rows


def _resample_role(array: np.ndarray, new_shape: list[int], spacing: list[float], new_spacing: list[float],
                   settings: ResamplingSettings, records: list[dict], is_complex: bool) -> np.ndarray:
    """Resample normalized channels; spline overshoot of bounded channels is clipped to [-1, 1]."""
    out = resample(array, new_shape, spacing, new_spacing, settings)
    if list(array.shape[1:]) != list(new_shape):
        rows = _bounded_rows(records, is_complex)
        out[rows] = np.clip(out[rows], -1.0, 1.0)
    return out.astype(np.float32)


def _role_json(is_complex: bool, num_channels: int, dtype: str, background: list[float],
               records: list[dict], counts: list[list[int]]) -> dict:
    return {
        "num_channels": num_channels,
        "is_complex": is_complex,
        "layout": COMPLEX_LAYOUT if is_complex else "channels",
        "dtype": dtype,
        "background": background,
        "normalization": records,
        "clip_counts": counts,
    }


def preprocess_case(
    images: np.ndarray,
    properties: Any,
    plans: dict,
    configuration: str,
    label: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    target_properties: Any = None,
    identifier: str = "case",
    missing_channels: Sequence[int] = (),
) -> tuple[dict[str, np.ndarray], dict]:
    """Preprocess one case for ``configuration`` of ``plans``.

    ``images`` ``(C, Z, Y, X)`` (float or complex), ``properties`` an
    ``nndiff.dataset.io.ImageProperties`` of the raw grid; ``label`` ``(1, Z, Y, X)`` integers and
    ``targets`` ``(T, Z, Y, X)`` on the same grid, both optional. Returns the arrays to store
    (``data`` float32, ``seg`` int16, ``target`` float32) and the case JSON: original
    ``properties``, ``transpose_forward/backward``, ``shape_before_crop``, ``bbox``,
    ``shape_after_crop``, ``spacing_before_resampling``, ``spacing_after_resampling``,
    ``shape_after_resampling``, ``resampling`` settings, and per role (``images``, ``targets``)
    the channel layout (complex pairs), background values, normalization (with per-image values)
    and clip counts.

    ``missing_channels`` (dataset.json ``allow_missing_channels``): image channels the case lacks.
    Their rows of ``images`` are ignored and stored as zeros (not normalized, not used for the crop
    box) and the case JSON lists them under ``"missing_channels"`` (:data:`MISSING_CHANNELS_KEY`).
    """
    config = resolve_config(plans, configuration)
    forward, backward = transposes(plans)
    num_images = images.shape[0]
    missing = _check_missing(missing_channels, num_images, identifier)
    real_images, images_complex = to_real_channels(images)
    real_images = transpose_array(real_images, forward)
    spacing = [float(v) for v in transpose_values(list(properties.spacing), forward)]
    real_targets = targets_complex = None
    if targets is not None:
        real_targets, targets_complex = to_real_channels(targets)
        real_targets = transpose_array(real_targets, forward)

    image_bg = channel_background_values(real_images)
    target_bg = channel_background_values(real_targets) if real_targets is not None else None
    shape_before_crop = [int(n) for n in real_images.shape[1:]]
    present_rows = [r for c in range(num_images) if c not in missing for r in stored_channels(c, images_complex)]
    bbox = _crop_box(real_images, image_bg, real_targets, target_bg, bool(config.get("crop_to_nonzero", True)),
                     present_rows)
    cropped = crop(real_images, bbox)
    shape_after_crop = [int(n) for n in cropped.shape[1:]]

    new_spacing = target_spacing(config, spacing, shape_after_crop)
    new_shape = compute_new_shape(shape_after_crop, spacing, new_spacing)
    data_settings = settings_from_config(config, "data")

    data, image_records, image_counts = _normalize_role(
        cropped, normalization_entries(plans, "images", num_images), images_complex, missing)
    arrays = {"data": _resample_role(data, new_shape, spacing, new_spacing, data_settings,
                                     image_records, images_complex)}
    case_json: dict[str, Any] = {
        "identifier": identifier,
        "configuration": configuration,
        "properties": properties.to_json(),
        "transpose_forward": forward,
        "transpose_backward": backward,
        "shape_before_crop": shape_before_crop,
        "bbox": bbox,
        "shape_after_crop": shape_after_crop,
        "spacing_before_resampling": spacing,
        "spacing_after_resampling": new_spacing,
        "shape_after_resampling": new_shape,
        "crop_to_nonzero": bool(config.get("crop_to_nonzero", True)),
        "resampling": {"data": data_settings.to_json()},
        "images": _role_json(images_complex, num_images, str(properties.dtype), image_bg,
                             image_records, image_counts),
    }
    if missing:
        case_json[MISSING_CHANNELS_KEY] = missing

    if real_targets is not None:
        target_settings = settings_from_config(config, "target")
        tdata, target_records, target_counts = _normalize_role(
            crop(real_targets, bbox), normalization_entries(plans, "targets", targets.shape[0]),
            bool(targets_complex))
        arrays["target"] = _resample_role(tdata, new_shape, spacing, new_spacing, target_settings,
                                          target_records, bool(targets_complex))
        tprops = target_properties if target_properties is not None else properties
        case_json["target_properties"] = tprops.to_json()
        case_json["resampling"]["target"] = target_settings.to_json()
        case_json["targets"] = _role_json(bool(targets_complex), int(targets.shape[0]), str(tprops.dtype),
                                          target_bg, target_records, target_counts)

    if label is not None:
        seg_settings = settings_from_config(config, "seg")
        seg = crop(transpose_array(np.asarray(label), forward), bbox)
        seg = resample(seg, new_shape, spacing, new_spacing, seg_settings, is_seg=True)
        arrays["seg"] = seg.astype(np.int16)
        case_json["resampling"]["seg"] = seg_settings.to_json()
        case_json["seg"] = {"dtype": str(np.asarray(label).dtype)}
    return arrays, case_json


# --------------------------------------------------------------------------- inverse


def _check_shape(array: np.ndarray, case_json: dict) -> None:
    expected = list(case_json["shape_after_resampling"])
    if list(array.shape[1:]) != expected:
        raise ValueError(
            f"case {case_json.get('identifier')}: array has spatial shape {list(array.shape[1:])}, "
            f"the preprocessed grid is {expected}"
        )


def _role_layout(case_json: dict, plans: dict, kind: str, num_stored: int) -> dict:
    """The role record of the case JSON, or one rebuilt from the plans (prediction-time cases
    preprocessed without targets): dataset-level normalization, real channels, fallback background."""
    role = ROLE_OF_KIND[kind]
    if role in case_json:
        return case_json[role]
    entries = normalization_entries(plans, role, num_stored)
    records = [{"channel": c, **norm.describe(e)} for c, e in enumerate(entries)]
    for record in records:
        if record["scheme"] == str(norm.NormalizationScheme.PER_IMAGE_PERCENTILE):
            raise PlansError(
                f"{role} channel {record['channel']} uses per_image_percentile, whose inverse needs "
                "the image's stored values; the case JSON has none"
            )
    return {
        "num_channels": num_stored,
        "is_complex": False,
        "background": [norm.background_fallback(e) for e in entries],
        "normalization": records,
        "dtype": "float32",
    }


def _settings(case_json: dict, config: dict, kind: str) -> ResamplingSettings:
    stored = (case_json.get("resampling") or {}).get(kind)
    if stored is not None:
        return ResamplingSettings(**stored)
    return settings_from_config(config, kind)


def _resample_back(array: np.ndarray, case_json: dict, settings: ResamplingSettings, is_seg: bool) -> np.ndarray:
    return resample(array, case_json["shape_after_crop"], case_json["spacing_after_resampling"],
                    case_json["spacing_before_resampling"], settings, is_seg=is_seg)


def _invert_seg(array: np.ndarray, case_json: dict, settings: ResamplingSettings) -> np.ndarray:
    seg = _resample_back(np.asarray(array), case_json, settings, is_seg=True)
    seg = uncrop(seg, case_json["bbox"], case_json["shape_before_crop"], 0)
    seg = transpose_array(seg, case_json["transpose_backward"])
    dtype = (case_json.get("seg") or {}).get("dtype", "int16")
    return seg.astype(dtype)


def denormalize_channels(array: np.ndarray, layout: dict) -> np.ndarray:
    """Stored channels ``(C, ...)`` in normalised units → original intensity units (float64) on the same
    grid, by the case's ``images`` layout (its normalization records)."""
    out = np.zeros(np.shape(array), dtype=np.float64)
    for record in layout["normalization"]:
        for i in stored_channels(record["channel"], bool(layout.get("is_complex"))):
            # a missing channel has no intensities to restore: it stays the zeros it was read as
            if not record.get("missing"):
                out[i] = norm.denormalize(np.asarray(array[i], dtype=np.float64), record, record.get("image_values"))
    return out


def _invert_intensities(array: np.ndarray, case_json: dict, layout: dict, settings: ResamplingSettings) -> np.ndarray:
    is_complex = bool(layout["is_complex"])
    expected = layout["num_channels"] * (2 if is_complex else 1)
    if array.shape[0] != expected:
        raise ValueError(f"array has {array.shape[0]} channels; the stored layout has {expected}")
    work = _resample_back(np.asarray(array, dtype=np.float64), case_json, settings, is_seg=False)
    out = denormalize_channels(work, layout)
    out = uncrop(out, case_json["bbox"], case_json["shape_before_crop"], layout["background"])
    out = transpose_array(out, case_json["transpose_backward"])
    return from_real_channels(out, is_complex) if is_complex else out.astype(np.float32)


def invert_case(
    array: np.ndarray, case_json: dict, plans: dict, configuration: str, kind: str = "data"
) -> tuple[np.ndarray, Any]:
    """Map a preprocessed (or predicted) array back to the original grid and units.

    ``kind``: ``"data"`` (image channels), ``"target"`` (translation/denoising targets) or
    ``"seg"`` (label map). Returns ``(array, ImageProperties)``: ``(C, Z, Y, X)`` float32
    (complex64 for complex channels) in original units, or the label map in its original dtype,
    with the original geometry. Exact inside the clip window where no resampling happened.
    """
    from nndiff.dataset.io import ImageProperties

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    array = np.asarray(array)
    if array.ndim != 4:
        raise ValueError(f"expected a (C, Z, Y, X) array, got shape {array.shape}")
    _check_shape(array, case_json)
    config = resolve_config(plans, configuration)
    settings = _settings(case_json, config, kind)
    if kind == "seg":
        restored = _invert_seg(array, case_json, settings)
        props_json = case_json["properties"]
    else:
        num_stored = array.shape[0]
        layout = _role_layout(case_json, plans, kind, num_stored)
        restored = _invert_intensities(array, case_json, layout, settings)
        props_json = case_json.get("target_properties", case_json["properties"]) if kind == "target" \
            else case_json["properties"]
    properties = ImageProperties.from_json(props_json)
    if kind != "seg":
        properties.num_channels = int(restored.shape[0])
    return restored, properties


def generated_case_json(plans: dict, configuration: str, shape: Sequence[int]) -> dict:
    """Case JSON for a sample generated on the configuration's grid (no raw case behind it).

    ``shape`` is the sample's spatial shape in the preprocessed (transposed) axis order. The
    inverse then only un-normalizes with the plans' dataset-level parameters and transposes back:
    no crop, no resampling; the geometry is the configuration's spacing, origin 0 and identity
    direction. A 2D configuration gives 2D images (``Z = 1``, spacing 999 on the dummy axis).
    """
    config = resolve_config(plans, configuration)
    forward, backward = transposes(plans)
    shape = [int(n) for n in shape]
    if len(shape) == 2:
        shape = [1] + shape
    spacing = [float(s) for s in config["spacing"]]
    two_d = len(spacing) == 2 or int(config.get("spatial_dims", 3)) == 2
    if two_d:
        spacing = [999.0] + spacing[-2:]
        if shape[0] != 1:
            raise ValueError(f"a 2D configuration generates (1, Y, X) samples, got shape {shape}")
        forward = backward = [0, 1, 2]  # a generated slice stays a (1, Y, X) image
    raw_shape = [shape[b] for b in backward]
    raw_spacing = [spacing[b] for b in backward]
    dims = 2 if two_d else 3
    schemes = [e.get("scheme") for e in (plans.get("normalization") or {}).get("images") or []]
    properties = {
        "spacing": raw_spacing, "origin": [0.0] * dims, "direction": np.eye(dims).ravel().tolist(),
        "spatial_dims": dims, "shape": raw_shape, "num_channels": len(schemes),
        "is_rgb": len(schemes) == 3 and all(s == str(norm.NormalizationScheme.RGB) for s in schemes),
        "is_complex": False, "dtype": "float32", "files": [],
    }
    box = full_bbox(shape)
    return {
        "identifier": "generated", "configuration": configuration, "properties": properties,
        "transpose_forward": forward, "transpose_backward": backward,
        "shape_before_crop": shape, "bbox": box, "shape_after_crop": shape,
        "spacing_before_resampling": spacing, "spacing_after_resampling": spacing,
        "shape_after_resampling": shape, "crop_to_nonzero": False, "resampling": {},
    }


def clip_fractions(case_jsons: list[dict]) -> dict[str, dict[str, float]]:
    """Dataset clip fraction per channel (``{"images": {"0": f}, "targets": {...}}``) from case JSONs.

    Fraction of voxels of the cropped, not yet resampled images that lie outside the window.
    """
    totals: dict[str, dict[str, list[int]]] = {}
    for case_json in case_jsons:
        for role in ("images", "targets"):
            if role not in case_json:
                continue
            for channel, (clipped, total) in enumerate(case_json[role]["clip_counts"]):
                acc = totals.setdefault(role, {}).setdefault(str(channel), [0, 0])
                acc[0] += clipped
                acc[1] += total
    return {role: {c: (a[0] / a[1] if a[1] else 0.0) for c, a in per.items()} for role, per in totals.items()}
