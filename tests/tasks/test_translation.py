"""Translation family end to end (plan -> train -> predict -> evaluate) and its mechanics: conditioning
layout, missing-channel masks, sliding-window sampling, metrics with exact answers, bad inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nndiff.dataset import load_dataset
from nndiff.dataset.examples import make_example_dataset, properties_2d
from nndiff.dataset.io import read_images, write_image
from nndiff.errors import DatasetError, NnDiffError, PlansError
from nndiff.evaluation.translation import (
    body_mask,
    case_metrics,
    evaluate_translation_folders,
    ssim_map,
)
from nndiff.inference import predictor_class_for
from nndiff.inference.cli import predict_entry
from nndiff.inference.predictor import PreparedCase
from nndiff.paths import Paths
from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step, preprocess_step
from nndiff.run.evaluate import evaluate_folder_entry
from nndiff.run.train import default_trainer
from nndiff.tasks.translation import (
    MISSING_CHANNELS_KEY,
    ConditionLayout,
    TranslationTrainer,
    availability,
    condition_image,
    condition_layout,
    drop_channels,
    sample_translation,
)
from nndiff.tasks.translation_predictor import TranslationPredictor, pad_to_patch
from nndiff.training.api import load_plans, train_fold
from nndiff.utils.files import load_json, save_json

TINY_NETWORK = {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                "num_head_channels": 8, "norm_groups": 4, "dropout": 0.0}
TINY_TRAINING = {"num_iterations_per_epoch": 2, "num_epochs": 2, "num_val_cases": 2, "warmup_iterations": 1,
                 "augmentation": "none", "progress_every_epochs": 1}


def _tiny(parent: str, spatial_dims: int, **extra) -> dict:
    network = {**TINY_NETWORK, "strides": [[2] * spatial_dims], **extra.pop("network", {})}
    return {"inherits_from": parent, "network": network, "training": {**TINY_TRAINING, **extra.pop("training", {})},
            "diffusion": {"num_sampling_steps": 3, **extra.pop("diffusion", {})}, **extra}


def _prepare(paths: Paths, dataset_id: int, configurations: dict[str, dict]) -> Path:
    """Fingerprint, plan (+ tiny configurations), preprocess the parents; the preprocessed folder."""
    location = locate_dataset(dataset_id, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    plans["configurations"].update(configurations)
    save_json(plans, location.plans_file("nnDiffPlans"))
    preprocess_step(location, configurations=sorted({c["inherits_from"] for c in configurations.values()}))
    return next(p for p in paths.preprocessed.iterdir() if p.is_dir())


def _paths(root: Path) -> Paths:
    return Paths(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")


def _roots(paths: Paths) -> list[str]:
    return ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]


# ----------------------------------------------------------------------------------------------
# Synthetic 2D paired dataset: target = smooth nonlinear function of the source
# ----------------------------------------------------------------------------------------------
def _blobs(rng: np.random.Generator, shape=(16, 16), count=3) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    image = np.zeros(shape)
    for _ in range(count):
        cy, cx = rng.uniform(2, shape[0] - 2), rng.uniform(2, shape[1] - 2)
        image += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(1.5, 3.0) ** 2))
    return image / image.max()


def _paired_2d(root: Path, dataset_id: int, n: int, seed: int, channels: int = 1,
               allow_missing: bool = False, folder: str = "Tr") -> Path:
    """PNG pairs: source blobs s (and a second unrelated channel), target 255 (1 - s)^2."""
    rng = np.random.default_rng(seed)
    dataset = root / f"Dataset{dataset_id:03d}_Paired"
    props = properties_2d(shape=(16, 16))
    for i in range(n):
        source = _blobs(rng)
        for c in range(channels):
            image = source if c == 0 else _blobs(rng)
            write_image(np.round(255 * image)[None, None].astype(np.uint8), props,
                        dataset / f"images{folder}" / f"case_{i:03d}_{c:04d}.png")
        target = np.round(255 * (1 - source) ** 2)
        write_image(target[None, None].astype(np.uint8), props, dataset / f"targets{folder}" / f"case_{i:03d}_0000.png")
    data = {"name": "Paired", "task": "translation", "channel_names": {str(c): f"grey{c}" for c in range(channels)},
            "target_names": {"0": "grey_target"}, "numTraining": n, "file_ending": ".png"}
    if allow_missing:
        data["allow_missing_channels"] = True
    if folder == "Tr":
        save_json(data, dataset / "dataset.json")
    return dataset


# ----------------------------------------------------------------------------------------------
# Mechanics with exact answers
# ----------------------------------------------------------------------------------------------
def test_condition_layout_from_the_plan():
    assert condition_layout({"cond_channels": 2}, 2) == ConditionLayout(2, False)
    assert condition_layout({"cond_channels": 4}, 2) == ConditionLayout(2, True)
    with pytest.raises(PlansError, match="cond_channels 3 .* needs 2 .* or 4"):
        condition_layout({"cond_channels": 3}, 2)


def test_condition_image_zero_fills_and_masks():
    images = torch.arange(1, 1 + 2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 2, 2)
    available = availability([[1], []], 3, "cpu")
    assert available.tolist() == [[1, 0, 1], [1, 1, 1]]
    plain = condition_image(images, available, ConditionLayout(3, False))
    assert torch.equal(plain[1], images[1]) and torch.all(plain[0, 1] == 0) and torch.equal(plain[0, 0], images[0, 0])
    masked = condition_image(images, available, ConditionLayout(3, True))
    assert masked.shape == (2, 6, 2, 2)
    assert torch.equal(masked[:, :3], plain)
    assert masked[0, 3:].flatten(1).tolist() == [[1.0] * 4, [0.0] * 4, [1.0] * 4]
    with pytest.raises(NnDiffError, match="2 channel.*trained with 3"):
        condition_image(images[:, :2], available, ConditionLayout(3, False))


def test_drop_channels_keeps_one_and_only_drops_available():
    generator = torch.Generator().manual_seed(0)
    available = availability([[0]] * 2000 + [[]] * 2000, 3, "cpu")
    dropped = drop_channels(available, 0.3, generator)
    assert torch.all(dropped <= available)  # a missing channel never comes back
    assert torch.all(dropped.sum(1) >= 1)
    full = dropped[2000:]
    assert 0.2 < 1 - full.mean().item() < 0.35  # about 30 % dropped (less where all three would go)
    assert torch.equal(drop_channels(available, 0.0), available)


def test_pad_to_patch_uses_channel_values_and_crops_back():
    images = torch.zeros(1, 2, 3, 5)
    padded, crop = pad_to_patch(images, [6, 4], torch.tensor([-1.0, 0.5]))
    assert padded.shape == (1, 2, 6, 5)  # the longer x axis is kept (windows cover it)
    assert torch.all(padded[0, 0, 0] == -1) and torch.all(padded[0, 1, -1] == 0.5)
    assert torch.equal(padded[crop], images)


def test_metrics_exact_answers():
    reference = np.zeros((1, 1, 8, 8))
    reference[0, 0, 2:6, 2:6] = 100.0
    prediction = reference + 10.0
    assert np.allclose(ssim_map(reference, reference, 100.0), 1.0)
    mask, threshold = body_mask(reference)
    assert threshold == pytest.approx(10.0) and mask.sum() == 16  # p1 0, p99 100 -> 0 + 0.1 * 100
    ring = np.zeros((1, 1, 9, 9))
    ring[0, 0, 1:8, 1:8] = 50.0
    ring[0, 0, 3:6, 3:6] = 0.0  # air inside the body: filled
    assert body_mask(ring)[0].sum() == 49
    values = case_metrics(prediction, reference, 100.0, std=np.abs(prediction - reference) * 0.1 + reference * 0.01)
    assert values["mae"] == pytest.approx(10.0) and values["psnr"] == pytest.approx(20.0)  # 10 log10(100²/10²)
    assert values["mae_body"] == pytest.approx(10.0) and values["psnr_body"] == pytest.approx(20.0)
    assert case_metrics(reference, reference, 100.0)["psnr"] == float("inf")
    speck = ring.copy()
    speck[0, 0, 0, 8] = 50.0  # an isolated speck above the threshold is not body (largest component)
    assert body_mask(speck)[0].sum() == 49
    assert values["uncertainty_error_pearson"] is None  # the error is constant: no correlation defined


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
def test_missing_target_is_an_integrity_error_naming_the_case(tmp_path):
    folder = make_example_dataset("translation", tmp_path / "raw", 71)
    (folder / "targetsTr" / "case_002_0000.nii.gz").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset(folder)
    assert "case_002" in str(err.value) and "target" in str(err.value)


# ----------------------------------------------------------------------------------------------
# End to end on the 3D example (MR-like -> CT in HU)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct_model(tmp_path_factory):
    """Example translation dataset; tiny 3D (patch = image) and 2D (8x8 patch < 16x16 slices) models."""
    root = tmp_path_factory.mktemp("translation")
    paths = _paths(root)
    make_example_dataset("translation", paths.raw, 72)
    pre = _prepare(paths, 72, {"tiny_3d": _tiny("3d_fullres", 3),
                               "tiny_2d": _tiny("2d", 2, patch_size=[8, 8])})
    for name in ("tiny_3d", "tiny_2d"):
        train_fold(72, name, 0, paths, trainer="TranslationTrainer", device="cpu", num_workers=0)
    heldout = make_example_dataset("translation", root / "heldout", 72, num_cases=2, seed=99)
    return {"paths": paths, "pre": pre, "heldout": heldout}


def test_train_predict_monte_carlo_and_evaluate_3d(ct_model, tmp_path):
    paths, heldout = ct_model["paths"], ct_model["heldout"]
    assert default_trainer(load_plans(ct_model["pre"])) == "TranslationTrainer"
    assert predictor_class_for("TranslationTrainer") is TranslationPredictor
    fold = paths.results / ct_model["pre"].name / "TranslationTrainer__nnDiffPlans__tiny_3d" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    out = tmp_path / "pred"
    code = predict_entry(["-i", str(heldout / "imagesTr"), "-o", str(out), "-d", "72", "-c", "tiny_3d",
                          "--num_samples", "2", "-device", "cpu", *_roots(paths)])
    assert code == 0
    for case in ("case_000", "case_001"):
        source, source_props = read_images([heldout / "imagesTr" / f"{case}_0000.nii.gz"])
        mean, props = read_images([out / f"{case}.nii.gz"])
        std, std_props = read_images([out / f"{case}_std.nii.gz"])
        for p in (props, std_props):
            assert p.shape == source_props.shape and np.allclose(p.spacing, source_props.spacing)
            assert np.allclose(p.origin, source_props.origin) and np.allclose(p.direction, source_props.direction)
        # HU: inside the plan's CT window; the two samples differ somewhere
        assert -1024.5 <= mean.min() and mean.max() <= 1499.5 and std.max() > 0 and std.min() >= 0
    info = load_json(out / "prediction_info.json")
    assert info["num_mc_samples"] == 2 and info["predictor"] == "TranslationPredictor"

    summary = evaluate_translation_folders(heldout / "targetsTr", out, dataset_json=heldout / "dataset.json")
    assert summary == load_json(out / "summary.json")
    # nndiff_evaluate_folder dispatches on the dataset's task
    assert evaluate_folder_entry([str(heldout / "targetsTr"), str(out), "--dataset_json", str(heldout / "dataset.json"),
                                  "-o", str(tmp_path / "cli.json")]) == 0
    assert load_json(tmp_path / "cli.json") == summary
    # generation-only flags are refused for a translation dataset, not silently ignored
    code = evaluate_folder_entry([str(heldout / "targetsTr"), str(out), "--dataset_json", str(heldout / "dataset.json"),
                                  "--no_training", "--max_pairs", "10", "-o", str(tmp_path / "x.json")])
    assert code == 2 and not (tmp_path / "x.json").exists()
    assert summary["inputs"]["num_cases"] == 2 and summary["inputs"]["with_uncertainty"]
    case = summary["per_case"]["case_000"]
    reference = read_images([heldout / "targetsTr" / "case_000_0000.nii.gz"])[0]
    prediction = read_images([out / "case_000.nii.gz"])[0]
    assert case["mae"] == pytest.approx(np.abs(prediction - reference).mean(), rel=1e-5)
    assert 0 < case["body_fraction"] < 1 and case["mae_body"] > 0
    assert -1 <= case["uncertainty_error_pearson_body"] <= 1
    assert summary["settings"]["data_range"] == pytest.approx(
        max(read_images([p])[0].max() for p in sorted((heldout / "targetsTr").iterdir()))
        - min(read_images([p])[0].min() for p in sorted((heldout / "targetsTr").iterdir())))


def test_evaluation_folder_errors(ct_model, tmp_path):
    heldout = ct_model["heldout"]
    pred = tmp_path / "pred"
    pred.mkdir()
    with pytest.raises(DatasetError, match="case_000.nii.gz.*no prediction for reference case case_000"):
        evaluate_translation_folders(heldout / "targetsTr", pred, dataset_json=heldout / "dataset.json")
    with pytest.raises(NnDiffError, match="no 'target_names'"):
        evaluate_translation_folders(heldout / "targetsTr", pred, dataset_json={"task": "generation"})


def test_2d_configuration_samples_in_sliding_windows(ct_model):
    """Slices of 16x16 with an 8x8 patch: every network call sees one 8x8 window; outputs keep geometry."""
    model_dir = ct_model["paths"].results / ct_model["pre"].name / "TranslationTrainer__nnDiffPlans__tiny_2d"
    predictor = TranslationPredictor.from_model_folder(model_dir, device="cpu", preprocessed_dir=ct_model["pre"])
    shapes = []
    network = predictor.networks[0]
    network.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape[2:])))
    images, props = read_images([ct_model["heldout"] / "imagesTr" / "case_000_0000.nii.gz"])
    out, out_props = predictor.predict_arrays(images, props, "case_000", seed=1)
    assert out.shape == images.shape and out_props.shape == props.shape
    batches = -(-images.shape[1] // predictor.batch_size)  # the 8 slices in batches
    assert set(shapes) == {(8, 8)} and len(shapes) == 3 * 9 * batches  # 3 steps x 3x3 windows per batch
    again, _ = predictor.predict_arrays(images, props, "case_000", seed=1)
    assert np.array_equal(out, again)  # seeded per case


def test_3d_windowed_sampling_equals_whole_volume_sampling_where_it_fits(ct_model):
    """One window covering the volume gives the whole-volume sample; a larger volume is windowed."""
    model_dir = ct_model["paths"].results / ct_model["pre"].name / "TranslationTrainer__nnDiffPlans__tiny_3d"
    predictor = TranslationPredictor.from_model_folder(model_dir, device="cpu", preprocessed_dir=ct_model["pre"])
    cond = torch.randn(1, 1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = sample_translation(predictor.model_fn(), predictor.configuration, cond,
                               generator=torch.Generator().manual_seed(1))
    windowed = sample_translation(predictor.windowed_model_fn(), predictor.configuration, cond,
                                  generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(windowed, whole, rtol=1e-5, atol=1e-5)
    large = torch.randn(1, 12, 20, 16, generator=torch.Generator().manual_seed(2))
    out = predictor.predict_case(large, PreparedCase("large", large.numpy(), {}), torch.Generator().manual_seed(3))
    assert out.shape == (1, 12, 20, 16) and torch.isfinite(out).all()


def _counted(predictor: TranslationPredictor) -> list[tuple[int, ...]]:
    """Input shapes of every network call of the predictor's (single) fold."""
    shapes: list[tuple[int, ...]] = []
    predictor.networks[0].register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    return shapes


