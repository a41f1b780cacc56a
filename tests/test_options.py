import json

import pytest

from nndiff.diffusion import options
from nndiff.diffusion.options import Sampler, TaskFamily, parse_option


def test_parse_option_lists_valid_names():
    with pytest.raises(ValueError) as err:
        parse_option(Sampler, "ddpn", "sampler")
    message = str(err.value)
    assert "ddpn" in message and "ddim" in message and "annealed_langevin" in message


def test_options_serialise_as_plain_strings():
    assert json.dumps({"task": TaskFamily.ANOMALY_DETECTION}) == '{"task": "anomaly_detection"}'
    assert parse_option(TaskFamily, "segmentation") is TaskFamily.SEGMENTATION


def test_task_family_spellings_match_dataset_format():
    assert [t.value for t in options.TaskFamily] == [
        "generation", "translation", "denoising", "reconstruction", "anomaly_detection", "segmentation",
    ]
