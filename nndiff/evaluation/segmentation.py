"""Segmentation evaluation (issue 6): Dice and HD95 per label or region in nnU-Net's ``summary.json``
layout, the uncertainty quality (AUROC of the uncertainty map for voxel errors) and the side-by-side
table of diffusion vs deterministic baseline.

Rules (documentation/segmentation.md, "Evaluation"):

* labels and regions come from dataset.json ``labels``: an integer value is a label (voxels equal to
  it), a list/tuple value is an nnU-Net region (voxels holding any of its labels); background (0)
  is not evaluated;
* both empty: Dice 1, HD95 0 (a correct "nothing there"); exactly one empty: Dice 0 and HD95 = the
  image diagonal in mm (the largest distance possible in the image), so every number is finite
  and means are taken over all cases (nnU-Net instead writes NaN and skips it in the mean);
* HD95: 95th percentile of the symmetric surface distances in mm, both directions pooled (medpy's
  ``hd95`` definition); surfaces are the mask voxels removed by one erosion with face connectivity.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
from scipy import ndimage

from nndiff.errors import DatasetError, NnDiffError
from nndiff.evaluation.anomaly import FLOAT_MAP_ENDING, MAX_VOXELS, read_spatial, roc_auc, subsample_voxels
from nndiff.utils.files import load_json, save_json

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
LabelOrRegion = Union[int, tuple[int, ...]]
UNCERTAINTY_SUFFIX = "_uncertainty"


# --------------------------------------------------------------------------- labels and regions
def labels_or_regions(labels: Mapping[str, Any], where: str = "dataset.json") -> list[LabelOrRegion]:
    """The evaluated classes of a dataset.json ``labels`` block, in its order, background excluded:
    ints for labels, sorted tuples for nnU-Net regions (``"whole tumour": [1, 2, 3]``)."""
    out: list[LabelOrRegion] = []
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise DatasetError([(f"{where} labels.{name}", f"region {value!r} is not a non-empty list of integers",
                                     "write a region as a list of label values, e.g. [1, 2, 3]")])
            region = tuple(sorted(int(v) for v in value))
            if region != (0,):
                out.append(region)
        elif isinstance(value, int) and not isinstance(value, bool):
            if value != 0:
                out.append(int(value))
        else:
            raise DatasetError([(f"{where} labels.{name}", f"value {value!r} is neither an integer nor a list",
                                 "map each label name to an integer (or a list of integers for a region)")])
    return out


def class_key(label_or_region: LabelOrRegion) -> str:
    """The summary key of a label or region, as nnU-Net writes it: ``"1"`` or ``"(1, 2, 3)"``."""
    return str(label_or_region)


def class_mask(segmentation: np.ndarray, label_or_region: LabelOrRegion) -> np.ndarray:
    """Binary mask of a label (equality) or a region (membership) in a label map."""
    if isinstance(label_or_region, tuple):
        return np.isin(segmentation, label_or_region)
    return segmentation == label_or_region


def declared_values(labels: Mapping[str, Any]) -> set[int]:
    """Every label value a label map of this dataset may hold (0 included)."""
    values = {0}
    for value in labels.values():
        values.update(int(v) for v in value) if isinstance(value, (list, tuple)) else values.add(int(value))
    return values


# --------------------------------------------------------------------------- per-class metrics
def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two binary masks; 1 when both are empty."""
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    total = int(prediction.sum() + reference.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, reference).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the image diagonal in mm (the largest distance inside the image)."""
    return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def hd95(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile Hausdorff distance in mm between two binary masks (module docstring for the
    empty-mask rule). ``spacing`` is per array axis; default 1."""
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    if prediction.shape != reference.shape:
        raise NnDiffError(f"HD95 of masks with shapes {prediction.shape} and {reference.shape}. Fix: compare "
                          "masks on one grid")
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * prediction.ndim
    if len(spacing) != prediction.ndim:
        raise NnDiffError(f"spacing {spacing} has {len(spacing)} entries for a {prediction.ndim}D mask")
    has_prediction, has_reference = bool(prediction.any()), bool(reference.any())
    if not has_prediction and not has_reference:
        return 0.0
    if not has_prediction or not has_reference:
        return image_diagonal(prediction.shape, spacing)
    surface_prediction, surface_reference = _surface(prediction), _surface(reference)
    to_reference = ndimage.distance_transform_edt(~surface_reference, sampling=spacing)[surface_prediction]
    to_prediction = ndimage.distance_transform_edt(~surface_prediction, sampling=spacing)[surface_reference]
    return float(np.percentile(np.concatenate([to_reference, to_prediction]), 95))