def test_monte_carlo_samples_share_network_calls_2d(ct_model):
    """Regression (GPU run, issue 5): K samples of a one-slice case ran K sequential samplers of
    batch 1 (K x steps x windows calls). Now the K copies are the sampler's batch items: with
    batch_size 4 a step is one call per window for K = 4 (3 steps x 3x3 windows = 27 calls)."""
    model_dir = ct_model["paths"].results / ct_model["pre"].name / "TranslationTrainer__nnDiffPlans__tiny_2d"
    predictor = TranslationPredictor.from_model_folder(model_dir, device="cpu", preprocessed_dir=ct_model["pre"])
    predictor.batch_size = 4
    shapes = _counted(predictor)
    data = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))  # one 16x16 slice, 8x8 patch
    case = PreparedCase("one_slice", data.numpy(), {})
    samples = predictor._run_case(case, seed=4, num_samples=4)
    assert samples.shape == (4, 1, 1, 16, 16) and torch.isfinite(samples).all()
    assert len(shapes) == 3 * 9 and set(shapes) == {(4, 1, 8, 8)}
    assert all(not torch.equal(samples[0], samples[k]) for k in (1, 2, 3))  # independent noise per copy
    torch.testing.assert_close(predictor._run_case(case, seed=4, num_samples=4), samples)  # seeded per case
    # 3 slices x K = 2 = 6 items in batches of 4: two calls per window and step (not K x 1)
    shapes.clear()
    volume = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = predictor.predict_case_samples(volume, PreparedCase("three", volume.numpy(), {}),
                                         torch.Generator().manual_seed(2), 2)
    assert out.shape == (2, 1, 3, 16, 16)
    # the batch-4 run: 9 windows of 4 per step; the batch-2 run stacks 2 windows per call (4 items,
    # the predictor's batch_size): ceil(9 / 2) = 5 calls per step
    assert len(shapes) == 3 * (9 + 5) and sorted(set(s[0] for s in shapes)) == [2, 4]
    # K = 1 is the per-slice batching of predict_case
    shapes.clear()
    single = predictor.predict_case(volume, PreparedCase("three", volume.numpy(), {}), torch.Generator().manual_seed(2))
    assert single.shape == (1, 3, 16, 16) and len(shapes) == 3 * 9 * 1 and set(s[0] for s in shapes) == {3}


