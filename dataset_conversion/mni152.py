"""MNI152 template -> nnDiff raw dataset; see :mod:`nndiff.dataset_conversion.mni152`.

Run from a checkout: ``python -m dataset_conversion.mni152 -o RAW -d 1 [--mode 3d]``
(installed: ``nndiff_convert_mni152``).
"""
from nndiff.dataset_conversion.mni152 import convert_mni152, main

__all__ = ["convert_mni152", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
