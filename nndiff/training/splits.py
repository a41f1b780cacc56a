"""Cross-validation splits grouped by subject, stored as ``splits_final.json`` (nnU-Net layout).

``splits_final.json`` in the preprocessed dataset folder is a list with one
``{"train": [...], "val": [...]}`` per fold. It is written once (atomically) and honoured from
then on, also when the user edits it by hand. Cases of one subject (metadata key ``subject``)
are always in the same fold: slices or time points of one patient would otherwise leak from
training into validation.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from nndiff.errors import NnDiffError
from nndiff.utils.files import load_json, save_json

logger = logging.getLogger(__name__)

SPLITS_FILE = "splits_final.json"
NUM_FOLDS = 5
DEFAULT_SPLIT_SEED = 12345
#: Metadata key that groups cases (reserved in metadata.json).
SUBJECT_KEY = "subject"
FOLD_ALL = "all"


def subjects_of(case_ids: Sequence[str], metadata: Mapping[str, Mapping[str, Any]] | None) -> dict[str, str]:
    """Case -> group name. Cases without a ``subject`` entry form their own group."""
    metadata = metadata or {}
    groups = {}
    for case in case_ids:
        subject = (metadata.get(case) or {}).get(SUBJECT_KEY)
        groups[case] = f"subject:{subject}" if subject is not None else f"case:{case}"
    return groups


def make_grouped_splits(case_ids: Sequence[str], groups: Mapping[str, str], num_folds: int = NUM_FOLDS,
                        seed: int = DEFAULT_SPLIT_SEED) -> list[dict[str, list[str]]]:
    """Seeded grouped k-fold: every group lands in exactly one validation fold.

    Rule: groups are shuffled with ``seed``, then, largest first (stable sort, so ties keep the
    shuffled order), each goes to the fold with the fewest validation cases so far (lowest index
    on ties). This balances fold sizes like scikit-learn's GroupKFold but is seeded.
    With fewer groups than ``num_folds`` there are as many folds as groups; with one group no
    split exists (use fold ``all``).
    """
    cases = sorted(case_ids)
    members: dict[str, list[str]] = {}
    for case in cases:
        members.setdefault(groups[case], []).append(case)
    names = sorted(members)
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    shuffled.sort(key=lambda g: -len(members[g]))  # stable
    n = min(num_folds, len(shuffled))
    if n < 2:
        return []
    if n < num_folds:
        logger.warning("only %d subject group(s): making %d folds instead of %d", n, n, num_folds)
    val: list[list[str]] = [[] for _ in range(n)]
    for group in shuffled:
        fold = min(range(n), key=lambda f: (len(val[f]), f))
        val[fold].extend(members[group])
    splits = []
    for fold in range(n):
        held_out = set(val[fold])
        splits.append({"train": [c for c in cases if c not in held_out], "val": sorted(held_out)})
    return splits


def validate_splits(splits: Any, case_ids: Sequence[str], path: Path) -> list[dict[str, list[str]]]:
    """Check a loaded splits file: a list of {"train": [...], "val": [...]} naming existing cases."""
    fix = f"correct the file or delete {path} to have it recreated"
    if not isinstance(splits, list) or not all(
        isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list) for s in splits
    ):
        raise NnDiffError(f"{path} must be a list of {{\"train\": [...], \"val\": [...]}} objects. Fix: {fix}")
    known = set(case_ids)
    for fold, split in enumerate(splits):
        unknown = sorted(set(split["train"] + split["val"]) - known)
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise NnDiffError(f"{path}: fold {fold} names case(s) that are not in the preprocessed data: {shown}. "
                              f"Fix: {fix}")
        if not split["train"]:
            raise NnDiffError(f"{path}: fold {fold} has no training cases. Fix: {fix}")
    return splits


def load_or_create_splits(preprocessed_dataset_dir: Path, case_ids: Sequence[str],
                          metadata: Mapping[str, Mapping[str, Any]] | None = None,
                          seed: int = DEFAULT_SPLIT_SEED) -> list[dict[str, list[str]]]:
    """Return the splits of ``splits_final.json``, creating the file (grouped by subject) if absent."""
    path = Path(preprocessed_dataset_dir) / SPLITS_FILE
    if path.is_file():
        logger.info("using existing splits from %s", path)
        return validate_splits(load_json(path), case_ids, path)
    splits = make_grouped_splits(case_ids, subjects_of(case_ids, metadata), NUM_FOLDS, seed)
    if splits:
        save_json(splits, path)
        logger.info("created %d-fold splits grouped by subject in %s", len(splits), path)
    return splits


def fold_cases(splits: Sequence[Mapping[str, list[str]]], fold: int | str,
               case_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training cases, validation cases) of ``fold``.

    Fold ``all`` trains on every case and validates on the training cases (the validation loss
    then measures fit, not generalisation; the trainer logs a note).
    """
    if fold == FOLD_ALL:
        return sorted(case_ids), sorted(case_ids)
    if not isinstance(fold, int) or isinstance(fold, bool) or fold < 0:
        raise NnDiffError(f"fold must be an integer >= 0 or 'all', got {fold!r}")
    if fold >= len(splits):
        raise NnDiffError(f"fold {fold} does not exist: the splits have {len(splits)} fold(s) "
                          f"({len(case_ids)} case(s)). Fix: use a fold below {len(splits)} or fold 'all'")
    split = splits[fold]
    return list(split["train"]), list(split["val"])


def parse_fold(value: str | int) -> int | str:
    """Command-line fold: an integer or ``all``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == FOLD_ALL:
        return FOLD_ALL
    try:
        return int(text)
    except ValueError:
        raise NnDiffError(f"fold must be an integer (0-4) or 'all', got {value!r}") from None
