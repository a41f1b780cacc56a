"""Training block validation, lr schedule, EMA, RNG state round trip, trainer registry."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from nndiff.errors import NnDiffError, PlansError
from nndiff.training import TRAINERS, get_trainer_class, parse_training_settings, register_trainer, total_iterations
from nndiff.training import registry as registry_module
from nndiff.training.config import DEFAULTS, compile_requested, default_num_workers
from nndiff.training.optim import ema_decay_at, effective_warmup, learning_rate, update_ema
from nndiff.training.rng import capture_rng_state, isolated_rng, restore_rng_state
from nndiff.training.checkpoint import plans_hash
from training_helpers import TinyTrainer


def test_training_block_defaults_and_problems_listed_together():
    assert parse_training_settings(None) == DEFAULTS
    settings = parse_training_settings({"num_epochs": 2, "initial_lr": 1, "lr_decay": "poly"})
    assert settings.num_epochs == 2 and settings.initial_lr == 1.0 and isinstance(settings.initial_lr, float)
    with pytest.raises(PlansError) as info:
        parse_training_settings({"num_epoch": 3, "lr_decay": "step", "ema_decay": 1.0, "num_epochs": 0,
                                 "ema_warmup": 1})
    message = str(info.value)
    assert message.startswith("5 problem(s)")
    assert "training.num_epoch: is not a known training key" in message
    assert "training.lr_decay: unknown value 'step'. Fix: use one of: cosine, poly, constant" in message
    assert "training.ema_decay: must be a number in [0, 1)" in message
    assert "training.num_epochs: must be an integer >= 1" in message
    assert "training.ema_warmup: must be true or false" in message


def test_total_iterations_rules():
    settings = parse_training_settings({"num_epochs": 10, "num_iterations_per_epoch": 5})
    assert total_iterations(settings) == 50
    assert total_iterations(settings, epochs=3) == 15
    assert total_iterations(settings, iterations=7) == 7
    assert total_iterations(settings, epochs=1, iterations=7) == 5
    with pytest.raises(NnDiffError, match="--epochs must be a positive integer"):
        total_iterations(settings, epochs=0)


def test_environment_switches():
    assert compile_requested("cuda", {}) and not compile_requested("cpu", {})
    assert not compile_requested("cuda", {"nnDiff_compile": "0"})
    assert compile_requested("cpu", {"nnDiff_compile": "1"})
    with pytest.raises(NnDiffError, match="nnDiff_compile"):
        compile_requested("cuda", {"nnDiff_compile": "maybe"})
    assert default_num_workers("cpu", {}) == 0
    assert default_num_workers("cuda", {"nnDiff_n_proc_DA": "3"}) == 3
    with pytest.raises(NnDiffError, match="nnDiff_n_proc_DA"):
        default_num_workers("cpu", {"nnDiff_n_proc_DA": "-1"})


def test_learning_rate_warmup_then_decay():
    settings = parse_training_settings({"initial_lr": 1.0, "warmup_iterations": 10})
    total = 110
    assert effective_warmup(settings, total) == 10
    assert [learning_rate(i, total, settings) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert learning_rate(10, total, settings) == pytest.approx(1.0)
    assert learning_rate(60, total, settings) == pytest.approx(0.5)  # half way through the cosine
    assert learning_rate(110, total, settings) == pytest.approx(0.0, abs=1e-12)
    poly = parse_training_settings({"initial_lr": 1.0, "warmup_iterations": 10, "lr_decay": "poly"})
    assert learning_rate(60, total, poly) == pytest.approx(0.5 ** 0.9)
    # warmup is capped at 10 % of a short run
    assert effective_warmup(settings, 30) == 3


def test_ema_update_and_decay_warmup():
    assert ema_decay_at(0, 0.999, True) == pytest.approx(0.1)
    assert ema_decay_at(10**6, 0.999, True) == 0.999 and ema_decay_at(0, 0.999, False) == 0.999
    model, ema = nn.Linear(2, 1), nn.Linear(2, 1)
    model.register_buffer("counter", torch.tensor(5.0))
    ema.register_buffer("counter", torch.tensor(0.0))
    expected = 0.75 * ema.weight.detach().clone() + 0.25 * model.weight.detach()
    update_ema(ema, model, 0.75)
    assert torch.allclose(ema.weight, expected) and ema.counter.item() == 5.0


def test_rng_state_round_trip_and_isolation():
    state = capture_rng_state()
    draws = (random.random(), np.random.random(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == draws
    restore_rng_state(state)
    with isolated_rng(torch.device("cpu")):
        random.random(), np.random.random(), torch.rand(3)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == draws


def test_plans_hash_ignores_other_configurations_and_reasons():
    plans = {"plans_name": "p", "normalization": {"a": 1}, "configurations": {"x": {"batch_size": 2}}}
    base = plans_hash(plans, {"batch_size": 2, "reasons": {"batch_size": "why"}})
    more = {**plans, "configurations": {"x": {"batch_size": 2}, "y": {"batch_size": 9}}}
    assert plans_hash(more, {"batch_size": 2}) == base
    assert plans_hash(plans, {"batch_size": 3}) != base
    assert plans_hash({**plans, "normalization": {"a": 2}}, {"batch_size": 2}) != base


def test_registry_lookup_and_entry_points(monkeypatch):
    monkeypatch.setattr(registry_module, "TRAINERS", dict(TRAINERS))
    monkeypatch.setattr(registry_module, "TRAINER_MODULES", ())  # other families' modules are not under test
    register_trainer(TinyTrainer)
    assert get_trainer_class("TinyTrainer") is TinyTrainer
    register_trainer(TinyTrainer)  # same class again is fine
    with pytest.raises(ValueError, match="already registered"):
        register_trainer(type("TinyTrainer", (TinyTrainer,), {}))
    with pytest.raises(TypeError, match="not a subclass"):
        register_trainer(int)

    class FakeEntryPoint:
        name = "PluginTrainer"

        def load(self):
            return type("PluginTrainer", (TinyTrainer,), {})

    monkeypatch.setattr(registry_module.metadata, "entry_points",
                        lambda group: [FakeEntryPoint()] if group == "nndiff.trainers" else [])
    plugin = get_trainer_class("PluginTrainer")
    assert plugin.__name__ == "PluginTrainer" and registry_module.TRAINERS["PluginTrainer"] is plugin
    with pytest.raises(NnDiffError, match=r"unknown trainer 'Nope'. Available: .*PluginTrainer.*TinyTrainer"):
        get_trainer_class("Nope")


def test_family_module_with_broken_import_is_not_hidden(monkeypatch):
    monkeypatch.setattr(registry_module, "TRAINER_MODULES", ("nndiff.training.does_not_exist",))
    with pytest.raises(NnDiffError, match="unknown trainer"):
        get_trainer_class("Missing")  # an absent family module is skipped

    def broken(name):
        raise ModuleNotFoundError("No module named 'somedep'", name="somedep")

    monkeypatch.setattr(registry_module.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="somedep"):
        get_trainer_class("Missing")
