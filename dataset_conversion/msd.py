"""msd -> nnDiff raw dataset; see :mod:`nndiff.dataset_conversion.msd` and documentation/dataset_conversion.md.

Run from a checkout: ``python -m dataset_conversion.msd -i SRC -o RAW -d ID`` (installed: ``nndiff_convert_msd``).
"""
from nndiff.dataset_conversion.msd import convert_msd, main

__all__ = ["convert_msd", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
