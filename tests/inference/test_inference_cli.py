"""nndiff_predict (nndiff.inference.cli.predict_entry) and the predictor registry."""
from __future__ import annotations


import numpy as np
import pytest

from inference_helpers import ECHO_TRAINER, EchoPredictor, copy_inputs, make_planned_ct, write_checkpoint
from nndiff.dataset.io import read_images
from nndiff.errors import NnDiffError
from nndiff.inference import Predictor, predictor_class_for, register_predictor
from nndiff.inference.cli import predict_entry


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    raw, pre, plans = make_planned_ct(root)
    model_dir = root / "results" / pre.name / f"{ECHO_TRAINER}__nnDiffPlans__3d_fullres"
    write_checkpoint(model_dir, plans, "3d_fullres")
    return root, raw, pre


def _roots(root):
    return ["--preprocessed", str(root / "pre"), "--results", str(root / "results"), "-q"]


def test_predict_generate_and_monte_carlo_from_the_command_line(trained, tmp_path):
    root, raw, pre = trained
    inputs = copy_inputs(raw, tmp_path / "in", ["case_002"])
    assert predict_entry(["-i", str(inputs), "-o", str(tmp_path / "out"), "-d", "3", "-c", "3d_fullres",
                          "-device", "cpu", *_roots(root)]) == 0
    output, props = read_images([tmp_path / "out" / "case_002.nii.gz"])
    original, props_in = read_images([inputs / "case_002_0000.nii.gz"])
    assert output.shape == original.shape and props.origin == pytest.approx(props_in.origin, abs=1e-5)
    assert predict_entry(["-i", str(inputs), "-o", str(tmp_path / "mc"), "-d", "3", "-c", "3d_fullres",
                          "--num_samples", "2", "-device", "cpu", *_roots(root)]) == 0
    assert (tmp_path / "mc" / "case_002_std.nii.gz").is_file()
    assert predict_entry(["-o", str(tmp_path / "gen"), "-d", "Dataset003", "-c", "3d_fullres", "-tr", ECHO_TRAINER,
                          "--num_samples", "3", "--seed", "2", "-device", "cpu", *_roots(root)]) == 0
    samples = sorted(p.name for p in (tmp_path / "gen").glob("sample_*.nii.gz"))
    assert samples == ["sample_0000.nii.gz", "sample_0001.nii.gz", "sample_0002.nii.gz"]
    assert np.isfinite(read_images([tmp_path / "gen" / samples[0]])[0]).all()


def test_user_errors_exit_with_code_2(trained, tmp_path, capsys):
    root, _, _ = trained
    assert predict_entry(["-o", str(tmp_path), "-d", "3", "-c", "3d_fullres", "-tr", "NoSuchTrainer",
                          "-device", "cpu", *_roots(root)]) == 2
    assert "no predictor is registered for trainer 'NoSuchTrainer'" in capsys.readouterr().err
    assert predict_entry(["-o", str(tmp_path), "-d", "3", "-c", "2d", "-device", "cpu", *_roots(root)]) == 2
    assert "no trained models for 2d" in capsys.readouterr().err


def test_registry_refuses_a_second_predictor_for_a_trainer():
    assert predictor_class_for(ECHO_TRAINER) is EchoPredictor

    class Other(Predictor):
        pass

    with pytest.raises(ValueError, match="already has predictor"):
        register_predictor(trainers=(ECHO_TRAINER,))(Other)
    with pytest.raises(TypeError):
        register_predictor(trainers=("X",))(dict)
    with pytest.raises(NnDiffError, match="no predictor is registered"):
        predictor_class_for("NoSuchTrainer")


def test_condition_flags_are_refused_where_they_do_not_apply(trained, tmp_path, capsys):
    root, raw, _ = trained
    inputs = copy_inputs(raw, tmp_path / "in", ["case_002"])
    # with -i: conditions are for generation only
    assert predict_entry(["-i", str(inputs), "-o", str(tmp_path / "a"), "-d", "3", "-c", "3d_fullres",
                          "--condition", "sex=F", "-device", "cpu", *_roots(root)]) == 2
    assert "--condition and --guidance_scale apply to generation" in capsys.readouterr().err
    # a family whose generate_to_folder takes no conditions
    assert predict_entry(["-o", str(tmp_path / "b"), "-d", "3", "-c", "3d_fullres", "--guidance_scale", "2",
                          "-device", "cpu", *_roots(root)]) == 2
    assert "EchoPredictor does not take --guidance_scale" in capsys.readouterr().err
    assert predict_entry(["-o", str(tmp_path / "c"), "-d", "3", "-c", "3d_fullres", "--condition", "sex",
                          "-device", "cpu", *_roots(root)]) == 2
    assert "--condition 'sex' is not KEY=VALUE" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")
