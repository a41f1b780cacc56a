"""Converters from public data into the nnDiff raw layout (inside the package so that console
scripts and ``nndiff_demo`` can import them from an installed, non-editable nnDiff).

The top-level ``dataset_conversion/`` folder of the repository re-exports these for users who run
the scripts from a checkout (as nnU-Net's ``dataset_conversion``).
"""
from nndiff.dataset_conversion.mni152 import convert_mni152

__all__ = ["convert_mni152"]