def class_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None = None) -> dict:
    """nnU-Net's per-class counts plus Dice, IoU and HD95 of two binary masks."""
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    tp = int(np.logical_and(prediction, reference).sum())
    fp, fn = int(prediction.sum()) - tp, int(reference.sum()) - tp
    tn = int(prediction.size) - tp - fp - fn
    union = tp + fp + fn
    return {"Dice": dice(prediction, reference), "IoU": 1.0 if union == 0 else tp / union,
            "HD95": hd95(prediction, reference, spacing), "FN": fn, "FP": fp, "TN": tn, "TP": tp,
            "n_pred": tp + fp, "n_ref": tp + fn}


def case_metrics(prediction: np.ndarray, reference: np.ndarray, classes: Sequence[LabelOrRegion],
                 spacing: Sequence[float] | None = None) -> dict[str, dict]:
    """Metrics of every label/region of one case (label maps of one shape)."""
    if prediction.shape != reference.shape:
        raise NnDiffError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}. "
                          "Fix: predict on the grid of the reference label map")
    return {class_key(c): class_metrics(class_mask(prediction, c), class_mask(reference, c), spacing)
            for c in classes}


def uncertainty_auroc(uncertainties: Sequence[np.ndarray], predictions: Sequence[np.ndarray],
                      references: Sequence[np.ndarray], max_voxels: int | None = MAX_VOXELS) -> float | None:
    """Pooled AUROC of the uncertainty maps for telling wrongly labelled voxels (prediction !=
    reference) from right ones; ``None`` when there is no error or no correct voxel."""
    scores, errors = [], []
    for uncertainty, prediction, reference in zip(uncertainties, predictions, references):
        if np.shape(uncertainty) != np.shape(reference):
            raise NnDiffError(f"uncertainty map shape {np.shape(uncertainty)} differs from the label map's "
                              f"{np.shape(reference)}. Fix: write the uncertainty on the label map's grid")
        scores.append(np.asarray(uncertainty, dtype=np.float64).ravel())
        errors.append((np.asarray(prediction) != np.asarray(reference)).ravel())
    return roc_auc(*subsample_voxels(np.concatenate(scores), np.concatenate(errors), max_voxels))


# --------------------------------------------------------------------------- summary
def _mean_metrics(per_case: Sequence[Mapping[str, Mapping[str, float]]], keys: Sequence[str]) -> dict[str, dict]:
    """Per class: the mean of every metric over the cases."""
    return {key: {metric: float(np.mean([case[key][metric] for case in per_case]))
                  for metric in per_case[0][key]} for key in keys}


def class_names(labels: Mapping[str, Any]) -> dict[str, str]:
    """Class key -> its dataset.json name (``{"1": "CSF"}``), background excluded."""
    return {class_key(c): name for name, value in labels.items() for c in labels_or_regions({name: value})}


def summarize(per_case: Sequence[Mapping[str, Any]], classes: Sequence[LabelOrRegion],
              uncertainty: float | None = None, names: Mapping[str, str] | None = None) -> dict:
    """nnU-Net's summary layout: ``metric_per_case`` (each with ``metrics`` per class key), ``mean``
    (per class key) and ``foreground_mean`` (the mean over classes), plus ``uncertainty_auroc`` and
    ``class_names`` (class key -> dataset.json name; the tables print ``name (key)``)."""
    keys = [class_key(c) for c in classes]
    mean = _mean_metrics([case["metrics"] for case in per_case], keys) if per_case and keys else {}
    foreground = ({metric: float(np.mean([mean[k][metric] for k in keys])) for metric in mean[keys[0]]}
                  if mean else {})
    return {"foreground_mean": foreground, "mean": mean, "metric_per_case": list(per_case),
            "uncertainty_auroc": uncertainty, "class_names": dict(names or {})}


