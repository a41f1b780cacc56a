"""Fold ensembles at prediction: ``prediction`` mode (each fold samples on its own; mean over folds,
Monte-Carlo std over folds x samples; generation draws sample i from fold i mod F), ``step`` mode
(fold outputs averaged at every step), records in prediction_info.json, refusals, the CLI flag."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from inference_helpers import EchoPredictor, copy_inputs, make_planned_ct, write_checkpoint
from nndiff.dataset.io import read_images
from nndiff.errors import NnDiffError
from nndiff.inference import register_predictor
from nndiff.inference.cli import predict_entry
from nndiff.inference.files import monte_carlo_summary
from nndiff.utils.files import load_json

CASE = "case_000"
CONFIGURATION = "3d_fullres"
SEED = 3
FOLD_TRAINER = "FoldNetTrainer"


class NetPredictor(EchoPredictor):
    """Dummy family whose output goes through ``model_fn``: the input plus seeded noise plus a
    network response to a seeded random patch (so folds give different outputs)."""

    def _response(self, generator: torch.Generator, count: int) -> torch.Tensor:
        channels = len(self.dataset_json["channel_names"])
        x = torch.randn((count, channels, *self.configuration["patch_size"]), generator=generator)
        return self.model_fn()(x, torch.full((count,), 500.0), None)

    def predict_case(self, data, case, generator):
        noise = torch.randn(data.shape, generator=generator)
        response = self._response(generator, 1)[0].mean(dim=(1, 2, 3))  # (C,)
        return data + 0.05 * noise + response.reshape(-1, 1, 1, 1)

    def generate(self, num_samples, generator, shape):
        return torch.tanh(self._response(generator, num_samples))


register_predictor(trainers=(FOLD_TRAINER,))(NetPredictor)


class LabelPredictor(EchoPredictor):
    output_kind = "seg"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Planned CT example; folds 0 and 1 (different weights) under the test trainer; one input case."""
    root = tmp_path_factory.mktemp("folds")
    raw, pre, plans = make_planned_ct(root)
    model_dir = root / "results" / pre.name / f"{FOLD_TRAINER}__nnDiffPlans__{CONFIGURATION}"
    for fold, seed in ((0, 10), (1, 11)):
        write_checkpoint(model_dir, plans, CONFIGURATION, fold=fold, ema_seed=seed)
    inputs = copy_inputs(raw, root / "inputs", [CASE])
    return {"root": root, "pre": pre, "plans": plans, "model_dir": model_dir, "inputs": inputs}


def _load(setup, folds, cls=NetPredictor, **kwargs):
    return cls.from_model_folder(setup["model_dir"], folds=folds, device="cpu", preprocessed_dir=setup["pre"],
                                 **kwargs)


def _prepared(setup, predictor):
    """The input case preprocessed by ``predictor`` and its data tensor."""
    images, properties = read_images([setup["inputs"] / f"{CASE}_0000.nii.gz"])
    case = predictor.prepare_case(images, properties, CASE)
    return case, torch.from_numpy(np.ascontiguousarray(case.data))


def _single_fold_samples(setup, ensemble, case, data, num_samples):
    """Each fold loaded alone, sampling the case with the ensemble's per-fold generator: (F, K, ...)."""
    per_fold = []
    for position, fold in enumerate((0, 1)):
        single = _load(setup, (fold,))
        generator = ensemble.fold_generator(SEED, CASE, position)
        with torch.no_grad():
            per_fold.append(single.predict_case_samples(data, case, generator, num_samples))
    return torch.stack(per_fold)


def test_prediction_mode_is_the_mean_of_the_single_fold_predictions(setup, tmp_path):
    ensemble = _load(setup, (0, 1))
    assert ensemble.fold_ensemble == "prediction" and ensemble.fold_names == ["0", "1"]
    case, data = _prepared(setup, ensemble)
    per_fold = _single_fold_samples(setup, ensemble, case, data, 1)[:, 0]
    assert not torch.allclose(per_fold[0], per_fold[1], atol=1e-3)  # folds really differ
    expected = per_fold.mean(0)
    assert torch.equal(ensemble._run_case(case, SEED, 1), expected)
    # the per-fold generator depends on the fold's name, not on which other folds are loaded
    alone = _load(setup, (1,))
    assert alone.fold_generator(SEED, CASE, 0).initial_seed() == ensemble.fold_generator(SEED, CASE, 1).initial_seed()
    assert ensemble.fold_generator(SEED, CASE, 0).initial_seed() != ensemble.fold_generator(SEED, CASE, 1).initial_seed()
    ensemble.predict_from_folder(setup["inputs"], tmp_path, seed=SEED)
    written, _ = read_images([tmp_path / f"{CASE}.nii.gz"])
    inverted, _ = ensemble.invert(expected.numpy(), case.case_json)
    np.testing.assert_allclose(written, inverted, atol=1e-3)
    assert not (tmp_path / f"{CASE}_std.nii.gz").exists()  # one sample per fold: no std map
    info = load_json(tmp_path / "prediction_info.json")
    assert info["fold_ensemble"] == "prediction" and info["folds"] == ["0", "1"]
    assert "fold_ensemble_note" not in info


