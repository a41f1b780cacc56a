"""fastmri -> nnDiff raw dataset; see :mod:`nndiff.dataset_conversion.fastmri` and documentation/dataset_conversion.md.

Run from a checkout: ``python -m dataset_conversion.fastmri -i SRC -o RAW -d ID`` (installed: ``nndiff_convert_fastmri``).
"""
from nndiff.dataset_conversion.fastmri import convert_fastmri, main

__all__ = ["convert_fastmri", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
