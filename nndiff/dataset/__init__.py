"""Raw dataset format: dataset.json schema, case discovery, image I/O and integrity checks.

SimpleITK is imported lazily inside :mod:`nndiff.dataset.io` only.
"""
from nndiff.dataset.examples import EXAMPLE_KINDS, make_example_dataset

__all__ = ["EXAMPLE_KINDS", "make_example_dataset"]
