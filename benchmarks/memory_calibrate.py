"""Derive MemoryModel.activation_scale_2d/_3d from rows measured by benchmarks/memory_plan.py.

Each row holds the planner's estimate split into static (weights, AdamW, EMA), activations and
workspace, and the measured ``max_memory_reserved``. The activation part that the measurement
implies is ``reserved - static - workspace``; its ratio to the estimated activations (divided by
the scale the row was planned with) is that case's scale. The largest ratio per spatial
dimensionality is printed, so that every measured case stays within its budget when replanned.

    python benchmarks/memory_calibrate.py measure_compiled*.json   # prints ACT_SCALE_2D=.. ACT_SCALE_3D=..

(memory_plan.py writes measure_compiled.json for its default cases, measure_compiled_<cases>.json otherwise.)
"""
import json
import sys


def case_scale(row: dict) -> float:
    implied = row["reserved"] - row["static"] - row["workspace"]
    return implied / (row["act"] / row["activation_scale"])


def calibrate(rows: list[dict]) -> dict[int, float]:
    scales: dict[int, float] = {}
    for row in rows:
        dims = len(row["patch"])
        scales[dims] = max(scales.get(dims, 0.0), case_scale(row))
    return scales


if __name__ == "__main__":
    # autoencoder rows (":ae") have no UNet estimate parts: they do not calibrate the UNet model
    rows = [r for path in sys.argv[1:] for r in json.load(open(path)) if "static" in r and "reserved" in r]
    for row in rows:
        print(f"# {row['case']}: scale {case_scale(row):.3f}", file=sys.stderr)
    found = calibrate(rows)
    # round up to 0.01 so the replanned step stays within the measured bound
    print(" ".join(f"ACT_SCALE_{d}D={-(-found[d] * 100 // 1) / 100:.2f}" for d in sorted(found)))
