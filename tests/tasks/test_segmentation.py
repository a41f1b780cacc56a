"""Segmentation family: label encoding (plain labels and nnU-Net regions), fusion (mean, STAPLE),
uncertainty maps, both trainers end to end (plan -> train -> predict) on tiny synthetic datasets,
the 3D sliding-window path, resume, and bad inputs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nndiff.dataset import load_dataset, verify_integrity
from nndiff.dataset.examples import make_example_dataset, properties_2d
from nndiff.dataset.io import read_images, read_label, write_image
from nndiff.errors import DatasetError, NnDiffError, PlansError
from nndiff.inference import predictor_class_for
from nndiff.inference.cli import predict_entry
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
from nndiff.tasks.segmentation import (
    channels_to_picture,
    check_scheme_channels,
    SegmentationBaselineTrainer,
    SegmentationDiffusionTrainer,
    dice_ce_loss,
    encode_labels,
    label_scheme,
    to_signed,
)
from nndiff.tasks.segmentation_predictor import (
    SegmentationBaselinePredictor,
    SegmentationPredictor,
    entropy_map,
    fuse,
    label_map,
    samples_to_probabilities,
    staple,
    variance_map,
)
from nndiff.training.api import load_plans, train_fold
from nndiff.utils.files import load_json, save_json

TINY_NETWORK = {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                "num_head_channels": 8, "norm_groups": 4, "dropout": 0.0}
TINY_TRAINING = {"num_iterations_per_epoch": 2, "num_epochs": 2, "num_val_cases": 2, "warmup_iterations": 1,
                 "augmentation": "none", "progress_every_epochs": 1}
PLAIN_LABELS = {"background": 0, "disk": 1, "square": 2}
REGION_LABELS = {"background": 0, "any": [1, 2], "square": [2]}


def _tiny(parent: str, spatial_dims: int, **extra) -> dict:
    network = {**TINY_NETWORK, "strides": [[2] * spatial_dims], **extra.pop("network", {})}
    return {"inherits_from": parent, "network": network, "training": {**TINY_TRAINING, **extra.pop("training", {})},
            "diffusion": {"num_sampling_steps": 2, **extra.pop("diffusion", {})}, **extra}


def _paths(root: Path) -> Paths:
    return Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")


def _roots(paths: Paths) -> list[str]:
    return ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]


def _prepare(paths: Paths, dataset_id: int, configurations: dict[str, dict]) -> Path:
    location = locate_dataset(dataset_id, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    plans["configurations"].update(configurations)
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=sorted({c["inherits_from"] for c in configurations.values()}))
    return next(p for p in paths.preprocessed.iterdir() if p.is_dir())


def _shapes_2d(root: Path, dataset_id: int, n: int, seed: int, labels: dict, folder: str = "Tr",
               extra: dict | None = None) -> Path:
    """16x16 PNG: a bright disk (label 1) and a darker square (label 2) on a noisy background."""
    rng = np.random.default_rng(seed)
    dataset = root / f"Dataset{dataset_id:03d}_Shapes"
    props = properties_2d(shape=(16, 16))
    yy, xx = np.mgrid[:16, :16]
    for i in range(n):
        label = np.zeros((16, 16), dtype=np.uint8)
        cy, cx = rng.integers(4, 8, size=2)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= 9] = 1
        sy, sx = rng.integers(9, 12, size=2)
        label[sy:sy + 4, sx:sx + 4] = 2
        image = np.where(label == 1, 220, np.where(label == 2, 120, 30)) + rng.normal(0, 8, (16, 16))
        write_image(np.clip(image, 0, 255).astype(np.uint8)[None, None], props,
                    dataset / f"images{folder}" / f"case_{i:03d}_0000.png")
        write_image(label[None, None], props, dataset / f"labels{folder}" / f"case_{i:03d}.png")
    data = {"name": "Shapes", "task": "segmentation", "channel_names": {"0": "grey"}, "labels": labels,
            "numTraining": n, "file_ending": ".png", **(extra or {})}
    if folder == "Tr":
        save_json(data, dataset / "dataset.json")
    return dataset


# ----------------------------------------------------------------------------------------------
# Mechanics with exact answers
# ----------------------------------------------------------------------------------------------
def test_label_scheme_encodes_plain_labels_and_regions():
    plain = label_scheme({"labels": {"b": 2, "background": 0, "a": 1}})
    assert plain.names == ("background", "a", "b") and not plain.is_region
    seg = torch.tensor([[[[0, 1, 2, 2]]]])
    onehot = encode_labels(seg, plain)
    assert onehot.shape == (1, 3, 1, 4) and onehot[0, :, 0].argmax(0).tolist() == [0, 1, 2, 2]
    assert to_signed(onehot).unique().tolist() == [-1.0, 1.0]
    assert channels_to_picture(to_signed(onehot)).flatten().tolist() == [-1.0, 0.0, 1.0, 1.0]  # grid picture
    assert label_map(onehot[0], plain).tolist() == seg[0].tolist()

    regions = label_scheme({"labels": REGION_LABELS, "regions_class_order": [1, 2]})
    assert regions.is_region and regions.names == ("background", "any", "square")
    masks = encode_labels(seg, regions)[0, :, 0]
    assert masks.tolist() == [[1, 0, 0, 0], [0, 1, 1, 1], [0, 0, 1, 1]]  # regions overlap
    assert label_map(masks[:, None], regions)[0, 0].tolist() == [0, 1, 2, 2]  # later region paints over


def test_label_scheme_errors_name_the_problem():
    scheme = label_scheme({"labels": PLAIN_LABELS})
    with pytest.raises(NnDiffError, match=r"cases case_007.*value\(s\) \[5\] are not declared"):
        encode_labels(torch.tensor([[[[0, 5]]]]), scheme, where="cases case_007")
    with pytest.raises(PlansError, match="in_channels 2 / out_channels 2, but dataset.json labels give 3 channels"):
        check_scheme_channels(scheme, {"in_channels": 2, "out_channels": 2})
    with pytest.raises(PlansError, match="no single background"):
        label_scheme({"labels": {"a": [1, 2], "b": 2}})
    with pytest.raises(PlansError, match="regions_class_order"):
        label_scheme({"labels": REGION_LABELS, "regions_class_order": [1]})
    with pytest.raises(PlansError, match="regions_class_order"):
        label_map(torch.ones(3, 1, 2), label_scheme({"labels": REGION_LABELS}))


def test_probabilities_fusion_and_uncertainty_ranges():
    generator = torch.Generator().manual_seed(0)
    samples = torch.rand(4, 3, 2, 5, 6, generator=generator) * 2.6 - 1.3  # outside [-1, 1] on purpose
    probs = samples_to_probabilities(samples, is_region=False)
    assert probs.shape == samples.shape and probs.min() >= 0
    torch.testing.assert_close(probs.sum(1), torch.ones(4, 2, 5, 6))
    fused = fuse(probs, False, "mean")
    entropy = entropy_map(fused, False)
    assert entropy.shape == (1, 2, 5, 6) and entropy.min() >= 0 and entropy.max() <= math.log(3) + 1e-6
    uniform = torch.full((3, 1, 1, 1), 1 / 3)
    assert entropy_map(uniform, False).item() == pytest.approx(math.log(3))
    certain = torch.tensor([0.0, 1.0, 0.0]).reshape(3, 1, 1, 1)
    assert entropy_map(certain, False).item() == 0.0
    variance = variance_map(probs)
    assert variance.shape == (1, 2, 5, 6) and 0 <= variance.min() and variance.max() <= 0.25
    assert torch.all(variance_map(probs[:1].expand(3, -1, -1, -1, -1)) == 0)
    all_negative = samples_to_probabilities(-torch.ones(1, 3, 1, 1, 1), False)
    torch.testing.assert_close(all_negative, torch.full((1, 3, 1, 1, 1), 1 / 3))  # no score: uniform
    region_probs = samples_to_probabilities(samples, is_region=True)
    region_entropy = entropy_map(fuse(region_probs, True), True)
    assert region_entropy.max() <= 2 * math.log(2) + 1e-6
    assert entropy_map(torch.full((3, 1, 1, 1), 0.5), True).item() == pytest.approx(2 * math.log(2))


def test_staple_of_identical_masks_returns_the_mask():
    mask = torch.tensor([[0, 1, 2, 2], [1, 1, 0, 2]])
    posterior, theta = staple(torch.stack([mask] * 3), 3)
    assert posterior.shape == (3, 2, 4)
    assert torch.equal(posterior.argmax(0), mask) and posterior.max(0).values.min() > 0.99
    assert torch.allclose(theta.diagonal(dim1=1, dim2=2), torch.ones(3, 3), atol=1e-3)  # perfect raters
    binary = (mask > 0).long()
    assert torch.equal(staple(torch.stack([binary] * 3), 2)[0].argmax(0), binary)
    # two raters agree everywhere, the third is wrong on one voxel: the pair wins there
    noisy = mask.clone()
    noisy[0, 0] = 2
    assert torch.equal(staple(torch.stack([mask, mask, noisy]), 3)[0].argmax(0), mask)
    # STAPLE fusion of probabilities: identical samples keep their argmax, regions their masks
    probs = torch.nn.functional.one_hot(mask, 3).permute(2, 0, 1).float()[:, None]
    assert torch.equal(fuse(probs[None].expand(3, -1, -1, -1, -1), False, "staple").argmax(0), mask[None])
    regions = label_scheme({"labels": REGION_LABELS, "regions_class_order": [1, 2]})
    masks = encode_labels(mask[None, None], regions)  # (1, 3, 2, 4)
    fused = fuse(masks.expand(3, -1, -1, -1), True, "staple")
    assert torch.equal(label_map(fused, regions)[0], mask)
    with pytest.raises(NnDiffError, match="unknown fusion 'vote'"):
        fuse(probs[None], False, "vote")


def test_dice_ce_loss_is_low_for_the_right_answer():
    masks = encode_labels(torch.tensor([[[[0, 1, 2, 1]]]]), label_scheme({"labels": PLAIN_LABELS}))
    good, logs = dice_ce_loss(masks * 20 - 10, masks, is_region=False)
    bad, _ = dice_ce_loss(-(masks * 20 - 10), masks, is_region=False)
    assert good < 0.01 < 1.5 < bad and logs["dice"] > 0.99
    regions = encode_labels(torch.tensor([[[[0, 1, 2, 1]]]]), label_scheme({"labels": REGION_LABELS}))
    assert dice_ce_loss(regions * 20 - 10, regions, is_region=True)[0] < 0.01


# ----------------------------------------------------------------------------------------------
# End to end: 2D shapes with labels, both trainers
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("segmentation")
    paths = _paths(root)
    _shapes_2d(paths.raw, 81, 5, seed=0, labels=PLAIN_LABELS)
    pre = _prepare(paths, 81, {"tiny": _tiny("2d", 2, patch_size=[8, 8])})
    for trainer in ("SegmentationDiffusionTrainer", "SegmentationBaselineTrainer"):
        train_fold(81, "tiny", 0, paths, trainer=trainer, device="cpu", num_workers=0)
    test = _shapes_2d(root / "test", 81, 2, seed=7, labels=PLAIN_LABELS, folder="Ts")
    return {"paths": paths, "pre": pre, "test": test}


@pytest.mark.parametrize("trainer", ["SegmentationDiffusionTrainer", "SegmentationBaselineTrainer"])
def test_train_and_predict_writes_label_and_uncertainty_maps(shapes_model, tmp_path, trainer):
    paths, test = shapes_model["paths"], shapes_model["test"]
    expected = {"SegmentationDiffusionTrainer": SegmentationPredictor,
                "SegmentationBaselineTrainer": SegmentationBaselinePredictor}[trainer]
    assert predictor_class_for(trainer) is expected
    fold = paths.results / shapes_model["pre"].name / f"{trainer}__nnDiffPlans__tiny" / "fold_0"
    assert load_json(fold / "debug.json")["trainer_class"] == trainer
    # the diffusion trainer writes a sample grid (image | sampled mask | reference) per progress epoch
    assert (fold / "samples_epoch_0001.png").is_file() == (trainer == "SegmentationDiffusionTrainer")
    out = tmp_path / "pred"
    assert predict_entry(["-i", str(test / "imagesTs"), "-o", str(out), "-d", "81", "-c", "tiny", "-tr", trainer,
                          "--num_samples", "2", "-device", "cpu", *_roots(paths)]) == 0
    info = load_json(out / "prediction_info.json")
    assert info["num_samples"] == (2 if trainer == "SegmentationDiffusionTrainer" else 1)
    assert info["uncertainty"] == "entropy" and info["uncertainty_range"] == pytest.approx([0, math.log(3)])
    for case in ("case_000", "case_001"):
        _, image_props = read_images([test / "imagesTs" / f"{case}_0000.png"])
        labels, label_props = read_label(out / f"{case}.png")
        assert info["uncertainty_files"][case] == f"{case}_uncertainty.npy"  # PNG stores integers only
        uncertainty, props = read_images([out / f"{case}_uncertainty.npy"])
        for p in (label_props, props):
            assert p.shape == image_props.shape and np.allclose(p.spacing, image_props.spacing)
        assert set(np.unique(labels)) <= {0, 1, 2}
        assert uncertainty.dtype == np.float32 and 0 <= uncertainty.min() and uncertainty.max() <= math.log(3) + 1e-5


def test_fusion_options_and_planned_ensemble_size(shapes_model, tmp_path):
    results = shapes_model["paths"].results / shapes_model["pre"].name
    model_dir = results / "SegmentationDiffusionTrainer__nnDiffPlans__tiny"
    default = SegmentationPredictor.from_model_folder(model_dir, device="cpu", preprocessed_dir=shapes_model["pre"])
    assert default.num_samples == load_plans(shapes_model["pre"])["configurations"]["2d"]["sampling"][
        "num_ensemble_samples"]
    predictor = SegmentationPredictor.from_model_folder(model_dir, device="cpu", preprocessed_dir=shapes_model["pre"],
                                                        num_samples=3, fusion="staple", uncertainty="variance")
    images, props = read_images([shapes_model["test"] / "imagesTs" / "case_000_0000.png"])
    case = predictor.prepare_case(images, props, "case_000")
    result = predictor.segment_case(case, seed=4)
    assert result.labels.shape == (1, *case.data.shape[1:]) and result.probabilities.shape[0] == 3
    assert 0 <= result.uncertainty.min() and result.uncertainty.max() <= 0.25
    again = predictor.segment_case(case, seed=4)
    assert torch.equal(result.labels, again.labels)  # seeded per case
    (labels, _), (uncertainty, uprops) = predictor.invert_result(result, case)
    assert labels.shape == images.shape and uncertainty.shape == images.shape and uprops.dtype == "float32"
    with pytest.raises(NnDiffError, match="variance.*K = 1"):
        SegmentationPredictor.from_model_folder(model_dir, device="cpu", preprocessed_dir=shapes_model["pre"],
                                                num_samples=1, uncertainty="variance")


def test_resume_with_continue_equals_an_uninterrupted_run(shapes_model, tmp_path):
    pre = shapes_model["pre"]
    plans = load_plans(pre)

    def trainer(folder: str) -> SegmentationDiffusionTrainer:
        return SegmentationDiffusionTrainer(plans, "tiny", 0, pre, output_dir=tmp_path / folder, device="cpu",
                                            num_workers=0)

    whole = trainer("whole")
    whole.run_training()
    first = trainer("split")
    first.run_training(stop_after_iterations=2)
    assert first.iteration == 2
    second = trainer("split")
    second.run_training(continue_training=True)
    assert second.iteration == whole.iteration == 4
    for a, b in zip(whole.network.state_dict().values(), second.network.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert second.history.last("val_loss") == pytest.approx(whole.history.last("val_loss"))
    assert second.history.last("train_loss") == pytest.approx(whole.history.last("train_loss"))


def test_labels_outside_dataset_json_stop_training_with_the_case(shapes_model, tmp_path):
    pre = shapes_model["pre"]
    folder = pre / "nnDiffPlans_2d"
    bad_pre = tmp_path / pre.name
    import shutil

    shutil.copytree(pre, bad_pre)
    with np.load(bad_pre / folder.name / "case_001.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["seg"][:] = 7
    np.savez(bad_pre / folder.name / "case_001.npz", **arrays)
    trainer = SegmentationBaselineTrainer(load_plans(bad_pre), "tiny", "all", bad_pre, output_dir=tmp_path / "out",
                                          device="cpu", num_workers=0)
    with pytest.raises(NnDiffError, match=r"case_001.*\[7\] are not declared"):
        trainer.run_training()


def test_raw_dataset_label_problems_are_reported_per_file(tmp_path):
    """A label map with an undeclared value or another geometry than its images: errors naming the file."""
    raw = _shapes_2d(tmp_path, 85, 3, seed=3, labels=PLAIN_LABELS)
    bad_value = np.zeros((1, 1, 16, 16), dtype=np.uint8)
    bad_value[0, 0, 0, 0] = 9
    write_image(bad_value, properties_2d(shape=(16, 16)), raw / "labelsTr" / "case_001.png")
    write_image(np.zeros((1, 1, 12, 16), dtype=np.uint8), properties_2d(shape=(12, 16)),
                raw / "labelsTr" / "case_002.png")
    with pytest.raises(DatasetError) as err:
        verify_integrity(load_dataset(raw), full=True)
    text = str(err.value)
    assert "case_001.png" in text and "9" in text and "case_002.png" in text and "shape" in text


# ----------------------------------------------------------------------------------------------
# Regions (nnU-Net region labels) end to end
# ----------------------------------------------------------------------------------------------
def test_region_labels_train_and_predict(tmp_path):
    paths = _paths(tmp_path)
    _shapes_2d(paths.raw, 82, 4, seed=1, labels=REGION_LABELS, extra={"regions_class_order": [1, 2]})
    pre = _prepare(paths, 82, {"tiny": _tiny("2d", 2, training={"num_epochs": 1})})
    trainer = train_fold(82, "tiny", "all", paths, trainer="SegmentationDiffusionTrainer", device="cpu", num_workers=0)
    assert trainer.scheme.is_region and trainer.network.config.in_channels == 3  # background + 2 regions
    predictor = SegmentationPredictor.from_model_folder(trainer.output_dir.parent, folds="all", device="cpu",
                                                        preprocessed_dir=pre, num_samples=2)
    images, props = read_images([paths.raw / "Dataset082_Shapes" / "imagesTr" / "case_000_0000.png"])
    (labels, _), (uncertainty, _) = predictor.segment_arrays(images, props, "case_000")
    assert labels.shape == images.shape and set(np.unique(labels)) <= {0, 1, 2}
    assert 0 <= uncertainty.min() and uncertainty.max() <= 2 * math.log(2) + 1e-5


# ----------------------------------------------------------------------------------------------
# 3D: sliding windows with overlap on a volume larger than the patch
# ----------------------------------------------------------------------------------------------
def test_3d_volume_larger_than_the_patch_is_sampled_in_windows(tmp_path):
    paths = _paths(tmp_path)
    make_example_dataset("nnunet_seg", paths.raw, 83, num_cases=3)
    pre = _prepare(paths, 83, {"tiny_3d": _tiny("3d_fullres", 3, patch_size=[8, 8, 8],
                                                training={"num_epochs": 1, "num_val_cases": 1})})
    trainer = train_fold(83, "tiny_3d", "all", paths, trainer="SegmentationDiffusionTrainer", device="cpu",
                         num_workers=0)
    predictor = SegmentationPredictor.from_model_folder(trainer.output_dir.parent, folds="all", device="cpu",
                                                        preprocessed_dir=pre, num_samples=1)
    shapes = []
    predictor.networks[0].register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape[2:])))
    test = paths.raw / "Dataset083_Seg3D"
    out = tmp_path / "pred"
    predictor.predict_from_folder(test / "imagesTs", out)
    image, image_props = read_images([test / "imagesTs" / "case_003_0000.nii.gz"])
    labels, label_props = read_label(out / "case_003.nii.gz")
    uncertainty, props = read_images([out / "case_003_uncertainty.nii.gz"])
    assert set(shapes) == {(8, 8, 8)} and len(shapes) > 2  # windows, not the whole 8x16x16 volume
    for p in (label_props, props):
        assert p.shape == image_props.shape and np.allclose(p.spacing, image_props.spacing)
        assert np.allclose(p.origin, image_props.origin) and np.allclose(p.direction, image_props.direction)
    assert set(np.unique(labels)) <= {0, 1, 2} and 0 <= uncertainty.min() <= uncertainty.max() <= math.log(3) + 1e-5


# ----------------------------------------------------------------------------------------------
# Both models learn the shapes; evaluated side by side (plan -> train -> predict -> evaluate)
# ----------------------------------------------------------------------------------------------
def test_both_models_learn_the_shapes_and_are_evaluated_side_by_side(tmp_path):
    from nndiff.evaluation.segmentation import evaluate_segmentation_folders

    paths = _paths(tmp_path)
    raw = _shapes_2d(paths.raw, 84, 8, seed=2, labels=PLAIN_LABELS)
    training = {"num_iterations_per_epoch": 40, "num_epochs": 2, "initial_lr": 3e-3, "warmup_iterations": 10,
                "ema_decay": 0.95, "num_val_cases": 1, "progress_every_epochs": 10}
    _prepare(paths, 84, {"learn": _tiny("2d", 2, training=training, batch_size=4,
                                        diffusion={"num_sampling_steps": 4})})
    test = _shapes_2d(tmp_path / "test", 84, 3, seed=9, labels=PLAIN_LABELS, folder="Ts")
    folders = {}
    for trainer in ("SegmentationDiffusionTrainer", "SegmentationBaselineTrainer"):
        train_fold(84, "learn", "all", paths, trainer=trainer, device="cpu", num_workers=0)
        folders[trainer] = tmp_path / trainer
        assert predict_entry(["-i", str(test / "imagesTs"), "-o", str(folders[trainer]), "-d", "84", "-c", "learn",
                              "-f", "all", "-tr", trainer, "--num_samples", "3", "-device", "cpu", *_roots(paths)]) == 0
    summary = evaluate_segmentation_folders(test / "labelsTs", folders["SegmentationDiffusionTrainer"],
                                            dataset_json=raw / "dataset.json",
                                            baseline=folders["SegmentationBaselineTrainer"])
    diffusion_dice = summary["foreground_mean"]["Dice"]
    baseline_dice = summary["deterministic_baseline"]["foreground_mean"]["Dice"]
    # 80 CPU iterations: the baseline is near its ceiling (0.97), the diffusion model past chance (0.60)
    assert baseline_dice > 0.85 and diffusion_dice > 0.45, (baseline_dice, diffusion_dice)
    assert summary["uncertainty_auroc"] is not None and "comparison" in summary


def test_predictors_are_found_from_the_trainer_names_in_a_fresh_process():
    """The CLI looks predictors up by trainer name; nothing may rely on this test module's imports."""
    import subprocess
    import sys

    code = ("from nndiff.inference import predictor_class_for as f; "
            "print(f('SegmentationDiffusionTrainer').__name__, f('SegmentationBaselineTrainer').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["SegmentationPredictor", "SegmentationBaselinePredictor"]
