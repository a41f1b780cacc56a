"""The MNI152 benchmark helpers: benchmarks/mni_configs.py adds configurations that resolve and build,
and benchmarks/mni_gpu_session.sh parses and lists its jobs (the GPU runs themselves are in
documentation/benchmarks.md)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nndiff.networks import build_network
from nndiff.networks.autoencoder import build_autoencoder
from nndiff.planning import configurations, plan_experiment, resolve_configuration
from nndiff.tasks.latent import network_block

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plans():
    sys.path.insert(0, str(Path(__file__).resolve().parent / "planning"))
    try:
        import planning_fixtures as fx
    finally:
        sys.path.pop(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configurations, "LATENT_LARGE_IMAGE_VOXELS", {2: 1, 3: 1})
        return plan_experiment(fx.mr_fingerprint(), fx.dataset_json(channel_names={"0": "T1"}), gpu_memory_target_gib=24.0)


@pytest.mark.parametrize("scale", ["gpu", "tiny"])
def test_mni_configs_resolve_and_build(plans, scale):
    mni = _load("mni_configs")
    added = mni.added_configurations(plans, scale)
    assert set(added) == {f"2d_{scale}", f"3d_latent_{scale}"}
    full = {**plans, "configurations": {**plans["configurations"], **added}}
    for name in added:
        config = resolve_configuration(full, name)
        assert config["data_identifier"] == resolve_configuration(full, added[name]["inherits_from"])["data_identifier"]
        build_network(config["network"], seed=0)
    latent = resolve_configuration(full, f"3d_latent_{scale}")
    build_autoencoder(network_block(latent["autoencoder"]), 1, 3)
    if scale == "gpu":
        assert latent["autoencoder"]["training"]["num_epochs"] == mni.GPU_AUTOENCODER_EPOCHS
        assert latent["autoencoder"]["patch_size"] == plans["configurations"]["3d_latent"]["autoencoder"]["patch_size"]
    else:
        assert latent["max_decode_voxels"] >= 100 * 184 * 148  # the MNI152 1 mm volume in one pass


def test_gpu_session_script_parses_and_prints_its_usage():
    script = BENCHMARKS / "mni_gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "prepare" in usage.stdout and "GROUPS" in usage.stdout
    assert "memory_phases" in usage.stdout and "CPU dry run" in usage.stdout  # the whole header


def test_gpu_session_groups_select_their_trainings():
    """The kit's groups start exactly their trainings (5d: denoising alone; 6a / 6s: the two halves of 6)."""
    script = BENCHMARKS / "mni_gpu_session.sh"

    def trainers(groups: str) -> list[str]:
        result = subprocess.run(["bash", str(script), "jobs", groups], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return sorted(line.split()[-1] for line in result.stdout.splitlines() if line.strip())

    assert trainers("5") == ["DenoisingTrainer", "ReconstructionTrainer", "TranslationTrainer"]
    assert trainers("5d") == ["DenoisingTrainer"]
    assert trainers("5,5d") == trainers("5")
    assert trainers("6a") == ["AnomalyCDPMTrainer", "AnomalyClassifierTrainer", "AnomalyDDPMTrainer"]
    assert trainers("6s") == ["SegmentationBaselineTrainer", "SegmentationDiffusionTrainer"]
    assert trainers("6") == sorted(trainers("6a") + trainers("6s"))
    assert trainers("5d,6s") == sorted(["DenoisingTrainer"] + trainers("6s"))
    assert trainers("7") == ["LatentDiffusionTrainer"]


def test_gpu_session_memory_phases():
    """Memory cases run phase by phase: the default puts the 8 / 24 GiB cases together and each 64 GiB case
    alone (no GPU here, so the <128 GiB layout); explicit phases are comma-separated lists."""
    script = BENCHMARKS / "mni_gpu_session.sh"

    def phases(*args: str, scale: str = "gpu") -> list[list[str]]:
        env = {**os.environ, "SCALE": scale, "PATH": "/usr/bin:/bin"}  # no nvidia-smi: a card under 128 GiB
        result = subprocess.run(["bash", str(script), "memory_phases", *args], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        return [line.split() for line in result.stdout.splitlines()]

    assert phases() == [["mr:8:3d_latent", "mr:8:3d_latent:ae", "mr:24:3d_latent", "mr:24:3d_latent:ae"],
                        ["mr:64:3d_latent"], ["mr:64:3d_latent:ae"]]
    assert phases("mr:8:3d_latent,mr:24:3d_latent", "mr:64:3d_latent:ae") == [
        ["mr:8:3d_latent", "mr:24:3d_latent"], ["mr:64:3d_latent:ae"]]
    assert phases(scale="tiny") == [["mr:8:3d_latent", "mr:8:3d_latent:ae"]]


def test_memory_plan_smoke_row_and_per_case_file(tmp_path):
    """memory_plan.py's code path on the CPU (SMOKE: batch 1, smallest patch): one JSON row per case with the
    planner's estimate, and a file named after the case, so parallel one-case processes keep their rows."""
    env = {**os.environ, "DEVICE": "cpu", "SMOKE": "1", "OUT": str(tmp_path),
           "PYTHONPATH": str(BENCHMARKS.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "memory_plan.py"), "mr:8:3d_latent:ae"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["case"] == "mr:8:3d_latent:ae" and row["smoke"] is True and 0 < row["estimate"] < 8
    assert json.loads((tmp_path / "measure_eager_mr-8-3d_latent-ae.json").read_text()) == [row]


def test_volume_preview_writes_mid_slices_and_statistics(tmp_path):
    """volume_preview.py: one PNG of orthogonal mid-slices and per-volume statistics (shape, spacing, range,
    foreground share) for the samples and the reference; an empty folder is an error message."""
    import numpy as np

    from nndiff.dataset.io import ImageProperties, write_image

    def write(array: np.ndarray, path: Path) -> None:
        props = ImageProperties(spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                                direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), spatial_dims=3, shape=array.shape[1:])
        write_image(array, props, path)

    samples = tmp_path / "samples"
    samples.mkdir()
    volume = np.zeros((1, 6, 8, 10), np.float32)
    volume[0, 2:4, 2:6, 3:7] = 100.0  # 32 of 480 voxels bright
    write(volume, samples / "sample_0000.npz")
    write(2 * volume, tmp_path / "reference.npz")
    spec = importlib.util.spec_from_file_location("volume_preview", BENCHMARKS / "volume_preview.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "preview.png"
    assert module.main([str(samples), str(out), "--reference", str(tmp_path / "reference.npz")]) == 0
    assert out.stat().st_size > 0
    stats = json.loads(out.with_suffix(".json").read_text())
    assert set(stats) == {"sample_0000", "reference"}
    assert stats["sample_0000"]["shape"] == [6, 8, 10] and stats["sample_0000"]["spacing"] == [2.0, 1.0, 1.0]
    assert stats["sample_0000"]["max"] == 100.0 and stats["reference"]["max"] == 200.0
    assert stats["sample_0000"]["foreground"] == pytest.approx(32 / 480)
    assert module.main([str(tmp_path / "empty"), str(out)]) == 1  # no samples: a message, not a crash
