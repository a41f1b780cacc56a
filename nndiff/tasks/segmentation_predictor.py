"""Segmentation family predictors: an ensemble of diffusion samples fused into a label map and an
uncertainty map (:class:`SegmentationPredictor`), and the deterministic baseline's softmax
(:class:`SegmentationBaselinePredictor`), both writing the same files.

Per case, K samples (plan ``sampling.num_ensemble_samples``; ``num_samples`` / ``--num_samples``
overrides) of the [-1, 1] mask channels are drawn with the plan's sampler, conditioned on the
case's images; a 3D image larger than the patch (or a 2D slice larger than the patch) is sampled
with the denoiser applied in Gaussian-blended overlapping windows at every step. Each sample is
mapped to per-channel scores ``(x + 1) / 2`` clipped to [0, 1] and, for plain labels, normalised
to sum to 1 over channels. Fusion: ``mean`` (mean probability) or ``staple`` (multi-class STAPLE
EM over the samples' label maps, implemented here; binary STAPLE per region for region labels),
giving the fused probability. Label map: argmax (plain labels) or region > 0.5 painted in
``regions_class_order`` (regions). Uncertainty: ``entropy`` of the fused probability (plain labels:
[0, log C]; regions: the sum of the regions' binary entropies, [0, R log 2]) or ``variance`` (the
samples' per-voxel probability variance, ddof 0, averaged over channels: [0, 0.25]; needs K >= 2).

Outputs per case: ``{CASE}{ending}`` (label map, original grid and geometry via ``invert_case``
kind ``seg``) and ``{CASE}_uncertainty{ending}`` (float32, same geometry; integer-only formats such
as PNG get ``{CASE}_uncertainty.npy`` with a geometry sidecar instead, since rounding would destroy
it). ``prediction_info.json`` records K, fusion, uncertainty kind and the uncertainty file of
every case. See ``documentation/segmentation.md``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nndiff.errors import NnDiffError, PlansError
from nndiff.inference.files import write_output
from nndiff.inference.predictor import PreparedCase, Predictor
from nndiff.inference.registry import register_predictor
from nndiff.tasks.segmentation import (
    LabelScheme,
    baseline_logits,
    check_scheme_channels,
    label_scheme,
    logits_to_probabilities,
)
from nndiff.tasks.translation import sample_translation
from nndiff.tasks.translation_predictor import pad_to_patch

logger = logging.getLogger(__name__)

FUSIONS = ("mean", "staple")
UNCERTAINTIES = ("entropy", "variance")
#: The uncertainty map is written as ``{CASE}_uncertainty{ending}``.
UNCERTAINTY_SUFFIX = "_uncertainty"
#: Written instead of an integer-only file ending (PNG, JPEG, BMP) for the float uncertainty map.
FLOAT_FALLBACK_ENDING = ".npy"
STAPLE_MAX_ITERATIONS = 50
STAPLE_TOLERANCE = 1e-6
#: STAPLE's initial sensitivity/specificity (diagonal of each rater's confusion matrix).
STAPLE_INITIAL_AGREEMENT = 0.9
_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# Samples -> probabilities -> label map and uncertainty (pure tensor functions)
# ----------------------------------------------------------------------------------------------
def samples_to_probabilities(samples: torch.Tensor, is_region: bool) -> torch.Tensor:
    """Samples ``(K, C, *spatial)`` in [-1, 1] -> per-channel scores in [0, 1]; plain labels are
    normalised over channels (a voxel whose scores are all 0 becomes uniform)."""
    scores = ((samples.float() + 1) / 2).clamp(0, 1)
    if is_region:
        return scores
    total = scores.sum(dim=1, keepdim=True)
    uniform = torch.full_like(scores, 1.0 / scores.shape[1])
    return torch.where(total > 0, scores / total.clamp_min(_EPS), uniform)


def label_map(probabilities: torch.Tensor, scheme: LabelScheme) -> torch.Tensor:
    """Fused probabilities ``(C, *spatial)`` -> label map ``(1, *spatial)`` int64 in label values.

    Plain labels: the value of the argmax channel. Regions (nnU-Net): start from 0, then each region
    channel i > 0.5 paints ``class_order[i]`` in order (later regions win)."""
    if scheme.is_region:
        if scheme.class_order is None:
            raise PlansError("dataset.json uses region labels but has no 'regions_class_order', so a region "
                             "prediction cannot be turned into a label map. Fix: add \"regions_class_order\" "
                             "(the label value each region paints, in order), as nnU-Net requires")
        seg = torch.zeros(probabilities.shape[1:], dtype=torch.long, device=probabilities.device)
        for channel, value in enumerate(scheme.class_order, start=1):
            seg[probabilities[channel] > 0.5] = value
        return seg[None]
    values = torch.tensor([v[0] for v in scheme.values], device=probabilities.device)
    return values[probabilities.argmax(dim=0)][None]


def entropy_map(probabilities: torch.Tensor, is_region: bool) -> torch.Tensor:
    """Entropy (nats) of fused probabilities ``(C, *spatial)`` -> ``(1, *spatial)``: over channels
    for plain labels ([0, log C]); summed binary entropies of the region channels 1..R ([0, R log 2])."""
    p = probabilities.float().clamp(0, 1)

    def plogp(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x * torch.log(x.clamp_min(_EPS)), torch.zeros_like(x))

    if is_region:
        regions = p[1:]
        return -(plogp(regions) + plogp(1 - regions)).sum(dim=0, keepdim=True)
    return -plogp(p).sum(dim=0, keepdim=True)


def variance_map(probabilities: torch.Tensor) -> torch.Tensor:
    """Per-voxel variance over K samples (ddof 0) of ``(K, C, *spatial)`` probabilities, averaged
    over channels -> ``(1, *spatial)`` in [0, 0.25]."""
    return probabilities.float().var(dim=0, unbiased=False).mean(dim=0, keepdim=True)


def staple(decisions: torch.Tensor, num_classes: int, max_iterations: int = STAPLE_MAX_ITERATIONS,
           tolerance: float = STAPLE_TOLERANCE) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-class STAPLE (Warfield et al. 2004) by EM.

    ``decisions``: ``(K, *spatial)`` integer class indices 0..num_classes-1 from K raters. Returns
    the posterior of the true class ``(num_classes, *spatial)`` and each rater's confusion matrix
    ``(K, num_classes, num_classes)`` with ``theta[k, d, s] = P(rater k says d | truth s)``. The
    class prior is the raters' pooled label frequency (fixed, as ITK's multi-label STAPLE).
    """
    k_raters = decisions.shape[0]
    flat = decisions.reshape(k_raters, -1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_classes):
        raise ValueError(f"decisions must be class indices in 0..{num_classes - 1}")
    one_hot = torch.nn.functional.one_hot(flat, num_classes).double()  # (K, N, C)
    prior = one_hot.mean(dim=(0, 1)).clamp_min(_EPS)
    off = (1 - STAPLE_INITIAL_AGREEMENT) / max(num_classes - 1, 1)
    theta = torch.full((k_raters, num_classes, num_classes), off, dtype=torch.float64, device=decisions.device)
    theta.diagonal(dim1=1, dim2=2).fill_(STAPLE_INITIAL_AGREEMENT if num_classes > 1 else 1.0)
    posterior = one_hot.mean(dim=0)
    for _ in range(max_iterations):
        # E-step: log W(i, s) = log f(s) + sum_k log theta_k[D_ki, s]
        log_theta = torch.log(theta.clamp_min(_EPS))
        log_w = torch.log(prior)[None] + torch.einsum("knd,kds->ns", one_hot, log_theta)
        posterior = torch.softmax(log_w, dim=1)
        # M-step: theta_k[d, s] = sum_{i: D_ki = d} W(i, s) / sum_i W(i, s)
        mass = posterior.sum(dim=0).clamp_min(_EPS)
        new_theta = torch.einsum("knd,ns->kds", one_hot, posterior) / mass[None, None]
        change = float((new_theta - theta).abs().max())
        theta = new_theta
        if change < tolerance:
            break
    shape = decisions.shape[1:]
    return posterior.t().reshape(num_classes, *shape).float(), theta.float()