def test_monte_carlo_samples_share_network_calls_3d_and_subclass_loop(ct_model):
    """3D: K volumes in batches of batch_size. A subclass with its own predict_case (e.g. a warm
    start) keeps one predict_case per sample."""
    model_dir = ct_model["paths"].results / ct_model["pre"].name / "TranslationTrainer__nnDiffPlans__tiny_3d"
    predictor = TranslationPredictor.from_model_folder(model_dir, device="cpu", preprocessed_dir=ct_model["pre"])
    predictor.batch_size = 2
    shapes = _counted(predictor)
    data = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    out = predictor.predict_case_samples(data, PreparedCase("vol", data.numpy(), {}), torch.Generator().manual_seed(1), 3)
    assert out.shape == (3, 1, 8, 16, 16)
    assert len(shapes) == 3 * 2 and sorted(s[0] for s in shapes) == [1, 1, 1, 2, 2, 2]  # 3 steps x (2 + 1)

    class OwnSampling(TranslationPredictor):
        def predict_case(self, data, case, generator):
            return torch.full((1, *data.shape[1:]), float(torch.rand((), generator=generator)))

    predictor.__class__ = OwnSampling
    assert not predictor.batches_samples()
    looped = predictor.predict_case_samples(data, PreparedCase("vol", data.numpy(), {}),
                                            torch.Generator().manual_seed(1), 3)
    assert looped.shape == (3, 1, 8, 16, 16) and len(set(float(v) for v in looped[:, 0, 0, 0, 0])) == 3


