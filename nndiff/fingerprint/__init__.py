"""Dataset fingerprint (``dataset_fingerprint.json``): geometry, modality and intensity statistics."""
from nndiff.fingerprint.extractor import (
    FOREGROUND_LABEL,
    FOREGROUND_NONZERO,
    CaseStats,
    analyze_case,
    assemble_fingerprint,
    extract_fingerprint,
)
from nndiff.fingerprint.modality import detect_modality, value_warnings

__all__ = [
    "FOREGROUND_LABEL",
    "FOREGROUND_NONZERO",
    "CaseStats",
    "analyze_case",
    "assemble_fingerprint",
    "detect_modality",
    "extract_fingerprint",
    "value_warnings",
]
