"""The Trainer base: everything of training that does not depend on diffusion math.

A family trainer (generation, translation, ..., or a non-diffusion one such as a classifier or a
segmentation baseline) subclasses :class:`Trainer` and overrides a few hooks:

- :meth:`Trainer.compute_loss` (required): ``(network, batch, train, generators) -> (loss, logs)``;
- :meth:`Trainer.build_network` (default: ``nndiff.networks.build_network`` from the plan);
- :meth:`Trainer.make_batch` (numpy batch -> tensors on the device; add labels, conditions, ...);
- :meth:`Trainer.validation_step`, :meth:`Trainer.on_epoch_end` (e.g. sample grids),
  :meth:`Trainer.on_train_start` / :meth:`Trainer.on_train_end`;
- :meth:`Trainer.checkpoint_extra_state` / :meth:`Trainer.load_extra_state`.

Behaviour (folders, checkpoints, resume, splits, logging, environment switches) is documented
in ``documentation/training.md``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

import nndiff
from nndiff.errors import NnDiffError, PlansError
from nndiff.training import checkpoint as ckpt
from nndiff.training.config import (TrainingSettings, compile_requested, default_num_workers,
                                    parse_training_settings, total_iterations)
from nndiff.training.data import (BatchStream, CaseStore, SamplingSpec, ValidationItem, build_validation_set,
                                  list_cases, load_case_json, validation_batches)
from nndiff.training.optim import (build_adamw, ema_decay_at, learning_rate, make_ema_copy, set_learning_rate,
                                   update_ema)
from nndiff.training.progress import TrainingHistory, plot_progress
from nndiff.training.rng import capture_rng_state, isolated_rng, restore_rng_state, seed_everything, torch_generator
from nndiff.training.splits import FOLD_ALL, fold_cases, load_or_create_splits
from nndiff.utils.files import load_json, save_json
from nndiff.planning import resolve_configuration
from nndiff.training.devices import resolve_device, resolve_precision

logger = logging.getLogger(__name__)

DEFAULT_SEED = 12345
METADATA_FILE = "metadata.json"


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def _finite(value: float) -> bool:
    return math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# The base class
# ----------------------------------------------------------------------------------------------
class Trainer:
    """Base trainer for one (dataset, plans, configuration, fold).

    Construction is cheap (reads the plan only); :meth:`initialize` finds the data, builds the
    splits, network, EMA copy and optimiser; :meth:`run_training` trains (and initialises first
    if needed).

    Parameters
    ----------
    plans: the plans dict (content of ``nnDiffPlans.json``).
    configuration: configuration name (``inherits_from`` is applied).
    fold: 0..4 or ``"all"``.
    preprocessed_dataset_dir: ``preprocessed/DatasetXXX_Name``.
    results_root: results root; the output folder is
        ``results_root/DatasetXXX_Name/<Trainer>__<Plans>__<config>/fold_N``. Or give ``output_dir``.
    device: ``auto``, ``cpu``, ``cuda`` or a torch.device.
    epochs / iterations: ``--epochs`` / ``--iterations`` overrides (see :func:`total_iterations`).
    seed: seeds python/numpy/torch and the data loader.
    num_workers: data-augmentation worker processes (None: :func:`default_num_workers`; 0 loads in
        this process, deterministic and enough for tests and CPU runs).
    metadata: case -> {key: value}; overrides what is found in the preprocessed folder.
    """

    #: Whether this trainer trains latent configurations (those with an ``autoencoder`` block);
    #: every other trainer refuses them.
    handles_latent_configurations: bool = False

    def __init__(self, plans: Mapping[str, Any], configuration: str, fold: int | str,
                 preprocessed_dataset_dir: str | Path, results_root: str | Path | None = None, *,
                 output_dir: str | Path | None = None, device: str | torch.device = "auto",
                 epochs: int | None = None, iterations: int | None = None, seed: int = DEFAULT_SEED,
                 num_workers: int | None = None,
                 metadata: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.plans = dict(plans)
        self.plans_name = str(plans.get("plans_name", "nnDiffPlans"))
        self.configuration_name = configuration
        self.configuration = resolve_configuration(plans, configuration)
        self._refuse_untrainable()
        self.fold: int | str = fold
        self.preprocessed_dataset_dir = Path(preprocessed_dataset_dir)
        self.dataset_name = self.preprocessed_dataset_dir.name
        self.settings: TrainingSettings = parse_training_settings(self.configuration.get("training"))
        self.total_iterations = total_iterations(self.settings, epochs, iterations)
        self.plans_hash = ckpt.plans_hash(self.plans, self.configuration)
        self.device = resolve_device(device)
        self.seed = int(seed)
        #: The command line that started this run (set by nndiff_train; None for API use).
        self.command: list[str] | None = None
        self.num_workers = default_num_workers(self.device.type) if num_workers is None else int(num_workers)
        self.batch_size = int(self.configuration.get("batch_size", 0))
        if self.batch_size < 1:
            raise PlansError(f"configuration {configuration!r} needs a batch_size >= 1, got "
                             f"{self.configuration.get('batch_size')!r}. Fix: re-run planning")
        self.spec = SamplingSpec(tuple(int(s) for s in self.configuration.get("patch_size", ())),
                                 int(self.configuration.get("spatial_dims", 0)), self.settings.augmentation)
        data_identifier = self.configuration.get("data_identifier") or f"{self.plans_name}_{configuration}"
        self.data_folder = self.preprocessed_dataset_dir / data_identifier
        if output_dir is None:
            if results_root is None:
                raise NnDiffError("the trainer needs results_root (or output_dir)")
            output_dir = (Path(results_root) / self.dataset_name /
                          f"{type(self).__name__}__{self.plans_name}__{configuration}" / f"fold_{fold}")
        self.output_dir = Path(output_dir)
        self._given_metadata = {k: dict(v) for k, v in (metadata or {}).items()}
        self.autocast_dtype, self._needs_scaler = resolve_precision(self.settings.precision, self.device)
        self.use_compile = compile_requested(self.device.type)

        # Filled by initialize() / training.
        self.initialized = False
        self.iteration = 0
        self.best_val_loss = math.inf
        self.history = TrainingHistory()
        self._reset_epoch_accumulator()
        self.log_file: Path | None = None
        self.case_metadata: dict[str, dict[str, Any]] = {}
        self.train_cases: list[str] = []
        self.val_cases: list[str] = []
        self.network: nn.Module
        self.train_network: nn.Module
        self.ema_network: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.grad_scaler: torch.amp.GradScaler | None = None
        self.store: CaseStore
        self.validation_items: list[ValidationItem] = []

    # ------------------------------------------------------------------------------------------
    # Hooks (override in families)
    # ------------------------------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        """The network to train. Default: ``nndiff.networks.build_network(configuration['network'])``."""
        try:
            from nndiff.networks import build_network  # type: ignore[attr-defined]
        except ImportError as err:
            raise NnDiffError("nndiff.networks.build_network is not available in this installation") from err
        if "network" not in self.configuration:
            raise PlansError(f"configuration {self.configuration_name!r} has no 'network' block. Fix: re-run planning")
        return build_network(self.configuration["network"])

    def build_optimizer(self, network: nn.Module) -> torch.optim.Optimizer:
        """AdamW with the plan's learning rate and weight decay."""
        return build_adamw(network.parameters(), self.settings, self.device)

    def make_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Numpy batch from the loader -> tensors on the device.

        Default: ``data`` and ``target`` float32, ``seg`` int64; ``keys`` (case identifiers) kept.
        Families add what their network needs (class labels from :attr:`case_metadata`, ...).
        """
        out: dict[str, Any] = {"keys": list(batch["keys"])}
        for key in ("data", "target"):
            if key in batch:
                out[key] = torch.from_numpy(np.ascontiguousarray(batch[key])).to(self.device, non_blocking=True)
        if "seg" in batch:
            out["seg"] = torch.from_numpy(batch["seg"].astype(np.int64)).to(self.device, non_blocking=True)
        return out

    def compute_loss(self, network: nn.Module, batch: Mapping[str, Any], *, train: bool,
                     generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss (mean over the batch) and extra values to log (floats or 0-d tensors).

        ``network``: the module to run (the possibly compiled training network, or the EMA copy
        in validation). ``generators``: in validation one seeded generator per sample; draw that
        sample's random numbers (e.g. t and noise) from its generator so the validation loss is
        comparable across epochs (see :func:`per_sample`). ``None`` in training: use the global
        RNG (its state is checkpointed).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss()")

    def validation_step(self, batch: Mapping[str, Any], generators: Sequence[torch.Generator]) -> dict[str, float]:
        """Validation values of one fixed batch; ``loss`` selects the best checkpoint."""
        loss, logs = self.compute_loss(self.validation_network, batch, train=False, generators=generators)
        return {"loss": float(loss), **{k: float(v) for k, v in logs.items()}}

    def on_train_start(self) -> None:
        """Called once per :meth:`run_training` call, after initialisation/resume."""

    def on_epoch_end(self, epoch: int, record: Mapping[str, float]) -> None:
        """Called after each epoch's validation (e.g. to write a sample grid).

        Runs inside :func:`isolated_rng`: random draws here do not change the training stream.
        """

    def on_train_end(self) -> None:
        """Called after the final checkpoint is written."""

    def checkpoint_extra_state(self) -> dict[str, Any]:
        """Family state to store in checkpoints (tensors, lists, numbers, strings only)."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_extra_state`."""

    # ------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------
    @property
    def validation_network(self) -> nn.Module:
        """The weights validation and sampling use: the EMA copy."""
        return self.ema_network

    def is_progress_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) writes progress.png; families write sample grids then too."""
        return (epoch + 1) % self.settings.progress_every_epochs == 0

    def _refuse_untrainable(self) -> None:
        if "autoencoder" in self.configuration and not self.handles_latent_configurations:
            raise PlansError(f"configuration {self.configuration_name!r} is a latent configuration (it has an "
                             f"'autoencoder' block), which {type(self).__name__} does not train: it would train "
                             "a pixel-space network on the wrong grid. Fix: drop -tr to use the family's latent trainer "
                             "(LatentDiffusionTrainer for generation, LatentAnomalyDDPMTrainer for anomaly "
                             "detection), or train a pixel configuration (2d / 3d_fullres)")
        if self.configuration.get("trainable", True) is False:
            status = self.configuration.get("status", "not trainable")
            raise PlansError(f"configuration {self.configuration_name!r} cannot be trained: {status}")

    def initialize(self) -> None:
        """Find cases and splits, seed everything, build network, EMA, optimizer, validation set."""
        if self.initialized:
            return
        case_ids = list_cases(self.data_folder)
        self.case_metadata = self._load_metadata(case_ids)
        splits = load_or_create_splits(self.preprocessed_dataset_dir, case_ids, self.case_metadata)
        self.train_cases, self.val_cases = fold_cases(splits, self.fold, case_ids)
        self.store = CaseStore(self.data_folder)
        seed_everything(self.seed)
        self._setup_device()
        self.network = self.build_network().to(self.device)
        self.ema_network = make_ema_copy(self.network)
        self.optimizer = self.build_optimizer(self.network)
        self.grad_scaler = torch.amp.GradScaler("cuda") if self._needs_scaler else None
        self.train_network = torch.compile(self.network) if self.use_compile else self.network
        self.validation_items = build_validation_set(self.store, self.val_cases, self.spec, self.seed,
                                                     self.settings.num_val_cases)
        self.initialized = True

    def _setup_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # Fixed patch shapes: let cuDNN pick the fastest kernels; TF32 for fp32 matmuls.
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _load_metadata(self, case_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Case metadata: ``metadata.json`` in the preprocessed dataset folder, then each
        ``CASE.json``'s ``metadata`` entry, then the ``metadata`` argument (later wins)."""
        merged: dict[str, dict[str, Any]] = {case: {} for case in case_ids}
        dataset_file = self.preprocessed_dataset_dir / METADATA_FILE
        if dataset_file.is_file():
            for case, values in load_json(dataset_file).items():
                if case in merged and isinstance(values, dict):
                    merged[case].update(values)
        for case in case_ids:
            values = load_case_json(self.data_folder, case).get("metadata")
            if isinstance(values, dict):
                merged[case].update(values)
        for case, values in self._given_metadata.items():
            if case in merged:
                merged[case].update(values)
        return merged

    # ------------------------------------------------------------------------------------------
    # Training loop
    # ------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on CUDA, nothing on CPU."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def run_training(self, continue_training: bool = False, stop_after_iterations: int | None = None,
                     time_limit_s: float | None = None) -> None:
        """Train until ``total_iterations``.

        ``continue_training`` (``--continue``): resume from ``checkpoint_latest.pth`` (else
        ``checkpoint_final.pth``); without a checkpoint training starts from scratch (logged).
        ``stop_after_iterations`` / ``time_limit_s``: stop this call early (after that many
        iterations, or at the first iteration past the time limit), writing
        ``checkpoint_latest.pth``; a later call with ``continue_training`` goes on exactly as an
        uninterrupted run would.
        """
        self.initialize()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._open_log()
        try:
            if continue_training:
                self._resume()
            elif any((self.output_dir / n).exists() for n in (ckpt.LATEST, ckpt.FINAL)):
                self.log("checkpoints exist in this folder; starting from scratch (use --continue to resume)")
            self._write_debug_json(continue_training)
            self._log_start()
            self.on_train_start()
            if self.iteration >= self.total_iterations:
                self.log(f"training already complete ({self.iteration} of {self.total_iterations} iterations)")
                if not (self.output_dir / ckpt.FINAL).exists():
                    self._finish()
                return
            self._loop(stop_after_iterations, time_limit_s)
        except NnDiffError as err:
            self.log(f"ERROR: {err}", level=logging.ERROR)
            raise

    def _loop(self, stop_after_iterations: int | None, time_limit_s: float | None) -> None:
        stop_at = None if stop_after_iterations is None else self.iteration + int(stop_after_iterations)
        deadline = None if time_limit_s is None else time.monotonic() + float(time_limit_s)
        ipe = self.settings.num_iterations_per_epoch
        bar = None
        stream = BatchStream(self.store, self.train_cases, self.spec, self.batch_size, self.seed,
                             start_iteration=self.iteration, num_workers=self.num_workers)
        try:
            while self.iteration < self.total_iterations:
                if bar is None:
                    bar = self._progress_bar()
                started = time.monotonic()
                self.train_iteration(next(stream))
                self._epoch_acc["time_s"] += time.monotonic() - started
                bar.update(1)
                bar.set_postfix(loss=f"{self._epoch_acc['last_loss']:.4g}", refresh=False)
                if self.iteration % ipe == 0 or self.iteration == self.total_iterations:
                    bar.close()
                    bar = None
                    self._end_epoch()
                if self.iteration < self.total_iterations and self._should_stop(stop_at, deadline):
                    self._save(ckpt.LATEST)
                    self._plot()
                    self.log(f"stopped after iteration {self.iteration} of {self.total_iterations}; "
                             f"resume with --continue")
                    return
            self._finish()
        finally:
            if bar is not None:
                bar.close()
            stream.close()

    def _should_stop(self, stop_at: int | None, deadline: float | None) -> bool:
        return (stop_at is not None and self.iteration >= stop_at) or (
            deadline is not None and time.monotonic() >= deadline)

    def _progress_bar(self):
        from tqdm.auto import tqdm

        ipe = self.settings.num_iterations_per_epoch
        epoch = self.iteration // ipe
        end = min((epoch + 1) * ipe, self.total_iterations)
        # disable=None: tqdm switches itself off when stderr is not a terminal (logs, CI).
        return tqdm(total=end - epoch * ipe, initial=self.iteration - epoch * ipe, desc=f"epoch {epoch}",
                    disable=None, leave=False, dynamic_ncols=True)

    def train_iteration(self, numpy_batch: Mapping[str, Any]) -> float:
        """One optimizer step on one loader batch; returns the loss.

        Order: lr for this iteration, forward, backward, gradient clipping, then one check of
        loss and gradient norm; only finite values reach the optimizer, EMA and checkpoints.
        """
        batch = self.make_batch(numpy_batch)
        lr = learning_rate(self.iteration, self.total_iterations, self.settings)
        set_learning_rate(self.optimizer, lr)
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, logs = self.compute_loss(self.train_network, batch, train=True, generators=None)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), max_norm)
        loss_value, norm_value = (float(v) for v in torch.stack([loss.detach().float(), grad_norm.float()]).tolist())
        if not _finite(loss_value):
            raise self._nonfinite_error("loss", loss_value, lr, numpy_batch)
        # fp16: an inf gradient norm is the scaler's business (it skips the step and lowers the scale).
        if not _finite(norm_value) and self.grad_scaler is None:
            raise self._nonfinite_error("gradient norm", norm_value, lr, numpy_batch)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        update_ema(self.ema_network, self.network,
                   ema_decay_at(self.iteration, self.settings.ema_decay, self.settings.ema_warmup))
        self.iteration += 1
        self._accumulate(loss_value, norm_value, lr, logs)
        return loss_value

    def _nonfinite_error(self, what: str, value: float, lr: float, numpy_batch: Mapping[str, Any]) -> NnDiffError:
        keys = list(numpy_batch.get("keys", []))
        bad_input = [k for k in ("data", "target") if k in numpy_batch and not np.all(np.isfinite(numpy_batch[k]))]
        if bad_input:
            hint = (f"the batch itself contains NaN/Inf in {bad_input} (cases: {', '.join(keys)}): "
                    "check and re-run preprocessing for these cases")
        else:
            hint = (f"lower initial_lr in the plans' training block (now {self.settings.initial_lr:g}, lr at this "
                    f"step {lr:.3g}), set grad_clip, or check the preprocessed data (cases in this batch: "
                    f"{', '.join(keys)})")
        last = next((n for n in (ckpt.LATEST, ckpt.FINAL) if (self.output_dir / n).exists()), None)
        where = f"the last good checkpoint is {self.output_dir / last}" if last else "no checkpoint was written yet"
        return NnDiffError(
            f"training stopped: the {what} is {value} at iteration {self.iteration + 1} "
            f"(epoch {self.iteration // self.settings.num_iterations_per_epoch}). The weights were not updated "
            f"and no checkpoint was written for this step; {where}. Fix: {hint}")

    # ------------------------------------------------------------------------------------------
    # Epoch bookkeeping
    # ------------------------------------------------------------------------------------------
    def _reset_epoch_accumulator(self) -> None:
        self._epoch_acc: dict[str, Any] = {"loss_sum": 0.0, "count": 0, "grad_norm_sum": 0.0, "lr": math.nan,
                                           "time_s": 0.0, "last_loss": math.nan, "logs": {}}

    def _accumulate(self, loss: float, grad_norm: float, lr: float, logs: Mapping[str, Any]) -> None:
        acc = self._epoch_acc
        acc["loss_sum"] += loss
        acc["grad_norm_sum"] += grad_norm if _finite(grad_norm) else 0.0
        acc["count"] += 1
        acc["lr"] = lr
        acc["last_loss"] = loss
        for key, value in logs.items():
            acc["logs"][key] = acc["logs"].get(key, 0.0) + float(value)

    def validate(self) -> dict[str, float]:
        """Mean validation values over the fixed validation items (EMA weights, no grad).

        Each item's generator is re-created from its seed, so the same (t, noise) pairs are used
        every epoch.
        """
        if not self.validation_items:
            return {"loss": math.nan}
        network = self.validation_network
        was_training = network.training
        network.eval()
        sums: dict[str, float] = {}
        count = 0
        with torch.no_grad(), self.autocast():
            for numpy_batch, seeds in validation_batches(self.validation_items, self.batch_size):
                batch = self.make_batch(numpy_batch)
                generators = [torch_generator(s, self.device) for s in seeds]
                values = self.validation_step(batch, generators)
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * len(seeds)
                count += len(seeds)
        network.train(was_training)
        return {k: v / count for k, v in sums.items()}

    def _end_epoch(self) -> None:
        ipe = self.settings.num_iterations_per_epoch
        epoch = (self.iteration - 1) // ipe
        acc = self._epoch_acc
        count = max(1, acc["count"])
        val = self.validate()
        record = {"epoch": epoch, "iteration": self.iteration, "train_loss": acc["loss_sum"] / count,
                  "val_loss": val.get("loss", math.nan), "lr": acc["lr"], "epoch_time_s": acc["time_s"],
                  "grad_norm": acc["grad_norm_sum"] / count}
        record.update({f"train_{k}": v / count for k, v in acc["logs"].items()})
        record.update({f"val_{k}": v for k, v in val.items() if k != "loss"})
        self.history.append(record)
        self.log(f"epoch {epoch}: iteration {self.iteration}/{self.total_iterations}, train loss "
                 f"{record['train_loss']:.5g}, val loss {record['val_loss']:.5g}, lr {record['lr']:.3g}, "
                 f"{record['epoch_time_s']:.1f} s")
        if _finite(record["val_loss"]) and record["val_loss"] < self.best_val_loss:
            self.best_val_loss = record["val_loss"]
            self._save(ckpt.BEST)
            self.log(f"new best val loss {self.best_val_loss:.5g}: wrote {ckpt.BEST}")
        with isolated_rng(self.device):
            self.on_epoch_end(epoch, record)
        self._reset_epoch_accumulator()
        if (epoch + 1) % self.settings.checkpoint_every_epochs == 0:
            self._save(ckpt.LATEST)
        if self.is_progress_epoch(epoch):
            self._plot()

    def _finish(self) -> None:
        self._save(ckpt.FINAL)
        self._save(ckpt.LATEST)
        self._plot()
        self.log(f"training finished after {self.iteration} iterations; best val loss {self.best_val_loss:.5g}")
        self.on_train_end()

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resume needs, as tensors/lists/numbers (loads with weights_only=True)."""
        return {
            "format": ckpt.CHECKPOINT_FORMAT,
            "nndiff_version": nndiff.__version__,
            "trainer_class": type(self).__name__,
            "plans_hash": self.plans_hash,
            "plans_name": self.plans_name,
            "configuration": self.configuration_name,
            "fold": str(self.fold),
            "iteration": self.iteration,
            "epoch": self.iteration // self.settings.num_iterations_per_epoch,
            "total_iterations": self.total_iterations,
            "network_weights": ckpt.strip_compile_prefix(self.network.state_dict()),
            "ema_weights": self.ema_network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": None if self.grad_scaler is None else self.grad_scaler.state_dict(),
            "rng_state": capture_rng_state(),
            "loader_state": {"seed": self.seed, "next_iteration": self.iteration},
            "history": self.history.state(),
            "epoch_accumulator": {**self._epoch_acc, "logs": dict(self._epoch_acc["logs"])},
            "best_val_loss": self.best_val_loss,
            "settings": self.settings.to_dict(),
            "extra": self.checkpoint_extra_state(),
        }

    def _save(self, name: str) -> None:
        ckpt.save_checkpoint(self.checkpoint_state(), self.output_dir / name)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the full training state from ``path`` (class and plans hash must match)."""
        path = Path(path)
        state = ckpt.load_checkpoint(path, map_location="cpu")
        ckpt.check_compatible(state, type(self).__name__, self.plans_hash, path)
        self.network.load_state_dict(state["network_weights"])
        self.ema_network.load_state_dict(state["ema_weights"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        if self.grad_scaler is not None and state.get("grad_scaler_state"):
            self.grad_scaler.load_state_dict(state["grad_scaler_state"])
        restore_rng_state(state["rng_state"])
        loader_seed = int(state["loader_state"]["seed"])
        if loader_seed != self.seed:
            self.log(f"using the checkpoint's seed {loader_seed} (this run was given {self.seed})")
            self.seed = loader_seed
            self.validation_items = build_validation_set(self.store, self.val_cases, self.spec, self.seed,
                                                         self.settings.num_val_cases)
        self.iteration = int(state["loader_state"]["next_iteration"])
        self.history = TrainingHistory(state["history"])
        self._epoch_acc = {**state["epoch_accumulator"], "logs": dict(state["epoch_accumulator"]["logs"])}
        self.best_val_loss = float(state["best_val_loss"])
        self.load_extra_state(state.get("extra", {}))

    def _resume(self) -> None:
        for name in (ckpt.LATEST, ckpt.FINAL):
            path = self.output_dir / name
            if path.is_file():
                self.load_checkpoint(path)
                self.log(f"continuing from {path} at iteration {self.iteration}")
                return
        self.log("--continue: no checkpoint in this folder; starting a new training", level=logging.WARNING)

    # ------------------------------------------------------------------------------------------
    # Outputs: log file, debug.json, progress.png
    # ------------------------------------------------------------------------------------------
    def _open_log(self) -> None:
        if self.log_file is None:
            stamp = _dt.datetime.now().strftime("%Y_%m_%d_%H_%M_%S")
            self.log_file = self.output_dir / f"training_log_{stamp}.txt"

    def log(self, message: str, level: int = logging.INFO) -> None:
        """Write a timestamped line to the training log file and to the module logger."""
        logger.log(level, message)
        if self.log_file is not None:
            stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(f"{stamp}: {message}\n")

    def _log_start(self) -> None:
        self.log(f"{type(self).__name__} on {self.dataset_name}, configuration {self.configuration_name}, "
                 f"fold {self.fold}: {len(self.train_cases)} training / {len(self.val_cases)} validation cases, "
                 f"{self.total_iterations} iterations ({self.settings.num_iterations_per_epoch} per epoch), "
                 f"device {self.device}, precision {self.autocast_dtype or torch.float32}, "
                 f"compile {self.use_compile}, {self.num_workers} loader worker(s)")
        if self.device.type == "cuda" and not self.use_compile:
            # the planner's memory estimate is calibrated on compiled steps (planning/memory.py)
            self.log("torch.compile is off: the planned patch and batch size assume a compiled training step, "
                     "which keeps about half the activations of eager PyTorch; if CUDA runs out of memory, "
                     "turn compile back on (unset nnDiff_compile) or lower batch_size in an inherits_from "
                     "configuration (documentation/training.md)", level=logging.WARNING)
        if self.fold == FOLD_ALL:
            self.log("fold 'all': validating on the training cases; the validation loss measures fit, "
                     "not generalisation")

    def debug_info(self) -> dict[str, Any]:
        """The settings of this run (written to ``debug.json``)."""
        return {
            "trainer_class": type(self).__name__,
            "command": self.command,
            "dataset": self.dataset_name,
            "plans_name": self.plans_name,
            "configuration": self.configuration_name,
            "fold": self.fold,
            "seed": self.seed,
            "device": str(self.device),
            "precision": str(self.autocast_dtype or torch.float32),
            "grad_scaler": self.grad_scaler is not None,
            "compile": self.use_compile,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "patch_size": list(self.spec.patch_size),
            "spatial_dims": self.spec.spatial_dims,
            "total_iterations": self.total_iterations,
            "settings": self.settings.to_dict(),
            "num_train_cases": len(self.train_cases),
            "num_val_cases": len(self.val_cases),
            "num_validation_items": len(self.validation_items),
            "num_parameters": sum(p.numel() for p in self.network.parameters()),
            "plans_hash": self.plans_hash,
            "data_folder": str(self.data_folder),
            "output_dir": str(self.output_dir),
            "versions": {"nndiff": nndiff.__version__, "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "hostname": platform.node(),
        }

    def _write_debug_json(self, continue_training: bool) -> None:
        save_json({**self.debug_info(), "continue_training": continue_training,
                   "started": _dt.datetime.now().isoformat(timespec="seconds")}, self.output_dir / "debug.json")

    def _plot(self) -> None:
        if len(self.history):
            plot_progress(self.history, self.output_dir / "progress.png",
                          title=f"{type(self).__name__} {self.dataset_name} {self.configuration_name} fold {self.fold}")


# ----------------------------------------------------------------------------------------------
# Helper for families
# ----------------------------------------------------------------------------------------------
def per_sample(draw, generators: Sequence[torch.Generator] | None, batch_size: int) -> torch.Tensor:
    """Random values for a batch, drawn per sample from its own generator when there are generators.

    ``draw(n, generator)`` returns ``n`` rows (e.g. ``lambda n, g: noise_fn((n, C, *spatial),
    generator=g, device=device)``). Training (``generators=None``): one call for the batch from
    the global RNG. Validation: one call per sample with that sample's generator, so a sample's
    values do not depend on which other samples share its batch.
    """
    if generators is None:
        return draw(batch_size, None)
    if len(generators) != batch_size:
        raise ValueError(f"{len(generators)} generators for a batch of {batch_size}")
    return torch.cat([draw(1, g) for g in generators], dim=0)