# ----------------------------------------------------------------------------------------------
# The conditioning is used
# ----------------------------------------------------------------------------------------------
def test_conditioning_drives_the_output(tmp_path):
    """A tiny model trained briefly on target = 255 (1 - s)^2 produces outputs that follow their own
    source far more than another case's."""
    paths = _paths(tmp_path)
    _paired_2d(paths.raw, 73, 8, seed=0)
    training = {"num_iterations_per_epoch": 60, "num_epochs": 2, "initial_lr": 2e-3, "warmup_iterations": 20,
                "ema_decay": 0.99, "num_val_cases": 1, "progress_every_epochs": 10}
    _prepare(paths, 73, {"tiny": _tiny("2d", 2, training=training, batch_size=4, diffusion={"num_sampling_steps": 8})})
    train_fold(73, "tiny", "all", paths, trainer="TranslationTrainer", device="cpu", num_workers=0)
    test = _paired_2d(tmp_path / "test", 73, 4, seed=5, folder="Ts")
    out = tmp_path / "pred"
    assert predict_entry(["-i", str(test / "imagesTs"), "-o", str(out), "-d", "73", "-c", "tiny", "-f", "all",
                          "-device", "cpu", *_roots(paths)]) == 0
    predictions = [read_images([out / f"case_{i:03d}.png"])[0].ravel() for i in range(4)]
    targets = [read_images([test / "targetsTs" / f"case_{i:03d}_0000.png"])[0].ravel() for i in range(4)]
    own = [np.corrcoef(predictions[i], targets[i])[0, 1] for i in range(4)]
    other = [np.corrcoef(predictions[i], targets[(i + 1) % 4])[0, 1] for i in range(4)]
    assert min(own) > 0.6, own
    assert all(o > x + 0.3 for o, x in zip(own, other)), (own, other)


