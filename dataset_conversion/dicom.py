"""dicom -> nnDiff raw dataset; see :mod:`nndiff.dataset_conversion.dicom` and documentation/dataset_conversion.md.

Run from a checkout: ``python -m dataset_conversion.dicom -i SRC -o RAW -d ID`` (installed: ``nndiff_convert_dicom``).
"""
from nndiff.dataset_conversion.dicom import convert_dicom, main

__all__ = ["convert_dicom", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
