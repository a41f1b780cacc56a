"""``nndiff_demo``: the smoke run end to end (in process) and the demo's own rules."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from nndiff.errors import NnDiffError
from nndiff.run import demo
from nndiff.run.demo import (
    CONFIGURATION,
    GRID_FILE,
    SMOKE,
    STAGES,
    SUMMARY_FILE,
    centre_in_patch,
    comparison_table,
    covering_patch,
    demo_configuration,
    main,
    prepare_output,
    settings_from_args,
    snr_shift_for,
    untrained_network,
)
from nndiff.utils.files import load_json

TABLE_LABELS = ("intensity W1 to held-out", "MS-SSIM between samples", "SSIM to nearest training slice",
                "near-copy rate")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, str]:
    """One ``nndiff_demo --smoke`` run (about 10 s single-threaded) shared by the tests below."""
    import contextlib
    import io

    output = tmp_path_factory.mktemp("demo") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["-o", str(output), "--smoke"])
    assert code == 0, stdout.getvalue()
    return output, stdout.getvalue()


def test_smoke_writes_grid_summary_and_samples(smoke_run):
    output, _ = smoke_run
    summary = load_json(output / SUMMARY_FILE)
    assert set(summary) >= {"settings", "device", "configuration", "patch_size", "dataset", "model_dir", "samples",
                            "references", "grid", "evaluation", "real_training_vs_heldout_w1", "stage_seconds",
                            "total_seconds"}
    assert list(summary["stage_seconds"]) == list(STAGES)
    assert all(value >= 0 for value in summary["stage_seconds"].values())
    assert summary["total_seconds"] >= sum(summary["stage_seconds"].values()) - 0.5
    assert summary["configuration"] == CONFIGURATION and summary["device"] == "cpu"
    for name in ("trained", "untrained"):
        files = sorted(Path(summary["samples"][name]).glob("sample_*.nii.gz"))
        assert len(files) == SMOKE.num_samples
        metrics = summary["evaluation"][name]["metrics"]
        assert metrics["num_samples"] == SMOKE.num_samples
        assert metrics["intensity_wasserstein1"]["mean"] > 0
        assert (output / "evaluation" / f"{name}.json").is_file()
    assert Path(summary["model_dir"], "fold_all", "checkpoint_final.pth").is_file()
    grid = imread(output / GRID_FILE)
    assert grid.ndim == 3 and grid.shape[0] > 100 and grid.shape[1] > 100
    assert float(grid[..., :3].std()) > 0.05  # images, not an empty canvas


def test_smoke_references_are_on_the_sample_grid(smoke_run):
    """Held-out and training references have the samples' shape and spacing, in original units."""
    from nndiff.dataset.io import read_images

    output, _ = smoke_run
    summary = load_json(output / SUMMARY_FILE)
    sample, sample_props = read_images([sorted(Path(summary["samples"]["trained"]).glob("*.nii.gz"))[0]])
    conversion = load_json(Path(summary["dataset"]) / "mni152_conversion.json")
    heldout = sorted(Path(summary["references"]["real_heldout"]).glob("*.nii.gz"))
    training = sorted(Path(summary["references"]["real_training"]).glob("*.nii.gz"))
    assert len(heldout) == len(conversion["slices"]["heldout"])
    assert len(training) == sum(len(slab) for slab in conversion["slices"]["train_slabs"])
    for path in (heldout[0], training[0]):
        image, props = read_images([path])
        assert image.shape == sample.shape
        np.testing.assert_allclose(props.spacing, sample_props.spacing)
        assert 0.0 <= image.min() and image.max() <= 255.0 + 1e-3  # template units
        assert image.max() > 50.0  # a brain slice, not background


def test_smoke_prints_table_and_times(smoke_run):
    output, printed = smoke_run
    summary = load_json(output / SUMMARY_FILE)
    for label in TABLE_LABELS:
        line = next(line for line in printed.splitlines() if line.startswith(label))
        assert len(line.split()) >= 2
    w1 = {name: summary["evaluation"][name]["metrics"]["intensity_wasserstein1"]["mean"]
          for name in ("trained", "untrained")}
    w1_line = next(line for line in printed.splitlines() if line.startswith(TABLE_LABELS[0]))
    assert w1_line.split()[-2:] == [f"{w1['trained']:.2f}", f"{w1['untrained']:.2f}"]
    for stage in STAGES:
        assert f"{stage} done in" in printed
    assert "total" in printed and str((output / GRID_FILE).resolve()) in printed


def test_smoke_plans_hold_the_documented_configuration(smoke_run):
    from nndiff.networks.config import parse_network_config
    from nndiff.planning import resolve_configuration

    output, _ = smoke_run
    plans = load_json(next((output / "preprocessed").iterdir()) / "nnDiffPlans.json")
    stored = plans["configurations"][CONFIGURATION]
    assert stored["inherits_from"] == "2d"
    resolved = resolve_configuration(plans, CONFIGURATION)
    assert resolved["network"]["model_channels"] == SMOKE.model_channels
    assert resolved["diffusion"]["num_sampling_steps"] == SMOKE.num_sampling_steps
    assert resolved["spacing"] == [SMOKE.spacing_mm, SMOKE.spacing_mm]
    divisor = parse_network_config(resolved["network"]).shape_divisor
    assert all(p % d == 0 for p, d in zip(resolved["patch_size"], divisor))
    # the patch covers every preprocessed slice (each training sample is a whole slice)
    data_folder = next((output / "preprocessed").iterdir()) / resolved["data_identifier"]
    shapes = np.array([load_json(p)["shape_after_resampling"][1:] for p in data_folder.glob("*.json")])
    assert (shapes.max(0) <= resolved["patch_size"]).all()
    assert (shapes.max(0) > np.array(resolved["patch_size"]) - divisor).all()  # and is the smallest such