# ----------------------------------------------------------------------------------------------
# Missing source channels
# ----------------------------------------------------------------------------------------------
def _mark_missing(pre: Path, configuration_folder: str, case: str, channel: int) -> None:
    """What preprocessing stores for a case lacking a channel: zeros and CASE.json missing_channels."""
    folder = pre / configuration_folder
    with np.load(folder / f"{case}.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["data"][channel] = 0.0
    np.savez(folder / f"{case}.npz", **arrays)
    case_json = load_json(folder / f"{case}.json")
    case_json[MISSING_CHANNELS_KEY] = [channel]
    save_json(case_json, folder / f"{case}.json")


def test_missing_channel_mode_trains_and_predicts(tmp_path, caplog):
    paths = _paths(tmp_path)
    _paired_2d(paths.raw, 74, 5, seed=1, channels=2, allow_missing=True)
    # the planner gives allow_missing_channels datasets 2 x C conditioning channels (images + masks)
    pre = _prepare(paths, 74, {"masked": _tiny("2d", 2), "plain": _tiny("2d", 2, network={"cond_channels": 2})})
    _mark_missing(pre, "nnDiffPlans_2d", "case_001", 1)
    trainer = train_fold(74, "masked", "all", paths, trainer="TranslationTrainer", device="cpu", num_workers=0)
    assert trainer.layout == ConditionLayout(2, True)
    assert trainer.missing_channels == {"case_001": [1]}
    batch = trainer.make_batch({"keys": ["case_000", "case_001"], "data": np.ones((2, 2, 16, 16), np.float32),
                                "target": np.zeros((2, 1, 16, 16), np.float32)})
    assert batch["available"].tolist() == [[1, 1], [1, 0]]
    # the plain configuration (no mask channels) still trains, zero-filling, with a warning
    plain = TranslationTrainer(load_plans(pre), "plain", "all", pre, output_dir=tmp_path / "plain", device="cpu",
                               num_workers=0)
    with caplog.at_level("WARNING"):
        plain.initialize()
    assert plain.layout == ConditionLayout(2, False) and "cond_channels 4" in caplog.text

    # inference: case_001 lacks channel 1 entirely
    test = _paired_2d(tmp_path / "test", 74, 2, seed=6, channels=2, folder="Ts")
    (test / "imagesTs" / "case_001_0001.png").unlink()
    out = tmp_path / "pred"
    assert predict_entry(["-i", str(test / "imagesTs"), "-o", str(out), "-d", "74", "-c", "masked", "-f", "all",
                          "-device", "cpu", *_roots(paths)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["case_000.png", "case_001.png"]
    assert load_json(out / "prediction_info.json")["missing_channels"] == {"case_001": [1]}
    # a missing channel's content is ignored: any stand-in gives the same output
    model_dir = paths.results / pre.name / "TranslationTrainer__nnDiffPlans__masked"
    predictor = TranslationPredictor.from_model_folder(model_dir, folds="all", device="cpu", preprocessed_dir=pre)
    images, props = read_images([test / "imagesTs" / "case_000_0000.png", test / "imagesTs" / "case_000_0001.png"])
    scrambled = images.copy()
    scrambled[1] = images[1][:, ::-1]
    a, _ = predictor.predict_arrays(images, props, "x", missing_channels=[1])
    b, _ = predictor.predict_arrays(scrambled, props, "x", missing_channels=[1])
    c, _ = predictor.predict_arrays(images, props, "x")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_missing_channels_refused_without_allow_missing(tmp_path):
    paths = _paths(tmp_path)
    _paired_2d(paths.raw, 75, 5, seed=2, channels=2)
    pre = _prepare(paths, 75, {"tiny": _tiny("2d", 2)})
    _mark_missing(pre, "nnDiffPlans_2d", "case_003", 0)
    trainer = TranslationTrainer(load_plans(pre), "tiny", 0, pre, output_dir=tmp_path / "out", device="cpu",
                                 num_workers=0)
    with pytest.raises(NnDiffError, match="case_003.json: case case_003 lacks source channel.*allow_missing_channels"):
        trainer.initialize()
    with pytest.raises(NnDiffError, match="have no 'target' array"):
        TranslationTrainer.make_batch(trainer, {"keys": ["case_000"], "data": np.zeros((1, 2, 16, 16), np.float32)})
