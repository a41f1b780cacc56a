"""Checks of benchmarks/train_throughput.py that need no MONAI (CI does not install it).

The MONAI side (width match, both models trained) is checked by hand with
``python benchmarks/train_throughput.py --device cpu --tiny`` (documentation/benchmarks.md).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from nndiff.networks import build_network, count_parameters
from nndiff.planning import plan_experiment

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def load_benchmark(monkeypatch: pytest.MonkeyPatch):
    """The benchmark module, imported from its file with MONAI made unimportable."""
    monkeypatch.setitem(sys.modules, "monai", None)  # import monai -> ImportError
    spec = importlib.util.spec_from_file_location("train_throughput_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    return load_benchmark(monkeypatch)


def test_imports_without_monai(bench, monkeypatch):
    with pytest.raises(ImportError):
        import monai  # noqa: F401
    assert callable(bench.main)


def test_planned_setup_is_the_planners_2d_configuration(bench):
    import planning_fixtures as fx

    setup = bench.planned_setup("mr", 24.0)
    plans = plan_experiment(fx.mr_fingerprint(), fx.dataset_json(channel_names={"0": "T1"}), gpu_memory_target_gib=24.0)
    config = plans["configurations"]["2d"]
    assert setup.network == config["network"]
    assert list(setup.patch_size) == config["patch_size"]
    assert setup.batch_size == config["batch_size"]


def test_tiny_setup_is_a_small_valid_network(bench):
    setup = bench.tiny_setup(bench.planned_setup("mr", 24.0))
    assert setup.patch_size == (32, 32) and setup.batch_size == 2
    model = build_network(setup.network, seed=0)
    assert all(32 % d == 0 for d in model.shape_divisor)
    assert count_parameters(model) < 2_000_000
    assert setup.network["attention_levels"] == [len(setup.network["channel_mult"]) - 1]


def test_level_geometry(bench):
    network = {"model_channels": 64, "channel_mult": [1, 2, 4], "strides": [[2, 2], [2, 2]],
               "attention_levels": [2], "norm_groups": 32, "num_head_channels": 48}
    assert bench.level_channels(network) == (64, 128, 256)
    assert bench.level_pixels((256, 128), network) == (256 * 128, 128 * 64, 64 * 32)
    assert bench.channel_units(network) == (32, 32, 96)  # lcm(32, 48) at the attention level


def test_channel_candidates(bench):
    candidates = list(bench.channel_candidates((8, 16), (8, 8), max_steps=3))
    assert candidates[0] == (8, 16)
    assert all(c[0] >= 8 and c[1] >= 8 for c in candidates)
    assert (8, 40) in candidates and (8, 48) not in candidates  # one level: up to 3 units
    assert (16, 24) in candidates and (16, 8) in candidates      # two levels: one unit each
    assert (24, 24) not in candidates                           # two units on level 0 and one on level 1
    assert len(candidates) == len(set(candidates))


def quadratic_count(channels: tuple[int, ...]) -> int:
    """A stand-in parameter count: convolutions within and between levels."""
    inside = sum(18 * c * c for c in channels)
    between = sum(a * b for a, b in zip(channels, channels[1:]))
    return inside + between + 3 * sum(channels)


def test_match_width_picks_least_compute_change_within_tolerance(bench):
    base, units, pixels = (32, 64, 128), (8, 8, 16), (1024, 256, 64)
    target = quadratic_count((32, 72, 128))  # reachable by widening level 1 by one unit
    counted: list[tuple[int, ...]] = []

    def count(channels):
        counted.append(channels)
        return quadratic_count(channels)

    match = bench.match_width(base, units, pixels, target, count, tolerance=0.001)
    fitting = [c for c in bench.channel_candidates(base, units)
               if abs(quadratic_count(c) - target) <= 0.001 * target]
    cheapest = min(bench.compute_change(base, c, pixels) for c in fitting)
    assert abs(match.relative_difference) <= 0.001
    assert bench.compute_change(base, match.channels, pixels) == cheapest
    assert match.params == quadratic_count(match.channels)
    assert match.tried == len(counted) and counted[-1] == match.channels
    assert not match.closest


def test_match_width_reports_closest_when_nothing_fits(bench):
    base, units, pixels = (32, 64), (8, 8), (64, 16)
    target = 10 * quadratic_count(base)
    match = bench.match_width(base, units, pixels, target, quadratic_count)
    assert abs(match.relative_difference) > 0.01
    every = list(bench.channel_candidates(base, units))
    assert match.tried == len(every)
    best = min(every, key=lambda c: abs(quadratic_count(c) - target))
    assert match.channels == best and match.closest[0] == (best, quadratic_count(best))


def test_make_batches_follow_the_cosine_forward_process(bench):
    batches = bench.make_batches((3, 1, 8, 8), torch.device("cpu"), count=2, seed=1)
    again = bench.make_batches((3, 1, 8, 8), torch.device("cpu"), count=2, seed=1)
    assert len(batches) == 2
    for b, c in zip(batches, again):
        assert b.x_t.shape == b.eps.shape == (3, 1, 8, 8) and b.t.shape == (3,)
        assert torch.equal(b.x_t, c.x_t) and torch.equal(b.t, c.t)
        assert bool(((b.t >= 0) & (b.t < 1000) & (b.t == b.t.round())).all())
    assert not torch.equal(batches[0].eps, batches[1].eps)


def test_training_step_updates_weights_and_ema(bench, monkeypatch):
    monkeypatch.setattr(bench, "EMA_DECAY", 0.5)  # a large EMA step, so a missing update cannot hide
    network = {"architecture": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 1,
               "model_channels": 8, "channel_mult": [1, 2], "strides": [[2, 2]], "num_res_blocks": 1,
               "attention_levels": [1], "num_head_channels": 8, "norm_groups": 4}
    model = build_network(network, seed=0)
    step = bench.TrainingStep(model, model, torch.device("cpu"), None)
    assert not step.optimizer.defaults.get("fused")
    batch = bench.make_batches((2, 1, 8, 8), torch.device("cpu"), count=1)[0]
    before = [p.detach().clone() for p in step.params]
    for _ in range(3):  # zero-initialised last layers: every weight has a gradient from the third step on
        ema_before = [e.clone() for e in step.ema]
        loss = step(batch)
    assert torch.isfinite(loss) and loss.ndim == 0
    assert all(not torch.equal(a, p) for a, p in zip(before, step.params))
    for e_old, e_new, p in zip(ema_before, step.ema, step.params):
        torch.testing.assert_close(e_new, e_old + 0.5 * (p.detach() - e_old), rtol=0, atol=1e-7)
    assert all(not torch.equal(a, e) for a, e in zip(ema_before, step.ema))
    assert all(p.grad is None for p in step.params)


def test_training_step_bf16_autocast_on_cpu(bench):
    network = {"architecture": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 1,
               "model_channels": 8, "channel_mult": [1], "strides": [], "num_res_blocks": 1,
               "attention_levels": [], "num_head_channels": 8, "norm_groups": 4}
    model = build_network(network, seed=0)
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    step = bench.TrainingStep(model, model, torch.device("cpu"), torch.bfloat16)
    step(bench.make_batches((1, 1, 8, 8), torch.device("cpu"), count=1)[0])
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in step.params)


def training_row(model: str, precision: str, samples_per_s: float) -> dict:
    return {"kind": "training", "model": model, "precision": precision, "compile": True, "params": 60_000_000,
            "gflop_per_step": 7500.0, "step_ms": 30.0, "samples_per_s": samples_per_s, "tflops": 250.0,
            "peak_allocated_gib": 10.0, "peak_reserved_gib": 12.0, "compile_and_warmup_s": 60.0,
            "attention_ops": ["aten::_scaled_dot_product_flash_attention", "aten::scaled_dot_product_attention"]}


def test_ratios_and_markdown(bench):
    rows = [training_row("nnDiff", "bf16", 300.0), training_row("MONAI", "bf16", 240.0),
            training_row("nnDiff", "fp32", 100.0),
            {"kind": "error", "model": "MONAI", "precision": "fp32", "error": "RuntimeError: out of memory"},
            {"kind": "skipped", "model": "nnDiff", "precision": "fp32", "reason": "time"},
            {"kind": "noise", "noise": "simplex (default)", "shape": [9, 1, 256, 256], "ms_per_batch": 12.0,
             "reference_step_ms": 30.0, "ratio_noise_over_step": 0.4}]
    assert bench.throughput_ratios(rows) == {"bf16": 1.25}
    table = bench.markdown_table(rows)
    assert "nnDiff / MONAI samples/s, bf16: **1.250**" in table and "fp32: **" not in table
    assert "failed: RuntimeError: out of memory" in table and "| nnDiff | fp32 | skipped (time limit) |" in table
    assert "| 60.0 | _scaled_dot_product_flash_attention |" in table
    assert "| simplex (default) | 9×1×256×256 | 12.00 | 30.0 | 0.4 |" in table
    header_cells = table.splitlines()[0].count("|")
    assert all(line.count("|") == header_cells for line in table.splitlines()[2:7])


@pytest.mark.parametrize(("setting", "env", "device", "tiny", "expected"), [
    ("on", "0", "cpu", True, True), ("off", "1", "cuda", False, False),
    ("auto", "", "cuda", False, True), ("auto", "", "cpu", False, False), ("auto", "", "cuda", True, False),
    ("auto", "0", "cuda", False, False), ("auto", "1", "cpu", True, True),
])
def test_compile_switch(bench, setting, env, device, tiny, expected):
    environ = {bench.ENV_COMPILE: env} if env else {}
    assert bench.compile_enabled(setting, torch.device(device), tiny, environ) is expected


def test_parse_args_defaults_and_validation(bench):
    full = bench.parse_args(["--device", "cpu"])
    tiny = bench.parse_args(["--device", "cpu", "--tiny", "--precisions", "fp32"])
    assert (full.warmup, full.steps, full.precisions) == (5, 30, ["bf16", "fp32"])
    assert (tiny.warmup, tiny.steps, tiny.precisions) == (1, 2, ["fp32"])
    for bad in (["--precisions", "fp16"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_unsupported_topologies_are_refused(bench):
    network = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "num_res_blocks": 2, "channel_mult": [1, 2],
               "strides": [[1, 2]], "attention_levels": [], "num_head_channels": 32, "norm_groups": 32}
    with pytest.raises(SystemExit, match="halves every axis"):
        bench.monai_kwargs(network, (32, 64))
    network.update(strides=[[2, 2]], num_classes=3)
    with pytest.raises(SystemExit, match="unconditional"):
        bench.monai_kwargs(network, (32, 64))
    network.update(num_classes=None)
    kwargs = bench.monai_kwargs(network, (32, 64))
    assert kwargs["use_flash_attention"] is True and kwargs["attention_levels"] == (False, False)
    assert kwargs["channels"] == (32, 64) and kwargs["norm_num_groups"] == 32


def test_candidate_count_formula(bench):
    """Singles (levels x 2 x steps) plus pairs (C(levels, 2) x 4) plus the base, with no floor hit."""
    base, units = (64, 128, 256), (8, 8, 8)
    assert len(list(bench.channel_candidates(base, units, max_steps=3))) == 1 + 3 * 6 + 3 * 4


def test_timing_turns_wait_for_all_and_never_overlap(bench, tmp_path):
    """Parallel compile: no process times before all are ready; timed sections do not overlap."""
    import threading
    import time

    spans, ready_at = [], []

    def worker(tag: str, delay: float) -> None:
        time.sleep(delay)  # staggered "compilation"
        ready_at.append(time.monotonic())
        turns = bench.TimingTurns(tmp_path, 3, tag, poll_s=0.01)
        with turns.turn():
            start = time.monotonic()
            time.sleep(0.05)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=worker, args=(f"t{i}", 0.05 * i)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert len(spans) == 3
    assert spans[0][0] >= max(ready_at)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_timing_turns_give_up_on_a_missing_sibling(bench, tmp_path):
    turns = bench.TimingTurns(tmp_path, 2, "alone", timeout_s=0.05, poll_s=0.01)
    with turns.turn():
        pass
    assert (tmp_path / "ready_alone").is_file()
    assert not bench.TimingTurns(tmp_path, 2, "x", timeout_s=0.0).wait_all()


def test_child_argv_and_result_rows(bench, tmp_path):
    argv = ["--device", "cuda", "--parallel_compile", "--output", "out", "--precisions=bf16,fp32", "--steps", "3"]
    child = bench.child_argv(argv, "MONAI", "fp32", tmp_path, 4)
    assert child == ["--device", "cuda", "--steps", "3", "--precisions", "fp32", "--only", "MONAI:fp32",
                     "--turns", f"{tmp_path}:4"]
    args = bench.parse_args(child)
    assert args.only == "MONAI:fp32" and args.precisions == ["fp32"] and not args.parallel_compile
    stdout = 'PHASE x\nRESULT {"kind": "training", "model": "MONAI"}\nnoise\n'
    assert bench.result_rows(stdout) == [{"kind": "training", "model": "MONAI"}]
