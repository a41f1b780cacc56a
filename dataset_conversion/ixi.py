"""ixi -> nnDiff raw dataset; see :mod:`nndiff.dataset_conversion.ixi` and documentation/dataset_conversion.md.

Run from a checkout: ``python -m dataset_conversion.ixi -i SRC -o RAW -d ID`` (installed: ``nndiff_convert_ixi``).
"""
from nndiff.dataset_conversion.ixi import convert_ixi, main

__all__ = ["convert_ixi", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
