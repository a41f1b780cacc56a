"""Preprocess a whole raw dataset into ``<preprocessed>/<Dataset>/<data_identifier>/``."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from nndiff.errors import PlansError
from nndiff.preprocessing.case import clip_fractions, preprocess_case, resolve_config
from nndiff.preprocessing.case_io import CaseFiles, case_files_of, read_case, save_case
from nndiff.preprocessing.parallel import map_cases
from nndiff.utils.files import atomic_directory

logger = logging.getLogger(__name__)

#: Configuration keys that change the stored arrays; a configuration that overrides one of them
#: must not share its parent's folder.
PREPROCESSING_KEYS = ("spacing", "crop_to_nonzero", "resampling", "resample", "spatial_dims")


@dataclass(frozen=True)
class _CaseTask:
    """Everything a worker needs to preprocess and store one case (picklable)."""

    files: CaseFiles
    plans: dict
    configuration: str
    data_identifier: str
    out_dir: str  # the temporary folder that becomes ``<preprocessed>/<data_identifier>``


def _preprocess_one(task: _CaseTask) -> dict:
    """Worker: read, preprocess and store one case; returns its case JSON."""
    raw = read_case(task.files)
    arrays, case_json = preprocess_case(
        raw.images, raw.properties, task.plans, task.configuration, label=raw.label,
        targets=raw.targets, target_properties=raw.target_properties, identifier=raw.identifier,
        missing_channels=raw.missing_channels,
    )
    case_json["data_identifier"] = task.data_identifier
    save_case(task.out_dir, raw.identifier, arrays, case_json)
    return case_json


def data_identifier(plans: dict, configuration: str, config: dict) -> str:
    """Folder name of a configuration's preprocessed data (nnU-Net: ``<plans>_<config>``)."""
    return str(config.get("data_identifier") or f"{plans.get('plans_name', 'nnDiffPlans')}_{configuration}")


def _check_inherited_identifier(plans: dict, configuration: str) -> None:
    """An inheriting configuration that changes preprocessing needs its own ``data_identifier``.

    Otherwise it would overwrite its parent's preprocessed cases with differently shaped ones.
    """
    own = plans["configurations"][configuration]
    parent = own.get("inherits_from")
    changed = [k for k in PREPROCESSING_KEYS if k in own]
    if parent is not None and changed and "data_identifier" not in own:
        raise PlansError(
            f"configuration {configuration!r} overrides {', '.join(changed)} of {parent!r} but shares "
            f"its data_identifier; add \"data_identifier\": \"{plans.get('plans_name', 'nnDiffPlans')}_"
            f"{configuration}\" to it in the plans file"
        )


def preprocess_dataset(
    dataset: Any,
    plans: dict,
    configurations: Sequence[str],
    preprocessed_dataset_dir: str | Path,
    num_processes: int = 1,
) -> dict[str, dict[str, float]]:
    """Write ``nnDiffPlans_<config>/CASE.npz + CASE.json`` for each configuration.

    Each folder is built under a temporary name and moved into place only when every case
    succeeded (``atomic_directory``), so a failure leaves nothing half-written. Configurations
    with ``"trainable": false`` are skipped (logged); configurations sharing a ``data_identifier``
    are written once. Returns the measured clip fraction per channel,
    ``{"images": {"0": f, ...}, "targets": {...}}``, of the first configuration written (the crop
    decides it, and the crop is the same for every configuration with the same
    ``crop_to_nonzero``); ``{}`` when nothing was written.
    """
    files = case_files_of(dataset)
    fractions: dict[str, dict[str, float]] = {}
    written: dict[str, str] = {}
    for configuration in configurations:
        config = resolve_config(plans, configuration)
        if not config.get("trainable", True):
            logger.info("skipping configuration %s: %s", configuration, config.get("status", "not trainable"))
            continue
        _check_inherited_identifier(plans, configuration)
        identifier = data_identifier(plans, configuration, config)
        if identifier in written:
            logger.info("configuration %s shares %s with %s; already written", configuration, identifier,
                        written[identifier])
            continue
        out_dir = Path(preprocessed_dataset_dir) / identifier
        logger.info("preprocessing %d case(s) for %s into %s", len(files), configuration, out_dir)
        with atomic_directory(out_dir) as tmp:
            tasks = [_CaseTask(f, plans, configuration, identifier, str(tmp)) for f in files]
            case_jsons = map_cases(_preprocess_one, tasks, num_processes, desc=f"preprocess {configuration}")
        written[identifier] = configuration
        if not fractions:
            fractions = clip_fractions(case_jsons)
    return fractions
