"""Orthogonal mid-slices and statistics of generated 3D volumes, small enough to come back from the GPU.

Full-size samples (the MNI152 volume: 100×181×145 float32, ~10 MB each, noise-like and barely
compressible) soon pass the device tool's 16 MiB per returned file, so the kit keeps them on the GPU
machine and brings back this preview: one PNG row per volume (axial, coronal,
sagittal mid-slices) and one JSON with shape, spacing and intensity statistics per volume.

    python benchmarks/volume_preview.py SAMPLES_DIR OUT.png [--reference IMAGE.npz]

``--reference`` adds a row of a real volume (e.g. a held-out case) and its statistics for comparison.
No SimpleITK: the files are read with nndiff's numpy reader (``.npz`` / ``.npy`` with sidecar).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def volume_stats(array: np.ndarray) -> dict:
    """Shape and intensity statistics of one (Z, Y, X) volume; ``foreground``: share of voxels above 10 %
    of the 99.5th percentile (a rough brain-vs-background split for comparing samples with real data)."""
    a = np.asarray(array, dtype=np.float64)
    high = float(np.percentile(a, 99.5))
    return {"shape": list(a.shape), "min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()),
            "std": float(a.std()), "p99_5": high, "foreground": float((a > 0.1 * high).mean()) if high > 0 else 0.0}


def mid_slices(array: np.ndarray) -> list[np.ndarray]:
    z, y, x = (s // 2 for s in array.shape)
    return [array[z], array[:, y], array[:, :, x]]


def preview(files: list[Path], out_png: Path, titles: list[str]) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nndiff.dataset.io import read_file

    stats: dict = {}
    fig, axes = plt.subplots(len(files), 3, figsize=(9, 3 * len(files)), squeeze=False)
    for row, (path, title) in enumerate(zip(files, titles)):
        array, props = read_file(path)
        if array.ndim != 4 or array.shape[1] == 1:
            raise SystemExit(f"volume_preview: {path} is not a 3D volume (array shape {array.shape}); "
                             "give a folder of 3D samples")
        volume = array[0]
        stats[title] = {**volume_stats(volume), "spacing": list(props.spacing)}
        high = stats[title]["p99_5"] or 1.0
        for col, (plane, name) in enumerate(zip(mid_slices(volume), ("axial", "coronal", "sagittal"))):
            ax = axes[row][col]
            ax.imshow(plane, cmap="gray", vmin=0.0, vmax=high, origin="lower")
            ax.set_title(f"{title} {name}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples_dir", type=Path, help="folder of generated volumes (sample_*.npz / .npy)")
    parser.add_argument("out_png", type=Path, help="PNG to write; the statistics go beside it as .json")
    parser.add_argument("--reference", type=Path, default=None, help="a real volume shown in the last row")
    args = parser.parse_args(argv)
    files = sorted(p for p in args.samples_dir.glob("sample_*") if p.suffix in (".npz", ".npy"))
    if not files:
        print(f"volume_preview: no sample_*.npz / .npy in {args.samples_dir}; generate samples first", file=sys.stderr)
        return 1
    titles = [p.name.split(".")[0] for p in files]
    if args.reference is not None:
        files.append(args.reference)
        titles.append("reference")
    stats = preview(files, args.out_png, titles)
    args.out_png.with_suffix(".json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
