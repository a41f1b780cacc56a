"""Python API behind ``nndiff_plan_and_preprocess`` and its three steps.

Each step validates its input before writing anything and writes atomically:
raw dataset → ``dataset_fingerprint.json`` → ``nnDiffPlans.json`` → ``nnDiffPlans_<config>/``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nndiff.errors import NnDiffError, PlansError
from nndiff.paths import Paths
from nndiff.utils.files import load_json, save_json

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "dataset_fingerprint.json"
METADATA_FILE = "metadata.json"
DEFAULT_PLANS = "nnDiffPlans"


@dataclass(frozen=True)
class DatasetLocation:
    """Where one dataset lives in the raw and preprocessed roots."""

    raw_dir: Path
    preprocessed_dir: Path

    @property
    def name(self) -> str:
        return self.raw_dir.name

    def plans_file(self, plans_name: str = DEFAULT_PLANS) -> Path:
        return self.preprocessed_dir / f"{plans_name}.json"

    @property
    def fingerprint_file(self) -> Path:
        return self.preprocessed_dir / FINGERPRINT_FILE


def locate_dataset(dataset: str | int, paths: Paths, need_preprocessed: bool = True) -> DatasetLocation:
    """Find ``dataset`` (id, 'DatasetXXX' or full folder name) in the raw root."""
    from nndiff.dataset import find_dataset_folder

    raw_root = paths.require("raw")
    raw_dir = find_dataset_folder(raw_root, str(dataset))
    pre_root = paths.require("preprocessed") if need_preprocessed else (paths.preprocessed or Path("."))
    return DatasetLocation(raw_dir=raw_dir, preprocessed_dir=pre_root / raw_dir.name)


def _source_signature(dataset) -> str:
    """Cheap signature of the raw files (names, sizes, mtimes) and dataset.json content.

    A stored fingerprint is reused only when the raw dataset has not changed since.
    """
    h = hashlib.sha256(json.dumps(dataset.json, sort_keys=True).encode())
    files: list[Path] = []
    for case in dataset.cases.values():
        files.extend(p for p in case.images if p is not None)
        files.extend(case.targets)
        if case.label is not None:
            files.append(case.label)
    metadata_file = dataset.root / "metadata.json"
    if metadata_file.exists():
        files.append(metadata_file)
    for path in sorted(files):
        st = path.stat()
        h.update(f"{path.relative_to(dataset.root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_and_verify(location: DatasetLocation, full: bool, num_processes: int = 1):
    """Load the raw dataset and run the integrity checks (full: open every file)."""
    from nndiff.dataset import load_dataset, verify_integrity

    dataset = load_dataset(location.raw_dir)
    verify_integrity(dataset, full=full, num_processes=num_processes)
    return dataset


def extract_fingerprint_step(
    location: DatasetLocation,
    num_processes: int = 1,
    verify_dataset_integrity: bool = False,
    clean: bool = False,
) -> dict:
    """Write ``dataset_fingerprint.json`` (reused when the raw dataset is unchanged, unless ``clean``)."""
    from nndiff.fingerprint import extract_fingerprint

    dataset = load_and_verify(location, full=verify_dataset_integrity, num_processes=num_processes)
    signature = _source_signature(dataset)
    if location.fingerprint_file.exists() and not clean:
        existing = load_json(location.fingerprint_file)
        if existing.get("source_signature") == signature:
            logger.info("%s: fingerprint is up to date, reusing it (--clean recomputes)", location.name)
            return existing
        logger.info("%s: raw dataset changed since the last fingerprint; recomputing", location.name)
    logger.info("%s: extracting fingerprint with %d process(es)", location.name, num_processes)
    fingerprint = extract_fingerprint(dataset, num_processes=num_processes)
    fingerprint["source_signature"] = signature
    location.preprocessed_dir.mkdir(parents=True, exist_ok=True)
    save_json(dataset.json, location.preprocessed_dir / "dataset.json")
    # Training reads subjects (grouped splits) and conditions from here, without the raw root.
    if dataset.metadata:
        save_json(dataset.metadata, location.preprocessed_dir / METADATA_FILE)
    save_json(fingerprint, location.fingerprint_file)
    logger.info("wrote %s", location.fingerprint_file)
    return fingerprint


def plan_step(
    location: DatasetLocation,
    gpu_memory_target_gib: float = 8.0,
    plans_name: str = DEFAULT_PLANS,
) -> dict:
    """Write ``<plans_name>.json`` from the stored fingerprint.

    User configurations in an existing plans file (those with ``inherits_from``) are kept.
    """
    from nndiff.planning import plan_experiment

    if gpu_memory_target_gib <= 0:
        raise NnDiffError(f"--gpu_memory_target must be positive, got {gpu_memory_target_gib} GiB")
    if not location.fingerprint_file.exists():
        raise NnDiffError(
            f"{location.fingerprint_file} does not exist. Run nndiff_extract_fingerprint -d "
            f"{location.name} first (or nndiff_plan_and_preprocess, which runs all steps)"
        )
    fingerprint = load_json(location.fingerprint_file)
    dataset_json = load_json(location.raw_dir / "dataset.json")
    plans = plan_experiment(
        fingerprint, dataset_json, gpu_memory_target_gib=gpu_memory_target_gib, plans_name=plans_name
    )
    plans_file = location.plans_file(plans_name)
    if plans_file.exists():
        _keep_user_configurations(load_json(plans_file), plans)
    save_json(plans, plans_file)
    logger.info("wrote %s", plans_file)
    return plans


def _keep_user_configurations(old_plans: dict, new_plans: dict) -> None:
    """Carry over configurations a user added by hand (they inherit from a planned one)."""
    new_configs = new_plans["configurations"]
    for name, config in old_plans.get("configurations", {}).items():
        if name not in new_configs and isinstance(config, dict) and "inherits_from" in config:
            new_configs[name] = config
            logger.info("kept user configuration %r (inherits_from %r)", name, config["inherits_from"])


def preprocess_step(
    location: DatasetLocation,
    configurations: Sequence[str] | None = None,
    num_processes: int = 1,
    plans_name: str = DEFAULT_PLANS,
    verify_dataset_integrity: bool = False,
) -> list[str]:
    """Preprocess the chosen configurations (default: every trainable one); returns their names."""
    from nndiff.planning import resolve_configuration
    from nndiff.preprocessing import preprocess_dataset

    plans_file = location.plans_file(plans_name)
    if not plans_file.exists():
        raise NnDiffError(
            f"{plans_file} does not exist. Run nndiff_plan_experiment -d {location.name} first"
        )
    plans = load_json(plans_file)
    available = list(plans["configurations"])
    if configurations is None:
        configurations = [c for c in available if resolve_configuration(plans, c).get("trainable", True)]
    for name in configurations:
        if name not in available:
            raise PlansError(
                f"configuration {name!r} is not in {plans_file}; available: {', '.join(available)}"
            )
        if not resolve_configuration(plans, name).get("trainable", True):
            status = resolve_configuration(plans, name).get("status", "not trainable")
            raise PlansError(f"configuration {name!r} cannot be preprocessed yet: {status}")
    dataset = load_and_verify(location, full=verify_dataset_integrity, num_processes=num_processes)
    clip_fractions = preprocess_dataset(
        dataset, plans, list(configurations), location.preprocessed_dir, num_processes=num_processes
    )
    if clip_fractions:
        _record_clip_fractions(plans, clip_fractions)
        save_json(plans, plans_file)
    return list(configurations)


def _record_clip_fractions(plans: dict, clip_fractions: dict) -> None:
    """Store the measured fraction of clipped voxels next to each channel's normalization."""
    for role, entries in plans.get("normalization", {}).items():
        measured = clip_fractions.get(role, {})
        for entry in entries:
            key = str(entry.get("channel"))
            if key in measured:
                entry["clip_fraction"] = measured[key]


def clean_dataset_outputs(location: DatasetLocation) -> None:
    """Remove the preprocessed folder of one dataset (used by --clean)."""
    if location.preprocessed_dir.exists():
        shutil.rmtree(location.preprocessed_dir)
