"""synthrad -> nnDiff raw dataset; see :mod:`nndiff.dataset_conversion.synthrad` and documentation/dataset_conversion.md.

Run from a checkout: ``python -m dataset_conversion.synthrad -i SRC -o RAW -d ID`` (installed: ``nndiff_convert_synthrad``).
"""
from nndiff.dataset_conversion.synthrad import convert_synthrad, main

__all__ = ["convert_synthrad", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
