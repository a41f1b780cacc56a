"""Generate samples from a trained generation model into one ``.npz`` (original units), no SimpleITK.

For machines where SimpleITK is not installed (the GPU machine of documentation/benchmarks.md):
the samples are drawn exactly as ``nndiff_predict`` draws them (same predictor, batches and seeds),
mapped back to original units with the plan's inverse, and stored as arrays; write them as image
files elsewhere with ``--write DIR`` (which needs SimpleITK).

    python benchmarks/generate_arrays.py MODEL_DIR OUT.npz [-n 64] [-f 0] [--seed 0] [--steps N] [-chk checkpoint_best.pth]
    python benchmarks/generate_arrays.py --write OUT.npz DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def generate(model_dir: str, out: str, num_samples: int, folds: list[str], seed: int, steps: int | None,
             device: str, checkpoint: str = "checkpoint_final.pth") -> None:
    import torch

    from nndiff.inference.predictor import SAMPLE_PREFIX
    from nndiff.inference.registry import predictor_class_for

    folds_arg = "all" if folds == ["all"] else tuple(int(f) for f in folds)
    trainer = Path(model_dir).name.split("__")[0]
    predictor = predictor_class_for(trainer).from_model_folder(model_dir, folds=folds_arg, device=device,
                                                               checkpoint=checkpoint, num_steps=steps)
    sizes = predictor.generation_shape("patch")
    case_json = predictor.generated_geometry(sizes)
    arrays, properties, start_time = [], None, time.perf_counter()
    for start in range(0, num_samples, predictor.batch_size):
        count = min(predictor.batch_size, num_samples - start)
        generator = predictor.make_generator(seed, f"{SAMPLE_PREFIX}_{start:04d}")  # as generate_to_folder
        with torch.no_grad():
            batch = predictor.generate(count, generator, sizes).float().cpu().numpy()
        for sample in batch:
            grid = sample[:, None] if predictor.is_2d else sample
            array, properties = predictor.invert(grid, case_json)
            arrays.append(np.asarray(array, dtype=np.float32))
    seconds = time.perf_counter() - start_time
    info = {"model_dir": str(model_dir), "checkpoint": checkpoint, "folds": folds, "seed": seed, "num_samples": num_samples,
            "sampler": predictor.sampler_name, "num_steps": predictor.num_steps, "device": str(predictor.device),
            "shape": sizes, "properties": properties.to_json(), "file_ending": predictor.file_ending,
            "seconds": round(seconds, 2)}
    np.savez_compressed(out, samples=np.stack(arrays), info=json.dumps(info))
    print(json.dumps({k: v for k, v in info.items() if k != "properties"}))


def write(npz: str, out_dir: str) -> None:
    """Write the samples of ``npz`` as ``sample_XXXX{ending}`` files, as nndiff_predict names them."""
    from nndiff.dataset.io import ImageProperties
    from nndiff.inference.files import write_output

    data = np.load(npz)
    info = json.loads(str(data["info"]))
    properties = ImageProperties.from_json(info["properties"])
    for index, sample in enumerate(data["samples"]):
        write_output(sample, properties, Path(out_dir), f"sample_{index:04d}", info["file_ending"])
    print(f"wrote {len(data['samples'])} sample(s) to {out_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("out", nargs="?")
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("-f", nargs="+", default=["0"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("-device", default="auto")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--write", nargs=2, metavar=("NPZ", "DIR"))
    args = parser.parse_args(argv)
    if args.write:
        write(args.write[0], args.write[1])
    else:
        generate(args.model_dir, args.out, args.n, args.f, args.seed, args.steps, args.device, args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
