"""xray_csv -> nnDiff raw dataset; see :mod:`nndiff.dataset_conversion.xray_csv` and documentation/dataset_conversion.md.

Run from a checkout: ``python -m dataset_conversion.xray_csv -i SRC -o RAW -d ID`` (installed: ``nndiff_convert_xray_csv``).
"""
from nndiff.dataset_conversion.xray_csv import convert_xray_csv, main

__all__ = ["convert_xray_csv", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
