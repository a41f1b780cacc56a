"""Raw dataset format: dataset.json schema, case discovery, image I/O and integrity checks.

Public API (documentation/architecture.md): :func:`load_dataset`, :func:`verify_integrity`,
:func:`find_dataset_folder`, :class:`RawDataset`, :class:`Case`; image I/O lives in
:mod:`nndiff.dataset.io` (``read_images``, ``read_label``, ``write_image``, ``ImageProperties``).
SimpleITK is imported lazily inside :mod:`nndiff.dataset.io` only, so loading a dataset.json and
discovering cases work where SimpleITK is not installed.
"""
from nndiff.dataset.discovery import Case
from nndiff.dataset.examples import EXAMPLE_KINDS, make_example_dataset
from nndiff.dataset.integrity import verify_integrity
from nndiff.dataset.io import ImageProperties, read_images, read_label, write_image
from nndiff.dataset.raw_dataset import RawDataset, find_dataset_folder, load_dataset

__all__ = [
    "Case",
    "EXAMPLE_KINDS",
    "ImageProperties",
    "RawDataset",
    "find_dataset_folder",
    "load_dataset",
    "make_example_dataset",
    "read_images",
    "read_label",
    "verify_integrity",
    "write_image",
]
