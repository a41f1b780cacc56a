"""Add the benchmark configurations of the MNI152 GPU runs to planned datasets' plans.

    python benchmarks/mni_configs.py PREPROCESSED_DIR gpu    # 2d_gpu (and 3d_latent_gpu)
    python benchmarks/mni_configs.py PREPROCESSED_DIR tiny   # 2d_tiny / 3d_latent_tiny: CPU dry run

Every ``Dataset*/nnDiffPlans.json`` under PREPROCESSED_DIR gets, beside its planned ``2d``
configuration, one that ``inherits_from`` it (documentation/benchmarks.md says why each key):

- ``2d_gpu``: batch 16, learning rate 2e-4 with 500 warm-up iterations, a progress plot every 4
  epochs (sessions 3-4); the planned network and patch.
- ``2d_tiny``: a 16-channel two-level UNet, batch 4, 2 epochs of 5 iterations: the whole pipeline
  (train, predict, evaluate) in about a minute on a CPU, to find crashes before device time is spent.

A dataset planned with ``3d_latent`` also gets ``3d_latent_gpu`` (its planned sizes, the same
learning-rate schedule, an autoencoder stage of 3 epochs) or ``3d_latent_tiny`` (an 8-channel autoencoder on 16×32×32 patches, a tiny
latent UNet). The configurations reuse the planned preprocessed data (same ``data_identifier``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

GPU_TRAINING = {"initial_lr": 2e-4, "warmup_iterations": 500, "progress_every_epochs": 4}
GPU_AUTOENCODER_EPOCHS = 3
TINY_NETWORK = {"model_channels": 16, "channel_mult": [1, 2], "strides": None, "num_res_blocks": 1,
                "attention_levels": [], "num_head_channels": 16, "norm_groups": 8, "dropout": 0.0}
TINY_TRAINING = {"num_iterations_per_epoch": 5, "num_epochs": 2, "num_val_cases": 2, "warmup_iterations": 2,
                 "progress_every_epochs": 1}


def tiny_network(dims: int) -> dict:
    return {**TINY_NETWORK, "strides": [[2] * dims]}


def added_configurations(plans: dict, scale: str) -> dict[str, dict]:
    configs = plans["configurations"]
    added: dict[str, dict] = {}
    if "2d" in configs:
        if scale == "gpu":
            added["2d_gpu"] = {"inherits_from": "2d", "batch_size": 16, "training": dict(GPU_TRAINING)}
        else:
            added["2d_tiny"] = {"inherits_from": "2d", "batch_size": 4, "patch_size": [64, 64],
                                "network": tiny_network(2), "diffusion": {"num_sampling_steps": 4},
                                "training": dict(TINY_TRAINING)}
    if "3d_latent" in configs:
        if scale == "gpu":
            # The planned autoencoder stage (100 epochs) would take the whole session: 3 epochs (750
            # iterations on the one training volume) leave the latent model >= 15 minutes in 2-3 calls.
            added["3d_latent_gpu"] = {"inherits_from": "3d_latent", "training": dict(GPU_TRAINING),
                                      "autoencoder": {"training": {"num_epochs": GPU_AUTOENCODER_EPOCHS}}}
        else:
            added["3d_latent_tiny"] = {
                "inherits_from": "3d_latent", "batch_size": 2, "patch_size": [8, 16, 16],
                "network": tiny_network(3), "diffusion": {"num_sampling_steps": 4},
                "training": dict(TINY_TRAINING),
                # The whole 1 mm volume (2.7 M voxels) in one encoder pass: exact-norm sliding windows
                # over ~200 tiles of 16x32x32 took over 8 minutes on two CPU cores.
                "max_decode_voxels": 4_000_000,
                "autoencoder": {"base_channels": 8, "channel_multipliers": [1, 1, 1], "patch_size": [16, 32, 32],
                                "batch_size": 2, "training": {"num_epochs": 2}},
            }
    return added


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("gpu", "tiny"):
        print(__doc__)
        return 2
    root = Path(argv[0])
    plans_files = sorted(root.glob("Dataset*/nnDiffPlans.json"))
    if not plans_files:
        print(f"mni_configs.py: no Dataset*/nnDiffPlans.json under {root}; run nndiff_plan_and_preprocess first")
        return 1
    for path in plans_files:
        plans = json.loads(path.read_text())
        added = added_configurations(plans, argv[1])
        plans["configurations"].update(added)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(plans, indent=2))
        tmp.replace(path)
        print(f"{path.parent.name}: {', '.join(added) or 'nothing to add'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