def test_monte_carlo_std_covers_folds_times_samples(setup, tmp_path):
    ensemble = _load(setup, (0, 1))
    case, data = _prepared(setup, ensemble)
    per_fold = _single_fold_samples(setup, ensemble, case, data, 2)  # (2 folds, 2 samples, ...)
    samples = ensemble._run_case(case, SEED, 2)
    assert samples.shape[0] == 4
    assert torch.equal(samples, per_fold.flatten(0, 1))
    ensemble.predict_from_folder(setup["inputs"], tmp_path, seed=SEED, num_mc_samples=2)
    inverted = [ensemble.invert(s, case.case_json)[0] for s in per_fold.flatten(0, 1).numpy()]
    mean, std = monte_carlo_summary(inverted)
    assert float(std.max()) > 1.0  # the 4 samples spread (HU), so the comparison means something
    np.testing.assert_allclose(read_images([tmp_path / f"{CASE}.nii.gz"])[0], mean, atol=1e-3)
    np.testing.assert_allclose(read_images([tmp_path / f"{CASE}_std.nii.gz"])[0], std, atol=1e-3)
    # not the std over one fold's samples only
    fold_only = monte_carlo_summary(inverted[:2])[1]
    assert not np.allclose(fold_only, std, atol=1e-2)


def test_step_mode_averages_the_networks_at_every_call(setup, tmp_path):
    predictor = _load(setup, (0, 1), fold_ensemble="step")
    case, data = _prepared(setup, predictor)
    generator = predictor.make_generator(SEED, CASE)
    noise = torch.randn(data.shape, generator=generator)
    x = torch.randn((1, 1, *predictor.configuration["patch_size"]), generator=generator)
    t = torch.full((1,), 500.0)
    with torch.no_grad():
        response = torch.stack([net(x, t) for net in predictor.networks]).mean(0)[0].mean(dim=(1, 2, 3))
        expected = data + 0.05 * noise + response.reshape(-1, 1, 1, 1)
        torch.testing.assert_close(predictor._run_case(case, SEED, 1), expected)
    predictor.predict_from_folder(setup["inputs"], tmp_path, seed=SEED)
    info = load_json(tmp_path / "prediction_info.json")
    assert info["fold_ensemble"] == "step" and info["folds"] == ["0", "1"]


def test_generation_draws_sample_i_from_fold_i_mod_F(setup, tmp_path):
    ensemble = _load(setup, (0, 1))
    assert ensemble.batch_size == 2
    ensemble.generate_to_folder(tmp_path, 5, seed=SEED)
    info = load_json(tmp_path / "prediction_info.json")
    assert info["sample_folds"] == {f"sample_{i:04d}": str(i % 2) for i in range(5)}
    assert info["fold_ensemble"] == "prediction"
    sizes = ensemble.generation_shape("patch")
    case_json = ensemble.generated_geometry(sizes)
    # fold 0 draws samples (0, 2) then (4,), fold 1 draws (1, 3); each batch seeded by its first index
    for fold, indices in ((0, [0, 2]), (0, [4]), (1, [1, 3])):
        single = _load(setup, (fold,))
        with torch.no_grad():
            batch = single.generate(len(indices), single.make_generator(SEED, f"sample_{indices[0]:04d}"), sizes)
        for index, sample in zip(indices, batch.numpy()):
            expected, _ = ensemble.invert(sample, case_json)
            written, _ = read_images([tmp_path / f"sample_{index:04d}.nii.gz"])
            np.testing.assert_allclose(written.reshape(expected.shape), expected, atol=1e-3)
    # step mode: every sample from the averaged folds, no per-sample folds recorded
    _load(setup, (0, 1), fold_ensemble="step").generate_to_folder(tmp_path / "step", 2, seed=SEED)
    info = load_json(tmp_path / "step" / "prediction_info.json")
    assert info["fold_ensemble"] == "step" and "sample_folds" not in info


def test_one_fold_is_accepted_and_noted(setup, tmp_path):
    predictor = _load(setup, (1,), fold_ensemble="prediction")
    predictor.generate_to_folder(tmp_path, 1, seed=SEED)
    info = load_json(tmp_path / "prediction_info.json")
    assert info["folds"] == ["1"] and info["fold_ensemble"] == "prediction"
    assert "one fold loaded" in info["fold_ensemble_note"]
    assert _load(setup, (1,)).fold_ensemble == "step"


def test_bad_modes_and_label_maps_are_refused(setup):
    with pytest.raises(NnDiffError, match="unknown fold_ensemble 'mean'.*prediction, step"):
        _load(setup, (0, 1), fold_ensemble="mean")
    with pytest.raises(NnDiffError, match="label maps.*--fold_ensemble step"):
        _load(setup, (0, 1), cls=LabelPredictor, fold_ensemble="prediction")
    assert _load(setup, (0, 1), cls=LabelPredictor).fold_ensemble == "step"  # default for label maps