def fuse_staple(probabilities: torch.Tensor, is_region: bool) -> torch.Tensor:
    """STAPLE fusion of K samples' probabilities ``(K, C, *spatial)`` -> ``(C, *spatial)``: the
    multi-class posterior of the samples' argmax maps, or per region channel a binary STAPLE (the
    background channel of a region scheme is the voxels in no fused region)."""
    if not is_region:
        posterior, _ = staple(probabilities.argmax(dim=1), probabilities.shape[1])
        return posterior
    regions = [staple((probabilities[:, c] > 0.5).long(), 2)[0][1] for c in range(1, probabilities.shape[1])]
    stacked = torch.stack(regions)
    background = (stacked <= 0.5).all(dim=0, keepdim=True).float()
    return torch.cat([background, stacked])


def fuse(probabilities: torch.Tensor, is_region: bool, fusion: str = "mean") -> torch.Tensor:
    """Fused probability ``(C, *spatial)`` of K samples ``(K, C, *spatial)``."""
    if fusion == "mean":
        return probabilities.float().mean(dim=0)
    if fusion == "staple":
        return fuse_staple(probabilities, is_region)
    raise NnDiffError(f"unknown fusion {fusion!r}. Fix: use one of {', '.join(FUSIONS)}")


# ----------------------------------------------------------------------------------------------
# Float maps back to the input grid
# ----------------------------------------------------------------------------------------------
def invert_float_map(array: np.ndarray, case_json: dict, plans: dict, configuration: str) -> tuple[np.ndarray, Any]:
    """A float map ``(1, Z, Y, X)`` on the configuration's grid -> the input's grid and geometry
    (resampled like image data, 0 outside the crop, transposed back), float32.

    ``invert_case`` has no kind for a float map that is not image intensities (its ``data`` kind
    would undo the image normalisation), so the same inverse steps are composed here."""
    from nndiff.dataset.io import ImageProperties
    from nndiff.planning import resolve_configuration
    from nndiff.preprocessing.cropping import uncrop
    from nndiff.preprocessing.layout import transpose_array
    from nndiff.preprocessing.resampling import ResamplingSettings, resample, settings_from_config

    stored = (case_json.get("resampling") or {}).get("data")
    settings = ResamplingSettings(**stored) if stored else settings_from_config(
        resolve_configuration(plans, configuration), "data")
    work = resample(np.asarray(array, dtype=np.float64), case_json["shape_after_crop"],
                    case_json["spacing_after_resampling"], case_json["spacing_before_resampling"], settings)
    work = uncrop(work, case_json["bbox"], case_json["shape_before_crop"], 0.0)
    work = transpose_array(work, case_json["transpose_backward"])
    properties = ImageProperties.from_json(case_json["properties"])
    properties.num_channels, properties.dtype, properties.is_rgb = 1, "float32", False
    return work.astype(np.float32), properties


