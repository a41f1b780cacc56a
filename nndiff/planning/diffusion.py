"""Rules: the ``diffusion`` block (read by the diffusion core's ``build_process`` / ``build_sampler``)
and the family's ``sampling`` options (read by the family's predictor).

Diffusion block keys (those of ``nndiff.diffusion.config.DiffusionConfig``, which rejects unknown
keys): process, num_train_timesteps, schedule, snr_shift, parameterization, loss_weighting,
min_snr_gamma, noise_type, noise_params (simplex: {octaves, persistence, frequency}; Gaussian: {}),
sampler, num_sampling_steps, timestep_spacing, clip_x0, guidance, guidance_scale, condition_dropout.

Family data options next to them: ``degradation`` (what clean-only denoising simulates) and
``resample`` (false for reconstruction, whose images must stay on the measurement grid).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from nndiff.diffusion.options import (
    Degradation,
    Guidance,
    LossWeighting,
    Modality,
    NoiseType,
    NormalizationScheme,
    Parameterization,
    Process,
    Sampler,
    Schedule,
    TaskFamily,
    TimestepSpacing,
    parse_option,
)
from nndiff.planning.constants import (
    CFG_CONDITION_DROPOUT,
    CFG_GUIDANCE_SCALE,
    MIN_SNR_GAMMA,
    NUM_TRAIN_TIMESTEPS,
    SIMPLEX_FREQUENCY,
    SIMPLEX_OCTAVES,
    SIMPLEX_PERSISTENCE,
    SNR_SHIFT_REFERENCE_SIDE,
)
from nndiff.errors import PlansError
from nndiff.planning.decision import Decision, fmt_num, fmt_shape
from nndiff.planning.fingerprint_view import IMAGE, TARGET, FingerprintView

#: Sampler and number of sampling steps per family (see decide_sampler for the why).
_SAMPLERS: dict[TaskFamily, tuple[Sampler, int, str]] = {
    TaskFamily.GENERATION: (
        Sampler.DPM_SOLVER_PP_2M, 25,
        "DPM-Solver++(2M) (Lu et al. 2022) reaches DDIM-100 quality in ~25 function evaluations"),
    TaskFamily.TRANSLATION: (
        Sampler.DDIM, 50,
        "deterministic DDIM (eta 0): the same input gives the same translation, 50 steps"),
    TaskFamily.DENOISING: (
        Sampler.DDIM, 50,
        "deterministic DDIM (eta 0), 50 steps: a denoiser must be reproducible for one input"),
    TaskFamily.RECONSTRUCTION: (
        Sampler.DDIM, 50,
        "DDIM with a data-consistency projection after each step (the sampler's consistency hook; "
        "DDS, Chung et al. 2024, 50 steps) and a warm start from the zero-filled / back-projected "
        "image (CCDF, Chung et al. 2022)"),
    TaskFamily.SEGMENTATION: (
        Sampler.DDIM, 10,
        "deterministic DDIM with few (10) steps: the label map is low-entropy given the image, and "
        "an ensemble over seeds is cheaper than long chains"),
    TaskFamily.ANOMALY_DETECTION: (
        Sampler.DDPM, 1000,
        "partial diffusion (AnoDDPM, Wyatt et al. 2022): noise the input to t0 = 250 of 1000 with simplex "
        "noise, then ancestral DDPM steps back (250 evaluations); stochastic steps with the same "
        "noise type remove anomalies the healthy model cannot explain"),
}

#: Fraction of the schedule where partial diffusion / warm start begins, per family.
_START_FRACTION = {TaskFamily.ANOMALY_DETECTION: 0.25, TaskFamily.RECONSTRUCTION: 0.5}
SEGMENTATION_ENSEMBLE = 5


def decide_process(task: TaskFamily) -> Decision[tuple[Process, int]]:
    """Discrete VP (DDPM) with 1000 training steps for every family: the samplers of all families
    (DDIM, DPM-Solver++, DDPM, partial diffusion, data consistency) are defined on it; families that
    need VE / continuous SDEs switch through their plan hook."""
    return Decision((Process.VP_DISCRETE, NUM_TRAIN_TIMESTEPS),
                    f"discrete VP (DDPM, Ho et al. 2020) with {NUM_TRAIN_TIMESTEPS} training steps for {task}: "
                    "every planned sampler is defined on it")


def snr_factor_for_patch(patch_size: Sequence[int]) -> float:
    """Π_axes (side / 64), at least 1: the factor by which average-pooling the patch to a 64-per-axis
    grid raises the SNR (pooling k voxels divides the noise variance by k)."""
    return max(1.0, math.prod(s / SNR_SHIFT_REFERENCE_SIDE for s in patch_size))


def snr_shift_for_patch(patch_size: Sequence[int]) -> float:
    """The plan's ``snr_shift`` s, in the diffusion core's convention SNR'(t) = SNR(t) / s²
    (``nndiff.diffusion.schedules.shift_snr``; s = d/64 for a d×d image as in Hoogeboom et al.):
    s = sqrt(Π_axes side / 64), so that SNR / s² = SNR / Π(side / 64)."""
    return math.sqrt(snr_factor_for_patch(patch_size))


def decide_schedule(patch_size: Sequence[int]) -> Decision[tuple[Schedule, float]]:
    """Cosine schedule (Nichol & Dhariwal 2021, designed at 64×64) with a resolution-dependent shift
    for larger patches: the SNR is divided by Π(side / 64) (log-SNR shifted by −log Π(side/64);
    Hoogeboom et al. 2023 "simple diffusion": 2·log(64/d) for a d×d image; Chen 2023 "On the
    importance of noise scheduling"), because neighbouring voxels of a large image are redundant
    and the same per-voxel noise destroys less of it (2D: (d/64)²; nD: the number of voxels pooled
    into one voxel of a 64-per-axis grid). Stored as ``snr_shift`` = sqrt(Π(side / 64)) in the
    diffusion core's convention SNR / snr_shift²."""
    factor = snr_factor_for_patch(patch_size)
    shift = snr_shift_for_patch(patch_size)
    ratios = " · ".join(f"({s}/{SNR_SHIFT_REFERENCE_SIDE})" for s in patch_size)
    if factor <= 1.0:
        return Decision((Schedule.COSINE, 1.0),
                        f"patch {fmt_shape(patch_size)} ≤ {SNR_SHIFT_REFERENCE_SIDE} voxels per axis in total "
                        f"({ratios} ≤ 1) → plain cosine schedule, snr_shift 1")
    return Decision((Schedule.COSINE, round(shift, 6)),
                    f"patch {fmt_shape(patch_size)} → cosine schedule with the SNR divided by {ratios} = "
                    f"{fmt_num(factor)} (log-SNR − {math.log(factor):.3g}; Hoogeboom et al. 2023, Chen 2023); "
                    f"snr_shift = sqrt({fmt_num(factor)}) = {fmt_num(shift)} (SNR / snr_shift²)")


def decide_parameterization(task: TaskFamily) -> Decision[Parameterization]:
    """v-prediction (Salimans & Ho 2022): well conditioned at both ends of the schedule (eps
    prediction gives x0 = (x_t − σ eps)/α, which explodes as α → 0, i.e. at the low-SNR end the
    shifted schedules emphasise), and the standard with min-SNR weighting."""
    return Decision(Parameterization.V,
                    "v = α·eps − σ·x0 (Salimans & Ho 2022): stable x0 estimates at SNR → 0, where "
                    "eps-prediction divides by α ≈ 0 (shifted schedules spend more time there)")


def decide_loss_weighting() -> Decision[tuple[LossWeighting, float]]:
    """Min-SNR-γ weighting with γ = 5 (Hang et al. 2023): caps the weight of low-noise steps,
    ~3.4× faster convergence in their experiments."""
    return Decision((LossWeighting.MIN_SNR, MIN_SNR_GAMMA),
                    f"min-SNR-γ, γ = {fmt_num(MIN_SNR_GAMMA)} (Hang et al. 2023): balances the timesteps' "
                    "conflicting gradients, faster convergence than uniform weighting")


def decide_noise_type(task: TaskFamily) -> Decision[tuple[NoiseType, dict[str, Any] | None]]:
    """Simplex noise for anomaly detection (AnoDDPM, Wyatt et al. 2022: Gaussian noise is too
    high-frequency to erase large lesions; multi-octave simplex noise with 6 octaves, persistence
    0.8, frequency 64 — their defaults), Gaussian otherwise."""
    if task == TaskFamily.ANOMALY_DETECTION:
        params = {"octaves": SIMPLEX_OCTAVES, "persistence": SIMPLEX_PERSISTENCE, "frequency": SIMPLEX_FREQUENCY}
        return Decision((NoiseType.SIMPLEX, params),
                        f"anomaly detection → simplex noise ({SIMPLEX_OCTAVES} octaves, persistence "
                        f"{fmt_num(SIMPLEX_PERSISTENCE)}, frequency {SIMPLEX_FREQUENCY}; AnoDDPM, Wyatt et al. "
                        "2022): low-frequency noise erases lesions that Gaussian noise leaves visible")
    return Decision((NoiseType.GAUSSIAN, None), f"{task} → Gaussian noise (N(0, 1) per voxel, 1 draw per step)")


def decide_sampler(task: TaskFamily) -> Decision[tuple[Sampler, int, TimestepSpacing]]:
    """Default sampler and number of steps per family (overridable at prediction: --sampler,
    --steps), with trailing timestep spacing (Lin et al. 2024: few-step schedules must start at
    t = T − 1, which 'leading' spacing skips)."""
    sampler, steps, why = _SAMPLERS[task]
    return Decision((sampler, steps, TimestepSpacing.TRAILING),
                    f"{task} → {sampler}, {steps} steps: {why}; trailing timestep spacing (Lin et al. 2024) "
                    f"so sampling starts at t = {NUM_TRAIN_TIMESTEPS - 1}")


def decide_clip_x0(produced_schemes: Sequence[str]) -> Decision[list[float] | None]:
    """Clip the predicted x0 to [-1, 1] when every produced channel is bounded there (window
    schemes, rgb, one-hot labels); not for scale_only (unbounded, linear) data."""
    bounded = {NormalizationScheme.CT_WINDOW, NormalizationScheme.DATASET_PERCENTILE, NormalizationScheme.RGB,
               NormalizationScheme.PER_IMAGE_PERCENTILE}
    schemes = sorted(set(produced_schemes))
    if all(s in bounded for s in schemes):
        what = ", ".join(schemes) if schemes else "one-hot labels"
        return Decision([-1.0, 1.0], f"produced channels ({what}) lie in [-1, 1] → clip x0 to [-1, 1]")
    return Decision(None, f"produced channels use {', '.join(schemes)} (unbounded; the data are only scaled "
                          "by the 99.5th percentile, so about 0.5 % exceed 1) → no x0 clipping")


def decide_guidance(num_classes: int | None, num_continuous: int) -> Decision[dict[str, Any]]:
    """Classifier-free guidance when the dataset declares conditions: conditions dropped with
    p = 0.1 in training (Ho & Salimans 2022 used 0.1-0.2), guidance scale 2.0 at sampling
    (ε = ε_uncond + s·(ε_cond − ε_uncond); s = 1 is plain conditional sampling); none otherwise."""
    if num_classes or num_continuous:
        return Decision({"guidance": str(Guidance.CLASSIFIER_FREE), "guidance_scale": CFG_GUIDANCE_SCALE,
                         "condition_dropout": CFG_CONDITION_DROPOUT},
                        f"{num_classes or 0} classes / {num_continuous} continuous condition(s) → classifier-free "
                        f"guidance, scale {fmt_num(CFG_GUIDANCE_SCALE)} (ε = ε_uncond + s·(ε_cond − ε_uncond)), "
                        f"conditions dropped with p = {fmt_num(CFG_CONDITION_DROPOUT)} in training (Ho & Salimans 2022)")
    return Decision({"guidance": str(Guidance.NONE), "guidance_scale": 1.0, "condition_dropout": 0.0},
                    "no conditions (0 classes, 0 continuous) → no guidance, condition dropout 0")


def decide_diffusion(task: TaskFamily, patch_size: Sequence[int], produced_schemes: Sequence[str],
                     num_classes: int | None = None, num_continuous: int = 0
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``diffusion`` block and one reason per sub-decision (keys ``diffusion.<name>``)."""
    process = decide_process(task)
    schedule = decide_schedule(patch_size)
    parameterization = decide_parameterization(task)
    weighting = decide_loss_weighting()
    noise = decide_noise_type(task)
    sampler = decide_sampler(task)
    clip = decide_clip_x0(produced_schemes)
    guidance = decide_guidance(num_classes, num_continuous)
    block: dict[str, Any] = {
        "process": str(process.value[0]),
        "num_train_timesteps": process.value[1],
        "schedule": str(schedule.value[0]),
        "snr_shift": schedule.value[1],
        "parameterization": str(parameterization.value),
        "loss_weighting": str(weighting.value[0]),
        "min_snr_gamma": weighting.value[1],
        "noise_type": str(noise.value[0]),
        "noise_params": dict(noise.value[1] or {}),
        "sampler": str(sampler.value[0]),
        "num_sampling_steps": sampler.value[1],
        "timestep_spacing": str(sampler.value[2]),
        "clip_x0": clip.value,
        **guidance.value,
    }
    reasons = {
        "diffusion.process": process.reason,
        "diffusion.schedule": schedule.reason,
        "diffusion.parameterization": parameterization.reason,
        "diffusion.loss_weighting": weighting.reason,
        "diffusion.noise_type": noise.reason,
        "diffusion.sampler": sampler.reason,
        "diffusion.clip_x0": clip.reason,
        "diffusion.guidance": guidance.reason,
    }
    return block, reasons


def decide_sampling(task: TaskFamily) -> Decision[dict[str, Any]]:
    """Family options the family's predictor reads next to the diffusion block: where partial
    diffusion / warm start begins (``start_fraction`` of the schedule), data consistency and warm
    start for reconstruction, ensemble size and label encoding for segmentation; empty otherwise."""
    options: dict[str, Any] = {}
    if task == TaskFamily.RECONSTRUCTION:
        frac = _START_FRACTION[task]
        options.update(start_fraction=frac, warm_start="adjoint", data_consistency=True)
        return Decision(options, f"warm start from the adjoint (zero-filled / back-projected) reconstruction at "
                                 f"t0 = {fmt_num(frac)}·T = {int(frac * NUM_TRAIN_TIMESTEPS)} (CCDF, Chung et al. "
                                 "2022), data consistency after every step")
    if task == TaskFamily.ANOMALY_DETECTION:
        frac = _START_FRACTION[task]
        options["start_fraction"] = frac
        return Decision(options, f"partial diffusion from t0 = {fmt_num(frac)}·T = {int(frac * NUM_TRAIN_TIMESTEPS)} "
                                 "(AnoDDPM's λ = 250), anomaly map = |input − reconstruction|")
    if task == TaskFamily.SEGMENTATION:
        options.update(num_ensemble_samples=SEGMENTATION_ENSEMBLE, label_encoding="one_hot")
        return Decision(options, f"ensemble of {SEGMENTATION_ENSEMBLE} samples averaged (Wolleb et al. 2022) for "
                                 "the label map (argmax of one-hot channels) and an uncertainty map")
    return Decision(options, f"{task}: full sampling from t = {NUM_TRAIN_TIMESTEPS - 1}, no family-specific options")


# --------------------------------------------------------------------------- family data options

#: dataset.json key of the clean-only denoising degradation ({"type", "level"}).
DEGRADATION_KEY = "degradation"
#: Default level range per degradation (``nndiff.tasks.degradations.simulate``'s relative level):
#: Gaussian / Rician std 1-15 % of the image maximum (covers the 2/5/10 % evaluation levels with
#: margin); PET Poisson 11-400 mean counts per voxel (level 0.3-0.05).
DEFAULT_DEGRADATION_LEVELS: dict[str, list[float]] = {
    Degradation.GAUSSIAN.value: [0.01, 0.15],
    Degradation.RICIAN.value: [0.01, 0.15],
    Degradation.POISSON.value: [0.05, 0.3],
}
#: Low-dose CT (Poisson in projection): 1 / level² incident photons per ray, 2.5e3-4e4 (level
#: 0.02-0.005), i.e. quarter- to ~1/100-dose of the ~1e5-1e6 photons per ray of routine-dose simulations.
DEFAULT_CT_LEVELS = [0.005, 0.02]


def _level_range(level: Any, key: str) -> list[float]:
    """A number → [level, level]; a [low, high] list as is; anything else a plans error."""
    if isinstance(level, (int, float)) and not isinstance(level, bool) and level > 0:
        return [float(level), float(level)]
    if (isinstance(level, (list, tuple)) and len(level) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in level)
            and 0 < level[0] <= level[1]):
        return [float(level[0]), float(level[1])]
    raise PlansError(f"{key} 'level' must be a number > 0 or [low, high] with 0 < low <= high, got {level!r}. "
                     "Fix: e.g. \"level\": [0.02, 0.1]")


def _first_image_modality(fp: FingerprintView) -> str:
    channels = fp.channels_with_role(IMAGE)
    return str(channels[0].modality) if channels else Modality.OTHER.value


def _degradation_from_modality(modality: str, is_complex: bool) -> tuple[str, bool, str]:
    """(type, ct, why) of the modality rule."""
    if modality == Modality.MR.value and is_complex:
        return (Degradation.GAUSSIAN.value, False,
                "complex MR data carry Gaussian noise on the real and imaginary parts (Rician arises only in "
                "the magnitude)")
    if modality == Modality.MR.value:
        return Degradation.RICIAN.value, False, "MR magnitude images carry Rician noise"
    if modality == Modality.CT.value:
        return (Degradation.POISSON.value, True,
                "low-dose CT: Poisson photon noise on the projections (Radon transform of the HU image, "
                "reconstructed by filtered back-projection)")
    if modality == Modality.PET.value:
        return Degradation.POISSON.value, False, "PET images carry Poisson counting noise"
    return Degradation.GAUSSIAN.value, False, f"modality {modality!r} has no specific noise model → Gaussian"


def _level_meaning(kind: str, ct: bool, level: list[float]) -> str:
    if kind == Degradation.POISSON.value:
        what = "incident photons per ray" if ct else "mean counts per voxel"
        return f"{fmt_num(1 / level[1] ** 2)}-{fmt_num(1 / level[0] ** 2)} {what} (1 / level²)"
    return f"noise std {fmt_num(100 * level[0])}-{fmt_num(100 * level[1])} % of the image maximum"


def decide_degradation(fp: FingerprintView, task: TaskFamily, dataset_json: Mapping[str, Any]
                       ) -> Decision[dict[str, Any] | None]:
    """What clean-only denoising simulates: ``{"type", "level": [low, high], "ct", "source"}``.

    dataset.json ``"degradation"`` wins (its level, or the default range of its type). Otherwise
    the first image channel's modality decides: Rician for magnitude MR, Poisson in projection
    (low dose, ``ct`` true: ``simulate(..., ct=CTProjector)``) for CT, Poisson for PET, Gaussian
    otherwise (and for complex MR). One level per case is drawn uniformly from the range during
    training. ``None`` for every other family and for paired denoising (the noise is in the data).
    """
    if task != TaskFamily.DENOISING or fp.stored_channel_count(TARGET):
        why = "paired denoising learns the noise from the noisy images" if task == TaskFamily.DENOISING \
            else f"{task} simulates no degradation"
        return Decision(None, f"{why} → no degradation")
    modality = _first_image_modality(fp)
    block = dataset_json.get(DEGRADATION_KEY)
    if block is not None:
        key = f"dataset.json key '{DEGRADATION_KEY}'"
        try:
            kind = parse_option(Degradation, str(block.get("type") if isinstance(block, Mapping) else None),
                                "degradation type")
        except ValueError as err:
            raise PlansError(f"{key}: {err}. Fix: e.g. \"degradation\": {{\"type\": \"rician\", "
                             "\"level\": [0.02, 0.1]}") from None
        ct = kind == Degradation.POISSON and modality == Modality.CT.value
        default = DEFAULT_CT_LEVELS if ct else DEFAULT_DEGRADATION_LEVELS[kind.value]
        level = _level_range(block["level"], key) if "level" in block else list(default)
        source, why = "dataset.json", f"{key} says {kind.value}" + (" on CT → in projection (low dose)" if ct else "")
        kind_value = kind.value
    else:
        kind_value, ct, why = _degradation_from_modality(modality, fp.is_complex)
        level = list(DEFAULT_CT_LEVELS if ct else DEFAULT_DEGRADATION_LEVELS[kind_value])
        source = "modality"
        why = f"no '{DEGRADATION_KEY}' in dataset.json; first image channel is {modality}: {why}"
    value = {"type": kind_value, "level": level, "ct": ct, "source": source}
    return Decision(value, f"{why} → {kind_value}{' (ct)' if ct else ''} at level {level}: "
                           f"{_level_meaning(kind_value, ct, level)}, one level per case drawn uniformly")


def decide_resample(task: TaskFamily, spacing: Sequence[float]) -> Decision[bool]:
    """Resample cases to the configuration's ``spacing``, except for reconstruction: its
    measurements (k-space, sinograms) are defined on each case's own grid, and an interpolated
    image would break the linear image ↔ measurement relation the sampler's data consistency
    relies on."""
    planned = f"{fmt_shape(spacing)} mm"
    if task == TaskFamily.RECONSTRUCTION:
        return Decision(False, "reconstruction: data consistency needs the image on its measurement grid → no "
                               f"resampling (each case keeps its own spacing; the planned {planned} only sizes the "
                               "patch and network)")
    return Decision(True, f"{task}: cases are resampled to the configuration's spacing {planned}")
