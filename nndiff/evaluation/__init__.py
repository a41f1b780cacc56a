"""Evaluation metrics (see documentation/evaluation.md).

Generation: :func:`evaluate_generation` assembles intensity Wasserstein-1, MS-SSIM diversity,
Fréchet / kernel distances in a user-supplied TorchScript feature space, and a memorization check.
:func:`evaluate_generation_folders` does the same for folders of image files (``nndiff_evaluate_folder``).
"""
from nndiff.evaluation.distributions import (
    extract_features,
    frechet_distance,
    frechet_distance_from_stats,
    intensity_wasserstein,
    kernel_distance,
    load_feature_extractor,
    mmd2_unbiased,
    wasserstein1,
)
from nndiff.evaluation.folders import ImageFolder, center_crop_or_pad, load_image_folder
from nndiff.evaluation.generation_folders import evaluate_generation_folders
from nndiff.evaluation.generation_metrics import evaluate_generation
from nndiff.evaluation.memorization import NEAR_COPY_SSIM, MemorizationResult, memorization_check
from nndiff.evaluation.ssim import (
    ms_ssim,
    ms_ssim_diversity,
    ms_ssim_num_scales,
    ms_ssim_pairs,
    ms_ssim_weights,
    ssim,
    ssim_pairs,
)

__all__ = [
    "NEAR_COPY_SSIM",
    "ImageFolder",
    "MemorizationResult",
    "center_crop_or_pad",
    "evaluate_generation",
    "evaluate_generation_folders",
    "extract_features",
    "frechet_distance",
    "frechet_distance_from_stats",
    "intensity_wasserstein",
    "kernel_distance",
    "load_feature_extractor",
    "load_image_folder",
    "memorization_check",
    "mmd2_unbiased",
    "ms_ssim",
    "ms_ssim_diversity",
    "ms_ssim_num_scales",
    "ms_ssim_pairs",
    "ms_ssim_weights",
    "ssim",
    "ssim_pairs",
    "wasserstein1",
]
