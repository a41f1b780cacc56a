"""``dataset.json`` parsing and validation (nnU-Net v2 keys plus nnDiff's).

Every rule returns a list of :class:`Problem` ``(where, problem, fix)`` triples instead of raising,
so that the user sees every defect of a dataset at once (:class:`nndiff.errors.DatasetError`).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

from nndiff.dataset.io import NATURAL_ENDINGS, SUPPORTED_ENDINGS, is_supported_ending
from nndiff.diffusion.options import (
    Degradation,
    MaskType,
    ReconstructionOperator,
    TaskFamily,
    parse_option,
)

logger = logging.getLogger(__name__)


class Problem(NamedTuple):
    """One defect: where (file or ``dataset.json`` key), what is wrong, how to fix it."""

    where: str
    problem: str
    fix: str


#: Keys nnU-Net v2 reads or writes in dataset.json (kept, mostly ignored by nnDiff).
NNUNET_KEYS = frozenset({
    "channel_names", "modality", "labels", "numTraining", "file_ending", "name", "description",
    "reference", "licence", "license", "release", "overwrite_image_reader_writer",
    "regions_class_order", "dataset", "numTest", "tensorImageSize", "author", "training", "test",
    "converted_by",
})
#: Keys nnDiff adds.
NNDIFF_KEYS = frozenset({
    "task", "target_names", "conditions", "reconstruction", "degradation", "allow_missing_channels",
})
REQUIRED_KEYS = ("task", "channel_names", "numTraining", "file_ending")

#: Reserved metadata.json keys with a fixed meaning (not declarable as conditions).
RESERVED_METADATA_KEYS = ("subject", "healthy")
CONDITION_TYPES = ("categorical", "continuous")

# Reconstruction block vocabulary. TODO(options.py): a MaskType StrEnum would own these names.
MRI_MASK_TYPES = tuple(m.value for m in MaskType)
RECONSTRUCTION_KEYS = {
    ReconstructionOperator.MRI_CARTESIAN: ("operator", "acceleration", "center_fraction",
                                           "mask_type", "num_coils"),
    ReconstructionOperator.CT_PARALLEL: ("operator", "num_views", "num_detectors", "angle_range"),
}
DEGRADATION_KEYS = ("type", "level")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def load_dataset_json(path: Path) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Read ``dataset.json``; a missing or malformed file is a problem, not an exception."""
    if not path.is_file():
        return None, [Problem(str(path), "is missing",
                              "create dataset.json (see documentation/dataset_format.md)")]
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        return None, [Problem(str(path), f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                              "fix the JSON syntax (a JSON linter shows the exact spot)")]
    except (OSError, UnicodeDecodeError) as e:
        return None, [Problem(str(path), f"cannot be read ({e})", "check the file permissions and encoding")]
    if not isinstance(data, dict):
        return None, [Problem(str(path), f"must hold a JSON object, found {type(data).__name__}",
                              "write dataset.json as {\"task\": ..., \"channel_names\": ..., ...}")]
    return data, []


def channel_names_of(data: dict[str, Any]) -> Any:
    """``channel_names``, or nnU-Net v1's ``modality`` as a fallback (as nnU-Net v2 does)."""
    return data.get("channel_names", data.get("modality"))


def check_dataset_json(data: dict[str, Any]) -> list[Problem]:
    """All dataset.json rules that need no files. Logs notes for ignored or unknown keys."""
    problems: list[Problem] = []
    problems += check_required_keys(data)
    problems += check_task(data)
    problems += check_names_block(data, "channel_names")
    if "target_names" in data:
        problems += check_names_block(data, "target_names")
    problems += check_file_ending(data)
    problems += check_num_training(data)
    problems += check_labels(data)
    problems += check_conditions(data)
    problems += check_reconstruction(data)
    problems += check_degradation(data)
    problems += check_task_requirements(data)
    problems += check_allow_missing_channels(data)
    log_ignored_keys(data)
    return problems


