"""Imaging modality of a channel from its name in ``channel_names``, and value checks.

The name is matched case-insensitively, as a whole (separators removed) and token by token
(split at anything that is not a letter or digit), against the word lists below. The first
modality in :data:`RULES` order that matches wins; PET comes before CT so "PET/CT" channels of
PET data are PET. nnU-Net's normalization names (``CT``, ``noNorm``, ``zscore``,
``rescale_to_0_1``, ``rgb_to_0_1``) are handled: ``CT`` → CT, ``rgb_to_0_1`` → microscopy RGB,
the others → other.
"""
from __future__ import annotations

import logging
import re

from nndiff.diffusion.options import Modality

logger = logging.getLogger(__name__)

RULES: tuple[tuple[Modality, frozenset[str]], ...] = (
    (Modality.PET, frozenset({"pet", "suv", "fdg", "psma", "petct", "petmr"})),
    (Modality.CT, frozenset({"ct", "cect", "ncct", "cta", "cbct", "hu", "hounsfield",
                             "computedtomography"})),
    (Modality.MR, frozenset({"mr", "mri", "t1", "t1w", "t1c", "t1ce", "t1gd", "t1post", "t1pre",
                             "t1contrast", "t2", "t2w", "t2star", "t2flair", "flair", "pd", "pdw",
                             "dwi", "adc", "swi", "dti", "fa", "md", "trace", "b0", "b1000", "dce",
                             "mprage", "bold", "tof", "mra", "stir", "magnitude", "phase"})),
    (Modality.XRAY, frozenset({"xray", "cxr", "radiograph", "radiography", "dx", "cr",
                               "mammography", "mammogram", "mammo", "fluoroscopy", "fluoro",
                               "dxa"})),
    (Modality.ULTRASOUND, frozenset({"us", "ultrasound", "sonography",
                                     "echocardiography", "bmode"})),
    (Modality.OCT, frozenset({"oct", "octa"})),
    (Modality.MICROSCOPY_RGB, frozenset({"r", "g", "b", "red", "green", "blue", "rgb", "he",
                                         "histology", "histopathology", "pathology",
                                         "microscopy", "wsi", "rgbto01"})),
)

# MR sequence names with suffixes the lists cannot enumerate (T1_gd, T2-weighted, t1mprage...)
_MR_PREFIX = re.compile(r"^t[12](w|c|ce|gd|star|\*)?$|^t[12][a-z]+$|^b\d+$")


def detect_modality(name: str) -> Modality:
    """The modality a channel name denotes (rules in the module docstring)."""
    lower = str(name).strip().lower()
    compact = re.sub(r"[^a-z0-9]", "", lower)
    tokens = [t for t in re.split(r"[^a-z0-9]+", lower) if t]
    for modality, words in RULES:
        if compact in words or any(t in words for t in tokens):
            return modality
    if _MR_PREFIX.match(compact) or any(_MR_PREFIX.match(t) for t in tokens):
        return Modality.MR
    return Modality.OTHER


def value_warnings(channel: str, modality: Modality, minimum: float, maximum: float) -> list[str]:
    """Warnings when a channel's values contradict its declared modality (each is also logged).

    - CT without negative values: CT is expected in Hounsfield units (air about -1000); values
      >= 0 mean raw stored values (rescale slope/intercept not applied) or a mislabelled channel.
    - RGB channels outside 0..255.
    """
    found: list[str] = []
    if modality is Modality.CT and minimum >= 0:
        found.append(
            f"channel {channel} is declared CT but has no negative values (min {minimum:g}); CT is "
            "expected in Hounsfield units (air about -1000). Apply the rescale slope/intercept or "
            "rename the channel"
        )
    if modality is Modality.MICROSCOPY_RGB and (minimum < 0 or maximum > 255):
        found.append(
            f"channel {channel} looks like an RGB channel but its values span [{minimum:g}, "
            f"{maximum:g}], outside 0..255; store 8-bit RGB or rename the channel"
        )
    for message in found:
        logger.warning(message)
    return found
