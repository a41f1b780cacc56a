"""Anomaly detection predictor: a healthy reconstruction of each input case, the anomaly map
|input − reconstruction| and a binary mask, for models of the anomaly trainers.

Three strategies (``strategy``; default: ``wolleb`` when the plan's ``anomaly.strategy`` says so, else
the strategy the model was trained for — ``anoddpm`` for ``AnomalyDDPMTrainer``, ``cdpm`` for
``AnomalyCDPMTrainer`` —, else the plan's):

1. ``anoddpm`` (Wyatt et al. 2022): noise the input to t_λ with the plan's noise (simplex or
   Gaussian) and run the plan's sampler back to 0 (SDEdit-style partial diffusion).
2. ``wolleb`` (Wolleb et al. 2022): deterministic DDIM encoding of the input to t_λ with the
   unconditional model, then DDIM decoding with classifier guidance toward "healthy": the score
   gains ``s · ∇ log p(healthy | x_t)`` from the noisy classifier of the ``AnomalyClassifierTrainer``
   model folder next to the diffusion model (or a classifier passed in).
3. ``cdpm`` (Sanchez et al. 2022): DDIM encoding with the null (unconditional) condition, decoding with
   classifier-free guidance toward the healthy class and *dynamic normalization* (see
   :func:`dynamic_normalization`).

t_λ = ``start_fraction`` of the schedule: the plan's ``sampling.start_fraction`` for anoddpm (AnoDDPM's
250 of 1000), ``anomaly.encode_fraction`` for the DDIM strategies (Wolleb et al.'s 500 of 1000); the
step count is the planned one (or ``num_steps``) scaled by that fraction.

Anomaly map (:func:`anomaly_map`): |input − reconstruction| in original units on the original grid
(both mapped back through the same inverse, so an identical reconstruction gives exactly 0), summed
over channels, averaged over ``num_reconstructions`` stochastic reconstructions and Gaussian-smoothed
(``smoothing_sigma`` voxels in-plane; along z too for 3D configurations). Case score
(:func:`case_score`): mean of the top 1 % of the map's voxels. Mask: map >= threshold, the threshold read
from ``anomaly_threshold.json`` in the model folder (written by :func:`calibrate_threshold`; best Dice
on validation masks, else Otsu) or given; without either, Otsu on the case's own map.

Outputs per case: ``{CASE}{map ending}`` (float map; ``.nii.gz`` when the dataset's ending is a
natural-image format, which stores integers only), ``{CASE}_mask{ending}`` (uint8 0/1) and
``{CASE}_reconstruction{ending}`` (the healthy reconstruction in original units), all with the
input's geometry. See ``documentation/anomaly_detection.md`` (section *Prediction*).
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nndiff.dataset.io import NATURAL_ENDINGS, read_images
from nndiff.diffusion.config import DiffusionConfig, build_process, build_sampler
from nndiff.diffusion.guidance import grad_of_log_prob
from nndiff.diffusion.samplers import invert, sample
from nndiff.errors import NnDiffError, PlansError
from nndiff.inference.files import write_output
from nndiff.inference.model_folder import checked_weights, fold_dirs, load_network, parse_model_folder_name
from nndiff.inference.predictor import DEFAULT_CHECKPOINT, PreparedCase, Predictor
from nndiff.inference.registry import register_predictor
from nndiff.networks import NULL_LABEL
from nndiff.tasks.denoising_predictor import warm_start_steps
from nndiff.tasks.translation_predictor import pad_to_patch
from nndiff.utils.files import load_json, save_json

logger = logging.getLogger(__name__)

STRATEGIES = ("anoddpm", "wolleb", "cdpm")
#: Strategies that decode with a noisy classifier's gradient.
CLASSIFIER_STRATEGIES = ("wolleb",)
INVERSION_METHODS = ("explicit", "fixed_point")
THRESHOLD_FILE = "anomaly_threshold.json"
MASK_SUFFIX = "_mask"
RECONSTRUCTION_SUFFIX = "_reconstruction"
#: Written instead of a natural-image ending for the float map (PNG/JPEG/TIFF round to integers here).
FLOAT_MAP_ENDING = ".nii.gz"
CLASSIFIER_TRAINER = "AnomalyClassifierTrainer"
CDPM_TRAINER = "AnomalyCDPMTrainer"
#: AnoDDPM's t_λ when a plan has no ``sampling.start_fraction`` (250 of 1000).
DEFAULT_START_FRACTION = 0.25
DEFAULT_SMOOTHING_SIGMA = 1.0
#: Share of the map's voxels whose mean is the case score.
DEFAULT_TOP_FRACTION = 0.01


# ----------------------------------------------------------------------------------------------
# Maps, scores, thresholds (pure functions)
# ----------------------------------------------------------------------------------------------
def gaussian_kernel1d(sigma: float, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised 1D Gaussian of standard deviation ``sigma`` voxels, radius ceil(3 sigma)."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_smooth(x: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(N, C, *spatial)`` (2D or 3D) with per-axis ``sigma``
    in voxels (0: that axis untouched); edges replicate, so a constant image stays constant."""
    spatial = x.ndim - 2
    sigmas = [float(sigma)] * spatial if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    if len(sigmas) != spatial:
        raise ValueError(f"{len(sigmas)} sigma(s) for {spatial} spatial axes")
    channels = x.shape[1]
    out = x
    for axis, s in enumerate(sigmas):
        if s <= 0 or x.shape[2 + axis] == 1:
            continue
        kernel = gaussian_kernel1d(s, x.dtype, x.device)
        radius = kernel.numel() // 2
        moved = out.movedim(2 + axis, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        flat = F.pad(flat, (radius, radius), mode="replicate")
        flat = F.conv1d(flat, kernel.view(1, 1, -1))
        out = flat.reshape(shape).movedim(-1, 2 + axis)
    assert out.shape[1] == channels
    return out


def residual_map(inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """|input − reconstruction| summed over channels: ``(C, *spatial)`` inputs and ``(K, C, *spatial)``
    (or ``(C, *spatial)``) reconstructions give ``(1, *spatial)``, the mean over the K residuals."""
    recon = reconstructions if reconstructions.ndim == inputs.ndim + 1 else reconstructions[None]
    if recon.shape[1:] != inputs.shape:
        raise ValueError(f"reconstruction shape {list(recon.shape[1:])} differs from the input's {list(inputs.shape)}")
    return (inputs[None] - recon).abs().sum(dim=1).mean(dim=0, keepdim=True)


def anomaly_map(inputs: torch.Tensor, reconstructions: torch.Tensor,
                sigma: float | Sequence[float] = DEFAULT_SMOOTHING_SIGMA) -> torch.Tensor:
    """The anomaly map ``(1, *spatial)``: :func:`residual_map` smoothed with :func:`gaussian_smooth`."""
    return gaussian_smooth(residual_map(inputs, reconstructions)[None], sigma)[0]


def case_score(values: torch.Tensor | np.ndarray, top_fraction: float = DEFAULT_TOP_FRACTION) -> float:
    """Case-level anomaly score: the mean of the largest ``top_fraction`` of the map's voxels (at
    least one voxel), robust to single hot voxels yet sensitive to small lesions."""
    if not 0 < top_fraction <= 1:
        raise NnDiffError(f"top_fraction must be in (0, 1], got {top_fraction}")
    flat = torch.as_tensor(np.asarray(values, dtype=np.float64)).flatten()
    k = max(1, int(math.ceil(top_fraction * flat.numel())))
    return float(flat.topk(k).values.mean())


def choose_threshold(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None) -> tuple[float, str]:
    """``(threshold, method)`` for masks ``map >= threshold``: the Dice-optimal threshold over ``maps``
    against ``masks`` when masks are given, else Otsu's threshold of every map value
    (nndiff.evaluation.anomaly); values without two classes give a threshold above them (empty masks)."""
    from nndiff.evaluation.anomaly import dice_optimal_threshold

    if not maps:
        raise NnDiffError("no anomaly maps to choose a threshold from. Fix: give validation cases")
    if masks:
        return float(dice_optimal_threshold(list(maps), list(masks))[0]), "dice"
    return otsu_or_above(np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])), "otsu"


