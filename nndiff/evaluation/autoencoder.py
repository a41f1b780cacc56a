"""Held-out reconstruction quality of a fold's autoencoder: the ceiling of any latent diffusion model.

A latent model can only generate what its decoder can draw, so the autoencoder's reconstruction of
cases it never saw bounds every latent sample's quality. :func:`evaluate_autoencoder` (the command
``nndiff_evaluate_autoencoder``) loads the fold's trained stage
(``results/DatasetXXX/AutoencoderTrainer__<Plans>__<config>/fold_N``, :func:`load_trained_autoencoder`),
reads and preprocesses each case of an input folder as the predictors do
(:meth:`nndiff.inference.predictor.Predictor.prepared_cases`), and per case

1. pads the preprocessed image at its end to multiples of the downsampling factors with each
   channel's minimum, encodes it to the posterior mean (VQ: the codewords; never a sample), as the
   latent cache does (:func:`nndiff.tasks.latent.encode_case`; 2D configurations slice by slice);
2. decodes the latents (:func:`nndiff.tasks.latent.decode_latents`) — whole, or in sliding windows of
   the autoencoder patch when an input is above the configuration's ``max_decode_voxels`` — and
   crops back to the case's shape;
3. maps reference and reconstruction to original intensity units by inverting the normalization
   only, on the configuration's grid (the preprocessed crop and spacing: no resampling back, so the
   numbers measure the autoencoder, not the resampling);
4. scores them per channel: PSNR = 10 log10(L² / MSE) and SSIM (:mod:`nndiff.evaluation.ssim`,
   Gaussian σ 1.5, 11 taps, valid positions; per 2D slice for a 2D configuration, 3D otherwise), with
   L = max − min of the reference channel of that case; the case value is the mean over channels.

Encode + decode seconds are timed per case (CUDA synchronised, after one untimed warm-up pass on a
zero patch), without reading, preprocessing and metrics. Network calls run in float32 (no autocast). See documentation/latent.md, section
"Evaluation: autoencoder ceiling and time per sample".
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from nndiff.errors import NnDiffError
from nndiff.evaluation import image_quality as iq
from nndiff.evaluation.ssim import DEFAULT_SIGMA, DEFAULT_WIN_SIZE
from nndiff.paths import Paths
from nndiff.training.devices import synchronize
from nndiff.utils.files import load_json, save_json

logger = logging.getLogger(__name__)

#: Summary written into the autoencoder fold folder by default (other checkpoints add their name).
AUTOENCODER_EVALUATION = "autoencoder_evaluation.json"
AUTOENCODER_TRAINER = "AutoencoderTrainer"
DEFAULT_CHECKPOINT = "checkpoint_final.pth"
#: Metrics averaged over cases in the summary's ``mean``.
CASE_METRICS = ("psnr", "ssim", "mse", "encode_decode_seconds")
DEFINITIONS = {
    "grid": "the configuration's grid (preprocessed crop and spacing); no resampling back to the raw grid",
    "units": "original intensity units: the normalization of reference and reconstruction is inverted "
             "(bounded schemes clip the reconstruction to their window)",
    "latent": "posterior mean (KL) or codewords (VQ) of the input padded at its end to multiples of the "
              "downsampling factors with each channel's minimum; the decoded image is cropped back",
    "psnr": "10 log10(L^2 / MSE) per channel, L = max - min of that reference channel of the case; null when "
            "infinite (MSE 0, see 'exact') or undefined (constant reference)",
    "ssim": "Wang et al. 2004, Gaussian window sigma 1.5, 11 taps (fewer on smaller axes, see ssim_window), "
            "C1 = (0.01 L)^2, C2 = (0.03 L)^2, mean over valid positions; per 2D slice for a 2D configuration "
            "(mean over slices), 3D otherwise",
    "case value": "mean over channels",
    "encode_decode_seconds": "wall time of encoding and decoding one case (CUDA synchronised, after one untimed "
                             "warm-up pass on a zero patch), float32; reading, preprocessing and metrics excluded",
}


# ----------------------------------------------------------------------------------------------
# One case: reconstruction on the configuration's grid
# ----------------------------------------------------------------------------------------------
def _padded(shape: Sequence[int], factors: Sequence[int]) -> list[int]:
    return [int(math.ceil(int(s) / int(f)) * int(f)) for s, f in zip(shape, factors)]


def reconstruct_case(autoencoder: nn.Module, data: np.ndarray, configuration: Mapping[str, Any],
                     device: str | torch.device = "cpu") -> tuple[np.ndarray, dict[str, Any]]:
    """Reconstruction ``(C, Z, Y, X)`` (normalised units, the grid of ``data``) of one preprocessed case
    ``data`` ``(C, Z, Y, X)``, and what was done: ``encode_decode_seconds``, ``padded_shape``,
    ``latent_shape`` and ``sliding_window`` (whether an input was above ``max_decode_voxels``).

    Encoding is :func:`nndiff.tasks.latent.encode_case` (the latent cache's: end-padding with each
    channel's minimum, posterior mean, sliding windows above the limit) without the scale factor;
    decoding is :func:`nndiff.tasks.latent.decode_latents`. A 2D configuration treats each z slice as
    an image, in batches of as many slices as fit ``max_decode_voxels`` (at least one).
    """
    from nndiff.tasks.latent import decode_latents, decode_limit, encode_case, latent_window

    device = torch.device(device)
    block = configuration["autoencoder"]
    factors = [int(f) for f in block["downsampling_factors"]]
    spatial_dims = int(configuration.get("spatial_dims") or len(factors))
    max_voxels = decode_limit(configuration)
    window = latent_window(block)
    spatial = list(data.shape[1:]) if spatial_dims == 3 else list(data.shape[2:])
    padded = _padded(spatial, factors)
    image_voxels = math.prod(padded)
    slice_batch = max(1, max_voxels // image_voxels)
    synchronize(device)
    started = time.perf_counter()
    z = torch.from_numpy(encode_case(autoencoder, data, block, spatial_dims, 1.0, device, max_voxels,
                                     slice_batch=slice_batch)).to(device)
    with torch.no_grad():
        if spatial_dims == 3:
            out = decode_latents(autoencoder, z[None], factors, max_voxels, window)[0]
        else:
            slices = z.permute(1, 0, 2, 3)  # (Z, C_lat, Y', X')
            out = torch.cat([decode_latents(autoencoder, slices[i:i + slice_batch], factors, max_voxels, window)
                             for i in range(0, slices.shape[0], slice_batch)]).permute(1, 0, 2, 3)
    synchronize(device)
    seconds = time.perf_counter() - started
    crop = (slice(None),) + tuple(slice(0, int(n)) for n in data.shape[1:])
    reconstruction = out[crop].float().cpu().numpy()
    info = {"encode_decode_seconds": seconds, "padded_shape": padded, "latent_shape": list(z.shape[-len(factors):]),
            "sliding_window": image_voxels > max_voxels}
    return reconstruction, info


def warm_up(autoencoder: nn.Module, configuration: Mapping[str, Any], in_channels: int,
            device: str | torch.device = "cpu") -> None:
    """One untimed encode + decode of a zero image of the autoencoder's training patch (one-time costs
    such as the CUDA context and kernel loading stay out of the first case's time)."""
    block = configuration["autoencoder"]
    patch = block.get("patch_size") or [4 * int(f) for f in block["downsampling_factors"]]
    x = torch.zeros(1, int(in_channels), *[int(p) for p in patch], device=device)
    with torch.no_grad():
        autoencoder.decode(autoencoder.latents_for_diffusion(x))
    synchronize(torch.device(device))


def denormalize_on_grid(array: np.ndarray, case_json: Mapping[str, Any]) -> np.ndarray:
    """``array`` ``(C, Z, Y, X)`` in normalised units → original intensity units (float64), on the same
    grid: only the normalization step of the preprocessing inverse (the case JSON's ``images`` records)."""
    from nndiff.preprocessing.case import denormalize_channels

    return denormalize_channels(array, case_json["images"])


def _ssim_window(shape: Sequence[int]) -> int:
    """The metric's 11 taps, or the largest odd size that fits the smallest axis."""
    smallest = int(min(shape))
    return max(1, min(DEFAULT_WIN_SIZE, smallest if smallest % 2 else smallest - 1))


def _finite_or_none(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def reconstruction_metrics(reconstruction: np.ndarray, reference: np.ndarray, spatial_dims: int) -> dict[str, Any]:
    """PSNR, SSIM and MSE of two ``(C, Z, Y, X)`` images in original units (see the module docstring):
    means over channels, ``data_range`` per channel, ``exact`` (MSE 0 in every channel), the SSIM
    window used, and ``per_channel`` values for several channels. Infinite PSNR stays ``inf`` here."""
    window = _ssim_window(reference.shape[2:] if spatial_dims == 2 else reference.shape[1:])
    channels = []
    for c in range(reference.shape[0]):
        ref, rec = reference[c:c + 1], reconstruction[c:c + 1]
        data_range = float(ref.max() - ref.min())
        error = iq.mse(rec, ref)
        entry: dict[str, Any] = {"data_range": data_range, "mse": error, "psnr": None, "ssim": None}
        if data_range > 0:
            entry["psnr"] = iq.psnr(rec, ref, data_range)
            if spatial_dims == 2:  # the autoencoder sees 2D slices: SSIM per slice, mean over slices
                values = [iq.ssim(rec[:, z:z + 1], ref[:, z:z + 1], data_range, win_size=window,
                                  sigma=DEFAULT_SIGMA) for z in range(ref.shape[1])]
                entry["ssim"] = float(np.mean(values))
            else:
                entry["ssim"] = iq.ssim(rec, ref, data_range, win_size=window, sigma=DEFAULT_SIGMA)
        channels.append(entry)

    def mean(key: str) -> float | None:
        values = [ch[key] for ch in channels if ch[key] is not None]
        return float(np.mean(values)) if values else None

    result = {"psnr": mean("psnr"), "ssim": mean("ssim"), "mse": mean("mse"),
              "data_range": [ch["data_range"] for ch in channels], "exact": all(ch["mse"] == 0 for ch in channels),
              "ssim_window": window}
    if len(channels) > 1:
        result["per_channel"] = channels
    return result


def evaluate_reconstructions(autoencoder: nn.Module, cases: Any, configuration: Mapping[str, Any],
                             device: str | torch.device = "cpu") -> dict[str, dict[str, Any]]:
    """Per case (identifier → metrics and timing) for prepared cases (objects with ``identifier``,
    ``data`` ``(C, Z, Y, X)`` preprocessed and ``case_json``, e.g. :class:`PreparedCase`)."""
    spatial_dims = int(configuration.get("spatial_dims") or len(configuration["autoencoder"]["downsampling_factors"]))
    per_case: dict[str, dict[str, Any]] = {}
    for case in cases:
        reconstruction, info = reconstruct_case(autoencoder, case.data, configuration, device)
        reference = denormalize_on_grid(np.asarray(case.data), case.case_json)
        recon_units = denormalize_on_grid(reconstruction, case.case_json)
        metrics = reconstruction_metrics(recon_units, reference, spatial_dims)
        per_case[case.identifier] = {**metrics, **info, "shape": list(case.data.shape[1:])}
        logger.info("%s: PSNR %s dB, SSIM %s, %.3f s encode + decode%s", case.identifier,
                    "inf" if metrics["exact"] else _fmt(metrics["psnr"]), _fmt(metrics["ssim"], 4),
                    info["encode_decode_seconds"], " (sliding windows)" if info["sliding_window"] else "")
    return per_case


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summarize(per_case: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean of :data:`CASE_METRICS` over the cases that have them (an infinite PSNR makes the mean
    infinite), the total encode + decode time, and the number of exactly reconstructed cases."""
    mean: dict[str, Any] = {}
    for key in CASE_METRICS:
        values = [float(v[key]) for v in per_case.values() if v.get(key) is not None]
        mean[key] = float(np.mean(values)) if values else None
    return {"mean": mean, "num_cases": len(per_case), "num_exact_cases": sum(bool(v["exact"]) for v in per_case.values()),
            "total_encode_decode_seconds": float(sum(v["encode_decode_seconds"] for v in per_case.values()))}


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return _finite_or_none(value)


# ----------------------------------------------------------------------------------------------
# A trained fold: locate, check, load, evaluate, write
# ----------------------------------------------------------------------------------------------
def _locate_plans(dataset_results: Path, model_dir: Path, plans_name: str, paths: Paths) -> tuple[Path, Path]:
    """Plans and dataset.json: the preprocessed dataset folder when the root is set, else what the
    autoencoder's model folder records (:func:`locate_plans_and_dataset_json`)."""
    from nndiff.inference.model_folder import locate_plans_and_dataset_json

    if paths.preprocessed is not None:
        folder = Path(paths.preprocessed) / dataset_results.name
        if (folder / f"{plans_name}.json").is_file() and (folder / "dataset.json").is_file():
            return folder / f"{plans_name}.json", folder / "dataset.json"
    if model_dir.is_dir():
        return locate_plans_and_dataset_json(model_dir, plans_name)
    raise NnDiffError(f"cannot find {plans_name}.json and dataset.json for {dataset_results.name} (no preprocessed "
                      f"folder {paths.preprocessed / dataset_results.name if paths.preprocessed else '(nnDiff_preprocessed not set)'}"
                      f" and no autoencoder folder {model_dir}). Fix: pass --preprocessed / set nnDiff_preprocessed "
                      "to the preprocessed root the autoencoder was trained from")


def _check_latent_configuration(plans: Mapping[str, Any], configuration: str, plans_file: Path) -> dict[str, Any]:
    from nndiff.planning import resolve_configuration
    from nndiff.tasks.latent import is_latent_configuration

    names = list(plans.get("configurations", {}))
    latent = [n for n in names if is_latent_configuration(resolve_configuration(plans, n))]
    hint = (f"latent configurations in {plans_file.name}: {', '.join(latent)}" if latent
            else f"{plans_file.name} has no latent configuration (none was planned)")
    if configuration not in names:
        raise NnDiffError(f"{plans_file} has no configuration {configuration!r}; {hint}. Fix: pass one of them "
                          "with -c")
    resolved = resolve_configuration(plans, configuration)
    if not is_latent_configuration(resolved):
        raise NnDiffError(f"configuration {configuration!r} is not a latent configuration (it has no 'autoencoder' "
                          f"block in {plans_file}), so it has no autoencoder to evaluate; {hint}. Fix: pass a "
                          "latent configuration with -c (e.g. 2d_latent or 3d_latent)")
    return resolved


def autoencoder_evaluation_file(fold_dir: Path, checkpoint: str = DEFAULT_CHECKPOINT) -> Path:
    """Default summary path: ``fold_dir/autoencoder_evaluation.json`` for the final checkpoint,
    ``autoencoder_evaluation_<checkpoint stem>.json`` for another."""
    if checkpoint == DEFAULT_CHECKPOINT:
        return fold_dir / AUTOENCODER_EVALUATION
    return fold_dir / f"{Path(AUTOENCODER_EVALUATION).stem}_{Path(checkpoint).stem}.json"


def evaluate_autoencoder(dataset: str | int, configuration: str, fold: int | str, paths: Paths, *,
                         input_dir: str | Path | None = None, output_file: str | Path | None = None,
                         checkpoint: str = DEFAULT_CHECKPOINT, device: str | torch.device = "auto",
                         plans_name: str = "nnDiffPlans") -> dict[str, Any]:
    """Held-out reconstruction quality of the autoencoder of ``fold`` of a latent ``configuration``.

    ``paths``: results root required; the preprocessed root (plans, dataset.json) when set, else the
    plans are found from the autoencoder's folder; the raw root for the default ``input_dir``, the
    raw dataset's ``imagesTs``. ``output_file``: default :func:`autoencoder_evaluation_file` inside
    the autoencoder fold folder. Returns the summary that was written (non-finite values as None).
    """
    from nndiff.inference.files import find_input_cases
    from nndiff.inference.predictor import Predictor
    from nndiff.tasks.autoencoder import load_trained_autoencoder
    from nndiff.tasks.latent import decode_limit, latent_window
    from nndiff.training.api import find_preprocessed_dataset
    from nndiff.training.checkpoint import plans_hash
    from nndiff.training.devices import resolve_device

    dataset_results = find_preprocessed_dataset(paths.require("results"), dataset)
    model_dir = dataset_results / f"{AUTOENCODER_TRAINER}__{plans_name}__{configuration}"
    fold_dir = model_dir / f"fold_{fold}"
    plans_file, dataset_json_file = _locate_plans(dataset_results, model_dir, plans_name, paths)
    plans, dataset_json = load_json(plans_file), load_json(dataset_json_file)
    resolved = _check_latent_configuration(plans, configuration, plans_file)
    train = f"nndiff_train {dataset_results.name} {configuration} {fold}"
    if not fold_dir.is_dir():
        raise NnDiffError(f"no autoencoder folder {fold_dir}: the autoencoder stage of fold {fold} has not been "
                          f"trained. Fix: train it ({train} -tr {AUTOENCODER_TRAINER}, or {train}, which trains it "
                          "first)")
    if not (fold_dir / "autoencoder.json").is_file():
        raise NnDiffError(f"{fold_dir / 'autoencoder.json'} not found: the autoencoder stage of fold {fold} has not "
                          f"finished (autoencoder.json is written at its end). Fix: finish it ({train} -tr "
                          f"{AUTOENCODER_TRAINER} --continue)")
    if input_dir is None:
        from nndiff.dataset import find_dataset_folder

        input_dir = find_dataset_folder(paths.require("raw"), dataset_results.name) / "imagesTs"
        if not Path(input_dir).is_dir():
            raise NnDiffError(f"{input_dir} does not exist: the raw dataset has no held-out images (imagesTs). Fix: "
                              "pass a folder of held-out {CASE}_{XXXX}" + str(dataset_json.get("file_ending", ""))
                              + " images with -i")
    input_dir = Path(input_dir)
    target = resolve_device(device)
    # the predictors' reading and preprocessing (no network: this Predictor only prepares cases)
    reader = Predictor(plans, configuration, dataset_json, (), device=target)
    find_input_cases(input_dir, reader.file_ending, reader.num_input_channels)  # an empty folder fails here, clearly
    autoencoder, info = load_trained_autoencoder(fold_dir, checkpoint, device=target)
    expected_hash = plans_hash(plans, resolved)
    if info.get("plans_hash") not in (None, expected_hash):
        logger.warning("the plans changed since the autoencoder of %s was trained (plans hash %s... in "
                       "autoencoder.json, %s... now): the normalization used here is the current plans'",
                       fold_dir, str(info.get("plans_hash"))[:12], expected_hash[:12])
    in_channels = info.get("in_channels") or resolved["autoencoder"].get("in_channels") or reader.num_input_channels
    warm_up(autoencoder, resolved, int(in_channels), target)
    started = time.perf_counter()
    per_case = evaluate_reconstructions(autoencoder, reader.prepared_cases(input_dir), resolved, target)
    summary = {
        "task": "autoencoder_reconstruction",
        "dataset": dataset_results.name,
        "configuration": configuration,
        "fold": str(fold),
        "autoencoder_dir": str(fold_dir),
        "checkpoint": checkpoint,
        "weights_sha256": info.get("checkpoints", {}).get(checkpoint, {}).get("weights_sha256"),
        "latent_scale_factor": info.get("checkpoints", {}).get(checkpoint, {}).get("latent_scale_factor"),
        "plans_file": str(plans_file),
        "plans_hash_matches": info.get("plans_hash") in (None, expected_hash),
        "input_dir": str(input_dir),
        "device": str(target),
        "device_name": torch.cuda.get_device_name(target) if target.type == "cuda" else None,
        "precision": "fp32",
        "settings": {"downsampling_factors": list(resolved["autoencoder"]["downsampling_factors"]),
                     "max_decode_voxels": decode_limit(resolved),
                     "sliding_window_latents": latent_window(resolved["autoencoder"]),
                     "spatial_dims": int(resolved.get("spatial_dims") or 0)},
        "definitions": DEFINITIONS,
        **summarize(per_case),
        "wall_seconds": time.perf_counter() - started,
        "per_case": per_case,
    }
    summary = _json_ready(summary)
    output = Path(output_file) if output_file is not None else autoencoder_evaluation_file(fold_dir, checkpoint)
    save_json(summary, output)
    logger.info("autoencoder evaluation of %d case(s) written to %s", len(per_case), output)
    return summary


def format_autoencoder_table(summary: Mapping[str, Any]) -> str:
    """Per-case and mean PSNR / SSIM / encode + decode seconds of a summary, as a text table."""
    rows = [("case", "PSNR (dB)", "SSIM", "seconds")]
    for case, entry in summary["per_case"].items():
        psnr = "inf" if entry["exact"] else _fmt(entry["psnr"])
        rows.append((case, psnr, _fmt(entry["ssim"], 4), f"{entry['encode_decode_seconds']:.3f}"))
    mean = summary["mean"]
    mean_psnr = "inf" if mean["psnr"] is None and summary["num_exact_cases"] else _fmt(mean["psnr"])
    rows.append((f"mean ({summary['num_cases']})", mean_psnr, _fmt(mean["ssim"], 4),
                 _fmt(mean["encode_decode_seconds"], 3)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)
