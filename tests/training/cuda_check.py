"""Manual check of the Trainer base's CUDA path (not collected by pytest; CI has no GPU).

    python tests/training/cuda_check.py [OUT_DIR]

Trains a small conv denoiser on a synthetic 2D dataset on CUDA with the defaults there
(bf16 autocast, torch.compile, fused AdamW, multi-process batchgenerators loading), stops and
continues, and prints timings, the precision used and how far the resumed weights are from an
uninterrupted run. Also runs fp16 (gradient scaler) and the nnDiff_compile=0 switch briefly.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from training_helpers import TinyTrainer, make_dataset, make_plans, make_trainer  # noqa: E402


class WiderTrainer(TinyTrainer):
    def build_network(self) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
                             nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
                             nn.Conv2d(64, 1, 3, padding=1))


def max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    assert torch.cuda.is_available(), "needs a CUDA device"
    data = make_dataset(out / "preprocessed", num_cases=16, shape=(8, 64, 64))
    plans = make_plans(patch_size=(64, 64), batch_size=32, num_iterations_per_epoch=50, num_epochs=4,
                       initial_lr=1e-3, augmentation="mild", num_val_cases=8, progress_every_epochs=2)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    started = time.perf_counter()
    straight = make_trainer(WiderTrainer, plans, data, out / "straight", device="cuda", num_workers=4)
    straight.run_training()
    report["straight_s"] = time.perf_counter() - started
    report["precision"] = str(straight.autocast_dtype)
    report["compile"] = straight.use_compile
    report["history_train_loss"] = straight.history.columns["train_loss"]
    report["history_val_loss"] = straight.history.columns["val_loss"]
    report["epoch_time_s"] = straight.history.columns["epoch_time_s"]

    first = make_trainer(WiderTrainer, plans, data, out / "resumed", device="cuda", num_workers=4)
    first.run_training(stop_after_iterations=70)
    resumed = make_trainer(WiderTrainer, plans, data, out / "resumed", device="cuda", num_workers=4)
    resumed.run_training(continue_training=True)
    report["resume_iterations"] = [first.iteration, resumed.iteration]
    report["resume_max_abs_diff_weights"] = max_diff(straight.network, resumed.network)
    report["resume_max_abs_diff_ema"] = max_diff(straight.ema_network, resumed.ema_network)

    fp16 = make_trainer(WiderTrainer, {**plans}, data, out / "fp16", device="cuda", num_workers=0, iterations=20)
    fp16.settings = fp16.settings.__class__(**{**fp16.settings.to_dict(), "precision": "fp16"})
    from nndiff.training.devices import resolve_precision

    fp16.autocast_dtype, fp16._needs_scaler = resolve_precision("fp16", fp16.device)
    fp16.run_training()
    report["fp16_scaler"] = fp16.grad_scaler is not None
    report["fp16_last_loss"] = fp16.history.last("train_loss")

    os.environ["nnDiff_compile"] = "0"
    nocompile = make_trainer(WiderTrainer, plans, data, out / "nocompile", device="cuda", num_workers=0,
                             iterations=20)
    report["nnDiff_compile=0 -> compile"] = nocompile.use_compile
    nocompile.run_training()
    report["sim_itk_imported"] = "SimpleITK" in sys.modules
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
