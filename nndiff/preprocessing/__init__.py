"""Preprocessing: transpose, crop to nonzero, normalize, resample — and the exact inverse.

Public API (documentation/architecture.md, documentation/preprocessing.md):
``preprocess_dataset``, ``preprocess_case``, ``invert_case``, ``generated_case_json``,
``save_case``, ``load_case``.
"""
from nndiff.preprocessing.case import (
    clip_fractions,
    generated_case_json,
    invert_case,
    preprocess_case,
    resolve_config,
)
from nndiff.preprocessing.case_io import CaseFiles, load_case, read_case, save_case
from nndiff.preprocessing.preprocessor import preprocess_dataset

__all__ = [
    "CaseFiles",
    "clip_fractions",
    "generated_case_json",
    "invert_case",
    "load_case",
    "preprocess_case",
    "preprocess_dataset",
    "read_case",
    "resolve_config",
    "save_case",
]
