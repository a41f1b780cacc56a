"""Integrity checks of a loaded raw dataset.

``verify_integrity(dataset, full=False)`` re-runs the cheap checks (dataset.json rules, files still
present, ``numTraining``, metadata); ``full=True`` also opens every file (optionally in several
processes) and checks, per case: readability, channel count (grey vs RGB), NaN/Inf, constant or
all-zero images (label maps may be all zero), that channels, label and targets share shape,
spacing, origin and direction (tolerances in :mod:`nndiff.dataset.io`), that label values are
declared, and across cases that 2D and 3D are not mixed. Nothing is written. All problems are
raised together as one :class:`nndiff.errors.DatasetError`.
"""
from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nndiff.dataset import metadata as meta
from nndiff.dataset import schema
from nndiff.dataset.discovery import Case
from nndiff.dataset.io import (
    SIDECAR_ENDINGS,
    ImageProperties,
    geometry_differences,
    read_file,
    read_label,
)
from nndiff.dataset.raw_dataset import RawDataset
from nndiff.dataset.schema import Problem
from nndiff.errors import DatasetError

logger = logging.getLogger(__name__)


@dataclass
class CaseCheck:
    """Everything a worker needs to check one case (picklable, no RawDataset)."""

    identifier: str
    images: list[Path | None]
    label: Path | None
    targets: list[Path]
    is_rgb: bool
    label_values: set[int] | None  # None: dataset declares no labels


@dataclass
class CaseReport:
    """Problems of one case plus facts needed for checks across cases."""

    identifier: str
    problems: list[Problem] = field(default_factory=list)
    spatial_dims: int | None = None
    complex_channels: list[bool] = field(default_factory=list)
    label_values_present: set[int] = field(default_factory=set)


def verify_integrity(dataset: RawDataset, full: bool = False, num_processes: int = 1) -> list[str]:
    """Check ``dataset``; raise :class:`DatasetError` listing every problem; return warnings.

    ``full=False`` is cheap (no image opened). ``full=True`` reads every training and test file
    using ``num_processes`` worker processes. Warnings (e.g. a declared label that never occurs)
    are logged and returned.
    """
    problems = cheap_problems(dataset)
    warnings: list[str] = []
    if full and not problems:
        full_problems, warnings = _full_problems(dataset, num_processes)
        problems += full_problems
    if problems:
        raise DatasetError(problems)
    for warning in warnings:
        logger.warning("%s: %s", dataset.name, warning)
    return warnings


def cheap_problems(dataset: RawDataset) -> list[Problem]:
    """dataset.json rules, presence of every referenced file, numTraining, metadata fields."""
    problems = [Problem(str(dataset.root / p.where) if p.where.startswith("dataset.json") else p.where,
                        p.problem, p.fix)
                for p in schema.check_dataset_json(dataset.json)]
    for case in list(dataset.cases.values()) + list(dataset.test_cases.values()):
        for path in case.all_files():
            if not path.is_file():
                problems.append(Problem(str(path), f"of case '{case.identifier}' no longer exists",
                                        "restore the file or reload the dataset"))
    n = dataset.json.get("numTraining")
    if isinstance(n, int) and n != len(dataset.cases):
        problems.append(Problem(str(dataset.root / "dataset.json key 'numTraining'"),
                                f"is {n} but {len(dataset.cases)} training cases were found",
                                f"set numTraining to {len(dataset.cases)}, or add/remove cases"))
    metadata_path = dataset.root / meta.METADATA_FILE
    problems += meta.check_reserved_fields(dataset.metadata, metadata_path)
    problems += meta.check_conditions_present(dataset.metadata, dataset.conditions, sorted(dataset.cases),
                                              metadata_path)
    return problems


def _case_checks(dataset: RawDataset) -> list[CaseCheck]:
    values = dataset.label_values() if dataset.labels else None
    cases: list[Case] = list(dataset.cases.values()) + list(dataset.test_cases.values())
    return [CaseCheck(c.identifier, list(c.images), c.label, list(c.targets), dataset.is_rgb, values)
            for c in cases]