def test_sampling_outside_the_fold_loop_falls_back_or_is_refused(setup, tmp_path):
    x = torch.zeros((1, 1, *setup["plans"]["configurations"][CONFIGURATION]["patch_size"]))
    t = torch.full((1,), 500.0)
    default = _load(setup, (0, 1))
    with torch.no_grad():
        out = default.model_fn()(x, t, None)  # a family calling model_fn itself: per-step average
        torch.testing.assert_close(out, torch.stack([n(x, t) for n in default.networks]).mean(0))
    default._write_info(tmp_path, SEED, {})
    info = load_json(tmp_path / "prediction_info.json")
    assert info["fold_ensemble"] == "step" and "outside the per-fold loop" in info["fold_ensemble_note"]
    explicit = _load(setup, (0, 1), fold_ensemble="prediction")
    with pytest.raises(NnDiffError, match="outside the per-fold loop.*--fold_ensemble step"), torch.no_grad():
        explicit.model_fn()(x, t, None)
    with explicit.active_folds([1]), torch.no_grad():
        torch.testing.assert_close(explicit.model_fn()(x, t, None), explicit.networks[1](x, t))
    with pytest.raises(NnDiffError, match="out of range"):
        with explicit.active_folds([2]):
            pass


def _cli(setup, output, *flags):
    root = setup["root"]
    return predict_entry(["-i", str(setup["inputs"]), "-o", str(output), "-d", "3", "-c", CONFIGURATION,
                          "-tr", FOLD_TRAINER, "-f", "0", "1", "--seed", str(SEED), "-device", "cpu",
                          "--preprocessed", str(root / "pre"), "--results", str(root / "results"), "-q", *flags])


def test_cli_flag_reaches_the_predictor_and_bad_values_exit_2(setup, tmp_path, capsys):
    assert _cli(setup, tmp_path / "step", "--fold_ensemble", "step") == 0
    assert load_json(tmp_path / "step" / "prediction_info.json")["fold_ensemble"] == "step"
    assert _cli(setup, tmp_path / "default") == 0
    assert load_json(tmp_path / "default" / "prediction_info.json")["fold_ensemble"] == "prediction"
    with pytest.raises(SystemExit) as exit_info:
        _cli(setup, tmp_path / "bad", "--fold_ensemble", "average")
    assert exit_info.value.code == 2
    assert "invalid choice: 'average'" in capsys.readouterr().err


class Recorder(torch.nn.Module):
    """A fold network of a conditional generation model: returns zeros, records the labels it sees."""

    shape_divisor = (2, 2)

    def __init__(self) -> None:
        super().__init__()
        self.labels: list[list[int]] = []

    def forward(self, x, t, class_labels=None, continuous=None):
        self.labels.append(class_labels.tolist())
        return torch.zeros_like(x)


def test_conditional_generation_gives_each_fold_its_samples_conditions(tmp_path):
    from nndiff.dataset.examples import make_example_dataset
    from nndiff.paths import Paths
    from nndiff.pipeline import extract_fingerprint_step, locate_dataset, plan_step
    from nndiff.tasks.generation import ConditionEncoder
    from nndiff.tasks.generation_predictor import GenerationPredictor

    paths = Paths(raw=tmp_path / "raw", preprocessed=tmp_path / "pre", results=tmp_path / "res")
    raw = make_example_dataset("conditional_2d", paths.raw, 814)
    location = locate_dataset(814, paths)
    extract_fingerprint_step(location)
    plans = plan_step(location)
    encoder = ConditionEncoder([("shape", ["disk", "square"])], [("size", 6.0, 1.0)])
    state = {"trainer_class": "GenerationTrainer", "extra": {"conditions": encoder.to_dict()}}
    folds = [Recorder(), Recorder()]
    predictor = GenerationPredictor(plans, "2d", load_json(raw / "dataset.json"), folds, device="cpu", num_steps=1,
                                    batch_size=2, checkpoint_states=[state, state], fold_ensemble="prediction")
    rows = [{"shape": shape, "size": 6} for shape in ("disk", "square", "square", "disk", "square")]
    predictor.generate_to_folder(tmp_path / "out", 5, conditions=rows, guidance_scale=1)
    # fold 0 draws samples (0, 2) then (4,); fold 1 draws (1, 3): each sees its own samples' labels
    assert folds[0].labels == [[0, 1], [1]]
    assert folds[1].labels == [[1, 0]]
    info = load_json(tmp_path / "out" / "prediction_info.json")
    assert info["sample_folds"] == {f"sample_{i:04d}": str(i % 2) for i in range(5)}
    assert info["conditions"]["sample_0003"] == {"shape": "disk", "size": 6.0}