def check_required_keys(data: dict[str, Any]) -> list[Problem]:
    """``task``, ``channel_names`` (or legacy ``modality``), ``numTraining``, ``file_ending``."""
    problems = []
    for key in REQUIRED_KEYS:
        if key == "channel_names" and "modality" in data:
            continue
        if key not in data:
            fix = {
                "task": f'add "task": one of {", ".join(t.value for t in TaskFamily)}',
                "channel_names": 'add "channel_names": {"0": "CT"} (one entry per input channel)',
                "numTraining": 'add "numTraining": <number of training cases>',
                "file_ending": 'add "file_ending", e.g. ".nii.gz" or ".png"',
            }[key]
            problems.append(Problem(f"dataset.json key '{key}'", "is missing", fix))
    return problems


def check_task(data: dict[str, Any]) -> list[Problem]:
    """``task`` must be a known task family."""
    if "task" not in data:
        return []
    try:
        parse_option(TaskFamily, data["task"] if isinstance(data["task"], str) else repr(data["task"]),
                     "task")
    except ValueError as e:
        return [Problem("dataset.json key 'task'", str(e), "use one of the valid values")]
    return []


def check_names_block(data: dict[str, Any], key: str) -> list[Problem]:
    """``channel_names``/``target_names``: ``{"0": name, "1": name, ...}``, keys consecutive from 0."""
    names = channel_names_of(data) if key == "channel_names" else data.get(key)
    if names is None:
        return []
    where = f"dataset.json key '{key}'"
    example = '{"0": "T1", "1": "FLAIR"}'
    if not isinstance(names, dict) or not names:
        return [Problem(where, f"must be a non-empty object, found {names!r}", f"write it as {example}")]
    problems = []
    if not all(isinstance(k, str) and k.isdigit() for k in names):
        problems.append(Problem(where, f"keys must be channel indices \"0\", \"1\", ..., found {list(names)}",
                                f"write it as {example}"))
    elif sorted(int(k) for k in names) != list(range(len(names))):
        problems.append(Problem(where, f"keys must be consecutive from 0, found {sorted(names, key=int)}",
                                "number the channels 0, 1, 2, ... as in the file suffixes _0000, _0001"))
    bad = [k for k, v in names.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        problems.append(Problem(where, f"entries {bad} are not non-empty strings",
                                "give every channel a name such as \"CT\", \"T1\", \"R\""))
    return problems


def ordered_names(names: dict[str, str]) -> list[str]:
    """Channel names in channel order (keys "0", "1", ...)."""
    return [names[k] for k in sorted(names, key=lambda k: int(k) if str(k).isdigit() else 10**9)]


def check_file_ending(data: dict[str, Any]) -> list[Problem]:
    """``file_ending`` must be a string starting with '.' that nnDiff can read."""
    if "file_ending" not in data:
        return []
    ending = data["file_ending"]
    where = "dataset.json key 'file_ending'"
    if not isinstance(ending, str) or not ending.startswith("."):
        return [Problem(where, f"must be a string starting with '.', found {ending!r}",
                        'write it like ".nii.gz"')]
    if not is_supported_ending(ending):
        return [Problem(where, f"{ending!r} is not a supported image format",
                        f"convert the images to one of {', '.join(SUPPORTED_ENDINGS)}")]
    return []


def check_num_training(data: dict[str, Any]) -> list[Problem]:
    """``numTraining`` must be a positive integer (its agreement with the files is checked later)."""
    if "numTraining" not in data:
        return []
    n = data["numTraining"]
    if not _is_int(n) or n < 1:
        return [Problem("dataset.json key 'numTraining'", f"must be a positive integer, found {n!r}",
                        "set it to the number of training cases in imagesTr")]
    return []


def label_values(labels: dict[str, Any]) -> set[int]:
    """Every integer declared in ``labels`` (region labels contribute each listed value)."""
    values: set[int] = set()
    for v in labels.values():
        if _is_int(v):
            values.add(int(v))
        elif isinstance(v, (list, tuple)):
            values.update(int(x) for x in v if _is_int(x))
    return values


def check_labels(data: dict[str, Any]) -> list[Problem]:
    """``labels``: name -> non-negative int (or list of ints for nnU-Net regions); background 0."""
    if "labels" not in data:
        return []
    labels = data["labels"]
    where = "dataset.json key 'labels'"
    if not isinstance(labels, dict) or not labels:
        return [Problem(where, f"must be a non-empty object, found {labels!r}",
                        'write it as {"background": 0, "tumor": 1}')]
    problems = []
    for name, value in labels.items():
        ok = (_is_int(value) and value >= 0) or (
            isinstance(value, list) and value and all(_is_int(x) and x >= 0 for x in value))
        if not ok:
            problems.append(Problem(f"{where} entry '{name}'",
                                    f"must be a non-negative integer (or a list of them for a region), "
                                    f"found {value!r}", "give each label its integer value"))
    plain = [v for v in labels.values() if _is_int(v)]
    duplicates = sorted({v for v in plain if plain.count(v) > 1})
    if duplicates:
        problems.append(Problem(where, f"values {duplicates} are used by more than one label",
                                "give every label a distinct value"))
    if 0 not in plain:
        problems.append(Problem(where, "has no background label with value 0",
                                'add "background": 0 (nnU-Net v2 requires it)'))
    return problems


def check_conditions(data: dict[str, Any]) -> list[Problem]:
    """``conditions``: name -> {"type": categorical|continuous[, "values": [...]]} or the bare type."""
    if "conditions" not in data:
        return []
    conditions = data["conditions"]
    where = "dataset.json key 'conditions'"
    if not isinstance(conditions, dict):
        return [Problem(where, f"must be an object, found {conditions!r}",
                        'write it as {"sex": {"type": "categorical"}, "age": {"type": "continuous"}}')]
    problems = []
    for name, spec in conditions.items():
        entry = f"{where} entry '{name}'"
        if name in RESERVED_METADATA_KEYS:
            problems.append(Problem(entry, f"'{name}' is a reserved metadata key with a fixed meaning",
                                    "remove it from conditions (it is read from metadata.json anyway)"))
            continue
        ctype = spec if isinstance(spec, str) else spec.get("type") if isinstance(spec, dict) else None
        if ctype not in CONDITION_TYPES:
            problems.append(Problem(entry, f"has type {ctype!r}; valid types: {', '.join(CONDITION_TYPES)}",
                                    'write {"type": "categorical"} or {"type": "continuous"}'))
            continue
        if isinstance(spec, dict) and "values" in spec:
            values = spec["values"]
            if ctype != "categorical" or not isinstance(values, list) or len(values) < 2 \
                    or len(set(map(str, values))) != len(values):
                problems.append(Problem(f"{entry} key 'values'",
                                        f"must be a list of at least two distinct categories of a "
                                        f"categorical condition, found {values!r}",
                                        "list the categories or remove 'values'"))
    return problems


def normalized_conditions(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Conditions in the long form ``{name: {"type": ..., ["values": [...]]}}``."""
    out: dict[str, dict[str, Any]] = {}
    conditions = data.get("conditions")
    for name, spec in (conditions.items() if isinstance(conditions, dict) else []):
        if name in RESERVED_METADATA_KEYS:
            continue
        if isinstance(spec, str):
            out[name] = {"type": spec}
        elif isinstance(spec, dict) and spec.get("type") in CONDITION_TYPES:
            out[name] = dict(spec)
    return out


def check_reconstruction(data: dict[str, Any]) -> list[Problem]:
    """``reconstruction``: operator and physically consistent sampling parameters.

    mri_cartesian: ``acceleration`` >= 1, ``0 < center_fraction < 1`` and
    ``center_fraction <= 1 / acceleration`` (the fully sampled centre cannot exceed the total
    sampled fraction), ``mask_type`` in random|equispaced|gaussian, ``num_coils`` >= 1.
    ct_parallel: ``num_views`` >= 1, optional ``num_detectors`` >= 1, ``angle_range`` in (0, 360].
    """
    if "reconstruction" not in data:
        return []
    block = data["reconstruction"]
    where = "dataset.json key 'reconstruction'"
    if not isinstance(block, dict):
        return [Problem(where, f"must be an object, found {block!r}",
                        'write it as {"operator": "mri_cartesian", "acceleration": 4, "center_fraction": 0.08}')]
    try:
        operator = parse_option(ReconstructionOperator, str(block.get("operator")), "operator")
    except ValueError as e:
        return [Problem(f"{where} key 'operator'", str(e), "use one of the valid operators")]
    problems = _unknown_block_keys(block, RECONSTRUCTION_KEYS[operator], where)
    if operator == ReconstructionOperator.MRI_CARTESIAN:
        problems += _check_mri_block(block, where)
    else:
        problems += _check_ct_block(block, where)
    return problems


def _unknown_block_keys(block: dict[str, Any], allowed: tuple[str, ...], where: str) -> list[Problem]:
    unknown = sorted(set(block) - set(allowed))
    if unknown:
        return [Problem(where, f"has unknown keys {unknown}", f"use only {', '.join(allowed)}")]
    return []


def _check_mri_block(block: dict[str, Any], where: str) -> list[Problem]:
    problems = []
    acc = block.get("acceleration")
    if not _is_number(acc) or acc < 1:
        problems.append(Problem(f"{where} key 'acceleration'",
                                f"must be a number >= 1 (1 = fully sampled), found {acc!r}",
                                "set the undersampling factor, e.g. 4"))
    cf = block.get("center_fraction")
    if not _is_number(cf) or not 0 < cf < 1:
        problems.append(Problem(f"{where} key 'center_fraction'",
                                f"must be a fraction strictly between 0 and 1, found {cf!r}",
                                "set the fully sampled centre fraction, e.g. 0.08"))
    elif _is_number(acc) and acc >= 1 and cf > 1.0 / acc + 1e-9:
        problems.append(Problem(f"{where} key 'center_fraction'",
                                f"{cf} exceeds 1/acceleration = {1.0 / acc:.4g}: the fully sampled centre "
                                "alone would sample more lines than the acceleration allows",
                                "lower center_fraction or the acceleration"))
    mask = block.get("mask_type", "random")
    if mask not in MRI_MASK_TYPES:
        problems.append(Problem(f"{where} key 'mask_type'",
                                f"unknown mask type {mask!r}; valid values: {', '.join(MRI_MASK_TYPES)}",
                                "use one of the valid mask types"))
    coils = block.get("num_coils", 1)
    if not _is_int(coils) or coils < 1:
        problems.append(Problem(f"{where} key 'num_coils'", f"must be an integer >= 1, found {coils!r}",
                                "set the number of receive coils (1 for single-coil)"))
    return problems


def _check_ct_block(block: dict[str, Any], where: str) -> list[Problem]:
    problems = []
    views = block.get("num_views")
    if not _is_int(views) or views < 1:
        problems.append(Problem(f"{where} key 'num_views'", f"must be an integer >= 1, found {views!r}",
                                "set the number of projection angles, e.g. 60"))
    det = block.get("num_detectors")
    if det is not None and (not _is_int(det) or det < 1):
        problems.append(Problem(f"{where} key 'num_detectors'", f"must be an integer >= 1, found {det!r}",
                                "set the detector count or remove the key"))
    angle = block.get("angle_range", 180.0)
    if not _is_number(angle) or not 0 < angle <= 360:
        problems.append(Problem(f"{where} key 'angle_range'",
                                f"must be degrees in (0, 360], found {angle!r}",
                                "use 180 for a parallel-beam half turn"))
    return problems


def check_degradation(data: dict[str, Any]) -> list[Problem]:
    """``degradation``: ``type`` in gaussian|rician|poisson and ``level`` > 0 (or a [low, high] range)."""
    if "degradation" not in data:
        return []
    block = data["degradation"]
    where = "dataset.json key 'degradation'"
    if not isinstance(block, dict):
        return [Problem(where, f"must be an object, found {block!r}",
                        'write it as {"type": "gaussian", "level": 0.1}')]
    problems = _unknown_block_keys(block, DEGRADATION_KEYS, where)
    try:
        parse_option(Degradation, str(block.get("type")), "degradation type")
    except ValueError as e:
        problems.append(Problem(f"{where} key 'type'", str(e), "use one of the valid types"))
    level = block.get("level")
    is_range = (isinstance(level, list) and len(level) == 2 and all(_is_number(v) and v > 0 for v in level)
                and level[0] <= level[1])
    if not ((_is_number(level) and level > 0) or is_range):
        problems.append(Problem(f"{where} key 'level'",
                                f"must be a positive number or a [low, high] range of them, found {level!r}",
                                "set the noise level, e.g. 0.1"))
    return problems


def check_task_requirements(data: dict[str, Any]) -> list[Problem]:
    """Keys a task family needs: segmentation -> labels; translation -> target_names;
    reconstruction -> reconstruction block. Denoising needs neither: paired with target_names, else
    clean-only with the degradation from the 'degradation' block or the modality."""
    task = data.get("task")
    problems = []
    if task == TaskFamily.SEGMENTATION and "labels" not in data:
        problems.append(Problem("dataset.json key 'labels'", "is missing; the segmentation task needs it",
                                'add "labels": {"background": 0, "structure": 1, ...}'))
    if task == TaskFamily.TRANSLATION and "target_names" not in data:
        problems.append(Problem("dataset.json key 'target_names'",
                                "is missing; the translation task needs its targets declared",
                                'add "target_names": {"0": "CT"} and put the targets in targetsTr/'))
    if task == TaskFamily.RECONSTRUCTION and "reconstruction" not in data:
        problems.append(Problem("dataset.json key 'reconstruction'",
                                "is missing; the reconstruction task needs the acquisition model",
                                'add "reconstruction": {"operator": "mri_cartesian", "acceleration": 4, '
                                '"center_fraction": 0.08}'))
    # denoising: paired (target_names + targetsTr) or clean-only; without a 'degradation' block the
    # clean-only trainer picks the degradation from the modality (documentation/denoising.md).
    return problems


def check_allow_missing_channels(data: dict[str, Any]) -> list[Problem]:
    """``allow_missing_channels`` must be a boolean."""
    value = data.get("allow_missing_channels", False)
    if not isinstance(value, bool):
        return [Problem("dataset.json key 'allow_missing_channels'",
                        f"must be true or false, found {value!r}", "write true or false")]
    return []


def log_ignored_keys(data: dict[str, Any]) -> None:
    """Note keys nnDiff ignores: ``overwrite_image_reader_writer`` and unknown (misspelt?) ones."""
    if "overwrite_image_reader_writer" in data:
        logger.info("dataset.json: 'overwrite_image_reader_writer' (%s) is ignored; nnDiff picks the "
                    "reader from file_ending", data["overwrite_image_reader_writer"])
    if "modality" in data and "channel_names" not in data:
        logger.info("dataset.json: using nnU-Net v1 key 'modality' as 'channel_names'")
    unknown = sorted(set(data) - NNUNET_KEYS - NNDIFF_KEYS)
    if unknown:
        logger.warning("dataset.json: unknown keys %s are ignored (misspelt?)", unknown)


def is_natural_ending(ending: str) -> bool:
    """PNG/JPEG/BMP/TIFF: the formats where one RGB file may hold three channels."""
    return ending.lower() in NATURAL_ENDINGS