def otsu_or_above(values: np.ndarray) -> float:
    """Otsu's threshold, or just above the value of a constant sample (no two classes: nothing is anomalous)."""
    from nndiff.evaluation.anomaly import otsu_threshold

    values = np.asarray(values, dtype=np.float64)
    if values.size and values.min() == values.max():
        return float(np.nextafter(values.max(), np.inf))
    return float(otsu_threshold(values))


def save_threshold(model_dir: str | Path, strategy: str, threshold: float, method: str, **info: Any) -> Path:
    """Store the threshold of ``strategy`` in ``model_dir/anomaly_threshold.json`` (one entry per
    strategy: their maps have different scales); other strategies' entries are kept."""
    path = Path(model_dir) / THRESHOLD_FILE
    content = load_json(path) if path.is_file() else {}
    content.setdefault("strategies", {})[strategy] = {"threshold": float(threshold), "method": method, **info}
    save_json(content, path)
    return path


def load_threshold_entry(model_dir: str | Path, strategy: str) -> dict[str, Any] | None:
    """The stored entry of ``strategy`` (``threshold``, ``method``, ``settings``, ...), or None when the
    file or the entry is missing; the threshold is checked to be a finite number."""
    path = Path(model_dir) / THRESHOLD_FILE
    if not path.is_file():
        return None
    entry = (load_json(path).get("strategies") or {}).get(strategy)
    if entry is None:
        return None
    value = entry.get("threshold") if isinstance(entry, Mapping) else None
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise NnDiffError(f"{path}: strategies.{strategy}.threshold must be a finite number, got {value!r}. "
                          "Fix: re-run calibrate_threshold or delete the file")
    return {**entry, "threshold": float(value)}