def _full_problems(dataset: RawDataset, num_processes: int) -> tuple[list[Problem], list[str]]:
    checks = _case_checks(dataset)
    if num_processes > 1 and len(checks) > 1:
        with ProcessPoolExecutor(max_workers=min(num_processes, len(checks))) as pool:
            reports = list(pool.map(check_case, checks, chunksize=max(1, len(checks) // (4 * num_processes))))
    else:
        reports = [check_case(c) for c in checks]
    problems = [p for r in reports for p in r.problems]
    problems += _cross_case_problems(dataset, reports)
    return problems, _label_warnings(dataset, reports)


def check_case(check: CaseCheck) -> CaseReport:
    """Open every file of one case and report its problems (runs in a worker process)."""
    report = CaseReport(check.identifier)
    reference: tuple[Path, ImageProperties] | None = None
    for path in check.images:
        if path is None:
            continue
        props = _check_image_file(path, 3 if check.is_rgb else 1, report, "image")
        if props is None:
            continue
        report.complex_channels.append(props.is_complex)
        reference = _compare_to_reference(path, props, reference, report)
    for path in check.targets:
        props = _check_image_file(path, 1, report, "target")
        if props is not None:
            reference = _compare_to_reference(path, props, reference, report)
    if check.label is not None:
        props = _check_label_file(check.label, check.label_values, report)
        if props is not None:
            _compare_to_reference(check.label, props, reference, report)
    if reference is not None:
        report.spatial_dims = reference[1].spatial_dims
    return report


def _check_image_file(path: Path, expected_components: int, report: CaseReport,
                      role: str) -> ImageProperties | None:
    try:
        arr, props = read_file(path)
    except DatasetError as e:
        report.problems += [Problem(*p) for p in e.problems]
        return None
    if arr.shape[0] != expected_components:
        kind = "RGB (3 components)" if expected_components == 3 else "single-channel grey"
        report.problems.append(Problem(str(path), f"has {arr.shape[0]} colour components but a {kind} "
                                       f"{role} is expected",
                                       "save it as a single-channel image (one file per channel)"
                                       if expected_components == 1 else "save it as an RGB image"))
    report.problems += value_problems(arr, path)
    return props


def value_problems(arr: np.ndarray, path: Path) -> list[Problem]:
    """NaN/Inf values, and images that are constant (all zero included)."""
    problems = []
    finite = np.isfinite(arr)
    bad = int(arr.size - np.count_nonzero(finite))
    if bad:
        problems.append(Problem(str(path), f"contains {bad} NaN/Inf value(s)",
                                "replace them (e.g. with the background value) and re-export"))
        values = arr[finite]
    else:
        values = arr.ravel()
    if values.size and np.all(values == values[0]):
        value = values[0]
        what = "is all zero" if value == 0 else f"is constant (every voxel = {value})"
        problems.append(Problem(str(path), f"{what}: it carries no information",
                                "fix the export or remove the case"))
    return problems


def _check_label_file(path: Path, declared: set[int] | None, report: CaseReport) -> ImageProperties | None:
    try:
        arr, props = read_label(path)
    except DatasetError as e:
        report.problems += [Problem(*p) for p in e.problems]
        return None
    present = {int(v) for v in np.unique(arr)}
    report.label_values_present = present
    if declared is not None and not present <= declared:
        undeclared = sorted(present - declared)
        report.problems.append(Problem(str(path), f"holds label values {undeclared} that dataset.json "
                                       f"'labels' does not declare (declared: {sorted(declared)})",
                                       "declare them in 'labels' or fix the label map"))
    return props


def _compare_to_reference(path: Path, props: ImageProperties, reference: tuple[Path, ImageProperties] | None,
                          report: CaseReport) -> tuple[Path, ImageProperties]:
    if reference is None:
        return path, props
    diffs = geometry_differences(reference[1], props)
    if diffs:
        fix = ("all channels, the label and the targets of a case must share shape, spacing, origin "
               "and direction: resample or fix the header")
        if path.name.lower().endswith(SIDECAR_ENDINGS):
            fix += " (for this format the geometry comes from the sidecar JSON: check that every file has one)"
        report.problems.append(Problem(str(path), f"does not match {reference[0].name} of case "
                                       f"'{report.identifier}': " + "; ".join(diffs), fix))
    return reference


def _cross_case_problems(dataset: RawDataset, reports: list[CaseReport]) -> list[Problem]:
    problems = []
    dims: dict[int, list[str]] = {}
    for r in reports:
        if r.spatial_dims is not None:
            dims.setdefault(r.spatial_dims, []).append(r.identifier)
    if len(dims) > 1:
        summary = "; ".join(f"{d}D: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}"
                            for d, ids in sorted(dims.items()))
        problems.append(Problem(str(dataset.root), f"mixes 2D and 3D images ({summary})",
                                "convert all cases to the same dimensionality"))
    complex_flags = {any(r.complex_channels) for r in reports if r.complex_channels}
    if len(complex_flags) > 1:
        problems.append(Problem(str(dataset.root), "mixes complex-valued and real-valued images",
                                "store all cases as complex (or all as real) arrays"))
    return problems


def _label_warnings(dataset: RawDataset, reports: list[CaseReport]) -> list[str]:
    if not dataset.labels:
        return []
    present = set().union(*(r.label_values_present for r in reports)) if reports else set()
    if not any(r.label_values_present for r in reports):
        return []
    unused = sorted(dataset.label_values() - present - {0})
    if unused:
        return [f"label values {unused} are declared in dataset.json but occur in no label map"]
    return []
