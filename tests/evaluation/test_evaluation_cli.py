"""nndiff_evaluate_folder (evaluate_folder_entry) and evaluate_generation_folders on tiny PNG and
NIfTI folders: summary contents, near-copy detection, feature extractor, every user error."""
import json
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from evaluation_helpers import smooth_images
from nndiff.dataset.examples import properties_2d, properties_3d
from nndiff.dataset.io import read_file, write_image
from nndiff.errors import DatasetError, NnDiffError
from nndiff.evaluation import center_crop_or_pad, evaluate_generation_folders, frechet_distance
from nndiff.evaluation.folders import load_image_folder
from nndiff.run.evaluate import evaluate_folder_entry

DATASET = "Dataset010_Gen"


class MeanStdFeatures(torch.nn.Module):
    """Per-channel mean and standard deviation: a tiny, shape-agnostic feature extractor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        return torch.cat([flat.mean(2), flat.std(2)], dim=1)


class NeedsThreeChannels(torch.nn.Module):
    """A model built for RGB input: fails on grey images."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(1)


def _script(module: torch.nn.Module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def _uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


def _write_png(folder, name, image_2d):
    write_image(image_2d[None, None], properties_2d(shape=image_2d.shape), folder / name)


def _dataset_json(root, task="generation", ending=".png", channels=None):
    root.mkdir(parents=True, exist_ok=True)
    data = {"name": "Gen", "task": task, "channel_names": channels or {"0": "MR"}, "numTraining": 6,
            "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(data))


@pytest.fixture
def png_setup(tmp_path, rng):
    """Raw generation dataset (6 training, 4 held-out 32x32 grey PNGs) and 5 samples; sample 3 is
    a copy of training case 2."""
    root = tmp_path / "raw" / DATASET
    _dataset_json(root)
    train = _uint8(smooth_images(rng, 6, (32, 32), offset=120, scale=40)[:, 0])
    test = _uint8(smooth_images(rng, 4, (32, 32), offset=120, scale=40)[:, 0])
    samples = _uint8(smooth_images(rng, 5, (32, 32), offset=130, scale=40)[:, 0])
    samples[3] = train[2]
    for folder, images, fmt in ((root / "imagesTr", train, "case_{:03d}_0000.png"),
                                (root / "imagesTs", test, "test_{:03d}_0000.png"),
                                (tmp_path / "pred", samples, "sample_{:04d}.png")):
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            _write_png(folder, fmt.format(index), image)
    (tmp_path / "pred" / "prediction_info.json").write_text("{}")  # written by nndiff_predict: ignored
    return {"tmp": tmp_path, "raw": tmp_path / "raw", "root": root, "pred": tmp_path / "pred",
            "train": train, "test": test, "samples": samples}


def _run(argv, capsys):
    code = evaluate_folder_entry([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_png_summary_reports_the_copied_sample(png_setup, capsys):
    s = png_setup
    code, out, err = _run([s["root"] / "imagesTs", s["pred"], "-d", "10", "--raw", s["raw"]], capsys)
    assert code == 0, err
    summary = json.loads((s["pred"] / "summary.json").read_text(encoding="utf-8"))
    metrics = summary["metrics"]
    assert (metrics["num_samples"], metrics["num_real_heldout"], metrics["num_training"]) == (5, 4, 6)
    assert metrics["spatial_dims"] == 2
    # Default training folder is the dataset's imagesTr; sample 3 is an exact copy of case 2.
    assert summary["near_copies"] == [{"sample": "sample_0003", "training": "case_002_0000", "ssim": 1.0}]
    assert metrics["memorization"]["near_copy_indices"] == [3]
    assert metrics["memorization"]["near_copy_rate"] == pytest.approx(0.2)
    assert metrics["memorization_reference_real"]["near_copy_rate"] == 0.0
    # No fingerprint: the data range is max - min of the held-out images.
    assert summary["settings"]["data_range"] == float(s["test"].max()) - float(s["test"].min())
    assert summary["settings"]["data_range_source"] == "max - min over the reference images"
    expected_w1 = wasserstein_distance(s["samples"].ravel().astype(float), s["test"].ravel().astype(float))
    assert metrics["intensity_wasserstein1"]["mean"] == pytest.approx(expected_w1, rel=1e-12)
    assert "frechet_distance" in summary["skipped"] and "--feature_extractor" in summary["skipped"]["frechet_distance"]
    assert metrics["frechet_distance"] is None
    assert summary["settings"]["feature_extractor"] is None
    assert summary["settings"]["near_copy_ssim"] == 0.95 and summary["settings"]["max_pairs"] == 2000
    assert summary["inputs"]["prediction"]["files"] == [f"sample_{i:04d}.png" for i in range(5)]
    assert summary["inputs"]["training"]["folder"] == str(s["root"] / "imagesTr")
    assert summary["settings"]["aligned_images"] == {"reference": 0, "training": 0}
    assert "near-copy: sample_0003 ~ case_002_0000" in out and "intensity W1" in out
    assert "skipped frechet_distance" in out


def test_threshold_flag_and_explicit_output(png_setup, capsys):
    s = png_setup
    out_file = s["tmp"] / "eval" / "gen.json"
    code, _, err = _run([s["root"] / "imagesTs", s["pred"], "-d", DATASET, "--raw", s["raw"], "-o", out_file,
                         "--near_copy_ssim", "0.2", "--max_pairs", "3", "--no_training", "--data_range", "300"], capsys)
    assert code == 0, err
    summary = json.loads(out_file.read_text(encoding="utf-8"))
    assert not (s["pred"] / "summary.json").exists()
    assert summary["metrics"]["memorization"] is None and "memorization" in summary["skipped"]
    assert summary["metrics"]["ms_ssim_diversity"]["samples"]["num_pairs"] == 3
    assert summary["settings"]["near_copy_ssim"] == 0.2
    assert summary["metrics"]["data_range"] == 300.0 and summary["settings"]["data_range_source"] == "given explicitly"


def test_feature_extractor_distances(png_setup, capsys):
    s = png_setup
    model = _script(MeanStdFeatures(), s["tmp"] / "features.pt")
    code, _, err = _run([s["root"] / "imagesTs", s["pred"], "-d", "10", "--raw", s["raw"],
                         "--feature_extractor", model], capsys)
    assert code == 0, err
    summary = json.loads((s["pred"] / "summary.json").read_text(encoding="utf-8"))
    assert "frechet_distance" not in summary["skipped"] and "kernel_distance" not in summary["skipped"]

    def features(images):
        flat = images.reshape(len(images), -1).astype(np.float64)
        return np.stack([flat.mean(1), flat.std(1, ddof=1)], 1)

    expected = frechet_distance(features(s["samples"]), features(s["test"]))
    assert summary["metrics"]["frechet_distance"] == pytest.approx(expected, rel=1e-4)
    assert summary["settings"]["feature_extractor"] == str(model)


def _nifti(folder, name, volume, spacing=(2.0, 1.0, 1.0)):
    write_image(volume[None].astype(np.float32), properties_3d(spacing, volume.shape), folder / name)


def test_nifti_3d_alignment_and_fingerprint_range(tmp_path, rng):
    root = tmp_path / DATASET
    _dataset_json(root, ending=".nii.gz")
    ref = smooth_images(rng, 3, (14, 12, 13), offset=-500, scale=300)[:, 0]  # larger than the samples
    samples = smooth_images(rng, 3, (12, 12, 12), offset=-450, scale=300)[:, 0]
    train = smooth_images(rng, 2, (12, 12, 12), offset=-500, scale=300)[:, 0]
    for folder, images, fmt in ((root / "imagesTs", ref, "ct_{}_0000.nii.gz"), (tmp_path / "pred", samples,
                                "sample_{:04d}.nii.gz"), (root / "imagesTr", train, "tr_{}_0000.nii.gz")):
        folder.mkdir(parents=True)
        for index, volume in enumerate(images):
            _nifti(folder, fmt.format(index), volume)
    fingerprint = {"intensity_properties_per_channel": {"0": {"percentile_00_5": -1200.0, "percentile_99_5": 300.0}}}
    summary = evaluate_generation_folders(root / "imagesTs", tmp_path / "pred", training_dir=root / "imagesTr",
                                          dataset_json=root / "dataset.json", fingerprint=fingerprint,
                                          output_file=tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text(encoding="utf-8")) == summary
    assert summary["metrics"]["data_range"] == summary["settings"]["data_range"] == 1500.0
    assert summary["settings"]["data_range_source"].startswith("fingerprint")
    assert summary["settings"]["aligned_images"] == {"reference": 3, "training": 0}
    assert summary["metrics"]["spatial_dims"] == 3 and summary["settings"]["sample_shape"] == [12, 12, 12]
    # W1 uses the reference volumes as read (not cropped), in float32 as stored in NIfTI.
    expected = wasserstein_distance(samples.astype(np.float32).ravel(), ref.astype(np.float32).ravel())
    assert summary["metrics"]["intensity_wasserstein1"]["mean"] == pytest.approx(expected, rel=1e-9)
    # The aligned reference shares the sample shape, so its diversity and memorization exist.
    assert summary["metrics"]["ms_ssim_diversity"]["real_heldout"]["num_pairs"] == 3
    assert summary["metrics"]["memorization_reference_real"] is not None
    assert summary["metrics"]["memorization"]["near_copy_rate"] == 0.0


def test_2d_samples_against_3d_volumes_use_slices(tmp_path, rng):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir(), pred_dir.mkdir()
    volumes = smooth_images(rng, 2, (5, 12, 12))[:, 0]
    for index, volume in enumerate(volumes):
        _nifti(ref_dir, f"v{index}_0000.nii.gz", volume)
    for index, image in enumerate(smooth_images(rng, 3, (12, 12))[:, 0]):
        write_image(image[None, None].astype(np.float32), properties_2d(shape=(12, 12), dtype="float32"),
                    pred_dir / f"sample_{index:04d}.nii.gz")
    summary = evaluate_generation_folders(ref_dir, pred_dir)
    assert summary["metrics"]["num_real_heldout"] == 10
    assert summary["inputs"]["reference"]["images"][:2] == ["v0_0000:z0", "v0_0000:z1"]
    assert summary["metrics"]["spatial_dims"] == 2


def test_multichannel_grouping_and_missing_channel(tmp_path, rng):
    folder = tmp_path / "pred"
    folder.mkdir()
    images = smooth_images(rng, 4, (12, 12))[:, 0]
    for index in range(2):
        for channel in range(2):
            write_image(images[2 * index + channel][None, None].astype(np.float32),
                        properties_2d(shape=(12, 12), dtype="float32"),
                        folder / f"sample_{index:04d}_{channel:04d}.nii.gz")
    loaded = load_image_folder(folder, "prediction", file_ending=".nii.gz", num_channels=2)
    assert loaded.identifiers == ["sample_0000", "sample_0001"] and loaded.num_channels == 2
    np.testing.assert_array_equal(loaded.images[1][1], images[3].astype(np.float32))
    (folder / "sample_0001_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"channel file\(s\) missing: sample_0001_0001.nii.gz"):
        load_image_folder(folder, "prediction", file_ending=".nii.gz", num_channels=2)


def test_center_crop_or_pad_exact():
    image = np.arange(2 * 5 * 4, dtype=float).reshape(2, 5, 4)
    out = center_crop_or_pad(image, (3, 6))
    assert out.shape == (2, 3, 6)
    np.testing.assert_array_equal(out[0, :, 1:5], image[0, 1:4])  # rows 1..3 kept, one padded column each side
    assert np.all(out[1, :, 0] == image[1].min()) and np.all(out[1, :, 5] == image[1].min())


# --------------------------------------------------------------------------- user errors (exit 2)
def _break_missing_ref(s):
    return [s["tmp"] / "nope", s["pred"]], ["nope", "does not exist"]


def _break_empty_pred(s):
    for path in s["pred"].iterdir():
        path.unlink()
    return [s["root"] / "imagesTs", s["pred"]], [str(s["pred"]), "holds no image files"]


def _break_mixed_endings(s):
    write_image(np.zeros((1, 1, 32, 32), np.float32), properties_2d(dtype="float32"), s["pred"] / "sample_0005.nii.gz")
    return [s["root"] / "imagesTs", s["pred"]], ["mixes file endings", ".nii.gz: 1 file(s), e.g. sample_0005.nii.gz",
                                                 "keep one format per folder"]


def _break_channels(s):
    rgb = np.zeros((3, 1, 32, 32), np.uint8)
    write_image(rgb, properties_2d(is_rgb=True), s["pred"] / "sample_0001.png")
    return [s["root"] / "imagesTs", s["pred"]], ["sample_0001.png", "has 3 channel(s) but dataset.json declares 1"]


def _break_task(s):
    # every nnDiff family is dispatched now; a task nnDiff does not know is refused with the list
    _dataset_json(s["root"], task="registration")
    return [s["root"] / "imagesTs", s["pred"]], ["task is 'registration'", "does not know",
                                                 "anomaly_detection, segmentation", "Fix: set dataset.json \"task\""]


def _break_extractor(s):
    bad = s["tmp"] / "model.pt"
    bad.write_bytes(b"not a model")
    return [s["root"] / "imagesTs", s["pred"], "--feature_extractor", bad], [
        str(bad), "is not a TorchScript model", "torch.jit.save"]


def _break_extractor_input(s):
    model = _script(NeedsThreeChannels(), s["tmp"] / "rgb_model.pt")
    return [s["root"] / "imagesTs", s["pred"], "--feature_extractor", model], [
        str(model), "fails on a batch of shape [1, 1, 32, 32]", "(B, C, *spatial)"]


def _break_ending(s):
    _dataset_json(s["root"], ending=".nii.gz")
    return [s["root"] / "imagesTs", s["pred"]], ["sample_0000.png", "dataset.json 'file_ending' is '.nii.gz'"]


def _break_fingerprint(s):
    return [s["root"] / "imagesTs", s["pred"], "--fingerprint", s["tmp"] / "fp.json"], [
        "fp.json", "fingerprint file does not exist", "nndiff_extract_fingerprint"]


def _break_unsupported_file(s):
    (s["pred"] / "notes.txt").write_text("samples of run 3")
    return [s["root"] / "imagesTs", s["pred"]], ["notes.txt", "unsupported ending '.txt'", "remove it"]


@pytest.mark.parametrize("breaker", [_break_missing_ref, _break_empty_pred, _break_mixed_endings, _break_channels,
                                     _break_task, _break_extractor, _break_extractor_input, _break_ending,
                                     _break_fingerprint, _break_unsupported_file])
def test_user_errors_exit_2_with_file_and_fix(png_setup, capsys, breaker):
    argv, expected = breaker(png_setup)
    code, out, err = _run(argv + ["-d", "10", "--raw", png_setup["raw"]], capsys)
    assert code == 2, (out, err)
    assert any(line.startswith("nnDiff error:") for line in err.splitlines()) and "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    assert not (png_setup["pred"] / "summary.json").exists()


def test_bad_settings_are_refused(png_setup):
    s = png_setup
    with pytest.raises(NnDiffError, match="near_copy_ssim must be in"):
        evaluate_generation_folders(s["root"] / "imagesTs", s["pred"], near_copy_ssim=1.5)
    with pytest.raises(NnDiffError, match="max_pairs must be at least 1"):
        evaluate_generation_folders(s["root"] / "imagesTs", s["pred"], max_pairs=0)


def test_png_read_back_matches_written(png_setup):
    # Guard for the oracle above: PNG stores the uint8 images exactly.
    array, _ = read_file(png_setup["pred"] / "sample_0003.png")
    np.testing.assert_array_equal(array[0, 0], png_setup["train"][2])


# --------------------------------------------------------------------------- plan -> train -> predict -> evaluate
#: Tiny network, two iterations, three sampling steps: the evaluation of real predictor output is under test.
TINY = {
    "network": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                "num_head_channels": 8, "norm_groups": 4},
    "training": {"num_iterations_per_epoch": 2, "num_epochs": 1, "num_val_cases": 1, "warmup_iterations": 1,
                 "augmentation": "none", "progress_every_epochs": 100},
    "diffusion": {"num_sampling_steps": 3},
}


def _trained(root, kind, dataset_id, configurations):
    """Example dataset planned with tiny configurations ({name: parent}), each trained briefly (fold 0)."""
    from nndiff.dataset.examples import make_example_dataset
    from nndiff.paths import Paths
    from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
    from nndiff.training.api import train_fold
    from nndiff.utils.files import save_json

    paths = Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")
    make_example_dataset(kind, paths.raw, dataset_id)
    location = locate_dataset(dataset_id, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    for name, parent in configurations.items():
        tiny = {"inherits_from": parent, **{key: dict(value) for key, value in TINY.items()}}
        tiny["network"]["strides"] = [[2] * plans["configurations"][parent]["spatial_dims"]]
        plans["configurations"][name] = tiny
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=sorted(set(configurations.values())))
    for name in configurations:
        train_fold(dataset_id, name, 0, paths, trainer="GenerationTrainer", device="cpu", num_workers=0)
    # Held-out real images: the same generator with another seed, in a separate folder.
    heldout = make_example_dataset(kind, root / "heldout", dataset_id, num_cases=3, seed=99)
    return paths, location, heldout / "imagesTr"


def _predict(paths, dataset_id, configuration, output, count):
    from nndiff.inference.cli import predict_entry

    roots = ["--raw", paths.raw, "--preprocessed", paths.preprocessed, "--results", paths.results]
    code = predict_entry([str(a) for a in ["-o", output, "-d", dataset_id, "-c", configuration, "--num_samples",
                                           count, "-device", "cpu", *roots]])
    assert code == 0


def test_end_to_end_png_predictions(tmp_path, capsys):
    paths, location, heldout = _trained(tmp_path, "2d_grey_png", 821, {"tiny": "2d"})
    _predict(paths, 821, "tiny", tmp_path / "samples", 3)
    code, out, err = _run([heldout, tmp_path / "samples", "-d", "821", "--raw", paths.raw,
                           "--preprocessed", paths.preprocessed], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "samples" / "summary.json").read_text(encoding="utf-8"))
    fingerprint = json.loads(location.fingerprint_file.read_text(encoding="utf-8"))["intensity_properties_per_channel"]["0"]
    assert summary["settings"]["data_range"] == fingerprint["percentile_99_5"] - fingerprint["percentile_00_5"]
    assert summary["settings"]["data_range_source"].startswith(str(location.fingerprint_file))
    metrics = summary["metrics"]
    assert (metrics["num_samples"], metrics["num_real_heldout"]) == (3, 3)
    assert metrics["num_training"] == len(list((location.raw_dir / "imagesTr").iterdir()))
    assert metrics["memorization"] is not None and metrics["intensity_wasserstein1"]["mean"] > 0
    assert summary["inputs"]["prediction"]["files"] == ["sample_0000.png", "sample_0001.png", "sample_0002.png"]

    # --shape: samples of another size than the patch (sizes on the configuration's grid)
    from nndiff.inference.cli import predict_entry

    roots = ["--raw", paths.raw, "--preprocessed", paths.preprocessed, "--results", paths.results]
    assert predict_entry([str(a) for a in ["-o", tmp_path / "shaped", "-d", 821, "-c", "tiny", "--num_samples", 1,
                                           "--shape", 24, 20, "-device", "cpu", *roots]]) == 0
    array, _ = read_file(tmp_path / "shaped" / "sample_0000.png")
    info = json.loads((tmp_path / "shaped" / "prediction_info.json").read_text(encoding="utf-8"))
    assert array.shape[-2:] == (24, 20) and info["shape"] == [24, 20]


def test_end_to_end_3d_ct_volumes_and_2d_slices(tmp_path):
    paths, location, heldout = _trained(tmp_path, "3d_ct", 822, {"tiny3d": "3d_fullres", "tiny2d": "2d"})
    dataset_json = location.raw_dir / "dataset.json"
    for configuration, dims in (("tiny3d", 3), ("tiny2d", 2)):
        samples = tmp_path / configuration
        _predict(paths, 822, configuration, samples, 2)
        summary = evaluate_generation_folders(heldout, samples, training_dir=location.raw_dir / "imagesTr",
                                              dataset_json=dataset_json, fingerprint=location.fingerprint_file)
        metrics = summary["metrics"]
        assert metrics["spatial_dims"] == dims and metrics["num_samples"] == 2
        # 2D samples are compared with every z slice of the three 12-slice held-out volumes.
        assert metrics["num_real_heldout"] == (3 if dims == 3 else 36)
        assert metrics["intensity_wasserstein1"]["mean"] > 0
        assert summary["settings"]["data_range_source"].startswith(str(location.fingerprint_file))


# --------------------------------------------------------------------------- anomaly detection / segmentation dispatch
def test_anomaly_detection_dataset_is_dispatched(tmp_path, rng, capsys):
    from test_evaluation_anomaly import _anomaly_dataset

    root = _anomaly_dataset(tmp_path / "Dataset001_Toy", rng)
    base = [root / "labelsTs", root / "pred", "--dataset_json", root / "dataset.json"]
    # the z-score baseline's folders given explicitly (their defaults are the same imagesTr / imagesTs)
    code, out, err = _run([*base, "--training", root / "imagesTr", "--images", root / "imagesTs"], capsys)
    assert code == 0, err
    assert "| pred | 1.0000 |" in out and "| zscore_baseline |" in out
    summary = json.loads((root / "pred" / "summary.json").read_text(encoding="utf-8"))
    assert summary["task"] == "anomaly_detection" and summary["methods"]["pred"]["dice_at_threshold"] == 1.0
    assert summary["methods"]["zscore_baseline"]["num_healthy_training"] == 5
    # a test-image folder without the cases skips the baseline, with the reason printed
    code, out, err = _run([*base, "--images", tmp_path / "absent", "-o", tmp_path / "s.json"], capsys)
    assert code == 0, err
    assert "skipped zscore_baseline" in out and "zscore_baseline" not in json.loads(
        (tmp_path / "s.json").read_text(encoding="utf-8"))["methods"]


def test_segmentation_dataset_is_dispatched_with_the_baseline(tmp_path, capsys):
    from test_evaluation_segmentation import _segmentation_folders

    root = _segmentation_folders(tmp_path / "Dataset002_Seg")
    code, out, err = _run([root / "labelsTs", root / "diffusion", "--dataset_json", root / "dataset.json",
                           "--baseline", root / "deterministic"], capsys)
    assert code == 0, err
    summary = json.loads((root / "diffusion" / "summary.json").read_text(encoding="utf-8"))
    assert summary["task"] == "segmentation" and summary["foreground_mean"]["Dice"] == 1.0
    assert summary["deterministic_baseline"]["uncertainty_auroc"] == 1.0
    assert "| a (1) | 1.0000 | 0.7500 |" in out  # the side-by-side comparison table, with dataset.json names


@pytest.mark.parametrize("task, extra, expected", [
    ("anomaly_detection", ["--baseline", "x"], "--baseline only apply to segmentation datasets"),
    ("anomaly_detection", ["--no_training"], "--no_training only apply to generation datasets"),
    ("anomaly_detection", ["--crop", "8", "8"], "--crop only apply to reconstruction datasets"),
    ("segmentation", ["--training", "x"], "--training only apply to generation datasets"),
    ("segmentation", ["--images", "x"], "--images only apply to generation / anomaly detection datasets"),
    ("segmentation", ["--data_range", "2"], "--data_range only apply to generation, translation datasets"),
    ("generation", ["--baseline", "x"], "--baseline only apply to anomaly detection / segmentation datasets"),
    ("translation", ["--images", "x"], "--images only apply to anomaly detection / segmentation datasets"),
])
def test_flags_of_other_families_are_refused(tmp_path, capsys, task, extra, expected):
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"task": task}))
    code, out, err = _run([tmp_path, tmp_path, "--dataset_json", dataset_json, *extra], capsys)
    assert code == 2 and expected in err and f"task '{task}'" in err, err
