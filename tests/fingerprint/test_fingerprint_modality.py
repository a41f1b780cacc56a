"""Modality from channel names, and the value checks against the declared modality."""
from __future__ import annotations

import logging

import pytest

from nndiff.diffusion.options import Modality
from nndiff.fingerprint import detect_modality, value_warnings


@pytest.mark.parametrize("name, modality", [
    ("CT", Modality.CT), ("ct_arterial", Modality.CT), ("NCCT", Modality.CT), ("CBCT", Modality.CT),
    ("T1", Modality.MR), ("T1w", Modality.MR), ("t1ce", Modality.MR), ("T1_Gd", Modality.MR),
    ("T2", Modality.MR), ("T2-FLAIR", Modality.MR), ("FLAIR", Modality.MR), ("PD", Modality.MR),
    ("DWI", Modality.MR), ("ADC", Modality.MR), ("MRI", Modality.MR), ("t2haste", Modality.MR),
    ("b800", Modality.MR),
    ("PET", Modality.PET), ("FDG-PET", Modality.PET), ("SUV", Modality.PET),
    ("X-ray", Modality.XRAY), ("CXR", Modality.XRAY), ("mammography", Modality.XRAY),
    ("US", Modality.ULTRASOUND), ("Ultrasound", Modality.ULTRASOUND),
    ("OCT", Modality.OCT),
    ("R", Modality.MICROSCOPY_RGB), ("green", Modality.MICROSCOPY_RGB), ("H&E", Modality.MICROSCOPY_RGB),
    ("histology", Modality.MICROSCOPY_RGB), ("rgb_to_0_1", Modality.MICROSCOPY_RGB),
    ("grey", Modality.OTHER), ("noNorm", Modality.OTHER), ("zscore", Modality.OTHER),
    ("echo_1", Modality.OTHER), ("", Modality.OTHER),
])
def test_detect_modality(name, modality):
    assert detect_modality(name) is modality


def test_ct_without_negative_values_warns_and_logs(caplog):
    with caplog.at_level(logging.WARNING, logger="nndiff.fingerprint.modality"):
        found = value_warnings("0 'CT'", Modality.CT, 0.0, 3000.0)
    assert len(found) == 1 and "Hounsfield" in found[0]
    assert found[0] in caplog.text
    assert value_warnings("0 'CT'", Modality.CT, -1024.0, 3000.0) == []
    assert value_warnings("0 'MR'", Modality.MR, 0.0, 3000.0) == []


def test_rgb_outside_byte_range_warns():
    assert value_warnings("0 'R'", Modality.MICROSCOPY_RGB, 0.0, 255.0) == []
    assert "0..255" in value_warnings("0 'R'", Modality.MICROSCOPY_RGB, 0.0, 4095.0)[0]
