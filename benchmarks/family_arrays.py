"""Predict and evaluate the image-conditioned families on held-out cases, with arrays instead of image
files, for machines where SimpleITK is not installed (the GPU machine of documentation/benchmarks.md).

The cases are read where SimpleITK is available (``pack``), predicted on the GPU with the family's
own predictor and evaluated there with the library's metric functions (``reconstruction``,
``denoising``, ``translation``), and the predictions are written as image files with their geometry
where SimpleITK is available again (``write``), so that the folder evaluations
(``evaluate_reconstruction``, ``nndiff_evaluate_folder``) can confirm the numbers:

    python benchmarks/family_arrays.py pack RAW_DATASET_DIR PACK.npz            # imagesTs (+ targetsTs)
    python benchmarks/family_arrays.py reconstruction MODEL_DIR PACK.npz OUT_DIR [-n K] [-chk CKPT] [-device cuda]
    python benchmarks/family_arrays.py denoising MODEL_DIR PACK.npz OUT_DIR [-n K] [--levels 0.02 0.05 0.1]
    python benchmarks/family_arrays.py translation MODEL_DIR PACK.npz OUT_DIR [-n K]
    python benchmarks/family_arrays.py write OUT_DIR/predictions.npz DIR          # image files

``OUT_DIR`` receives ``summary.json`` (the family's metrics) and, for reconstruction and
translation, ``predictions.npz`` (mean, std and, for reconstruction, the zero-filled baseline).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


# ---------------------------------------------------------------------------------------------- pack
def pack(raw_dir: str, out: str) -> None:
    """``imagesTs`` (and ``targetsTs`` when present) of a raw dataset as arrays + geometry."""
    from nndiff.dataset import load_dataset
    from nndiff.dataset.io import read_images
    from nndiff.inference.files import find_input_cases

    dataset = load_dataset(raw_dir)
    root = Path(raw_dir)
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"file_ending": dataset.file_ending, "cases": {}}
    for item in find_input_cases(root / "imagesTs", dataset.file_ending, dataset.files_per_case):
        images, properties = read_images(item.files)
        arrays[f"image__{item.identifier}"] = images
        entry = {"properties": properties.to_json()}
        targets = sorted((root / "targetsTs").glob(f"{item.identifier}_[0-9][0-9][0-9][0-9]{dataset.file_ending}"))
        if targets:
            arrays[f"target__{item.identifier}"] = read_images(targets)[0]
        meta["cases"][item.identifier] = entry
    if not meta["cases"]:
        raise SystemExit(f"{root / 'imagesTs'} holds no cases")
    np.savez_compressed(out, meta=json.dumps(meta), **arrays)
    print(f"packed {len(meta['cases'])} case(s) of {raw_dir} into {out}")


def load_pack(path: str) -> tuple[list[tuple[str, np.ndarray, Any, np.ndarray | None]], str]:
    from nndiff.dataset.io import ImageProperties

    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    cases = []
    for identifier, entry in meta["cases"].items():
        target = data[f"target__{identifier}"] if f"target__{identifier}" in data else None
        cases.append((identifier, data[f"image__{identifier}"], ImageProperties.from_json(entry["properties"]), target))
    return cases, meta["file_ending"]


# ---------------------------------------------------------------------------------------- predictors
def load_predictor(model_dir: str, checkpoint: str, device: str, folds: list[str], **kwargs: Any):
    from nndiff.inference.registry import predictor_class_for

    folds_arg = "all" if folds == ["all"] else tuple(int(f) for f in folds)
    trainer = Path(model_dir).name.split("__")[0]
    return predictor_class_for(trainer).from_model_folder(model_dir, folds=folds_arg, device=device,
                                                          checkpoint=checkpoint, **kwargs)


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([r[key] for r in rows if r.get(key) is not None])) for key in rows[0]}


Result = tuple[dict[str, Any], dict[str, np.ndarray]]


def run_reconstruction(predictor: Any, cases: list, out_dir: Path, num_samples: int, seed: int) -> Result:
    """Simulate mode (dataset.json's undersampling) per case; mean magnitude vs zero-filled."""
    from nndiff.evaluation.reconstruction import case_metrics

    settings = predictor.simulation_settings()
    arrays: dict[str, np.ndarray] = {}
    table: dict[str, Any] = {}
    for identifier, images, properties, _ in cases:
        case = predictor.simulated_case(identifier, images, properties, settings, seed, identifier)
        result = predictor.reconstruct_case(case, seed, num_samples)
        magnitudes = result["samples"].abs().numpy()[:, None]  # (K, 1, S, H, W)
        mean, baseline = magnitudes.mean(0), result["baseline"].abs().numpy()[None]
        arrays[f"mean__{identifier}"], arrays[f"baseline__{identifier}"] = mean, baseline
        if num_samples > 1:
            arrays[f"std__{identifier}"] = magnitudes.std(0)
        table[identifier] = {"reconstruction": case_metrics(mean, images), "baseline": case_metrics(baseline, images),
                             "dc_residual": result["residual"], "acceleration": case.acceleration}
    rec, base = _mean([r["reconstruction"] for r in table.values()]), _mean([r["baseline"] for r in table.values()])
    summary = {"settings": {**settings, "num_samples": num_samples, "seed": seed},
               "mean": {"reconstruction": rec, "baseline": base, "psnr_gain_over_baseline": rec["psnr"] - base["psnr"],
                        "dc_residual": float(np.mean([r["dc_residual"] for r in table.values()]))},
               "cases": table}
    return summary, arrays


def run_translation(predictor: Any, cases: list, out_dir: Path, num_samples: int, seed: int) -> Result:
    """K samples per case; mean and std in original units; metrics against the target."""
    from nndiff.evaluation.translation import case_metrics

    arrays: dict[str, np.ndarray] = {}
    table: dict[str, Any] = {}
    for identifier, images, properties, target in cases:
        if target is None:
            raise SystemExit(f"case {identifier} has no target in the pack (targetsTs missing?)")
        case = predictor.prepare_case(images.astype(np.float32), properties, identifier)
        samples = predictor._run_case(case, seed, num_samples).float().cpu().numpy()
        samples = samples if num_samples > 1 else samples[None]
        restored = np.stack([predictor.invert(s, case.case_json)[0] for s in samples])
        mean, std = restored.mean(0), restored.std(0) if num_samples > 1 else None
        arrays[f"mean__{identifier}"] = mean
        if std is not None:
            arrays[f"std__{identifier}"] = std
        data_range = float(target.max() - target.min())
        table[identifier] = case_metrics(mean, target, data_range, std)
    keys = ("psnr", "ssim", "mae", "psnr_body", "ssim_body", "mae_body", "uncertainty_error_pearson",
            "uncertainty_error_pearson_body")
    mean_row = {k: float(np.mean([r[k] for r in table.values() if r[k] is not None])) for k in keys
                if any(r[k] is not None for r in table.values())}
    return {"settings": {"num_samples": num_samples, "seed": seed}, "mean": mean_row, "cases": table}, arrays


def run_denoising(predictor: Any, cases: list, out_dir: Path, num_samples: int, seed: int,
                  levels: list[float]) -> Result:
    from nndiff.evaluation.denoising import evaluate_denoising

    clean = [(identifier, images, properties) for identifier, images, properties, _ in cases]
    return evaluate_denoising(predictor, clean, out_dir, degradation="rician", levels=levels,
                              num_samples=num_samples, seed=seed), {}


def predict(family: str, args: argparse.Namespace) -> None:
    import torch

    from nndiff.utils.files import save_json

    cases, ending = load_pack(args.pack)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = cases[:args.max_cases] if args.max_cases else cases
    predictor = load_predictor(args.model_dir, args.checkpoint, args.device, args.f, num_steps=args.steps)
    start = time.perf_counter()
    with torch.no_grad() if family != "reconstruction" else _nullcontext():
        if family == "reconstruction":
            summary, arrays = run_reconstruction(predictor, cases, out_dir, args.n, args.seed)
        elif family == "translation":
            summary, arrays = run_translation(predictor, cases, out_dir, args.n, args.seed)
        else:
            summary, arrays = run_denoising(predictor, cases, out_dir, args.n, args.seed, args.levels)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    planned = predictor.configuration["diffusion"]  # the predictor's overrides are None when it samples as planned
    summary["model"] = {"model_dir": str(args.model_dir), "checkpoint": args.checkpoint, "folds": args.f,
                        "sampler": predictor.sampler_name or planned.get("sampler"),
                        "num_steps": predictor.num_steps or planned.get("num_sampling_steps")}
    save_json(summary, out_dir / "summary.json")
    if arrays:
        props = {identifier: properties.to_json() for identifier, _, properties, _ in cases}
        np.savez_compressed(out_dir / "predictions.npz", meta=json.dumps({"file_ending": ending, "properties": props}),
                            **arrays)
    print(json.dumps({"family": family, "mean": summary.get("mean") or {k: v["mean"] for k, v in summary["levels"].items()},
                      "seconds": summary["seconds"]}, indent=1))


class _nullcontext:  # reconstruction's data consistency may need gradients (it manages its own no_grad)
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# --------------------------------------------------------------------------------------------- write
def write(npz: str, out_dir: str) -> None:
    """``mean__ID`` → ``ID{ending}``, ``std__ID`` → ``ID_std{ending}``, ``baseline__ID`` →
    ``baseline/ID{ending}`` (the names the family predictors write)."""
    from nndiff.dataset.io import ImageProperties
    from nndiff.inference.files import write_output

    data = np.load(npz)
    meta = json.loads(str(data["meta"]))
    ending, target = meta["file_ending"], Path(out_dir)
    count = 0
    for key in data.files:
        if key == "meta":
            continue
        kind, identifier = key.split("__", 1)
        properties = ImageProperties.from_json(meta["properties"][identifier])
        array = np.asarray(data[key], dtype=np.float32)
        if kind == "mean":
            write_output(array, properties, target, identifier, ending)
        elif kind == "std":
            write_output(array, properties, target, identifier, ending, suffix="_std")
        elif kind == "baseline":
            write_output(array, properties, target / "baseline", identifier, ending)
        count += 1
    print(f"wrote {count} file(s) to {out_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("pack")
    p.add_argument("raw_dir")
    p.add_argument("out")
    w = sub.add_parser("write")
    w.add_argument("npz")
    w.add_argument("out_dir")
    for family in ("reconstruction", "denoising", "translation"):
        f = sub.add_parser(family)
        f.add_argument("model_dir")
        f.add_argument("pack")
        f.add_argument("out_dir")
        f.add_argument("-n", type=int, default=4, help="samples per case (K)")
        f.add_argument("-f", nargs="+", default=["0"])
        f.add_argument("--seed", type=int, default=0)
        f.add_argument("-device", default="auto")
        f.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
        f.add_argument("--steps", type=int, default=None, help="sampling steps (default: the plan's)")
        f.add_argument("--max_cases", type=int, default=None, help="only the first N cases (smoke runs)")
        if family == "denoising":
            f.add_argument("--levels", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    args = parser.parse_args(argv)
    if args.mode == "pack":
        pack(args.raw_dir, args.out)
    elif args.mode == "write":
        write(args.npz, args.out_dir)
    else:
        predict(args.mode, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
