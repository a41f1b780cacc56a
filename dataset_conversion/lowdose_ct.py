"""lowdose_ct -> nnDiff raw dataset; see :mod:`nndiff.dataset_conversion.lowdose_ct` and documentation/dataset_conversion.md.

Run from a checkout: ``python -m dataset_conversion.lowdose_ct -i SRC -o RAW -d ID`` (installed: ``nndiff_convert_lowdose_ct``).
"""
from nndiff.dataset_conversion.lowdose_ct import convert_lowdose_ct, main

__all__ = ["convert_lowdose_ct", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
