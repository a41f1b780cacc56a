"""nnunet -> nnDiff raw dataset; see :mod:`nndiff.dataset_conversion.nnunet` and documentation/dataset_conversion.md.

Run from a checkout: ``python -m dataset_conversion.nnunet -i SRC -o RAW -d ID`` (installed: ``nndiff_convert_nnunet``).
"""
from nndiff.dataset_conversion.nnunet import convert_nnunet, main

__all__ = ["convert_nnunet", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