def test_untrained_network_is_the_trainers_initial_network(smoke_run):
    """The 'untrained' baseline is exactly what the trainer starts from (same seed and builder)."""
    from nndiff.tasks.generation import GenerationTrainer
    from nndiff.training.api import load_plans

    output, _ = smoke_run
    pre = next((output / "preprocessed").iterdir())
    trainer = GenerationTrainer(load_plans(pre), CONFIGURATION, "all", pre, output_dir=output / "init_check",
                                device="cpu", num_workers=0, seed=SMOKE.seed)
    trainer.initialize()
    baseline = untrained_network(trainer.configuration, SMOKE.seed).state_dict()
    initial = trainer.network.state_dict()
    assert baseline.keys() == initial.keys()
    assert all(torch.equal(baseline[key], initial[key]) for key in initial)


def test_covering_patch_is_the_smallest_stride_multiple():
    assert covering_patch([[30, 17], [25, 26]], [8, 4]) == [32, 28]
    assert covering_patch([[32, 16]], [8, 4]) == [32, 16]
    assert covering_patch([[1, 1]], [2, 2]) == [2, 2]


def test_snr_shift_follows_the_planner_rule():
    assert snr_shift_for([64, 64]) == 1.0
    assert snr_shift_for([32, 32]) == 1.0  # never below 1
    assert snr_shift_for([128, 128]) == 2.0
    assert snr_shift_for([64, 256]) == 2.0


def test_centre_in_patch_pads_with_minimum_and_crops_centrally():
    data = np.arange(1, 13, dtype=np.float32).reshape(1, 1, 3, 4)  # (C, 1, Y, X) values 1..12
    out = centre_in_patch(data, [5, 2])
    assert out.shape == (1, 5, 2)
    expected = np.full((1, 5, 2), 1.0, np.float32)
    expected[0, 1:4] = data[0, 0, :, 1:3]
    np.testing.assert_array_equal(out, expected)


def test_demo_configuration_values():
    config = demo_configuration(demo.FULL)
    assert config["inherits_from"] == "2d"
    assert config["spacing"] == [demo.FULL.spacing_mm] * 2
    assert config["network"]["strides"] == [[2, 2]] * (len(demo.FULL.channel_mult) - 1)
    assert config["training"]["num_epochs"] * config["training"]["num_iterations_per_epoch"] >= demo.FULL.iterations
    assert config["data_identifier"] != "nnDiffPlans_2d"  # own spacing: must not overwrite the parent's cases
    assert set(config["reasons"]) >= {"spacing", "batch_size", "network", "diffusion", "training"}


def test_settings_from_args_overrides_and_validation():
    args = argparse.Namespace(smoke=True, iterations=7, num_samples=3)
    settings = settings_from_args(args)
    assert (settings.iterations, settings.num_samples, settings.model_channels) == (7, 3, SMOKE.model_channels)
    with pytest.raises(NnDiffError, match="iterations"):
        settings_from_args(argparse.Namespace(smoke=False, iterations=0, num_samples=None))
    with pytest.raises(NnDiffError, match="num_samples"):
        settings_from_args(argparse.Namespace(smoke=False, iterations=None, num_samples=1))


def test_cli_reports_bad_arguments_as_user_errors(tmp_path, capsys):
    assert main(["-o", str(tmp_path), "--smoke", "--num_samples", "1"]) == 2
    assert "num_samples" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists()  # refused before any work


def test_prepare_output_replaces_only_the_demos_folders(tmp_path):
    (tmp_path / "samples" / "trained").mkdir(parents=True)
    (tmp_path / "samples" / "trained" / "stale.nii.gz").write_text("old")
    (tmp_path / SUMMARY_FILE).write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    prepare_output(tmp_path)
    assert not (tmp_path / "samples").exists() and not (tmp_path / SUMMARY_FILE).exists()
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_comparison_table_layout():
    def evaluation(w1: float, diversity: float, nearest: float, rate: float) -> dict:
        return {"metrics": {"intensity_wasserstein1": {"mean": w1}, "ms_ssim_diversity": {
            "samples": {"mean": diversity}, "real_heldout": {"mean": 0.5}},
            "memorization": {"mean_nearest_ssim": nearest, "near_copy_rate": rate},
            "memorization_reference_real": {"mean_nearest_ssim": 0.7}}}

    table = comparison_table({"trained": evaluation(12.345, 0.25, 0.6, 0.0),
                              "untrained": evaluation(80.0, 0.01, 0.05, 0.0)}, floor_w1=9.5)
    lines = table.splitlines()
    assert lines[0].split()[-2:] == ["trained", "untrained"]
    assert lines[2].endswith("12.35     80.00") and "(training slices: 9.5)" in lines[2]
    assert lines[3].endswith("0.250     0.010") and "(real: 0.5)" in lines[3]
    assert lines[4].endswith("0.600     0.050") and "(real: 0.7)" in lines[4]
    assert lines[5].endswith("0.00      0.00")
    missing = comparison_table({"trained": {"metrics": {}}, "untrained": {"metrics": {}}})
    assert missing.splitlines()[2].split()[-2:] == ["n/a", "n/a"]


def test_summary_is_plain_json(smoke_run):
    output, _ = smoke_run
    text = (output / SUMMARY_FILE).read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)
