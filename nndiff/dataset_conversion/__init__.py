"""Converters from public data into the nnDiff raw layout (inside the package so that console
scripts and ``nndiff_demo`` can import them from an installed, non-editable nnDiff).

The top-level ``dataset_conversion/`` folder of the repository re-exports these for users who run
the scripts from a checkout (as nnU-Net's ``dataset_conversion``).
"""
from nndiff.dataset_conversion.mni152 import convert_mni152
from nndiff.dataset_conversion.msd import convert_msd
from nndiff.dataset_conversion.nnunet import convert_nnunet
from nndiff.dataset_conversion.brats import convert_brats
from nndiff.dataset_conversion.dicom import convert_dicom
from nndiff.dataset_conversion.fastmri import convert_fastmri
from nndiff.dataset_conversion.ixi import convert_ixi
from nndiff.dataset_conversion.synthrad import convert_synthrad
from nndiff.dataset_conversion.lowdose_ct import convert_lowdose_ct
from nndiff.dataset_conversion.xray_csv import convert_xray_csv

__all__ = [
    "convert_mni152",
    "convert_msd",
    "convert_nnunet",
    "convert_brats",
    "convert_dicom",
    "convert_fastmri",
    "convert_ixi",
    "convert_synthrad",
    "convert_lowdose_ct",
    "convert_xray_csv",
]