def float_file_ending(file_ending: str) -> str:
    """The dataset's ending, unless it stores integers only (then ``.npy``)."""
    from nndiff.dataset.io import INTEGER_ONLY_ENDINGS

    return FLOAT_FALLBACK_ENDING if file_ending.lower() in INTEGER_ONLY_ENDINGS else file_ending


@dataclass
class SegmentationResult:
    """One case on the configuration's grid: ``labels`` ``(1, Z, Y, X)`` label values,
    ``uncertainty`` ``(1, Z, Y, X)``, ``probabilities`` the fused ``(C, Z, Y, X)``."""

    labels: torch.Tensor
    uncertainty: torch.Tensor
    probabilities: torch.Tensor


# ----------------------------------------------------------------------------------------------
# The diffusion predictor
# ----------------------------------------------------------------------------------------------
@register_predictor(trainers=("SegmentationDiffusionTrainer",))
class SegmentationPredictor(Predictor):
    """Label map + uncertainty map from an ensemble of K diffusion samples (module docstring).

    Extra keywords: ``num_samples`` (K; default the plan's ``num_ensemble_samples``), ``fusion``
    (``mean`` | ``staple``), ``uncertainty`` (``entropy`` | ``variance``).
    """

    output_kind = "seg"
    default_fold_ensemble = "step"
    #: Whether several samples differ (False for the deterministic baseline).
    stochastic = True

    def __init__(self, *args: Any, num_samples: int | None = None, fusion: str = "mean",
                 uncertainty: str = "entropy", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if fusion not in FUSIONS:
            raise NnDiffError(f"unknown fusion {fusion!r}. Fix: use one of {', '.join(FUSIONS)}")
        if uncertainty not in UNCERTAINTIES:
            raise NnDiffError(f"unknown uncertainty {uncertainty!r}. Fix: use one of {', '.join(UNCERTAINTIES)}")
        self.scheme = label_scheme(self.dataset_json)
        check_scheme_channels(self.scheme, self.configuration["network"])
        self._check_checkpoint_scheme()
        self.fusion, self.uncertainty = fusion, uncertainty
        self.num_samples = self.resolve_num_samples(num_samples)

    def _check_checkpoint_scheme(self) -> None:
        """The label channels each fold was trained with must be this dataset.json's."""
        for fold, state in enumerate(self.checkpoint_states):
            stored = (state.get("extra") or {}).get("label_channels")
            if stored is not None and list(stored) != list(self.scheme.names):
                raise PlansError(f"fold #{fold} was trained with label channels {list(stored)} but dataset.json gives "
                                 f"{list(self.scheme.names)}. Fix: use the dataset.json the model was trained with")

    def resolve_num_samples(self, requested: int | None) -> int:
        """K: the request, else the plan's ``sampling.num_ensemble_samples`` (1 for the baseline)."""
        if not self.stochastic:
            if requested not in (None, 1):
                logger.info("%s is deterministic: %s samples would be identical; using 1", type(self).__name__,
                            requested)
            chosen = 1
        else:
            planned = (self.configuration.get("sampling") or {}).get("num_ensemble_samples", 1)
            chosen = int(planned if requested is None else requested)
        if chosen < 1:
            raise NnDiffError(f"num_samples must be >= 1, got {chosen}")
        if self.uncertainty == "variance" and chosen < 2:
            raise NnDiffError("uncertainty 'variance' is the spread of several samples, but K = 1 "
                              f"({'a deterministic model' if not self.stochastic else 'num_samples 1'}). "
                              "Fix: use uncertainty 'entropy', or --num_samples 2 or more")
        return chosen

    # ---- sampling -------------------------------------------------------------------------------
    def sample_batch(self, images: torch.Tensor, pad_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Mask samples ``(B, C, *spatial)`` in [-1, 1] for images ``(B, C_img, *spatial)``: whole-patch
        sampling when the image fits the patch, per-step sliding windows (overlap 0.5) otherwise."""
        patch = [int(p) for p in self.configuration["patch_size"]]
        padded, crop = pad_to_patch(images, patch, pad_values)
        fits = list(padded.shape[2:]) == patch
        model = self.model_fn() if fits else self.windowed_model_fn()
        out = sample_translation(model, self.configuration, padded, generator=generator,
                                 sampler=self.sampler_name, num_steps=self.num_steps)
        return out[crop]

    def case_probabilities(self, data: torch.Tensor, generator: torch.Generator, num_samples: int) -> torch.Tensor:
        """``(K, C, Z, Y, X)`` per-channel probabilities of K samples for images ``(C_img, Z, Y, X)``."""
        pad_values = data.reshape(data.shape[0], -1).amin(dim=1)  # as training pads
        samples = []
        for _ in range(num_samples):
            if self.is_2d:
                sample = self.map_slices(lambda s: self.sample_batch(s, pad_values, generator), data)
            else:
                sample = self.sample_batch(data[None], pad_values, generator)[0]
            samples.append(sample)
        return samples_to_probabilities(torch.stack(samples), self.scheme.is_region)

    # ---- fusion ---------------------------------------------------------------------------------
    def summarize(self, probabilities: torch.Tensor) -> SegmentationResult:
        """Fuse K samples' probabilities into the label map and the uncertainty map."""
        fused = fuse(probabilities, self.scheme.is_region, self.fusion)
        if self.uncertainty == "variance":
            uncertainty = variance_map(probabilities)
        else:
            uncertainty = entropy_map(fused, self.scheme.is_region)
        return SegmentationResult(label_map(fused, self.scheme), uncertainty, fused)

    def segment_case(self, case: PreparedCase, seed: int = 0, num_samples: int | None = None) -> SegmentationResult:
        """Label map and uncertainty of one preprocessed case (configuration grid); every random
        number comes from the case's generator (same seed and id -> same result)."""
        k = self.num_samples if num_samples is None else self.resolve_num_samples(num_samples)
        data = torch.from_numpy(np.ascontiguousarray(case.data)).to(self.device)
        generator = self.make_generator(seed, case.identifier)
        with torch.no_grad():
            return self.summarize(self.case_probabilities(data, generator, k))

    def predict_case(self, data: torch.Tensor, case: PreparedCase, generator: torch.Generator) -> torch.Tensor:
        """The base hook: the fused label map ``(1, Z, Y, X)`` of :attr:`num_samples` samples."""
        return self.summarize(self.case_probabilities(data, generator, self.num_samples)).labels

    # ---- outputs --------------------------------------------------------------------------------
    def invert_result(self, result: SegmentationResult, case: PreparedCase) -> tuple[tuple[np.ndarray, Any],
                                                                                     tuple[np.ndarray, Any]]:
        """``((labels, properties), (uncertainty, properties))`` on the input's grid and geometry."""
        labels = self.invert(result.labels.cpu().numpy(), case.case_json)
        uncertainty = invert_float_map(result.uncertainty.cpu().numpy(), case.case_json, self.plans,
                                       self.configuration_name)
        return labels, uncertainty

    def segment_arrays(self, images: np.ndarray, properties: Any, identifier: str = "case", seed: int = 0,
                       num_samples: int | None = None) -> tuple[tuple[np.ndarray, Any], tuple[np.ndarray, Any]]:
        """One in-memory case: ``((labels, props), (uncertainty, props))`` on the input's grid."""
        case = self.prepare_case(images, properties, identifier)
        return self.invert_result(self.segment_case(case, seed, num_samples), case)

    def write_case(self, result: SegmentationResult, case: PreparedCase, output_dir: Path) -> list[Path]:
        """``{CASE}{ending}`` and ``{CASE}_uncertainty{ending or .npy}``."""
        (labels, label_props), (uncertainty, props) = self.invert_result(result, case)
        paths = write_output(labels, label_props, output_dir, case.identifier, self.file_ending)
        paths += write_output(uncertainty, props, output_dir, case.identifier, float_file_ending(self.file_ending),
                              suffix=UNCERTAINTY_SUFFIX)
        return paths

    def predict_from_folder(self, input_dir: str | Path, output_dir: str | Path, seed: int = 0,
                            num_mc_samples: int | None = None) -> list[Path]:
        """Segment every ``{CASE}_{XXXX}{ending}`` case of ``input_dir``; ``num_mc_samples`` is K
        (``None``: :attr:`num_samples`, i.e. the plan's or the constructor's)."""
        k = self.num_samples if num_mc_samples is None else self.resolve_num_samples(num_mc_samples)
        output_dir = Path(output_dir)
        written: list[Path] = []
        uncertainty_files: dict[str, str] = {}
        for case in self.prepared_cases(input_dir):
            paths = self.write_case(self.segment_case(case, seed, k), case, output_dir)
            uncertainty_files[case.identifier] = paths[-1].name
            written += paths
            logger.info("segmented %s (%d sample(s), %s fusion)", case.identifier, k, self.fusion)
        self._write_info(output_dir, seed, {
            "mode": "predict", "input_dir": str(input_dir), "num_cases": len(uncertainty_files), "num_samples": k,
            "fusion": self.fusion, "uncertainty": self.uncertainty, "uncertainty_range": self.uncertainty_range(),
            "uncertainty_files": uncertainty_files, "label_channels": list(self.scheme.names),
            "is_region": self.scheme.is_region})
        return written

    def uncertainty_range(self) -> list[float]:
        """The [low, high] range the uncertainty map can take (recorded for evaluation)."""
        if self.uncertainty == "variance":
            return [0.0, 0.25]
        if self.scheme.is_region:
            return [0.0, (self.scheme.num_channels - 1) * math.log(2)]
        return [0.0, math.log(self.scheme.num_channels)]


# ----------------------------------------------------------------------------------------------
# The deterministic baseline's predictor
# ----------------------------------------------------------------------------------------------
@register_predictor(trainers=("SegmentationBaselineTrainer",))
class SegmentationBaselinePredictor(SegmentationPredictor):
    """Softmax (sigmoid for regions) of the baseline network, evaluated in Gaussian-blended sliding
    windows (overlap 0.5) when the image is larger than the patch; label map = argmax (regions:
    > 0.5), uncertainty = entropy of the softmax. K is always 1."""

    stochastic = False

    def probabilities(self, images: torch.Tensor, pad_values: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` probabilities for images ``(B, C_img, *spatial)``."""
        from nndiff.inference.sliding_window import sliding_window

        patch = [int(p) for p in self.configuration["patch_size"]]
        padded, crop = pad_to_patch(images, patch, pad_values)
        model = self.model_fn()
        channels = self.scheme.num_channels

        def logits(window: torch.Tensor) -> torch.Tensor:
            return baseline_logits(lambda x, t, cond_image: model(x, t, {"cond_image": cond_image}), window, channels)

        # logits are blended across windows, then normalised (as nnU-Net)
        return logits_to_probabilities(sliding_window(logits, padded, patch), self.scheme.is_region)[crop]

    def case_probabilities(self, data: torch.Tensor, generator: torch.Generator, num_samples: int) -> torch.Tensor:
        pad_values = data.reshape(data.shape[0], -1).amin(dim=1)
        if self.is_2d:
            probs = self.map_slices(lambda s: self.probabilities(s, pad_values), data)
        else:
            probs = self.probabilities(data[None], pad_values)[0]
        return probs[None]
