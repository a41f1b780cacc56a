"""GDCM's DICOM writer (SimpleITK 2.x) switches the C locale to "C"; keep_locale restores it."""
from __future__ import annotations

import locale
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nndiff.utils.process_locale import keep_locale


def _write_series(folder: Path) -> None:
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(3):
        image = sitk.GetImageFromArray(np.full((1, 4, 4), 10 * z, np.int16))
        for key, value in {"0010|0020": "P1", "0008|0060": "CT", "0020|000e": "1.2.3.4",
                           "0008|0018": f"1.2.3.4.{z + 1}", "0020|0013": str(z + 1),
                           "0020|0032": f"0\\0\\{2.0 * z}", "0020|0037": "1\\0\\0\\0\\1\\0"}.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{z}.dcm"))
        writer.Execute(image)


def test_keep_locale_restores_what_gdcm_changes(tmp_path):
    before = locale.setlocale(locale.LC_ALL)
    with keep_locale():
        _write_series(tmp_path / "s")
        sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(tmp_path / "s"))
    assert locale.setlocale(locale.LC_ALL) == before
    # without the guard the writer leaves the process in the "C" locale (ASCII default encoding)
    try:
        _write_series(tmp_path / "t")
        changed = locale.setlocale(locale.LC_ALL) != before
    finally:
        locale.setlocale(locale.LC_ALL, before)
    assert changed, "GDCM no longer changes the locale: keep_locale may be unnecessary"
