"""Grouped 5-fold splits, splits_final.json, fold 'all'."""
from __future__ import annotations

import json

import pytest

from nndiff.errors import NnDiffError
from nndiff.training.splits import (SPLITS_FILE, fold_cases, load_or_create_splits, make_grouped_splits,
                                    parse_fold, subjects_of)


def _cases_and_metadata(num_subjects: int = 7):
    # subjects with 1..4 cases each, interleaved names so sorting by name does not group them
    cases, metadata = [], {}
    for s in range(num_subjects):
        for k in range(1 + s % 4):
            case = f"case_{k}_{s:02d}"
            cases.append(case)
            metadata[case] = {"subject": f"patient{s}"}
    cases.append("lonely")  # no metadata: its own group
    return cases, metadata


def test_no_subject_in_two_validation_folds_and_every_case_validated_once():
    cases, metadata = _cases_and_metadata()
    splits = make_grouped_splits(cases, subjects_of(cases, metadata), num_folds=5, seed=3)
    assert len(splits) == 5
    subject_fold = {}
    seen = []
    for fold, split in enumerate(splits):
        assert set(split["train"]).isdisjoint(split["val"])
        assert sorted(split["train"] + split["val"]) == sorted(cases)
        for case in split["val"]:
            subject = metadata.get(case, {}).get("subject", case)
            assert subject_fold.setdefault(subject, fold) == fold
            seen.append(case)
    assert sorted(seen) == sorted(cases)
    sizes = [len(s["val"]) for s in splits]
    assert max(sizes) - min(sizes) <= 4  # balanced up to the largest group (4 cases)


def test_splits_are_seeded():
    cases, metadata = _cases_and_metadata(10)
    groups = subjects_of(cases, metadata)
    assert make_grouped_splits(cases, groups, seed=1) == make_grouped_splits(list(reversed(cases)), groups, seed=1)
    assert make_grouped_splits(cases, groups, seed=1) != make_grouped_splits(cases, groups, seed=2)


def test_fewer_groups_than_folds_and_single_group():
    cases = ["a", "b", "c", "d"]
    groups = {"a": "s1", "b": "s1", "c": "s2", "d": "s3"}
    splits = make_grouped_splits(cases, groups, num_folds=5)
    assert len(splits) == 3
    assert make_grouped_splits(cases, {c: "one" for c in cases}) == []


def test_splits_file_is_written_once_and_honoured(tmp_path):
    cases, metadata = _cases_and_metadata()
    created = load_or_create_splits(tmp_path, cases, metadata)
    on_disk = json.loads((tmp_path / SPLITS_FILE).read_text(encoding="utf-8"))
    assert on_disk == created
    custom = [{"train": cases[2:], "val": cases[:2]}, {"train": cases[:2], "val": cases[2:]}]
    (tmp_path / SPLITS_FILE).write_text(json.dumps(custom))
    assert load_or_create_splits(tmp_path, cases, metadata) == custom
    assert fold_cases(custom, 1, cases) == (cases[:2], cases[2:])
    with pytest.raises(NnDiffError, match="fold 2 does not exist.*2 fold"):
        fold_cases(custom, 2, cases)


def test_bad_splits_file_names_the_problem(tmp_path):
    cases = ["a", "b"]
    (tmp_path / SPLITS_FILE).write_text(json.dumps([{"train": ["a", "zz"], "val": ["b"]}]))
    with pytest.raises(NnDiffError, match=r"fold 0 names case\(s\) that are not in the preprocessed data: zz"):
        load_or_create_splits(tmp_path, cases)
    (tmp_path / SPLITS_FILE).write_text(json.dumps({"train": cases}))
    with pytest.raises(NnDiffError, match="must be a list"):
        load_or_create_splits(tmp_path, cases)


def test_fold_all_trains_and_validates_on_everything():
    assert fold_cases([], "all", ["b", "a"]) == (["a", "b"], ["a", "b"])
    assert parse_fold("all") == "all" and parse_fold("3") == 3 and parse_fold(2) == 2
    with pytest.raises(NnDiffError, match="integer"):
        parse_fold("first")
