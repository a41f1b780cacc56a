"""brats -> nnDiff raw dataset; see :mod:`nndiff.dataset_conversion.brats` and documentation/dataset_conversion.md.

Run from a checkout: ``python -m dataset_conversion.brats -i SRC -o RAW -d ID`` (installed: ``nndiff_convert_brats``).
"""
from nndiff.dataset_conversion.brats import convert_brats, main

__all__ = ["convert_brats", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
