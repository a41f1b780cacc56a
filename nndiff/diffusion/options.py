"""Shared option names (StrEnums) used by the plans JSON, the CLI and every module.

The plans JSON stores exactly these spellings. An unknown name fails with the list of
valid ones (see :func:`parse_option`).
"""
from __future__ import annotations

from enum import StrEnum
from typing import TypeVar


class TaskFamily(StrEnum):
    GENERATION = "generation"
    TRANSLATION = "translation"
    DENOISING = "denoising"
    RECONSTRUCTION = "reconstruction"
    ANOMALY_DETECTION = "anomaly_detection"
    SEGMENTATION = "segmentation"


class Process(StrEnum):
    """Forward (noising) process."""

    VP_DISCRETE = "vp_discrete"  # DDPM: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t in {0..T-1}
    VE_DISCRETE = "ve_discrete"  # NCSN: x = x0 + sigma_i z, geometric sigma levels
    VP_SDE = "vp_sde"  # Song et al. 2021, continuous t in [eps, 1]
    SUBVP_SDE = "subvp_sde"
    VE_SDE = "ve_sde"


class Schedule(StrEnum):
    LINEAR = "linear"
    SCALED_LINEAR = "scaled_linear"
    COSINE = "cosine"
    SIGMOID = "sigmoid"
    GEOMETRIC = "geometric"  # VE sigma levels (NCSN)


class TimestepSpacing(StrEnum):
    LEADING = "leading"
    LINSPACE = "linspace"
    TRAILING = "trailing"


class Parameterization(StrEnum):
    EPS = "eps"
    X0 = "x0"
    V = "v"
    SCORE = "score"


class LossWeighting(StrEnum):
    UNIFORM = "uniform"
    MIN_SNR = "min_snr"  # min-SNR-gamma (Hang et al. 2023)
    SIGMA_SQUARED = "sigma_squared"  # NCSN lambda(sigma) = sigma^2


class NoiseType(StrEnum):
    GAUSSIAN = "gaussian"
    SIMPLEX = "simplex"


class Sampler(StrEnum):
    DDPM = "ddpm"
    DDIM = "ddim"
    DPM_SOLVER_PP_2M = "dpm_solver_pp_2m"
    DPM_SOLVER_PP_2M_SDE = "dpm_solver_pp_2m_sde"
    EULER_MARUYAMA = "euler_maruyama"
    PREDICTOR_CORRECTOR = "predictor_corrector"
    PF_ODE_HEUN = "pf_ode_heun"
    ANNEALED_LANGEVIN = "annealed_langevin"


class VarianceType(StrEnum):
    """DDPM ancestral step variance."""

    FIXED_SMALL = "fixed_small"  # posterior variance beta_tilde
    FIXED_LARGE = "fixed_large"  # beta_t


class Guidance(StrEnum):
    NONE = "none"
    CLASSIFIER_FREE = "classifier_free"
    CLASSIFIER = "classifier"


class Modality(StrEnum):
    CT = "ct"
    MR = "mr"
    PET = "pet"
    XRAY = "xray"
    ULTRASOUND = "ultrasound"
    OCT = "oct"
    MICROSCOPY_RGB = "microscopy_rgb"
    OTHER = "other"


class NormalizationScheme(StrEnum):
    """Intensity normalization into the bounded range diffusion needs.

    Parameters of each scheme are stored in the plan; see preprocessing/normalization.py.
    """

    CT_WINDOW = "ct_window"  # dataset-level clip window (HU) -> [-1, 1]
    DATASET_PERCENTILE = "dataset_percentile"  # dataset-level clip [lo, hi] -> [-1, 1]
    PER_IMAGE_PERCENTILE = "per_image_percentile"  # per image (conditioning inputs only)
    RGB = "rgb"  # [0, 255] -> [-1, 1]
    SCALE_ONLY = "scale_only"  # x / s, no offset, no clip (reconstruction keeps linearity)
    NONE = "none"


class Degradation(StrEnum):
    GAUSSIAN = "gaussian"
    RICIAN = "rician"
    POISSON = "poisson"


class MaskType(StrEnum):
    """Cartesian MRI undersampling mask."""

    RANDOM = "random"
    EQUISPACED = "equispaced"
    GAUSSIAN = "gaussian"


class ReconstructionOperator(StrEnum):
    MRI_CARTESIAN = "mri_cartesian"
    CT_PARALLEL = "ct_parallel"


E = TypeVar("E", bound=StrEnum)


def parse_option(enum_cls: type[E], value: str | E, what: str | None = None) -> E:
    """Return ``enum_cls(value)`` or raise ValueError naming the valid spellings."""
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(m.value for m in enum_cls)
        label = what or enum_cls.__name__
        raise ValueError(f"unknown {label} {value!r}; valid values: {valid}") from None