def load_threshold(model_dir: str | Path, strategy: str) -> float | None:
    """The stored threshold of ``strategy``, or None when the file or the entry is missing."""
    entry = load_threshold_entry(model_dir, strategy)
    return None if entry is None else entry["threshold"]


def settings_differences(stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """``key: stored → current`` for every map setting that changed since calibration (an entry
    written before settings were recorded has none to compare)."""
    if not isinstance(stored, Mapping):
        return []
    return [f"{key}: {stored[key]!r} → {value!r}" for key, value in current.items()
            if key in stored and stored[key] != value]


def dynamic_normalization(low: torch.Tensor, high: torch.Tensor) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """x0 hook of the CDPM decoding: per sample, an x0 prediction that leaves the input's intensity
    range [low, high] (``(B,)`` each) is shrunk affinely toward the range's centre until it fits;
    one inside the range is untouched. Strong classifier-free guidance pushes x0 out of the data
    range, and a renormalisation (rather than a clamp) keeps the relative contrast of the image."""

    def hook(x0: torch.Tensor, t: float) -> torch.Tensor:
        shape = (-1,) + (1,) * (x0.ndim - 1)
        lo, hi = low.to(x0).view(shape), high.to(x0).view(shape)
        centre, half = (hi + lo) / 2, ((hi - lo) / 2).clamp(min=1e-6)
        excess = ((x0 - centre).abs() / half).flatten(1).amax(dim=1).clamp(min=1.0).view(shape)
        return centre + (x0 - centre) / excess

    return hook


# ----------------------------------------------------------------------------------------------
# The noisy classifier (strategy wolleb)
# ----------------------------------------------------------------------------------------------
def classifier_model_folder(model_dir: str | Path) -> Path:
    """Where the classifier of a diffusion model folder is expected: the sibling
    ``AnomalyClassifierTrainer__<plans>__<configuration>``."""
    model_dir = Path(model_dir)
    name = parse_model_folder_name(model_dir)
    return model_dir.parent / f"{CLASSIFIER_TRAINER}__{name.plans_name}__{name.configuration}"


def load_classifier(folder: str | Path, plans: dict, configuration: str, folds: Sequence[int | str] | str = (0,),
                    checkpoint: str = DEFAULT_CHECKPOINT, device: torch.device | str = "cpu") -> nn.Module:
    """The noisy classifier of an ``AnomalyClassifierTrainer`` model folder (fold networks averaged
    in logit space), in eval mode. A missing folder is an error naming it and how to create it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NnDiffError(f"strategy 'wolleb' needs the noisy classifier model folder {folder}, which does not "
                          f"exist. Fix: train it (nndiff_train ... -tr {CLASSIFIER_TRAINER}), pass classifier_dir, "
                          "or choose strategy anoddpm / cdpm")
    from nndiff.networks.classifier import build_classifier

    networks = []
    for fold_dir in fold_dirs(folder, folds):
        path = fold_dir / checkpoint
        if not path.is_file():
            present = sorted(p.name for p in fold_dir.glob("checkpoint_*.pth"))
            raise NnDiffError(f"noisy classifier checkpoint {path} does not exist (that fold holds: "
                              f"{', '.join(present) or 'no checkpoints'}). Fix: predict with -chk naming a checkpoint "
                              "both the diffusion and the classifier folders hold (every training writes "
                              "checkpoint_latest.pth), or pass classifier_checkpoint=")
        weights, state = checked_weights(path, plans, configuration, use_ema=True, map_location="cpu")
        block = ((state.get("extra") or {}).get("anomaly") or {}).get("classifier")
        if block is None:
            raise NnDiffError(f"{path} holds no noisy classifier (written by {state.get('trainer_class')!r}). "
                              f"Fix: point classifier_dir at an {CLASSIFIER_TRAINER} model folder")
        networks.append(load_network(lambda: build_classifier(block), weights, path, torch.device(device)))
    return networks[0] if len(networks) == 1 else _LogitMean(networks)


class _LogitMean(nn.Module):
    def __init__(self, networks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.networks = nn.ModuleList(networks)

    @property
    def shape_divisor(self) -> tuple[int, ...]:
        return self.networks[0].shape_divisor

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(x, t) for net in self.networks]).mean(0)


def pad_to_divisor(x: torch.Tensor, divisor: Sequence[int]) -> torch.Tensor:
    """``x`` ``(B, C, *spatial)`` edge-padded at the end of each axis to a multiple of ``divisor``
    (differentiable: the gradient flows back to the unpadded voxels)."""
    pads: list[int] = []
    for size, d in reversed(list(zip(x.shape[2:], divisor))):
        pads += [0, (-int(size)) % int(d)]
    return F.pad(x, pads, mode="replicate") if any(pads) else x


def healthy_log_prob(classifier: nn.Module, healthy_class: int = 0) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
    """log p(healthy | x_t) per sample from a classifier ``classifier(x_t, t_net) -> (B, classes)`` logits.

    The sampler runs on the whole image, which may be larger than the training patch (the UNet then
    runs in sliding windows) and of any size. The classifier pools globally, so it sees the whole
    image, edge-padded to a multiple of its stride product (its input-size rule); the padding repeats
    the border, i.e. background, and receives no gradient of its own."""
    divisor = getattr(classifier, "shape_divisor", None)

    def log_prob(x: torch.Tensor, t_net: torch.Tensor, cond: Any) -> torch.Tensor:
        padded = pad_to_divisor(x, divisor) if divisor is not None else x
        return torch.log_softmax(classifier(padded, t_net).float(), dim=-1)[:, healthy_class]

    return log_prob


# ----------------------------------------------------------------------------------------------
# The predictor
# ----------------------------------------------------------------------------------------------
def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise NnDiffError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return number


@register_predictor(trainers=("AnomalyDDPMTrainer",))
class AnomalyPredictor(Predictor):
    """Healthy reconstructions, anomaly maps and masks (module docstring).

    Extra keyword arguments (``None``: the plan's ``anomaly`` / ``sampling`` block, else the default):
    ``strategy``, ``start_fraction`` (t_λ as a fraction of the schedule), ``smoothing_sigma`` (voxels),
    ``num_reconstructions`` (stochastic reconstructions averaged into the map), ``top_fraction``
    (case score), ``threshold`` (overrides the stored one), ``classifier`` (a module) or
    ``classifier_dir`` (model folder), ``classifier_checkpoint`` (file name in its fold folders; default: the
    one the diffusion model was loaded from, so ``-chk`` applies to both) and ``classifier_scale`` for
    ``wolleb``, ``guidance_scale`` for ``cdpm``, ``inversion`` (``explicit`` DDIM encoding as in the papers, or ``fixed_point``).
    """

    output_kind = "data"

    def __init__(self, *args: Any, strategy: str | None = None, start_fraction: float | None = None,
                 smoothing_sigma: float | None = None, num_reconstructions: int | None = None,
                 top_fraction: float | None = None, threshold: float | None = None,
                 classifier: nn.Module | None = None, classifier_dir: str | Path | None = None,
                 classifier_checkpoint: str | None = None, classifier_scale: float | None = None, guidance_scale: float | None = None,
                 inversion: str = "explicit", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from nndiff.tasks.anomaly import anomaly_settings

        block = anomaly_settings(self.configuration)
        sampling = dict(self.configuration.get("sampling") or {})
        self.diffusion = DiffusionConfig.from_dict(self.configuration.get("diffusion", {}))
        self.process = build_process(self.diffusion)
        self.strategy = self._checked_strategy(strategy or self._default_strategy(block["strategy"]))
        # AnoDDPM noises to the plan's sampling.start_fraction; the DDIM strategies encode to encode_fraction.
        planned = (sampling.get("start_fraction", DEFAULT_START_FRACTION) if self.strategy == "anoddpm"
                   else block["encode_fraction"])
        fraction = start_fraction if start_fraction is not None else planned
        self.start_fraction = _positive("start_fraction", fraction)
        if self.start_fraction > 1:
            raise NnDiffError(f"start_fraction must be in (0, 1], got {fraction}")
        self.smoothing_sigma = _positive("smoothing_sigma", smoothing_sigma if smoothing_sigma is not None
                                         else block["map_smoothing_sigma"], allow_zero=True)
        count = num_reconstructions if num_reconstructions is not None else block["num_reconstructions"]
        if int(count) != count or int(count) < 1:
            raise NnDiffError(f"num_reconstructions must be an integer >= 1, got {count!r}")
        self.num_reconstructions = int(count)
        self.top_fraction = float(top_fraction if top_fraction is not None
                                  else DEFAULT_TOP_FRACTION)
        self.threshold = None if threshold is None else float(threshold)
        self.classifier_scale = _positive("classifier_scale", classifier_scale if classifier_scale is not None
                                          else block["classifier_scale"], allow_zero=True)
        self.guidance_scale = _positive("guidance_scale", guidance_scale if guidance_scale is not None
                                        else block["guidance_scale"], allow_zero=True)
        if inversion not in INVERSION_METHODS:
            raise NnDiffError(f"unknown inversion {inversion!r}. Fix: use one of {', '.join(INVERSION_METHODS)}")
        self.inversion = inversion
        self.healthy_class = self._healthy_class()
        self.classifier = classifier
        if self.strategy in CLASSIFIER_STRATEGIES and self.classifier is None:
            self.classifier = self._load_classifier(classifier_dir, classifier_checkpoint)
        if self.classifier is not None:
            self.classifier = self.classifier.to(self.device).eval()
        self.case_scores: dict[str, float] = {}
        self.thresholds_used: dict[str, dict[str, Any]] = {}

    # ---- options ------------------------------------------------------------------------------
    def _default_strategy(self, planned: str) -> str:
        """``wolleb`` when the plan says so (it guides whichever diffusion model is loaded), else the
        strategy the model was trained for (checkpoint ``extra.anomaly.strategy``), else the plan's."""
        if planned == "wolleb":
            return planned
        trained = [((s.get("extra") or {}).get("anomaly") or {}).get("strategy") for s in self.checkpoint_states]
        return trained[0] if trained and trained[0] in STRATEGIES else planned

    @staticmethod
    def _checked_strategy(value: str) -> str:
        if value not in STRATEGIES:
            raise NnDiffError(f"unknown anomaly strategy {value!r}. Fix: use one of {', '.join(STRATEGIES)}")
        return value

    @property
    def is_conditional(self) -> bool:
        """The diffusion network takes class labels (a CDPM model)."""
        return bool((self.configuration.get("network") or {}).get("num_classes"))

    def _healthy_class(self) -> int:
        """Class index of "healthy": the checkpoint's ``extra.anomaly.class_map`` (anomaly trainers), else the
        position of ``true`` in a categorical ``healthy`` condition (GenerationTrainer encoding), else 0."""
        for state in self.checkpoint_states[:1]:
            extra = state.get("extra") or {}
            class_map = (extra.get("anomaly") or {}).get("class_map")
            if isinstance(class_map, Mapping) and "healthy" in class_map:
                return int(class_map["healthy"])
            categorical = (extra.get("conditions") or {}).get("categorical") or []
            if len(categorical) == 1 and categorical[0][0] == "healthy":
                values = [str(v).lower() for v in categorical[0][1]]
                if "true" in values:
                    return values.index("true")
        return 0

    def _classifier_checkpoint_name(self) -> str:
        """The diffusion model's checkpoint file name (e.g. ``checkpoint_latest.pth`` after a time-limited
        training, which writes no ``checkpoint_final.pth``), else the default."""
        loaded = self.model_info.get("checkpoints") or []
        return Path(loaded[0]).name if loaded else DEFAULT_CHECKPOINT

    def _load_classifier(self, classifier_dir: str | Path | None, checkpoint: str | None = None) -> nn.Module:
        model_dir = self.model_info.get("model_dir")
        if classifier_dir is None and model_dir is None:
            raise NnDiffError("strategy 'wolleb' needs a noisy classifier, but none was given and the predictor "
                              "was not loaded from a model folder. Fix: pass classifier= or classifier_dir=, or load "
                              "with from_model_folder next to a trained AnomalyClassifierTrainer model")
        folder = Path(classifier_dir) if classifier_dir is not None else classifier_model_folder(model_dir)
        return load_classifier(folder, self.plans, self.configuration_name, folds=self.fold_names or (0,),
                               checkpoint=checkpoint or self._classifier_checkpoint_name(), device=self.device)

    # ---- reconstruction -----------------------------------------------------------------------
    def start_time(self) -> float:
        """t_λ: ``start_fraction`` of the process' noisy time range (an integer step when discrete)."""
        t = self.process.t_min + self.start_fraction * (self.process.t_max - self.process.t_min)
        return float(round(t)) if self.process.is_discrete else float(t)

    def start_steps(self, planned: int) -> int:
        """Steps from t_λ: the planned count (or ``num_steps``) scaled by t_λ's share of the range."""
        return warm_start_steps(self.start_time(), self.process.t_min, self.process.t_max, self.num_steps or planned)

    def _conditions(self, batch: int, label: int) -> dict[str, torch.Tensor] | None:
        if not self.is_conditional:
            return None
        return {"class_labels": torch.full((batch,), label, dtype=torch.long, device=self.device)}

    def reconstruct_batch(self, x: torch.Tensor, generator: torch.Generator,
                          model: Callable | None = None) -> torch.Tensor:
        """Healthy reconstructions ``(B, C, *spatial)`` of inputs ``x`` in normalised units."""
        model = model or self.model_fn()
        null = self._conditions(x.shape[0], NULL_LABEL)
        t0 = self.start_time()
        if self.strategy == "anoddpm":
            sampler = build_sampler(self.diffusion, self.sampler_name, None, process=self.process)
            out = sample(sampler, model, sdedit=(t0, x), cond=null, num_steps=self.start_steps(sampler.num_steps),
                         generator=generator)
            return out.sample.float()
        sampler = build_sampler(self.diffusion, "ddim", None, process=self.process, eta=0.0)
        sampler.set_timesteps(self.start_steps(sampler.num_steps), x.device, t_start=t0)
        grid = sampler.grid.clone()
        latent = invert(sampler, model, x, cond=null, timesteps=grid, method=self.inversion).latent
        start = (float(grid[0]), latent)
        if self.strategy == "wolleb":
            grad = grad_of_log_prob(healthy_log_prob(self.classifier, self.healthy_class))
            out = sample(sampler, model, start_at=start, timesteps=grid, cond=null, classifier_grad=grad,
                         classifier_scale=self.classifier_scale, generator=generator)
            return out.sample.float()
        if not self.is_conditional:
            raise PlansError(f"strategy 'cdpm' needs a class-conditional model (healthy / diseased with a null "
                             f"token); the plan's network has no num_classes. Fix: train {CDPM_TRAINER}, or use "
                             "strategy anoddpm")
        low, high = x.flatten(1).amin(dim=1), x.flatten(1).amax(dim=1)
        out = sample(sampler, model, start_at=start, timesteps=grid,
                     cond=self._conditions(x.shape[0], self.healthy_class), guidance_scale=self.guidance_scale,
                     null_cond=null, consistency=dynamic_normalization(low, high), generator=generator)
        return out.sample.float()

    def _padded_batch(self, images: torch.Tensor, pad_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """:meth:`reconstruct_batch` on images padded up to the patch (cropped back), windowed when larger."""
        patch = [int(p) for p in self.configuration["patch_size"]]
        padded, crop = pad_to_patch(images, patch, pad_values)
        model = self.model_fn() if list(padded.shape[2:]) == patch else self.windowed_model_fn()
        return self.reconstruct_batch(padded, generator, model)[crop]

    def predict_case(self, data: torch.Tensor, case: PreparedCase, generator: torch.Generator) -> torch.Tensor:
        """One healthy reconstruction ``(C, Z, Y, X)`` of a case (normalised units); 2D: slices in batches."""
        pad_values = data.reshape(data.shape[0], -1).amin(dim=1)
        if self.is_2d:
            return self.map_slices(lambda s: self._padded_batch(s, pad_values, generator), data)
        return self._padded_batch(data[None], pad_values, generator)[0]

    # ---- maps ---------------------------------------------------------------------------------
    def smoothing_sigmas(self) -> list[float]:
        """Per-axis sigma (z, y, x) on the original grid: in-plane only for 2D configurations."""
        s = self.smoothing_sigma
        return [0.0 if self.is_2d else s, s, s]

    def case_outputs(self, case: PreparedCase, seed: int) -> dict[str, Any]:
        """Map ``(1, Z, Y, X)``, mean reconstruction ``(C, Z, Y, X)`` (original units and grid), their
        properties and the case score."""
        samples = self._run_case(case, seed, self.num_reconstructions)
        if self.num_reconstructions == 1:  # the base returns one output (C, Z, Y, X) then
            samples = samples[None]
        inputs, properties = self.invert(case.data, case.case_json)
        recons = np.stack([self.invert(s, case.case_json)[0] for s in samples.float().cpu().numpy()])
        amap = anomaly_map(torch.from_numpy(inputs).double(), torch.from_numpy(recons).double(),
                           self.smoothing_sigmas()).float().numpy()
        return {"map": amap, "reconstruction": recons.mean(axis=0).astype(np.float32), "properties": properties,
                "score": case_score(amap, self.top_fraction)}

    def map_settings(self) -> dict[str, Any]:
        """The settings that change the scale or noise of the anomaly map, recorded with a calibrated
        threshold so that a prediction with other settings is flagged."""
        settings: dict[str, Any] = {"start_fraction": self.start_fraction, "smoothing_sigma": self.smoothing_sigma,
                                    "num_reconstructions": self.num_reconstructions, "num_steps": self.num_steps}
        if self.strategy == "wolleb":
            settings["classifier_scale"] = self.classifier_scale
        if self.strategy == "cdpm":
            settings["guidance_scale"] = self.guidance_scale
        if self.strategy != "anoddpm":
            settings["inversion"] = self.inversion
        return settings

    def threshold_for(self, amap: np.ndarray) -> tuple[float, str]:
        """The mask threshold: given, else stored in the model folder, else Otsu of this case's map.
        A stored threshold calibrated with other map settings is used with a warning (once) that
        names the differences; the source then says so."""
        if self.threshold is not None:
            return self.threshold, "given"
        model_dir = self.model_info.get("model_dir")
        entry = load_threshold_entry(model_dir, self.strategy) if model_dir else None
        if entry is not None:
            changed = settings_differences(entry.get("settings"), self.map_settings())
            if not changed:
                return entry["threshold"], THRESHOLD_FILE
            note = f"{THRESHOLD_FILE} (calibrated with other settings: {'; '.join(changed)})"
            if not getattr(self, "_warned_settings", False):
                logger.warning("the stored %s threshold was calibrated with other map settings (%s); the masks may be "
                               "off. Fix: re-run --calibrate_threshold with the same flags as this prediction",
                               self.strategy, "; ".join(changed))
                self._warned_settings = True
            return entry["threshold"], note
        return otsu_or_above(np.asarray(amap).ravel()), "otsu_per_case"

    def map_ending(self) -> str:
        return FLOAT_MAP_ENDING if self.file_ending.lower() in NATURAL_ENDINGS else self.file_ending

    def write_case(self, outputs: Mapping[str, Any], output_dir: Path, identifier: str) -> list[Path]:
        """Write map, mask and reconstruction with the input's geometry (see the module docstring)."""
        props = outputs["properties"]
        threshold, source = self.threshold_for(outputs["map"])
        self.thresholds_used[identifier] = {"threshold": threshold, "source": source}
        mask = (outputs["map"] >= threshold).astype(np.uint8)
        map_props = copy.deepcopy(props)
        map_props.num_channels = 1
        written = write_output(outputs["map"], map_props, output_dir, identifier, self.map_ending())
        written += write_output(mask, map_props, output_dir, identifier, self.file_ending, suffix=MASK_SUFFIX)
        written += write_output(outputs["reconstruction"], props, output_dir, identifier, self.file_ending,
                                suffix=RECONSTRUCTION_SUFFIX)
        return written

    def predict_from_folder(self, input_dir: str | Path, output_dir: str | Path, seed: int = 0,
                            num_mc_samples: int = 1) -> list[Path]:
        """Map, mask and reconstruction for every case of ``input_dir``; ``num_mc_samples`` > 1 sets
        ``num_reconstructions`` (the map is the mean over them)."""
        if num_mc_samples > 1:
            self.num_reconstructions = int(num_mc_samples)
        output_dir = Path(output_dir)
        written: list[Path] = []
        identifiers = []
        for case in self.prepared_cases(input_dir):
            identifiers.append(case.identifier)
            outputs = self.case_outputs(case, seed)
            self.case_scores[case.identifier] = outputs["score"]
            written += self.write_case(outputs, output_dir, case.identifier)
            logger.info("anomaly map of %s (score %.4g)", case.identifier, outputs["score"])
        self._write_info(output_dir, seed, {"mode": "predict", "input_dir": str(input_dir),
                                            "num_cases": len(identifiers)})
        return written

    def anomaly_maps(self, input_dir: str | Path, seed: int = 0) -> dict[str, np.ndarray]:
        """Case id -> anomaly map ``(1, Z, Y, X)`` on the original grid (nothing written)."""
        return {case.identifier: self.case_outputs(case, seed)["map"] for case in self.prepared_cases(input_dir)}

    def _write_info(self, output_dir: Path, seed: int, extra: dict[str, Any]) -> None:
        """The base's prediction_info.json plus the strategy, its settings, case scores and thresholds."""
        extra = {**extra, "strategy": self.strategy, "start_fraction": self.start_fraction,
                 "t_start": self.start_time(), "num_reconstructions": self.num_reconstructions,
                 "smoothing_sigma": self.smoothing_sigma, "score": f"mean of the top {self.top_fraction:g} of the map",
                 "case_scores": self.case_scores, "thresholds": self.thresholds_used}
        if self.strategy == "wolleb":
            extra["classifier_scale"] = self.classifier_scale
        if self.strategy == "cdpm":
            extra.update(guidance_scale=self.guidance_scale, healthy_class=self.healthy_class)
        if self.strategy != "anoddpm":
            extra["inversion"] = self.inversion
        super()._write_info(output_dir, seed, extra)


@register_predictor(trainers=(CDPM_TRAINER,))
class AnomalyCDPMPredictor(AnomalyPredictor):
    """:class:`AnomalyPredictor` for ``AnomalyCDPMTrainer`` models, whose network is the plan's UNet
    conditioned on health (``nndiff.tasks.anomaly.cdpm_network_block``: 2 classes + null token).
    ``wolleb`` and ``anoddpm`` run it with the null label (the unconditional model)."""

    @classmethod
    def build_network(cls, configuration: dict) -> nn.Module:
        from nndiff.networks import build_network
        from nndiff.tasks.anomaly import cdpm_network_block

        return build_network(cdpm_network_block(configuration["network"]))

    @property
    def is_conditional(self) -> bool:
        return True


def calibrate_threshold(predictor: AnomalyPredictor, input_dir: str | Path, masks_dir: str | Path | None = None,
                        seed: int = 0, model_dir: str | Path | None = None) -> dict[str, Any]:
    """Choose the mask threshold of ``predictor``'s strategy on validation cases and store it.

    ``input_dir``: validation images (``{CASE}_{XXXX}{ending}``); ``masks_dir``: their lesion masks
    ``{CASE}{ending}`` (nnU-Net labelsTr layout; a case without a mask file counts as healthy, all
    zero). With masks the threshold maximises Dice over all cases (``dice_optimal_threshold``), without
    them it is Otsu's threshold of all map values. Written to ``model_dir`` (default: the predictor's
    model folder) as ``anomaly_threshold.json``; returns the stored entry.
    """
    target = model_dir or predictor.model_info.get("model_dir")
    if target is None:
        raise NnDiffError("no model folder to store the threshold in. Fix: pass model_dir=, or load the predictor "
                          "with from_model_folder")
    maps = predictor.anomaly_maps(input_dir, seed)
    masks = None
    if masks_dir is not None:
        masks = []
        for identifier, amap in maps.items():
            path = Path(masks_dir) / f"{identifier}{predictor.file_ending}"
            mask = read_images([path])[0] > 0 if path.is_file() else np.zeros(amap.shape, dtype=bool)
            if mask.shape != amap.shape:
                raise NnDiffError(f"{path}: mask shape {list(mask.shape[1:])} differs from the image's "
                                  f"{list(amap.shape[1:])}. Fix: give masks on the images' grid")
            masks.append(mask)
    threshold, method = choose_threshold(list(maps.values()), masks)
    save_threshold(target, predictor.strategy, threshold, method, num_cases=len(maps), input_dir=str(input_dir),
                   settings=predictor.map_settings())
    logger.info("anomaly threshold (%s, %s): %.6g on %d case(s)", predictor.strategy, method, threshold, len(maps))
    return {"threshold": threshold, "method": method, "num_cases": len(maps)}