def _row_label(summary: Mapping[str, Any], key: str) -> str:
    name = (summary.get("class_names") or {}).get(key)
    return f"{name} ({key})" if name else key


# --------------------------------------------------------------------------- diffusion vs deterministic
def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def compare_reports(diffusion_summary: Mapping[str, Any], deterministic_summary: Mapping[str, Any],
                    names: tuple[str, str] = ("diffusion", "deterministic")) -> str:
    """Markdown table of Dice and HD95 per label/region (and their foreground mean) of two summaries
    side by side, with the Dice difference (first minus second) and both uncertainty AUROCs."""
    first, second = names
    keys = list(diffusion_summary["mean"])
    missing = [k for k in keys if k not in deterministic_summary["mean"]]
    if missing or len(keys) != len(deterministic_summary["mean"]):
        raise NnDiffError(f"the two summaries evaluate different labels/regions ({keys} vs "
                          f"{list(deterministic_summary['mean'])}). Fix: evaluate both with the same dataset.json")
    lines = [f"| label/region | Dice {first} | Dice {second} | Dice difference | HD95 {first} (mm) | HD95 {second} (mm) |",
             "| --- | --- | --- | --- | --- | --- |"]
    rows = [(k, diffusion_summary["mean"][k], deterministic_summary["mean"][k]) for k in keys]
    rows.append(("foreground mean", diffusion_summary["foreground_mean"], deterministic_summary["foreground_mean"]))
    for key, a, b in rows:
        lines.append(f"| {_row_label(diffusion_summary, key)} | {_fmt(a['Dice'])} | {_fmt(b['Dice'])} | {a['Dice'] - b['Dice']:+.4f} | "
                     f"{_fmt(a['HD95'], 2)} | {_fmt(b['HD95'], 2)} |")
    lines.append(f"| uncertainty AUROC | {_fmt(diffusion_summary.get('uncertainty_auroc'))} | "
                 f"{_fmt(deterministic_summary.get('uncertainty_auroc'))} | | | |")
    return "\n".join(lines)


def format_segmentation_table(summary: Mapping[str, Any]) -> str:
    """Markdown table of one summary (the comparison table when a deterministic baseline is in it)."""
    if "deterministic_baseline" in summary:
        return compare_reports(summary, summary["deterministic_baseline"])
    lines = ["| label/region | Dice | HD95 (mm) |", "| --- | --- | --- |"]
    rows = list(summary["mean"].items()) + [("foreground mean", summary["foreground_mean"])]
    lines += [f"| {_row_label(summary, key)} | {_fmt(m['Dice'])} | {_fmt(m['HD95'], 2)} |" for key, m in rows]
    lines.append(f"uncertainty AUROC: {_fmt(summary.get('uncertainty_auroc'))}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- folders
def _read_label_map(path: Path, allowed: set[int], role: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """Spatial label map (``(Y, X)`` or ``(Z, Y, X)``) and its spacing per axis; undeclared values are errors."""
    from nndiff.dataset.io import read_label

    array, props = read_label(path)
    spatial = array[0, 0] if props.spatial_dims == 2 else array[0]
    spacing = tuple(props.spacing[1:]) if props.spatial_dims == 2 else tuple(props.spacing)
    unknown = sorted(set(np.unique(spatial).tolist()) - allowed)
    if unknown:
        raise DatasetError([(path, f"{role} holds label value(s) {unknown} that dataset.json 'labels' does not "
                             f"declare (declared: {sorted(allowed)})",
                             "declare them in dataset.json 'labels' or fix the label map")])
    return spatial, spacing


#: Float endings a predictor may use for the uncertainty map when the dataset's ending stores integers only.
UNCERTAINTY_FALLBACK_ENDINGS = (".npy", FLOAT_MAP_ENDING)


def _uncertainty_file(folder: Path, case: str, ending: str) -> Path | None:
    """``{case}_uncertainty`` with the dataset's ending, else a float fallback (``.npy``, ``.nii.gz``)."""
    for candidate in dict.fromkeys((ending, *UNCERTAINTY_FALLBACK_ENDINGS)):
        path = folder / f"{case}{UNCERTAINTY_SUFFIX}{candidate}"
        if path.is_file():
            return path
    return None


def _reference_files(reference: Path, ending: str) -> dict[str, Path]:
    files = sorted(reference.glob(f"*{ending}")) if reference.is_dir() else []
    if not files:
        raise DatasetError([(reference, f"holds no reference label maps ({ending})",
                             f"pass the folder of test label maps (labelsTs): one {{case}}{ending} per case")])
    return {p.name[: -len(ending)]: p for p in files}


def evaluate_segmentation_folder(reference: PathLike, prediction: PathLike, *, dataset_json: PathLike,
                                 max_voxels: int | None = MAX_VOXELS) -> dict:
    """nnU-Net-layout summary of one prediction folder (``{case}{ending}`` label maps, optional
    ``{case}_uncertainty`` maps) against the reference label maps ``{case}{ending}``."""
    dataset_json, reference, prediction = Path(dataset_json), Path(reference), Path(prediction)
    if not dataset_json.is_file():
        raise DatasetError([(dataset_json, "does not exist", "pass -d ID or an existing dataset.json")])
    data = load_json(dataset_json)
    ending, labels = data.get("file_ending"), data.get("labels")
    if not ending or not isinstance(labels, Mapping):
        raise DatasetError([(dataset_json, "needs 'file_ending' and a 'labels' mapping",
                             "add them (nnU-Net's dataset.json format)")])
    classes, allowed = labels_or_regions(labels, str(dataset_json)), declared_values(labels)
    references = _reference_files(reference, ending)
    missing = [prediction / f"{case}{ending}" for case in references if not (prediction / f"{case}{ending}").is_file()]
    if missing:
        raise DatasetError([(path, "predicted label map missing",
                             f"run nndiff_predict on the test images into {prediction}") for path in missing])
    per_case, maps, uncertainties = [], [], []
    for case, reference_file in references.items():
        truth, spacing = _read_label_map(reference_file, allowed, "reference")
        predicted, _ = _read_label_map(prediction / f"{case}{ending}", allowed, "prediction")
        if predicted.shape != truth.shape:
            raise DatasetError([(prediction / f"{case}{ending}", f"shape {predicted.shape} differs from the "
                                 f"reference's {truth.shape} ({reference_file.name})",
                                 "predict on the test images the reference label maps belong to (same grid)")])
        per_case.append({"metrics": case_metrics(predicted, truth, classes, spacing),
                         "prediction_file": str(prediction / f"{case}{ending}"), "reference_file": str(reference_file)})
        uncertainty_path = _uncertainty_file(prediction, case, ending)
        if uncertainty_path is not None:
            uncertainties.append(read_spatial(uncertainty_path))
            maps.append((predicted, truth))
    if uncertainties and len(uncertainties) != len(references):
        logger.warning("%s: uncertainty maps for %d of %d cases; the uncertainty AUROC uses those cases",
                       prediction, len(uncertainties), len(references))
    auroc = (uncertainty_auroc(uncertainties, [p for p, _ in maps], [t for _, t in maps], max_voxels)
             if uncertainties else None)
    return summarize(per_case, classes, auroc, class_names(labels))


def evaluate_segmentation_folders(reference: PathLike, prediction: PathLike, *, dataset_json: PathLike,
                                  baseline: PathLike | None = None, output_file: PathLike | None = None,
                                  max_voxels: int | None = MAX_VOXELS) -> dict:
    """Evaluate a segmentation prediction folder; with ``baseline`` (the deterministic model's
    prediction folder) its summary goes under ``deterministic_baseline`` and the side-by-side table
    under ``comparison``. Writes ``output_file`` (JSON) when given."""
    summary = evaluate_segmentation_folder(reference, prediction, dataset_json=dataset_json, max_voxels=max_voxels)
    summary["task"] = "segmentation"
    if baseline is not None:
        summary["deterministic_baseline"] = evaluate_segmentation_folder(reference, baseline, dataset_json=dataset_json,
                                                                         max_voxels=max_voxels)
        summary["comparison"] = compare_reports(summary, summary["deterministic_baseline"])
    if output_file is not None:
        save_json(summary, output_file)
    return summary
